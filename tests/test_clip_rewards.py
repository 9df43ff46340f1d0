"""Parity of the CLIP-based rewards with their PyTorch references, on tiny random models saved to tmp_path.

* PickScore / CLIPScore: transformers ``CLIPModel`` + ``CLIPImageProcessorPil`` + ``CLIPTokenizer`` (padding to
  the longest prompt, as Flow-GRPO calls them), the score formulas on the model's outputs. CLIP-H-like models use
  GELU, CLIP-L-like QuickGELU.
* Aesthetic: a torch ``nn.Sequential`` MLP shaped like LAION's (linear layers and dropouts) on transformers'
  normalised image embeddings.
* HPSv2: end to end against OpenCLIP's own ``open_clip.model.CLIP`` (``encode_image`` / ``encode_text`` with
  ``normalize=True``), fed PIL-resized-and-padded pixels (HPSv2's ``ResizeMaxSize``) and OpenCLIP-style token ids
  (zero padding after the end-of-text token).

Our preprocessing equals PIL's pixel for pixel (tests/test_image_preprocess.py), so the end-to-end scores are held to
the same relative error as the towers fed identical pixels: 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY_CLIP_PROCESSOR,
    TINY_CLIP_VOCAB_SIZE,
    real_looking_images,
    rel_err,
    save_clip_processor,
    save_tiny_aesthetic_mlp,
    save_tiny_clip,
    save_tiny_openclip,
)
from PIL import Image
from transformers import CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from marble_jax.models.convert import load_clip_model
from marble_jax.models.weights import WeightError
from marble_jax.rewards import clip_scores
from marble_jax.rewards.image_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TOL = 1e-5
PROMPTS = ["a red cat", "dog", "a cat and a dog on a red rug", "red", "the dog is red and the cat is not"]
IMAGES = real_looking_images(len(PROMPTS), 60, 45, seed=3)  # portrait: the shortest-edge resize and crop both act


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{"clip_l": (dir, torch model), "pick": (dir, torch model, processor dir)}``: an OpenAI-CLIP-L-like model
    (QuickGELU, logit scale ln 100, integer sizes in its processor file) and a PickScore-like CLIP-H (GELU, its
    processor and tokenizer in a separate directory with the dict-format sizes)."""
    root = tmp_path_factory.mktemp("clip_rewards")
    clip_l = save_tiny_clip(root / "clip_l", seed=0, processor=dict(size=36, crop_size=32))
    pick = save_tiny_clip(root / "pick", seed=1, hidden_act="gelu", logit_scale=4.2)
    save_clip_processor(root / "clip_h", dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}))
    return {"clip_l": (root / "clip_l", clip_l), "pick": (root / "pick", pick, root / "clip_h")}


def _reference(model, processor_dir, images=IMAGES, prompts=PROMPTS):
    """transformers' outputs for the processor + tokenizer of ``processor_dir`` (prompts padded to the longest)."""
    pixels = CLIPImageProcessorPil.from_pretrained(processor_dir)(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(processor_dir)(
        prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    return out, pixels.numpy().transpose(0, 2, 3, 1), tokens.input_ids.numpy()


def test_towers_on_the_same_inputs(models):
    directory, model = models["clip_l"]
    out, pixels, ids = _reference(model, directory)
    ours = load_clip_model(directory)
    image = clip_scores.embed_images(ours.vision[0], ours.vision[1], pixels)
    text = clip_scores.embed_texts(ours.text[0], ours.text[1], ids)
    assert rel_err(image, out.image_embeds) < TOL  # CLIPModel's outputs are the normalised embeddings
    assert rel_err(text, out.text_embeds) < TOL
    assert rel_err(np.exp(ours.logit_scale) * np.sum(np.asarray(image) * np.asarray(text), -1), out.logits_per_image.diag()) < TOL


def test_clipscore(models):
    directory, model = models["clip_l"]
    ours = clip_scores.clipscore(path=str(directory), batch_size=2)(IMAGES, PROMPTS, [None] * len(PROMPTS))
    ref = _reference(model, directory)[0].logits_per_image.diag() / 100
    assert ours.shape == (len(PROMPTS),) and ours.dtype == np.float32
    assert rel_err(ours, ref) < TOL


def test_pickscore(models):
    directory, model, processor_dir = models["pick"]
    reward = clip_scores.pickscore(path=str(directory), processor_path=str(processor_dir), batch_size=32)
    ours = reward(IMAGES, PROMPTS, [None] * len(PROMPTS))
    out = _reference(model, processor_dir)[0]
    ref = model.logit_scale.exp() * torch.sum(out.image_embeds * out.text_embeds, -1) / 26
    assert rel_err(ours, ref.detach()) < TOL
    assert rel_err(reward(IMAGES[:2], PROMPTS[:2], [None, None]), ref[:2].detach()) < TOL  # another batch shape
    assert reward(IMAGES[:0], [], []).shape == (0,)


def test_aesthetic(models, tmp_path):
    directory, model = models["clip_l"]
    mlp = save_tiny_aesthetic_mlp(tmp_path / "mlp.pth", seed=2)
    ours = clip_scores.aesthetic(path=str(tmp_path / "mlp.pth"), clip_path=str(directory), batch_size=4)(
        IMAGES, PROMPTS, [None] * len(PROMPTS)
    )
    with torch.no_grad():
        ref = mlp.layers(_reference(model, directory)[0].image_embeds).squeeze(1)
    assert rel_err(ours, ref) < TOL

    save_tiny_aesthetic_mlp(tmp_path / "wide.pth", dims=(20, 24, 12, 8, 4, 1))
    with pytest.raises(WeightError, match=r"takes 20-d embeddings.*gives 16-d"):
        clip_scores.aesthetic(path=str(tmp_path / "wide.pth"), clip_path=str(directory))
    broken = {**mlp.state_dict(), "layers.4.weight": torch.zeros(8, 5)}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightError, match=r"layers\.2\.weight \(12, 24\) does not feed layers\.4\.weight \(8, 5\)"):
        clip_scores.load_aesthetic_mlp(tmp_path / "broken.pth")


def test_hpsv2_matches_openclip(models, tmp_path):
    model = save_tiny_openclip(
        tmp_path / "hps.pt",
        32,
        vision=dict(width=64, layers=1, head_width=64, mlp_ratio=2.0, patch_size=32, image_size=224),
        text=dict(context_length=77, vocab_size=TINY_CLIP_VOCAB_SIZE, width=64, heads=1, layers=1, mlp_ratio=2.0),
        seed=3,
    )
    tokenizer_dir = models["clip_l"][0]
    images = real_looking_images(len(PROMPTS), 200, 300, seed=4)  # landscape: resized to 149 x 224, padded top / bottom
    ours = clip_scores.hpsv2(path=str(tmp_path / "hps.pt"), tokenizer_path=str(tokenizer_dir), batch_size=3)(
        images, PROMPTS, [None] * len(PROMPTS)
    )

    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
    pixels = []
    for img in images:  # HPSv2's ResizeMaxSize on a PIL image, ToTensor, Normalize
        h, w = img.shape[:2]
        nh, nw = round(h * 224 / max(h, w)), round(w * 224 / max(h, w))
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), np.float32) / 255
        ph, pw = 224 - nh, 224 - nw
        padded = np.pad(resized, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        pixels.append(((padded - mean) / std).transpose(2, 0, 1))
    ids = np.zeros((len(PROMPTS), 77), np.int64)  # OpenCLIP's tokenizer layout: start, tokens, end, zeros
    for row, tokens in enumerate(CLIPTokenizer.from_pretrained(tokenizer_dir)(PROMPTS)["input_ids"]):
        ids[row, : len(tokens)] = tokens
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(np.stack(pixels)), normalize=True)
        text = model.encode_text(torch.from_numpy(ids), normalize=True)
    assert rel_err(ours, torch.sum(image * text, -1)) < TOL


def test_missing_paths(models, tmp_path):
    clip_l, pick = str(models["clip_l"][0]), str(models["pick"][0])
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "preprocessor_config.json").write_text(json.dumps({**TINY_CLIP_PROCESSOR, "size": 36, "crop_size": 32}))
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).symlink_to(models["clip_l"][0] / name)
    cases = [
        (
            clip_scores.pickscore,
            dict(path=str(tmp_path / "none")),
            r"pickscore: path directory '.*none'.*yuvalkirstain/PickScore_v1",
        ),
        (
            clip_scores.pickscore,
            dict(path=pick, processor_path="nobody/nothing"),
            r"pickscore: processor_path directory 'nobody/nothing'.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        ),
        (
            clip_scores.clipscore,
            dict(path="nobody/nothing"),
            r"clipscore: path directory 'nobody/nothing'.*openai/clip-vit-large",
        ),
        (
            clip_scores.clipscore,
            dict(path=pick),
            r"clipscore: path directory '.*pick' has no preprocessor_config\.json.*openai/clip",
        ),
        (
            clip_scores.clipscore,
            dict(path=str(no_tokenizer)),
            r"clipscore: path directory '.*no_tokenizer' has no tokenizer.*openai",
        ),
        (
            clip_scores.aesthetic,
            dict(path=str(tmp_path / "x.pth")),
            r"aesthetic: path checkpoint file '.*x\.pth'.*sac\+logos\+ava1",
        ),
        (
            clip_scores.hpsv2,
            dict(path="nobody/nothing/HPS.pt"),
            r"hpsv2: path checkpoint file 'nobody/nothing/HPS\.pt'.*xswu/HPSv2",
        ),
    ]
    for factory, options, message in cases:
        with pytest.raises(FileNotFoundError, match=message):
            factory(**options)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        clip_scores.clipscore(path=clip_l, batch_size=0)


def test_batches_are_sharded_over_devices():
    """With 3 devices: 7 rows in batches of 4 -> 2 batches of 6 (rounded up to the device count, the last padded),
    each split along the batch axis over the 3 devices, the parameters replicated."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from marble_jax.rewards.clip_scores import ShardedBatches
        traced, shardings = [], []
        def score(params, images, ids):
            traced.append(images.shape)
            jax.debug.inspect_array_sharding(images, callback=shardings.append)
            return params["w"] * images.astype(np.float32).sum((1, 2, 3)) + ids[:, 0]
        run = ShardedBatches(score, {"w": np.float32(2.0)}, batch_size=4)
        images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3)).astype(np.uint8)
        ids = np.arange(7 * 3, dtype=np.int32).reshape(7, 3)
        out = run(images, ids)
        np.testing.assert_allclose(out, 2 * images.astype(np.float32).sum((1, 2, 3)) + ids[:, 0])
        assert out.shape == (7,) and traced == [(6, 5, 4, 3)], traced
        assert shardings[0].shard_shape((6, 5, 4, 3)) == (2, 5, 4, 3), shardings[0]
        assert run.params["w"].sharding.is_fully_replicated and len(run.params["w"].sharding.device_set) == 3
        print("ok")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
