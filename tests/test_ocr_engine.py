"""The OCR reward on real images: real tesseract reading PIL-rendered text, and the engines' error paths."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from marble_jax.rewards import ocr_engine
from marble_jax.rewards.ocr_engine import ocr, ocr_reward, paddle2_text, paddle3_text, tesseract_reader

SIZE = 512


def text_font(size: int = 64) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (matplotlib's copy or the system's), else the TrueType font bundled with Pillow."""
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin is not None:
        candidates.insert(0, Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")
    for path in candidates:
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def render(text: str) -> np.ndarray:
    """Black ``text`` centred on a white uint8 ``[512, 512, 3]`` image (blank for "")."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    if text:
        draw = ImageDraw.Draw(image)
        font = text_font()
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text(((SIZE - right + left) // 2 - left, (SIZE - bottom + top) // 2 - top), text, fill="black", font=font)
    return np.asarray(image)


def test_tesseract_reward_on_rendered_text():
    rendered = ["Sunshine", "Sunshie", "", "Garden", "Hello World"]
    prompts = [
        'a sign that says "Sunshine"',
        'a poster reading "Sunshine"',  # the image misses one letter
        'a blank page with "Marble" on it',  # a blank image
        "a garden with no quoted text",  # not read at all
        'a banner with "World" on it',  # the target is part of longer recognised text
    ]
    images = np.stack([render(t) for t in rendered])
    real = tesseract_reader(workers=2)
    seen: list[np.ndarray] = []

    def spy(batch: np.ndarray) -> list[str]:
        seen.append(batch.copy())
        return real(batch)

    reward_fn = ocr_reward(spy)
    rewards = reward_fn(images, prompts, [None] * 5)

    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], images[[0, 1, 2, 4]])  # the unquoted prompt's image is never read
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards[[0, 1, 2, 4]], np.float32([1.0, 1 - 1 / len("sunshine"), 0.0, 1.0]))
    assert np.isnan(rewards[3])
    np.testing.assert_array_equal(reward_fn.applies(prompts, [None] * 5), [True, True, True, False, True])


def test_ocr_factory_reads_with_tesseract():
    reward_fn = ocr(workers=1)
    prompts = ['"Marble"', 'a "Marbles" sign', "no quote"]  # "marble" is one deletion from "marbles"
    rewards = reward_fn(np.stack([render("Marble"), render("Marble"), render("Marble")]), prompts, [None] * 3)
    np.testing.assert_array_equal(rewards[:2], np.float32([1.0, 1 - 1 / len("marbles")]))
    assert np.isnan(rewards[2])


def test_tesseract_reader_threads_keep_order(monkeypatch):
    import pytesseract

    threads = set()

    def fake_image_to_string(image, lang, config):  # test double of the tesseract subprocess
        threads.add(threading.get_ident())
        time.sleep(0.05)
        return f"{int(np.asarray(image)[0, 0, 0])}\nline two"

    monkeypatch.setattr(pytesseract, "image_to_string", fake_image_to_string)
    images = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((6, 4, 4, 3), np.uint8)
    assert tesseract_reader(workers=3)(images) == [f"{i} line two" for i in range(6)]
    assert len(threads) > 1


def test_tesseract_missing_binary_names_the_packages(monkeypatch):
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    with pytest.raises(FileNotFoundError, match=r"apt-get install tesseract-ocr.*pip install pytesseract"):
        ocr()


def test_tesseract_missing_python_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytesseract", None)
    with pytest.raises(ImportError, match="pip install pytesseract"):
        ocr()


def test_tesseract_missing_language_names_its_package():
    with pytest.raises(ValueError, match="apt-get install tesseract-ocr-chi-sim"):
        ocr(lang="eng+chi_sim")


def test_paddle_missing_names_the_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # absent, even where it is installed
    with pytest.raises(ImportError, match="pip install paddleocr paddlepaddle"):
        ocr(engine="paddle")


def test_paddle_result_texts():
    box = [[0, 0], [1, 0], [1, 1], [0, 1]]
    # paddleocr 2.x: one entry per image, [[box, (text, confidence)], ...] or None.
    assert paddle2_text([[[box, ("Hello", 0.98)], [box, ("noise", 0.0)], [box, ("World", 0.7)]]]) == "Hello World"
    assert paddle2_text([None]) == ""
    # paddleocr 3.x: result mappings with rec_texts / rec_scores.
    assert paddle3_text([{"rec_texts": ["Hello", "x", "Wor ld"], "rec_scores": [0.9, 0.0, 0.8]}]) == "Hello Wor ld"
    assert paddle3_text([{"rec_texts": [], "rec_scores": []}]) == ""


def test_unknown_engine():
    with pytest.raises(ValueError, match="'easyocr'.*tesseract, paddle"):
        ocr(engine="easyocr")


def test_reader_count_mismatch_is_an_error():
    reward_fn = ocr_reward(lambda images: ["x"])
    with pytest.raises(ValueError, match="1 strings for 2 images"):
        reward_fn(np.zeros((2, 8, 8, 3), np.uint8), ['"a"', '"b"'], [None, None])


def test_default_thread_count():
    assert ocr_engine.thread_count(3) == 3
    assert 1 <= ocr_engine.thread_count(0) <= 4
