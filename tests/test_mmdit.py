"""MMDiT (SD3 / SD3.5 transformer) against diffusers' SD3Transformer2DModel: forward, gradients, loading, errors."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed
from helpers import (
    F32_EPS,
    float64_copy,
    perturb_torch_module,
    rel_err,
    save_tiny_sd35_transformer,
    t64,
    tiny_sd35_transformer_config,
    torch_float64,
    use_our_timestep_sinusoid,
)
from safetensors.numpy import load_file, save_file

from marble_jax.models import embeddings, mmdit
from marble_jax.models.convert import load_mmdit
from marble_jax.models.functional import random_params
from marble_jax.models.sd3_configs import SD3_MEDIUM_TRANSFORMER, SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER
from marble_jax.models.weights import WeightError, plan_by_path

# SD3.5-shaped: MMDiT-X attn2 in block 0, a plain block 1, the context-pre-only block 2, RMSNorm
# q/k; the 12 x 12 position table is cropped to the (smaller) latent grid.
TINY = tiny_sd35_transformer_config(num_layers=3)
# float32 parity, against diffusers run in float64 (so the error is our float32 rounding alone): the velocity is
# 2.8e-7 - 6.9e-7 off (torch's own float32 forward 2.6e-7 - 6.6e-7), every gradient <= 1.2e-6; 1e-5 leaves >= 8x.
TOL = 1e-5


@pytest.fixture(scope="module")
def torch_model_dir(tmp_path_factory):
    """``(torch model, directory)``: the tiny perturbed model saved with save_pretrained."""
    d = tmp_path_factory.mktemp("mmdit")
    return save_tiny_sd35_transformer(d, num_layers=3), d


@pytest.fixture(scope="module")
def loaded(torch_model_dir):
    return load_mmdit(torch_model_dir[1])


def make_inputs(batch: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``latents [B,h,w,C]``, ``timestep [B]`` (1000 t), ``context [B,L,D]``, ``pooled [B,P]``."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, h, w, TINY["in_channels"])).astype(np.float32)
    timestep = (1000 * rng.uniform(size=batch)).astype(np.float32)
    context = rng.standard_normal((batch, 5, TINY["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32)
    return latents, timestep, context, pooled


def torch_forward(model, latents, timestep, context, pooled) -> torch.Tensor:
    """NCHW torch call on NHWC inputs; returns NHWC."""
    out = model(
        hidden_states=latents.permute(0, 3, 1, 2),
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=timestep,
    ).sample
    return out.permute(0, 2, 3, 1)


def torch_reference(model, inputs) -> np.ndarray:
    """diffusers' velocity in float64 (a float64 copy of ``model``, its float32 casts float64 too: the timestep
    sinusoid, RMSNorm): it rounds at 2^-53, so a comparison with it measures our float32 rounding."""
    with torch.no_grad(), torch_float64():
        return torch_forward(float64_copy(model), *(t64(x) for x in inputs)).numpy()


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)], ids=["square", "non_square"])
def test_velocity_matches_diffusers(torch_model_dir, loaded, hw):
    model, _ = torch_model_dir
    apply_fn, params = loaded
    inputs = make_inputs(2, *hw)
    ours = jax.jit(apply_fn)(params, *inputs)
    ref = torch_reference(model, inputs)
    assert ours.shape == ref.shape == (2, *hw, TINY["out_channels"])
    err = rel_err(ours, ref)
    print(f"velocity vs float64: {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_velocity_other_qk_norms(qk_norm, tmp_path):
    """SD3-Medium-style (no q/k norm, no attn2) and LayerNorm q/k variants, two blocks."""
    torch.manual_seed(1)
    model = SD3Transformer2DModel(**dict(TINY, num_layers=2, dual_attention_layers=(), qk_norm=qk_norm)).eval()
    perturb_torch_module(model, seed=1)
    model.save_pretrained(tmp_path)
    apply_fn, params = load_mmdit(tmp_path)
    inputs = make_inputs(1, 8, 6, seed=3)
    err = rel_err(jax.jit(apply_fn)(params, *inputs), torch_reference(model, inputs))
    print(f"velocity vs float64: {err:.2e}")
    assert err < TOL


def test_timestep_sinusoid_matches_diffusers(torch_model_dir):
    """Ours against diffusers' ``time_proj`` (SD3: cos half first, f_k = 1e4^(-k/128)) evaluated in float64.

    ``cos(t f)`` has absolute condition number ``t f``: in float32 the frequency is ``exp`` of a rounded exponent
    (<= 2|ln f| u + 4u relative, u = F32_EPS / 2), the product rounds once more (u) and sin / cos after range
    reduction add ~2u absolute, so the error is <= t f (2|ln f| + 5) u + 2u <= 5 t u + 2u (the maximum is at
    f = 1) < 3 t_max F32_EPS = 3.6e-4. Measured 4.1e-5 (torch's float32 sinusoid: the same). A frequency 1e-6 off
    (relative) moves cos(1000 f) by 1e-3; a wrong frequency rule (k / 127) or order is O(1) off.
    """
    time_proj = torch_model_dir[0].time_text_embed.time_proj
    t = np.float32([0.0, 0.5, 1.0, 37.25, 250.3, 639.47, 999.0, 1000.0])
    with torch.no_grad(), torch_float64():
        ref = time_proj(t64(t)).numpy()
    ours = embeddings.timestep_embedding(jnp.asarray(t), 256)
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    print(f"sinusoid abs error vs float64: {err:.2e}")
    assert err < 3 * t.max() * F32_EPS


def test_position_table_crop_matches_diffusers():
    embed = PatchEmbed(height=16, width=16, patch_size=2, in_channels=4, embed_dim=24, pos_embed_max_size=13)
    ref = embed.cropped_pos_embed(2 * 5, 2 * 8)[0].numpy()  # a 5 x 8 grid, odd margins
    ours = mmdit.pos_embed_crop(5, 8, 24, max_size=13, base_size=8)
    # both round a float64 table (values in [-1, 1]) to float32: at most one float32 ulp apart (measured: equal)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_EPS)


def test_param_paths_read_like_diffusers_keys(loaded):
    _, params = loaded
    block = params["transformer_blocks"][1]
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert block["attn"][name]["kernel"].shape == (16, 16)
    assert block["attn"]["to_out"][0]["kernel"].shape == (16, 16)
    assert "to_add_out" not in params["transformer_blocks"][2]["attn"]  # context-pre-only last block
    assert "attn2" in params["transformer_blocks"][0] and "attn2" not in block
    plan = plan_by_path(params)
    assert plan[("transformer_blocks", 1, "attn", "to_out", 0, "kernel")][0] == "transformer_blocks.1.attn.to_out.0.weight"
    assert plan[("transformer_blocks", 0, "ff", "net", 0, "proj", "kernel")][0] == "transformer_blocks.0.ff.net.0.proj.weight"


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_gradients_match_torch_autograd(torch_model_dir, loaded, remat):
    """d loss / d (params, latents, context, pooled) for ``loss = sum(v * weights)``, per tensor, against torch
    autograd in float64 fed our float32 timestep sinusoid (:func:`helpers.use_our_timestep_sinusoid`): the
    sinusoid's own float32 error (its test above) would otherwise put several 1e-6 (2e-5 in
    ``timestep_embedder.linear_1.weight``, its outer product) on the parameter gradients of any float32
    implementation, torch's included. Measured: <= 1.2e-6 for every tensor, against TOL = 1e-5.
    """
    model, _ = torch_model_dir
    params = loaded[1]
    apply_fn = mmdit.from_config(TINY, key=None, remat=remat)[0] if remat else loaded[0]
    inputs = make_inputs(2, 6, 8, seed=1)
    weights = np.random.default_rng(2).standard_normal((2, 6, 8, TINY["out_channels"])).astype(np.float32)

    def loss(p, latents, context, pooled):
        return jnp.sum(apply_fn(p, latents, inputs[1], context, pooled) * weights)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, inputs[0], inputs[2], inputs[3])

    model = float64_copy(model)
    use_our_timestep_sinusoid(model)
    t_in = [t64(x).requires_grad_(i != 1) for i, x in enumerate(inputs)]
    with torch_float64():
        (torch_forward(model, *t_in) * t64(weights)).sum().backward()
    for ours, ref in zip(grads[1:], (t_in[0], t_in[2], t_in[3]), strict=True):
        assert rel_err(ours, ref.grad.numpy()) < TOL

    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    errors = {}
    for path, (key, transform) in plan_by_path(params).items():
        ours = grads[0]
        for k in path:
            ours = ours[k]
        errors[key] = rel_err(ours, transform(torch_grads[key]))
    assert sorted(errors) == sorted(torch_grads)
    worst = max(errors, key=errors.get)
    print(f"worst parameter gradient vs float64: {worst} {errors[worst]:.2e}")
    assert errors[worst] < TOL, (worst, errors[worst])


def test_loads_pipeline_layout(torch_model_dir, loaded, tmp_path):
    _, d = torch_model_dir
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    shutil.copytree(d, tmp_path / "transformer")
    _, params = load_mmdit(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_mmdit(tmp_path / "nowhere")


def test_missing_safetensors_file(torch_model_dir, tmp_path):
    shutil.copy(torch_model_dir[1] / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\*\.safetensors file"):
        load_mmdit(tmp_path)


def _corrupted_copy(src, dst, edit) -> None:
    shutil.copy(src / "config.json", dst)
    state = load_file(src / "diffusion_pytorch_model.safetensors")
    edit(state)
    save_file(state, dst / "diffusion_pytorch_model.safetensors")


def test_renamed_weight_key(torch_model_dir, tmp_path):
    key = "transformer_blocks.1.attn.add_q_proj.weight"
    _corrupted_copy(torch_model_dir[1], tmp_path, lambda s: s.update({key.replace("add_q", "add_Q"): s.pop(key)}))
    with pytest.raises(WeightError) as err:
        load_mmdit(tmp_path)
    msg = str(err.value)
    assert f"missing keys: ['{key}']" in msg
    assert "unexpected keys: ['transformer_blocks.1.attn.add_Q_proj.weight']" in msg
    assert str(tmp_path) in msg


def test_wrong_shaped_tensor(torch_model_dir, tmp_path):
    key = "transformer_blocks.0.attn2.to_k.weight"
    _corrupted_copy(torch_model_dir[1], tmp_path, lambda s: s.update({key: np.zeros((16, 12), np.float32)}))
    with pytest.raises(WeightError, match=rf"weight '{key}' has shape \(16, 12\); expected \(16, 16\)"):
        load_mmdit(tmp_path)


def test_bad_latent_size(loaded):
    apply_fn, params = loaded
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        apply_fn(params, *make_inputs(1, 7, 8))
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size 12"):
        apply_fn(params, *make_inputs(1, 26, 8))


@pytest.mark.parametrize(
    "config",
    [SD3_MEDIUM_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, SD35_LARGE_TRANSFORMER],
    ids=["sd3-medium", "sd3.5-medium", "sd3.5-large"],
)
def test_real_configs_build_abstractly(config):
    _, shapes = mmdit.from_config(config, key=None)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        ref = sum(p.numel() for p in SD3Transformer2DModel(**config).parameters())
    assert ours == ref
    assert len(shapes["transformer_blocks"]) == config["num_layers"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(qk_norm="l2"), "qk_norm 'l2' is not supported"),
        (dict(pos_embed_max_size=None), "pos_embed_max_size must be set"),
        (dict(caption_projection_dim=24), "caption_projection_dim 24 must equal"),
    ],
)
def test_unsupported_config(change, message):
    with pytest.raises(ValueError, match=message):
        mmdit.from_config(dict(TINY, **change), key=None)


def test_abstract_build_is_eval_shape_of_random_build():
    config = dict(TINY, qk_norm="layer_norm")
    traced = jax.eval_shape(lambda k: mmdit.from_config(config, key=k)[1], jax.random.key(0))
    _, abstract = mmdit.from_config(config, key=None)
    assert jax.tree.structure(traced) == jax.tree.structure(abstract)
    assert jax.tree.leaves(traced) == jax.tree.leaves(abstract)
    _, drawn = mmdit.from_config(config, key=jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), drawn) == jax.tree.map(lambda x: (x.shape, x.dtype), abstract)


def test_remat_checkpoints_each_block(loaded):
    """remat=True puts one checkpoint per joint block in the traced gradient (its values: the gradient test)."""
    remat_fn, abstract = mmdit.from_config(TINY, key=None, remat=True)
    params = loaded[1]
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    inputs = make_inputs(1, 8, 8)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.mean(remat_fn(p, *inputs) ** 2)))(params)
    checkpoints = re.compile(r"\b(?:remat2?|checkpoint)\[")  # the primitive's name varies across JAX versions
    assert len(checkpoints.findall(str(jaxpr))) == TINY["num_layers"]
    plain = jax.make_jaxpr(jax.grad(lambda p: jnp.mean(loaded[0](p, *inputs) ** 2)))(params)
    assert not checkpoints.findall(str(plain))


def test_bf16_compute_stays_close(torch_model_dir, loaded):
    """bf16 compute over fp32 parameters: within bf16 rounding of the exact (float64) velocity; bf16-stored
    parameters load."""
    inputs = make_inputs(2, 8, 8)
    ref = torch_reference(torch_model_dir[0], inputs)
    bf16_fn, _ = mmdit.from_config(TINY, key=None, compute_dtype=jnp.bfloat16)
    out = jax.jit(bf16_fn)(loaded[1], *inputs)
    assert out.dtype == jnp.float32
    err = rel_err(out, ref)
    print(f"bf16 velocity vs float64: {err:.2e}")
    # bf16 keeps 8 mantissa bits: 2^-9 = 2e-3 relative rounding per operation. Measured 7.4e-3 here (~4 roundings'
    # worth), 6.8e-3 - 1.04e-2 over 6 input draws (bf16 errors move ~1.5x between CPUs: tests/test_vae.py);
    # 5e-2 (25 roundings) leaves >= 4.8x on every draw.
    assert err < 5e-2, err
    _, params16 = load_mmdit(torch_model_dir[1], dtype=jnp.bfloat16)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), params16, loaded[1])


@pytest.mark.parametrize("per_leaf", [False, True])
def test_random_params_draw_each_leaf_from_its_initialiser(per_leaf):
    """Both paths of ``random_params`` (one sliced draw; per-leaf draws, the accelerator's) give kernels N(0, 1/fan-in),
    embeddings N(0, 1/D), zero biases and unit scales, with distinct values in leaves of one shape. Sample standard
    deviations over n >= 2048 values have a relative standard error of 1/sqrt(2n) < 1.6%: the bound is 6 of them."""
    sds = jax.ShapeDtypeStruct
    abstract = {
        "a": {"kernel": sds((64, 32), jnp.float32), "bias": sds((32,), jnp.float32)},
        "b": {"kernel": sds((64, 32), jnp.float32), "scale": sds((32,), jnp.bfloat16)},
        "conv": {"kernel": sds((3, 3, 16, 64), jnp.bfloat16)},
        "table": {"embedding": sds((100, 24), jnp.float32)},
    }
    params = random_params(abstract, jax.random.key(3), per_leaf=per_leaf)
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    for leaf, fan in ((params["a"]["kernel"], 64), (params["b"]["kernel"], 64), (params["conv"]["kernel"], 144),
                      (params["table"]["embedding"], 24)):  # fmt: skip
        values = np.asarray(leaf, np.float64)
        assert abs(values.mean()) < 6 / np.sqrt(fan * values.size)
        assert abs(values.std() * np.sqrt(fan) - 1) < 6 / np.sqrt(2 * values.size)
    assert not np.allclose(params["a"]["kernel"], params["b"]["kernel"])
    assert np.all(np.asarray(params["a"]["bias"]) == 0) and np.all(np.asarray(params["b"]["scale"], np.float32) == 1)
