"""The trainer on a tiny random world: resume after a corrupt checkpoint, skipped updates on faults, bad input.

Every run uses ``tests/tiny_config.py`` (2 prompts x 4 images, 4 sampler steps, K = 3, marble_amortized with a
solve every 2 steps, a checkpoint every step). The reference run (4 uninterrupted steps) is shared by the tests
that compare final parameters; runs are deterministic, so a resumed run must end with the same parameters.
"""

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config
from helpers import save_tiny_clip, save_tiny_world

from marble_jax import evaluate, experiment, results_table, sampling, sharding, train
from marble_jax.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """``(config, setup, state, workdir)`` of the uninterrupted 4-step run."""
    config = tiny_config.get_config(str(world))
    setup = experiment.build_setup(config)
    workdir = tmp_path_factory.mktemp("reference")
    return config, setup, train.run(setup, config, workdir), workdir


def final_state(setup, config, workdir: Path) -> train.TrainState:
    """The latest checkpointed state of ``workdir``."""
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    target, _ = train.state_layout(setup, config, train.make_optimizer(config), mesh)
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        step, state, _ = ckpt.restore(target)
    return state


def assert_same_params(a, b, rtol: float = 1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def test_reference_run_learns(reference):
    _, _, state, _ = reference
    assert int(state.step) == 4
    lora_b = [np.asarray(v["b"]) for v in state.params.values()]
    assert any(np.abs(b).max() > 0 for b in lora_b), "LoRA B stayed at zero: no update was applied"
    assert int(state.mgda.count) == 2  # full solves at steps 0 and 2 (solve_every = 2)
    ema = np.asarray(state.mgda.ema_weights)
    assert ema.shape == (3,) and abs(ema.sum() - 1) < 1e-5


def test_workdir_contents(world, tmp_path):
    config = tiny_config.get_config(str(world))
    config.total_epochs = 2
    train.run(experiment.build_setup(config), config, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (tmp_path / "samples" / "step_000000.png").is_file() and (tmp_path / "samples" / "step_000002.png").is_file()
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and set(evals[0]) == {"step", *config.rewards}
    assert json.loads((tmp_path / "config.json").read_text())["rewards"] == list(config.rewards)


def test_resume_past_a_corrupt_checkpoint_equals_uninterrupted(reference, tmp_path, caplog):
    config, setup, ref, _ = reference
    short = tiny_config.get_config(config.model.world_dir)
    short.total_epochs = 3
    train.run(setup, short, tmp_path)
    data = [p for p in (tmp_path / "checkpoints" / "3").rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in data:  # truncate every file of the latest checkpoint
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        state = train.run(setup, config, tmp_path)
    assert any("3" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert int(state.step) == 4
    assert_same_params(state.params, ref.params)
    assert_same_params(state.ema_params, ref.ema_params)
    assert_same_params(state.old_params, ref.old_params)
    # step 3 ran twice (its checkpoint was unreadable): logged once, and the short run's final evaluation at 3 is
    # dropped with it (the resumed run evaluates at 4)
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]
    assert_events_logged_once(tmp_path, {"policy_loss": [1, 2, 3, 4], "eval/world_geneval": [0, 2, 4]})


def assert_events_logged_once(workdir: Path, expected: dict[str, list[int]]) -> None:
    """The steps TensorBoard shows for each tag (after purging a resumed run's orphaned events)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator  # as TensorBoard reads

    events = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    for tag, steps in expected.items():
        assert [e.step for e in events.Tensors(tag)] == steps, tag


def test_missed_evaluations_run_on_resume(world, tmp_path):
    """A run stopped after saving its last step, before the final evaluation, evaluates on resume; so does a run
    resumed at a step whose evaluation was not done."""
    config = tiny_config.get_config(str(world))
    config.total_epochs = 2
    setup = experiment.build_setup(config)
    train.run(setup, config, tmp_path)
    evals = tmp_path / "eval.jsonl"
    rows = evals.read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 2]
    evals.write_text(rows[0] + "\n")  # as if stopped before the final evaluation
    train.run(setup, config, tmp_path)
    assert [json.loads(r)["step"] for r in evals.read_text().splitlines()] == [0, 2]
    evals.write_text(rows[0] + "\n")  # as if stopped after saving step 2, before evaluating at step 2
    config.total_epochs = 3
    train.run(setup, config, tmp_path)
    assert [json.loads(r)["step"] for r in evals.read_text().splitlines()] == [0, 2, 3]
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]


def test_workdir_of_another_run_is_refused_unless_overwrite(world, tmp_path):
    config = tiny_config.get_config(str(world))
    config.total_epochs = 1
    setup = experiment.build_setup(config)
    train.run(setup, config, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    config.seed = 7
    with pytest.raises(ValueError, match=r"another run's files.*\['seed'\].*--overwrite"):
        train.run(setup, config, tmp_path)
    train.run(setup, config, tmp_path, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["config"]["seed"] == 7
    assert [m["step"] for m in _metrics(tmp_path)] == [1]
    # with a checkpoint, a config collision is named before any restore (not reported as a shape mismatch)
    config.lora.rank = 2 * config.lora.rank
    with pytest.raises(ValueError, match=r"config differs in \['lora.rank'\]"):
        train.run(experiment.build_setup(config), config, tmp_path)


def test_nonfinite_direction_skips_the_update(reference, tmp_path, caplog):
    config, setup, _, _ = reference
    config = tiny_config.get_config(config.model.world_dir)
    config.total_epochs = 2
    config.eval.every = 100

    def nan_velocity(base, trainable, x, *args):
        v = setup.velocity_fn(base, trainable, x, *args)
        return v * jnp.nan if trainable is not None else v  # the reference model stays finite

    broken = dataclasses.replace(setup, velocity_fn=nan_velocity)
    init = train.fresh_state(setup, config, train.make_optimizer(config))
    with caplog.at_level(logging.WARNING):
        state = train.run(broken, config, tmp_path)
    skipped = [r for r in caplog.records if "not finite" in r.getMessage()]
    assert len(skipped) == 2
    assert int(state.mgda.nonfinite_count) == 2
    assert_same_params(state.params, init.params, rtol=0)
    assert_same_params(state.opt_state, init.opt_state, rtol=0)


def test_reward_fault_skips_the_update(reference, tmp_path, caplog):
    config, setup, _, _ = reference
    config = tiny_config.get_config(config.model.world_dir)
    config.total_epochs = 2
    config.eval.every = 100
    good = setup.rewards["world_aesthetic"]

    def broken(images, prompts, metadata):
        out = np.array(good(images, prompts, metadata))
        out[1] = np.nan  # a dense reward applies everywhere: NaN here is a fault, not "does not apply"
        return out

    broken.applies = good.applies
    faulty = dataclasses.replace(setup, rewards={**setup.rewards, "world_aesthetic": broken})
    init = train.fresh_state(setup, config, train.make_optimizer(config))
    with caplog.at_level(logging.WARNING):
        state = train.run(faulty, config, tmp_path)
    faults = [r.getMessage() for r in caplog.records if "reward fault" in r.getMessage()]
    assert len(faults) == 2 and "world_aesthetic" in faults[0]
    assert int(state.step) == 2
    assert_same_params(state.params, init.params, rtol=0)


def _main(workdir: Path, world: Path, *overrides: str, **kw) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "marble_jax.main",
        f"--config={ROOT / 'tests' / 'tiny_config.py'}:{world}",
        f"--workdir={workdir}",
    ]
    return subprocess.Popen([*cmd, *overrides], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    """Reads the process output until a line contains ``needle``; returns what was read."""
    seen, start = [], time.time()
    while time.time() - start < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(seen)[-3000:]}")


def test_sigterm_saves_and_kill9_resumes(reference, tmp_path):
    config, setup, ref, _ = reference
    world = Path(config.model.world_dir)
    # SIGTERM after the first step: the trainer saves and exits cleanly.
    cache = f"--config.compilation_cache_dir={tmp_path / 'xla'}"  # kept across the three processes
    proc = _main(tmp_path, world, cache)
    assert "freed buffers are kept for reuse" in _wait_for(proc, "1/4")  # marble_jax.cpu_memory, on the CPU
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at step" in out
    assert any((tmp_path / "xla").iterdir())  # the programs of the first step, for the resumes to load
    steps = Checkpointer(tmp_path / "checkpoints").steps()
    assert steps and max(steps) < 4
    # kill -9 after the next step, then run to the end.
    proc = _main(tmp_path, world, cache)
    _wait_for(proc, f"{max(steps) + 1}/4")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc = _main(tmp_path, world, cache)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    # the bar resumes at the restored step; the session's first step (its compilation) is reported apart
    resumed = int(out.split("resumed from")[1].split("step")[1].split()[0])
    assert f"step {resumed + 1} took" in out and "compiling included" in out and f"] {resumed + 1}/4" in out
    assert_same_params(final_state(setup, config, tmp_path).params, ref.params)


def test_bad_inputs_fail_before_compute(world, tmp_path):
    config = tiny_config.get_config(str(world))
    config.model.path = str(tmp_path / "no_such_snapshot")
    config.prompts.train = str(tmp_path / "train.txt")
    (tmp_path / "train.txt").write_text("a cat\n")
    config.prompts.eval = str(tmp_path / "train.txt")
    with pytest.raises((FileNotFoundError, OSError), match="no_such_snapshot"):
        experiment.build_setup(config)

    config = tiny_config.get_config(str(tmp_path / "no_world"))
    with pytest.raises(FileNotFoundError, match="no_world"):
        experiment.build_setup(config)

    config = tiny_config.get_config(str(world))
    config.reward_options.world_aesthetic = {"root": str(tmp_path / "no_rewards")}
    with pytest.raises(FileNotFoundError, match="no_rewards"):
        experiment.build_setup(config)

    config = tiny_config.get_config(str(world))
    config.rewards = ("world_geneval", "pickscore_typo")
    with pytest.raises(ValueError, match="pickscore_typo"):
        experiment.build_setup(config)

    (tmp_path / "empty.txt").write_text("\n\n")
    config = tiny_config.get_config(str(world))
    config.prompts.train = str(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="empty.txt"):
        experiment.build_setup(config)

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat", "tag": "counting", "include": [{"class": "cat", "count": 0}]}\n')
    config.prompts.train = str(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl.*1"):
        experiment.build_setup(config)

    config = tiny_config.get_config(str(world))
    config.sample.train_batch = 3
    with pytest.raises(ValueError, match="train_batch"):
        train.validate(config, 1)
    for key, value, match in (
        ("eval.every", 0, r"config.eval.every = 0"),
        ("log_every", 0, r"config.log_every = 0"),
        ("checkpoint.every", 0, r"config.checkpoint.every = 0"),
        ("checkpoint.every_minutes", -1.0, r"config.checkpoint.every_minutes = -1.0"),
        ("old_policy_schedule", 3, r"config.old_policy_schedule = 3"),
        ("sample.method", "heun", r"config.sample.method = 'heun'"),
        ("eval.method", "ddim", r"config.eval.method = 'ddim'"),
        ("scale", "sd35", r"config.scale = 'sd35'.*needs config.model.path"),
    ):
        bad = tiny_config.get_config(str(world))
        *parents, leaf = key.split(".")
        node = bad
        for part in parents:
            node = node[part]
        node[leaf] = value
        with pytest.raises(ValueError, match=match):
            train.validate(bad, 1)


def test_main_checks_the_config_before_loading_a_model_and_names_its_workdir(tmp_path):
    """``:sd35`` without a model path fails at once, before loading anything; the default workdir carries the
    config's argument."""
    from marble_jax import run_log

    assert run_log.default_workdir("configs/k5.py:sd35") == Path("runs/k5_sd35")
    assert run_log.default_workdir("configs/k5.py") == Path("runs/k5")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "marble_jax.main", f"--config={ROOT / 'configs/k5.py'}:sd35", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "needs config.model.path" in proc.stderr + proc.stdout
    assert "loading" not in (proc.stderr + proc.stdout).lower() and time.perf_counter() - started < 120


def test_unknown_config_key_is_named(world, tmp_path):
    start = time.time()
    proc = _main(tmp_path, world, "--config.sample.num_stepz=3")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "num_stepz" in out
    assert not (tmp_path / "checkpoints").exists()
    assert time.time() - start < 120


def test_sharded_runs_match_one_device(reference, tmp_path):
    """1 device vs meshes data 2 x fsdp 4 and 8 x 1 (8 host devices, in a subprocess)."""
    config, _, _, _ = reference
    script = f"""
import sys, json, numpy as np, jax
sys.path.insert(0, {str(ROOT / "tests")!r})
import tiny_config
from marble_jax import experiment, train
out = {{}}
for name, (n, data, fsdp) in {{"one": (1, 1, 1), "d2f4": (8, 2, 4), "d8f1": (8, 8, 1)}}.items():
    config = tiny_config.get_config({config.model.world_dir!r})
    config.total_epochs = 3
    config.sample.update(rollout_batch=8, train_batch=8)
    config.mesh.update(num_devices=n, data=data, fsdp=fsdp)
    state = train.run(experiment.build_setup(config), config, {str(tmp_path)!r} + "/" + name)
    out[name] = [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)]
    init = train.make_init_state(experiment.build_setup(config), config, train.make_optimizer(config))
out["init"] = [np.asarray(x).tolist() for x in jax.tree.leaves(init(experiment.build_setup(config).base_params).params)]
json.dump(out, open({str(tmp_path / "params.json")!r}, "w"))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {k: [np.asarray(x) for x in v] for k, v in json.loads((tmp_path / "params.json").read_text()).items()}
    moved = max(float(np.abs(a - b).max()) for a, b in zip(out["one"], out["init"], strict=True))
    assert moved > 1e-3, "the runs did not train"
    # Not bitwise: sharded reductions sum in another order; a last-bit difference can flip the rounding of an image
    # pixel (rewards read uint8 images), and AdamW moves a parameter by ~lr whatever its gradient's size, so a
    # near-zero gradient's rounding shows at ~lr scale. Bound: 2% of the largest parameter change.
    for name in ("d2f4", "d8f1"):
        diff = max(float(np.abs(a - b).max()) for a, b in zip(out["one"], out[name], strict=True))
        assert diff < 0.02 * moved, (name, diff, moved)


def test_resume_may_change_where_it_runs_but_not_what():
    saved = tiny_config.get_config().to_dict()
    current = tiny_config.get_config()
    current.mesh.update(num_devices=4, data=4)
    current.model.update(remat="dots", scan_blocks=True, attention="xla")
    current.reward_options.world_geneval.update(device="gpu", batch_size=64, workers=4)
    current.checkpoint.every_minutes = 5.0
    current.lora.init_from = "/adapters/new"  # a resumed run's adapter comes from its checkpoint
    train._check_resumable(json.loads(json.dumps(saved)), json.loads(current.to_json_best_effort()))
    # a run saved before keys were added to the defaults: they read as their defaults, not as a change
    older = json.loads(json.dumps(saved))
    del older["model"]["text_dtype"], older["prompts"]["cache_gb"], older["mesh"]["replicate_frozen_gb"]
    train._check_resumable(older, json.loads(current.to_json_best_effort()))
    changed = json.loads(current.to_json_best_effort())
    changed["model"]["text_dtype"] = "float32"
    with pytest.raises(ValueError, match=r"model.text_dtype"):
        train._check_resumable(older, changed)
    current.lora.alpha = 1.0
    current.reward_options.world_geneval.threshold = 0.5
    with pytest.raises(ValueError, match=r"\['lora.alpha', 'reward_options.world_geneval.threshold'\]"):
        train._check_resumable(json.loads(json.dumps(saved)), json.loads(current.to_json_best_effort()))


def test_checkpoint_of_8_devices_restores_on_4_and_1_and_resumes(reference, tmp_path):
    config, _, _, _ = reference
    script = f"""
import sys, json, numpy as np, jax
sys.path.insert(0, {str(ROOT / "tests")!r})
import tiny_config
from marble_jax import experiment, train
def cfg(n):
    c = tiny_config.get_config({config.model.world_dir!r})
    c.total_epochs = 2
    c.sample.update(rollout_batch=8, train_batch=8)
    c.eval.every = 100
    c.mesh.update(num_devices=n, data=n, fsdp=1)
    return c
setup = experiment.build_setup(cfg(8))
state = train.run(setup, cfg(8), {str(tmp_path)!r})
leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves((s.params, s.opt_state, s.ema_params, s.old_params))]
out = {{}}
for n in (4, 1):
    step, restored = train.restore_run(setup, cfg(n), {str(tmp_path)!r})
    out[n] = step == 2 and all(np.array_equal(a, b) for a, b in zip(leaves(state), leaves(restored), strict=True))
    assert restored.params[next(iter(restored.params))]["a"].sharding.mesh.size == n
c = cfg(4)
c.total_epochs = 3
out["resumed"] = int(train.run(setup, c, {str(tmp_path)!r}).step)
json.dump(out, open({str(tmp_path / "out.json")!r}, "w"))
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text()) == {"4": True, "1": True, "resumed": 3}


def assert_as_one_device(params, ref_params, min_moved: float = 0.0) -> None:
    """``params`` of a multi-process run against the 1-device ``ref_params``: the run trained (LoRA B, which starts at
    0, moved by more than ``min_moved``) and ends within 2% of that movement of the reference. Not bitwise, as in
    test_sharded_runs_match_one_device: reductions sum in another order across processes."""
    moved = max(float(np.abs(x["b"]).max()) for x in ref_params.values())
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs)
    assert moved > min_moved and diff < 0.02 * moved, (diff, moved)


def _rerun_both_to_the_end(workdir: Path, world: Path) -> None:
    """Reruns both processes of an interrupted 2-process run: both resume and exit 0."""
    procs = _two_processes(workdir, world)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "resumed from" in out


def test_two_process_run_matches_one_device(reference, tmp_path):
    """Two ``jax.distributed`` processes (one CPU device each, gloo collectives) on a data 2 x fsdp 1 mesh."""
    config, setup, ref, _ = reference
    procs = _two_processes(tmp_path, Path(config.model.world_dir))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 1 of 2" in outs[1]
    assert_as_one_device(final_state(setup, config, tmp_path).params, ref.params, min_moved=1e-3)


def _coordinator() -> tuple[str, dict[str, str]]:
    """``(address, env)`` for two local ``jax.distributed`` processes of one CPU device each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    return address, {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _two_processes(workdir: Path, world: Path, *overrides: str) -> list[subprocess.Popen]:
    address, env = _coordinator()
    flags = ["--distributed", f"--coordinator_address={address}", "--num_processes=2", "--config.mesh.data=2"]
    return [_main(workdir, world, *flags, *overrides, f"--process_id={i}", env=env) for i in range(2)]


def _script_on_two_processes(script: str, timeout: float) -> tuple[list[subprocess.Popen], list[str]]:
    """Runs ``python -c script <process id> <coordinator address>`` as two processes; returns them and their output."""
    address, env = _coordinator()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), address], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]  # fmt: skip
    return procs, [p.communicate(timeout=timeout)[0] for p in procs]


def test_jax_reward_on_two_processes_scores_each_process_rows(reference, tmp_path):
    """A JAX reward (a tiny CLIPScore, sharded over the devices) on two ``jax.distributed`` processes: each scores the
    rows it holds, the gathered scores equal one process scoring them all; and a 2-process run training on it ends
    where the 1-process run does."""
    config, _, _, _ = reference
    save_tiny_clip(tmp_path / "clip", processor=dict(size=36, crop_size=32))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 40, 48, 3), dtype=np.uint8)
    prompts = [f"a {c} thing" for c in ("red", "green", "blue", "small", "large", "round", "square", "bright")]
    np.save(tmp_path / "images.npy", images)
    script = f"""
import sys, json, numpy as np, jax
from marble_jax import sharding
from marble_jax.rewards import clip_scores
pid = int(sys.argv[1])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[2], 2, pid)
images, prompts = np.load({str(tmp_path / "images.npy")!r}), {prompts!r}
mesh = sharding.make_mesh(2, 1)  # hybrid: data across the two hosts
assert [[d.process_index for d in row] for row in mesh.devices] == [[0], [1]], mesh.devices
rows = np.arange(4 * pid, 4 * pid + 4)  # the trainer hands each process its own rows
fn = clip_scores.clipscore(path={str(tmp_path / "clip")!r}, batch_size=2)
scores = sharding.gather_rows(rows, fn(images[rows], [prompts[i] for i in rows], [None] * 4), 8)
if pid == 0:
    json.dump(scores.tolist(), open({str(tmp_path / "scores.json")!r}, "w"))
"""
    procs, outs = _script_on_two_processes(script, timeout=600)
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    from marble_jax.rewards import clip_scores

    one = clip_scores.clipscore(path=str(tmp_path / "clip"), batch_size=2)(images, prompts, [None] * 8)
    # the same per-image computation in other batches: equal up to float32 rounding of a batch's reductions
    np.testing.assert_allclose(json.loads((tmp_path / "scores.json").read_text()), one, rtol=1e-5)

    world = f"{config.model.world_dir}|{tmp_path / 'clip'}"
    flags = ["--config.total_epochs=2", "--config.eval.every=100"]
    single = _main(tmp_path / "one", world, *flags)
    out = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out[-3000:]
    procs = _two_processes(tmp_path / "two", world, *flags)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    train_scores = [[m["train/clipscore"] for m in _metrics(tmp_path / d)] for d in ("one", "two")]
    np.testing.assert_allclose(train_scores[1], train_scores[0], rtol=1e-4)
    c = tiny_config.get_config(world)
    c.total_epochs = 2
    setup = experiment.build_setup(c)
    one, two = (final_state(setup, c, tmp_path / d).params for d in ("one", "two"))
    assert_as_one_device(two, one, min_moved=1e-4)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(reference, tmp_path):
    """SIGTERM to process 1 only: both processes save the same step and exit 0; rerunning both resumes and ends
    where an uninterrupted run does."""
    config, setup, ref, _ = reference
    procs = _two_processes(tmp_path, Path(config.model.world_dir))
    _wait_for(procs[0], "1/4")  # only process 0 prints the progress line
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "stopped at step" in out
    assert "1/4" not in outs[1] and "received SIGTERM" in outs[1]
    stopped = [int(out.split("stopped at step ")[1].split()[0]) for out in outs]
    assert stopped[0] == stopped[1] < 4 and max(Checkpointer(tmp_path / "checkpoints").steps()) == stopped[0]
    _rerun_both_to_the_end(tmp_path, Path(config.model.world_dir))
    assert_as_one_device(final_state(setup, config, tmp_path).params, ref.params)


def test_kill_9_of_one_of_two_processes_then_rerun_both(reference, tmp_path):
    """kill -9 of process 1 mid-run (process 0 is then stopped too, as a job scheduler would), then both rerun: the
    run resumes from the last agreed checkpoint and ends where an uninterrupted run does."""
    config, setup, ref, _ = reference
    procs = _two_processes(tmp_path, Path(config.model.world_dir))
    _wait_for(procs[0], "2/4")
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=60)
    try:
        procs[0].wait(timeout=20)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].wait(timeout=60)
    assert max(Checkpointer(tmp_path / "checkpoints").steps()) < 4
    _rerun_both_to_the_end(tmp_path, Path(config.model.world_dir))
    assert_as_one_device(final_state(setup, config, tmp_path).params, ref.params)


def test_restore_agreed_when_one_process_cannot_read_the_newest_checkpoint(reference, tmp_path):
    """Process 1 cannot read step 3 (process 0 can): both fall back to step 2, together, and finish the run."""
    config, _, _, _ = reference
    world = config.model.world_dir
    procs = _two_processes(tmp_path, Path(world), "--config.total_epochs=3", "--config.eval.every=100")
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert Checkpointer(tmp_path / "checkpoints").steps() == [1, 2, 3]
    script = f"""
import sys, logging, jax
sys.path.insert(0, {str(ROOT / "tests")!r})
import tiny_config
from marble_jax import checkpoint, experiment, sharding, train
logging.basicConfig(level=logging.INFO)
logging.getLogger("marble_jax").setLevel(logging.INFO)
pid = int(sys.argv[1])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[2], 2, pid)
if pid == 1:
    check = checkpoint.Checkpointer._check
    def unreadable_3(self, target, step):
        if step == 3:
            raise checkpoint.CheckpointReadError("process 1 cannot read step 3")
        return check(self, target, step)
    checkpoint.Checkpointer._check = unreadable_3
c = tiny_config.get_config({world!r})
c.mesh.data, c.total_epochs, c.eval.every = 2, 4, 100
state = train.run(experiment.build_setup(c), c, {str(tmp_path)!r})
print("final step", int(sharding.to_host(state.step)))
"""
    procs, outs = _script_on_two_processes(script, timeout=900)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "resumed from" in out and "step 2" in out.split("resumed from")[1].splitlines()[0], out[-3000:]
        assert "final step 4" in out
    assert "process 1 cannot read step 3" in outs[1] and "cannot be read by another process" in outs[0]


def test_second_signal_aborts_at_once(reference, tmp_path):
    config, _, _, _ = reference
    proc = _main(tmp_path, Path(config.model.world_dir))
    _wait_for(proc, "1/4")
    # Two different signals back to back (two of the same may merge into one while pending): Python runs both
    # handlers before the loop's next step boundary, and the second aborts.
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT), out[-3000:]
    assert "aborting now" in out and "stopped at step" not in out


def test_checkpoints_on_time_as_well_as_on_steps(world, tmp_path):
    config = tiny_config.get_config(str(world))
    config.total_epochs = 3
    config.checkpoint.update(every=100, keep=5)
    setup = experiment.build_setup(config)
    train.run(setup, config, tmp_path / "steps")
    assert Checkpointer(tmp_path / "steps" / "checkpoints").steps() == [3]  # the final step only
    config.checkpoint.every_minutes = 1e-6  # due at every step boundary
    train.run(setup, config, tmp_path / "minutes")
    assert Checkpointer(tmp_path / "minutes" / "checkpoints").steps() == [1, 2, 3]


def test_evaluate_table_of_checkpoints(reference, tmp_path):
    config, setup, ref, workdir = reference
    rows = evaluate.evaluate_runs(setup, config, [workdir])
    assert list(rows) == ["base", workdir.name] and set(rows["base"]) == set(config.rewards)
    # the base row is the step-0 evaluation of the run (same prompts, same noise), the run's row its step-4 one
    evals = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    for name, ev in (("base", evals[0]), (workdir.name, evals[-1])):
        for reward in config.rewards:
            np.testing.assert_allclose(rows[name][reward], ev[reward], rtol=1e-5, equal_nan=True)
    md, csv = results_table.write_table(rows, list(config.rewards), tmp_path / "table")
    assert "Composite" in md.read_text() and workdir.name in csv.read_text()
    with pytest.raises(FileNotFoundError, match="no_run"):
        evaluate.evaluate_runs(setup, config, [tmp_path / "no_run"])
    # Scored with another command-line config (LoRA alpha, rewards): each run is restored and sampled with its own
    # config.json, so its row is still its final evaluation
    other = tiny_config.get_config(config.model.world_dir)
    other.lora.alpha = 4 * config.lora.alpha
    other.rewards = ("world_geneval", "world_ocr")
    own_setup, own_config = evaluate.run_setup(experiment.build_setup(other), other, workdir)
    assert own_setup.lora_spec.alpha == config.lora.alpha and list(own_config.rewards) == list(config.rewards)
    rows = evaluate.evaluate_runs(experiment.build_setup(other), other, [workdir])
    for reward in other.rewards:
        np.testing.assert_allclose(rows[workdir.name][reward], evals[-1][reward], rtol=1e-5, equal_nan=True)


def test_evaluate_samples_a_bf16_run_as_its_training_evaluated(reference, tmp_path):
    """A bfloat16 run's base is held as the trainer holds it (train.place_frozen: cast to bf16): the table's row is
    the run's own last evaluation."""
    config, _, _, _ = reference
    config = tiny_config.get_config(config.model.world_dir)
    config.model.compute_dtype = "bfloat16"
    config.update(total_epochs=1, method="weighted_sum")
    config.eval.every = 1
    setup = experiment.build_setup(config)
    train.run(setup, config, tmp_path / "run")
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    rows = evaluate.evaluate_runs(setup, config, [tmp_path / "run"])
    # the same program on the same parameters, prompts and noise: equal up to the mean's float64 rounding (1e-6);
    # with the base held in float32 the difference measured 1.8e-5
    for name, ev in (("base", evals[0]), ("run", evals[-1])):
        for reward in config.rewards:
            np.testing.assert_allclose(rows[name][reward], ev[reward], rtol=1e-6, equal_nan=True)


def test_full_finetuning_trains_every_weight(reference, tmp_path):
    config, _, _, _ = reference
    config = tiny_config.get_config(config.model.world_dir)
    config.update(finetune="full", total_epochs=2, method="weighted_sum")
    config.eval.every = 100
    setup = experiment.build_setup(config)
    state = train.run(setup, config, tmp_path)
    assert jax.tree.structure(state.params) == jax.tree.structure(setup.base_params)
    pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(setup.base_params), strict=True)
    changed = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0 for a, b in pairs]
    assert np.mean(changed) > 0.9, f"only {np.mean(changed):.0%} of the tensors moved"


def test_eval_only_rewards_are_scored_not_trained(world):
    from marble_jax.experiment import _train_and_eval_rewards

    config = tiny_config.get_config(str(world))
    config.rewards = ("world_clipscore", "world_geneval")
    config.eval_only_rewards = ("world_aesthetic",)
    config.eval_reward_options = {"world_geneval": {"strict": True}}
    train, held_out = _train_and_eval_rewards(config)
    assert list(train) == ["world_clipscore", "world_geneval"]
    assert list(held_out) == ["world_clipscore", "world_geneval", "world_aesthetic"]
    assert train["world_clipscore"] is held_out["world_clipscore"]  # same options: built once
    assert train["world_geneval"] is not held_out["world_geneval"]
    config.eval_only_rewards = ("world_clipscore", "world_aesthetic")  # a trained one is evaluated once
    assert list(_train_and_eval_rewards(config)[1]) == ["world_clipscore", "world_geneval", "world_aesthetic"]
    config.eval_only_rewards = ("nope",)
    with pytest.raises(ValueError, match="nope"):
        _train_and_eval_rewards(config)


def test_reward_options_listed_merged_and_checked(world, caplog):
    from marble_jax import defaults
    from marble_jax.experiment import _train_and_eval_rewards

    sd35 = defaults.with_rewards(defaults.get_config("sd35"), defaults.FIVE_REWARDS["sd35"])
    assert sd35.reward_options.pickscore.path == "yuvalkirstain/PickScore_v1"  # every checkpoint path listed
    assert sd35.eval_reward_options.aesthetic.clip_path == "openai/clip-vit-large-patch14"
    config = tiny_config.get_config(str(world))
    config.rewards = ("world_clipscore", "world_geneval")  # world_aesthetic's listed defaults stay: ignored silently
    config.reward_options.world_geneval.threshold = 0.5
    train, held_out = _train_and_eval_rewards(config)
    assert not caplog.records
    # held-out GenEval: the training options (threshold 0.5) updated by the evaluation ones (strict)
    assert train["world_geneval"] is not held_out["world_geneval"]
    config.reward_options.world_ocr = {"nonsense": 1}  # changed options of a reward not trained: a warning
    _train_and_eval_rewards(config)
    assert "world_ocr" in caplog.text
    config.reward_options.pickscor = {}
    with pytest.raises(ValueError, match="pickscor"):
        _train_and_eval_rewards(config)


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_marble_gram_method_solves_like_marble(reference, tmp_path):
    """The trainer's ``marble_gram`` (per-sample gradients) gives ``marble``'s MGDA weights and coefficients."""
    config, _, _, _ = reference
    rows = {}
    for method in ("marble", "marble_gram"):
        c = tiny_config.get_config(config.model.world_dir)
        c.update(method=method, total_epochs=2)
        c.eval.every = 100
        train.run(experiment.build_setup(c), c, tmp_path / method)
        rows[method] = _metrics(tmp_path / method)
    for a, b in zip(rows["marble"], rows["marble_gram"], strict=True):
        for key in ("lambda/world_geneval", "lambda/world_ocr", "lambda/world_aesthetic", "coefficients/world_ocr"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-3, atol=1e-6)
        assert b["anti_aligned"] == a["anti_aligned"]


def test_dpo_method_trains_on_best_worst_pairs(reference, tmp_path):
    config, _, _, _ = reference
    c = tiny_config.get_config(config.model.world_dir)
    c.update(method="dpo", single_reward="world_aesthetic", total_epochs=2)
    c.eval.every = 100
    setup = experiment.build_setup(c)
    state = train.run(setup, c, tmp_path)
    first, last = _metrics(tmp_path)
    # step 1 starts at the base model (LoRA B = 0): every D is 0, the loss is log 2 and the step-level term vanishes
    np.testing.assert_allclose(first["dpo_loss"], np.log(2), rtol=1e-5)
    assert first["d_diff"] == 0.0 and first["valid_pairs"] == 1.0
    assert last["dpo_loss"] != first["dpo_loss"] and np.isfinite(last["dpo_loss"])
    moved = [float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(state.params)]
    assert max(moved) > 0
    c.sample.update(prompts_per_epoch=3, rollout_batch=4, train_batch=4)  # 2 pairs per micro-batch, 3 prompts
    with pytest.raises(ValueError, match="must divide prompts_per_epoch"):
        train.validate(c, 1)


def test_dpo_draws_no_timestep_at_t_one():
    """DPO's (1 - t)^2 weight is exactly 0 at the grid's first point t = 1: DPO never trains there, NFT does."""
    config = tiny_config.get_config()
    config.sample.update(num_steps=6, timestep_fraction=0.99)
    sigmas = sampling.sigma_schedule(6, shift=3.0)
    nft_t = np.asarray(train.draw_timesteps(jax.random.key(0), 64, sigmas, config))
    config.method = "dpo"
    dpo_t = np.asarray(train.draw_timesteps(jax.random.key(0), 64, sigmas, config))
    assert nft_t.shape == (64, 5) and dpo_t.shape == (64, 5)
    assert (nft_t == 1.0).any() and not (dpo_t == 1.0).any()
    assert set(np.unique(dpo_t)) == set(np.asarray(sigmas)[1:6])  # every other grid point, each once per pair
    assert all(len(set(row)) == 5 for row in dpo_t)
