"""Parity of the JAX image preprocessing with PIL and transformers' ``CLIPImageProcessor`` (PIL path).

Measured: the bicubic resize equals PIL's ``Image.resize(..., BICUBIC)`` exactly (0 of 255 on every pixel: PIL's
fixed-point arithmetic is reproduced), so after ``/ 255`` and ``(x - mean) / std`` the normalised pixels differ from
the exact ones (transformers' / PIL's resized uint8 pixels normalised in float64) only by our float32 rounding, held
to the a-priori bound :func:`helpers.normalise_bound` (1.06e-6 for OpenAI's statistics, 1.34e-6 for DICT_STYLE's).
The error depends only on the uint8 value and the channel, and these images hold (nearly) every value: measured
4.5e-7 and 4.4e-7, the largest over all 256 values. (transformers' own float32 normalisation is 2.8e-7 off the
exact values: against it, ours could be off by the sum of two such errors.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import normalise_bound, real_looking_images
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from marble_jax.rewards.image_preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ProcessorSpec,
    clip_preprocess,
    pil_resize,
    resize_and_pad,
)

SIZES = [(512, 512), (300, 517), (700, 380), (900, 300), (150, 100), (224, 224)]  # square, wide, tall, very tall, up, same


def _write_config(path, **config) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "preprocessor_config.json").write_text(json.dumps(config))


OPENAI_STYLE = dict(  # openai/clip-vit-large-patch14's file: integer sizes (old feature-extractor format)
    crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, feature_extractor_type="CLIPFeatureExtractor",
    image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), resample=3, size=224,
)  # fmt: skip
DICT_STYLE = dict(  # the current format, with other statistics and a crop smaller than the resize
    crop_size={"height": 200, "width": 200}, do_center_crop=True, do_normalize=True, do_resize=True, do_rescale=True,
    rescale_factor=1 / 255, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=3, size={"shortest_edge": 230},
    image_processor_type="CLIPImageProcessor",
)  # fmt: skip


@pytest.mark.parametrize("height,width", [(512, 512), (300, 517), (400, 150), (150, 100), (37, 400)])
@pytest.mark.parametrize("out", [(224, 224), (224, 385), (298, 224)])
def test_pil_resize_is_exact(height, width, out):
    images = real_looking_images(2, height, width, seed=height + width)
    ours = np.asarray(pil_resize(images, *out))
    for img, got in zip(images, ours, strict=True):
        ref = np.asarray(Image.fromarray(img).resize(out[::-1], Image.BICUBIC))
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("config", [OPENAI_STYLE, DICT_STYLE], ids=["openai-int-sizes", "dict-sizes"])
def test_clip_preprocess_matches_transformers(tmp_path, config):
    _write_config(tmp_path, **config)
    reference = CLIPImageProcessorPil.from_pretrained(tmp_path)
    spec = ProcessorSpec.from_dir(tmp_path)
    assert spec.crop == reference.crop_size["height"] and spec.size == reference.size["shortest_edge"]
    mean, std = np.asarray(reference.image_mean, np.float64), np.asarray(reference.image_std, np.float64)
    worst = 0.0
    for i, (h, w) in enumerate(SIZES):
        images = real_looking_images(2, h, w, seed=i)
        # transformers' resized and cropped uint8 pixels, rescaled and normalised in float64
        raw = reference(images=list(images), do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        ref = (raw.transpose(0, 2, 3, 1) * reference.rescale_factor - mean) / std
        ours = np.asarray(spec(images))
        assert ours.shape == ref.shape == (2, spec.crop, spec.crop, 3) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"max abs error vs float64: {worst:.2e}, bound {normalise_bound(mean, std):.2e}")
    assert worst < normalise_bound(mean, std)


def test_resize_and_pad_matches_pil():
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float64), np.asarray(OPENAI_CLIP_STD, np.float64)
    worst = 0.0
    for i, (h, w) in enumerate([*SIZES, (223, 100)]):
        images = real_looking_images(2, h, w, seed=10 + i)
        ours = np.asarray(resize_and_pad(images, 224))
        scale = 224 / max(h, w)  # ResizeMaxSize: round(edge * scale), PIL bicubic, pad [w // 2, h // 2, rest] with 0
        nh, nw = round(h * scale), round(w * scale)
        ph, pw = 224 - nh, 224 - nw
        for img, got in zip(images, ours, strict=True):  # the reference in float64
            resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), np.float64)
            padded = np.pad(resized, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
            worst = max(worst, float(np.abs(got - (padded / 255 - mean) / std).max()))
        if ph or pw:  # the padding is black, normalised: -fl(mean) / fl(std), three roundings (<= 1.8e-7 relative)
            corner = ours[:, 0, 0] if ph // 2 and pw // 2 else ours[:, -1, -1]
            np.testing.assert_allclose(corner, np.broadcast_to(-mean / std, corner.shape), rtol=1e-6)
    print(f"max abs error vs float64: {worst:.2e}, bound {normalise_bound(mean, std):.2e}")
    assert worst < normalise_bound(mean, std)


def test_preprocess_options_and_errors(tmp_path):
    images = real_looking_images(1, 64, 48)
    assert clip_preprocess(images, size=40, crop=32).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="crop 50"):
        clip_preprocess(images, size=40, crop=50)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ProcessorSpec.from_dir(tmp_path)
    cases = [
        ({k: v for k, v in OPENAI_STYLE.items() if k != "image_std"}, "image_std"),
        ({**OPENAI_STYLE, "resample": 2}, "resample"),
        ({**OPENAI_STYLE, "size": {"height": 224, "width": 224}}, "size"),
        ({**OPENAI_STYLE, "crop_size": {"height": 224, "width": 200}}, "crop_size"),
        ({**OPENAI_STYLE, "do_center_crop": False}, "do_center_crop"),
        ({**OPENAI_STYLE, "image_mean": [0.5]}, "image_mean"),
    ]
    for config, key in cases:
        _write_config(tmp_path, **config)
        with pytest.raises(ValueError, match=rf"preprocessor_config.json.*{key}"):
            ProcessorSpec.from_dir(tmp_path)
