"""The native CPU kernels (``marble_jax.cpu_kernels``) and ``mgda.gram_matrix`` / ``mgda.combine``'s use of them,
against float64 numpy.

Gram bound, derived from the kernel's summation order (``marble_jax/csrc/cpu_kernels.cc``): a product ``a_c b_c``
passes through at most ``h = b / 16`` additions (its lane's sum within a block of ``b = block_columns(K)`` columns)
``+ B`` (its part's running sum over blocks; ``B`` <= all the blocks: per operand of n columns
``ceil(16 floor(n / 16) / b)`` plus one for a ragged tail) ``+ 4`` (the tree over the 16 lanes) ``+ P - 1`` (the sum
over the parts, ``P`` <= 16), so ``|G - G64| <= gamma_{h + 1} sum_c |a_c b_c|`` per entry,
``gamma_m = m u / (1 - m u)``, ``u = 2^-24`` (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
sec. 3.1; a fused multiply-add rounds once, not twice). Where XLA sums other leaves (``D'`` values per row, any
order: ``gamma_{D'}``), their additions add to ``h``; XLA's path alone (several devices, or disabled kernel) sums
the ``D`` values in any order: ``gamma_D``. At K = 16, n = 100003, ``h + 1`` = 300: the bound is ``1.8e-5``
relative to ``sum |a b|``; the error measured is below ``2 u``.

Combination bound: each value is ``c_0 x_0`` and K - 1 multiply-adds, ``|y - y64| <= gamma_K sum_k |c_k x_k|``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from marble_jax import cpu_kernels, mgda, sharding

ROOT = Path(__file__).resolve().parents[1]
U32 = 2.0**-24
LANES, MAX_BLOCK, BLOCK_BYTES, MAX_PARTS = 16, 4096, 256 << 10, 16  # kLanes, kBlock, kBlockBytes, kMaxParts

_CXX = os.environ.get("CXX") or "g++"
needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or shutil.which(_CXX) is None or not cpu_kernels.available(),
    reason=f"no native Gram kernel here: needs the CPU backend and a C++ compiler ({_CXX!r}, or $CXX) that builds "
    f"marble_jax/csrc/cpu_kernels.cc, and {cpu_kernels.DISABLE_ENV} unset (see the logged warning)",
)


def gamma(m: int) -> float:
    return m * U32 / (1 - m * U32)


def block_columns(k: int) -> int:
    """The kernel's columns per block for K rows (``BlockColumns``)."""
    return max(LANES, min(MAX_BLOCK, BLOCK_BYTES // (4 * k) // LANES * LANES))


def kernel_depth(k: int, ns: list[int]) -> int:
    """The most additions a product passes through in the kernel, for K rows and operands of ``ns`` columns."""
    block = block_columns(k)
    blocks = sum(-(-(n // LANES * LANES) // block) + (n % LANES > 0) for n in ns)
    return block // LANES + blocks + int(np.log2(LANES)) + MAX_PARTS - 1


def reference(flats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``sum_o x_o x_o^T`` and ``sum_o |x_o| |x_o|^T`` of ``[K, n_o]`` operands."""
    x = np.concatenate([np.asarray(f, np.float64).reshape(f.shape[0], -1) for f in flats], axis=1)
    return x @ x.T, np.abs(x) @ np.abs(x).T


def assert_within(got, flats: list[np.ndarray], depth: int):
    ref, scale = reference(flats)
    err = np.abs(np.asarray(got, np.float64) - ref)
    bound = gamma(depth + 1) * scale
    assert np.all(err <= bound), f"max error / bound {np.max(err / np.where(bound > 0, bound, 1)):.3g}"


def rows(k: int, n: int, seed: int) -> np.ndarray:
    """``[K, n]`` float32, rows of scales over three decades (errors are relative to each entry's sum |a b|)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n)) * np.logspace(0, 3, k)[:, None]).astype(np.float32)


def lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded in this process yet (the registered target stays)."""
    monkeypatch.setenv("MARBLE_JAX_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    yield tmp_path
    cpu_kernels._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
@pytest.mark.parametrize("k", [1, 2, 5, 16, 33])
def test_kernel_matches_float64(k, n):
    """Within the derived bound; symmetric entries equal; two calls bitwise equal (K n >= 2^20: several parts)."""
    x = rows(k, n, seed=k * n)
    got = np.asarray(cpu_kernels.gram_f32(jnp.asarray(x)))
    assert got.shape == (k, k) and got.dtype == np.float32
    assert_within(got, [x], kernel_depth(k, [n]))
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(cpu_kernels.gram_f32)(jnp.asarray(x))))


@needs_kernel
def test_kernel_sums_several_operands():
    """One call over operands of different widths (empty, under one lane, ragged, several blocks)."""
    ns = [0, 3, 16, 517, 40_000]
    xs = [rows(6, n, seed=n) for n in ns]
    got = cpu_kernels.gram_f32(*map(jnp.asarray, xs))
    assert_within(got, xs, kernel_depth(6, ns))


def assert_combine_within(got, c: np.ndarray, x: np.ndarray):
    """``got [n]`` against float64 ``c^T x`` within ``gamma_K sum_k |c_k x_k|`` (module doc)."""
    c64, x64 = c.astype(np.float64), x.astype(np.float64)
    err = np.abs(np.asarray(got, np.float64) - c64 @ x64)
    bound = gamma(len(c)) * (np.abs(c64) @ np.abs(x64))
    assert np.all(err <= bound), f"max error / bound {np.max(err / np.where(bound > 0, bound, 1)):.3g}"


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 1000, 300_007])
@pytest.mark.parametrize("k", [1, 2, 5, 16, 33])
def test_combine_matches_float64(k, n):
    """Within gamma_K; eager and jitted bitwise equal, and two threaded calls (K n >= 2^20) too."""
    x = rows(k, n, seed=k + n)
    c = np.random.default_rng(n).standard_normal(k).astype(np.float32)
    (got,) = cpu_kernels.combine_f32(jnp.asarray(c), jnp.asarray(x))
    assert got.shape == (n,) and got.dtype == np.float32
    assert_combine_within(got, c, x)
    again = jax.jit(cpu_kernels.combine_f32)(jnp.asarray(c), jnp.asarray(x))[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(again))


@needs_kernel
def test_combine_several_operands_and_mgda_combine():
    """One call over operands of several widths (empty, under one lane, ragged, many chunks); ``mgda.combine`` sends
    a tree's float32 leaves to the kernel in one call (leaf shapes kept) and its bfloat16 leaf to XLA."""
    ns = [0, 3, 16, 517, 40_000]
    xs = [rows(6, n, seed=n + 1) for n in ns]
    c = np.linspace(-1.0, 2.0, 6).astype(np.float32)
    outs = cpu_kernels.combine_f32(jnp.asarray(c), *map(jnp.asarray, xs))
    assert [o.shape for o in outs] == [(n,) for n in ns]
    for got, x in zip(outs, xs, strict=True):
        assert_combine_within(got, c, x)
    tree = mixed_tree(6)
    fn = jax.jit(mgda.combine)
    assert fn.lower(tree, jnp.asarray(c)).as_text().count(f"@{cpu_kernels.COMBINE_TARGET}(") == 1
    got = fn(tree, jnp.asarray(c))
    for leaf, out in zip(jax.tree.leaves(tree), jax.tree.leaves(got), strict=True):
        assert out.shape == leaf.shape[1:] and out.dtype == leaf.dtype
        x = np.asarray(leaf.astype(jnp.float32)).reshape(6, -1)
        if leaf.dtype == jnp.float32:
            assert_combine_within(out.reshape(-1), c, x)
        else:  # XLA's float32 sum, then one rounding to the leaf's dtype
            ref = c.astype(np.float64) @ x.astype(np.float64)
            tol = np.finfo(np.dtype(leaf.dtype)).eps * np.abs(ref) + gamma(6) * (np.abs(c) @ np.abs(x))
            assert np.all(np.abs(np.asarray(out, np.float64).reshape(-1) - ref) <= tol)


@needs_kernel
def test_combine_gradient_and_vmap():
    """Differentiable in both arguments (``d/dc sum(w * y) = x w``, ``d/dx = c w^T``: a sum of n products, gamma_n,
    and one rounded product; the value: gamma_K per entry, then the sum of n) and vmapped (one call per element)."""
    k, n = 5, 2003
    x = rows(k, n, seed=21)
    c = np.random.default_rng(22).standard_normal(k).astype(np.float32)
    w = np.random.default_rng(23).standard_normal(n).astype(np.float32)
    loss = lambda c, x: jnp.sum(jnp.asarray(w) * mgda.combine(x, c))  # noqa: E731
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    assert cpu_kernels.COMBINE_TARGET in fn.lower(jnp.asarray(c), jnp.asarray(x)).as_text()
    value, (dc, dx) = fn(jnp.asarray(c), jnp.asarray(x))
    x64, w64, c64 = x.astype(np.float64), w.astype(np.float64), c.astype(np.float64)
    scale = np.abs(c64) @ np.abs(x64)
    assert abs(float(value) - (c64 @ x64) @ w64) <= gamma(k) * scale @ np.abs(w64) + gamma(n) * (scale @ np.abs(w64))
    assert np.all(np.abs(np.asarray(dc, np.float64) - x64 @ w64) <= gamma(n) * (np.abs(x64) @ np.abs(w64)))
    assert np.all(np.abs(np.asarray(dx, np.float64) - np.outer(c64, w64)) <= U32 * np.abs(np.outer(c64, w64)))
    cs = np.stack([c, -c, 2 * c])
    batched = jax.jit(jax.vmap(lambda c: mgda.combine(jnp.asarray(x), c)))
    out = batched(jnp.asarray(cs))
    for b in range(3):
        assert_combine_within(out[b], cs[b], x)


def test_combine_rejects_bad_operands():
    with pytest.raises(ValueError, match="coefficients must be float32"):
        cpu_kernels.combine_f32(jnp.ones((3,), jnp.bfloat16), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"float32 \[3, n\]"):
        cpu_kernels.combine_f32(jnp.ones((3,)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="no operands"):
        cpu_kernels.combine_f32(jnp.ones((3,)))


def test_kernel_rejects_bad_operands():
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.gram_f32(jnp.ones((3, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.gram_f32(jnp.ones((3, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match="no operands"):
        cpu_kernels.gram_f32()


def mixed_tree(k: int = 5) -> dict:
    """Float32 leaves large and tiny (several shapes, a 1-D one), a bfloat16 and a float16 leaf."""
    rng = np.random.default_rng(7)
    tree = {"big": jnp.asarray(rows(k, 64 * 700, seed=1).reshape(k, 64, 700))}
    tree["small"] = [jnp.asarray(rows(k, 16 * 4, seed=i).reshape(k, 16, 4)) for i in range(20)]
    tree["vector"] = jnp.asarray(rows(k, 1, seed=3).reshape(k))
    tree["ragged"] = jnp.asarray(rows(k, 1003, seed=4))
    tree["brain"] = jnp.asarray(rng.standard_normal((k, 3, 70)), jnp.bfloat16)
    tree["half"] = jnp.asarray(rng.standard_normal((k, 30)), jnp.float16)
    return tree


def tree_bound_depths(tree: dict) -> tuple[int, int]:
    """(native depth, XLA depth) for :func:`mixed_tree`: the kernel's float32 leaves plus XLA's other leaves and the
    final addition; any order of all D values per row for XLA's path."""
    leaves = jax.tree.leaves(tree)
    k = leaves[0].shape[0]
    ns = [int(np.prod(leaf.shape[1:])) for leaf in leaves if leaf.dtype == jnp.float32]
    rest = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves if leaf.dtype != jnp.float32)
    total = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
    return kernel_depth(k, ns) + rest + 1, total


def as_float32(tree: dict) -> list[np.ndarray]:
    """The leaves as stored, in float32 (bfloat16 / float16 products are exact in float32)."""
    return [np.asarray(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(tree)]


@needs_kernel
def test_gram_matrix_native_matches_xla_path(monkeypatch):
    """A pytree with tiny, large and non-float32 leaves: native and XLA paths each within its bound, and of each other."""
    tree = mixed_tree()
    native_depth, xla_depth = tree_bound_depths(tree)
    native_fn = jax.jit(lambda t: mgda.gram_matrix(t))
    assert cpu_kernels.GRAM_TARGET in native_fn.lower(tree).as_text()
    native = np.asarray(native_fn(tree), np.float64)
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    xla_fn = jax.jit(lambda t: mgda.gram_matrix(t))
    assert cpu_kernels.GRAM_TARGET not in xla_fn.lower(tree).as_text()
    xla = np.asarray(xla_fn(tree), np.float64)
    assert_within(native, as_float32(tree), native_depth)
    assert_within(xla, as_float32(tree), xla_depth)
    _, scale = reference(as_float32(tree))
    assert np.all(np.abs(native - xla) <= (gamma(native_depth + 1) + gamma(xla_depth + 1)) * scale)


@needs_kernel
def test_kernel_used_on_cpu_only():
    """The CPU lowering calls the kernel (one call for all float32 leaves); a CUDA lowering, or a given chunk, does not."""
    tree = mixed_tree()
    text = lowered(mgda.gram_matrix, tree)
    assert text.count(f"@{cpu_kernels.GRAM_TARGET}(") == 1
    cuda = jax.jit(mgda.gram_matrix).trace(tree).lower(lowering_platforms=("cuda",)).as_text()
    assert cpu_kernels.GRAM_TARGET not in cuda
    assert cpu_kernels.GRAM_TARGET not in lowered(lambda t: mgda.gram_matrix(t, chunk=4096), tree)
    assert cpu_kernels.GRAM_TARGET not in lowered(mgda.gram_matrix, jnp.ones((4, 100), jnp.bfloat16))
    combine = jax.jit(lambda t: mgda.combine(t, jnp.ones(5))).trace(tree)
    assert cpu_kernels.COMBINE_TARGET in combine.lower().as_text()
    assert cpu_kernels.COMBINE_TARGET not in combine.lower(lowering_platforms=("cuda",)).as_text()


@needs_kernel
def test_gram_matrix_jit_and_vmap():
    """Eager, jitted and vmapped (one kernel call per batch element; one operand unbatched) against float64."""
    k, n, batch = 4, 3001, 3
    xs = np.stack([rows(k, n, seed=s) for s in range(batch)])
    shared = rows(k, 40, seed=9)
    depth = kernel_depth(k, [n, 40])
    fn = lambda x, s: mgda.gram_matrix({"x": x, "s": s})  # noqa: E731
    assert_within(fn(jnp.asarray(xs[0]), jnp.asarray(shared)), [xs[0], shared], depth)
    assert_within(jax.jit(fn)(jnp.asarray(xs[1]), jnp.asarray(shared)), [xs[1], shared], depth)
    batched = jax.jit(jax.vmap(fn, in_axes=(0, None)))
    assert cpu_kernels.GRAM_TARGET in batched.lower(jnp.asarray(xs), jnp.asarray(shared)).as_text()
    out = batched(jnp.asarray(xs), jnp.asarray(shared))
    for b in range(batch):
        assert_within(out[b], [xs[b], shared], depth)


@needs_kernel
def test_gram_matrix_gradient():
    """Differentiable through the kernel (its JVP by XLA's products): ``d sum(W * G) / dx = (W + W^T) x``, each entry
    a sum of 2K products (``gamma_{2K}``)."""
    k, n = 5, 700
    x = rows(k, n, seed=11)
    w = np.random.default_rng(12).standard_normal((k, k)).astype(np.float32)
    fn = jax.jit(jax.value_and_grad(lambda t: jnp.sum(jnp.asarray(w) * mgda.gram_matrix(t))))
    assert cpu_kernels.GRAM_TARGET in fn.lower(jnp.asarray(x)).as_text()
    value, grad = fn(jnp.asarray(x))
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    err = np.abs(np.asarray(grad, np.float64) - (w64 + w64.T) @ x64)
    assert np.all(err <= gamma(2 * k) * (np.abs(w64) + np.abs(w64.T)) @ np.abs(x64))
    ref, scale = reference([x])
    assert abs(float(value) - np.sum(w64 * ref)) <= (gamma(kernel_depth(k, [n]) + 1) + gamma(k * k)) * np.sum(np.abs(w64) * scale)


SHARDED_SCRIPT = """
import json, sys
import numpy as np, jax
from jax.sharding import NamedSharding, PartitionSpec as P
from marble_jax import cpu_kernels, mgda, sharding
mesh = sharding.make_mesh(data=2, fsdp=4)  # the trainer's mesh (axes of automatic sharding)
rng = np.random.default_rng(0)
k = 4
specs = {"cols_fsdp": ((k, 64, 40), P(None, "fsdp")), "cols_both": ((k, 4096), P(None, ("data", "fsdp"))),
         "replicated": ((k, 300), P()), "three_d": ((k, 8, 33), P(None, "fsdp"))}
host = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in specs.items()}
tree = {name: jax.device_put(host[name], NamedSharding(mesh, spec)) for name, (_, spec) in specs.items()}
fn = jax.jit(mgda.gram_matrix)
compiled = fn.lower(tree).compile().as_text()
combined = jax.jit(lambda t: mgda.combine(t, np.ones(k, np.float32))).lower(tree).compile().as_text()
np.savez(sys.argv[1], got=np.asarray(fn(tree)), **host)
print(json.dumps({"available": cpu_kernels.available(), "kernel": cpu_kernels.GRAM_TARGET in compiled,
                  "combine_kernel": cpu_kernels.COMBINE_TARGET in combined,
                  "all_gather": "all-gather" in compiled, "all_reduce": "all-reduce" in compiled}))
"""


@needs_kernel
def test_several_devices_keep_xla_path(tmp_path):
    """8 host devices, leaves split along their columns over (data, fsdp) and replicated ones: XLA's partitioned
    products (local products, an all-reduce; no operand gathered), not the kernel, which XLA would gather for."""
    out = tmp_path / "gram.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags = json.loads(proc.stdout.strip().splitlines()[-1])
    assert flags == {"available": True, "kernel": False, "combine_kernel": False, "all_gather": False, "all_reduce": True}
    data = np.load(out)
    leaves = [data[name] for name in data.files if name != "got"]
    assert_within(data["got"], leaves, sum(int(np.prod(leaf.shape[1:])) for leaf in leaves))  # any order: gamma_D


@needs_kernel
def test_in_shard_map():
    """Inside shard_map (one device here) the kernel's result varies over the manual axes, as XLA's product's does:
    the two branches of gram_matrix's platform_dependent agree in type."""
    mesh = sharding.make_mesh(data=1, fsdp=1)
    x = rows(3, 700, seed=5)
    per_block = lambda b: mgda.gram_matrix(b[0])[None]  # noqa: E731
    fn = jax.jit(jax.shard_map(per_block, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    assert cpu_kernels.GRAM_TARGET in fn.lower(jnp.asarray(x[None])).as_text()
    assert_within(fn(jnp.asarray(x[None]))[0], [x], kernel_depth(3, [700]))


@pytest.mark.parametrize("cxx,reason", [("/nonexistent/c++", "no C++ compiler"), ("false", "failed")])
def test_no_compiler_falls_back(cxx, reason, fresh_library, monkeypatch, caplog):
    """A missing or failing compiler: not available, one warning naming the reason, gram_matrix on XLA's path."""
    monkeypatch.setenv("CXX", cxx)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert not cpu_kernels.available()
        assert not cpu_kernels.available()
    warnings = [r for r in caplog.records if r.name == cpu_kernels.__name__]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert not list(fresh_library.glob("*.so"))
    tree = mixed_tree()
    assert cpu_kernels.GRAM_TARGET not in lowered(lambda t: mgda.gram_matrix(t), tree)
    assert_within(mgda.gram_matrix(tree), as_float32(tree), tree_bound_depths(tree)[1])
    assert cpu_kernels.COMBINE_TARGET not in lowered(lambda t: mgda.combine(t, jnp.ones(5)), tree)


def test_env_var_disables(monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert not cpu_kernels.available()
    assert not caplog.records
    assert cpu_kernels.GRAM_TARGET not in lowered(lambda x: mgda.gram_matrix(x), jnp.ones((3, 5000)))
    assert cpu_kernels.COMBINE_TARGET not in lowered(lambda x: mgda.combine(x, jnp.ones(3)), jnp.ones((3, 5000)))


@needs_kernel
def test_build_is_cached(fresh_library):
    """One library per source / compiler / flags / CPU in the cache directory, reused by the next process."""
    assert cpu_kernels.available()
    built = list(fresh_library.iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_kernels-") and built[0].suffix == ".so"  # no temp file left
    inode = built[0].stat().st_ino  # a rebuild renames a new file into place: another inode
    cpu_kernels._library.cache_clear()  # as a new process would
    assert cpu_kernels.available()
    assert list(fresh_library.iterdir()) == built and built[0].stat().st_ino == inode


@needs_kernel
def test_a_build_prunes_the_stale_builds_of_the_cache(fresh_library):
    """After a build, other builds unused for STALE_DAYS days go (an earlier version's name too); recent ones and
    other files stay; a build found in the cache is touched, so a library in use is never stale."""
    old = time.time() - (cpu_kernels.STALE_DAYS + 1) * 86400
    stale = [fresh_library / "cpu_kernels-0123456789abcdef0123.so", fresh_library / "gram_cpu-0123456789abcdef0123.so"]
    kept = [fresh_library / "cpu_kernels-fedcba9876543210fedc.so", fresh_library / "notes.txt"]
    for path in stale + kept:
        path.write_bytes(b"x")
    for path in stale + [kept[1]]:
        os.utime(path, (old, old))
    assert cpu_kernels.available()
    built = list(fresh_library.glob("cpu_kernels-*.so"))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept) and len(built) == 2
    new = next(p for p in built if p != kept[0])
    os.utime(new, (old, old))
    cpu_kernels._library.cache_clear()
    assert cpu_kernels.available() and new.stat().st_mtime > time.time() - 3600  # found in the cache: touched
