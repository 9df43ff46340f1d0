"""LoRA on the tiny SD3.5-shaped MMDiT: identity at init, exact disable switch, activation path vs
merged weights (values and gradients), targets vs peft, and the diffusers / peft file both ways."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from helpers import (
    float64_copy,
    rel_err,
    save_tiny_sd35_transformer,
    t64,
    tiny_sd35_transformer_config,
    torch_float64,
    use_our_timestep_sinusoid,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import check_target_module_exists

from marble_jax.models import lora, mmdit
from marble_jax.models.convert import load_mmdit
from marble_jax.models.sd3_configs import SD35_MEDIUM_TRANSFORMER

# MMDiT-X attn2 in block 0, the context-pre-only block 1 (no to_add_out), RMSNorm q/k.
TINY = tiny_sd35_transformer_config(num_layers=2)
# DiffusionNFT's peft target_modules (suffix match: MMDiT-X's attn2 is not a target).
PEFT_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
SPEC = lora.LoRASpec(rank=4, alpha=12.0)  # scale 3: a file read with alpha = r would be visibly off
# float32 parity of the velocity, against diffusers + peft in float64 fed our float32 timestep sinusoid (see
# torch_velocity): measured <= 1.5e-7; 1e-5 leaves >= 60x. Ours against ours (the activation path vs merged weights),
# both float32: <= 1.2e-6 (gradients), two float32 errors of the size tests/test_mmdit.py measures; >= 8x.
TOL = 1e-5


def lora_apply(config: dict, spec: lora.LoRASpec, remat: bool = False):
    return lora.with_lora(mmdit.build(config, remat=remat), spec)


def random_lora(base, spec: lora.LoRASpec, seed: int = 1) -> lora.LoRAParams:
    """A trained-looking LoRA: Gaussian ``a`` and ``b`` (``b`` non-zero)."""
    fresh = lora.init_lora(base, spec, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(fresh))
    b = {name: 0.3 * jax.random.normal(k, ab["b"].shape) for k, (name, ab) in zip(keys, fresh.items(), strict=True)}
    return {name: {"a": ab["a"], "b": b[name]} for name, ab in fresh.items()}


def make_inputs(batch: int = 2, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, 8, 6, TINY["in_channels"])).astype(np.float32),
        (1000 * rng.uniform(size=batch)).astype(np.float32),
        rng.standard_normal((batch, 5, TINY["joint_attention_dim"])).astype(np.float32),
        rng.standard_normal((batch, TINY["pooled_projection_dim"])).astype(np.float32),
    )


def torch_velocity(model, inputs) -> np.ndarray:
    """The velocity of a float64 copy of ``model`` (LoRA layers included) in float64 (helpers.torch_float64), fed our
    float32 timestep sinusoid: its own float32 error (bounded in tests/test_mmdit.py) moves these LoRA'd velocities by
    up to 2e-6 in any float32 implementation (torch's: 1.7e-6), ten times the rest of our rounding."""
    latents, timestep, context, pooled = (t64(x) for x in inputs)
    model = float64_copy(model)
    use_our_timestep_sinusoid(model)
    with torch.no_grad(), torch_float64():
        out = model(
            hidden_states=latents.permute(0, 3, 1, 2),
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=timestep,
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model directory, apply_fn, base params)`` of the perturbed tiny torch model, saved and loaded."""
    d = tmp_path_factory.mktemp("mmdit")
    save_tiny_sd35_transformer(d, num_layers=2)
    apply_fn, base = load_mmdit(d)
    return d, apply_fn, base


@pytest.fixture(scope="module")
def jitted(tiny):
    """``(lora apply, base apply)``, jitted once for the module (compiling dominates the test time)."""
    return jax.jit(lora_apply(TINY, SPEC)), jax.jit(tiny[1])


def test_targets_are_peft_targets(tiny):
    """Our regex picks exactly the linears peft targets for DiffusionNFT's names, with their shapes."""
    d, _, base = tiny
    ours = lora.target_shapes(base, SPEC)
    model = SD3Transformer2DModel.from_pretrained(d)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=12, target_modules=PEFT_TARGETS), model)
    peft = {name: (m.in_features, m.out_features) for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert ours == peft
    assert len(ours) == 2 * 8 - 1  # the last block has no to_add_out; attn2 of block 0 is not a target


def test_targets_sd35_medium():
    """SD3.5-M (abstract): 24 x 8 - 1 = 191 targets, as peft on the torch model (meta device); the
    regex with ``attn2?`` adds MMDiT-X's 4 projections in blocks 0..12: 243."""
    _, abstract = mmdit.from_config(SD35_MEDIUM_TRANSFORMER, key=None)
    ours = lora.target_shapes(abstract, lora.LoRASpec())
    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    config = LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=PEFT_TARGETS)
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert ours == {name: shape for name, shape in linears.items() if check_target_module_exists(config, name)}
    assert len(ours) == 24 * 8 - 1 == 191
    assert set(ours.values()) == {(1536, 1536)}
    with_attn2 = lora.LoRASpec(targets=lora.JOINT_ATTENTION.replace(r"\.attn\.", r"\.attn2?\."))
    assert len(lora.target_shapes(abstract, with_attn2)) == 191 + 13 * 4


def test_fresh_lora_is_the_base_model(tiny, jitted):
    _, _, base = tiny
    apply, base_apply = jitted
    fresh = lora.init_lora(base, SPEC, jax.random.key(0))
    a = np.concatenate([np.ravel(ab["a"]) for ab in fresh.values()])
    assert np.isclose(a.std(), 1 / SPEC.rank, rtol=0.05)  # peft's "gaussian" init
    assert all(ab["a"].shape[1] == ab["b"].shape[0] == SPEC.rank and not np.any(ab["b"]) for ab in fresh.values())
    inputs = make_inputs()
    np.testing.assert_array_equal(apply(base, fresh, *inputs), base_apply(base, *inputs))


def test_disabled_is_the_base_model_exactly(tiny, jitted):
    _, _, base = tiny
    apply, base_apply = jitted
    inputs = make_inputs()
    ref = base_apply(base, *inputs)
    np.testing.assert_array_equal(apply(base, None, *inputs), ref)
    assert rel_err(apply(base, random_lora(base, SPEC), *inputs), ref) > 0.1


def test_lora_matches_merged_weights(tiny, jitted):
    """``x W + s (x A) B`` (ours) vs ``x (W + s A B)`` (:func:`lora.merge`)."""
    _, _, base = tiny
    apply, base_apply = jitted
    params = random_lora(base, SPEC)
    inputs = make_inputs()
    assert rel_err(apply(base, params, *inputs), base_apply(lora.merge(base, params, SPEC), *inputs)) < TOL


def test_gradients_match_merged_weights(tiny):
    """LoRA gradients through the remat'd model vs the gradients of the merged formulation; the
    base gets none."""
    _, apply_fn, base = tiny
    apply = lora_apply(TINY, SPEC, remat=True)
    params = random_lora(base, SPEC)
    inputs = make_inputs()
    cot = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8, 6, TINY["out_channels"])), jnp.float32)
    g_base, g_lora = jax.jit(jax.grad(lambda b, p: jnp.vdot(apply(b, p, *inputs), cot), argnums=(0, 1)))(base, params)
    g_ref = jax.jit(jax.grad(lambda p: jnp.vdot(apply_fn(lora.merge(base, p, SPEC), *inputs), cot)))(params)
    assert all(not np.any(g) for g in jax.tree.leaves(g_base))
    assert jax.tree.structure(g_lora) == jax.tree.structure(params)
    for name in params:
        for k in ("a", "b"):
            assert rel_err(g_lora[name][k], g_ref[name][k]) < TOL, (name, k)


def test_export_loads_into_diffusers(tiny, jitted, tmp_path):
    """Our file, loaded by diffusers + peft into the torch model, gives our velocity (fp32)."""
    d, _, base = tiny
    params = random_lora(base, SPEC)
    path = lora.export_peft(params, SPEC, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    inputs = make_inputs()
    ours = jitted[0](base, params, *inputs)

    model = SD3Transformer2DModel.from_pretrained(d).eval()
    # load_lora_adapter looks for the safetensors file only when told to (the pipeline's loader does by default)
    model.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", use_safetensors=True)
    config = next(iter(model.peft_config.values()))
    assert (config.r, config.lora_alpha) == (SPEC.rank, SPEC.alpha)
    err = rel_err(ours, torch_velocity(model, inputs))
    print(f"velocity vs float64: {err:.2e}")
    assert err < TOL

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(d).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert rel_err(ours, torch_velocity(pipe.transformer, inputs)) < TOL


def test_import_roundtrip(tiny, tmp_path):
    _, _, base = tiny
    params = random_lora(base, SPEC)
    lora.export_peft(params, SPEC, tmp_path)
    back, spec = lora.import_peft(tmp_path)
    assert (spec.rank, spec.alpha, spec.scale) == (SPEC.rank, SPEC.alpha, 3.0)
    assert lora.target_shapes(base, spec) == lora.target_shapes(base, SPEC)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_import_of_a_peft_lora_trained_in_torch(tiny, jitted, tmp_path):
    """A LoRA made by peft in torch and saved by diffusers (its own metadata) runs the same in ours."""
    d, _, base = tiny
    model = SD3Transformer2DModel.from_pretrained(d).eval()
    config = LoraConfig(r=4, lora_alpha=12, init_lora_weights="gaussian", target_modules=PEFT_TARGETS)
    inject_adapter_in_model(config, model, adapter_name="default")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts it at zero
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="default"),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    params, spec = lora.import_peft(tmp_path)
    assert (spec.rank, spec.alpha) == (4, 12.0) and len(params) == 2 * 8 - 1
    inputs = make_inputs(seed=2)
    assert spec.scale == SPEC.scale
    ours = jitted[0](base, params, *inputs)
    err = rel_err(ours, torch_velocity(model, inputs))
    print(f"velocity vs float64: {err:.2e}")
    assert err < TOL


def test_import_errors(tmp_path):
    from safetensors.numpy import save_file

    save_file({"transformer.blocks.0.lora_A.weight": np.zeros((4, 8), np.float32)}, str(tmp_path / lora.WEIGHT_NAME))
    with pytest.raises(ValueError, match="transformer.blocks.0"):
        lora.import_peft(tmp_path)
    save_file({"transformer.blocks.0.alpha": np.zeros((), np.float32)}, str(tmp_path / lora.WEIGHT_NAME))
    with pytest.raises(ValueError, match="not a LoRA"):
        lora.import_peft(tmp_path)
