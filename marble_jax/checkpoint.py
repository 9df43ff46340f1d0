"""Checkpoints of the whole training state (the one place that knows orbax).

One step directory per checkpoint, ``<directory>/<step>/``, holding the state pytree (``state``,
orbax's standard pytree format: any nesting of dicts, lists, tuples and NamedTuples of arrays) and
a JSON-able metadata dict (``meta``). Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and
renames it to ``<step>`` on commit, so a save cut short (process killed) never shows up as a step;
an unfinished one left on disk is replaced when that step is saved again. All processes of a
multi-host job call every method; orbax coordinates them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointReadError(RuntimeError):
    """A committed checkpoint that cannot be read (truncated, corrupted or missing files)."""


def _retrying(read: Callable[[], Any], where: str, retries: int = 3, wait_s: float = 1.0) -> Any:
    """``read()``, retried after an I/O error (``OSError``: a transient fault of a network filesystem) up to
    ``retries`` times, waiting ``wait_s``, doubled each time; any other error, a missing file (a committed step is
    written whole: one missing is damage, not a hiccup) or the last I/O error propagates."""
    for attempt in range(retries + 1):
        try:
            return read()
        except OSError as e:
            if attempt == retries or isinstance(e, FileNotFoundError):
                raise
            log.warning("reading %s failed (%s: %s); retrying in %.0f s", where, type(e).__name__, e, wait_s * 2**attempt)
            time.sleep(wait_s * 2**attempt)
    raise AssertionError("unreachable")


def _all_processes(ok: bool) -> bool:
    """True when ``ok`` is True on every process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _agreed_steps(steps: list[int]) -> list[int]:
    """The steps every process sees (a step committed while another process listed the directory is left out)."""
    if jax.process_count() == 1:
        return steps
    from jax.experimental import multihost_utils

    n = int(np.max(multihost_utils.process_allgather(np.asarray(len(steps), np.int32))))
    padded = np.full((max(n, 1),), -1, np.int64)
    padded[: len(steps)] = steps
    seen = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
    common = set(seen[0].tolist()).intersection(*(set(row.tolist()) for row in seen[1:])) - {-1}
    return sorted(common)


class Checkpointer:
    """Keeps the newest ``keep`` checkpoints of ``directory``; with ``async_save`` the files are
    written in the background (the arrays are copied to host memory before :meth:`save` returns)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep), enable_async_checkpointing=async_save
        )
        registry = ocp.handlers.create_default_handler_registry(
            state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def save(self, step: int, state: PyTree, metadata: dict | None = None) -> None:
        """Starts saving ``state`` (a pytree of arrays) and ``metadata`` (JSON-able) as ``step``,
        after any save still in flight has finished; ``step`` must exceed every saved step."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata or {}))
        if not self._manager.save(step, args=args):
            latest = self._manager.latest_step()
            raise ValueError(f"{self.directory}: cannot save step {step}, it is not after the latest step {latest}")

    def wait(self) -> None:
        """Blocks until every started save is committed (raises its error if one failed)."""
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        """The committed steps on disk, ascending (a save in flight is not one of them)."""
        return sorted(ocp.utils.checkpoint_steps(self.directory))

    def restore(self, target: PyTree, step: int | None = None) -> tuple[int, PyTree, dict] | None:
        """``(step, state, metadata)`` of checkpoint ``step``, or of the latest readable one if ``step`` is None.

        ``target`` (arrays or ``jax.ShapeDtypeStruct`` with ``.sharding``) gives the structure, shapes,
        dtypes and shardings of the state: a checkpoint written under another sharding is resharded,
        other dtypes are cast. Without ``step``, an unreadable checkpoint is skipped with a warning for
        the one before it; None if none is readable. A structure or shape mismatch raises ValueError.

        With several processes every decision is shared: the candidate steps are those every process sees, a
        step is restored only if every process can read it (else all of them try the one before), and the
        unreadable steps are set aside by process 0 behind a barrier. A read that fails with an I/O error is
        retried (``retries`` times, a network filesystem's hiccup) before the checkpoint counts as unreadable.
        """
        if step is not None:
            if step not in (steps := self.steps()):
                raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step} (committed: {steps})")
            self._check(target, step)
            return (step, *self._load(target, step))
        unreadable = []
        for s in reversed(_agreed_steps(self.steps())):
            error = None
            try:
                self._check(target, s)
            except CheckpointReadError as e:
                error = e
            if _all_processes(error is None):
                try:
                    found = (s, *self._load(target, s))
                except CheckpointReadError as e:
                    error = e
            if not _all_processes(error is None):
                log.warning("%s; trying the previous checkpoint", error or f"checkpoint {self.directory}/{s} cannot be read "
                            "by another process")  # fmt: skip
                unreadable.append(s)
                continue
            self._set_aside(unreadable)
            return found
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable steps newer than the restored one to ``<directory>/unreadable/<step>`` (kept for
        inspection), so the resumed run can save those steps again: process 0 moves them, every process waits for
        that, then reloads the step list."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory / "unreadable"
            aside.mkdir(exist_ok=True)
            for s in steps:
                target = aside / f"{s}.{int(time.time())}"
                (self.directory / str(s)).rename(target)
                log.warning("moved the unreadable checkpoint %s/%d to %s", self.directory, s, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint set aside {steps}")
        self._manager.reload()

    def _check(self, target: PyTree, step: int) -> None:
        """Reads ``step``'s metadata (this process alone, no collective) and checks it against ``target``."""
        where = f"{self.directory}/{step}"
        try:
            metadata = _retrying(lambda: self._manager.item_metadata(step), where)
            saved = ocp.tree.to_flat_dict(metadata["state"].tree, sep="/")
        except Exception as e:
            raise CheckpointReadError(f"checkpoint {where} cannot be read: {type(e).__name__}: {e}") from e
        wanted = ocp.tree.to_flat_dict(target, sep="/")
        shape = {k: tuple(getattr(v, "shape", ())) for k, v in saved.items()}
        missing, extra = sorted(wanted.keys() - shape.keys()), sorted(shape.keys() - wanted.keys())
        other = sorted(f"{k} {shape[k]} (target {v.shape})" for k, v in wanted.items() if shape.get(k, v.shape) != v.shape)
        if missing or extra or other:
            raise ValueError(
                f"checkpoint {where} does not match the target ({len(missing)} keys missing, {len(extra)} not in the target, "
                f"{len(other)} shapes differ): missing {missing[:5]}, not in the target {extra[:5]}, saved shapes {other[:5]}"
            )

    def _load(self, target: PyTree, step: int) -> tuple[PyTree, dict]:
        where = f"{self.directory}/{step}"
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        try:
            restored = _retrying(lambda: self._manager.restore(step, args=args), where)
        except Exception as e:
            raise CheckpointReadError(f"checkpoint {where} cannot be read: {type(e).__name__}: {e}") from e
        return restored["state"], restored["meta"]

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads and files."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_orbax_logs() -> None:
    """Keeps only orbax's warnings in the absl log (it logs every checkpoint operation at INFO)."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
