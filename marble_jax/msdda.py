"""MSDDA: closed-form denoising-time fusion of M aligned models for any preference weights (REFERENCE §5).

Each aligned model i gives at every sampler step a Gaussian reverse step ``N(mu_i, sigma_i^2 I)``: here the
Flow-GRPO SDE step (:func:`marble_jax.sampling.sde_step_gaussian`) of its own velocity with its own noise level
``eta_i``. For preference weights ``w`` on the simplex the optimal step of the step-level RL objective (the paper's
Theorem 1) is the normalised product ``prod_i p_i^{w_i}``, again Gaussian:
``1 / sigma_w^2 = sum_i w_i / sigma_i^2`` and ``mu_w = sigma_w^2 sum_i (w_i / sigma_i^2) mu_i``
(Algorithm 1: ``x' = mu_w + sigma_w z``). No retraining and no reward is needed, and a step costs M network calls,
which :func:`fused_sample` runs as one call over the stacked parameters (``jax.vmap``).

Deterministic steps (``sigma_i = 0``, e.g. ``eta_i = 0``) are a special case of :func:`fuse_gaussians`.

Reward Soup (:func:`reward_soup`, the baseline): one model whose parameters are ``sum_i w_i theta_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from marble_jax.sampling import Rollout, sde_step_gaussian

Array = jax.Array
PyTree = Any
VelocityFn = Callable[[PyTree, Array, Array], Array]  # (params, x [B, H, W, C], t [B]) -> v


def check_weights(w: Any, m: int, atol: float = 1e-5) -> None:
    """Raises ValueError unless ``w`` is a length-``m`` vector of finite, non-negative weights summing to 1 (``atol``).
    A traced ``w`` (inside ``jax.jit``) cannot be checked and passes: validate before jitting."""
    if isinstance(w, jax.core.Tracer):
        return
    a = np.asarray(w, np.float64)
    if a.ndim != 1 or a.shape[0] != m:
        raise ValueError(f"preference weights w must have shape [{m}] (one per model), got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"preference weights w must be finite and non-negative, got {a.tolist()}")
    if abs(a.sum() - 1) > atol:
        raise ValueError(f"preference weights w must sum to 1 (the simplex), got sum {a.sum():.6g} for {a.tolist()}")


def fuse_gaussians(means: Array, variances: Array, w: Array) -> tuple[Array, Array]:
    """The normalised product ``prod_i N(mu_i, var_i)^{w_i}`` per element: ``(mean, variance)``.

    ``1 / var = sum_i w_i / var_i`` and ``mean = var sum_i (w_i / var_i) mu_i``; equal variances give the w-weighted
    mean of the means (the DB-MPA case) with that variance.

    Zero variances (deterministic components, e.g. ``eta_i = 0``) are not divided by: such a component has infinite
    precision, so if any component with ``w_i > 0`` has variance 0 (per element) the fused step is deterministic
    (variance 0) and its mean is the w-weighted mean of the zero-variance components' means. This is the limit of
    equal vanishing variances ``var_i = eps -> 0``: their precisions ``w_i / eps`` dominate the others while keeping
    their ratios ``w_i / w_j``. With every ``eta_i = 0`` it is the w-weighted mean of the models' Euler steps.
    Components with ``w_i = 0`` never count, whatever their variance.

    Args:
      means: ``[M, ...]``.
      variances: ``[M]`` (one per component, e.g. the SDE step's scalar) or ``[M, ...]`` broadcastable to ``means``.
      w: ``[M]`` on the simplex, checked by :func:`check_weights` when concrete (a traced ``w`` inside ``jax.jit``
        is not checked).

    Returns ``mean`` like ``means[0]`` and ``variance`` broadcast to it.
    """
    m = means.shape[0]
    check_weights(w, m)
    if variances.shape == (m,):
        variances = variances.reshape((m,) + (1,) * (means.ndim - 1))
    shape = variances.shape
    if len(shape) != means.ndim or shape[0] != m or any(s not in (1, d) for s, d in zip(shape, means.shape, strict=True)):
        raise ValueError(f"variances must have shape [{m}] or [{m}, ...] broadcastable to means {means.shape}, got {shape}")
    var = jnp.broadcast_to(variances, means.shape).astype(means.dtype)
    wb = jnp.asarray(w, means.dtype).reshape((m,) + (1,) * (means.ndim - 1))
    live = wb > 0
    point = live & (var == 0)  # infinite precision
    deterministic = jnp.any(point, axis=0)
    precision = jnp.where(live & (var > 0), wb / jnp.where(var > 0, var, 1), 0)
    total = jnp.sum(precision, axis=0)
    fused_var = 1 / jnp.where(total > 0, total, 1)
    fused_mean = fused_var * jnp.sum(precision * means, axis=0)
    wz = jnp.where(point, wb, 0)
    point_mean = jnp.sum(wz * means, axis=0) / jnp.where(deterministic, jnp.sum(wz, axis=0), 1)
    return jnp.where(deterministic, point_mean, fused_mean), jnp.where(deterministic, 0, fused_var)


def stack_params(trees: Sequence[PyTree]) -> PyTree:
    """M parameter trees of one structure stacked on a new leading axis M (every leaf ``[M, ...]``)."""
    if not trees:
        raise ValueError("stack_params: no parameter trees")
    structure = jax.tree.structure(trees[0])
    for i, tree in enumerate(trees[1:], 1):
        if jax.tree.structure(tree) != structure:
            raise ValueError(f"stack_params: tree {i} has another structure than tree 0 (models must share one architecture)")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def num_models(stacked: PyTree) -> int:
    """The number M of models in a stacked parameter tree (:func:`stack_params`); every leaf must be ``[M, ...]``."""
    leaves = jax.tree.leaves(stacked)
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError("stacked parameters need leaves with a leading model axis M (see stack_params)")
    sizes = {jnp.shape(leaf)[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"stacked parameters: every leaf needs the same leading model axis M, got sizes {sorted(sizes)}")
    return sizes.pop()


def model_gaussians(
    velocity_fn: VelocityFn, stacked: PyTree, x: Array, sigma: Array, sigma_next: Array, etas: Array, sigma_cap: Array
) -> tuple[Array, Array]:
    """Every model's SDE step Gaussian at ``x [B, H, W, C]``: ``(means [M, B, H, W, C], stds [M])``, the M velocity
    calls as one call over the stacked parameters (``jax.vmap``)."""
    t = jnp.full((x.shape[0],), sigma, x.dtype)
    v = jax.vmap(velocity_fn, in_axes=(0, None, None))(stacked, x, t)
    return jax.vmap(lambda vi, eta: sde_step_gaussian(x, vi, sigma, sigma_next, eta, sigma_cap=sigma_cap))(v, etas)


def fused_sample(
    velocity_fn: VelocityFn,
    stacked: PyTree,
    x_T: Array,
    sigmas: Array,
    w: Array,
    etas: Array,
    key: Array,
    *,
    return_trajectory: bool = False,
) -> Rollout:
    """MSDDA sampling (Algorithm 1) from ``x_T [B, H, W, C]`` along ``sigmas [S + 1]`` under ``jax.lax.scan``.

    ``velocity_fn(params, x, t)`` is one model (LoRA adapters over a base it closes over, or a full parameter tree;
    for classifier-free guidance compose :func:`marble_jax.sampling.guided_velocity` inside it); ``stacked`` holds
    the M models' parameters on a leading axis (:func:`stack_params`); ``w [M]`` the preference weights (checked when
    concrete) and ``etas [M]`` each model's SDE noise level. Step i draws its noise as
    ``sampling.sample(method="sde")`` does (``fold_in(key, i)``), so runs are paired with single-model runs: at a
    vertex ``w = e_i`` this reproduces model i's SDE samples with ``eta_i`` (up to the float rounding of
    ``1 / (1 / var)``). Jittable with traced ``w`` and ``etas``.
    """
    m = num_models(stacked)
    check_weights(w, m)
    etas = jnp.asarray(etas, x_T.dtype)
    if etas.shape != (m,):
        raise ValueError(f"etas must have shape [{m}] (one noise level per model), got {etas.shape}")
    steps = sigmas.shape[0] - 1

    def body(x, inputs):
        i, sigma, sigma_next = inputs
        means, stds = model_gaussians(velocity_fn, stacked, x, sigma, sigma_next, etas, sigmas[1])
        mean, var = fuse_gaussians(means, stds**2, w)
        x_next = (mean + jnp.sqrt(var) * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)).astype(x.dtype)
        return x_next, x_next if return_trajectory else None

    latents, trajectory = jax.lax.scan(body, x_T, (jnp.arange(steps), sigmas[:-1], sigmas[1:]))
    if return_trajectory:
        trajectory = jnp.concatenate([x_T[None], trajectory])
    return Rollout(latents, trajectory)


def reward_soup(param_trees: Sequence[PyTree] | PyTree, w: Array) -> PyTree:
    """Reward Soup: the one model ``sum_i w_i theta_i``, leaf by leaf (for LoRA adapters: A and B of each adapter
    interpolated). ``param_trees``: a list or tuple of M trees of one structure, or one tree stacked on a leading axis
    M (:func:`stack_params`); ``w [M]`` on the simplex (:func:`check_weights`)."""
    stacked = stack_params(param_trees) if isinstance(param_trees, list | tuple) else param_trees
    check_weights(w, num_models(stacked))
    return jax.tree.map(lambda leaf: jnp.tensordot(jnp.asarray(w, leaf.dtype), leaf, axes=1), stacked)
