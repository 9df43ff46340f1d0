"""Parity of the CLIP vision tower and the full CLIPModel with transformers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from helpers import float64_copy, perturb_torch_module, rel_err, t64, torch_float64
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from marble_jax.models import clip
from marble_jax.models.weights import WeightError, read_config, read_safetensors

# float32 parity, against transformers run in float64 (helpers.float64_copy / torch_float64): our float32 rounding
# alone. Measured <= 2.2e-7 (the towers) and 7.5e-7 (the logits: cosines of at most 0.22 relative to unit embeddings,
# a cancelling sum that amplifies the embeddings' error ~4x); 1e-5 leaves >= 13x.
TOL = 1e-5

VISION = dict(
    hidden_size=24, intermediate_size=40, num_attention_heads=3, num_hidden_layers=2, projection_dim=12,
    image_size=16, patch_size=4, hidden_act="quick_gelu",
)  # fmt: skip
TEXT = dict(
    vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
    max_position_embeddings=12, hidden_act="gelu", eos_token_id=2, bos_token_id=1, pad_token_id=0,
)  # fmt: skip


def _save(model: torch.nn.Module, path, seed: int = 0) -> None:
    perturb_torch_module(model, seed=seed)
    model.eval().save_pretrained(path)


def _pixels(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_parity(tmp_path, act):
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**VISION, "hidden_act": act}))
    _save(model, tmp_path)
    apply_fn, params = clip.vision_from_torch_state(read_config(tmp_path), read_safetensors(tmp_path), source=str(tmp_path))
    pixels = _pixels(3, 16, 1)
    ours = jax.jit(apply_fn)(params, pixels)
    model = float64_copy(model)
    with torch.no_grad(), torch_float64():
        ref = model(t64(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
        pooled = model.vision_model(t64(pixels.transpose(0, 3, 1, 2))).pooler_output
    errors = {
        "image_embeds": rel_err(ours["image_embeds"], ref.image_embeds),
        "last": rel_err(ours["last_hidden_state"], ref.last_hidden_state),
        "penultimate": rel_err(ours["penultimate_hidden_state"], ref.hidden_states[-2]),
        "pooled": rel_err(ours["pooler_output"], pooled),
    }
    print("vs float64:", errors)
    assert max(errors.values()) < TOL, errors


def test_clip_model_parity(tmp_path):
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=10, logit_scale_init_value=1.7))
    _save(model, tmp_path, seed=3)
    m = clip.clip_from_torch_state(read_config(tmp_path), read_safetensors(tmp_path), source=str(tmp_path))
    assert abs(m.logit_scale - float(model.logit_scale.detach())) < 1e-6
    pixels = _pixels(4, 16, 2)
    ids = np.array([[1, 5, 6, 7, 2, 0], [1, 9, 2, 0, 0, 0], [1, 30, 31, 32, 33, 2], [1, 2, 0, 0, 0, 0], [1, 11, 12, 2, 0, 0]])
    text = m.text[0](m.text[1], ids)["text_embeds"]
    image = m.vision[0](m.vision[1], pixels)["image_embeds"]
    assert text.shape == (5, 10) and image.shape == (4, 10)
    ours = clip.clip_logits(text, image, m.logit_scale)
    model = float64_copy(model)
    with torch.no_grad(), torch_float64():
        ref = model(input_ids=torch.from_numpy(ids).long(), pixel_values=t64(pixels.transpose(0, 3, 1, 2)))
        ref_image = model.get_image_features(t64(pixels.transpose(0, 3, 1, 2))).pooler_output
    errors = {"logits": rel_err(ours, ref.logits_per_image), "image": rel_err(image, ref_image)}
    print("vs float64:", errors)
    assert max(errors.values()) < TOL, errors


def test_vision_errors(tmp_path):
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))
    _save(model, tmp_path)
    config, state = read_config(tmp_path), dict(read_safetensors(tmp_path))
    apply_fn, params = clip.vision_from_torch_state(config, state, source="ckpt")
    with pytest.raises(ValueError, match="16"):
        apply_fn(params, _pixels(1, 20, 0))
    del state["vision_model.embeddings.class_embedding"]
    with pytest.raises(WeightError, match="class_embedding"):
        clip.vision_from_torch_state(config, state, source="ckpt")
    with pytest.raises(WeightError, match="logit_scale"):
        clip.clip_from_torch_state(config, state, source="ckpt")
    apply_fn, params = clip.vision_from_config(VISION, key=jax.random.key(0))
    assert apply_fn(params, _pixels(2, 16, 0))["image_embeds"].shape == (2, 12)
