"""PyTorch users' LoRA adapters into ours (:func:`marble_jax.models.lora.load_lora`): peft ``save_pretrained``
directories, the DiffusionNFT / Flow-GRPO checkpoint layout, diffusers' file; parity of the velocity with diffusers +
peft; errors naming file and key; ``config.lora.init_from`` in the trainer's setup.

The adapters are made by the installed peft on diffusers' ``SD3Transformer2DModel`` (the tiny SD3.5-shaped one of
tests/test_lora.py) with random ``lora_B`` (peft starts it at zero), saved the way each tool saves them.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tiny_config
import torch
from diffusers import SD3Transformer2DModel
from helpers import rel_err, save_tiny_sd35_transformer, save_tiny_world
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_lora import PEFT_TARGETS, TINY, TOL, lora_apply, make_inputs, random_lora, torch_velocity

from marble_jax import experiment, train
from marble_jax.models import lora
from marble_jax.models.convert import load_mmdit

# TOL (tests/test_lora.py): float32 velocity vs diffusers + peft in float64 fed our timestep sinusoid, measured <= 1.5e-7
# there for r 4 / alpha 12; 1e-5 leaves >= 60x. An adapter read with the wrong scale is off by > 1e-2 (asserted below).


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(torch model directory, base params)`` of the tiny perturbed SD3.5-shaped transformer."""
    d = tmp_path_factory.mktemp("mmdit")
    save_tiny_sd35_transformer(d, num_layers=2)
    return d, load_mmdit(d)[1]


def peft_model(d, adapters=("default",), seed: int = 3, **options):
    """A ``PeftModel`` over the torch transformer of ``d`` (DiffusionNFT's targets, ``options`` for its LoraConfig),
    with the named adapters (``add_adapter`` after the first, as DiffusionNFT adds ``old``) and random ``lora_B``."""
    config = LoraConfig(init_lora_weights="gaussian", target_modules=PEFT_TARGETS, **{"r": 4, "lora_alpha": 8, **options})
    model = get_peft_model(SD3Transformer2DModel.from_pretrained(d).eval(), config)
    for name in adapters[1:]:
        model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.set_adapter("default")
    return model.eval()


def velocity_error(tiny, model, params, spec, seed: int = 2) -> float:
    """Relative error of our LoRA'd velocity against diffusers + peft's active adapter (float64)."""
    _, base = tiny
    inputs = make_inputs(seed=seed)
    ours = jax.jit(lora_apply(TINY, spec))(base, params, *inputs)
    err = rel_err(ours, torch_velocity(model.base_model.model, inputs))
    print(f"velocity vs diffusers + peft in float64 (scale {spec.scale}): {err:.2e}")
    return err


def test_peft_save_pretrained(tiny, tmp_path):
    """peft's own directory (``base_model.model.`` keys, r 4 / alpha 8: scale 2) gives diffusers + peft's velocity."""
    d, base = tiny
    model = peft_model(d)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS}
    assert all(k.startswith("base_model.model.transformer_blocks.") for k in load_file(tmp_path / lora.ADAPTER_WEIGHTS))
    params, spec = lora.load_lora(tmp_path, base_params=base)
    assert (spec.rank, spec.alpha, spec.scale) == (4, 8.0, 2.0)
    assert set(lora.target_shapes(base, spec)) == set(params) and len(params) == 2 * 8 - 1
    assert velocity_error(tiny, model, params, spec) < TOL
    assert velocity_error(tiny, model, params, lora.LoRASpec(4, 4.0, spec.targets)) > 1e-2  # alpha = r: visibly off
    for name in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):  # either file names the directory
        jax.tree.map(np.testing.assert_array_equal, lora.load_lora(tmp_path / name)[0], params)


def test_rslora_and_uniform_patterns(tiny, tmp_path):
    """``use_rslora`` (scale alpha / sqrt(r) = 4) folds into spec.alpha; patterns that come to one value are read."""
    d, base = tiny
    model = peft_model(d, use_rslora=True)
    model.save_pretrained(tmp_path / "rs")
    params, spec = lora.load_lora(tmp_path / "rs", base_params=base)
    assert (spec.rank, spec.alpha, spec.scale) == (4, 16.0, 4.0)
    assert velocity_error(tiny, model, params, spec) < TOL

    model = peft_model(d, alpha_pattern={"attn.to_q": 8}, rank_pattern={"to_k": 4})
    model.save_pretrained(tmp_path / "patterns")
    assert lora.load_lora(tmp_path / "patterns")[1].scale == 2.0


def test_diffusion_nft_and_flow_grpo_checkpoints(tiny, tmp_path):
    """Their ``save_ckpt``: ``save_pretrained`` of the PeftModel into ``<save_dir>/checkpoints/checkpoint-N/lora``;
    DiffusionNFT's model also holds the ``old`` adapter (saved to ``lora/old``) and writes ``optimizer.pt`` beside."""
    d, base = tiny
    nft = tmp_path / "nft"
    for step, seed in ((3, 5), (12, 6)):  # 12 > 3 numerically, not as text
        model = peft_model(d, adapters=("default", "old"), seed=seed)
        root = nft / "checkpoints" / f"checkpoint-{step}"
        model.save_pretrained(root / "lora")
        torch.save({"state": {}}, root / "optimizer.pt")
    assert (nft / "checkpoints/checkpoint-12/lora/old" / lora.ADAPTER_CONFIG).is_file()
    params, spec = lora.load_lora(nft / "checkpoints/checkpoint-12", base_params=base)
    assert (spec.rank, spec.alpha) == (4, 8.0)
    assert velocity_error(tiny, model, params, spec) < TOL
    jax.tree.map(np.testing.assert_array_equal, lora.load_lora(nft)[0], params)  # the save_dir: its latest checkpoint
    model.set_adapter("old")
    old, _ = lora.load_lora(nft / "checkpoints/checkpoint-12", adapter="old")
    assert velocity_error(tiny, model, old, spec) < TOL
    with pytest.raises(FileNotFoundError, match=r"'ema'.*\['default', 'old'\]"):
        lora.load_lora(nft / "checkpoints/checkpoint-12", adapter="ema")

    grpo = tmp_path / "grpo" / "checkpoints" / "checkpoint-60"  # Flow-GRPO: one adapter
    model = peft_model(d, seed=7)
    model.save_pretrained(grpo / "lora")
    params, spec = lora.load_lora(grpo)
    assert velocity_error(tiny, model, params, spec) < TOL


def test_diffusers_files_and_roundtrip(tiny, tmp_path):
    """Our export (``transformer.`` keys and metadata) and diffusers' ``save_lora_adapter`` (unprefixed keys and
    metadata) read back; a bf16 file is read too."""
    d, base = tiny
    spec = lora.LoRASpec(rank=4, alpha=8.0)
    params = random_lora(base, spec)
    path = lora.export_peft(params, spec, tmp_path / "ours")
    back, got = lora.load_lora(path, base_params=base)
    assert (got.rank, got.alpha) == (4, 8.0) and set(lora.target_shapes(base, got)) == set(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)

    model = peft_model(d)
    model.base_model.model.save_lora_adapter(tmp_path / "adapter", adapter_name="default")
    assert not any(k.startswith("transformer.") for k in load_file(tmp_path / "adapter" / lora.WEIGHT_NAME))
    back, got = lora.load_lora(tmp_path / "adapter", base_params=base)
    assert (got.rank, got.alpha) == (4, 8.0)
    assert velocity_error(tiny, model, back, got) < TOL

    model.save_pretrained(tmp_path / "bf16")
    f = tmp_path / "bf16" / lora.ADAPTER_WEIGHTS
    save_file({k: v.bfloat16() for k, v in load_file(f).items()}, f)
    half, _ = lora.load_lora(tmp_path / "bf16")
    assert max(rel_err(half[n][k], back[n][k]) for n in back for k in "ab") < 2**-8


def write_peft_dir(directory, tensors: dict, **config) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.tensor(v) for k, v in tensors.items()}, directory / lora.ADAPTER_WEIGHTS)
    (directory / lora.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "target_modules": PEFT_TARGETS, **config}))


def test_errors_name_file_and_key(tiny, tmp_path):
    d, base = tiny
    q = "base_model.model.transformer_blocks.0.attn.to_q"
    a, b = np.ones((4, 16), np.float32), np.ones((16, 4), np.float32)
    good = {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b}

    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        lora.load_lora(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        lora.load_lora(tmp_path / "nowhere")
    write_peft_dir(tmp_path / "noconfig", good, r=4, lora_alpha=8)
    (tmp_path / "noconfig" / lora.ADAPTER_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=f"noconfig/{lora.ADAPTER_CONFIG} is missing"):
        lora.load_lora(tmp_path / "noconfig")

    def renamed(old: str, new: str) -> dict:
        return {k.replace(old, new): v for k, v in good.items()}

    wide_a = {**good, f"{q}.lora_A.weight": np.ones((4, 20), np.float32)}
    cases = {  # name: (tensors, config, pattern of the message)
        "half": ({f"{q}.lora_A.weight": a}, {}, f"{q}.lora_A.weight has no {q}.lora_B.weight"),
        "rank": (good, {"r": 8}, rf"{q}.lora_A.weight \(4, 16\).*rank 8 expected"),
        "not lora": ({**good, f"{q}.lora_magnitude_vector": a[0]}, {}, f"{q}.lora_magnitude_vector .* not a LoRA"),
        "not a target": (renamed("to_q", "to_z"), {}, "to_z.*not one of.*target_modules"),
        "stray": (renamed("blocks.0.", "blocks.7."), {}, "blocks.7.attn.to_q.lora_A.weight: the model has no linear"),
        "in size": (wide_a, {}, r"to_q.lora_A.weight has shape \(4, 20\).*needs \(4, 16\)"),
        "dora": (good, {"use_dora": True}, "use_dora"),
        "pissa": (good, {"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        "patterns": ({**good, **renamed("to_q", "to_k")}, {"alpha_pattern": {"to_k": 4}}, r"different \(rank, alpha\)"),
    }
    for name, (tensors, config, pattern) in cases.items():
        where = tmp_path / name.replace(" ", "_")
        write_peft_dir(where, tensors, **{"r": 4, "lora_alpha": 8, **config})
        with pytest.raises(ValueError, match=pattern) as info:
            lora.load_lora(where, base_params=base)
        assert str(where) in str(info.value), (name, str(info.value))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def test_init_from(world, tmp_path):
    """``config.lora.init_from``: the trainer's first parameters are the adapter; a mismatched config is refused
    at setup time, naming the config key."""
    config = tiny_config.get_config(str(world))
    setup = experiment.build_setup(config)
    params = random_lora(setup.base_params, setup.lora_spec)
    lora.export_peft(params, setup.lora_spec, tmp_path / "adapter")
    config.lora.init_from = str(tmp_path / "adapter")
    setup = experiment.build_setup(config)
    jax.tree.map(np.testing.assert_array_equal, setup.init_trainable(setup.base_params, jax.random.key(0)), params)
    state = train.fresh_state(setup, config, train.make_optimizer(config))
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.ema_params), (params, params))

    for key, value in (("rank", 8), ("alpha", 4.0), ("targets", r"transformer_blocks\.\d+\.attn\.(to_q|to_k)")):
        bad = tiny_config.get_config(str(world))
        bad.lora.init_from = str(tmp_path / "adapter")
        bad.lora[key] = value
        with pytest.raises(ValueError, match=f"config.lora.{key} = .*adapter"):
            experiment.build_setup(bad)
