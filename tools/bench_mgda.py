"""Our jitted ``mgda_weights`` update against torchjd's MGDA on the same [K, D] Jacobian.

    python tools/bench_mgda.py [--ks 5,16] [--ds 1e6,1e7] [--repeats 10] [--tree | --no-flat --tree] [--leaves 200]
                               [--no-native] [--settle 0.15] [--fresh-pages]

Both aggregate K gradients of D parameters into one vector: the Gram matrix, the min-norm
weights, the weighted sum. Printed: time of each, their ratio, the floor and our time over it, our
time over the copy (the floor of earlier notes), and each result's objective excess
``||J^T lam||^2 - ||J^T lam*||^2`` over the exact optimum (quadprog, float64), in units of the mean
squared gradient norm (float32 rounding of a D-long dot product puts the floor of that figure near
1e-7 to 1e-6).

The floor: the step reads the K x D float32 gradients twice (the Gram matrix, then the weighted
sum: the weights depend on all of the Gram matrix), so twice the fastest single read of them
measured in the same run, or the Gram matrix's 2 K^2 D FLOPs at the measured GEMM rate when that is
slower. The single read is the faster of two independent routines that read the gradients once:
XLA's in-place copy (read and write back) and OpenBLAS's matrix-vector product ``c^T J`` into a
preallocated vector (numpy). Earlier notes priced both reads at the copy's time alone (the copy
moves 2 nbytes, so as if a read cost half a copy); on this 2-core VM a read-only stream is not
faster per byte than the copy's mixed one (one read of 200 MB: 6-8 ms, the whole copy: 7 ms), so
that figure, kept in the last column, is a bound no two-pass method can reach.

Timing: each repeat runs ours, torchjd, the copy and the matrix-vector product back to back, and each
keeps its best time, so that load from other processes on the machine hits all alike. Before each timed
call: ``--settle`` seconds of untimed sleep, then one untimed call of the same routine. OpenBLAS's and
torch's threads spin for a while after their call (OpenBLAS's for up to 2^28 TSC cycles, its default
THREAD_TIMEOUT: 0.1 s at 2.6 GHz) and, on a 2-core machine, took a core from the call after them (our
K = 16, D = 1e7 Gram matrix: 33 ms right after the others' calls, 19 ms after a 50 ms rest; at K = 16,
D = 1e6 ours 5.5 ms after a 20 ms rest, 5.0 after 150 ms, and the read 2.0 against 1.8); the untimed
call then wakes the routine's own thread pool, as in a training loop where the step follows its
library's backward pass (a cold XLA pool cost our two-phase step 2 ms at K = 16, D = 1e6, a one-call
routine less), and leaves the gradients in cache where they fit, as after a backward pass, for every
routine alike. The copy runs in place (its input buffer donated) and the product writes into one
preallocated vector, so that neither pays for a fresh result (see Memory below).

``call ms``: a jitted function that takes the same arrays and returns as many, doing nothing else: what calling
any jitted function on them costs from Python (0.01 ms on one array, 0.4-1.9 ms on a tree of 200 leaves: flattening,
argument checks, one result buffer per leaf), paid by ours but by no routine that takes one matrix, and not paid
inside a jitted training step. ``step/floor``: ours less that cost, over the floor.

``--tree``: a second table on a LoRA-like pytree of ``--leaves`` leaves of four shapes (rank 16 times
h and 4h, both orientations) totalling about D: ours takes the tree, torchjd the same gradients
concatenated into one [K, D] matrix (the concatenation not timed; torchjd's MGDA takes a matrix).

Memory: as the trainer does on the CPU (``marble_jax.cpu_memory.keep_freed_memory``), the process's freed buffers
are kept for reuse, for every routine alike; ``--fresh-pages`` leaves glibc's default, under which each result over
32 MiB (ours at D = 1e7, torchjd's too) is a fresh mapping that faults its whole size in at every call (K = 5, D = 1e7:
ours 11.0 against 7.3 ms for the combination alone), a cost the floor's preallocated reads never pay.

Ours runs the native CPU kernels of ``mgda.gram_matrix`` and ``mgda.combine`` when
``marble_jax.cpu_kernels.available()`` (printed first); ``--no-native``: also ours with them disabled (XLA's
Gram matrix and sum), in two more columns of the same run.
"""

from __future__ import annotations

import argparse
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import quadprog
import torch
from bench_balance import interleaved_best  # tools/ is this script's directory
from torchjd.aggregation import MGDA

from marble_jax import cpu_kernels, cpu_memory, mgda


def inplace_copy(nbytes: int):
    """A jitted in-place (donated) float32 copy ``a * s`` of ``nbytes``: it moves 2 nbytes (read + write)."""
    buf = [jnp.ones((nbytes // 4,), jnp.float32)]
    scale = jnp.float32(1.0)  # traced, so that XLA cannot drop the multiply
    copy = jax.jit(lambda a, s: a * s, donate_argnums=0)

    def run():
        buf[0] = copy(buf[0], scale)
        buf[0].block_until_ready()

    return run


def read_once(jac: np.ndarray):
    """OpenBLAS's ``c^T J`` (numpy, every core) into a preallocated ``[D]``: one read of ``J [K, D]``."""
    coefficients, out = np.ones(jac.shape[0], np.float32), np.empty(jac.shape[1], np.float32)
    return lambda: np.dot(coefficients, jac, out=out)


def gemm_rate(repeats: int, n: int = 2048) -> float:
    """FLOP/s of a jitted float32 [n, n] x [n, n] matmul: the machine's compute ceiling."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n**3 / interleaved_best({"mm": lambda: mm(a).block_until_ready()}, repeats, warm_up=True)["mm"]


def exact_objective(gram: np.ndarray) -> float:
    k = gram.shape[0]
    n = np.sqrt(np.diag(gram))
    gu = gram / np.outer(n, n) + 1e-10 * np.eye(k)
    c = np.concatenate([(1 / n)[:, None], np.eye(k)], axis=1)
    mu = quadprog.solve_qp(gu, np.zeros(k), c, np.concatenate([[1.0], np.zeros(k)]), 1)[0]
    lam = np.maximum(mu / n, 0)
    lam /= lam.sum()
    return float(lam @ gram @ lam)


def conflicting_jacobian(k: int, d: int, seed: int = 0) -> np.ndarray:
    """A low-rank conflict: K gradients in a 2-D subspace (plus 0.3% noise), norms over 2
    decades, so that their convex hull nearly contains 0 (hard for a step-size stopping rule)."""
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, 2), dtype=np.float32) @ rng.standard_normal((2, d), dtype=np.float32)
    jac += 0.003 * rng.standard_normal((k, d), dtype=np.float32)
    jac *= (10 ** rng.uniform(-1, 1, size=(k, 1))).astype(np.float32)
    return jac


def lora_shapes(d: int, leaves: int, rank: int = 16) -> list[tuple[int, int]]:
    """``leaves`` shapes, a quarter each of (r, h), (h, r), (r, 4h), (4h, r), totalling about d."""
    per = max(leaves // 4, 1)
    h = max(1, round(d / (per * rank * 10)))
    return [(rank, h)] * per + [(h, rank)] * per + [(rank, 4 * h)] * per + [(4 * h, rank)] * per


def as_tree(jac: np.ndarray, shapes: list[tuple[int, int]]) -> dict:
    """The columns of ``jac [K, D]`` cut into leaves ``[K, *shape]`` (D = the shapes' total)."""
    k, out, start = jac.shape[0], {}, 0
    for i, shape in enumerate(shapes):
        size = int(np.prod(shape))
        out[f"leaf{i:03d}"] = jnp.asarray(jac[:, start : start + size].reshape(k, *shape))
        start += size
    return out


def compiled_update(tx, grads, state, native: bool):
    """``tx.update``'s update, compiled as the environment says or (``native=False``) with the native CPU kernels
    disabled (their env var is read at trace)."""
    with mock.patch.dict(os.environ, {} if native else {cpu_kernels.DISABLE_ENV: "0"}):
        return jax.jit(lambda g, s: tx.update(g, s)[0]).lower(grads, state).compile()


def bench_case(
    k: int, d: int, repeats: int, rate: float, leaves: int | None = None, xla_too: bool = False, settle: float = 0.0
) -> str:
    """One table row: torchjd and ours on the same conflicting [K, D] Jacobian (ours on a pytree of it if leaves);
    ``xla_too``: also ours with XLA's Gram matrix."""
    if leaves is not None:
        shapes = lora_shapes(d, leaves)
        d = sum(a * b for a, b in shapes)
    jac = conflicting_jacobian(k, d)
    gram = jac.astype(np.float64) @ jac.T.astype(np.float64)
    f_star, scale = exact_objective(gram), np.trace(gram) / k
    jt = torch.from_numpy(jac)
    agg = MGDA()
    tx = mgda.mgda_weights(k, ema_decay=0.0, normalize=False, rescale=False)  # plain MGDA, as torchjd
    state = tx.init(None)
    ours_in = jnp.asarray(jac) if leaves is None else as_tree(jac, shapes)
    update = compiled_update(tx, ours_in, state, native=True)
    dispatch = jax.jit(lambda g: jax.tree.map(lambda leaf: leaf[0, ..., :1], g))  # the same leaves in and out
    runs = {
        "ours": lambda: jax.block_until_ready(update(ours_in, state)),
        "dispatch": lambda: jax.block_until_ready(dispatch(ours_in)),
        "torchjd": lambda: agg(jt),
        "copy": inplace_copy(jac.nbytes),
        "gemv": read_once(jac),
    }
    if xla_too:
        update_xla = compiled_update(tx, ours_in, state, native=False)
        runs["xla"] = lambda: jax.block_until_ready(update_xla(ours_in, state))
    best = interleaved_best(runs, repeats, warm_up=True, settle=settle, rewarm=True)
    out_t = agg(jt).double().numpy()
    out_o = update(ours_in, state)
    if leaves is not None:
        out_o = np.concatenate([np.asarray(out_o[name]).reshape(-1) for name in ours_in])
    out_o = np.asarray(out_o, np.float64)
    # Reading the gradients twice (Gram matrix, combination) at the fastest measured single read, or the
    # Gram matrix's 2 K^2 D FLOPs at the measured GEMM rate, whichever is slower (module doc).
    one_read = min(best["copy"], best["gemv"])
    floor = max(2 * one_read, 2 * k * k * d / rate)
    t_ours, t_torchjd, in_step = best["ours"], best["torchjd"], max(best["ours"] - best["dispatch"], 0.0)
    row = (
        f"{k:>3}{d:>10.0e}{1e3 * t_torchjd:>12.2f}{1e3 * t_ours:>9.2f}{t_torchjd / t_ours:>9.2f}x"
        f"{1e3 * one_read:>10.2f}{1e3 * floor:>10.2f}{t_ours / floor:>10.2f}x{1e3 * best['dispatch']:>10.2f}"
        f"{in_step / floor:>10.2f}x{t_ours / best['copy']:>10.2f}x"
        f"{(out_t @ out_t - f_star) / scale:>13.1e}{(out_o @ out_o - f_star) / scale:>10.1e}"
    )
    return row + (f"{1e3 * best['xla']:>9.2f}{best['xla'] / floor:>10.2f}x" if xla_too else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="5,16")
    parser.add_argument("--ds", default="1e6,1e7")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tree", action="store_true", help="also bench a LoRA-like pytree of --leaves leaves")
    parser.add_argument("--no-flat", action="store_true", help="skip the flat [K, D] table")
    parser.add_argument("--leaves", type=int, default=200)
    parser.add_argument("--no-native", action="store_true", help="also time ours without the native CPU kernels (XLA's path)")
    parser.add_argument("--settle", type=float, default=0.15, help="seconds of untimed sleep before each timed call")
    parser.add_argument("--fresh-pages", action="store_true", help="leave glibc's default: results over 32 MiB fault in anew")
    args = parser.parse_args()
    kept = not args.fresh_pages and cpu_memory.keep_freed_memory()
    print(f"freed buffers {'kept for reuse' if kept else 'returned (fresh pages for large results)'}")
    print(f"native CPU kernels: {'on' if cpu_kernels.available() else 'off'}")
    rate = gemm_rate(args.repeats)
    header = ("K", "D", "torchjd ms", "ours ms", "speed-up", "read ms", "floor ms", "ours/floor", "call ms",
              "step/floor", "ours/copy", "torchjd exc", "ours exc")  # fmt: skip
    widths = (3, 10, 12, 9, 10, 10, 10, 11, 10, 11, 11, 13, 10)
    if args.no_native:
        header, widths = header + ("xla ms", "xla/floor"), widths + (9, 11)
    cases = [(k, d) for k in (int(x) for x in args.ks.split(",")) for d in (int(float(x)) for x in args.ds.split(","))]
    tables = ([] if args.no_flat else [None]) + ([args.leaves] if args.tree else [])
    for leaves in tables:
        title = "flat [K, D] Jacobian" if leaves is None else f"pytree of {leaves} leaves (4 shapes; torchjd: the [K, D] concat)"
        print(title)
        print("".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
        for k, d in cases:
            print(bench_case(k, d, args.repeats, rate, leaves, xla_too=args.no_native, settle=args.settle), flush=True)


if __name__ == "__main__":
    main()
