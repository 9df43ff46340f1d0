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
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointReadError(RuntimeError):
    """A committed checkpoint that cannot be read (truncated, corrupted or missing files)."""


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
        """
        if step is not None:
            if step not in (steps := self.steps()):
                raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step} (committed: {steps})")
            return (step, *self._read(target, step))
        unreadable = []
        for s in reversed(self.steps()):
            try:
                found = (s, *self._read(target, s))
            except CheckpointReadError as e:
                log.warning("%s; trying the previous checkpoint", e)
                unreadable.append(s)
                continue
            self._set_aside(unreadable)
            return found
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable steps newer than the restored one to ``<directory>/unreadable/<step>`` (kept for
        inspection), so the resumed run can save those steps again."""
        if steps and jax.process_index() == 0:
            aside = self.directory / "unreadable"
            aside.mkdir(exist_ok=True)
            for s in steps:
                target = aside / f"{s}.{int(time.time())}"
                (self.directory / str(s)).rename(target)
                log.warning("moved the unreadable checkpoint %s/%d to %s", self.directory, s, target)
        if steps:
            self._manager.reload()

    def _read(self, target: PyTree, step: int) -> tuple[PyTree, dict]:
        where = f"{self.directory}/{step}"
        try:
            saved = ocp.tree.to_flat_dict(self._manager.item_metadata(step)["state"].tree, sep="/")
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
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
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
