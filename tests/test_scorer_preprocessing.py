"""Our rewards against the public scorers behind the papers' tables, their preprocessing ported to torch here.

The public scorers, read at NVlabs/DiffusionNFT@24af555 (``flow_grpo/{clip,pickscore,hpsv2,aesthetic}_scorer.py``,
fed by ``flow_grpo/rewards.py``) and in Flow-GRPO (yifan123/flow_grpo: the same files; its ``clip_scorer.py`` divides
by 30, as in its forks, e.g. zhtmike/flow_grpo@19d5169), with the versions their ``setup.py`` pins: torch 2.6,
torchvision 0.21, transformers 4.40, Pillow 10.4. Their trainers decode ``output_type="pt"``: float images in [0, 1].

* CLIPScore: float images straight in (``rewards.py:55-59``; numpy input ``torch.tensor(images, dtype=torch.uint8) /
  255.0``), ``T.Compose([T.Resize(shortest_edge), T.CenterCrop(crop), T.Normalize(mean, std)])`` built from the
  CLIP-L processor config (``clip_scorer.py:11-30``, applied at ``:42-47``), ``logits_per_image.diagonal() / 100``
  (``:56``; Flow-GRPO ``/ 30``).
* HPSv2.1: float images straight in (``rewards.py:70-74``), ``.to(float32)`` (``hpsv2_scorer.py:124``),
  ``ResizeMaxSize(224)`` (``:16-39``: bicubic, zero padding) and ``Normalize`` (``:42-82``); cosine of the
  normalised features (``:127-130``). HPSv2's own ``img_score.py`` (tgxs002/HPSv2, ``hpsv2/src/open_clip/transform.py
  :26-49, :141-157``) applies the same ``ResizeMaxSize`` to ``ToTensor()`` of a uint8 PIL image.
* PickScore: rounded to uint8 (``rewards.py:86-89``: ``(images * 255).round().clamp(0, 255)``), PIL images into
  transformers' ``CLIPImageProcessor`` of CLIP-ViT-H-14 (``pickscore_scorer.py:20-26``), ``exp(logit_scale) * cos /
  26`` (``:45-50``).
* Aesthetic: rounded to uint8 (``rewards.py:38-43``), a uint8 tensor into CLIP-L's ``CLIPProcessor``
  (``aesthetic_scorer.py:45-50``), the MLP on the unit-norm image embedding.

torchvision is not installed here; the ops those transforms run are ported from torchvision 0.21 below (file:line of
``torchvision/transforms/``), onto ``torch.nn.functional.interpolate(..., antialias=True)``. transformers 4.40's
``CLIPImageProcessor`` is ported with Pillow 10.4's pass order (``libImaging/Resample.c`` ``ImagingResampleInner``:
horizontal, then vertical; Pillow 13, installed here, can go vertical first).

Tolerances (the references run in float64 unless said otherwise; see tests/test_image_preprocess.py for the resize
alone): torchvision-path pixels within ``PIXEL_TOL`` = 1.5e-5 normalised (the resize's a-priori 3.2e-6 in [0, 1]
units for inputs in [0, 1], over the smallest std 0.261, plus the normalisation's 1.1e-6; measured <= 1.2e-6);
against the torch float32 pipeline the public scorer runs,
``PIXEL32_TOL`` = 1.5e-4 (torch's float32 resize is up to 1.4e-5 off exact in [0, 1] units: 5.4e-5 normalised).
PIL-path pixels: the uint8 pixels equal exactly, the normalised ones within :func:`helpers.normalise_bound`. Scores:
unit embeddings within 1e-5 (tests/test_clip_rewards.py), so :func:`helpers.cosine_bound`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    TINY_CLIP_VOCAB_SIZE,
    cosine_bound,
    float64_copy,
    normalise_bound,
    real_looking_images,
    rel_err,
    save_clip_processor,
    save_tiny_aesthetic_mlp,
    save_tiny_clip,
    save_tiny_openclip,
    t64,
    torch_float64,
)
from PIL import Image
from transformers import CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from marble_jax.rewards import clip_scores
from marble_jax.rewards.image_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ProcessorSpec, resize_max_and_pad

PIXEL_TOL = 1.5e-5
PIXEL32_TOL = 1.5e-4
TOL = 1e-5  # unit embeddings, as tests/test_clip_rewards.py
SIZES = [(37, 53), (53, 37), (512, 320), (320, 512), (512, 512), (227, 224), (300, 517), (700, 300), (100, 100)]
PROMPTS = ["a red cat", "dog", "a cat and a dog on a red rug", "red", "the dog is red and the cat is not"]


def float_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """float32 ``[n,H,W,3]`` in [0, 1] off the uint8 grid (a VAE's output before quantisation): real-looking images
    plus up to half a level of noise, clipped."""
    base = real_looking_images(n, height, width, seed=seed).astype(np.float32)
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, base.shape).astype(np.float32)
    return np.clip((base + noise) / 255, 0, 1).astype(np.float32)


# ---------------------------------------------------------------- torchvision 0.21, ported


def tv_resize(img: torch.Tensor, size: int | tuple[int, int], interpolation: str) -> torch.Tensor:
    """``F.resize(img, size, interpolation)`` of an NCHW tensor with torchvision 0.21's default ``antialias=True``:
    ``functional.py:468`` output size (``_compute_resized_output_size``, ``:353-385``: an int is the shortest edge,
    the long one ``int(size * long / short)``), ``:470-471`` the same size returns the image, then
    ``_functional_tensor.py:441-474``: cast to float32 unless float32 / float64 (``:462``), ``interpolate(...,
    align_corners=False, antialias=True)`` (``:467``), clamp only bicubic uint8 output (``:469-470``), cast back."""
    h, w = img.shape[-2:]
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        out = [new_long, new_short] if w <= h else [new_short, new_long]
    else:
        out = list(size)
    if [h, w] == out:
        return img
    dtype = img.dtype
    x = img if dtype in (torch.float32, torch.float64) else img.to(torch.float32)
    x = torch.nn.functional.interpolate(x, size=out, mode=interpolation, align_corners=False, antialias=True)
    if interpolation == "bicubic" and dtype == torch.uint8:
        x = x.clamp(0, 255)
    return x.to(dtype) if dtype.is_floating_point else torch.round(x).to(dtype)


def tv_center_crop(img: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """``F.center_crop`` (``functional.py:592-594``): offsets ``int(round((size - crop) / 2.0))``; the crop fits."""
    h, w = img.shape[-2:]
    assert crop[0] <= h and crop[1] <= w
    top, left = int(round((h - crop[0]) / 2.0)), int(round((w - crop[1]) / 2.0))
    return img[..., top : top + crop[0], left : left + crop[1]]


def tv_normalize(img: torch.Tensor, mean, std) -> torch.Tensor:
    """``F.normalize`` (``_functional_tensor.py:916-928``): mean / std as tensors of the image's dtype, ``(x - mean) /
    std``."""
    mean = torch.as_tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return (img - mean) / std


def to_tensor01(images: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """NCHW float tensor in [0, 1] the public scorers receive: float images as they are; uint8 ones as
    ``rewards.py:57-58`` (and ``ToTensor``) make them, ``uint8 / 255`` in float32. Then cast to ``dtype``."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x
    return x.to(dtype)


# ---------------------------------------------------------------- the public scorers' preprocessing, ported


def clipscore_pixels(images: np.ndarray, size: int, crop: int, mean, std, dtype=torch.float64) -> np.ndarray:
    """DiffusionNFT's ``ClipScorer._process`` (``clip_scorer.py:22-30, :42-47``): ``Resize(size)`` (bilinear),
    ``CenterCrop(crop)``, ``Normalize`` on the float tensor, in ``dtype``. NHWC out."""
    x = tv_normalize(tv_center_crop(tv_resize(to_tensor01(images, dtype), size, "bilinear"), (crop, crop)), mean, std)
    return x.numpy().transpose(0, 2, 3, 1)


def hpsv2_pixels(images: np.ndarray, size: int = 224, dtype=torch.float64) -> np.ndarray:
    """DiffusionNFT's ``HPSv2Scorer`` preprocessing (``hpsv2_scorer.py:16-39`` ``ResizeMaxSize`` with bicubic and
    ``F.pad(..., [pad_w // 2, pad_h // 2, rest, rest], fill=0)``, ``:42-59`` ``Normalize``), in ``dtype``. NHWC out."""
    x = to_tensor01(images, dtype)
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new = tuple(round(d * scale) for d in (h, w))
        x = tv_resize(x, new, "bicubic")
        ph, pw = size - new[0], size - new[1]
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return tv_normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).numpy().transpose(0, 2, 3, 1)


def processor_uint8(images: np.ndarray, size: int, crop: int) -> np.ndarray:
    """The uint8 pixels of transformers 4.40's ``CLIPImageProcessor`` (resize the shortest edge with PIL bicubic,
    centre crop at ``(new - crop) // 2``) with Pillow 10.4's horizontal-then-vertical passes, on images rounded as
    ``rewards.py:87`` rounds floats. NHWC uint8 out."""
    if images.dtype != np.uint8:
        images = torch.from_numpy(images).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    out = []
    for img in images:
        h, w = img.shape[:2]
        nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
        pil = Image.fromarray(img)
        resized = np.asarray(pil.resize((nw, h), Image.BICUBIC).resize((nw, nh), Image.BICUBIC))
        top, left = (nh - crop) // 2, (nw - crop) // 2
        out.append(resized[top : top + crop, left : left + crop])
    return np.stack(out)


def processor_pixels(images: np.ndarray, size: int, crop: int, mean, std) -> np.ndarray:
    """:func:`processor_uint8` rescaled and normalised in float64 (transformers does it in float32)."""
    raw = processor_uint8(images, size, crop).astype(np.float64)
    return (raw / 255 - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)


# ---------------------------------------------------------------- preprocessing alone


@pytest.mark.parametrize("kind", ["uint8", "float"])
@pytest.mark.parametrize("size,crop", [(224, 224), (230, 224)])
def test_clipscore_preprocessing(kind, size, crop):
    spec = ProcessorSpec(size=size, crop=crop, backend="torchvision")
    worst64 = worst32 = 0.0
    for i, (h, w) in enumerate(SIZES):
        images = real_looking_images(2, h, w, seed=i) if kind == "uint8" else float_images(2, h, w, seed=i)
        ours = np.asarray(spec(images))
        assert ours.shape == (2, crop, crop, 3) and ours.dtype == np.float32
        ref = clipscore_pixels(images, size, crop, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        ref32 = clipscore_pixels(images, size, crop, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, torch.float32)
        worst64 = max(worst64, float(np.abs(ours - ref).max()))
        worst32 = max(worst32, float(np.abs(ours - ref32).max()))
    print(f"vs float64 {worst64:.1e} (tol {PIXEL_TOL:.0e}), vs torch float32 {worst32:.1e} (tol {PIXEL32_TOL:.1e})")
    assert worst64 < PIXEL_TOL and worst32 < PIXEL32_TOL


def test_clipscore_crop_rounds_halves_to_even():
    """A 224 x 227 image keeps its size and is cropped from column round(1.5) = 2 (transformers would take 1)."""
    images = real_looking_images(1, 224, 227, seed=5)
    ours = np.asarray(ProcessorSpec(size=224, crop=224, backend="torchvision")(images))
    x = images.astype(np.float64) / 255
    want = (x[:, :, 2:226] - np.asarray(OPENAI_CLIP_MEAN)) / np.asarray(OPENAI_CLIP_STD)
    np.testing.assert_allclose(ours, want, atol=normalise_bound(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) + 1e-7)
    floor = (x[:, :, 1:225] - np.asarray(OPENAI_CLIP_MEAN)) / np.asarray(OPENAI_CLIP_STD)
    assert np.abs(ours - floor).max() > 0.1


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_hpsv2_preprocessing(kind):
    worst64 = worst32 = 0.0
    for i, (h, w) in enumerate([*SIZES, (223, 100), (224, 224)]):
        images = real_looking_images(2, h, w, seed=i) if kind == "uint8" else float_images(2, h, w, seed=i)
        ours = np.asarray(resize_max_and_pad(images, 224))
        assert ours.shape == (2, 224, 224, 3) and ours.dtype == np.float32
        worst64 = max(worst64, float(np.abs(ours - hpsv2_pixels(images)).max()))
        worst32 = max(worst32, float(np.abs(ours - hpsv2_pixels(images, dtype=torch.float32)).max()))
    print(f"vs float64 {worst64:.1e} (tol {PIXEL_TOL:.0e}), vs torch float32 {worst32:.1e} (tol {PIXEL32_TOL:.1e})")
    assert worst64 < PIXEL_TOL and worst32 < PIXEL32_TOL


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_pickscore_and_aesthetic_preprocessing(kind):
    """PickScore's and the aesthetic's processors (shortest edge 224, crop 224, OpenAI statistics for both
    CLIP-ViT-H-14 and CLIP-L/14) with Pillow 10.4's pass order; the tall 700 x 300 image is where Pillow 13's differs."""
    spec = ProcessorSpec(size=224, crop=224, order="horizontal_first")
    bound = normalise_bound(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    worst = 0.0
    for i, (h, w) in enumerate(SIZES):
        images = real_looking_images(2, h, w, seed=i) if kind == "uint8" else float_images(2, h, w, seed=i)
        ours = np.asarray(spec(images))
        ref = processor_pixels(images, 224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"vs float64 {worst:.1e} (bound {bound:.1e})")
    assert worst < bound


# ---------------------------------------------------------------- whole scores on tiny models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny CLIP-L-like (processor: shortest edge 36, crop 32, the openai-style integer sizes) and PickScore-like
    (its CLIP-H-like processor elsewhere: shortest edge 40, crop 32) transformers models, a tiny aesthetic MLP and a
    tiny OpenCLIP at 224 px, saved under one directory."""
    root = tmp_path_factory.mktemp("scorers")
    clip_l = save_tiny_clip(root / "clip_l", seed=0, processor=dict(size=36, crop_size=32))
    pick = save_tiny_clip(root / "pick", seed=1, hidden_act="gelu", logit_scale=4.2)
    save_clip_processor(root / "clip_h", dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}))
    mlp = save_tiny_aesthetic_mlp(root / "mlp.pth", seed=2)
    hps = save_tiny_openclip(
        root / "hps.pt",
        32,
        vision=dict(width=64, layers=1, head_width=64, mlp_ratio=2.0, patch_size=32, image_size=224),
        text=dict(context_length=77, vocab_size=TINY_CLIP_VOCAB_SIZE, width=64, heads=1, layers=1, mlp_ratio=2.0),
        seed=3,
    )
    return {"root": root, "clip_l": clip_l, "pick": pick, "mlp": mlp, "hps": hps}


def _processor(directory) -> tuple[int, int, tuple, tuple]:
    """``(shortest edge, crop, mean, std)`` of a processor directory, as transformers reads it (the public
    ``get_image_transform`` reads ``processor.to_dict()``)."""
    p = CLIPImageProcessorPil.from_pretrained(directory)
    return p.size["shortest_edge"], p.crop_size["height"], tuple(p.image_mean), tuple(p.image_std)


def _clip_outputs(model, pixels: np.ndarray, tokenizer_dir):
    """A float64 copy of a transformers ``CLIPModel`` on NHWC pixels and the prompts padded to 77 (the public
    ``ClipScorer``'s ``padding="max_length"``)."""
    tokens = CLIPTokenizer.from_pretrained(tokenizer_dir)(
        PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad(), torch_float64():
        return float64_copy(model)(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=t64(pixels.transpose(0, 3, 1, 2))
        )


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_clipscore_matches_public_scorer(models, kind):
    """DiffusionNFT's ``logits_per_image.diagonal() / 100`` and Flow-GRPO's ``/ 30`` on 37 x 53 images: resized to
    36 x 51, cropped from column round(9.5) = 10."""
    directory = models["root"] / "clip_l"
    images = real_looking_images(5, 37, 53, seed=7) if kind == "uint8" else float_images(5, 37, 53, seed=7)
    out = _clip_outputs(models["clip_l"], clipscore_pixels(images, *_processor(directory)), directory)
    cosines = torch.sum(out.image_embeds * out.text_embeds, -1)
    for divisor in (100.0, 30.0):
        ours = clip_scores.clipscore(path=str(directory), divisor=divisor, batch_size=4)(images, PROMPTS, [None] * 5)
        err, bound = rel_err(ours, out.logits_per_image.diagonal() / divisor), cosine_bound(TOL, cosines)
        print(f"clipscore / {divisor:g} vs float64: {err:.1e}, bound {bound:.1e}")
        assert err < bound


@pytest.mark.parametrize("kind,size", [("float", (512, 320)), ("uint8", (200, 300))])
def test_hpsv2_matches_public_scorer(models, kind, size):
    """OpenCLIP's own model (``encode_image`` / ``encode_text`` with ``normalize=True``) on the ported
    ``ResizeMaxSize`` pixels (512 x 320 -> 224 x 140 padded left and right; 200 x 300 -> 149 x 224 padded top and
    bottom) and OpenCLIP's token layout (start, tokens, end, zeros); in batches of 3."""
    images = float_images(5, *size, seed=4) if kind == "float" else real_looking_images(5, *size, seed=4)
    reward = clip_scores.hpsv2(path=str(models["root"] / "hps.pt"), tokenizer_path=str(models["root"] / "clip_l"), batch_size=3)
    ours = reward(images, PROMPTS, [None] * 5)
    ids = np.zeros((5, 77), np.int64)
    for row, tokens in enumerate(CLIPTokenizer.from_pretrained(models["root"] / "clip_l")(PROMPTS)["input_ids"]):
        ids[row, : len(tokens)] = tokens
    model = float64_copy(models["hps"])
    with torch.no_grad(), torch_float64():
        image = model.encode_image(t64(hpsv2_pixels(images).transpose(0, 3, 1, 2)), normalize=True)
        text = model.encode_text(torch.from_numpy(ids), normalize=True)
    cosines = torch.sum(image * text, -1)
    err, bound = rel_err(ours, cosines), cosine_bound(TOL, cosines)
    print(f"hpsv2 vs float64: {err:.1e}, bound {bound:.1e}")
    assert err < bound


def test_pickscore_and_aesthetic_match_public_scorers(models):
    """Float 150 x 53 images (more than twice as tall as wide: the pass order matters) rounded to uint8 as the
    public ``rewards.py`` does, then the ported processor."""
    root = models["root"]
    images = float_images(5, 150, 53, seed=8)
    pick = clip_scores.pickscore(path=str(root / "pick"), processor_path=str(root / "clip_h"))(images, PROMPTS, [None] * 5)
    out = _clip_outputs(models["pick"], processor_pixels(images, *_processor(root / "clip_h")), root / "clip_h")
    cosines = torch.sum(out.image_embeds * out.text_embeds, -1)
    ref = models["pick"].logit_scale.detach().double().exp() * cosines / 26
    err, bound = rel_err(pick, ref), cosine_bound(TOL, cosines)
    print(f"pickscore vs float64: {err:.1e}, bound {bound:.1e}")
    assert err < bound

    ours = clip_scores.aesthetic(path=str(root / "mlp.pth"), clip_path=str(root / "clip_l"))(images, PROMPTS, [None] * 5)
    out = _clip_outputs(models["clip_l"], processor_pixels(images, *_processor(root / "clip_l")), root / "clip_l")
    with torch.no_grad():
        ref = float64_copy(models["mlp"]).layers(out.image_embeds).squeeze(1)
    print(f"aesthetic vs float64: {rel_err(ours, ref):.1e}")
    assert rel_err(ours, ref) < TOL


def test_options(models):
    root = str(models["root"])
    with pytest.raises(ValueError, match=r"clipscore: preprocess = 'cv2' is not one of \('torchvision', 'pil'\)"):
        clip_scores.clipscore(path=root + "/clip_l", preprocess="cv2")
    with pytest.raises(ValueError, match="clipscore: divisor = 0"):
        clip_scores.clipscore(path=root + "/clip_l", divisor=0)
    for factory in (clip_scores.pickscore, clip_scores.aesthetic):
        with pytest.raises(ValueError, match=r"pil_order = 'vertical' is not one of \('horizontal_first', 'pillow13'\)"):
            factory(pil_order="vertical")


def test_uint8_rounding_effect(models):
    """What rounding the VAE's float images to uint8 first (our trainer's rollouts) changes in the float-input
    scorers (CLIPScore, HPSv2), on 512 x 512 images, the papers' size. Each input pixel moves by at most half a
    level, so each resized one by at most ``0.5 / 255`` times the largest absolute weight sum of the two passes,
    over the smallest std: a hard bound on the normalised pixels. Measured (printed): max 6.0e-3 / RMS 1.2e-3
    (CLIPScore's bilinear), 7.4e-3 / 1.5e-3 (HPSv2's bicubic), against the bounds 7.5e-3 and 1.0e-2 (for scale, a
    uint8 level is 1.5e-2 normalised; DiffusionNFT's own fp16 images and fp16 ``Normalize`` move CLIPScore's pixels
    by RMS 6.6e-4). The tiny random HPS model's cosines (0.003 - 0.14) move by up to 1.1e-5; real checkpoints were
    not available here."""
    from marble_jax.rewards.image_preprocess import aa_coefficients

    images = float_images(5, 512, 512, seed=11)
    rounded = torch.from_numpy(images).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    spec = ProcessorSpec(size=224, crop=224, backend="torchvision")
    for name, fn, kernel in (
        ("clipscore", spec, "bilinear"),
        ("hpsv2", lambda x: resize_max_and_pad(x, 224), "bicubic"),
    ):
        gain = float(np.abs(aa_coefficients(512, 224, kernel)[1]).sum(1).max()) ** 2
        bound = 0.5 / 255 * gain / min(OPENAI_CLIP_STD)
        d = np.abs(np.asarray(fn(images), np.float64) - np.asarray(fn(rounded), np.float64))
        print(f"{name}: normalised pixels max {d.max():.1e} RMS {np.sqrt((d**2).mean()):.1e}, bound {bound:.1e}")
        assert d.max() <= bound
    reward = clip_scores.hpsv2(path=str(models["root"] / "hps.pt"), tokenizer_path=str(models["root"] / "clip_l"))
    scores = [reward(x, PROMPTS, [None] * 5) for x in (images, rounded)]
    print(f"tiny HPS scores {np.round(scores[0], 4)}, moved by up to {np.abs(scores[0] - scores[1]).max():.1e}")
