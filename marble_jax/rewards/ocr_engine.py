"""The OCR reward on real images: a text recogniser feeding the formula of :mod:`marble_jax.rewards.ocr`.

A recogniser (``Reader``) maps images uint8 ``[B, H, W, 3]`` to ``B`` recognised strings. ``ocr(engine,
...)`` builds one and returns the reward function: NaN for prompts without quoted text, whose images
are not even passed to the recogniser; ``reward_fn.applies`` = the prompt quotes some text.

Engines (host-side, CPU):

- ``"tesseract"`` (the offline default): the tesseract binary (Debian package ``tesseract-ocr``; its
  path and installed languages found through pytesseract). ``config`` holds tesseract's command-line
  options, by default
  ``TESSERACT_CONFIG = "--psm 6 -c thresholding_method=2"``: page segmentation "one uniform block
  of text" with Sauvola local binarisation. Chosen on 36 synthetic 512x512 scenes (vertical colour
  gradient, six coloured ellipses, one sign with dark-on-light or light-on-dark text, DejaVu Sans /
  Serif Bold / Sans Mono at 36-72 px, Gaussian blur 0.8), mean reward without / with added noise of
  std 8: ``--psm 6`` + Sauvola 0.68 / 0.63, ``--psm 3`` + Sauvola 0.70 / 0.50, ``--psm 11`` (sparse
  text) + Sauvola 0.48 / 0.68, and with tesseract's default global Otsu threshold ``--psm 3`` 0.42 /
  0.42, ``--psm 6`` 0.51 / 0.46, ``--psm 11`` 0.27 / 0.35 (synthetic scenes, not SD3.5 images: a
  relative comparison). On black text over white every mode read our test words exactly.

  Tesseract runs as subprocesses, so the recognition never holds the GIL and a thread pool (no
  process pool) reads in parallel: ``workers`` threads per reward object (created once, shut down
  when the reward is collected or at exit; concurrent calls share it, so at most ``workers``
  tesseract processes run at once), each running one tesseract process over a contiguous chunk of
  the images (written as PNG files, as pytesseract does, and listed in a file: tesseract's
  multi-page input). Starting tesseract (loading the language data) costs ~0.1 s of CPU, several
  times the recognition of a 512x512 image, so one process per chunk rather than per image is most
  of the speed-up. Pages are independent only with the LSTM engine alone (``--oem 1``, what
  tessdata_fast / tessdata_best files run): the legacy engine's adaptive classifier and document
  dictionary learn from one page to the next, so when tesseract reports another engine mode for
  ``lang`` and ``config`` (e.g. the full ``tessdata`` files, whose default combines both engines),
  each image gets its own process. Either way the text of each image is that of one tesseract run
  on it alone (the tests compare them). The subprocesses run with ``OMP_THREAD_LIMIT=1`` (unless
  the environment sets it): tesseract's OpenMP threads add little to one image and, busy-waiting
  on shared cores, oversubscribe them badly once several processes run.
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
import shlex
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from marble_jax.rewards.ocr import ocr_scores, ocr_target

Reader = Callable[[np.ndarray], list[str]]

ENGINES = ("tesseract", "paddle")
TESSERACT_CONFIG = "--psm 6 -c thresholding_method=2"
# Tesseract's language codes that PaddleOCR spells differently.
PADDLE_LANGS = {"eng": "en"}


def ocr(engine: str = "tesseract", lang: str = "eng", workers: int = 0, **options):
    """The OCR reward function read by ``engine`` (``"tesseract"`` or ``"paddle"``) in language ``lang``
    (tesseract's code, e.g. ``"eng"`` or ``"eng+deu"``; ``"eng"`` is ``"en"`` for paddle).

    ``workers``: tesseract processes run at once, one thread of this process waiting on each
    (0: :func:`thread_count`, ``min(8, usable CPUs)``; 1: one process over all the images, no
    pool); paddle: 0 or 1. ``options`` go to the engine (tesseract: ``config``; paddle: ``PaddleOCR``
    keyword arguments)."""
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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(workers: int) -> int:
    """``workers`` when positive, else ``min(8, usable CPUs)``: tesseract processes run at once. Eight
    keep a chunk of rollout images well ahead of the device while leaving cores to the trainer's
    own thread and the other host rewards."""
    return workers if workers > 0 else min(8, usable_cpus())


def join_lines(text: str) -> str:
    """Whitespace runs (line breaks included) as single spaces, trimmed."""
    return " ".join(text.split())


def lstm_only(cmd: str, lang: str, config: str) -> bool:
    """Whether tesseract runs its LSTM engine alone (``tessedit_ocr_engine_mode`` 1) for ``lang`` and ``config``:
    then pages of one run are read independently. False when tesseract does not say (e.g. an error)."""
    run = subprocess.run([cmd, "--print-parameters", "-l", lang, *shlex.split(config)], capture_output=True, text=True)
    for line in run.stdout.splitlines():
        name, _, rest = line.partition("\t")
        if name == "tessedit_ocr_engine_mode":
            return rest.split("\t")[0].strip() == "1"
    return False


def tesseract_env() -> dict[str, str]:
    """This process's environment with ``OMP_THREAD_LIMIT=1`` unless it sets that variable itself."""
    return {"OMP_THREAD_LIMIT": "1", **os.environ}


def tesseract_pages(images: np.ndarray, cmd: str, lang: str, config: str, env: Mapping[str, str]) -> list[str]:
    """The text of each of uint8 ``[n, H, W, 3]`` ``images`` read by one tesseract process (lines joined).

    The images are PNG files in a temporary directory, listed in a file (tesseract's multi-page input);
    the text output separates pages by a form feed. The command is pytesseract's (``-l lang``, the
    ``config`` options, the ``txt`` config file), with ``-c page_separator=\\f`` before ``config``.

    Raises:
      RuntimeError: tesseract failed (its exit status and the end of its error output), or returned
        another number of pages.
    """
    with tempfile.TemporaryDirectory(prefix="marble_ocr_") as tmp:
        d = Path(tmp)
        paths = [d / f"{k}.png" for k in range(len(images))]
        for path, image in zip(paths, images, strict=True):
            Image.fromarray(image).save(path, format="PNG", compress_level=1)
        listing = d / "images.txt"
        listing.write_text("".join(f"{path}\n" for path in paths))
        args = [cmd, str(listing), str(d / "out"), "-l", lang, "-c", "page_separator=\f", *shlex.split(config), "txt"]
        run = subprocess.run(args, capture_output=True, env=dict(env), stdin=subprocess.DEVNULL)
        if run.returncode:
            err = run.stderr.decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"tesseract exited with status {run.returncode} reading {len(images)} images: {err}")
        pages = (d / "out.txt").read_text(encoding="utf-8").split("\f")
    if len(pages) == len(images) + 1 and not pages[-1].strip():
        pages.pop()  # tesseract < 5.0 ends every page with the separator, >= 5.0 puts it between pages
    if len(pages) != len(images):
        raise RuntimeError(f"tesseract returned {len(pages)} pages for {len(images)} images (a page_separator in config?)")
    return [join_lines(page) for page in pages]


def tesseract_reader(lang: str = "eng", workers: int = 0, config: str = TESSERACT_CONFIG) -> Reader:
    """A reader running the tesseract binary, ``workers`` processes at a time, each over a chunk of the images
    (one image per process unless tesseract runs its LSTM engine alone); checks now that the binary and the
    language data are installed. ``reader.chunked``: whether a process reads a chunk of images;
    ``reader.close()`` shuts its thread pool down (also done when the reader is collected, or at exit)."""
    try:
        import pytesseract
    except ImportError as e:
        raise ImportError(
            "OCR engine 'tesseract' needs pytesseract and the tesseract binary: pip install pytesseract; "
            "apt-get install tesseract-ocr (Debian/Ubuntu)"
        ) from e

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
    batched = lstm_only(cmd, lang, config)
    env = tesseract_env()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tesseract") if threads > 1 else None

    def read(chunk: np.ndarray) -> list[str]:
        return tesseract_pages(chunk, cmd, lang, config, env)

    def reader(images: np.ndarray) -> list[str]:
        n = len(images)
        if n == 0:
            return []
        if batched:
            chunks = [images[rows] for rows in np.array_split(np.arange(n), min(threads, n))]
        else:
            chunks = [images[i : i + 1] for i in range(n)]
        if pool is None or len(chunks) == 1:
            return [text for chunk in chunks for text in read(chunk)]
        return [text for texts in pool.map(read, chunks) for text in texts]

    reader.close = weakref.finalize(reader, pool.shutdown) if pool is not None else lambda: None
    reader.chunked = batched
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
