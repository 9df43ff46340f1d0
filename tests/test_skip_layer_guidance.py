"""SD3.5's skip-layer guidance against diffusers: MMDiT ``skip_layers`` (scanned and unrolled) against
``SD3Transformer2DModel(skip_layers=...)``, the step rule and the guided velocity of every sampler, and the pipeline
against ``StableDiffusion3Pipeline(skip_guidance_layers=...)``."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from helpers import (
    SD3_TRANSFORMER,
    float64_copy,
    perturb_torch_module,
    rel_err,
    t64,
    tiny_sd3_pipeline,
    tiny_sd35_transformer_config,
    torch_float64,
)

from marble_jax import pipeline, sampling
from marble_jax.models.convert import load_mmdit

# float32 parity against diffusers run in float64 (tests/test_mmdit.py's and tests/test_pipeline.py's tolerance):
# a skipped block only removes float32 operations, so the errors stay those of the full model.
TOL = 1e-5

# MMDiT-X blocks 0-2, plain blocks 3-4, the context-pre-only block 5: scanned groups (0, 3), (3, 5) and (5, 6).
CONFIG = dict(tiny_sd35_transformer_config(num_layers=6), dual_attention_layers=(0, 1, 2))
# skip_layers -> number of scans in the scanned build (runs of >= 2 equal blocks left after the cut)
SKIPS = {
    (): 2,  # [0, 1, 2], [3, 4]
    (1,): 1,  # cut inside a group: [0], [2] (plain calls), [3, 4]
    (0,): 2,  # [1, 2], [3, 4]
    (3, 4): 1,  # a whole group: [0, 1, 2]
    (2, 3): 1,  # across a group boundary: [0, 1], [4]
    (5,): 2,  # the context-pre-only last block
}


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    """``(torch model, {scan_blocks: apply_fn}, params)`` of the tiny 6-block model (every weight perturbed)."""
    directory = tmp_path_factory.mktemp("mmdit6")
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIG).eval()
    perturb_torch_module(model)
    model.save_pretrained(directory)
    fns = {scan: load_mmdit(directory, scan_blocks=scan)[0] for scan in (False, True)}
    return model, fns, load_mmdit(directory)[1]


def make_inputs(seed: int = 0) -> tuple[np.ndarray, ...]:
    """``latents [2, 8, 6, C]``, ``timestep [2]`` (1000 t), ``context [2, 5, D]``, ``pooled [2, P]``."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((2, 8, 6, CONFIG["in_channels"])).astype(np.float32),
        (1000 * rng.uniform(size=2)).astype(np.float32),
        rng.standard_normal((2, 5, CONFIG["joint_attention_dim"])).astype(np.float32),
        rng.standard_normal((2, CONFIG["pooled_projection_dim"])).astype(np.float32),
    )


def torch_reference(model, inputs, skip_layers) -> np.ndarray:
    """diffusers' velocity with ``skip_layers`` in float64 (NHWC in and out)."""
    latents, timestep, context, pooled = (t64(x) for x in inputs)
    with torch.no_grad(), torch_float64():
        out = float64_copy(model)(hidden_states=latents.permute(0, 3, 1, 2), encoder_hidden_states=context,
                                  pooled_projections=pooled, timestep=timestep, skip_layers=list(skip_layers)).sample  # fmt: skip
    return out.permute(0, 2, 3, 1).numpy()


def test_mmdit_skip_layers_match_diffusers(transformer):
    """Measured (float32 vs float64): 8.2e-7 - 1.4e-6 over the skip sets, scanned equal to unrolled; 1e-5 leaves 7x."""
    model, fns, params = transformer
    inputs = make_inputs()
    full = torch_reference(model, inputs, ())
    errors = {}
    for skip, scans in SKIPS.items():
        ref = torch_reference(model, inputs, skip)
        if skip:  # the reference does skip: the velocity moves by O(1)
            assert rel_err(ref, full) > 1e-2, skip
        for scan, apply_fn in fns.items():
            jaxpr = str(jax.make_jaxpr(lambda p, *a: apply_fn(p, *a, skip_layers=skip))(params, *inputs))  # noqa: B023
            assert len(re.findall(r"\bscan\[", jaxpr)) == (scans if scan else 0), (skip, scan)
            ours = jax.jit(apply_fn, static_argnames="skip_layers")(params, *inputs, skip_layers=skip)
            errors[skip, scan] = rel_err(ours, ref)
    print("skip_layers (skip, scanned) vs float64: " + ", ".join(f"{k}: {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL


@pytest.mark.parametrize("bad", [6, -1, 2.0, "1"])
def test_mmdit_skip_layer_out_of_range_is_named(transformer, bad):
    _, fns, params = transformer
    with pytest.raises(ValueError, match=rf"skip layer {re.escape(repr(bad))} is not a block index in \[0, 6\)"):
        jax.eval_shape(lambda p, *a: fns[True](p, *a, skip_layers=(0, bad)), params, *make_inputs())


# ---------------------------------------------------------------- the step rule and the guided velocity


@pytest.mark.parametrize(
    "steps, start, stop, expected",
    [(10, 0.1, 0.4, [2, 3]), (10, 0.01, 0.2, [1]), (28, 0.01, 0.2, [1, 2, 3, 4, 5]), (40, 0.01, 0.2, list(range(1, 8))),
     (4, 0.0, 1.0, [1, 2, 3]), (3, 0.5, 0.6, [])],
)  # fmt: skip
def test_skip_layer_steps_follow_diffusers_rule(steps, start, stop, expected):
    """diffusers: ``i > num_inference_steps * start and i < num_inference_steps * stop``, strict at both ends."""
    mask = sampling.skip_layer_guidance_steps(steps, start, stop)
    assert mask.dtype == bool and mask.shape == (steps,)
    assert np.flatnonzero(mask).tolist() == expected
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        sampling.skip_layer_guidance_steps(0, start, stop)


B, H, W, C, COND = 2, 4, 4, 3, 3


def toy_models():
    """Two fixed random conditional velocity models ``(x [N,H,W,C], t [N], cond [N, COND]) -> v`` (the "full" and the
    "skip-layer" one), and ``x_T``, ``cond``, ``uncond``."""
    rng = np.random.default_rng(0)
    w = [rng.normal(size=s).astype(np.float32) for s in [(C, C), (COND, C), (C, C), (COND, C)]]

    def model(x, t, c):
        return jnp.tanh(x @ w[0] + t[:, None, None, None] + (c @ w[1])[:, None, None, :]) - 0.5 * x

    def skipped(x, t, c):
        return jnp.tanh(x @ w[2] - t[:, None, None, None] + (c @ w[3])[:, None, None, :]) - 0.5 * x

    x_T = rng.normal(size=(B, H, W, C)).astype(np.float32)
    cond, uncond = rng.normal(size=(B, COND)).astype(np.float32), np.zeros((B, COND), np.float32)
    return model, skipped, jnp.asarray(x_T), jnp.asarray(cond), jnp.asarray(uncond)


def test_guided_velocity_with_skip_layers_is_diffusers_formula():
    model, skipped, x, cond, uncond = toy_models()
    t = jnp.full((B,), 0.7)
    velocity_fn = sampling.guided_velocity(model, cond, uncond, 4.5, skip_layer_fn=skipped, skip_layer_scale=2.8)
    v_uncond, v_cond = model(x, t, uncond), model(x, t, cond)
    cfg = v_uncond + 4.5 * (v_cond - v_uncond)
    expected = cfg + (v_cond - skipped(x, t, cond)) * 2.8
    np.testing.assert_allclose(velocity_fn(x, t, True), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(velocity_fn(x, t, False), cfg, rtol=1e-6, atol=1e-6)
    traced = jax.jit(velocity_fn)
    np.testing.assert_array_equal(traced(x, t, jnp.bool_(True)), jax.jit(lambda x, t: velocity_fn(x, t, True))(x, t))
    np.testing.assert_array_equal(traced(x, t, jnp.bool_(False)), jax.jit(lambda x, t: velocity_fn(x, t, False))(x, t))
    with pytest.raises(ValueError, match="skip-layer flag"):
        velocity_fn(x, t)
    with pytest.raises(ValueError, match="skip-layer flag"):
        sampling.guided_velocity(model, cond, uncond, 4.5)(x, t, True)
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        sampling.guided_velocity(model, cond, uncond, 1.0, skip_layer_fn=skipped)


@pytest.mark.parametrize("method", sampling.METHODS)
def test_every_sampler_applies_it_at_the_flagged_steps(method):
    """``sample(..., skip_layer_steps=mask)`` against a velocity that applies skip-layer guidance where ``t`` is one of
    the flagged steps' sigmas (the step i of every method is evaluated at ``sigmas[i]``)."""
    model, skipped, x_T, cond, uncond = toy_models()
    sigmas = sampling.sigma_schedule(10, shift=3.0)
    mask = sampling.skip_layer_guidance_steps(10, 0.1, 0.4)
    flagged = sigmas[:-1][mask]
    guided = sampling.guided_velocity(model, cond, uncond, 4.5, skip_layer_fn=skipped, skip_layer_scale=2.8)
    plain = sampling.guided_velocity(model, cond, uncond, 4.5)

    def by_sigma(x, t):
        v = plain(x, t)
        return jnp.where(jnp.isin(t[0], flagged), v + (model(x, t, cond) - skipped(x, t, cond)) * 2.8, v)

    key = jax.random.key(3)
    ours = jax.jit(lambda m: sampling.sample(guided, x_T, sigmas, method=method, key=key, skip_layer_steps=m).latents)(mask)
    ref = jax.jit(lambda: sampling.sample(by_sigma, x_T, sigmas, method=method, key=key).latents)()
    without = sampling.sample(plain, x_T, sigmas, method=method, key=key).latents
    err = rel_err(ours, ref)
    print(f"{method}: flagged steps vs by-sigma reference {err:.1e}; without skip-layer guidance {rel_err(without, ref):.1e}")
    assert err < 1e-6 and rel_err(without, ref) > 1e-2
    with pytest.raises(ValueError, match=r"skip_layer_steps must have shape \[10\].*\(9,\)"):
        sampling.sample(guided, x_T, sigmas, method=method, key=key, skip_layer_steps=mask[:-1])


# ---------------------------------------------------------------- the pipeline against diffusers'

PROMPTS = ["a red cat", "A dog, 3 cats!"]
T5_LENGTH = 12
STEPS = 10
SLG = dict(skip_guidance_layers=[1, 2], skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.1,
           skip_layer_guidance_stop=0.4)  # fmt: skip
SLG_STEPS = [2, 3]  # 10 * 0.1 < i < 10 * 0.4


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """``(torch pipeline in float64, our pipeline)``: the tiny SD3.5 pipeline with a 4-block MMDiT-X transformer
    (attn2 in blocks 0-1, plain block 2, the context-pre-only block 3), so that skipping the middle blocks [1, 2]
    leaves blocks on both sides, as SD3.5-M's [7, 8, 9]."""
    path = tmp_path_factory.mktemp("slg") / "snapshot"
    ref_pipe = tiny_sd3_pipeline(with_t5=True)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**dict(SD3_TRANSFORMER, num_layers=4, dual_attention_layers=(0, 1))).eval()
    perturb_torch_module(transformer, seed=1)
    ref_pipe.register_modules(transformer=transformer)
    ref_pipe.save_pretrained(path)
    return ref_pipe.to(torch.float64), pipeline.from_pretrained(path)


def test_pipeline_matches_diffusers_skip_layer_guidance(pipelines):
    """Latents after 10 guided steps (2 with skip-layer guidance) and images, float32 vs diffusers in float64, within
    tests/test_pipeline.py's 1e-5. Measured 2.8e-7 (latents) and 4.7e-7 (images): >= 21x; skip-layer guidance moves
    the latents by 3.5e-2 here."""
    ref_pipe, pipe = pipelines
    x_T = jax.random.normal(jax.random.key(0), pipe.latent_shape(len(PROMPTS)), jnp.float32)
    calls, final = [], {}
    forward = ref_pipe.transformer.forward

    def recording_forward(*args, skip_layers=None, **kwargs):
        calls.append(skip_layers)
        return forward(*args, skip_layers=skip_layers, **kwargs)

    def keep_latents(_, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    def run_diffusers(**slg):
        calls.clear()
        with torch.no_grad(), torch_float64():
            images = ref_pipe(PROMPTS, latents=t64(np.array(x_T)).permute(0, 3, 1, 2), num_inference_steps=STEPS,
                              guidance_scale=4.5, max_sequence_length=T5_LENGTH, output_type="np",
                              callback_on_step_end=keep_latents, **slg).images  # fmt: skip
        return final["latents"].permute(0, 2, 3, 1).numpy(), images

    ref_pipe.transformer.forward = recording_forward
    try:
        ref_latents, ref_images = run_diffusers(**SLG)
        skip_calls = [i for i in range(len(calls)) if calls[i] is not None]
        slg_steps = [i - 1 - sum(c is not None for c in calls[:i]) for i in skip_calls]  # the step of each extra call
        assert slg_steps == SLG_STEPS and all(calls[i] == [1, 2] for i in skip_calls)
        plain_latents, _ = run_diffusers()
    finally:
        ref_pipe.transformer.forward = forward
    assert np.flatnonzero(sampling.skip_layer_guidance_steps(STEPS, 0.1, 0.4)).tolist() == slg_steps

    context, pooled = pipe.encode(PROMPTS, max_sequence_length=T5_LENGTH)
    negative = pipe.encode([""] * len(PROMPTS), max_sequence_length=T5_LENGTH)
    latents = pipe.generate_latents(context, pooled, x_T, negative=negative, num_steps=STEPS, guidance=4.5, **SLG)
    images = pipe.decode_float(latents)
    errors = rel_err(latents, ref_latents), rel_err(images, ref_images)
    effect = rel_err(plain_latents, ref_latents)
    print(f"skip-layer guidance, latents, images vs float64: {errors[0]:.2e}, {errors[1]:.2e} (SLG moves latents {effect:.2e})")
    assert effect > 1e-2  # the guidance matters here
    assert errors[0] < TOL and errors[1] < TOL

    # without CFG it is off (as in diffusers); __call__ passes the arguments through
    no_cfg = dict(num_steps=STEPS, guidance=1.0)
    assert np.array_equal(
        pipe.generate_latents(context, pooled, x_T, **no_cfg, **SLG), pipe.generate_latents(context, pooled, x_T, **no_cfg)
    )
    key = jax.random.key(7)
    drawn = jax.random.normal(key, x_T.shape, jnp.float32)
    expected = pipe.decode(pipe.generate_latents(context, pooled, drawn, negative=negative, num_steps=STEPS, **SLG))
    assert np.array_equal(pipe(PROMPTS, key, num_steps=STEPS, max_sequence_length=T5_LENGTH, **SLG), expected)
    with pytest.raises(ValueError, match=r"skip layer 4 is not a block index in \[0, 4\)"):
        pipe.generate_latents(context, pooled, x_T, negative=negative, num_steps=STEPS, skip_guidance_layers=[4],
                              skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.4)  # fmt: skip
