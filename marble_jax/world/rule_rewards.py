"""The world's rule rewards: ``world_geneval`` (a pixel detector) and ``world_ocr`` (a pixel-font
reader), feeding the engine-agnostic formulas of :mod:`marble_jax.rewards`; and ``world_brightness``, a
deliberately hackable one for the reward-hacking monitors (:func:`world_brightness`).

Both start from the same per-pixel colour model. The world's images are palette colours over a
plain background, and blur mixes a colour with the background, so each pixel ``x`` is explained
as ``bg + a (c_k - bg)`` for the palette colour ``c_k`` whose line fits best (smallest residual
``|x - bg - a (c_k - bg)|``). The pixel is foreground of colour k when ``a >= MIN_ALPHA`` (more
than half-way from the background to the colour) and the residual is at most ``MAX_RESIDUAL``
(colours off every line, e.g. a mid-way mix of two palette colours, count as background).

Detector: 8-connected components per colour; components under ``MIN_AREA`` pixels are dropped
(noise specks) and the score is ``min(1, area / FULL_AREA)``, so only whole objects pass
GenEval's counting threshold 0.9 (the world's smallest object has 16 pixels). Shape from the
component's bounding box ``h x w``: a fill difference of at least ``TRIANGLE_ASYMMETRY`` between
the top and bottom thirds of the rows is a triangle (checked first: a blurred triangle that lost
its apex is as elongated as a bar); else an aspect ratio ``>= BAR_ASPECT`` is a bar (bars are
>= 3.3, triangles ~1.9); else the four corner patches (side ``max(1, round(min(h, w) / 4))``)
mostly full is a square, mostly empty a circle.

Reader: foreground strength ``min(a, 1)`` (0 off the colour lines); the text box is the bounding
box of foreground pixels with at least 2 foreground 8-neighbours (isolated specks ignored); the
glyph scale is ``round(box height / 5)``, the number of letters ``round((box width + scale) /
(4 scale))``; each 3x5-cell glyph is averaged per cell and read as the nearest template (squared
distance), the box origin being refined by +-1 pixel to the best total fit.

Thresholds: ``MAX_RESIDUAL = 60`` is about 3x the mean off-line residual of Gaussian noise of
std 16 (0-255 scale); colours are told apart by the smallest residual, and a palette colour is
at least 104 from every other colour's line (52 at ``a = 0.5``).
Measured on the generator's ground-truth renders (strict GenEval / OCR, all exact = 100% unless
stated): 1000 scenes clean, with noise std 8 or 16, with a 3x3 [1, 2, 1] blur, blur + noise 8;
800 scenes with noise std 24, Gaussian blur sigma 0.7, sigma 1.0 (OCR 99%), blur 0.7 + noise 16
(GenEval 99.8%), noise std 32 (GenEval 98%, OCR 99%).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from marble_jax.rewards import geneval_rules
from marble_jax.rewards.ocr import ocr_scores, ocr_target
from marble_jax.world import font
from marble_jax.world.scenes import BACKGROUND, COLORS, PALETTE

MIN_ALPHA = 0.5
MAX_RESIDUAL = 60.0
MIN_AREA = 4
FULL_AREA = 12
BAR_ASPECT = 2.2
TRIANGLE_ASYMMETRY = 0.35

_BG = np.array(BACKGROUND, np.float32)
_DIRS = np.array([PALETTE[c] for c in COLORS], np.float32) - _BG  # [K, 3]


def pixel_colors(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour model of the module docstring for uint8 ``[..., H, W, 3]``: ``(label [..., H, W] int,
    index into COLORS or -1 for background; strength [..., H, W] in [0, 1])``."""
    x = images.astype(np.float32) - _BG
    a = np.maximum(x @ _DIRS.T / (_DIRS**2).sum(-1), 0)  # [..., H, W, K]
    resid = np.linalg.norm(x[..., None, :] - a[..., None] * _DIRS, axis=-1)
    k = resid.argmin(-1)
    a_k = np.take_along_axis(a, k[..., None], -1)[..., 0]
    on_line = np.take_along_axis(resid, k[..., None], -1)[..., 0] <= MAX_RESIDUAL
    label = np.where(on_line & (a_k >= MIN_ALPHA), k, -1)
    return label, np.where(on_line, np.minimum(a_k, 1), 0)


def classify_shape(mask: np.ndarray) -> str:
    """Class of one object from its bool mask cropped to its bounding box ``[h, w]``."""
    h, w = mask.shape
    t = max(1, round(h / 3))
    if abs(mask[:t].mean() - mask[-t:].mean()) >= TRIANGLE_ASYMMETRY:
        return "triangle"
    if max(h, w) >= BAR_ASPECT * min(h, w):
        return "bar"
    k = max(1, round(min(h, w) / 4))
    corners = (mask[:k, :k].mean() + mask[:k, -k:].mean() + mask[-k:, :k].mean() + mask[-k:, -k:].mean()) / 4
    return "square" if corners >= 0.5 else "circle"


def detect(image: np.ndarray) -> list[geneval_rules.Detection]:
    """Detections (class, score, box, colour, mask) in one uint8 ``[H, W, 3]`` image."""
    return _detect_labels(pixel_colors(image)[0])


def _detect_labels(label: np.ndarray) -> list[geneval_rules.Detection]:
    dets = []
    for k in np.unique(label[label >= 0]):
        comps, _ = ndimage.label(label == k, structure=np.ones((3, 3)))
        for i, sl in enumerate(ndimage.find_objects(comps), 1):
            mask = comps == i
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            name = classify_shape(mask[sl])
            dets.append(geneval_rules.Detection(name, min(1.0, area / FULL_AREA), box, COLORS[k], mask))
    return dets


def read_text(image: np.ndarray) -> str:
    """The pixel-font word in one uint8 ``[H, W, 3]`` image ("" when there is no foreground)."""
    return _read_strength(pixel_colors(image)[1])


def _read_strength(strength: np.ndarray) -> str:
    fg = strength >= MIN_ALPHA
    fg &= ndimage.convolve(fg.astype(np.int32), np.ones((3, 3), np.int32), mode="constant") - fg >= 2
    if not fg.any():
        return ""
    ys, xs = np.nonzero(fg)
    y0, x0 = ys.min(), xs.min()
    scale = max(1, round((ys.max() + 1 - y0) / font.GLYPH_H))
    pitch = (font.GLYPH_W + font.SPACING) * scale
    n = max(1, round((xs.max() + 1 - x0 + scale) / pitch))
    pad = pitch  # room for the +-1 origin shifts and a rounded-up letter count
    padded = np.pad(strength, pad)
    best = (np.inf, "")
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            oy, ox = y0 + dy + pad, x0 + dx + pad
            text, cost = [], 0.0
            for i in range(n):
                cell = padded[oy : oy + font.GLYPH_H * scale, ox + i * pitch : ox + i * pitch + font.GLYPH_W * scale]
                cell = cell.reshape(font.GLYPH_H, scale, font.GLYPH_W, scale).mean((1, 3))
                d = ((font.TEMPLATES - cell) ** 2).sum((1, 2))
                text.append(font.LETTERS[d.argmin()])
                cost += d.min()
            best = min(best, (cost, "".join(text)))
    return best[1]


def world_geneval(
    strict: bool = False,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_slack: float = 0.1,
):
    """GenEval reward on the world's images: :func:`geneval_rules.partial_score` (training) or,
    with ``strict``, :func:`geneval_rules.strict_score` (evaluation); NaN without metadata."""
    score = geneval_rules.strict_score if strict else geneval_rules.partial_score
    opts = dict(threshold=threshold, counting_threshold=counting_threshold, position_slack=position_slack)

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 ``[B]`` GenEval scores of uint8 ``[B, H, W, 3]`` images."""
        out = np.full(len(images), np.nan, np.float32)
        idx = [i for i, m in enumerate(metadata) if m is not None]
        for i, label in zip(idx, pixel_colors(images[idx])[0], strict=True):
            out[i] = score(metadata[i], _detect_labels(label), **opts)
        return out

    reward_fn.applies = lambda prompts, metadata: np.array([m is not None for m in metadata], bool)
    return reward_fn


def world_ocr():
    """OCR reward on the world's images: :func:`read_text` + :func:`marble_jax.rewards.ocr.ocr_scores`."""

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 ``[B]`` OCR rewards of uint8 ``[B, H, W, 3]`` images, NaN without quoted text."""
        text = [""] * len(images)
        idx = [i for i, p in enumerate(prompts) if ocr_target(p) is not None]
        for i, strength in zip(idx, pixel_colors(images[idx])[1], strict=True):
            text[i] = _read_strength(strength)
        return ocr_scores(text, prompts)

    reward_fn.applies = lambda prompts, metadata: np.array([ocr_target(p) is not None for p in prompts], bool)
    return reward_fn


def world_brightness():
    """A deliberately hackable reward, to test the reward-hacking monitors (:mod:`marble_jax.monitors`): the mean
    luma ``0.299 R + 0.587 G + 0.114 B`` of the image in [0, 1], whatever the prompt (it applies to every prompt).
    It pays for brightening the world's dark background, i.e. for wiping the scene: a policy trained on it brightens
    while the prompt-faithful and aesthetic scores fall."""
    from marble_jax.monitors import LUMA_WEIGHTS

    weights = np.asarray(LUMA_WEIGHTS, np.float32) / 255.0

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 ``[B]`` mean luma of uint8 ``[B, H, W, 3]`` images."""
        return (images.astype(np.float32) @ weights).mean(axis=(1, 2))

    return reward_fn
