"""Prompt embeddings for the trainer: a bounded LRU cache over an encoder, optionally backed by a directory of
embeddings precomputed by ``tools/encode_prompts.py``.

:class:`EmbeddingCache` ``(texts) -> (context [N, L, D], pooled [N, Dp])`` (numpy) looks each prompt up in the
precomputed directory (never encoded then), else in its LRU, else encodes it (in chunks of ``batch`` prompts)
and keeps it, evicting the least recently used prompts beyond ``max_bytes``. SD3.5 at T5 length 128 holds
``(77 + 128) x 4096`` context values a prompt: 3.4 MB in float32, 1.7 MB in bfloat16; the default bound,
:data:`DEFAULT_MAX_BYTES` (4 GiB), keeps about 1,200 / 2,400 prompts. A run over a larger prompt set should
precompute its embeddings (the cache then holds only what the file lacks).

The directory (format version 1), written shard by shard so that an interrupted run loses at most one shard::

    index.json                 written last: {"format", "version", "settings", "dtype", "stored_as",
                               "context_shape": [L, D], "pooled_shape": [Dp], "shards": [name...],
                               "prompts": {prompt text: [shard number, row]}}
    shard_00000.context.npy    [n, L, D]; bfloat16 (any dtype .npy cannot name) stored as its bits, uint16
    shard_00000.pooled.npy     [n, Dp], likewise
    shard_00000.json           {"prompts": [...], "settings": {...}, ...}: written after the arrays, it marks
                               the shard finished
    ...

Every file is written under a temporary name and renamed. ``settings`` records what the embeddings depend on
(model, T5 length, dtype, T5 on or off): a rerun with other settings refuses the directory rather than mix them.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from marble_jax import run_log

FORMAT = "marble_jax.prompt_embeddings"
VERSION = 1
INDEX = "index.json"
DEFAULT_MAX_BYTES = 4 * 2**30
"""The LRU bound of :class:`EmbeddingCache` (4 GiB: about 2,400 SD3.5 prompts in bfloat16 at T5 length 128)."""
Encode = Callable[[Sequence[str]], tuple[Any, Any]]


class MissingEmbeddingError(KeyError):
    """A prompt the precomputed embeddings do not hold, with no encoder to fall back to (the message names both)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------- storage


def stored_dtype(dtype) -> np.dtype:
    """The dtype an array of ``dtype`` is written as: itself if ``.npy`` can name it, else (bfloat16 and the other
    ``ml_dtypes``) the unsigned integer of its width, holding its bits."""
    dtype = np.dtype(dtype)
    return np.dtype(f"<u{dtype.itemsize}") if dtype.kind == "V" else dtype


def _from_stored(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return array.view(dtype) if array.dtype != dtype else array


def shard_name(number: int) -> str:
    return f"shard_{number:05d}"


def _write_json(path: Path, value: Any) -> None:
    run_log.replace_atomically(path, lambda f: json.dump(value, f, ensure_ascii=False), "w")


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def finished_shard(directory: str | os.PathLike, number: int, prompts: Sequence[str], settings: Mapping[str, Any]) -> bool:
    """Whether shard ``number`` of ``directory`` is written and holds exactly ``prompts``.

    Raises:
      ValueError: naming the shard's file, when it was written with other ``settings``.
    """
    directory = Path(directory)
    marker = directory / f"{shard_name(number)}.json"
    if not marker.is_file():
        return False
    meta = _read_json(marker)
    if meta.get("settings") != dict(settings):
        raise ValueError(
            f"{marker} was written with settings {meta.get('settings')}, not {dict(settings)}: "
            "write these embeddings to another directory"
        )
    arrays = [directory / f"{shard_name(number)}.{part}.npy" for part in ("context", "pooled")]
    return meta.get("prompts") == list(prompts) and all(a.is_file() for a in arrays)


def write_shard(
    directory: str | os.PathLike,
    number: int,
    prompts: Sequence[str],
    context: np.ndarray,
    pooled: np.ndarray,
    settings: Mapping[str, Any],
) -> None:
    """Writes shard ``number``: ``context [n, L, D]``, ``pooled [n, Dp]`` of the n ``prompts`` (arrays first, then
    the ``.json`` that marks the shard finished; each under a temporary name, then renamed)."""
    directory = Path(directory)
    context, pooled = np.asarray(context), np.asarray(pooled)
    if not len(prompts) == len(context) == len(pooled):
        raise ValueError(f"write_shard: {len(prompts)} prompts, {len(context)} context rows, {len(pooled)} pooled rows")
    name = shard_name(number)
    for part, array in (("context", context), ("pooled", pooled)):
        stored = array.view(stored_dtype(array.dtype))
        run_log.replace_atomically(directory / f"{name}.{part}.npy", lambda f, a=stored: np.save(f, a), "wb")
    meta = {
        "prompts": list(prompts),
        "settings": dict(settings),
        "dtype": context.dtype.name,
        "context_shape": list(context.shape[1:]),
        "pooled_shape": list(pooled.shape[1:]),
    }
    _write_json(directory / f"{name}.json", meta)


def write_index(directory: str | os.PathLike, settings: Mapping[str, Any], shards: Sequence[Sequence[str]]) -> Path:
    """Writes ``index.json`` over the finished ``shards`` (the prompts of each, in order); returns its path.

    Raises:
      ValueError: naming the shard that is not finished or whose dtype or shapes differ from shard 0's.
    """
    directory = Path(directory)
    first: dict | None = None
    prompts: dict[str, list[int]] = {}
    for number, shard in enumerate(shards):
        marker = directory / f"{shard_name(number)}.json"
        if not finished_shard(directory, number, shard, settings):
            raise ValueError(f"{marker}: shard {number} is not written (or holds other prompts)")
        meta = _read_json(marker)
        layout = {k: meta[k] for k in ("dtype", "context_shape", "pooled_shape")}
        first = first or layout
        if layout != first:
            raise ValueError(f"{marker}: {layout} differs from shard 0's {first}")
        prompts.update({text: [number, row] for row, text in enumerate(shard)})
    first = first or {"dtype": None, "context_shape": None, "pooled_shape": None}
    index = {
        "format": FORMAT,
        "version": VERSION,
        "settings": dict(settings),
        **first,
        "stored_as": None if first["dtype"] is None else stored_dtype(jnp.dtype(first["dtype"])).name,
        "shards": [shard_name(n) for n in range(len(shards))],
        "prompts": prompts,
    }
    path = directory / INDEX
    _write_json(path, index)
    return path


class PrecomputedEmbeddings:
    """The embeddings of a directory written by ``tools/encode_prompts.py`` (read lazily, memory-mapped).

    Attributes:
      path: the ``index.json`` file.
      settings: what they were encoded with (``model``, ``max_sequence_length``, ``dtype``, ``use_t5``, ...).
      dtype: the arrays' dtype (e.g. bfloat16).
      context_shape, pooled_shape: ``(L, D)`` and ``(Dp,)``.
    """

    def __init__(self, directory: str | os.PathLike):
        """Opens ``directory`` (or its ``index.json``).

        Raises:
          FileNotFoundError: naming the missing ``index.json``.
          ValueError: naming it when it is not this format or version.
        """
        directory = Path(directory)
        self.path = directory / INDEX if directory.is_dir() or not directory.suffix else directory
        if not self.path.is_file():
            raise FileNotFoundError(f"prompt embeddings: {self.path} not found (write it with tools/encode_prompts.py)")
        index = _read_json(self.path)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(
                f"{self.path}: not prompt embeddings of format {FORMAT!r} version {VERSION} "
                f"(format {index.get('format')!r}, version {index.get('version')!r})"
            )
        self.settings: dict = index["settings"]
        self.dtype = jnp.dtype(index["dtype"]) if index["dtype"] else np.dtype(np.float32)
        self.context_shape = tuple(index["context_shape"] or ())
        self.pooled_shape = tuple(index["pooled_shape"] or ())
        self._shards: list[str] = index["shards"]
        self._index: dict[str, list[int]] = index["prompts"]
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __contains__(self, text: str) -> bool:
        return text in self._index

    def __len__(self) -> int:
        return len(self._index)

    def check(self, **expected: Any) -> None:
        """Raises ValueError naming the file and the setting for each ``expected`` setting that differs
        (e.g. ``check(max_sequence_length=128, use_t5=True)``)."""
        wrong = {k: (self.settings.get(k), v) for k, v in expected.items() if self.settings.get(k) != v}
        if wrong:
            found = ", ".join(f"{k} = {have!r} (expected {want!r})" for k, (have, want) in wrong.items())
            raise ValueError(f"{self.path}: the embeddings were written with {found}")

    def _array(self, shard: int, part: str) -> np.ndarray:
        key = (shard, part)
        if key not in self._arrays:
            file = self.path.parent / f"{self._shards[shard]}.{part}.npy"
            self._arrays[key] = np.load(file, mmap_mode="r")
        return self._arrays[key]

    def get(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(context [N, L, D], pooled [N, Dp])`` of ``texts`` (copies, in :attr:`dtype`).

        Raises:
          MissingEmbeddingError: (a KeyError) naming the file and the first prompt it does not hold.
        """
        texts = list(texts)
        missing = [t for t in texts if t not in self._index]
        if missing:
            raise MissingEmbeddingError(
                f"{self.path} holds no embedding of prompt {missing[0]!r} ({len(missing)} prompts missing)"
            )
        context = np.empty((len(texts), *self.context_shape), self.dtype)
        pooled = np.empty((len(texts), *self.pooled_shape), self.dtype)
        by_shard: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for i, text in enumerate(texts):
            shard, row = self._index[text]
            by_shard[shard].append((i, row))
        for shard, pairs in by_shard.items():
            out_rows = np.array([i for i, _ in pairs])
            rows = np.array([r for _, r in pairs])
            context[out_rows] = _from_stored(np.asarray(self._array(shard, "context")[rows]), self.dtype)
            pooled[out_rows] = _from_stored(np.asarray(self._array(shard, "pooled")[rows]), self.dtype)
        return context, pooled


# ----------------------------------------------------------------------------------------------- the cache


class EmbeddingCache:
    """``cache(texts) -> (context [N, L, D], pooled [N, Dp])`` (numpy): each prompt is read from the precomputed
    directory, or encoded once and kept in a least-recently-used cache bounded by bytes.

    Args:
      encode: ``prompts -> (context [n, L, D], pooled [n, Dp])`` (numpy or jax arrays), or None when every prompt
        must come from ``precomputed``.
      batch: prompts per ``encode`` call (the last call of a lookup may get fewer).
      max_bytes: the bound on the encoded embeddings kept (context + pooled); None: unbounded, 0: keep none.
      precomputed: a directory written by ``tools/encode_prompts.py`` (or its ``index.json``), or a
        :class:`PrecomputedEmbeddings`. Encoded rows are cast to its dtype, and must have its shapes.

    Attributes:
      hits, misses, from_file, evictions: counters (prompt lookups served by the LRU, prompts encoded, prompts
        read from the file, prompts evicted).
    """

    def __init__(
        self,
        encode: Encode | None = None,
        *,
        batch: int = 64,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        precomputed: str | os.PathLike | PrecomputedEmbeddings | None = None,
    ):
        if encode is None and precomputed is None:
            raise ValueError("EmbeddingCache needs an encoder, precomputed embeddings, or both")
        if batch < 1:
            raise ValueError(f"EmbeddingCache: batch must be >= 1, got {batch}")
        if precomputed is not None and not isinstance(precomputed, PrecomputedEmbeddings):
            precomputed = PrecomputedEmbeddings(precomputed)
        self._encode, self.batch, self.max_bytes, self.precomputed = encode, batch, max_bytes, precomputed
        self._lru: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.from_file = self.evictions = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the embeddings held in the LRU (never above ``max_bytes``)."""
        return self._nbytes

    def __len__(self) -> int:
        """Prompts held in the LRU."""
        return len(self._lru)

    def __contains__(self, text: str) -> bool:
        return text in self._lru or (self.precomputed is not None and text in self.precomputed)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(context [N, L, D], pooled [N, Dp])`` of ``texts`` (repeats allowed).

        Raises:
          MissingEmbeddingError: (a KeyError) naming the precomputed file and a prompt it lacks, when there is no
            encoder.
          ValueError: naming the file, when the encoder's rows have other shapes than the file's.
        """
        texts = list(texts)
        with self._lock:
            rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            filed: list[str] = []
            todo: list[str] = []
            for text in dict.fromkeys(texts):
                if text in self._lru:
                    self._lru.move_to_end(text)
                    rows[text] = self._lru[text]
                    self.hits += 1
                elif self.precomputed is not None and text in self.precomputed:
                    filed.append(text)
                else:
                    todo.append(text)
            if todo and self._encode is None:
                raise MissingEmbeddingError(
                    f"{self.precomputed.path} holds no embedding of prompt {todo[0]!r} ({len(todo)} prompts missing) "
                    "and the cache has no encoder"
                )
            if filed:
                context, pooled = self.precomputed.get(filed)
                rows.update({t: (c, p) for t, c, p in zip(filed, context, pooled, strict=True)})
                self.from_file += len(filed)
            for i in range(0, len(todo), self.batch):
                chunk = todo[i : i + self.batch]
                context, pooled = self._encode(chunk)
                context, pooled = self._check(np.asarray(context), "context"), self._check(np.asarray(pooled), "pooled")
                for t, c, p in zip(chunk, context, pooled, strict=True):
                    rows[t] = (c.copy(), p.copy())  # own memory: a row view would keep its whole chunk alive
                    self._keep(t, rows[t])
                self.misses += len(chunk)
            if not texts:
                return self._empty()
            return np.stack([rows[t][0] for t in texts]), np.stack([rows[t][1] for t in texts])

    def _check(self, array: np.ndarray, part: str) -> np.ndarray:
        store = self.precomputed
        if store is None:
            return array
        shape = store.context_shape if part == "context" else store.pooled_shape
        if store.context_shape and tuple(array.shape[1:]) != shape:
            raise ValueError(
                f"the encoder gives {part} rows of shape {tuple(array.shape[1:])}, but {store.path} holds {shape} "
                f"(written with {store.settings})"
            )
        return array.astype(store.dtype, copy=False)

    def _keep(self, text: str, row: tuple[np.ndarray, np.ndarray]) -> None:
        size = row[0].nbytes + row[1].nbytes
        if self.max_bytes is not None and size > self.max_bytes:
            return
        self._lru[text] = row
        self._nbytes += size
        while self.max_bytes is not None and self._nbytes > self.max_bytes:
            _, (c, p) = self._lru.popitem(last=False)
            self._nbytes -= c.nbytes + p.nbytes
            self.evictions += 1

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        store = self.precomputed
        if store is not None and store.context_shape:
            return np.empty((0, *store.context_shape), store.dtype), np.empty((0, *store.pooled_shape), store.dtype)
        context, pooled = (np.asarray(a) for a in self._encode([""]))
        return context[:0], pooled[:0]
