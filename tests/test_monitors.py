"""marble_jax.monitors: the image statistics on constructed images, the evaluation-only check, the references a
resumed run reads back, and two trainer runs: a reward hack that trips the warning, a normal run that does not."""

import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config
from helpers import save_tiny_world

from marble_jax import defaults, experiment, monitors, rewards, statistics, train


def solid(rgb, n: int = 2, size: int = 8) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.uint8), (n, size, size, 3)).copy()


def test_image_statistics_of_constructed_images():
    stats = jax.jit(lambda im: (monitors.brightness(im), monitors.saturation(im)))  # jit-able
    cases = {  # colour: (brightness, saturation)
        (255, 255, 255): (1.0, 0.0),
        (0, 0, 0): (0.0, 0.0),
        (128, 128, 128): (128 / 255, 0.0),  # any grey: saturation 0
        (255, 0, 0): (0.299, 1.0),
        (0, 255, 0): (0.587, 1.0),
        (0, 0, 255): (0.114, 1.0),
        (200, 100, 100): ((0.299 * 200 + 0.587 * 100 + 0.114 * 100) / 255, 0.5),
    }
    for rgb, (luma, sat) in cases.items():
        b, s = stats(solid(rgb))
        np.testing.assert_allclose(b, [luma, luma], rtol=1e-6, atol=1e-7, err_msg=str(rgb))
        np.testing.assert_allclose(s, [sat, sat], rtol=1e-6, atol=1e-7, err_msg=str(rgb))
    half = solid((0, 0, 0), 1)
    half[:, :4] = 255  # half white, half black: the mean over pixels
    assert float(monitors.brightness(half)[0]) == pytest.approx(0.5)
    x0 = jnp.stack([jnp.full((4, 4, 16), 2.0), jnp.full((4, 4, 16), -0.5)])
    np.testing.assert_allclose(jax.jit(monitors.x0_norm)(x0), [2.0, 0.5], rtol=1e-6)  # RMS, whatever the size


def test_rollout_statistics_average_every_sample_of_the_chunks():
    chunks = [(jnp.full((2, 4, 4, 3), 1.0), jnp.asarray(solid((255, 255, 255)))),
              (jnp.full((6, 4, 4, 3), 3.0), jnp.asarray(solid((0, 0, 0), 6)))]  # fmt: skip
    stats = monitors.rollout_statistics(chunks)
    assert stats == pytest.approx({"brightness": 2 / 8, "saturation": 0.0, "x0_norm": (2 * 1 + 6 * 3) / 8})


def test_world_brightness_reward_pays_for_brightness_everywhere():
    fn = rewards.get("world_brightness")
    images = np.concatenate([solid((255, 255, 255), 1), solid((24, 24, 24), 1), solid((255, 0, 0), 1)])
    prompts = ["a red square", 'the word "hi"', "two blue circles"]
    np.testing.assert_allclose(fn(images, prompts, [None, None, {"tag": "counting"}]), [1.0, 24 / 255, 0.299], rtol=1e-6)
    assert fn.applies(prompts, [None] * 3).all()
    assert "world_brightness" in rewards.names()


def world_config(rewards_=("world_geneval", "world_ocr"), eval_only=("world_aesthetic", "world_hps")):
    c = defaults.get_config("world")
    c.rewards, c.eval_only_rewards = tuple(rewards_), tuple(eval_only)
    return c


def per_image(mean: float, std: float, n: int = 8) -> np.ndarray:
    """``n`` scores with exactly this mean and population std."""
    return mean + std * np.array([1.0, -1.0] * (n // 2))


def test_eval_only_check_warns_below_the_base_by_the_margin(tmp_path, caplog):
    config = world_config(rewards_=("world_geneval", "world_aesthetic"), eval_only=("world_aesthetic", "world_hps"))
    monitor = monitors.Monitor(config, tmp_path)
    assert monitor.eval_only == ("world_hps",)  # a trained reward is not evaluation-only
    base = {"world_geneval": 0.1, "world_aesthetic": 6.0, "world_hps": 0.40}
    assert monitor.on_eval(0, base, {n: per_image(v, 0.2) for n, v in base.items()}) == {}
    assert monitor.base["world_hps"] == pytest.approx((0.40, 0.2))
    with caplog.at_level(logging.WARNING, logger="marble_jax.monitors"):
        # 0.5 std under the base is the margin: 0.31 is within it, 0.29 below; a trained reward's fall is not checked
        out = monitor.on_eval(10, {**base, "world_hps": 0.31, "world_aesthetic": 1.0}, {})
        assert out == pytest.approx({"monitor/eval_only_shift/world_hps": -0.45}) and not caplog.records
        out = monitor.on_eval(20, {**base, "world_hps": 0.29}, {})
    assert out == pytest.approx({"monitor/eval_only_shift/world_hps": -0.55})
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    for part in ("world_hps", "0.2900", "step 20", "0.4000", "samples/step_000020.png"):
        assert part in message, (part, message)
    assert monitor.last_eval["world_hps"] == pytest.approx(0.29)


def test_step_scalars_ratio_and_gaps(tmp_path):
    monitor = monitors.Monitor(world_config(), tmp_path)
    monitor.on_eval(0, {"world_geneval": 0.2, "world_ocr": math.nan}, {})
    chunk = lambda v: (jnp.full((4, 4, 4, 3), v), jnp.asarray(solid((255, 255, 255), 4)))  # noqa: E731
    out = monitor.step_scalars(0, [chunk(2.0)], {"train/world_geneval": 0.5, "train/world_ocr": 0.1})
    assert out == pytest.approx({"monitor/brightness": 1.0, "monitor/saturation": 0.0, "monitor/x0_norm": 2.0,
                                 "monitor/x0_norm_ratio": 1.0, "monitor/gap/world_geneval": 0.3})  # fmt: skip
    out = monitor.step_scalars(1, [chunk(3.0)], {"train/world_geneval": 0.1})
    assert out["monitor/x0_norm_ratio"] == pytest.approx(1.5) and out["monitor/gap/world_geneval"] == pytest.approx(-0.1)


def test_a_resumed_monitor_reads_its_references_back(tmp_path, caplog):
    """The base's step-0 scores from eval.jsonl, their spread from the evaluator's per-image scores, the last
    evaluation up to the resumed step, the base x0 norm from metrics.jsonl's first row; rows past the step ignored."""
    rows = [{"step": 0, "world_geneval": 0.1, "world_aesthetic": 6.0}, {"step": 4, "world_geneval": 0.3,
            "world_aesthetic": 5.9}, {"step": 8, "world_geneval": 9.0, "world_aesthetic": 0.0}]  # fmt: skip
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "samples").mkdir()
    monitors.scores_path(tmp_path, 0).write_text(json.dumps({"scores": {"world_aesthetic": per_image(6.0, 0.4).tolist()}}))
    metrics = [{"step": s, "monitor/x0_norm": 0.8 + s} for s in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    monitor = monitors.Monitor(world_config(rewards_=("world_geneval",), eval_only=("world_aesthetic",)), tmp_path)
    chunk = (jnp.full((2, 4, 4, 3), 3.6), jnp.asarray(solid((0, 0, 0))))
    out = monitor.step_scalars(5, [chunk], {"train/world_geneval": 0.5})  # resumed at step 5
    assert out["monitor/x0_norm_ratio"] == pytest.approx(3.6 / 1.8)
    assert out["monitor/gap/world_geneval"] == pytest.approx(0.5 - 0.3)  # step 4's evaluation, not step 8's
    assert monitor.base["world_aesthetic"] == pytest.approx((6.0, 0.4))
    with caplog.at_level(logging.WARNING, logger="marble_jax.monitors"):
        monitor.on_eval(8, {"world_geneval": 0.3, "world_aesthetic": 5.75}, {})
    assert "world_aesthetic fell to 5.7500 at step 8, below the base's 6.0000" in caplog.text
    # a run from before the monitors (no per-image scores, no x0 norm): said once, not checked
    caplog.clear()
    for name in ("metrics.jsonl", "samples/step_000000_scores.json"):
        (tmp_path / name).unlink()
    old = monitors.Monitor(world_config(rewards_=("world_geneval",), eval_only=("world_aesthetic",)), tmp_path)
    with caplog.at_level(logging.WARNING, logger="marble_jax.monitors"):
        assert "monitor/x0_norm_ratio" not in old.step_scalars(5, [chunk], {})
        old.step_scalars(6, [chunk], {})
        assert old.on_eval(8, {"world_aesthetic": 1.0}, {}) == {}
    assert len(caplog.records) == 2 and "per-image" in caplog.records[1].getMessage()


# ------------------------------------------------------------------------------------------------ trainer runs


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _monitor_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "marble_jax.monitors" and r.levelno >= logging.WARNING]


def test_brightness_hack_trips_the_eval_only_warning_across_a_resume(tmp_path, caplog):
    """Trained on ``world_brightness`` alone, with the learning rate raised to 1e-2 and the evaluation on the trained
    parameters (``ema_decay`` 0), the policy brightens the scenes and the evaluation-only aesthetic falls.

    The shipped world model (tiny_config's sizes, ``model.world_dir`` empty): the tiny random world of
    ``helpers.save_tiny_world`` draws noise whatever its weights (measured: brightness 0.4985 -> 0.506 and the
    aesthetic up, 4.676 -> 4.751, in 6 steps at learning rate 0.1), so it cannot show a hack in a few steps. The
    evaluation is the world's (10 Euler steps) on 32 held-out prompts: with tiny_config's 2 steps the base's images
    are too rough for the aesthetic to tell. Measured on this CPU: the aesthetic 6.056 at step 0, 6.227 at step 4
    (it likes the saturation that comes first), 5.714 at 8 and 5.194 at 12 (-1.45 base per-image std, 0.595;
    the margin is 0.5), while PickScore and CLIPScore fall too. The run stops at step 6 and resumes, so that the
    warning at step 12 compares with the base read back from eval.jsonl and samples/step_000000_scores.json."""
    config = tiny_config.get_config("")
    config.rewards, config.method, config.single_reward = ("world_brightness",), "single", "world_brightness"
    config.reward_options = {}
    config.eval_only_rewards = ("world_aesthetic",)
    config.eval_reward_options = {"world_aesthetic": {}}
    config.optim.learning_rate, config.ema_decay = 1e-2, 0.0
    config.eval.update(every=6, num_steps=10, num_prompts=32, batch=32)
    config.total_epochs, config.checkpoint.every = 6, 6
    setup = experiment.build_setup(config)
    with caplog.at_level(logging.WARNING):
        train.run(setup, config, tmp_path)
        config.total_epochs = 12
        train.run(setup, config, tmp_path)  # resumes at step 6: a new Monitor reads the references back
    evals = {r["step"]: r for r in _rows(tmp_path / "eval.jsonl")}
    assert sorted(evals) == [0, 6, 12]
    base, last = evals[0]["world_aesthetic"], evals[12]["world_aesthetic"]
    warnings = _monitor_warnings(caplog)
    assert any(f"world_aesthetic fell to {last:.4f} at step 12, below the base's {base:.4f}" in w for w in warnings), (
        warnings,
        evals,
    )
    metrics = _rows(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:
        keys = {"monitor/brightness", "monitor/saturation", "monitor/x0_norm", "monitor/x0_norm_ratio"}
        assert keys | {"monitor/gap/world_brightness"} <= set(m), m.keys()
    assert metrics[0]["monitor/x0_norm_ratio"] == 1.0  # step 0's rollouts are the base's
    # after the resume, the ratio is over the first row's norm, read back from metrics.jsonl
    assert metrics[6]["monitor/x0_norm_ratio"] == pytest.approx(metrics[6]["monitor/x0_norm"] / metrics[0]["monitor/x0_norm"])
    assert metrics[-1]["monitor/brightness"] > 2 * metrics[0]["monitor/brightness"]  # the hack, as the monitor sees it
    assert metrics[-1]["train/world_brightness"] == pytest.approx(metrics[-1]["monitor/brightness"], abs=1e-5)
    assert metrics[-1]["monitor/gap/world_brightness"] == pytest.approx(
        metrics[-1]["train/world_brightness"] - evals[6]["world_brightness"]  # step 11's rollouts vs step 6's eval
    )
    per_image = json.loads(monitors.scores_path(tmp_path, 12).read_text())
    assert len(per_image["prompts"]) == 32 and len(per_image["scores"]["world_aesthetic"]) == 32
    assert np.nanmean(per_image["scores"]["world_aesthetic"]) == pytest.approx(last, rel=1e-6)
    assert np.mean(statistics.per_prompt_scores(tmp_path)["world_aesthetic"]) == pytest.approx(last, rel=1e-6)
    # the shift the reports read back from the score files: below -margin where the warning tripped
    std0 = np.std(json.loads(monitors.scores_path(tmp_path, 0).read_text())["scores"]["world_aesthetic"])
    shift = monitors.eval_only_shift(tmp_path, 12, "world_aesthetic")
    assert shift == pytest.approx((last - base) / std0, rel=1e-5) and shift < -config.monitors.eval_only_margin
    assert np.isnan(monitors.eval_only_shift(tmp_path, 12, "no_such_reward"))
    with pytest.raises(FileNotFoundError, match="step 5"):
        monitors.eval_only_shift(tmp_path, 5, "world_aesthetic")


def test_normal_tiny_run_does_not_warn(tmp_path, caplog, monkeypatch):
    """tiny_config's run as it is (the tiny random world, its three trained rewards, its learning rate), with two
    rewards it does not train evaluated only: nothing trips the check, and the scalars are logged. (The tiny random
    world barely moves in 4 steps; what this shows is that an unchanged policy, evaluated on fixed noise, raises no
    false alarm, and that a normal run carries the monitors without effect on it.)"""
    config = tiny_config.get_config(str(save_tiny_world(tmp_path / "world")))
    config.eval_only_rewards = ("world_aesthetic", "world_hps", "world_clipscore")  # aesthetic is trained: not checked
    shifts = {}
    on_eval = monitors.Monitor.on_eval

    def recording(self, step, scores, per_image):
        shifts[step] = on_eval(self, step, scores, per_image)
        return shifts[step]

    monkeypatch.setattr(monitors.Monitor, "on_eval", recording)
    with caplog.at_level(logging.WARNING):
        train.run(experiment.build_setup(config), config, tmp_path / "run")
    assert _monitor_warnings(caplog) == []
    assert sorted(shifts) == [0, 2, 4] and shifts[0] == {}
    for step in (2, 4):  # checked, and within the margin
        assert set(shifts[step]) == {"monitor/eval_only_shift/world_hps", "monitor/eval_only_shift/world_clipscore"}
        assert all(v > -config.monitors.eval_only_margin for v in shifts[step].values()), shifts
    metrics = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"monitor/brightness", "monitor/saturation", "monitor/x0_norm_ratio"} <= set(m) for m in metrics)
    assert all(f"monitor/gap/{n}" in m for m in metrics for n in config.rewards if f"train/{n}" in m)
