"""A run's logs in its workdir (``config.json``, ``metrics.jsonl``, ``eval.jsonl``, TensorBoard events): kept apart
from another run's, and resumed without a row written twice.

A resumed run replays the steps after its checkpoint. Their rows from the interrupted run are dropped on resume:
``metrics.jsonl`` and ``eval.jsonl`` keep the rows up to the restored step (rewritten atomically), and a TensorBoard
``SessionLog.START`` event at the next step makes TensorBoard purge the events past it (its ``purge_orphaned_data``,
on by default), in a file named to load after the old event files and before the new ones. Every run writes one at
its start, so that TensorBoard takes each resume's as a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

LOG_FILES = ("metrics.jsonl", "eval.jsonl")
RUN_FILES = ("config.json", *LOG_FILES)


def default_workdir(config_filename: str) -> Path:
    """``runs/<config file's stem>``, with ``_<argument>`` for a config argument: ``configs/k5.py:sd35`` ->
    ``runs/k5_sd35`` (so the world's run and the paper's never share a workdir)."""
    path, _, argument = config_filename.partition(":")
    return Path("runs") / (Path(path).stem + (f"_{argument}" if argument else ""))


def logged_steps(path: Path) -> list[int]:
    """The ``step`` of every row of a ``*.jsonl`` log (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def replace_atomically(path: Path, write: Callable[[IO], None], mode: str = "w") -> None:
    """Writes ``path`` whole or not at all: ``write(f)`` into ``<path>.tmp`` (opened with ``mode``), flushed to disk,
    then renamed over ``path``; an interruption leaves the old file (or none)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    replace_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept)))


def _purge_events_after(workdir: Path, step: int) -> None:
    """A ``SessionLog.START`` event at ``step + 1``: TensorBoard drops the earlier files' events at ``>= step + 1``.

    TensorBoard takes the first START of a run as its beginning and each later one as a restart, so the first file of
    such events (a workdir written before them) holds two."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    starts = 1 if any(workdir.glob("events.out.tfevents.*.!resume-*")) else 2
    events = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")]
    events += [event_pb2.Event(wall_time=time.time(), step=step + 1, session_log=event_pb2.SessionLog(status=1))] * starts
    # '!' sorts before the host names of the writers' files: loaded after the old files (earlier times), before the
    # resumed run's (same or later time).
    with open(workdir / f"events.out.tfevents.{int(time.time()):010d}.!resume-{step}", "wb") as f:
        writer = RecordWriter(f)
        for event in events:
            writer.write(event.SerializeToString())
        writer.flush()


def resume_logs(workdir: Path, step: int, write: bool) -> set[int]:
    """Drops the rows and events past ``step`` (the restored step; 0 for a new run) and returns the steps
    ``eval.jsonl`` has evaluated at, up to ``step``. ``write``: this process writes the logs (process 0); every process
    reads the same evaluated steps first."""
    evaluated = {s for s in logged_steps(workdir / "eval.jsonl") if s <= step}
    if write:
        for name in LOG_FILES:
            _drop_rows_after(workdir / name, step)
        if any(workdir.glob("events.out.tfevents.*")):
            _purge_events_after(workdir, step)
    return evaluated


def claim_workdir(workdir: Path, config: dict, has_checkpoint: bool, overwrite: bool, write: bool) -> None:
    """Refuses a workdir that holds another run's files and no checkpoint, naming the config keys that differ, unless
    ``overwrite`` (which then deletes them). A workdir with a checkpoint is the resume's to check."""
    saved_path = workdir / "config.json"
    if has_checkpoint or not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text()).get("config", {})
    differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if not differ:
        return
    if not overwrite:
        raise ValueError(
            f"{workdir} holds another run's files ({', '.join(n for n in RUN_FILES if (workdir / n).exists())}) and no "
            f"checkpoint, with a config that differs in {differ}: use another --workdir, or --overwrite to delete them"
        )
    if write:
        for name in RUN_FILES:
            (workdir / name).unlink(missing_ok=True)
        for event_file in workdir.glob("events.out.tfevents.*"):
            event_file.unlink()
        shutil.rmtree(workdir / "samples", ignore_errors=True)
