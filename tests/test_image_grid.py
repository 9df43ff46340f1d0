"""Image grids: shapes, where each cell lands (scaled, padded, missing cells white) and the PNG roundtrip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from marble_jax.image_grid import grid, save_grid


def _images(n: int, h: int = 3, w: int = 2) -> np.ndarray:
    """uint8 [n, h, w, 3] random images with no white pixel (so white in a grid is padding or an empty cell)."""
    rng = np.random.default_rng(n * 100 + h * 10 + w)
    return rng.integers(0, 250, size=(n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "n, cols, scale, pad, shape",
    [
        (6, 3, 1, 0, (6, 6, 3)),
        (6, 3, 1, 1, (7, 8, 3)),
        (7, 3, 2, 1, (3 * 6 + 2, 3 * 4 + 2, 3)),
        (2, 5, 1, 2, (3, 5 * 2 + 8, 3)),
        (1, 1, 4, 3, (12, 8, 3)),
    ],
)
def test_shapes(n, cols, scale, pad, shape):
    assert grid(_images(n), cols, scale=scale, pad=pad).shape == shape


def test_cell_placement_scale_and_padding():
    images = _images(5)
    out = grid(images, cols=2, scale=3, pad=2)  # 3 rows x 2 cols of 9 x 6 cells
    assert out.dtype == np.uint8 and out.shape == (3 * 9 + 4, 2 * 6 + 2, 3)
    for i in range(5):
        y, x = (i // 2) * 11, (i % 2) * 8
        cell = out[y : y + 9, x : x + 6]
        for dy in range(3):  # nearest neighbour: each pixel a 3 x 3 block
            for dx in range(3):
                np.testing.assert_array_equal(cell[dy::3, dx::3], images[i])
    assert (out[9:11] == 255).all() and (out[20:22] == 255).all()  # padding rows
    assert (out[:, 6:8] == 255).all()  # padding column
    assert (out[22:, 8:] == 255).all()  # the missing sixth cell


def test_no_padding_is_concatenation():
    images = _images(6)
    want = np.concatenate([np.concatenate(list(images[r * 3 : r * 3 + 3]), axis=1) for r in range(2)], axis=0)
    np.testing.assert_array_equal(grid(images, cols=3, pad=0), want)
    np.testing.assert_array_equal(grid(images, cols=3, scale=2, pad=0), want.repeat(2, axis=0).repeat(2, axis=1))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"uint8 images .*float32 \(2, 3, 2, 3\)"):
        grid(_images(2).astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 4\)"):
        grid(np.zeros((2, 3, 2, 4), np.uint8), 2)
    with pytest.raises(ValueError, match=r"\(3, 2, 3\)"):
        grid(_images(1)[0], 1)
    with pytest.raises(ValueError, match=r"\(0, 3, 2, 3\)"):
        grid(_images(0), 1)
    with pytest.raises(ValueError, match="cols=0"):
        grid(_images(2), 0)
    with pytest.raises(ValueError, match="scale=0"):
        grid(_images(2), 1, scale=0)


def test_png_roundtrip(tmp_path):
    images = _images(5, 4, 4)
    path = save_grid(images, tmp_path / "a" / "b" / "grid.png", cols=3, scale=2, pad=1)
    assert path == tmp_path / "a" / "b" / "grid.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), grid(images, 3, scale=2, pad=1))
