"""Min-norm (MGDA) balancing of K objective gradients, and its optax transform.

The pieces, from the inside out:

* :func:`min_norm` — the point of the probability simplex minimising ``lam^T G lam`` for a
  K x K Gram matrix ``G``. Each iteration is a pairwise Frank-Wolfe step with exact line
  search (linear convergence: Lacoste-Julien & Jaggi, NeurIPS 2015, the objective being a
  strongly convex function of a linear map over a polytope) followed by Wolfe's minor cycle
  (1976): a step towards the minimiser over the affine hull of the current support, again
  with exact line search. The second step makes the solver finite in practice (a few
  iterations for K <= 16, also for gradient norms spread over six decades, where plain
  Frank-Wolfe crawls). It stops on the Frank-Wolfe duality gap, never on the step size.
* :func:`gram_matrix` — ``G[k, j] = <g_k, g_j>`` summed leaf by leaf over a pytree of stacked
  gradients (leading axis K); no leaf is flattened into one model-sized vector. On CPU a native
  kernel (:mod:`marble_jax.cpu_kernels`) reads the float32 leaves once.
* :func:`harmonize` — MARBLE's normalise / min-norm / EMA / rescale recipe (REFERENCE §3 steps
  2-5) on a Gram matrix, giving the coefficients ``c_k`` of the combined update.
* :func:`mgda_aggregate` — one aggregation as a pure function: K-stacked Jacobian (and state,
  optional applicability ``mask``) in, ``(update, state)`` out; :func:`coefficients` and
  :func:`needs_solve` serve amortised steps between solves.
* :func:`mgda_weights` — :func:`mgda_aggregate` as an optax transform, first in a chain; it
  refuses, naming the transform, a place where its stacked input meets params-shaped ones.
* :func:`skip_nonfinite` — wraps a whole optimizer so that a step with a non-finite update
  leaves parameters and optimizer state untouched (``optax.apply_if_finite`` cannot wrap a
  transform whose output shape differs from its input, as ``mgda_weights``' does).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from marble_jax import cpu_kernels

Array = jax.Array
PyTree = Any


class MinNormInfo(NamedTuple):
    """Result of :func:`min_norm_with_info`.

    Attributes:
      weights: ``[K]`` the simplex point found.
      objective: ``weights^T G weights``.
      gap: duality gap ``weights^T G weights - min_i (G weights)_i`` over the active
        objectives; the optimum's objective is at least ``objective - 2 * gap``.
      iterations: Frank-Wolfe iterations taken.
    """

    weights: Array
    objective: Array
    gap: Array
    iterations: Array


@functools.partial(jax.jit, static_argnames=("max_iters", "tol", "atol", "ridge"))
def min_norm_with_info(
    gram: Array,
    mask: Array | None = None,
    *,
    max_iters: int = 1000,
    tol: float = 1e-5,
    atol: float = 2e-7,
    ridge: float = 1e-6,
) -> MinNormInfo:
    """Minimises ``lam^T G lam`` over the simplex, returning convergence information.

    Args:
      gram: ``[K, K]`` symmetric positive semi-definite matrix, K >= 1.
      mask: optional ``[K]`` booleans; objectives where it is False get weight 0 and are left
        out of the solve (e.g. zero gradients). All False gives all-zero weights.
      max_iters: cap on pairwise Frank-Wolfe iterations (K = 1, 2 are solved in closed form).
      tol: stop when ``gap <= tol * objective + atol * scale``, ``scale`` the mean diagonal of
        the active block. Since ``objective - optimum <= 2 * gap``, the defaults give an
        objective within ``2e-5`` relative plus ``4e-7 * scale`` of the optimum, which float32
        rounding of ``G`` itself hardly allows to improve.
      atol: absolute part of the stopping rule, relative to ``scale``.
      ridge: Tikhonov term (relative to ``scale``) of the affine-hull step's KKT system, which
        keeps rank-deficient Gram matrices solvable; it only steers that step, whose length is
        chosen by exact line search on the true ``G``.

    Returns:
      A :class:`MinNormInfo`. The weights are exactly zero outside ``mask`` and sum to one
      over it. Ties (e.g. identical gradients) resolve to the uniform weights the solver
      starts from.
    """
    gram = jnp.asarray(gram)
    k = gram.shape[0]
    if gram.ndim != 2 or gram.shape[1] != k:
        raise ValueError(f"gram must be a square [K, K] matrix, got shape {gram.shape}")
    dtype = jnp.promote_types(gram.dtype, jnp.float32)
    gram = gram.astype(dtype)
    mask = jnp.ones((k,), bool) if mask is None else jnp.asarray(mask, bool)
    if mask.shape != (k,):
        raise ValueError(f"mask must have shape ({k},), got {mask.shape}")

    n_active = jnp.sum(mask)
    diag = jnp.diagonal(gram)
    scale = jnp.sum(jnp.where(mask, diag, 0)) / jnp.maximum(n_active, 1)
    # The minimiser is invariant to the scale of G: solve on G / scale for float32 headroom.
    g = gram / jnp.where(scale > 0, scale, 1)
    g = jnp.where(mask[:, None] & mask[None, :], g, 0)
    lam0 = mask.astype(dtype) / jnp.maximum(n_active, 1).astype(dtype)

    def measure(lam):
        grad = g @ lam
        obj = lam @ grad
        best = jnp.min(jnp.where(mask, grad, jnp.inf))
        gap = jnp.where(n_active > 0, obj - best, 0)
        return grad, obj, gap

    def not_converged(obj, gap):
        return gap > tol * obj + atol

    if k <= 2:
        # Closed form: for K = 2, lam_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1).
        if k == 1:
            lam = lam0
        else:
            curv = g[0, 0] + g[1, 1] - 2 * g[0, 1]
            a = jnp.where(curv > 0, jnp.clip((g[1, 1] - g[0, 1]) / jnp.where(curv > 0, curv, 1), 0, 1), 0.5)
            lam = jnp.where(mask.all(), jnp.stack([a, 1 - a]), lam0)
        _, obj, gap = measure(lam)
        return MinNormInfo(lam, obj * scale, gap * scale, jnp.zeros((), jnp.int32))

    def cond(state):
        _, it, obj, gap = state
        return (it < max_iters) & not_converged(obj, gap)

    def body(state):
        lam, it, _, _ = state
        grad = g @ lam
        s = jnp.argmin(jnp.where(mask, grad, jnp.inf))  # Frank-Wolfe vertex
        a = jnp.argmax(jnp.where(lam > 0, grad, -jnp.inf))  # away vertex
        slope = grad[s] - grad[a]  # <= 0: directional derivative / 2 along e_s - e_a
        curv = g[s, s] + g[a, a] - 2 * g[s, a]
        cap = lam[a]
        step = jnp.where(curv > 0, jnp.clip(-slope / jnp.where(curv > 0, curv, 1), 0, cap), cap)
        lam = lam.at[s].add(step).at[a].add(-step)  # lam[a] becomes exactly 0 on a drop step
        lam = affine_step(lam)
        _, obj, gap = measure(lam)
        return lam, it + 1, obj, gap

    eye = jnp.eye(k, dtype=dtype)

    def affine_step(lam):
        # Wolfe's minor cycle: move towards the minimiser of lam^T G lam over the affine hull of
        # the current support (KKT system, a small ridge for rank-deficient G), as far as the
        # simplex allows, with exact line search on the true G: f never increases.
        support = lam > 0
        both = support[:, None] & support[None, :]
        kkt = jnp.where(both, g + ridge * eye, eye)
        kkt = jnp.block([[kkt, support[:, None].astype(dtype)], [support[None, :].astype(dtype), jnp.zeros((1, 1), dtype)]])
        rhs = jnp.zeros((k + 1,), dtype).at[k].set(1)
        alpha = jnp.where(support, jnp.linalg.solve(kkt, rhs)[:k], 0)
        d = alpha - lam
        shrinking = d < 0
        room = jnp.min(jnp.where(shrinking, lam / jnp.where(shrinking, -d, 1), jnp.inf))
        slope = d @ (g @ lam)
        curv = d @ (g @ d)
        theta = jnp.where(curv > 0, -slope / jnp.where(curv > 0, curv, 1), 0)
        theta = jnp.clip(theta, 0, jnp.minimum(room, 1))
        ok = jnp.all(jnp.isfinite(alpha)) & (slope < 0)
        new = jnp.where(ok, lam + theta * d, lam)
        # Coordinates the step drives to zero (up to rounding) leave the support exactly.
        return jnp.where(new > 1e-12 * jnp.max(new), new, 0)

    _, obj0, gap0 = measure(lam0)
    lam, it, obj, gap = jax.lax.while_loop(cond, body, (lam0, jnp.zeros((), jnp.int32), obj0, gap0))
    lam = jnp.maximum(lam, 0)
    lam = lam / jnp.where(lam.sum() > 0, lam.sum(), 1)
    return MinNormInfo(lam, obj * scale, gap * scale, it)


def min_norm(gram: Array, mask: Array | None = None, *, max_iters: int = 1000, tol: float = 1e-5) -> Array:
    """The min-norm simplex weights ``lam [K]`` for a Gram matrix ``[K, K]``.

    See :func:`min_norm_with_info` for the algorithm, the stopping rule and ``mask``.
    """
    return min_norm_with_info(gram, mask, max_iters=max_iters, tol=tol).weights


NATIVE_MAX_K = 128  # the native Gram kernel keeps a K x K x 16 float32 block of partial sums per thread


def _native_cpu(k: int) -> bool:
    """Whether float32 leaves of K rows go to :mod:`marble_jax.cpu_kernels`: CPU, one device, the kernels built."""
    return 1 <= k <= NATIVE_MAX_K and jax.default_backend() == "cpu" and jax.device_count() == 1 and cpu_kernels.available()


def _flat_leaf(leaf: Array) -> Array:
    return leaf.reshape(leaf.shape[0], -1)


def gram_matrix(grads: PyTree, *, chunk: int | None = None) -> Array:
    """``G [K, K]`` with ``G[k, j] = <g_k, g_j>``, accumulated in float32 leaf by leaf.

    Each leaf adds the product ``[K, n] x [n, K]`` of its rows (inputs in the leaf's dtype, float32 accumulation;
    no approximation). How, by measurement (``tools/bench_mgda.py``):

    * on CPU (the default backend, one device), the float32 leaves (K <= 128) go, all in one call, to the native
      kernel of :mod:`marble_jax.cpu_kernels` when it is available: one pass over them, register tiles of row pairs,
      only the pairs ``k <= j``, on XLA's thread pool, the next block of columns prefetched while a block's tiles run
      (K > 5). On a 2-core machine, each call after a 20 ms rest: at K = 5 and 16 it takes about the time of one read
      of the leaf (n = 1e7: 6.1 and 22.7 ms, against 6-8 and 18-22 ms for a read); against the XLA path below it is
      3.4x / 5.0x faster at K = 5, n = 1e6 / 1e7, 3.7x / 4.1x at K = 16, 5.6x at K = 64 and 2.9x at K = 128
      (n = 1e6), 1.5-1.9x at K = 5, n = 1024-16384 (no size threshold) and 1.5x on 400 leaves of 256 values.
      With several devices (``--xla_force_host_platform_device_count``, several processes) leaves may be sharded, and
      XLA would gather a custom call's operands where it partitions its own products (local products, then an
      all-reduce): there XLA's path below runs;
    * otherwise XLA's product, which on CPU (its GEMM library packs the ``[n, K]`` operand) takes 8-25x the time of
      reading a leaf of 20-640 MB. So there a leaf of 6 MiB or more is reduced chunk by chunk in a loop, each
      chunk's ``[K, chunk]`` product in cache and the float32 partial sums added in order (2-7x faster at n = 1e6-1e7);
      smaller leaves, whose products XLA also runs side by side, keep one product each (up to 2.7x faster than the
      loop at K = 5, n = 16k-40k). Other platforms keep the one product;
    * for XLA, leaves of fewer than 512 values per row are concatenated (per dtype) into one operand first: below that
      the overhead of one product per leaf costs more than copying the small leaves (2x at 400 leaves of 256 values).

    Args:
      grads: one ``[K, D]`` array or a pytree whose leaves all carry a leading axis K.
      chunk: values per row of one chunk of XLA's CPU loop; by default ``3072 K`` rounded down to a power of two,
        clipped to [4096, 65536] (8192 at K = 5, 32768 at K = 16: the fastest measured there). Given, every leaf takes
        the XLA path (no native kernel) and the loop also runs over leaves under 6 MiB (any leaf of two chunks or more).
    """
    leaves = jax.tree.leaves(grads)
    if not leaves:
        raise ValueError("gram_matrix: the gradient pytree has no leaves")
    k = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.ndim == 0 or leaf.shape[0] != k:
            raise ValueError(f"gram_matrix: every leaf needs a leading axis of size {k}, got a leaf of shape {leaf.shape}")
    native = chunk is None and _native_cpu(k)
    min_bytes = 6 * 2**20 if chunk is None else 0
    if chunk is None:
        chunk = min(max(1 << ((3072 * max(k, 1)).bit_length() - 1), 4096), 65536)
    if chunk < 1:
        raise ValueError(f"gram_matrix: chunk must be >= 1, got {chunk}")

    def product(flat):
        return jnp.matmul(flat, flat.T, preferred_element_type=jnp.float32)

    def chunked(flat):
        n = flat.shape[1]
        m = n // chunk

        def body(i, acc):
            return acc + product(jax.lax.dynamic_slice_in_dim(flat, i * chunk, chunk, axis=1))

        acc = jax.lax.fori_loop(0, m, body, jnp.zeros((k, k), jnp.float32))
        return acc if n == m * chunk else acc + product(flat[:, m * chunk :])

    def leaf_gram(flat):
        if flat.shape[1] < 2 * chunk or flat.size * flat.dtype.itemsize < min_bytes:
            return product(flat)
        return jax.lax.platform_dependent(flat, cpu=chunked, default=product)

    def xla_gram(*flats):
        total = jnp.zeros((k, k), jnp.float32)
        tiny: dict[Any, list[Array]] = {}
        for flat in flats:
            if flat.shape[1] < 512:
                tiny.setdefault(flat.dtype, []).append(flat)
            else:
                total = total + leaf_gram(flat)
        for group in tiny.values():
            total = total + leaf_gram(group[0] if len(group) == 1 else jnp.concatenate(group, axis=1))
        return total

    flats = [_flat_leaf(leaf) for leaf in leaves]
    to_kernel = [flat for flat in flats if native and flat.dtype == jnp.float32]
    rest = [flat for flat in flats if not (native and flat.dtype == jnp.float32)]
    if not to_kernel:
        return xla_gram(*rest)
    total = jax.lax.platform_dependent(*to_kernel, cpu=cpu_kernels.gram_f32, default=xla_gram)
    return total + xla_gram(*rest) if rest else total


def combine(grads: PyTree, coefficients: Array) -> PyTree:
    """``sum_k c_k g_k`` leaf by leaf: ``grads`` leaves ``[K, ...]``, ``coefficients [K]``.

    On CPU (one device, K <= 128) the float32 leaves go, all in one call, to the native kernel of
    :mod:`marble_jax.cpu_kernels`: one pass, fresh results on huge pages (XLA's fused sum faults its fresh result in
    4 KiB pages, which at 40 MB cost more than the pass: 15 ms against 9 ms at K = 5, D = 1e7). Inside a jitted
    step with an optimiser after it, where XLA fuses its sum into the optimiser's pass, measured as fast at K = 5
    and 1.6x faster at K = 16 (D = 1e6).

    Elsewhere, up to K = 16, an explicit sum ``c_0 g_0 + c_1 g_1 + ...``: one elementwise pass over the stack, fused
    with the casts and with an elementwise consumer. On CPU ``tensordot`` (a matrix-vector product) is as fast at
    K = 16, slower at K = 5 (1.5x when a ``where`` follows, 2.8x on bfloat16 leaves) and faster from K = 32 on,
    where it is kept.
    """

    def one(leaf):
        dtype = jnp.promote_types(leaf.dtype, jnp.float32)
        c = coefficients.astype(dtype)
        if not 0 < leaf.shape[0] <= 16:
            return jnp.tensordot(c, leaf, axes=1).astype(leaf.dtype)
        out = c[0] * leaf[0].astype(dtype)
        for i in range(1, leaf.shape[0]):
            out = out + c[i] * leaf[i].astype(dtype)
        return out.astype(leaf.dtype)

    leaves, treedef = jax.tree.flatten(grads)
    k = coefficients.shape[0]
    native = [i for i, leaf in enumerate(leaves) if leaf.dtype == jnp.float32] if _native_cpu(k) else []
    to_kernel = set(native)
    out = [None if i in to_kernel else one(leaf) for i, leaf in enumerate(leaves)]
    if native:

        def xla(c, *flats):
            del c  # the same coefficients, as ``one`` takes them
            return tuple(one(flat) for flat in flats)

        flats = [_flat_leaf(leaves[i]) for i in native]
        results = jax.lax.platform_dependent(coefficients.astype(jnp.float32), *flats, cpu=cpu_kernels.combine_f32, default=xla)
        for i, y in zip(native, results, strict=True):
            out[i] = y.reshape(leaves[i].shape[1:])
    return jax.tree.unflatten(treedef, out)


class MGDAState(NamedTuple):
    """State of the MARBLE harmonisation (and of :func:`mgda_weights`).

    Attributes:
      ema_weights: ``[K]`` EMA of the min-norm weights (``lambda_bar``).
      norms: ``[K]`` gradient norms at the last solve.
      coefficients: ``[K]`` coefficients ``c_k`` applied at the last solve; between solves
        ``sum_k c_k g_k = C grad L(sum_k c_k r_k / C)`` (amortised MARBLE).
      gap: duality gap of the last solve.
      iterations: Frank-Wolfe iterations of the last solve.
      count: number of solves so far.
      nonfinite_count: number of updates skipped because a gradient was not finite.
    """

    ema_weights: Array
    norms: Array
    coefficients: Array
    gap: Array
    iterations: Array
    count: Array
    nonfinite_count: Array


def init_state(num_objectives: int) -> MGDAState:
    """A fresh :class:`MGDAState` for K objectives (uniform weights, unit coefficients / K)."""
    k = num_objectives
    if k < 1:
        raise ValueError(f"num_objectives must be >= 1, got {k}")
    uniform = jnp.full((k,), 1.0 / k, jnp.float32)
    zero_i = jnp.zeros((), jnp.int32)
    return MGDAState(uniform, jnp.zeros((k,), jnp.float32), uniform, jnp.zeros((), jnp.float32), zero_i, zero_i, zero_i)


class Harmonized(NamedTuple):
    """Output of :func:`harmonize`: the coefficients, the new state and the solve's facts."""

    coefficients: Array  # [K]
    state: MGDAState
    weights: Array  # [K] min-norm weights of this solve (before the EMA)
    finite: Array  # bool: the Gram matrix was finite (else coefficients are 0, state kept)


def _coefficients(weights: Array, norms: Array, active: Array, *, normalize: bool, rescale: bool) -> Array:
    """``c [K]`` from simplex weights ``[K]`` (renormalised over ``active``) and gradient norms ``[K]``.

    The update ``d = sum_k c_k g_k`` is homogeneous in the gradients' common scale: of degree 1 with ``rescale``
    (either ``normalize``) and with neither flag, of degree 0 with ``normalize`` alone (the unit-gradient direction
    ``sum_k lam_k g_k / n_k``, whatever the scale). ``rescale`` makes the contributions' norms sum to the mean
    gradient norm ``s``: ``sum_k ||c_k g_k|| = s``. With ``normalize`` that is ``c_k = lam_k s / n_k``; without it,
    ``c_k = lam_k s / sum_j lam_j n_j`` (scaling raw gradients by ``s`` would make the update grow with the square of
    the gradients' scale).
    """
    applied = jnp.where(active, weights, 0)
    applied = applied / jnp.where(applied.sum() > 0, applied.sum(), 1)
    inv = jnp.where(active, 1 / jnp.where(active, norms, 1), 0)
    mean_norm = jnp.sum(jnp.where(active, norms, 0)) / jnp.maximum(active.sum(), 1)
    if normalize:
        return applied * inv * (mean_norm if rescale else 1.0)
    if not rescale:
        return applied
    spread = jnp.sum(applied * norms)
    return applied * mean_norm / jnp.where(spread > 0, spread, 1)


def _ema_update(ema: Array, weights: Array, active: Array, first: Array, ema_decay: float) -> Array:
    """The EMA of the min-norm weights over the rewards live in this solve; absent rewards hold theirs.

    A solve over the live set ``A`` says nothing of the others' weights, so only ``A``'s entries move, inside the
    mass ``m_A = sum_{k in A} ema_k`` they hold: ``ema_A <- rho ema_A + (1 - rho) m_A lam_A``. The vector stays on the
    simplex, and renormalised over ``A`` (as applied) it is exactly the EMA of the solves' weights over ``A``:
    ``ema_A / m_A <- rho ema_A / m_A + (1 - rho) lam_A``. The first solve (``rho = 0``) starts from the uniform
    weights of :func:`init_state`, so a reward absent from it keeps ``1 / K`` until its first solve.
    """
    rho = jnp.where(first, 0.0, ema_decay)
    mass = jnp.sum(jnp.where(active, ema, 0))
    # A live set holding no mass (every live weight decayed to exactly 0) restarts at its uniform share.
    mass = jnp.where(mass > 0, mass, jnp.sum(active) / ema.shape[0])
    new = jnp.where(active, rho * ema + (1 - rho) * mass * weights, ema)
    return new / jnp.where(new.sum() > 0, new.sum(), 1)


def harmonize(
    gram: Array,
    state: MGDAState,
    *,
    ema_decay: float = 0.7,
    normalize: bool = True,
    rescale: bool = True,
    max_iters: int = 1000,
    tol: float = 1e-5,
    mask: Array | None = None,
) -> Harmonized:
    """MARBLE's recipe on a Gram matrix ``[K, K]`` of the raw per-objective gradients.

    1. norms ``n_k = sqrt(G_kk)``; objectives with ``n_k = 0``, or ``False`` in ``mask [K]``, are left out (weight 0,
       coefficient 0). The mask is for rewards that apply to no sample of the batch (all ``r = 1/2``): their
       gradient is the neutral policy gradient ``h = (s / 2B) sum_b grad (P_b + N_b)``, the same for every such
       reward, which is zero only at ``theta = theta_old``; it carries no reward signal, and normalising it would
       turn it into a unit direction with the weight of a real reward;
    2. ``normalize``: solve on the Gram matrix of ``u_k = g_k / n_k``;
    3. ``lam = min_norm(...)`` over the live objectives;
    4. EMA of ``lam`` over the live objectives (:func:`_ema_update`: the first solve sets it, absent objectives
       hold their EMA weight, neither decayed nor reset); the applied weights are the EMA renormalised over the
       live objectives;
    5. coefficients (:func:`_coefficients`): with ``rescale`` the contributions' norms sum to the mean live
       gradient norm ``s`` (``c_k = lam_bar_k s / n_k`` with ``normalize``); without ``rescale``, ``lam_bar_k / n_k``
       (the unit-gradient direction, scale-free) or ``lam_bar_k`` (the raw convex combination).

    A non-finite Gram matrix (NaN / inf in a gradient) gives zero coefficients, ``finite = False`` and the input
    state with ``nonfinite_count + 1``; nothing else of it changes. Exactly opposite gradients give
    ``lam = (1/2, 1/2)`` and a zero combined direction (a Pareto-stationary point); identical gradients give uniform
    weights.
    """
    gram = gram.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(gram))
    safe = jnp.where(finite, gram, 0)
    sq = jnp.maximum(jnp.diagonal(safe), 0)
    active = sq > 0 if mask is None else (sq > 0) & jnp.asarray(mask, bool)
    norms = jnp.where(active, jnp.sqrt(sq), 0)
    inv = jnp.where(active, 1 / jnp.where(active, norms, 1), 0)
    solve_gram = safe * inv[:, None] * inv[None, :] if normalize else safe
    info = min_norm_with_info(solve_gram, active, max_iters=max_iters, tol=tol)
    ema = _ema_update(state.ema_weights, info.weights, active, state.count == 0, ema_decay)
    coeff = _coefficients(ema, norms, active, normalize=normalize, rescale=rescale)

    new_state = MGDAState(
        ema_weights=ema,
        norms=norms,
        coefficients=coeff,
        gap=info.gap,
        iterations=info.iterations,
        count=state.count + 1,
        nonfinite_count=state.nonfinite_count,
    )
    kept = state._replace(nonfinite_count=state.nonfinite_count + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    coeff = jnp.where(finite, coeff, 0)
    return Harmonized(coeff, new_state, info.weights, finite)


def direction_cosines(gram: Array, coefficients: Array) -> Array:
    """``[K]`` cosines between ``d = sum_j c_j g_j`` and each ``g_k``, from the Gram matrix.

    ``cos_k = (G c)_k / (||d|| ||g_k||)``; 0 where either norm is 0.
    """
    gc = gram @ coefficients
    d_norm = jnp.sqrt(jnp.maximum(coefficients @ gc, 0))
    g_norm = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0))
    denom = d_norm * g_norm
    return jnp.where(denom > 0, gc / jnp.where(denom > 0, denom, 1), 0)


@dataclasses.dataclass(frozen=True)
class MGDAConfig:
    """The recipe of :func:`harmonize`: ``ema_decay`` (rho, 0 disables the EMA), ``normalize``, ``rescale``, and
    ``max_iters`` / ``tol`` of :func:`min_norm_with_info`."""

    ema_decay: float = 0.7
    normalize: bool = True
    rescale: bool = True
    max_iters: int = 1000
    tol: float = 1e-5

    def __post_init__(self):
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"MGDAConfig.ema_decay must be in [0, 1), got {self.ema_decay}")

    def harmonize(self, gram: Array, state: MGDAState, mask: Array | None = None) -> Harmonized:
        """:func:`harmonize` with this recipe."""
        return harmonize(
            gram,
            state,
            ema_decay=self.ema_decay,
            normalize=self.normalize,
            rescale=self.rescale,
            max_iters=self.max_iters,
            tol=self.tol,
            mask=mask,
        )


def _leaf_shapes(tree: PyTree) -> list[tuple[str, tuple[int, ...]]]:
    return [(jax.tree_util.keystr(path), tuple(leaf.shape)) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def mgda_aggregate(
    jacobian: PyTree,
    state: MGDAState,
    mask: Array | None = None,
    *,
    reward_matrix: Array | None = None,
    config: MGDAConfig = MGDAConfig(),
) -> tuple[PyTree, MGDAState]:
    """One MGDA aggregation, a pure function: ``(sum_k c_k g_k, new state)``.

    Args:
      jacobian: a pytree whose leaves all carry a leading axis K, one gradient per objective (or N rows with
        ``reward_matrix``).
      state: the :class:`MGDAState` (:func:`init_state`).
      mask: optional ``[K]`` booleans, the objectives that apply to this batch (see :func:`harmonize`).
      reward_matrix: ``R [K, N]`` (per-sample use): ``jacobian`` holds N rows ``J`` with objective k's gradient
        ``g_k = sum_n R[k, n] J_n``; the Gram matrix is that of ``R J``, formed leaf by leaf and dropped (``R (J J^T)
        R^T`` would subtract float32 terms larger than its entries when the rows share a large common part), and the
        update ``(c^T R) J`` (:func:`marble_jax.balance.sample_rows` builds ``J`` and ``R`` of the NFT loss).
      config: the recipe.

    Returns:
      The update (a pytree like one row of ``jacobian``) and the new state. A non-finite Jacobian (found from its
      Gram matrix, no other pass over it) gives a zero update and the old state with ``nonfinite_count + 1``.
    """
    k = state.ema_weights.shape[0]
    leaves = jax.tree.leaves(jacobian)
    if not leaves:
        raise ValueError("mgda_aggregate: the Jacobian pytree has no leaves")
    if reward_matrix is not None and (reward_matrix.ndim != 2 or reward_matrix.shape[0] != k):
        raise ValueError(f"mgda_aggregate: reward_matrix must be [{k}, N], got shape {reward_matrix.shape}")
    rows = k if reward_matrix is None else reward_matrix.shape[1]
    if any(leaf.ndim == 0 or leaf.shape[0] != rows for leaf in leaves):
        what = f"K = {k} (one gradient per objective)" if reward_matrix is None else f"N = {rows} (reward_matrix's columns)"
        raise ValueError(f"mgda_aggregate: every Jacobian leaf needs a leading axis of size {what}; got {_leaf_shapes(jacobian)}")
    if mask is not None and jnp.shape(mask) != (k,):
        raise ValueError(f"mgda_aggregate: mask must have shape ({k},), got {jnp.shape(mask)}")
    if reward_matrix is None:
        gram = gram_matrix(jacobian)
    else:
        rm = reward_matrix.astype(jnp.float32)
        gram = gram_matrix(jax.tree.map(lambda leaf: jnp.tensordot(rm, leaf.astype(jnp.float32), axes=1), jacobian))
    out = config.harmonize(gram, state, mask)
    row_coefficients = out.coefficients if reward_matrix is None else out.coefficients @ reward_matrix.astype(jnp.float32)
    zeros = lambda: jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), jacobian)  # noqa: E731
    update = jax.lax.cond(out.finite, lambda: combine(jacobian, row_coefficients), zeros)
    return update, out.state


def _find_state(opt_state: Any) -> MGDAState:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MGDAState)) if isinstance(x, MGDAState)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one MGDAState (of mgda_weights) in the optimizer state, found {len(found)}")
    return found[0]


def coefficients(opt_state: Any, mask: Array | None = None) -> Array:
    """``c [K]`` for an amortised step (no solve) on a batch whose live rewards are ``mask [K]``.

    ``opt_state``: an :class:`MGDAState`, or any optimizer state holding exactly one (e.g. a chain's). The last
    solve's coefficients, restricted to the rewards live both then (``norms > 0``) and now: a reward that applies to
    no sample of this batch gets 0 (its gradient is the reward-free neutral one, see :func:`harmonize`), and the
    others are scaled by one common factor, so that the update keeps the magnitude the solve gave it
    (``sum_k c_k n_k``) and the live rewards their relative weights. A reward live now but not at the last solve has
    no cached norm and gets 0: ask :func:`needs_solve` first and solve instead (the trainer does).
    """
    state = _find_state(opt_state)
    c = state.coefficients
    if mask is None:
        return c
    keep = jnp.asarray(mask, bool) & (state.norms > 0)
    total = jnp.sum(c * state.norms)
    kept = jnp.sum(jnp.where(keep, c * state.norms, 0))
    return jnp.where(keep, c * total / jnp.where(kept > 0, kept, 1), 0)


def needs_solve(opt_state: Any, mask: Array) -> Array:
    """Whether an amortised step on live rewards ``mask [K]`` must solve: there was no solve yet, or some live reward
    has no cached coefficient (it was not live at the last solve). ``opt_state`` as in :func:`coefficients`."""
    state = _find_state(opt_state)
    return jnp.any(jnp.asarray(mask, bool) & ~(state.norms > 0)) | (state.count == 0)


def _transform_name(fn: Callable) -> str:
    """The name of the optax transform an ``update`` function belongs to (``clip_by_global_norm``, ...)."""
    for cell in getattr(fn, "__closure__", None) or ():  # optax's with_extra_args_support wraps plain transforms
        inner = cell.cell_contents
        if hasattr(inner, "update") and callable(inner.update):
            return _transform_name(inner.update)
    qualname = getattr(fn, "__qualname__", repr(fn))
    return qualname.split(".<locals>")[0]


def _check_placement(name: str) -> None:
    """Raises when ``mgda_weights`` runs where its K-stacked input has met, or will meet, a transform that expects
    params-shaped updates: after another transform of an ``optax.chain``, or inside ``optax.MultiSteps`` /
    ``optax.apply_if_finite`` (both keep params-shaped buffers). Read off the Python frames at trace time."""
    frame = sys._getframe(2)
    while frame is not None:
        qualname = frame.f_code.co_qualname
        module = frame.f_globals.get("__name__", "")
        if module.startswith("optax"):
            if qualname.startswith("MultiSteps."):
                raise ValueError(
                    f"{name} cannot run inside optax.MultiSteps: MultiSteps accumulates params-shaped updates, and the "
                    "MGDA solve needs the accumulated K-stacked Jacobian. Sum the Jacobian over your micro-batches "
                    f"and call {name} once (marble_jax.balance.accumulated_direction does this), or put MultiSteps "
                    f"after {name} in the chain to accumulate the combined updates"
                )
            if qualname.startswith("apply_if_finite."):
                raise ValueError(
                    f"{name} cannot run inside optax.apply_if_finite, whose zero update has the input's K-stacked "
                    f"shape; wrap the chain in marble_jax.mgda.skip_nonfinite instead"
                )
            if qualname.startswith("chain.") and frame.f_locals.get("new_state"):
                ran = frame.f_locals.get("update_fns", ())[: len(frame.f_locals["new_state"])]
                names = ", ".join(_transform_name(fn) for fn in ran)
                raise ValueError(
                    f"{name} must come first in its optax.chain: the K-stacked Jacobian already went through "
                    f"{names}, which expect(s) params-shaped updates (a global-norm clip would clip the whole stack, "
                    "weight decay would broadcast over it)"
                )
        frame = frame.f_back


def _check_shapes(name: str, updates: PyTree, params: PyTree, rows: int, combined: bool) -> None:
    """Leaf by leaf: ``[rows, *param.shape]`` for a Jacobian, ``param.shape`` for ``combined`` updates."""
    u_leaves, u_def = jax.tree_util.tree_flatten_with_path(updates)
    p_leaves, p_def = jax.tree.flatten(params)
    if u_def.num_leaves != p_def.num_leaves:
        raise ValueError(f"{name}: the updates have {u_def.num_leaves} leaves, params {p_def.num_leaves}")
    for (path, u), p in zip(u_leaves, p_leaves, strict=True):
        where, us, ps = jax.tree_util.keystr(path), tuple(u.shape), tuple(jnp.shape(p))
        if combined and us != ps:
            stacked = us == (rows, *ps)
            raise ValueError(
                f"{name}: combined=True passes the update through to the transforms after it, which expect "
                f"params-shaped updates, but leaf {where} has shape {us} against the parameter's {ps}"
                + (" (a K-stacked Jacobian: drop combined=True to solve)" if stacked else "")
            )
        if not combined and us != (rows, *ps):
            hint = (
                " (params-shaped: on an amortised step pass combined=True; otherwise a transform before it reduced "
                "the K-stacked Jacobian)"
                if us == ps
                else ""
            )
            raise ValueError(f"{name}: leaf {where} has shape {us}, expected {(rows, *ps)}{hint}")


def mgda_weights(
    num_objectives: int,
    ema_decay: float = 0.7,
    normalize: bool = True,
    rescale: bool = True,
    *,
    max_iters: int = 1000,
    tol: float = 1e-5,
) -> optax.GradientTransformationExtraArgs:
    """MGDA as an optax transform: a K-stacked Jacobian in, one params-shaped update out (:func:`mgda_aggregate`).

    ``update(updates, state, params=None, *, mask=None, combined=False, reward_matrix=None)``:

    * ``updates``: a pytree whose leaves carry a leading axis K (one gradient per objective); the output is
      ``sum_k c_k g_k`` with params' structure, ``c_k`` from :func:`harmonize` (normalise, min-norm, EMA of the
      weights, rescale to the mean norm). It must come first in its chain (every transform after it sees
      params-shaped updates); elsewhere, and inside ``optax.MultiSteps`` or ``optax.apply_if_finite``, it raises.
    * ``mask [K]``: the objectives that apply to this batch; the others get coefficient 0 and hold their EMA weight.
    * ``combined=True`` (amortised use): ``updates`` is already one params-shaped gradient, e.g. that of
      ``sum_k c_k f_k`` with ``c = coefficients(opt_state, mask)``; it passes through, the state unchanged. Ask
      ``needs_solve(opt_state, mask)`` first: a live objective without a cached coefficient needs a solve.
    * ``reward_matrix=R [K, N]`` (per-sample use): ``updates`` holds N rows, see :func:`mgda_aggregate`.

    With ``params`` given, every leaf's shape is checked against its parameter's (``[K, *shape]``, or ``shape``
    with ``combined``), and a mismatch names the leaf. A non-finite Jacobian gives a zero update and leaves the state
    as it was (but for ``nonfinite_count``); wrap the whole chain in :func:`skip_nonfinite` so that the transforms
    after it do not step on that zero.

    Args:
      num_objectives: K, the leading axis of ``updates``.
      ema_decay, normalize, rescale, max_iters, tol: :class:`MGDAConfig`.
    """
    k = num_objectives
    init_state(k)  # validates k
    config = MGDAConfig(ema_decay, normalize, rescale, max_iters, tol)
    name = f"mgda_weights({k})"

    def init_fn(params):
        del params
        return init_state(k)

    def update_fn(updates, state, params=None, *, mask=None, combined: bool = False, reward_matrix=None, **extra_args):
        del extra_args
        _check_placement(name)
        rows = k if reward_matrix is None else reward_matrix.shape[-1]
        if params is not None:
            _check_shapes(name, updates, params, rows, combined)
        if combined:
            return updates, state
        return mgda_aggregate(updates, state, mask, reward_matrix=reward_matrix, config=config)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`: the inner state and how many steps were skipped."""

    inner_state: Any
    skipped: Array


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` only when every input leaf is finite; otherwise a zero update.

    Unlike ``optax.apply_if_finite`` the zero update has the shape of ``inner``'s output (which
    for ``mgda_weights`` has no leading K axis) and ``inner``'s state is left exactly as it
    was, so a skipped step changes neither parameters nor optimizer moments.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonfiniteState(inner.init(params), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(updates)]))
        out_shape = jax.eval_shape(lambda u, s: inner.update(u, s, params, **extra_args)[0], updates, state.inner_state)

        def run(_):
            return inner.update(updates, state.inner_state, params, **extra_args)

        def skip(_):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape), state.inner_state

        new_updates, new_inner = jax.lax.cond(finite, run, skip, None)
        return new_updates, SkipNonfiniteState(new_inner, state.skipped + (~finite).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
