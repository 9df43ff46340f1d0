"""Image preprocessing of the CLIP-based rewards, in JAX: uint8 NHWC in, normalised float32 NHWC out.

* :func:`clip_preprocess` — transformers' ``CLIPImageProcessor`` (the PIL path): resize the shortest edge to
  ``size`` (the long edge to ``int(size * long / short)``) with PIL's bicubic filter, centre crop
  ``crop`` x ``crop`` (offset ``(new - crop) // 2``), ``x / 255``, ``(x - mean) / std``.
* :func:`resize_and_pad` — HPSv2's evaluation transform (``image_transform(224, is_train=False,
  resize_longest_max=True)``, its ``ResizeMaxSize``): resize the longest edge to ``size`` (each edge to
  ``round(edge * size / longest)``) with PIL's bicubic filter, pad with black to ``size`` x ``size``
  (left / top ``pad // 2``), ``x / 255``, ``(x - mean) / std``.

The resize is PIL's ``Image.resize(..., BICUBIC)`` reproduced step for step (``libImaging/Resample.c``): the
bicubic kernel (a = -0.5) widened by the downscale factor (antialiasing), its per-pixel coefficients
normalised to sum 1 and rounded to 22-bit fixed point, a horizontal and a vertical pass in int32 (in
Pillow 13's order, see :func:`pil_resize`), each rounded and clipped to uint8. The coefficients are computed
on the host in float64 as PIL does, so the result equals PIL's pixel for pixel; the passes are a static
gather per kernel tap, jittable for any static image shape.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3
_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point coefficients


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5), float64, written in PIL's order of operations."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.cache
def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bicubic resampling of one axis ``in_size -> out_size``: ``(index [out, K] int32, weight [out, K]
    int32)``, output ``o = clip8(sum_k x[index[o, k]] * weight[o, k])`` with 22-bit fixed-point weights (unused
    taps have weight 0 and a valid index)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    valid = taps[None, :] < xmax[:, None]
    ss = 1.0 / filterscale
    w = np.where(valid, _bicubic(((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss), 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # sequential, as PIL sums
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << _PRECISION_BITS)).astype(np.int32)
    index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1).astype(np.int32)
    return index, np.where(valid, fixed, 0).astype(np.int32)


def _resample_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """One PIL 8-bit pass along ``axis`` of an int32 image batch holding uint8 values."""
    in_size = x.shape[axis]
    if in_size == out_size:  # PIL skips the pass (its coefficients would be the identity)
        return x
    index, weight = pil_coefficients(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = jnp.full((), 1 << (_PRECISION_BITS - 1), jnp.int32)
    for k in range(index.shape[1]):  # one gather per tap: memory stays one output image per tap
        acc = acc + jnp.take(x, jnp.asarray(index[:, k]), axis=axis) * jnp.asarray(weight[:, k]).reshape(shape)
    return jnp.clip(jnp.right_shift(acc, _PRECISION_BITS), 0, 255)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def pil_resize(images: jax.Array, height: int, width: int) -> jax.Array:
    """PIL's ``Image.resize((width, height), BICUBIC)`` of uint8 ``[B,H,W,C]`` -> int32 ``[B,height,width,C]`` in 0..255.

    The pass order is Pillow 13's: vertical first when the height shrinks by more than twice as many pixels as
    the width, else horizontal first (older Pillow always goes horizontal first; the two orders differ by a few
    levels on some pixels, and only for images more than twice as tall as wide when the aspect ratio is kept)."""
    x = jnp.asarray(images).astype(jnp.int32)
    in_h, in_w = x.shape[1:3]
    if height < in_h and in_h - height > 2 * (in_w - width):
        return _resample_axis(_resample_axis(x, 1, height), 2, width)
    return _resample_axis(_resample_axis(x, 2, width), 1, height)


def _normalise(pixels: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    x = pixels.astype(jnp.float32) * np.float32(1 / 255)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' output size for ``{"shortest_edge": size}``: the short edge ``size``, the long one
    ``int(size * long / short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


@functools.partial(jax.jit, static_argnames=("size", "crop", "mean", "std"))
def clip_preprocess(
    images: jax.Array, *, size: int, crop: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> jax.Array:
    """transformers' ``CLIPImageProcessor`` (PIL path): uint8 ``[B,H,W,3]`` -> float32 ``[B,crop,crop,3]``.

    ``mean`` / ``std`` are tuples (static). Raises ValueError when ``crop`` exceeds the resized image."""
    h, w = images.shape[1:3]
    new_h, new_w = shortest_edge_size(h, w, size)
    if crop > min(new_h, new_w):
        raise ValueError(f"clip_preprocess: crop {crop} is larger than the resized {h}x{w} image ({new_h}x{new_w})")
    x = pil_resize(images, new_h, new_w)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return _normalise(x[:, top : top + crop, left : left + crop], mean, std)


@functools.partial(jax.jit, static_argnames=("size", "mean", "std"))
def resize_and_pad(
    images: jax.Array, size: int, *, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> jax.Array:
    """OpenCLIP's ``ResizeMaxSize`` (HPSv2's transform): uint8 ``[B,H,W,3]`` -> float32 ``[B,size,size,3]``.

    Each edge becomes ``round(edge * size / longest)`` (PIL bicubic), the rest is black padding split
    ``pad // 2`` before, the remainder after; then ``(x / 255 - mean) / std`` (padding included, as HPSv2
    pads before normalising). An image whose longest edge is already ``size`` is padded too (HPSv2 would leave
    a non-square one unpadded, which cannot be batched)."""
    h, w = images.shape[1:3]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    x = pil_resize(images, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    return _normalise(x, mean, std)


@dataclasses.dataclass(frozen=True)
class ProcessorSpec:
    """The fields of a ``CLIPImageProcessor`` config that :func:`clip_preprocess` takes."""

    size: int
    crop: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __call__(self, images: jax.Array) -> jax.Array:
        """uint8 ``[B,H,W,3]`` -> normalised float32 ``[B,crop,crop,3]``."""
        return clip_preprocess(images, size=self.size, crop=self.crop, mean=self.mean, std=self.std)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> ProcessorSpec:
        """Reads ``directory/preprocessor_config.json`` (old ``size: 224`` / ``crop_size: 224`` integers or the
        ``{"shortest_edge": n}`` / ``{"height": n, "width": n}`` dicts).

        Raises:
          FileNotFoundError: naming the missing file.
          ValueError: naming the file and the key that is missing or that this preprocessing does not implement.
        """
        f = Path(directory) / "preprocessor_config.json"
        if not f.is_file():
            raise FileNotFoundError(f"missing image processor config: {f}")
        config = json.loads(f.read_text())

        def fail(key: str, why: str):
            raise ValueError(f"{f}: {key} = {config.get(key)!r}: {why}")

        for key in ("size", "crop_size", "image_mean", "image_std"):
            if key not in config:
                raise ValueError(f"{f}: missing key {key!r}")
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if not config.get(key, True):
                fail(key, "only the full resize / centre-crop / rescale / normalise pipeline is implemented")
        if config.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
            fail("resample", f"only bicubic ({PIL_BICUBIC}) resampling is implemented")
        if not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255):
            fail("rescale_factor", "only 1/255 is implemented")
        size = config["size"]
        if isinstance(size, dict):
            if set(size) != {"shortest_edge"}:
                fail("size", 'only {"shortest_edge": n} (or an integer) is implemented')
            size = size["shortest_edge"]
        crop = config["crop_size"]
        if isinstance(crop, dict):
            if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
                fail("crop_size", 'only a square crop {"height": n, "width": n} (or an integer) is implemented')
            crop = crop["height"]
        if not isinstance(size, int) or not isinstance(crop, int):
            fail("size" if not isinstance(size, int) else "crop_size", "expected an integer size")
        stats = {}
        for key in ("image_mean", "image_std"):
            value = config[key]
            if not isinstance(value, list) or len(value) != 3:
                fail(key, "expected 3 per-channel values")
            stats[key] = tuple(float(v) for v in value)
        return cls(size=size, crop=crop, mean=stats["image_mean"], std=stats["image_std"])
