"""Parity of the JAX image preprocessing with PIL, transformers' ``CLIPImageProcessor`` (PIL path) and torch's
antialiased ``interpolate``.

Measured: the bicubic resize equals PIL's ``Image.resize(..., BICUBIC)`` exactly (0 of 255 on every pixel: PIL's
fixed-point arithmetic is reproduced), in Pillow 13's pass order and in the horizontal-first order of older Pillow, so
after ``/ 255`` and ``(x - mean) / std`` the normalised pixels differ from the exact ones (transformers' / PIL's
resized uint8 pixels normalised in float64) only by our float32 rounding, held to the a-priori bound
:func:`helpers.normalise_bound` (1.06e-6 for OpenAI's statistics, 1.34e-6 for DICT_STYLE's). The error depends only
on the uint8 value and the channel, and these images hold (nearly) every value: measured 4.5e-7 and 4.4e-7, the
largest over all 256 values. (transformers' own float32 normalisation is 2.8e-7 off the exact values: against it,
ours could be off by the sum of two such errors.)

torch's antialiased bilinear / bicubic ``interpolate``: against torch in float64 (weights and sums exact to 2^-53)
ours is within :data:`RESIZE_TOL` = 5e-6 in [0, 1] pixel units (measured <= 3.6e-7). A priori, per pass: float32
weights (rounded from float64) and a float32 sum over K <= 15 taps are within (K + 2) 2^-24 = 1.0e-6 relative to
``sum |w x|``, and the weights' absolute values sum to at most 1.26 (the cubic's negative lobes); with inputs up to
1.3 in magnitude the first pass is within 1.7e-6, the second adds 2.1e-6 and carries the first's error times 1.26:
4.2e-6. torch's own float32 result is up to 1.4e-5 off its float64 one (it computes the scale ``in / out`` and the
centres in float32, moving the taps by up to ~1e-7 x the input size); ours is held to within :data:`TORCH32_TOL` =
3e-5 of it (0.008 of a uint8 level).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import normalise_bound, real_looking_images
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from marble_jax.rewards.image_preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ProcessorSpec,
    as_uint8,
    as_unit_float,
    clip_preprocess,
    pil_resize,
    resize_max_and_pad,
    torch_resize,
    torchvision_clip_preprocess,
    torchvision_crop_offset,
)

RESIZE_TOL = 5e-6  # vs torch's float64 interpolate, [0, 1] units (see above)
TORCH32_TOL = 3e-5  # vs torch's float32 interpolate

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


@pytest.mark.parametrize("height,width", [(900, 300), (400, 150), (512, 320), (37, 53)])
def test_pil_resize_horizontal_first_is_older_pillow(height, width):
    """``order="horizontal_first"``: Pillow < 13's ``ImagingResampleInner`` (libImaging/Resample.c: the horizontal
    pass into a uint8 image, then the vertical pass), i.e. two single-axis resizes of Pillow 13 in that order (a
    single-axis resize runs one pass). Pillow 13 itself goes vertical first on the tall images here, and differs."""
    images = real_looking_images(2, height, width, seed=height)
    out = (224, int(224 * height / width)) if width <= height else (int(224 * width / height), 224)  # (w, h): shortest edge
    ours = np.asarray(pil_resize(images, out[1], out[0], order="horizontal_first"))
    for img, got in zip(images, ours, strict=True):
        pil = Image.fromarray(img)
        ref = np.asarray(pil.resize((out[0], height), Image.BICUBIC).resize(out, Image.BICUBIC))
        np.testing.assert_array_equal(got, ref)
        if height > 2 * width and width > 224:  # Pillow 13 goes vertical first (both edges shrink)
            assert np.abs(ref.astype(int) - np.asarray(pil.resize(out, Image.BICUBIC))).max() > 0  # the orders differ here
    with pytest.raises(ValueError, match="order 'vertical'"):
        pil_resize(images, 10, 10, order="vertical")


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    "size,out", [((512, 512), (224, 224)), ((37, 53), (224, 320)), ((512, 320), (358, 224)), ((300, 517), (130, 224)),
                 ((224, 300), (224, 224)), ((53, 37), (60, 20))],
)  # fmt: skip
def test_torch_resize_matches_interpolate(kernel, size, out):
    images = real_looking_images(2, *size, seed=size[0]).astype(np.float32) / 255
    images[0, :3] = [-0.2, 1.3, 0.5]  # out of [0, 1] (a bicubic overshoot upstream): nothing is clipped
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    refs = {
        dtype: torch.nn.functional.interpolate(x.to(dtype), size=out, mode=kernel, align_corners=False, antialias=True)
        .numpy()
        .transpose(0, 2, 3, 1)
        for dtype in (torch.float64, torch.float32)
    }
    ours = np.asarray(torch_resize(images, *out, kernel))
    assert ours.shape == (2, *out, 3) and ours.dtype == np.float32
    err64, err32 = np.abs(ours - refs[torch.float64]).max(), np.abs(ours - refs[torch.float32]).max()
    torch32 = np.abs(refs[torch.float32] - refs[torch.float64]).max()
    print(f"vs float64 {err64:.1e} (tol {RESIZE_TOL:.0e}); vs float32 {err32:.1e}; torch float32 vs float64 {torch32:.1e}")
    assert err64 < RESIZE_TOL and err32 < TORCH32_TOL


def test_crop_offset_and_dtypes():
    """torchvision's ``int(round((n - c) / 2.0))``: halves go to the even neighbour, unlike transformers' floor."""
    assert [torchvision_crop_offset(224 + d, 224) for d in range(8)] == [0, 0, 1, 2, 2, 2, 3, 4]
    assert [(d // 2) for d in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(as_unit_float(values), values.astype(np.float32) / np.float32(255))  # torch's x / 255
    floats = np.array([0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.3, 1.0, 1.2, -0.1], np.float32)
    want = torch.from_numpy(floats).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()  # the public rewards.py
    np.testing.assert_array_equal(as_uint8(floats), want)
    assert as_uint8(values).dtype == np.uint8 and np.array_equal(as_uint8(values), values)


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


def test_preprocess_options_and_errors(tmp_path):
    images = real_looking_images(1, 64, 48)
    assert clip_preprocess(images, size=40, crop=32).shape == (1, 32, 32, 3)
    assert torchvision_clip_preprocess(images, size=40, crop=32).shape == (1, 32, 32, 3)
    assert resize_max_and_pad(images, 40).shape == (1, 40, 40, 3)
    for fn in (clip_preprocess, torchvision_clip_preprocess):
        with pytest.raises(ValueError, match="crop 50"):
            fn(images, size=40, crop=50)
    for field, value in (("backend", "cv2"), ("order", "vertical")):
        with pytest.raises(ValueError, match=f"{field} '{value}'"):
            ProcessorSpec(size=40, crop=32, **{field: value})
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
