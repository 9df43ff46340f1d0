"""Samplers against diffusers' schedulers (Euler with CFG, DPM-Solver++(2M)) and the Flow-GRPO SDE formula."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from helpers import rel_err, t64, torch_float64

from marble_jax import sampling

B, H, W, C, HIDDEN, COND = 2, 4, 4, 4, 8, 3
# float32 parity of whole sampling runs against diffusers' loops in float64 (run_diffusers): measured <= 5.8e-7 over
# up to 25 steps and guidance 4.5 (torch's float32 loop: 4e-7 - 7e-7 off ours); 1e-5 leaves >= 17x.
TOL = 1e-5


@pytest.fixture(scope="module")
def toy():
    """A fixed random velocity model ``v = tanh(x W1 + t u + cond Wc) W2 - x / 2`` over channels, in jnp
    (NHWC, float32) and torch (NCHW, float64 weights), plus initial noise and conditionings."""
    rng = np.random.default_rng(0)
    shapes, scales = [(C, HIDDEN), (HIDDEN,), (COND, HIDDEN), (HIDDEN, C)], [0.5, 1.0, 1.0, HIDDEN**-0.5]
    w1, u, wc, w2 = (scale * rng.normal(size=shape).astype(np.float32) for shape, scale in zip(shapes, scales, strict=True))
    x_T = rng.normal(size=(B, H, W, C)).astype(np.float32)
    cond, uncond = rng.normal(size=(B, COND)).astype(np.float32), np.zeros((B, COND), np.float32)

    def model_jax(x, t, c):
        hidden = jnp.tanh(x @ w1 + t[:, None, None, None] * u + (c @ wc)[:, None, None, :])
        return hidden @ w2 - 0.5 * x

    tw1, tu, twc, tw2 = (t64(a) for a in (w1, u, wc, w2))

    def model_torch(x, t, c):
        x = x.permute(0, 2, 3, 1)
        hidden = torch.tanh(x @ tw1 + t[:, None, None, None] * tu + (c @ twc)[:, None, None, :])
        return (hidden @ tw2 - 0.5 * x).permute(0, 3, 1, 2)

    return model_jax, model_torch, x_T, cond, uncond


def run_diffusers(scheduler, model_torch, x_T, cond, uncond, guidance):
    """diffusers' denoising loop with CFG (uncond first), the model fed ``t = scheduler.sigmas[i]``; NHWC out.

    In float64: the latents, the toy model, the scheduler's sigmas (the float32 grid ours uses, held as float64, so
    that their differences are exact) and its steps' float32 upcast (helpers.torch_float64)."""
    scheduler.sigmas = scheduler.sigmas.double()
    x = t64(x_T).permute(0, 3, 1, 2)
    cond_t, uncond_t = t64(cond), t64(uncond)
    with torch_float64():
        for i, timestep in enumerate(scheduler.timesteps):
            t = scheduler.sigmas[i].expand(2 * B)
            v_uncond, v_cond = model_torch(torch.cat([x, x]), t, torch.cat([uncond_t, cond_t])).chunk(2)
            x = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), timestep, x).prev_sample
    assert x.dtype == torch.float64
    return x.permute(0, 2, 3, 1).numpy()


@functools.cache
def jitted_sampler(model_jax, guidance, **kwargs):
    """One compiled sampler per configuration (compiling the PRNG is slow on CPU); key and eta are traced."""

    @jax.jit
    def run(x_T, sigmas, cond, uncond, key, eta):
        velocity_fn = sampling.guided_velocity(model_jax, cond, uncond, guidance)
        return sampling.sample(velocity_fn, x_T, sigmas, key=key, eta=eta, **kwargs)

    return run


def run_ours(model_jax, x_T, cond, uncond, guidance, sigmas, key=None, eta=0.7, **kwargs):
    key = jax.random.key(0) if key is None else key
    return jitted_sampler(model_jax, guidance, **kwargs)(x_T, jnp.asarray(sigmas), cond, uncond, key, eta)


@pytest.mark.parametrize("num_train_timesteps", [1000, 500])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("num_steps", [1, 6, 10, 25, 40])
def test_sigma_schedule_matches_diffusers(num_steps, shift, num_train_timesteps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=num_train_timesteps)
    scheduler.set_timesteps(num_steps)
    ours = sampling.sigma_schedule(num_steps, shift, num_train_timesteps)
    assert ours.dtype == jnp.float32 and ours.shape == (num_steps + 1,)
    np.testing.assert_array_equal(np.asarray(ours), scheduler.sigmas.numpy())


def test_sigma_schedule_reference_values():
    sigmas = np.asarray(sampling.sigma_schedule(6))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas[-2], 0.00893, atol=5e-6)  # REFERENCE §1 (to 5 decimals): lower end shifted twice


def test_euler_cfg_matches_diffusers(toy):
    model_jax, model_torch, x_T, cond, uncond = toy
    num_steps, guidance = 10, 4.5
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    ref = run_diffusers(scheduler, model_torch, x_T, cond, uncond, guidance)
    out = run_ours(model_jax, x_T, cond, uncond, guidance, sampling.sigma_schedule(num_steps), return_trajectory=True)
    print(f"vs float64: {rel_err(out.latents, ref):.2e}")
    assert rel_err(out.latents, ref) < TOL, rel_err(out.latents, ref)
    assert out.trajectory.shape == (num_steps + 1, B, H, W, C) and out.means is None and out.stds is None
    np.testing.assert_array_equal(out.trajectory[0], x_T)
    np.testing.assert_array_equal(out.trajectory[-1], out.latents)


def test_guidance_one_is_a_single_cond_call(toy):
    model_jax, _, x_T, cond, uncond = toy
    batches = []

    def recording_model(x, t, c):
        batches.append((x.shape[0], t.shape[0], c.shape[0]))
        return model_jax(x, t, c)

    t = jnp.full((B,), 0.5)
    v = sampling.guided_velocity(recording_model, jnp.asarray(cond), jnp.asarray(uncond), 1.0)(jnp.asarray(x_T), t)
    assert batches == [(B, B, B)]
    np.testing.assert_array_equal(v, model_jax(jnp.asarray(x_T), t, jnp.asarray(cond)))
    sampling.guided_velocity(recording_model, jnp.asarray(cond), jnp.asarray(uncond), 2.0)(jnp.asarray(x_T), t)
    assert batches[1:] == [(2 * B, 2 * B, 2 * B)]


def dpm_scheduler(num_steps, shift, sigmas=None):
    """diffusers' DPM-Solver++(2M) for flow matching. No configuration makes its own flow sigmas equal the SD3
    grid (they run ``f(linspace(1 - 1/T, (1 - 1/T) / N, N))``), so the SD3 sigmas are injected after
    ``set_timesteps``; the step index then starts at 0 (``set_begin_index``)."""
    scheduler = DPMSolverMultistepScheduler(
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps)
    if sigmas is not None:
        scheduler.sigmas = torch.from_numpy(np.array(sigmas))
    scheduler.set_begin_index(0)
    return scheduler


@pytest.mark.parametrize("num_steps,guidance", [(10, 1.0), (25, 1.0), (2, 1.0), (10, 4.5)])
def test_dpm2_matches_diffusers_on_sd3_sigmas(toy, num_steps, guidance):
    model_jax, model_torch, x_T, cond, uncond = toy
    sigmas = sampling.sigma_schedule(num_steps)
    ref = run_diffusers(dpm_scheduler(num_steps, 3.0, sigmas), model_torch, x_T, cond, uncond, guidance)
    out = run_ours(model_jax, x_T, cond, uncond, guidance, sigmas, method="dpm2")
    print(f"vs float64: {rel_err(out.latents, ref):.2e}")
    assert rel_err(out.latents, ref) < TOL, rel_err(out.latents, ref)


def test_dpm2_matches_diffusers_on_its_own_flow_sigmas(toy):
    """diffusers' own flow grid starts below 1, so step 1 carries a genuine 2nd-order correction."""
    model_jax, model_torch, x_T, cond, uncond = toy
    scheduler = dpm_scheduler(8, 3.0)
    sigmas = scheduler.sigmas.numpy().copy()
    assert sigmas[0] < 1
    ref = run_diffusers(scheduler, model_torch, x_T, cond, uncond, 1.0)
    out = run_ours(model_jax, x_T, cond, uncond, 1.0, sigmas, method="dpm2", return_trajectory=True)
    print(f"vs float64: {rel_err(out.latents, ref):.2e}")
    assert rel_err(out.latents, ref) < TOL, rel_err(out.latents, ref)
    assert out.trajectory.shape == (9, B, H, W, C)


def test_dpm2_coefficients_first_and_last_steps_are_ddim():
    sigmas = sampling.sigma_schedule(6)
    a, b, c = (np.asarray(z) for z in sampling.dpm_solver2_coefficients(sigmas))
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and np.all(np.isfinite(c))
    assert c[0] == 0 and c[1] == 0 and c[-1] == 0 and np.all(c[2:-1] != 0)  # sigmas[0] = 1: h_0 infinite
    assert a[-1] == 0 and b[-1] == 1  # the last step returns the x0 prediction


def sde_reference_float64(x, v, sigmas, i, eta):
    """REFERENCE §1's SDE Gaussian in numpy float64."""
    sigmas = np.asarray(sigmas, np.float64)
    s, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
    std_t = eta * np.sqrt(s / (1 - (sigmas[1] if s == 1 else s)))
    mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * np.sqrt(-dt)


def test_sde_gaussian_matches_float64_reference():
    rng = np.random.default_rng(1)
    x, v = (rng.normal(size=(B, H, W, C)).astype(np.float32) for _ in range(2))
    sigmas = sampling.sigma_schedule(10)
    gaussian = jax.jit(functools.partial(sampling.sde_step_gaussian, eta=0.7))
    for i in range(10):
        mean, std = gaussian(x, v, sigmas[i], sigmas[i + 1], sigma_cap=sigmas[1])
        ref_mean, ref_std = sde_reference_float64(x.astype(np.float64), v.astype(np.float64), sigmas, i, 0.7)
        # a dozen float32 roundings, no cancellation: measured <= 9.4e-8; TOL leaves 100x
        assert rel_err(mean, ref_mean) < TOL, (i, rel_err(mean, ref_mean))
        assert rel_err(std, ref_std) < TOL, (i, rel_err(std, ref_std))
        assert np.isfinite(ref_std) and ref_std > 0


SDE_FLAGS = dict(method="sde", return_trajectory=True, return_gaussians=True)


def test_sde_eta_zero_is_euler(toy):
    model_jax, _, x_T, cond, uncond = toy
    sigmas = sampling.sigma_schedule(6)
    mean, std = sampling.sde_step_gaussian(x_T, 2 * x_T, sigmas[0], sigmas[1], 0.0, sigma_cap=sigmas[1])
    np.testing.assert_array_equal(mean, sampling.euler_step(x_T, 2 * x_T, sigmas[0], sigmas[1]))
    assert std == 0
    sde = run_ours(model_jax, x_T, cond, uncond, 1.0, sigmas, eta=0.0, **SDE_FLAGS)
    euler = run_ours(model_jax, x_T, cond, uncond, 1.0, sigmas)
    assert rel_err(sde.latents, euler.latents) < 1e-6  # same formula up to float32 rounding order (measured 9e-8)
    np.testing.assert_array_equal(sde.stds, 0)


def test_sde_sampling_reproducible_with_exposed_gaussians(toy):
    model_jax, _, x_T, cond, uncond = toy
    num_steps, key = 6, jax.random.key(3)
    sigmas = sampling.sigma_schedule(num_steps)
    out = run_ours(model_jax, x_T, cond, uncond, 1.0, sigmas, key=key, **SDE_FLAGS)
    again = run_ours(model_jax, x_T, cond, uncond, 1.0, sigmas, key=key, **SDE_FLAGS)
    other = run_ours(model_jax, x_T, cond, uncond, 1.0, sigmas, key=jax.random.key(4), **SDE_FLAGS)
    np.testing.assert_array_equal(out.latents, again.latents)
    assert not np.allclose(out.latents, other.latents)
    assert out.means.shape == (num_steps, B, H, W, C) and out.stds.shape == (num_steps,)
    np.testing.assert_array_equal(out.trajectory[-1], out.latents)
    # x_{i+1} = mean_i + std_i z_i, z_i drawn from fold_in(key, i), (mean_i, std_i) the Gaussian at x_i
    zs = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), x_T.shape)))(jnp.arange(num_steps))
    # below: ours recomputed outside the jitted scan, float32 both: a rounding or two (measured 4.8e-7 abs, 1.1e-7 rel)
    np.testing.assert_allclose(out.trajectory[1:], out.means + out.stds[:, None, None, None, None] * zs, rtol=1e-6, atol=1e-6)
    for i in range(num_steps):
        x = out.trajectory[i]
        v = model_jax(x, jnp.full((B,), sigmas[i]), jnp.asarray(cond))
        mean, std = sampling.sde_step_gaussian(x, v, sigmas[i], sigmas[i + 1], 0.7, sigma_cap=sigmas[1])
        assert rel_err(out.means[i], mean) < 1e-6 and rel_err(out.stds[i], std) < 1e-6


def test_sde_step_empirical_distribution():
    rng = np.random.default_rng(2)
    x, v = (jnp.asarray(rng.normal(size=(1, H, W, C)).astype(np.float32)) for _ in range(2))
    sigmas = sampling.sigma_schedule(10)
    n = 4000
    keys = jax.random.split(jax.random.key(5), n)
    step = functools.partial(sampling.sde_step, x, v, sigmas[3], sigmas[4], 0.7, sigma_cap=sigmas[1])
    draws = np.asarray(jax.jit(jax.vmap(step))(keys), np.float64)  # [n, 1, H, W, C]
    mean, std = sampling.sde_step_gaussian(x, v, sigmas[3], sigmas[4], 0.7, sigma_cap=sigmas[1])
    std = float(std)
    # per-element sample means within 5 standard errors; pooled sample std within 2%
    assert np.max(np.abs(draws.mean(0) - np.asarray(mean))) < 5 * std / np.sqrt(n)
    assert abs((draws - np.asarray(mean)).std() / std - 1) < 0.02
