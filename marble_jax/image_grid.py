"""Image grids for sample sheets: one array layout (:func:`grid`) and its PNG writer (:func:`save_grid`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def grid(images: np.ndarray, cols: int, scale: int = 1, pad: int = 1) -> np.ndarray:
    """uint8 ``[rows * H * scale + (rows - 1) * pad, cols * W * scale + (cols - 1) * pad, 3]`` from uint8
    ``[N, H, W, 3]`` images, ``rows = ceil(N / cols)``: image ``i`` in row ``i // cols``, column ``i % cols``,
    each upscaled ``scale`` x (nearest neighbour), ``pad`` white pixels between cells, missing cells white."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"grid needs uint8 images [N >= 1, H, W, 3], got {images.dtype} {images.shape}")
    if cols < 1 or scale < 1 or pad < 0:
        raise ValueError(f"grid needs cols >= 1, scale >= 1, pad >= 0; got cols={cols}, scale={scale}, pad={pad}")
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    ch, cw = h * scale, w * scale
    out = np.full((rows * ch + (rows - 1) * pad, cols * cw + (cols - 1) * pad, 3), 255, np.uint8)
    cells = images.repeat(scale, axis=1).repeat(scale, axis=2)
    for i, cell in enumerate(cells):
        y, x = (i // cols) * (ch + pad), (i % cols) * (cw + pad)
        out[y : y + ch, x : x + cw] = cell
    return out


def save_grid(images: np.ndarray, path: str | Path, cols: int, scale: int = 1, pad: int = 1) -> Path:
    """Writes :func:`grid` of ``images`` (uint8 ``[N, H, W, 3]``) to the PNG ``path``, creating its parent
    directories; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(images, cols, scale=scale, pad=pad)).save(path, format="PNG")
    return path
