"""The OCR reward on real images: real tesseract reading PIL-rendered text, and the engines' error paths."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from marble_jax.rewards import ocr_engine
from marble_jax.rewards.ocr_engine import ocr, ocr_reward, paddle2_text, paddle3_text, tesseract_reader

SIZE = 512
needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None or importlib.util.find_spec("pytesseract") is None,
    reason="the tesseract binary or pytesseract is not installed",
)


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


def pytesseract_texts(images: np.ndarray, config: str = ocr_engine.TESSERACT_CONFIG) -> list[str]:
    """One pytesseract run per image (the reader's former path): the texts the chunked reader must reproduce."""
    import pytesseract

    return [ocr_engine.join_lines(pytesseract.image_to_string(Image.fromarray(im), lang="eng", config=config)) for im in images]


def noisy_scene(seed: int, word: str) -> np.ndarray:
    """A harder page: a colour gradient, ellipses, ``word`` light on dark, blur and noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIZE)[:, None, None]
    base = (1 - ramp) * rng.integers(0, 256, 3) + ramp * rng.integers(0, 256, 3)
    image = Image.fromarray(np.broadcast_to(base, (SIZE, SIZE, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, SIZE, 2)
        draw.ellipse([x, y, x + rng.integers(30, 200), y + rng.integers(30, 200)], fill=tuple(rng.integers(0, 256, 3).tolist()))
    draw.rectangle([60, 200, 452, 312], fill="black")
    draw.text((80, 220), word, fill="white", font=text_font(56))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), np.float32) + rng.normal(0, 8, (SIZE, SIZE, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


WORDS = ["Sunshine", "Garden", "", "Hello World", "Marble", "Quartz", "Lantern", "OPEN 24h"]


@needs_tesseract
def test_chunked_reads_match_one_run_per_image(monkeypatch):
    """Chunked multi-page runs (1, 2, 3 processes) and one process per image read each image as pytesseract does."""
    images = np.stack([render(w) for w in WORDS] + [noisy_scene(i, w) for i, w in enumerate(WORDS[:4])])
    expected = pytesseract_texts(images)
    assert expected[:2] == ["Sunshine", "Garden"] and expected[2] == ""  # the pages are told apart, in order
    for workers in (1, 2, 3):
        reader = tesseract_reader(workers=workers)
        assert reader.chunked  # the installed data runs the LSTM engine alone
        assert reader(images) == expected
        reader.close()
    monkeypatch.setattr(ocr_engine, "lstm_only", lambda *args: False)  # as with legacy-engine data: one image per process
    reader = tesseract_reader(workers=2)
    assert not reader.chunked
    assert reader(images) == expected


@needs_tesseract
def test_reward_identical_across_workers():
    """The OCR reward's scores with 1 and 2 tesseract processes (and the default) are identical, in order."""
    words = ["Sunshine", "Garden", "Hello World", "Marble", "Reward", "Quartz"]
    prompts = [f'a sign that says "{w}"' for w in words] + ['a poster reading "Sunshine"', "no quote"]
    images = np.stack([render(w) for w in words] + [render("Sunshie"), render("x")])
    scores = {w: ocr(workers=w)(images, prompts, [None] * len(prompts)) for w in (0, 1, 2)}
    np.testing.assert_array_equal(scores[1][:7], np.float32([1, 1, 1, 1, 1, 1, 1 - 1 / len("sunshine")]))
    assert np.isnan(scores[1][7])
    np.testing.assert_array_equal(scores[0], scores[1])
    np.testing.assert_array_equal(scores[2], scores[1])


@needs_tesseract
def test_tesseract_reader_chunks_keep_order(monkeypatch):
    threads, sizes = set(), []

    def fake_pages(images, cmd, lang, config, env):  # test double of one tesseract process over a chunk
        threads.add(threading.get_ident())
        sizes.append(len(images))
        assert env["OMP_THREAD_LIMIT"] == "1"
        time.sleep(0.05)
        return [f"{int(image[0, 0, 0])} line" for image in images]

    monkeypatch.delenv("OMP_THREAD_LIMIT", raising=False)
    monkeypatch.setattr(ocr_engine, "tesseract_pages", fake_pages)
    images = np.arange(7, dtype=np.uint8)[:, None, None, None] * np.ones((7, 4, 4, 3), np.uint8)
    reader = tesseract_reader(workers=3)
    assert reader(images) == [f"{i} line" for i in range(7)]
    assert sorted(sizes) == [2, 2, 3] and len(threads) > 1  # three contiguous chunks on the pool's threads
    sizes.clear()
    assert reader(images[:2]) == ["0 line", "1 line"] and sorted(sizes) == [1, 1]
    reader.close()
    monkeypatch.setattr(ocr_engine, "lstm_only", lambda *args: False)
    sizes.clear()
    assert tesseract_reader(workers=3)(images) == [f"{i} line" for i in range(7)]
    assert sizes == [1] * 7


def test_tesseract_env_keeps_a_set_omp_limit(monkeypatch):
    monkeypatch.setenv("OMP_THREAD_LIMIT", "4")
    assert ocr_engine.tesseract_env()["OMP_THREAD_LIMIT"] == "4"
    monkeypatch.delenv("OMP_THREAD_LIMIT")
    assert ocr_engine.tesseract_env()["OMP_THREAD_LIMIT"] == "1"


@needs_tesseract
def test_tesseract_failure_raises():
    with pytest.raises(RuntimeError, match="tesseract exited with status"):
        ocr_engine.tesseract_pages(np.zeros((2, 32, 32, 3), np.uint8), "tesseract", "eng", "--psm 99", os.environ)


@needs_tesseract
def test_lstm_only_reads_the_engine_mode():
    assert ocr_engine.lstm_only("tesseract", "eng", ocr_engine.TESSERACT_CONFIG)
    assert not ocr_engine.lstm_only("false", "eng", "")  # no answer: one image per process


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


def test_default_thread_count(monkeypatch):
    assert ocr_engine.thread_count(3) == 3
    monkeypatch.setattr(ocr_engine, "usable_cpus", lambda: 2)
    assert ocr_engine.thread_count(0) == 2
    monkeypatch.setattr(ocr_engine, "usable_cpus", lambda: 64)
    assert ocr_engine.thread_count(0) == 8
