"""MSDDA: Gaussian fusion against a numeric product of densities, the fused sampler against single-model sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from marble_jax import msdda, sampling
from marble_jax.models import lora, mmdit
from marble_jax.world import model as world_model


def numeric_product(means: np.ndarray, variances: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Mean and variance of ``prod_i N(mu_i, var_i)^{w_i}`` normalised on a fine grid (scipy's log-densities)."""
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
        # float32 arithmetic against a 1e-4-spaced grid: both well inside 1e-5
        np.testing.assert_allclose(float(mean), ref_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(var), ref_var, rtol=1e-5)


def test_fusion_elementwise_with_per_element_variances():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 4)).astype(np.float32)
    variances = rng.uniform(0.3, 2.0, (3, 4)).astype(np.float32)
    w = np.array([0.2, 0.5, 0.3])
    mean, var = msdda.fuse_gaussians(jnp.asarray(means), jnp.asarray(variances), w)
    for d in range(4):
        ref_mean, ref_var = numeric_product(means[:, d], variances[:, d], w)
        np.testing.assert_allclose(float(mean[d]), ref_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(var[d]), ref_var, rtol=1e-5)


def test_equal_variances_give_the_weighted_mean():
    means = jnp.asarray(np.random.default_rng(2).normal(size=(3, 2, 5)), jnp.float32)
    w = np.array([0.1, 0.6, 0.3])
    mean, var = msdda.fuse_gaussians(means, jnp.full((3,), 0.7), w)
    np.testing.assert_allclose(np.asarray(mean), np.tensordot(w, np.asarray(means), 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var), 0.7, rtol=1e-6)


def test_zero_variance_components():
    means = jnp.asarray([1.0, 2.0, 5.0])
    # one deterministic component with w > 0: the fused step is that component's mean, variance 0
    mean, var = msdda.fuse_gaussians(means, jnp.asarray([0.0, 1.0, 1.0]), np.array([0.2, 0.4, 0.4]))
    assert float(mean) == 1.0 and float(var) == 0.0
    # two deterministic components: their w-weighted mean
    mean, var = msdda.fuse_gaussians(means, jnp.asarray([0.0, 0.0, 1.0]), np.array([0.25, 0.5, 0.25]))
    np.testing.assert_allclose(float(mean), (0.25 * 1 + 0.5 * 2) / 0.75, rtol=1e-6)
    assert float(var) == 0.0
    # a deterministic component with w = 0 does not count; no NaN anywhere
    mean, var = msdda.fuse_gaussians(means, jnp.asarray([0.0, 2.0, 2.0]), np.array([0.0, 0.5, 0.5]))
    np.testing.assert_allclose([float(mean), float(var)], [3.5, 2.0], rtol=1e-6)


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


def test_reward_soup_vertices_and_midpoint():
    trees = [{"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}, {"a": -jnp.arange(3.0), "b": {"c": 3 * jnp.ones((2, 2))}}]
    for i in range(2):
        soup = msdda.reward_soup(trees, np.eye(2)[i])
        for a, b in zip(jax.tree.leaves(soup), jax.tree.leaves(trees[i]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mid = msdda.reward_soup(trees, np.array([0.5, 0.5]))
    np.testing.assert_array_equal(np.asarray(mid["a"]), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(mid["b"]["c"]), 2 * np.ones((2, 2)))
    with pytest.raises(ValueError, match="structure"):
        msdda.stack_params([trees[0], {"a": jnp.zeros(3)}])


@pytest.fixture(scope="module")
def world_models():
    """The world MMDiT with three random LoRA adapters (non-zero B, so the models differ) and a fixed prompt batch."""
    world = world_model.load_world_model()
    spec = lora.LoRASpec(rank=4, alpha=4.0, targets=lora.JOINT_ATTENTION)
    lora_apply = lora.with_lora(mmdit.build(world.config["mmdit"]), spec)
    adapters = []
    for i in range(3):
        fresh = lora.init_lora(world.params["mmdit"], spec, jax.random.key(i))
        adapters.append(jax.tree.map(lambda x, k=i: x + 0.05 * jax.random.normal(jax.random.key(10 + k), x.shape), fresh))
    context, pooled = world.encode(["a red circle", "two blue squares"])

    def velocity(params, x, t):
        return lora_apply(world.params["mmdit"], params, x, 1000 * t, context, pooled)

    return velocity, adapters


def test_batched_model_call_equals_separate_calls(world_models):
    velocity, adapters = world_models
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    sigmas = sampling.sigma_schedule(6, shift=3.0)
    etas = jnp.asarray([0.8, 1.0, 0.3])
    means, stds = jax.jit(lambda s: msdda.model_gaussians(velocity, s, x, sigmas[2], sigmas[3], etas, sigmas[1]))(
        msdda.stack_params(adapters)
    )
    for i, params in enumerate(adapters):
        v = velocity(params, x, jnp.full((2,), sigmas[2]))
        mean, std = sampling.sde_step_gaussian(x, v, sigmas[2], sigmas[3], etas[i], sigma_cap=sigmas[1])
        np.testing.assert_allclose(np.asarray(means[i]), np.asarray(mean), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(stds[i]), float(std), rtol=1e-6)
    # one fused step is fuse_gaussians of those per-model Gaussians
    w = np.array([0.5, 0.3, 0.2])
    mean, var = msdda.fuse_gaussians(means, stds**2, w)
    prec = w / np.asarray(stds) ** 2
    np.testing.assert_allclose(np.asarray(mean), np.tensordot(prec, np.asarray(means), 1) / prec.sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(var.reshape(-1)[0]), 1 / prec.sum(), rtol=1e-5)


@pytest.mark.parametrize("m", [2, 3])
def test_vertex_weights_reproduce_each_models_sde_samples(world_models, m):
    velocity, adapters = world_models
    stacked = msdda.stack_params(adapters[:m])
    x_T = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    sigmas = sampling.sigma_schedule(5, shift=3.0)
    etas = jnp.asarray([0.8, 1.0, 0.5][:m])
    key = jax.random.key(7)
    fused = jax.jit(lambda w: msdda.fused_sample(velocity, stacked, x_T, sigmas, w, etas, key).latents)
    outs = []
    for i in range(m):
        ours = fused(jnp.eye(m)[i])
        ref = sampling.sample(lambda x, t, p=adapters[i]: velocity(p, x, t), x_T, sigmas, method="sde", key=key, eta=etas[i])
        # float32: the vertex's 1 / (1 / var) and the vmapped call round differently over 5 steps of pixels in [-3, 3]
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref.latents), rtol=0, atol=2e-5)
        outs.append(np.asarray(ours))
    mixed = np.asarray(fused(jnp.full((m,), 1 / m)))
    assert all(np.abs(mixed - o).max() > 1e-3 for o in outs)  # an interior w is none of the models


def test_classifier_free_guidance_composes_inside_the_velocity(world_models):
    """CFG per model: guided_velocity inside velocity_fn; at a vertex, model i's guided SDE sampling."""
    velocity, adapters = world_models
    world = world_model.load_world_model()
    spec = lora.LoRASpec(rank=4, alpha=4.0, targets=lora.JOINT_ATTENTION)
    lora_apply = lora.with_lora(mmdit.build(world.config["mmdit"]), spec)
    cond = world.encode(["a red circle", "two blue squares"])
    uncond = world.encode(["", ""])

    def guided(params, x, t):
        model = lambda xx, tt, c: lora_apply(world.params["mmdit"], params, xx, 1000 * tt, *c)  # noqa: E731
        return sampling.guided_velocity(model, cond, uncond, 3.0)(x, t)

    x_T = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    sigmas = sampling.sigma_schedule(4, shift=3.0)
    key = jax.random.key(3)
    ours = msdda.fused_sample(
        guided, msdda.stack_params(adapters[:2]), x_T, sigmas, jnp.asarray([0.0, 1.0]), jnp.asarray([0.8, 0.8]), key
    )
    ref = sampling.sample(lambda x, t: guided(adapters[1], x, t), x_T, sigmas, method="sde", key=key, eta=0.8)
    np.testing.assert_allclose(np.asarray(ours.latents), np.asarray(ref.latents), rtol=0, atol=2e-5)
    plain = msdda.fused_sample(
        velocity, msdda.stack_params(adapters[:2]), x_T, sigmas, jnp.asarray([0.0, 1.0]), jnp.asarray([0.8, 0.8]), key
    )
    assert float(jnp.abs(plain.latents - ours.latents).max()) > 1e-2  # guidance changes the samples
