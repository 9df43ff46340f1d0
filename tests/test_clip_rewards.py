"""Parity of the CLIP-based rewards with their PyTorch references, on tiny random models saved to tmp_path.

* PickScore / CLIPScore (its ``preprocess="pil"`` option): transformers ``CLIPModel`` + ``CLIPImageProcessorPil``
  + ``CLIPTokenizer`` (padding to the longest prompt, as Flow-GRPO calls them), the score formulas on the model's
  outputs. CLIP-H-like models use GELU, CLIP-L-like QuickGELU.
* Aesthetic: a torch ``nn.Sequential`` MLP shaped like LAION's (linear layers and dropouts) on transformers'
  normalised image embeddings.

The rewards' defaults against the public scorers' own preprocessing (CLIPScore's and HPSv2's torchvision transforms
on float images; PickScore's and the aesthetic's with Pillow 10.4's pass order) and HPSv2 end to end against
OpenCLIP: tests/test_scorer_preprocessing.py.

The references run in float64 (a float64 copy of each torch model, the processor's resized and cropped uint8 pixels
normalised in float64), so what is measured is our float32 rounding. Our preprocessing equals PIL's pixel for pixel
before normalisation (tests/test_image_preprocess.py), so the end-to-end scores are held to the bounds of the towers
fed identical pixels: the unit embeddings to 1e-5 (measured <= 3.7e-7, in L2 distance 4.4e-7), the scores, multiples of
their cosines, to :func:`helpers.cosine_bound`: 2e-5 absolute on each cosine. The random models' largest cosines are
0.07 - 0.24, sums that cancel: relative to them the scores are 5.9e-7 - 3.4e-6 off, the bounds 8.4e-5 - 2.7e-4.
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
    cosine_bound,
    float64_copy,
    real_looking_images,
    rel_err,
    save_clip_processor,
    save_tiny_aesthetic_mlp,
    save_tiny_clip,
    t64,
    torch_float64,
)
from transformers import CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from marble_jax.models.convert import load_clip_model
from marble_jax.models.weights import WeightError
from marble_jax.rewards import clip_scores

TOL = 1e-5  # float32 parity of the embeddings against float64 (see above)
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
    """transformers' outputs, in float64, for the processor + tokenizer of ``processor_dir`` (prompts padded to the
    longest): the processor's resized and cropped pixels (uint8: exact) rescaled and normalised in float64, into a
    float64 copy of ``model``. Returns the outputs, those pixels (NHWC, float64) and the token ids."""
    processor = CLIPImageProcessorPil.from_pretrained(processor_dir)
    raw = processor(images=list(images), do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    mean, std = (np.asarray(v, np.float64)[:, None, None] for v in (processor.image_mean, processor.image_std))
    pixels = (raw * processor.rescale_factor - mean) / std
    tokens = CLIPTokenizer.from_pretrained(processor_dir)(
        prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad(), torch_float64():
        out = float64_copy(model)(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=t64(pixels))
    assert out.logits_per_image.dtype == torch.float64
    return out, pixels.transpose(0, 2, 3, 1), tokens.input_ids.numpy()


def test_towers_on_the_same_inputs(models):
    directory, model = models["clip_l"]
    out, pixels, ids = _reference(model, directory)
    ours = load_clip_model(directory)
    image = clip_scores.embed_images(ours.vision[0], ours.vision[1], pixels.astype(np.float32))
    text = clip_scores.embed_texts(ours.text[0], ours.text[1], ids)
    errors = {
        "image": rel_err(image, out.image_embeds),  # CLIPModel's outputs are the normalised embeddings
        "text": rel_err(text, out.text_embeds),
    }
    # cosine_bound's premise: each unit embedding within L2 distance TOL
    pairs = ((image, out.image_embeds), (text, out.text_embeds))
    errors["l2"] = max(float(np.linalg.norm(np.asarray(x) - ref.numpy(), axis=-1).max()) for x, ref in pairs)
    logits = np.exp(ours.logit_scale) * np.sum(np.asarray(image) * np.asarray(text), -1)
    errors["logits"] = rel_err(logits, out.logits_per_image.diag())
    bound = cosine_bound(TOL, torch.sum(out.image_embeds * out.text_embeds, -1))
    print(f"vs float64: {errors}; logits bound {bound:.1e}")
    assert max(errors["image"], errors["text"], errors["l2"]) < TOL, errors
    assert errors["logits"] < bound, (errors, bound)


def test_clipscore(models):
    directory, model = models["clip_l"]
    ours = clip_scores.clipscore(path=str(directory), preprocess="pil", batch_size=2)(IMAGES, PROMPTS, [None] * len(PROMPTS))
    out = _reference(model, directory)[0]
    ref = out.logits_per_image.diag() / 100
    assert ours.shape == (len(PROMPTS),) and ours.dtype == np.float32
    err, bound = rel_err(ours, ref), cosine_bound(TOL, torch.sum(out.image_embeds * out.text_embeds, -1))
    print(f"clipscore vs float64: {err:.2e}, bound {bound:.1e}")
    assert err < bound


def test_pickscore(models):
    directory, model, processor_dir = models["pick"]
    reward = clip_scores.pickscore(path=str(directory), processor_path=str(processor_dir), batch_size=32)
    ours = reward(IMAGES, PROMPTS, [None] * len(PROMPTS))
    out = _reference(model, processor_dir)[0]
    cosines = torch.sum(out.image_embeds * out.text_embeds, -1)
    ref = model.logit_scale.detach().double().exp() * cosines / 26
    err, bound = rel_err(ours, ref), cosine_bound(TOL, cosines)
    print(f"pickscore vs float64: {err:.2e}, bound {bound:.1e}")
    assert err < bound
    assert rel_err(reward(IMAGES[:2], PROMPTS[:2], [None, None]), ref[:2]) < cosine_bound(TOL, cosines[:2])  # another batch shape
    assert reward(IMAGES[:0], [], []).shape == (0,)


def test_aesthetic(models, tmp_path):
    directory, model = models["clip_l"]
    mlp = save_tiny_aesthetic_mlp(tmp_path / "mlp.pth", seed=2)
    ours = clip_scores.aesthetic(path=str(tmp_path / "mlp.pth"), clip_path=str(directory), batch_size=4)(
        IMAGES, PROMPTS, [None] * len(PROMPTS)
    )
    with torch.no_grad():
        ref = float64_copy(mlp).layers(_reference(model, directory)[0].image_embeds).squeeze(1)
    err = rel_err(ours, ref)
    print(f"aesthetic vs float64: {err:.2e}")
    assert err < TOL

    save_tiny_aesthetic_mlp(tmp_path / "wide.pth", dims=(20, 24, 12, 8, 4, 1))
    with pytest.raises(WeightError, match=r"takes 20-d embeddings.*gives 16-d"):
        clip_scores.aesthetic(path=str(tmp_path / "wide.pth"), clip_path=str(directory))
    broken = {**mlp.state_dict(), "layers.4.weight": torch.zeros(8, 5)}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightError, match=r"layers\.2\.weight \(12, 24\) does not feed layers\.4\.weight \(8, 5\)"):
        clip_scores.load_aesthetic_mlp(tmp_path / "broken.pth")


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
