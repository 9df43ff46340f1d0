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
  gradients (leading axis K); no leaf is flattened into one model-sized vector.
* :func:`harmonize` — MARBLE's normalise / min-norm / EMA / rescale recipe (REFERENCE §3 steps
  2-5) on a Gram matrix, giving the coefficients ``c_k`` of the combined update.
* :func:`mgda_weights` — the above as an ``optax.GradientTransformation`` whose ``update`` maps
  stacked per-objective gradients to one update.
* :func:`skip_nonfinite` — wraps a whole optimizer so that a step with a non-finite update
  leaves parameters and optimizer state untouched (``optax.apply_if_finite`` cannot wrap a
  transform whose output shape differs from its input, as ``mgda_weights``' does).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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


def _flat_leaf(leaf: Array) -> Array:
    return leaf.reshape(leaf.shape[0], -1)


def gram_matrix(grads: PyTree) -> Array:
    """``G [K, K]`` with ``G[k, j] = <g_k, g_j>``, accumulated in float32 leaf by leaf.

    Args:
      grads: one ``[K, D]`` array or a pytree whose leaves all carry a leading axis K.
    """
    leaves = jax.tree.leaves(grads)
    if not leaves:
        raise ValueError("gram_matrix: the gradient pytree has no leaves")
    k = leaves[0].shape[0]
    total = jnp.zeros((k, k), jnp.float32)
    for leaf in leaves:
        if leaf.ndim == 0 or leaf.shape[0] != k:
            raise ValueError(f"gram_matrix: every leaf needs a leading axis of size {k}, got a leaf of shape {leaf.shape}")
        flat = _flat_leaf(leaf)
        total = total + jnp.matmul(flat, flat.T, preferred_element_type=jnp.float32)
    return total


def combine(grads: PyTree, coefficients: Array) -> PyTree:
    """``sum_k c_k g_k`` leaf by leaf: ``grads`` leaves ``[K, ...]``, ``coefficients [K]``."""

    def one(leaf):
        c = coefficients.astype(jnp.promote_types(leaf.dtype, jnp.float32))
        return jnp.tensordot(c, leaf, axes=1).astype(leaf.dtype)

    return jax.tree.map(one, grads)


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

    1. norms ``n_k = sqrt(G_kk)``; objectives with ``n_k = 0``, or ``False`` in ``mask [K]`` (e.g. a
       reward that applies to no sample of the batch: its gradient is rounding noise, which
       normalisation would blow up to a unit direction), are left out (weight 0, coefficient 0);
    2. ``normalize``: solve on the Gram matrix of ``u_k = g_k / n_k``;
    3. ``lam = min_norm(...)``;
    4. EMA ``lam_bar <- ema_decay * lam_bar + (1 - ema_decay) * lam`` (the first solve sets
       it); the applied weights are ``lam_bar`` renormalised over the non-zero objectives;
    5. ``rescale``: coefficients ``c_k = lam_bar_k * s / n_k`` with ``s = mean_k n_k`` over the
       non-zero objectives (without ``rescale``: ``lam_bar_k / n_k``, a unit-norm mix);
       without ``normalize``, ``c_k = lam_bar_k`` (times ``s`` when rescaling).

    A non-finite Gram matrix (NaN / inf in a gradient) gives zero coefficients, ``finite =
    False`` and the input state with ``nonfinite_count + 1``; nothing else of it changes.
    Exactly opposite gradients give ``lam = (1/2, 1/2)`` and a zero combined direction (a
    Pareto-stationary point); identical gradients give uniform weights.
    """
    gram = gram.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(gram))
    safe = jnp.where(finite, gram, 0)
    sq = jnp.maximum(jnp.diagonal(safe), 0)
    active = sq > 0 if mask is None else (sq > 0) & mask
    norms = jnp.where(active, jnp.sqrt(sq), 0)
    inv = jnp.where(active, 1 / jnp.where(active, norms, 1), 0)
    solve_gram = safe * inv[:, None] * inv[None, :] if normalize else safe
    info = min_norm_with_info(solve_gram, active, max_iters=max_iters, tol=tol)

    first = state.count == 0
    ema = jnp.where(first, info.weights, ema_decay * state.ema_weights + (1 - ema_decay) * info.weights)
    applied = jnp.where(active, ema, 0)
    applied = applied / jnp.where(applied.sum() > 0, applied.sum(), 1)
    mean_norm = jnp.sum(norms) / jnp.maximum(active.sum(), 1)
    coeff = applied * (inv if normalize else 1.0) * (mean_norm if rescale else 1.0)

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


def mgda_weights(
    num_objectives: int,
    ema_decay: float = 0.7,
    normalize: bool = True,
    rescale: bool = True,
    *,
    max_iters: int = 1000,
    tol: float = 1e-5,
) -> optax.GradientTransformationExtraArgs:
    """MGDA as an optax transform: stacked per-objective gradients in, one update out.

    ``update(updates, state, params=None, *, combined=False)``:

    * ``updates`` is a pytree whose leaves carry a leading axis K (one gradient per objective);
      the output is ``sum_k c_k g_k`` with params' structure, ``c_k`` from :func:`harmonize`
      (normalise, min-norm, EMA of the weights, rescale to the mean norm).
    * ``combined=True`` (amortised use): ``updates`` is already one combined gradient (e.g.
      ``C grad L(sum_k c_k r_k / C)`` with ``c = state.coefficients``); it passes through and
      the state is unchanged.
    * ``reward_matrix=R [K, N]`` (per-sample use): ``updates`` are N rows ``J`` (leading axis N, e.g.
      per-sample gradients of a loss that is a per-sample sum) with objective k's gradient
      ``g_k = sum_n R[k, n] J_n``. The Gram matrix is that of ``R J`` (formed leaf by leaf and dropped:
      ``R (J J^T) R^T`` in exact arithmetic) and the output ``(c^T R) J``: the same as passing the stacked ``R J``
      (:func:`marble_jax.balance.sample_rows` builds ``J`` and ``R`` of the NFT loss).

    The state is an :class:`MGDAState`; inside a chain read it with
    ``optax.tree_utils.tree_get(opt_state, "coefficients")``.

    A non-finite gradient gives a zero update and leaves the state as it was (but for
    ``nonfinite_count``). Stateful transforms after it in a chain would still step on that
    zero: wrap the whole chain in :func:`skip_nonfinite` to leave weights and moments untouched.

    Args:
      num_objectives: K, the leading axis of ``updates``.
      ema_decay: rho of the EMA over the min-norm weights (0 disables the EMA).
      normalize: solve on unit-normalised gradients.
      rescale: scale the combined update to the mean gradient norm.
      max_iters, tol: of :func:`min_norm_with_info`.
    """
    k = num_objectives
    init_state(k)  # validates k

    def init_fn(params):
        del params
        return init_state(k)

    def update_fn(updates, state, params=None, *, combined: bool = False, reward_matrix: Array | None = None, **extra_args):
        del params, extra_args
        if combined:
            return updates, state
        leaves = jax.tree.leaves(updates)
        rows = k if reward_matrix is None else reward_matrix.shape[-1]
        if reward_matrix is not None and (reward_matrix.ndim != 2 or reward_matrix.shape[0] != k):
            raise ValueError(f"mgda_weights({k}): reward_matrix must be [{k}, N], got shape {reward_matrix.shape}")
        if any(leaf.ndim == 0 or leaf.shape[0] != rows for leaf in leaves):
            shapes = sorted({tuple(leaf.shape) for leaf in leaves})
            what = f"{k} (one gradient per objective)" if reward_matrix is None else f"N = {rows} (reward_matrix's columns)"
            raise ValueError(f"mgda_weights({k}): every update leaf needs a leading axis of size {what}; got shapes {shapes}")
        if reward_matrix is None:
            gram = gram_matrix(updates)
        else:  # the Gram of g = R J, contracted leaf by leaf: R (J J^T) R^T would subtract float32 terms larger
            # than its entries when the rows share a large common part
            rm = reward_matrix.astype(jnp.float32)
            gram = gram_matrix(jax.tree.map(lambda leaf: jnp.tensordot(rm, leaf.astype(jnp.float32), axes=1), updates))
        out = harmonize(gram, state, ema_decay=ema_decay, normalize=normalize, rescale=rescale, max_iters=max_iters, tol=tol)
        row_coefficients = out.coefficients if reward_matrix is None else out.coefficients @ reward_matrix.astype(jnp.float32)
        combined_update = jax.tree.map(lambda leaf: jnp.where(out.finite, leaf, 0), combine(updates, row_coefficients))
        return combined_update, out.state

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
