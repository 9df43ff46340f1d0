"""Parity of the OpenCLIP converter with OpenCLIP's own ``open_clip.model.CLIP`` and its model configs."""

from __future__ import annotations

import json
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from helpers import float64_copy, open_clip_model_module, rel_err, save_tiny_openclip, t64, torch_float64

from marble_jax.models import clip, openclip
from marble_jax.models.functional import path_leaves
from marble_jax.models.weights import WeightError

# float32 parity, against OpenCLIP run in float64 (helpers.float64_copy / torch_float64): our float32 rounding alone.
# Measured <= 5.3e-7 for the embeddings; 8.3e-7 (HPS cosines) and 1.8e-6 (logits) for their dot products: cosines of
# at most 0.14, sums of unit-vector products that cancel ~7x and amplify the embeddings' error as much. 1e-5 leaves
# >= 5.5x.
TOL = 1e-5
EMBED = 48
VISION = dict(width=128, layers=2, head_width=64, mlp_ratio=3.0, patch_size=8, image_size=32)  # 2 heads, mlp 384
TEXT = dict(context_length=16, vocab_size=49408, width=128, heads=2, layers=2, mlp_ratio=2.0)  # EOT 49407 = max id
TEXT_SMALL = {**TEXT, "vocab_size": 100}
SOT, EOT = 49406, openclip.EOT_TOKEN_ID


@pytest.fixture(scope="module")
def oc() -> types.ModuleType:
    """OpenCLIP's real ``open_clip.model`` (imported without torchvision: :func:`helpers.open_clip_model_module`)."""
    return open_clip_model_module()


def _token_ids(rng: np.random.Generator) -> np.ndarray:
    """OpenCLIP tokenizer layout: start, tokens, end-of-text, zero padding (a full row ends in end-of-text)."""
    lengths = [3, 0, 14, 7]
    ids = np.zeros((len(lengths), TEXT["context_length"]), np.int64)
    for row, n in enumerate(lengths):
        ids[row, : n + 2] = [SOT, *rng.integers(1, SOT, n), EOT]
    return ids


@pytest.fixture(scope="module")
def converted(oc, tmp_path_factory):
    path = tmp_path_factory.mktemp("openclip") / "tiny_openclip.pt"
    model = save_tiny_openclip(path, EMBED, VISION, TEXT, seed=0, oc=oc)
    return model, path, openclip.load_openclip(path)


def test_encode_parity(converted):
    model, _, ours = converted
    model = float64_copy(model)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)  # normalised pixels, NHWC
    ids = _token_ids(rng)
    image = jax.jit(ours.vision[0])(ours.vision[1], pixels)["image_embeds"]
    text = jax.jit(ours.text[0])(ours.text[1], ids)["text_embeds"]
    with torch.no_grad(), torch_float64():
        ref_image = model.encode_image(t64(pixels.transpose(0, 3, 1, 2)))
        ref_text = model.encode_text(torch.from_numpy(ids))
        ref_logits, _ = model.get_logits(t64(pixels.transpose(0, 3, 1, 2)), torch.from_numpy(ids))
    assert ref_image.dtype == ref_text.dtype == ref_logits.dtype == torch.float64
    assert image.shape == text.shape == (4, EMBED)
    errors = {"image": rel_err(image, ref_image), "text": rel_err(text, ref_text)}
    img_n = image / np.linalg.norm(image, axis=-1, keepdims=True)
    txt_n = text / np.linalg.norm(text, axis=-1, keepdims=True)
    ref_hps = torch.diag(torch.nn.functional.normalize(ref_image, dim=-1) @ torch.nn.functional.normalize(ref_text, dim=-1).T)
    errors["hps"] = rel_err(np.sum(img_n * txt_n, axis=-1), ref_hps)
    errors["logits"] = rel_err(clip.clip_logits(text, image, ours.logit_scale), ref_logits)
    print("relative errors vs float64:", errors)
    assert max(errors.values()) < TOL, errors
    assert abs(ours.logit_scale - float(model.logit_scale.detach())) < 1e-6  # read, not computed: measured equal


def test_safetensors_and_named_config(converted, tmp_path):
    from safetensors.torch import save_file

    model, pt_path, ours = converted
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    again = openclip.load_openclip(path)
    leaves = [jax.tree.leaves((m.text[1], m.vision[1])) for m in (ours, again)]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightError, match=r"not an OpenCLIP ViT-B-32: embed_dim 48 \(from visual\.proj\), ViT-B-32 has 512; "):
        openclip.load_openclip(pt_path, model_name="ViT-B-32")
    with pytest.raises(ValueError, match="ViT-X-1"):
        openclip.load_openclip(pt_path, model_name="ViT-X-1")


def test_weight_errors(converted):
    model, _, _ = converted
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    bad = dict(state, **{"transformer.resblocks.1.attn.out_proj.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(WeightError, match=r"'transformer\.resblocks\.1\.attn\.out_proj\.weight' has shape \(128, 64\)"):
        openclip.openclip_from_state(bad, source="ckpt.pt")
    missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    with pytest.raises(WeightError, match=r"ckpt\.pt.*missing keys: \['visual\.ln_post\.bias'\]; unexpected keys: \[\]"):
        openclip.openclip_from_state(missing, source="ckpt.pt")
    extra = dict(state, **{"visual.extra": np.zeros(3, np.float32)})
    with pytest.raises(WeightError, match=r"unexpected keys: \['visual\.extra'\]"):
        openclip.openclip_from_state(extra, source="ckpt.pt")
    with pytest.raises(FileNotFoundError, match="nowhere/HPS_v2.1_compressed.pt"):
        openclip.load_openclip("/nowhere/HPS_v2.1_compressed.pt")


@pytest.mark.parametrize(
    ("vision", "text", "shows"),
    [
        (dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2), {}, r"'visual\.attn_pool\..*attentional"),
        (dict(layers=(1, 1, 1, 1), width=64, image_size=64), {}, r"'visual\.bn1\.weight' shows a ModifiedResNet"),
        (dict(ls_init_value=0.1), {}, r"'visual\.transformer\.resblocks\.0\.ls_1\.gamma' shows layer scale"),
        (dict(qk_norm=True), {}, r"'visual\.transformer\.resblocks\.0\.attn\.ln_q\.weight' shows a custom attention block"),
        (dict(scale_fc=True), {}, r"'visual\.transformer\.resblocks\.0\.mlp\.ln\.weight' shows a custom attention block"),
        ({}, dict(proj_bias=True), r"'text_projection\.weight' shows a linear text projection with bias"),
    ],
)
def test_unsupported_variants(oc, vision, text, shows):
    """OpenCLIP's own variants (tiny, random) are refused naming the key that shows them."""
    model = oc.CLIP(EMBED, vision_cfg=oc.CLIPVisionCfg(**{**VISION, **vision}), text_cfg=oc.CLIPTextCfg(**TEXT_SMALL, **text))
    with pytest.raises(ValueError, match=rf"variant.pt: unsupported OpenCLIP variant: key {shows}"):
        openclip.openclip_from_state({k: v.detach().numpy() for k, v in model.state_dict().items()}, source="variant.pt")


def test_timm_tower_refused():
    timm = {"visual.trunk.patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32), "logit_scale": np.float32(1)}
    with pytest.raises(ValueError, match=r"'visual\.trunk\.patch_embed\.proj\.weight' shows a timm image tower"):
        openclip.openclip_from_state(timm, source="siglip.pt")


def _openclip_config_json(oc, name: str) -> dict:
    return json.loads((Path(oc.__file__).parent / "model_configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(openclip.NAMED_CONFIGS))
def test_named_configs_match_openclip(oc, name):
    """Each named architecture is OpenCLIP's (heads and activation included), and its state dict (OpenCLIP's model
    built on the meta device: shapes only) is read as that architecture with or without the name."""
    spec = _openclip_config_json(oc, name)
    with torch.device("meta"):
        model = oc.CLIP(**spec)
    state = model.state_dict()
    cfg = openclip.NAMED_CONFIGS[name]
    assert cfg.vision_heads == model.visual.transformer.resblocks[0].attn.num_heads
    assert cfg.text_heads == model.transformer.resblocks[0].attn.num_heads
    assert cfg.quick_gelu == spec.get("quick_gelu", False)
    inferred = openclip.openclip_config(state, source=name)
    assert inferred == openclip.NAMED_CONFIGS[name.removesuffix("-quickgelu")]  # activation: not in a state dict
    assert openclip.openclip_config(state, source=name, model_name=name) == cfg


def test_hps_checkpoint_layout(oc):
    """Every weight of OpenCLIP's ViT-H-14 (HPSv2.1's architecture; built on the meta device: shapes only) lands
    in a leaf of the right shape, and every leaf is read."""
    name = "ViT-H-14"
    with torch.device("meta"):
        state = oc.CLIP(**_openclip_config_json(oc, name)).state_dict()
    *_, target = openclip.openclip_towers(openclip.openclip_config(state, source=name, model_name=name))
    plan = openclip.openclip_plan(target)
    assert {key for key, _ in plan.values()} == set(state) - {"logit_scale"}
    for path, leaf in path_leaves(target):
        key, transform = plan[path]
        assert transform(np.broadcast_to(np.float32(0), state[key].shape)).shape == leaf.shape, key
