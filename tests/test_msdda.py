"""MSDDA: Gaussian fusion against a numeric product of densities, the fused sampler against single-model sampling
and a per-step numpy fusion, Reward Soup."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from scipy import stats

from marble_jax import msdda, sampling
from marble_jax.models import lora, mmdit
from marble_jax.world import model as world_model


def numeric_product(means: np.ndarray, variances: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Mean and variance of ``prod_i N(mu_i, var_i)^{w_i}`` normalised on a fine 1-D grid (scipy's log-densities)."""
    grid = np.linspace(-30, 30, 600_001)
    log_p = sum(wi * stats.norm.logpdf(grid, mu, np.sqrt(v)) for mu, v, wi in zip(means, variances, w, strict=True))
    p = np.exp(log_p - log_p.max())
    p /= np.trapezoid(p, grid)
    mean = np.trapezoid(grid * p, grid)
    return mean, np.trapezoid((grid - mean) ** 2 * p, grid)


def test_fusion_is_the_normalised_product_of_densities():
    rng = np.random.default_rng(0)
    for m in (2, 3, 5):
        means = rng.normal(0, 2, m)
        variances = rng.uniform(0.2, 3.0, m)
        w = rng.dirichlet(np.ones(m))
        mean, var = msdda.fuse_gaussians(jnp.asarray(means, jnp.float32), jnp.asarray(variances, jnp.float32), w)
        ref_mean, ref_var = numeric_product(means, variances, w)
        # float32 inputs and arithmetic (~1e-7 relative) against a 1e-4-spaced grid (exact to ~1e-10 for Gaussians)
        np.testing.assert_allclose(float(mean), ref_mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(var), ref_var, rtol=1e-6)


def test_fusion_on_a_two_dimensional_grid_with_diagonal_covariances():
    """Per-element variances ``[M, 2]``: the product of M diagonal 2-D Gaussians normalised on a 2-D grid."""
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 2)).astype(np.float32)
    variances = rng.uniform(0.3, 2.0, (3, 2)).astype(np.float32)
    w = np.array([0.2, 0.5, 0.3])
    mean, var = msdda.fuse_gaussians(jnp.asarray(means), jnp.asarray(variances), w)
    axis = np.linspace(-12, 12, 1201)
    points = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1)  # [G, G, 2]
    components = zip(means, variances, w, strict=True)
    log_p = sum(wi * stats.multivariate_normal(mu, np.diag(v)).logpdf(points) for mu, v, wi in components)
    p = np.exp(log_p - log_p.max())
    p /= np.trapezoid(np.trapezoid(p, axis), axis)

    def expect(f):
        return np.trapezoid(np.trapezoid(f * p, axis), axis)

    ref_mean = np.array([expect(points[..., d]) for d in range(2)])
    centred = points - ref_mean
    ref_cov = np.array([[expect(centred[..., a] * centred[..., b]) for b in range(2)] for a in range(2)])
    # float32 against a 0.02-spaced grid over > 10 standard deviations (trapezoid exact to ~1e-12 for Gaussians)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), np.diag(ref_cov), rtol=1e-6)
    assert abs(ref_cov[0, 1]) < 1e-9  # the product stays diagonal


def test_equal_variances_give_the_weighted_mean():
    means = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2, 5)), jnp.float32)
    w = np.array([0.1, 0.6, 0.3])
    mean, var = msdda.fuse_gaussians(means, jnp.full((3,), 0.7), w)
    # float32: (w_i / 0.7) * 0.7 rounds at ~1e-7
    np.testing.assert_allclose(np.asarray(mean), np.tensordot(w, np.asarray(means), 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), 0.7, rtol=1e-6)


def test_zero_variance_is_the_limit_of_vanishing_variances():
    """Per element: zero variances with w > 0 make the step deterministic (the w-weighted mean of those components);
    with w = 0 they are ignored. Reference: the plain formula in float64 with the zeros replaced by 1e-12."""
    means = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    variances = np.array([[0.0, 0.0, 1.0, 0.5], [1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 0.5]])
    w = np.array([0.25, 0.75, 0.0])
    mean, var = msdda.fuse_gaussians(jnp.asarray(means, jnp.float32), jnp.asarray(variances, jnp.float32), w)
    precision = w[:, None] / np.where(variances == 0, 1e-12, variances)
    ref_var = 1 / precision.sum(0)
    ref_mean = ref_var * (precision * means).sum(0)
    # the limit is reached to ~1e-12; float32 rounding of the weighted means ~1e-7
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(var), ref_var, atol=1e-11)
    np.testing.assert_array_equal(np.asarray(var)[:2], 0.0)  # exactly deterministic
    assert np.asarray(var)[2] > 0  # the zero variance of a w = 0 component does not count


@pytest.mark.parametrize(
    ("w", "match"),
    [([0.5, 0.6], "sum to 1"), ([-0.2, 1.2], "non-negative"), ([1.0], r"shape \[2\]"), ([[0.5, 0.5]], r"shape \[2\]"),
     ([np.nan, 1.0], "finite")],
)  # fmt: skip
def test_invalid_weights_raise(w, match):
    with pytest.raises(ValueError, match=match):
        msdda.fuse_gaussians(jnp.zeros((2, 3)), jnp.ones((2,)), np.asarray(w))
    with pytest.raises(ValueError, match=match):
        msdda.reward_soup([{"a": jnp.zeros(2)}, {"a": jnp.ones(2)}], np.asarray(w))
    with pytest.raises(ValueError, match=match):
        msdda.fused_sample(None, {"a": jnp.zeros((2, 3))}, jnp.zeros((1, 2, 2, 3)), jnp.ones(3), np.asarray(w), jnp.ones(2), None)


def test_invalid_shapes_raise():
    with pytest.raises(ValueError, match=r"variances must have shape \[2\] or \[2, ...\].*got \(3,\)"):
        msdda.fuse_gaussians(jnp.zeros((2, 3)), jnp.ones((3,)), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"variances .* got \(2, 4\)"):
        msdda.fuse_gaussians(jnp.zeros((2, 3)), jnp.ones((2, 4)), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"etas must have shape \[2\].*got \(3,\)"):
        msdda.fused_sample(
            None, {"a": jnp.zeros((2, 3))}, jnp.zeros((1, 2, 2, 3)), jnp.ones(3), np.full(2, 0.5), jnp.ones(3), None
        )
    with pytest.raises(ValueError, match=r"same leading model axis M, got sizes \[2, 3\]"):
        msdda.reward_soup({"a": jnp.zeros((2, 4)), "b": jnp.zeros((3, 4))}, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="structure"):
        msdda.stack_params([{"a": jnp.zeros(3)}, {"b": jnp.zeros(3)}])


def test_reward_soup_vertices_and_midpoint():
    rng = np.random.default_rng(3)
    trees = [{"a": jnp.asarray(rng.normal(size=3)), "b": {"c": jnp.asarray(rng.normal(size=(2, 2)))}} for _ in range(2)]
    for i in range(2):
        soup = msdda.reward_soup(trees, np.eye(2)[i])
        for ours, ref in zip(jax.tree.leaves(soup), jax.tree.leaves(trees[i]), strict=True):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))  # 1 theta_i + 0 theta_j is exact
    for soup in (msdda.reward_soup(trees, np.full(2, 0.5)), msdda.reward_soup(msdda.stack_params(trees), np.full(2, 0.5))):
        for ours, a, b in zip(jax.tree.leaves(soup), *map(jax.tree.leaves, trees), strict=True):
            # 0.5 a + 0.5 b is (a + b) / 2 up to one float32 rounding
            np.testing.assert_allclose(np.asarray(ours), (np.asarray(a, np.float64) + np.asarray(b)) / 2, rtol=1e-7, atol=1e-7)


@pytest.fixture(scope="module")
def world():
    """The world MMDiT with three random LoRA adapters (non-zero B, so the models differ), each model with
    classifier-free guidance (scale 3) composed inside its velocity (as ``python -m marble_jax.sample --guidance``
    does), a fixed prompt batch, a 4-step SDE grid, the fused sampler jitted with traced ``(stacked, w, etas)``
    (compiled once per M), the single-model SDE sampler jitted with traced ``(params, eta)`` and the velocity jitted."""
    model = world_model.load_world_model()
    spec = lora.LoRASpec(rank=4, alpha=4.0, targets=lora.JOINT_ATTENTION)
    lora_apply = lora.with_lora(mmdit.build(model.config["mmdit"]), spec)
    adapters = []
    for i in range(3):
        fresh = lora.init_lora(model.params["mmdit"], spec, jax.random.key(i))
        adapters.append(jax.tree.map(lambda x, k=i: x + 0.05 * jax.random.normal(jax.random.key(10 + k), x.shape), fresh))
    cond, uncond = model.encode(["a red circle", "two blue squares"]), model.encode(["", ""])

    def velocity(params, x, t):
        def conditional(x, t, conditioning):
            return lora_apply(model.params["mmdit"], params, x, 1000 * t, *conditioning)

        return sampling.guided_velocity(conditional, cond, uncond, 3.0)(x, t)

    x_T = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    sigmas, key = sampling.sigma_schedule(4, shift=3.0), jax.random.key(7)
    fused = jax.jit(lambda s, w, e: msdda.fused_sample(velocity, s, x_T, sigmas, w, e, key, return_trajectory=True).trajectory)
    single_sde = jax.jit(
        lambda p, eta: sampling.sample(lambda x, t: velocity(p, x, t), x_T, sigmas, method="sde", key=key, eta=eta).latents
    )
    return SimpleNamespace(
        adapters=adapters, single=jax.jit(velocity), x_T=x_T, sigmas=sigmas, key=key, fused=fused, single_sde=single_sde
    )


@pytest.mark.parametrize("m", [2, 3])
def test_vertex_weights_reproduce_each_models_sde_samples(world, m):
    """w = e_i gives model i's own (guided) SDE samples with the same noise: paired runs, and CFG composes."""
    stacked = msdda.stack_params(world.adapters[:m])
    etas = jnp.asarray([0.8, 1.0, 0.5][:m])
    for i in range(m):
        ours = world.fused(stacked, jnp.eye(m)[i], etas)[-1]
        ref = world.single_sde(world.adapters[i], etas[i])
        # Two float32 runs of the same guided 4-step sampler (the vertex's 1 / (1 / var), the vmapped call): each is
        # within the MMDiT's float32 parity (1e-5, tests/test_mmdit.py) of the exact run. Measured <= 1.3e-6 (latents
        # up to 6.4); 1e-5 leaves >= 7.9x.
        err = rel_err(ours, ref)
        print(f"vertex {i} of {m}: {err:.2e}")
        assert err < 1e-5, (i, err)


def test_interior_weights_fuse_each_step_of_the_separate_models(world):
    """With 0 < w < 1, every step of the fused run (teacher-forced on its own trajectory) is the product of the M
    per-model SDE Gaussians, each from a separate network call (so the one batched M-model call equals M separate
    calls), fused in float64 numpy, plus step i's paired noise."""
    w, etas = np.array([0.5, 0.3, 0.2]), np.array([0.8, 1.0, 0.3])
    trajectory = np.asarray(world.fused(msdda.stack_params(world.adapters), jnp.asarray(w), jnp.asarray(etas)))
    sigmas = world.sigmas
    for i in range(sigmas.shape[0] - 1):
        x = jnp.asarray(trajectory[i])
        gaussians = [
            sampling.sde_step_gaussian(x, world.single(p, x, jnp.full((2,), sigmas[i])), sigmas[i], sigmas[i + 1], eta,
                                       sigma_cap=sigmas[1])
            for p, eta in zip(world.adapters, etas, strict=True)
        ]  # fmt: skip
        means = np.stack([np.asarray(mean, np.float64) for mean, _ in gaussians])
        precision = w / np.array([float(std) for _, std in gaussians]) ** 2
        fused_var = 1 / precision.sum()
        fused_mean = fused_var * np.tensordot(precision, means, 1)
        z = np.asarray(jax.random.normal(jax.random.fold_in(world.key, i), x.shape, x.dtype))
        # One float32 step (separate vs vmapped network calls, the float32 fusion) against the float64 fusion of the
        # same float32 Gaussians: measured 0.9e-7 - 1.3e-7 (about two roundings, u = 6e-8, of the latents' scale);
        # 1e-6 (~17 roundings) leaves >= 7.6x.
        err = rel_err(trajectory[i + 1], fused_mean + np.sqrt(fused_var) * z)
        print(f"step {i}: {err:.2e}")
        assert err < 1e-6, (i, err)
        for mean, std in gaussians:  # and none of the models' own steps
            assert np.abs(trajectory[i + 1] - (np.asarray(mean) + float(std) * z)).max() > 1e-3
