"""The OCR reward on real images: a text recogniser feeding the formula of :mod:`marble_jax.rewards.ocr`.

A recogniser (``Reader``) maps images uint8 ``[B, H, W, 3]`` to ``B`` recognised strings. ``ocr(engine,
...)`` builds one and returns the reward function: NaN for prompts without quoted text, whose images
are not even passed to the recogniser; ``reward_fn.applies`` = the prompt quotes some text.

Engines (host-side, CPU):

- ``"tesseract"`` (the offline default): pytesseract over the tesseract binary (Debian package
  ``tesseract-ocr``). ``config`` holds tesseract's command-line options, by default
  ``TESSERACT_CONFIG = "--psm 6 -c thresholding_method=2"``: page segmentation "one uniform block
  of text" with Sauvola local binarisation. Chosen on 36 synthetic 512x512 scenes (vertical colour
  gradient, six coloured ellipses, one sign with dark-on-light or light-on-dark text, DejaVu Sans /
  Serif Bold / Sans Mono at 36-72 px, Gaussian blur 0.8), mean reward without / with added noise of
  std 8: ``--psm 6`` + Sauvola 0.68 / 0.63, ``--psm 3`` + Sauvola 0.70 / 0.50, ``--psm 11`` (sparse
  text) + Sauvola 0.48 / 0.68, and with tesseract's default global Otsu threshold ``--psm 3`` 0.42 /
  0.42, ``--psm 6`` 0.51 / 0.46, ``--psm 11`` 0.27 / 0.35 (synthetic scenes, not SD3.5 images: a
  relative comparison). On black text over white every mode read our test words exactly.
  Each image is one tesseract subprocess, so ``workers`` threads read images in parallel (the GIL
  is released while waiting); tesseract's own OpenMP threads add up with them, and setting
  ``OMP_THREAD_LIMIT=1`` in the environment avoids oversubscribing the cores.
- ``"paddle"``: PaddleOCR on the CPU, as the public Flow-GRPO reward (paddleocr 2.x:
  ``PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)``, ``ocr(img,
  cls=False)``; paddleocr 3.x, which renamed those options and dropped ``use_gpu`` / ``show_log``:
  ``PaddleOCR(use_doc_orientation_classify=False, use_doc_unwarping=False,
  use_textline_orientation=False, lang="en", device="cpu")``, ``predict(img)``). The texts of the
  detected lines with a positive confidence are joined. The image array is passed as is, as
  Flow-GRPO does. One predictor reads the images one after the other (``workers`` must be 0 or 1).

The recognised lines are joined with single spaces (the formula drops spaces, so text broken over
two lines still matches). A recogniser failure raises: a missing read is a fault, not a zero reward.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from marble_jax.rewards.ocr import ocr_scores, ocr_target

Reader = Callable[[np.ndarray], list[str]]

ENGINES = ("tesseract", "paddle")
TESSERACT_CONFIG = "--psm 6 -c thresholding_method=2"
# Tesseract's language codes that PaddleOCR spells differently.
PADDLE_LANGS = {"eng": "en"}


def ocr(engine: str = "tesseract", lang: str = "eng", workers: int = 0, **options):
    """The OCR reward function read by ``engine`` (``"tesseract"`` or ``"paddle"``) in language ``lang``
    (tesseract's code, e.g. ``"eng"`` or ``"eng+deu"``; ``"eng"`` is ``"en"`` for paddle) with
    ``workers`` threads (0: ``min(4, cpu count)``); ``options`` go to the engine (tesseract:
    ``config``; paddle: ``PaddleOCR`` keyword arguments)."""
    if engine == "tesseract":
        reader = tesseract_reader(lang=lang, workers=workers, **options)
    elif engine == "paddle":
        reader = paddle_reader(lang=lang, workers=workers, **options)
    else:
        raise ValueError(f"unknown OCR engine {engine!r}; engines: {', '.join(ENGINES)}")
    return ocr_reward(reader)


def ocr_reward(reader: Reader):
    """The reward function ``(images uint8 [B, H, W, 3], prompts, metadata) -> float32 [B]`` over ``reader``;
    only the images whose prompt quotes some text are read."""

    def applies(prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        return np.array([ocr_target(p) is not None for p in prompts], bool)

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        read = np.flatnonzero(applies(prompts, metadata))
        texts = [""] * len(prompts)
        if read.size:
            recognised = reader(images[read])
            if len(recognised) != read.size:
                raise ValueError(f"OCR reader returned {len(recognised)} strings for {read.size} images")
            for i, text in zip(read, recognised, strict=True):
                texts[i] = text
        return ocr_scores(texts, prompts)

    reward_fn.applies = applies
    return reward_fn


def thread_count(workers: int) -> int:
    """``workers`` when positive, else ``min(4, cpu count)``."""
    return workers if workers > 0 else min(4, os.cpu_count() or 1)


def join_lines(text: str) -> str:
    """Whitespace runs (line breaks included) as single spaces, trimmed."""
    return " ".join(text.split())


def tesseract_reader(lang: str = "eng", workers: int = 0, config: str = TESSERACT_CONFIG) -> Reader:
    """A reader running the tesseract binary through pytesseract, ``workers`` images at a time; checks
    now that the binary and the language data are installed."""
    try:
        import pytesseract
    except ImportError as e:
        raise ImportError(
            "OCR engine 'tesseract' needs pytesseract and the tesseract binary: pip install pytesseract; "
            "apt-get install tesseract-ocr (Debian/Ubuntu)"
        ) from e
    from PIL import Image

    cmd = pytesseract.pytesseract.tesseract_cmd
    if shutil.which(cmd) is None:
        raise FileNotFoundError(
            f"OCR engine 'tesseract': the tesseract binary {cmd!r} is not installed or not on PATH: "
            "apt-get install tesseract-ocr (Debian/Ubuntu), and pip install pytesseract"
        )
    installed = pytesseract.get_languages(config=config)
    missing = [code for code in lang.split("+") if code not in installed]
    if missing:
        packages = " ".join(f"tesseract-ocr-{code.replace('_', '-').lower()}" for code in missing)
        raise ValueError(
            f"OCR engine 'tesseract': no language data for {', '.join(missing)} (lang={lang!r}; installed: "
            f"{', '.join(installed)}): apt-get install {packages}"
        )
    threads = thread_count(workers)

    def read_one(image: np.ndarray) -> str:
        return join_lines(pytesseract.image_to_string(Image.fromarray(image), lang=lang, config=config))

    def reader(images: np.ndarray) -> list[str]:
        if threads == 1 or len(images) < 2:
            return [read_one(image) for image in images]
        with ThreadPoolExecutor(min(threads, len(images))) as pool:
            return list(pool.map(read_one, images))

    return reader


def paddle_reader(lang: str = "eng", workers: int = 0, **options) -> Reader:
    """A reader over one PaddleOCR predictor on the CPU (paddleocr 2.x or 3.x), reading images in turn."""
    try:
        from paddleocr import PaddleOCR
    except ImportError as e:
        raise ImportError(
            "OCR engine 'paddle' needs PaddleOCR and PaddlePaddle, which are not installed: "
            "pip install paddleocr paddlepaddle (or use engine='tesseract')"
        ) from e
    if workers > 1:
        raise ValueError(f"OCR engine 'paddle' reads with one predictor, one image at a time: workers={workers}, use 0 or 1")
    lang = PADDLE_LANGS.get(lang, lang)
    if int(importlib.metadata.version("paddleocr").split(".")[0]) >= 3:
        defaults = dict(use_doc_orientation_classify=False, use_doc_unwarping=False, use_textline_orientation=False)
        model = PaddleOCR(**{**defaults, "lang": lang, "device": "cpu", **options})

        def read_one(image: np.ndarray) -> str:
            return paddle3_text(model.predict(image))

    else:
        model = PaddleOCR(**{"use_angle_cls": False, "lang": lang, "use_gpu": False, "show_log": False, **options})

        def read_one(image: np.ndarray) -> str:
            return paddle2_text(model.ocr(image, cls=False))

    def reader(images: np.ndarray) -> list[str]:
        return [read_one(image) for image in images]

    return reader


def paddle2_text(result: list) -> str:
    """The text of paddleocr 2.x's ``ocr(img)`` result for one image, ``[[box, (text, confidence)], ...]``
    per image (``[None]`` when nothing was detected): lines with a positive confidence, joined."""
    lines = result[0] or []
    return join_lines(" ".join(text for _, (text, confidence) in lines if confidence > 0))


def paddle3_text(results: list) -> str:
    """The text of paddleocr 3.x's ``predict(img)`` results (mappings with ``rec_texts`` and ``rec_scores``):
    lines with a positive confidence, joined."""
    texts = [t for r in results for t, s in zip(r["rec_texts"], r["rec_scores"], strict=True) if s > 0]
    return join_lines(" ".join(texts))
