"""Checkpointer: exact roundtrips, pruning, async saves, corrupt / unfinished / killed saves, resharding."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from marble_jax.checkpoint import Checkpointer, CheckpointReadError
from marble_jax.sharding import make_mesh, param_shardings

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written


class Mgda(NamedTuple):
    weights: jax.Array
    count: jax.Array


def train_state(seed: int = 0) -> dict:
    """A small state shaped like the trainer's: params, adamw state after one update, old params,
    a NamedTuple, PRNG key data (uint32 [2]) and int32 counters."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "block_0": {"lora_a": jax.random.normal(k1, (16, 4)), "lora_b": jax.random.normal(k2, (4, 16))},
        "final": {"bias": jax.random.normal(k3, (16,), jnp.bfloat16)},
    }
    tx = optax.adamw(1e-3)
    _, opt = tx.update(jax.tree.map(lambda p: 0.1 * p, params), tx.init(params), params)
    return {
        "params": params,
        "opt": opt,
        "old": jax.tree.map(lambda p: 0.5 * p, params),
        "mgda": Mgda(jnp.array([0.25, 0.75]), jnp.int32(5)),
        "key": jax.random.key_data(jax.random.key(seed + 42)),
        "step": jnp.int32(17 + seed),
        "position": jnp.int32(3),
    }


def abstract(tree, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(g, jax.Array) and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def step_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("as_abstract", [False, True])
def test_roundtrip_is_exact(tmp_path, as_abstract):
    state, meta = train_state(), {"config": {"lr": 1e-3, "modes": ["marble"], "nested": {"k": 4}}, "rewards": ["ocr", "pick"]}
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(17, state, meta)
        assert ck.steps() == [17]
    with Checkpointer(tmp_path) as ck:
        step, got, got_meta = ck.restore(abstract(state) if as_abstract else state)
    assert step == 17 and got_meta == meta
    assert type(got["mgda"]) is Mgda and type(got["opt"][0]) is type(state["opt"][0])
    assert_same(got, state)


def test_keeps_the_newest_and_refuses_older_steps(tmp_path):
    with Checkpointer(tmp_path, keep=2) as ck:
        for step in range(1, 6):
            ck.save(step, train_state(step), {"step": step})
        ck.wait()
        assert ck.steps() == [4, 5]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*step 5.*latest step 5"):
            ck.save(5, train_state())
        step, got, meta = ck.restore(train_state(), step=4)
    assert step == 4 and meta == {"step": 4}
    assert_same(got, train_state(4))


def test_async_save_copies_the_state_before_returning(tmp_path):
    """The trainer donates the state right after save(): the pending write must not read it."""
    state = train_state()
    want = jax.tree.map(np.array, state)
    with Checkpointer(tmp_path, async_save=True) as ck:
        ck.save(1, state, {"a": 1})
        for x in jax.tree.leaves(state):
            x.delete()
        ck.wait()
        assert ck.steps() == [1] and not list(tmp_path.glob(f"*{TMP_SUFFIX}"))
        step, got, meta = ck.restore(abstract(train_state()))
    assert step == 1 and meta == {"a": 1}
    assert_same(got, jax.tree.map(jnp.asarray, want))


def truncate_data(step_dir: Path) -> None:
    """Halves the largest array data file (tensorstore's ``d/`` directories)."""
    big = max((p for p in step_files(step_dir) if p.parent.name == "d"), key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)


# A failed read can leave tensorstore callbacks aimed at orbax's closed event loop ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "corrupt",
    [truncate_data, lambda d: (d / "state" / "_METADATA").unlink(), lambda d: (d / "meta" / "metadata").unlink()],
    ids=["truncated-data-file", "no-tree-metadata", "no-json-metadata"],
)
def test_unreadable_latest_falls_back_to_the_previous(tmp_path, caplog, corrupt):
    with Checkpointer(tmp_path, keep=3, async_save=False) as ck:
        for step in (1, 2, 3):
            ck.save(step, train_state(step), {"step": step})
    corrupt(tmp_path / "3")
    with Checkpointer(tmp_path) as ck:
        assert ck.steps() == [1, 2, 3]
        with caplog.at_level(logging.WARNING, logger="marble_jax.checkpoint"):
            step, got, meta = ck.restore(abstract(train_state()))
        assert step == 2 and meta == {"step": 2}
        assert_same(got, train_state(2))
        warnings = [r.getMessage() for r in caplog.records if r.name == "marble_jax.checkpoint"]
        assert len(warnings) == 2 and f"{tmp_path}/3 cannot be read" in warnings[0]
        # the unreadable step is set aside (kept for inspection) so that the resumed run can save step 3 again
        assert "moved the unreadable checkpoint" in warnings[1] and ck.steps() == [1, 2]
        (aside,) = (tmp_path / "unreadable").iterdir()
        assert aside.name.startswith("3.")
        with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no checkpoint at step 3")):
            ck.restore(train_state(), step=3)
        ck.save(3, train_state(3), {"step": 3})
        ck.wait()
        assert ck.restore(abstract(train_state()))[0] == 3
        for step in (1, 2, 3):
            corrupt(tmp_path / str(step))
        with pytest.raises(CheckpointReadError, match=re.escape(f"{tmp_path}/1 cannot be read")):
            ck.restore(train_state(), step=1)
        assert ck.restore(train_state()) is None


def test_unfinished_step_directory_is_ignored_then_replaced(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ck:
        for step in (1, 2):
            ck.save(step, train_state(step))
    shutil.copytree(tmp_path / "2", tmp_path / f"3{TMP_SUFFIX}")  # everything written, commit (rename) not done
    with Checkpointer(tmp_path) as ck:
        assert ck.steps() == [1, 2]
        assert ck.restore(train_state())[0] == 2
        ck.save(3, train_state(3), {"step": 3})
        ck.wait()
        assert ck.steps() == [1, 2, 3] and not (tmp_path / f"3{TMP_SUFFIX}").exists()
        step, got, meta = ck.restore(train_state())
    assert step == 3 and meta == {"step": 3}
    assert_same(got, train_state(3))


def test_structure_mismatch_names_the_checkpoint_and_the_keys(tmp_path):
    state = train_state()
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(7, state)
        missing = {**state, "ema": state["params"]}
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}/7 does not match.*'ema/block_0/lora_a'"):
            ck.restore(missing)  # a mismatch is not "unreadable": no fallback, no None
        extra = {k: v for k, v in state.items() if k != "mgda"}
        with pytest.raises(ValueError, match=r"not in the target \['mgda/count', 'mgda/weights'\]"):
            ck.restore(extra, step=7)
        reshaped = {**state, "key": jnp.zeros(4, jnp.uint32)}
        with pytest.raises(ValueError, match=r"key \(2,\) \(target \(4,\)\)"):
            ck.restore(reshaped)


def test_restore_places_arrays_with_the_target_shardings(tmp_path):
    state = train_state()
    mesh = make_mesh(devices=jax.devices()[:1])
    target = abstract(state, NamedSharding(mesh, PartitionSpec()))
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state)
        _, got, _ = ck.restore(target)
    assert_same(got, state)
    for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
        assert isinstance(g.sharding, NamedSharding) and g.sharding == t.sharding


def reshard_child(directory: str) -> None:
    """Under 8 CPU devices: a state saved fully sharded over an 8-way fsdp mesh restores onto one
    device and onto a 2 x 4 mesh, and one saved from one device restores onto the 8-way mesh."""
    assert jax.device_count() == 8
    big = {"w": jnp.arange(64 * 512, dtype=jnp.float32).reshape(64, 512), "v": jnp.arange(8 * 4096, dtype=jnp.int32)}
    mesh8, mesh24 = make_mesh(fsdp=8), make_mesh(data=2, fsdp=4)

    def placed(mesh):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), big, param_shardings(big, mesh))

    sharded = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), big, placed(mesh8))
    assert sharded["w"].sharding.spec == PartitionSpec(None, "fsdp")
    single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    with Checkpointer(directory, async_save=False) as ck:
        ck.save(1, sharded)
        ck.save(2, big)
        cases = [(1, abstract(big, single)), (1, placed(mesh24)), (2, placed(mesh8))]
        for step, target in cases:
            _, got, _ = ck.restore(target, step=step)
            assert_same(got, big)
            for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
                assert g.sharding == t.sharding, (g.sharding, t.sharding)


def test_reshard_across_device_counts(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, __file__, "reshard", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


KILL_WORDS = 16 * 2**20  # int32 words: a 64 MB state, ~0.3 s to write on this machine


def kill_state(step: int) -> dict:
    base = np.random.default_rng(0).integers(0, 2**31 - 1, size=KILL_WORDS, dtype=np.int32)
    return {"w": base + np.int32(step), "step": np.int32(step)}


def kill_child(directory: str) -> None:
    """Saves steps 1, 2, ... asynchronously (keep 2), printing each step once its save is in flight,
    with the committed steps seen then."""
    ck = Checkpointer(directory, keep=2, async_save=True)
    for step in range(1, 100):
        ck.save(step, jax.tree.map(jnp.asarray, kill_state(step)), {"step": step})
        print(step, *ck.steps(), flush=True)


def test_kill_9_during_an_async_save_keeps_the_last_committed_step(tmp_path):
    kill_at = 4  # save(4) returns after save 3 is committed (and step 1 pruned); 4 is being written
    child = subprocess.Popen([sys.executable, __file__, "kill", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            step, *committed = map(int, line.split())
            if step == kill_at:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL and committed == [kill_at - 2, kill_at - 1]
    assert (tmp_path / f"{kill_at}{TMP_SUFFIX}").is_dir(), sorted(p.name for p in tmp_path.iterdir())
    with Checkpointer(tmp_path) as ck:
        assert ck.steps() == [kill_at - 2, kill_at - 1]
        want = kill_state(kill_at - 1)
        step, got, meta = ck.restore(abstract(want, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
        assert step == kill_at - 1 and meta == {"step": kill_at - 1}
        assert_same(got, jax.tree.map(jnp.asarray, want))


if __name__ == "__main__":
    {"reshard": reshard_child, "kill": kill_child}[sys.argv[1]](sys.argv[2])


def test_transient_read_errors_are_retried_and_corruption_is_not(tmp_path, monkeypatch):
    """An I/O error (a network filesystem's hiccup) is retried; a step that keeps failing, or a corrupt one, is
    unreadable and the previous step is restored."""
    from marble_jax import checkpoint

    monkeypatch.setattr(checkpoint.time, "sleep", lambda s: None)
    state = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, {"w": state["w"] + 1})
    calls = {"n": 0}
    flaky = Checkpointer(tmp_path, async_save=False)
    original = flaky._manager.item_metadata

    def twice_then_ok(step):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("Stale file handle")
        return original(step)

    monkeypatch.setattr(flaky._manager, "item_metadata", twice_then_ok)
    step, restored, _ = flaky.restore(state)
    assert step == 2 and calls["n"] == 3 and np.array_equal(restored["w"], state["w"] + 1)
    flaky.close()
    broken = Checkpointer(tmp_path, async_save=False)
    original = broken._manager.item_metadata
    monkeypatch.setattr(
        broken._manager, "item_metadata", lambda s: (_ for _ in ()).throw(OSError("gone")) if s == 2 else original(s)
    )
    step, restored, _ = broken.restore(state)
    assert step == 1 and (tmp_path / "unreadable").is_dir()
    broken.close()
