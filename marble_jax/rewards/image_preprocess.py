"""Image preprocessing of the CLIP-based rewards, in JAX: images NHWC in, normalised float32 NHWC out.

Each function is the preprocessing of a public scorer behind the papers' tables (DiffusionNFT's and Flow-GRPO's
``flow_grpo/*_scorer.py``, fed by their ``flow_grpo/rewards.py``; the versions their ``setup.py`` pins: torch 2.6,
torchvision 0.21, transformers 4.40, Pillow 10.4). The two families differ in what is resized:

* PIL on uint8 (PickScore, aesthetic: the trainers round their float images to uint8 and hand PIL images / uint8
  tensors to transformers' ``CLIPImageProcessor``). :func:`clip_preprocess`: resize the shortest edge to ``size``
  (the long edge to ``int(size * long / short)``) with PIL's bicubic filter, centre crop ``crop`` x ``crop`` (offset
  ``(new - crop) // 2``), ``x / 255``, ``(x - mean) / std``.
* torchvision on float tensors in [0, 1] (CLIPScore, HPSv2.1: the trainers hand the VAE's float images over as they
  are). :func:`torchvision_clip_preprocess`, DiffusionNFT's ``ClipScorer`` transform ``T.Resize(size)`` (shortest
  edge as above, **bilinear** with antialiasing, the torchvision 0.21 default), ``T.CenterCrop(crop)`` (offset
  ``int(round((new - crop) / 2))``: halves round to even), ``T.Normalize(mean, std)``; and
  :func:`resize_max_and_pad`, HPSv2's ``ResizeMaxSize`` (each edge ``round(edge * size / longest)``, **bicubic**
  with antialiasing, black padding, ``pad // 2`` before), then ``Normalize``. Nothing is clipped: an antialiased
  bicubic resize of floats can overshoot [0, 1] (torchvision clamps only uint8 output).

Inputs are uint8 (what the trainer's rollouts give, ``pipeline.decode_images``) or float in [0, 1] (the VAE's images
before quantisation, what the public trainers hand their scorers). The PIL family quantises floats as the public
``rewards.py`` does, ``clamp(round(x * 255), 0, 255)`` (halves to even); the torchvision family divides uint8 by 255
as ``rewards.py`` does for numpy input (``torch.tensor(images, dtype=torch.uint8) / 255.0``). (DiffusionNFT decodes
under fp16 autocast by default, ``config.mixed_precision = "fp16"``, so its scorers likely see float16 images and
its CLIPScore then normalises in float16; ours stays in float32.)

Both resizes are one separable algorithm: PIL's ``ImagingResample`` (``libImaging/Resample.c``), which torch ported
for its antialiased ``interpolate`` (``_upsample_bilinear2d_aa`` / ``_upsample_bicubic2d_aa``,
``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, ``_compute_indices_min_size_weights_aa``): output pixel ``i`` of an
axis ``in -> out`` (scale ``s = in / out``) is centred at ``c = s (i + 0.5)``, reads the input pixels ``j`` in
``[trunc(c - support + 0.5), trunc(c + support + 0.5))`` (clipped to the image) with weights
``kernel((j - c + 0.5) / max(s, 1))`` normalised to sum 1, where ``support = max(s, 1)`` for the triangle (bilinear)
and ``2 max(s, 1)`` for the cubic (a = -0.5) kernel: the kernel is widened by the downscale factor (antialiasing).
:func:`aa_coefficients` computes these weights on the host in float64 (static per shape); the passes are a gather
per kernel tap, jittable for any static image shape.

* PIL (:func:`pil_resize`) rounds the weights to 22-bit fixed point and each pass's sums to uint8, in int32, so the
  result equals PIL's pixel for pixel. Pass order: horizontal then vertical (Pillow before 13, including the 10.4
  the public trainers pin; ``order="horizontal_first"``), or Pillow 13's (``"pillow13"``: vertical first when the
  height shrinks by more than twice as many pixels as the width); the two differ only for images more than twice
  as tall as wide when the aspect ratio is kept, by a few levels on some pixels.
* torch (:func:`torch_resize`) applies the float64 weights, rounded to float32, to float32 pixels: width, then
  height (torch's order), each output a sequential sum over the taps as torch's CPU kernel sums. torch computes
  its weights in float32 (the scale ``in / out``, the centres), which puts its own float32 result up to about
  1.5e-5 (in [0, 1] units, 0.004 of a uint8 level) off the exact one; ours is within float32 rounding of exact.
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
PIL_ORDERS = ("horizontal_first", "pillow13")
BACKENDS = ("pil", "torchvision")
_UNIT_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255)  # correctly rounded v / 255, as torch divides


# ---------------------------------------------------------------- antialiased separable weights


def _bicubic(x: np.ndarray) -> np.ndarray:
    """The cubic kernel with a = -0.5 (PIL's and torch's antialiased bicubic), float64, in PIL's order of operations."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    """The bilinear kernel ``max(1 - |x|, 0)``."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_KERNELS = {"bilinear": (_triangle, 1.0), "bicubic": (_bicubic, 2.0)}  # kernel, support at scale 1


@functools.cache
def aa_coefficients(in_size: int, out_size: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """The antialiased resampling of one axis ``in_size -> out_size`` with ``kernel`` ("bilinear" or "bicubic"), as
    PIL's ``precompute_coeffs`` and torch's ``_compute_indices_min_size_weights_aa`` compute it, in float64:
    ``(index [out, K] int32, weight [out, K] float64)``, output ``o = sum_k x[index[o, k]] * weight[o, k]``; unused
    taps have weight 0 and a valid index."""
    fn, base_support = _KERNELS[kernel]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    valid = taps[None, :] < xmax[:, None]
    ss = 1.0 / filterscale
    w = np.where(valid, fn(((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss), 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # sequential, as PIL and torch sum
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1).astype(np.int32)
    return index, np.where(valid, w, 0.0)


@functools.cache
def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's bicubic resampling of one axis ``in_size -> out_size``: ``(index [out, K] int32, weight [out, K]
    int32)``, output ``o = clip8(sum_k x[index[o, k]] * weight[o, k])`` with 22-bit fixed-point weights (unused
    taps have weight 0 and a valid index)."""
    index, w = aa_coefficients(in_size, out_size, "bicubic")
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << _PRECISION_BITS)).astype(np.int32)
    return index, np.where(w != 0.0, fixed, 0).astype(np.int32)


def _gather_taps(x: jax.Array, axis: int, index: np.ndarray, weight: np.ndarray, acc: jax.Array | None) -> jax.Array:
    """``acc + sum_k take(x, index[:, k], axis) * weight[:, k]``, the taps added one at a time in order (memory:
    one output per tap)."""
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    for k in range(index.shape[1]):
        term = jnp.take(x, jnp.asarray(index[:, k]), axis=axis) * jnp.asarray(weight[:, k]).reshape(shape)
        acc = term if acc is None else acc + term
    return acc


def _pil_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """One PIL 8-bit pass along ``axis`` of an int32 image batch holding uint8 values."""
    if x.shape[axis] == out_size:  # PIL skips the pass (its coefficients would be the identity)
        return x
    index, weight = pil_coefficients(x.shape[axis], out_size)
    acc = _gather_taps(x, axis, index, weight, jnp.full((), 1 << (_PRECISION_BITS - 1), jnp.int32))
    return jnp.clip(jnp.right_shift(acc, _PRECISION_BITS), 0, 255)


@functools.partial(jax.jit, static_argnames=("height", "width", "order"))
def pil_resize(images: jax.Array, height: int, width: int, order: str = "pillow13") -> jax.Array:
    """PIL's ``Image.resize((width, height), BICUBIC)`` of uint8 ``[B,H,W,C]`` -> int32 ``[B,height,width,C]`` in 0..255.

    ``order``: "horizontal_first" (Pillow before 13: ``ImagingResampleInner`` always runs the horizontal pass first)
    or "pillow13" (Pillow 13, python-pillow/Pillow#9549: vertical first when the height shrinks by more than twice
    as many pixels as the width, else horizontal first)."""
    if order not in PIL_ORDERS:
        raise ValueError(f"pil_resize: order {order!r} is not one of {PIL_ORDERS}")
    x = jnp.asarray(images).astype(jnp.int32)
    in_h, in_w = x.shape[1:3]
    if order == "pillow13" and height < in_h and in_h - height > 2 * (in_w - width):
        return _pil_axis(_pil_axis(x, 1, height), 2, width)
    return _pil_axis(_pil_axis(x, 2, width), 1, height)


def _torch_axis(x: jax.Array, axis: int, out_size: int, kernel: str) -> jax.Array:
    """One antialiased float32 pass along ``axis`` (torch skips an axis whose size is kept; its weights would be
    the identity)."""
    if x.shape[axis] == out_size:
        return x
    index, weight = aa_coefficients(x.shape[axis], out_size, kernel)
    return _gather_taps(x, axis, index, weight.astype(np.float32), None)


@functools.partial(jax.jit, static_argnames=("height", "width", "kernel"))
def torch_resize(images: jax.Array, height: int, width: int, kernel: str) -> jax.Array:
    """torch's ``interpolate(x, (height, width), mode=kernel, align_corners=False, antialias=True)`` of float32
    ``[B,H,W,C]`` -> float32 ``[B,height,width,C]``; ``kernel`` is "bilinear" or "bicubic". Not clipped."""
    if kernel not in _KERNELS:
        raise ValueError(f"torch_resize: kernel {kernel!r} is not one of {tuple(_KERNELS)}")
    x = jnp.asarray(images, jnp.float32)
    return _torch_axis(_torch_axis(x, 2, width, kernel), 1, height, kernel)


# ---------------------------------------------------------------- pixel values


def as_uint8(images: jax.Array) -> jax.Array:
    """uint8 images as they are; float images in [0, 1] quantised as the public ``rewards.py`` does before PIL:
    ``(images * 255).round().clamp(0, 255).to(torch.uint8)`` (``round`` takes halves to even)."""
    if images.dtype == jnp.uint8:
        return images
    return jnp.clip(jnp.round(images.astype(jnp.float32) * 255), 0, 255).astype(jnp.uint8)


def as_unit_float(images: jax.Array) -> jax.Array:
    """float32 images in [0, 1]: uint8 divided by 255 (``torch.tensor(images, dtype=torch.uint8) / 255.0``), float
    images as they are (cast to float32)."""
    if images.dtype == jnp.uint8:  # a table: XLA would turn the division into a multiplication by fl(1/255)
        return jnp.asarray(_UNIT_FLOAT)[images]
    return images.astype(jnp.float32)


def _normalise(pixels: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(x / 255 - mean) / std`` of uint8 values (any integer dtype)."""
    x = pixels.astype(jnp.float32) * np.float32(1 / 255)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _normalise_float(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """torchvision's ``Normalize``: ``(x - mean) / std`` of float32 pixels."""
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' and torchvision's output size for a shortest-edge resize to ``size`` (transformers'
    ``{"shortest_edge": size}``, torchvision's ``Resize(size)``): the short edge ``size``, the long one
    ``int(size * long / short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def torchvision_crop_offset(length: int, crop: int) -> int:
    """torchvision's ``center_crop`` offset (``transforms/functional.py``: ``int(round((length - crop) / 2.0))``):
    Python's ``round`` takes halves to even, so for odd ``length - crop`` it is ``(length - crop) // 2`` or one more
    (transformers always takes ``(length - crop) // 2``)."""
    return int(round((length - crop) / 2.0))


def max_size_edges(height: int, width: int, size: int) -> tuple[int, int]:
    """OpenCLIP / HPSv2 ``ResizeMaxSize``'s output size: each edge ``round(edge * size / longest)``."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


# ---------------------------------------------------------------- the scorers' transforms


@functools.partial(jax.jit, static_argnames=("size", "crop", "mean", "std", "order"))
def clip_preprocess(
    images: jax.Array,
    *,
    size: int,
    crop: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    order: str = "pillow13",
) -> jax.Array:
    """transformers' ``CLIPImageProcessor`` (PIL path): uint8 (or float in [0, 1], quantised by :func:`as_uint8`)
    ``[B,H,W,3]`` -> float32 ``[B,crop,crop,3]``. ``order``: PIL's pass order (:func:`pil_resize`).

    ``mean`` / ``std`` are tuples (static). Raises ValueError when ``crop`` exceeds the resized image."""
    h, w = images.shape[1:3]
    new_h, new_w = shortest_edge_size(h, w, size)
    if crop > min(new_h, new_w):
        raise ValueError(f"clip_preprocess: crop {crop} is larger than the resized {h}x{w} image ({new_h}x{new_w})")
    x = pil_resize(as_uint8(images), new_h, new_w, order=order)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return _normalise(x[:, top : top + crop, left : left + crop], mean, std)


@functools.partial(jax.jit, static_argnames=("size", "crop", "mean", "std"))
def torchvision_clip_preprocess(
    images: jax.Array, *, size: int, crop: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> jax.Array:
    """DiffusionNFT's / Flow-GRPO's ``ClipScorer`` transform (``flow_grpo/clip_scorer.py``,
    ``T.Compose([T.Resize(size), T.CenterCrop(crop), T.Normalize(mean, std)])`` on float tensors in [0, 1]): float in
    [0, 1] (or uint8, divided by 255) ``[B,H,W,3]`` -> float32 ``[B,crop,crop,3]``. Shortest edge to ``size``,
    bilinear with antialiasing (:func:`torch_resize`; none when the size is kept), centre crop at
    :func:`torchvision_crop_offset`, ``(x - mean) / std``.

    Raises ValueError when ``crop`` exceeds the resized image (torchvision would pad it with zeros)."""
    h, w = images.shape[1:3]
    new_h, new_w = shortest_edge_size(h, w, size)
    if crop > min(new_h, new_w):
        raise ValueError(f"torchvision_clip_preprocess: crop {crop} is larger than the resized {h}x{w} image ({new_h}x{new_w})")
    x = torch_resize(as_unit_float(images), new_h, new_w, "bilinear")
    top, left = torchvision_crop_offset(new_h, crop), torchvision_crop_offset(new_w, crop)
    return _normalise_float(x[:, top : top + crop, left : left + crop], mean, std)


@functools.partial(jax.jit, static_argnames=("size", "mean", "std"))
def resize_max_and_pad(
    images: jax.Array, size: int, *, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> jax.Array:
    """HPSv2's evaluation transform on tensors (its ``ResizeMaxSize`` after ``ToTensor``; DiffusionNFT's
    ``flow_grpo/hpsv2_scorer.py`` ``image_transform_tensor``): float in [0, 1] (or uint8, divided by 255)
    ``[B,H,W,3]`` -> float32 ``[B,size,size,3]``.

    Each edge becomes ``round(edge * size / longest)`` (bicubic with antialiasing, :func:`torch_resize`; not
    clipped), the rest is zero padding split ``pad // 2`` before, the remainder after; then ``(x - mean) / std``
    (padding included, as HPSv2 pads before normalising). An image whose longest edge is already ``size`` is padded
    too (HPSv2 would leave a non-square one unpadded, which cannot be batched)."""
    h, w = images.shape[1:3]
    new_h, new_w = max_size_edges(h, w, size)
    x = torch_resize(as_unit_float(images), new_h, new_w, "bicubic")
    pad_h, pad_w = size - new_h, size - new_w
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    return _normalise_float(x, mean, std)


@dataclasses.dataclass(frozen=True)
class ProcessorSpec:
    """The fields of a ``CLIPImageProcessor`` config that the CLIP transforms take, and which transform applies them:
    ``backend`` "pil" (:func:`clip_preprocess`, transformers' processor, with PIL pass order ``order``) or
    "torchvision" (:func:`torchvision_clip_preprocess`, the public ``ClipScorer``'s transform built from the same
    config; it ignores the config's ``resample``)."""

    size: int
    crop: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    backend: str = "pil"
    order: str = "pillow13"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"ProcessorSpec: backend {self.backend!r} is not one of {BACKENDS}")
        if self.order not in PIL_ORDERS:
            raise ValueError(f"ProcessorSpec: order {self.order!r} is not one of {PIL_ORDERS}")

    def __call__(self, images: jax.Array) -> jax.Array:
        """uint8 or float in [0, 1] ``[B,H,W,3]`` -> normalised float32 ``[B,crop,crop,3]``."""
        if self.backend == "torchvision":
            return torchvision_clip_preprocess(images, size=self.size, crop=self.crop, mean=self.mean, std=self.std)
        return clip_preprocess(images, size=self.size, crop=self.crop, mean=self.mean, std=self.std, order=self.order)

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
