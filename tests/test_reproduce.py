"""tools/reproduce_marble.py: every method's config is valid and differs from k5 only where it should; the
summary reads what the trainer writes."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool

from marble_jax import image_grid, monitors, train


@pytest.fixture(scope="module")
def tool():
    return load_tool("reproduce_marble")


def test_method_configs(tool):
    base = tool.method_config("marble_amortized", 30, 0).to_dict()
    for method in tool.METHODS:
        config = tool.method_config(method, 30, 0)
        train.validate(config, 1)
        diff = {k for k, v in config.to_dict().items() if base[k] != v}
        assert diff <= {"method", "single_reward", "sequential_stages", "balance", "diagnostics_every"}, (method, diff)
    assert tool.method_config("marble_rho_0.3", 30, 0).balance.ema_decay == 0.3
    assert tool.method_config("single_world_ocr", 30, 0).single_reward == "world_ocr"
    with pytest.raises(ValueError, match="unknown method"):
        tool.method_config("marble_typo", 30, 0)


def test_schedule_keeps_comparisons_on_equal_seeds(tool):
    plan = tool.schedule(list(tool.METHODS), seeds=3, headline_seeds=5)
    assert len(plan) == len(set(plan)) == 4 * 5 + (len(tool.METHODS) - 4) * 3
    assert plan[:4] == [(m, 0) for m in tool.HEADLINE]  # seed 0 of every headline row first
    headline_done = [p for p in plan[:12]]
    assert {s for _, s in headline_done} == {0, 1, 2} and {m for m, _ in headline_done} == set(tool.HEADLINE)
    ablation = plan[12 : 12 + 3 * len(tool.ABLATION)]
    assert {m for m, _ in ablation} == set(tool.ABLATION)
    assert plan[12 + 3 * len(tool.ABLATION)] == ("weighted_sum", 3)  # then the headline rows' seeds 3 and 4
    assert tool.method_config("marble_gram_rho_0.3", 30, 0).balance.ema_decay == 0.3
    assert tool.method_config("marble_gram_rho_0.3", 30, 0).method == "marble_gram"
    assert tool.method_config("weighted_sum", 30, 4).eval.images_per_prompt == tool.IMAGES_PER_PROMPT >= 4


PROMPTS = 24


def fake_run(workdir: Path, columns, seed: int, gain: dict, anti: float | None, step_s: float) -> None:
    """What the trainer writes for a finished 10-step run: eval.jsonl and the per-image score files at steps 0 and
    10 (2 images per prompt; the base's scores depend on the seed only, the trained ones add ``gain`` per reward
    and some noise), metrics.jsonl (step times, anti-aligned flags, monitors) and cost.json."""
    rng = np.random.default_rng(seed)
    base = {r: rng.normal(1.0, 0.3, 2 * PROMPTS) for r in columns}  # the same for every method of the seed
    base["world_ocr"][: 2 * PROMPTS // 2] = np.nan  # OCR applies to half the prompts
    trained_rng = np.random.default_rng([seed, *workdir.parent.name.encode()])
    trained = {r: v + gain.get(r, 0.0) + trained_rng.normal(0, 0.05, v.shape) for r, v in base.items()}
    (workdir / "samples").mkdir(parents=True)
    for step, scores in ((0, base), (10, trained)):
        doc = {"prompts": [f"p{i}" for i in range(PROMPTS)], "prompt_index": [i // 2 for i in range(2 * PROMPTS)],
               "scores": {r: [None if np.isnan(x) else float(x) for x in v] for r, v in scores.items()}}  # fmt: skip
        monitors.scores_path(workdir, step).write_text(json.dumps(doc).replace("null", "NaN"))
    with open(workdir / "eval.jsonl", "w") as f:
        for step, scores in ((0, base), (10, trained)):
            f.write(json.dumps({"step": step, **{r: float(np.nanmean(v)) for r, v in scores.items()}}) + "\n")
    with open(workdir / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            row = {"step": step, "time/step_s": step_s, "monitor/brightness": 0.2, "monitor/gap/world_hps": 0.01}
            if anti is not None:
                row["anti_aligned"] = float(step / 10 <= anti)
            f.write(json.dumps(row) + "\n")
    (workdir / "cost.json").write_text(json.dumps({"wall_s": 60.0, "cpu_s": 120.0, "sessions": 1}))


def test_report_of_seeded_runs(tool, tmp_path):
    """Synthetic finished runs, 3 seeds: MARBLE lifts every reward by 0.5 and is never anti-aligned, the weighted sum
    lifts them by 0.2 and is anti-aligned on 80% of its steps; the report's statistics, verdicts and files follow."""
    runs = tmp_path / "runs"
    rows = {"weighted_sum": ({r: 0.2 for r in tool.COLUMNS}, 0.8, 1.0), "marble": ({r: 0.5 for r in tool.COLUMNS}, 0.0, 2.0)}
    plan = [(m, s) for s in range(3) for m in rows] + [("marble_gram", 0)]  # marble_gram: not run
    for method, seed in plan[:-1]:
        gain, anti, step_s = rows[method]
        fake_run(tool.run_dir(runs, method, seed), tool.COLUMNS, seed, gain, anti, step_s)
    archive = tmp_path / "archive"
    for method, seed in plan:
        if tool.finished(tool.run_dir(runs, method, seed), 10):
            tool.archive_run(tool.run_dir(runs, method, seed), tool.archive_path(archive, method, seed))
    assert not tool.archive_path(archive, "marble_gram", 0).exists()
    collected = tool.collect(archive, plan)
    assert list(collected) == ["base", "weighted_sum", "marble"] and all(list(v) == [0, 1, 2] for v in collected.values())
    run = collected["marble"][1]
    assert run["anti_aligned_fraction"] == 0.0 and run["iterations_per_s"] == pytest.approx(0.5)
    assert np.isnan(run["per_prompt"]["world_ocr"][: PROMPTS // 2]).all() and len(run["per_prompt"]["world_ocr"]) == PROMPTS
    tool.write_report(collected, tmp_path / "out", 10, n_resamples=199, planned=len(plan))
    doc = json.loads((tmp_path / "out" / "reproduction.json").read_text())
    assert doc["budget"] == {"runs": 6, "cpu_minutes": 12.0, "runs_without_cost": 0, "planned_runs": 7}
    for name in ("base", "weighted_sum", "marble"):
        assert doc["rows"][name]["seeds"] == [0, 1, 2] and len(doc["rows"][name]["per_seed"]) == 3
    m, ws = doc["rows"]["marble"], doc["rows"]["weighted_sum"]
    pick = m["held_out"]["world_pickscore"]
    assert pick["low"] < pick["mean"] < pick["high"]
    assert pick["mean"] == pytest.approx(np.mean([r["world_pickscore"] for r in m["per_seed"]]))
    diff = doc["pairs"]["marble - weighted_sum"]
    assert diff["seeds"] == [0, 1, 2] and diff["world_hps"]["low"] > 0.2 and diff["world_hps"]["high"] < 0.4
    assert diff["Composite"]["low"] > 0
    assert m["Composite"]["mean"] > ws["Composite"]["mean"] > doc["rows"]["base"]["Composite"]["mean"]
    assert m["throughput_vs_weighted_sum"]["mean"] == pytest.approx(0.5)
    report = (tmp_path / "out" / "reproduction.md").read_text()
    assert "1. **The weighted sum's direction is often anti-aligned" in report and "over 3 seeds: **reproduced**" in report
    assert "2. **marble lifts all five trained rewards above the base**: 5 of 5" in report
    assert "It beats the weighted sum**: Composite difference" in report
    assert "3. **Throughput of marble against the weighted sum** (paper 0.56x): 0.50" in report
    assert "Budget: 6 finished runs of 7 planned, 12 CPU minutes" in report
    for png in ("reproduction_curves.png", "reproduction_composite.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_verdict_rule(tool):
    assert tool.verdict({"mean": 0.2, "low": 0.1, "high": 0.3}, 3) == "reproduced"
    assert tool.verdict({"mean": 0.2, "low": 0.1, "high": 0.3}, 1) == "inconclusive (one seed)"
    assert tool.verdict({"mean": -0.2, "low": -0.3, "high": -0.1}, 2) == "not reproduced"
    assert tool.verdict({"mean": 0.2, "low": -0.1, "high": 0.3}, 2) == "inconclusive"
    assert tool._all(["reproduced", "inconclusive"]) == "inconclusive"
    assert tool._all(["reproduced", "not reproduced"]) == "not reproduced"
    assert tool._all(["reproduced"] * 3) == "reproduced"
    assert tool._all(["reproduced", "inconclusive (one seed)"]) == "inconclusive (one seed)"


@pytest.mark.parametrize("gram_gain,expected", [(0.5, "**switch to marble_gram**."), (0.0, "**keep the default**")])
def test_default_rule(tool, tmp_path, gram_gain, expected):
    """Item 6 of the claims: another MARBLE setting becomes the default only when its paired Composite difference
    against the default lies above zero over 3 seeds (here 0.3 above on every reward: switch; 0.2 below: keep)."""
    gains = {"weighted_sum": 0.2, "marble_amortized": 0.2, "marble_gram": gram_gain}
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    plan = [(m, s) for s in range(3) for m in gains]
    for method, seed in plan:
        fake_run(tool.run_dir(runs, method, seed), tool.COLUMNS, seed, {r: gains[method] for r in tool.COLUMNS}, 0.0, 1.0)
        tool.archive_run(tool.run_dir(runs, method, seed), tool.archive_path(archive, method, seed))
    tool.write_report(tool.collect(archive, plan), tmp_path / "out", 10, n_resamples=199, planned=len(plan))
    doc = json.loads((tmp_path / "out" / "reproduction.json").read_text())
    diff = doc["pairs"]["marble_gram - marble_amortized"]["Composite"]
    assert (diff["low"] > 0) == (gram_gain > 0.2) and (diff["high"] < 0) == (gram_gain < 0.2)
    line = next(x for x in (tmp_path / "out" / "reproduction.md").read_text().splitlines() if x.startswith("6. "))
    assert "the highest Composite of the other MARBLE settings is marble_gram's" in line and expected in line, line


def test_report_counts_the_monitor_warnings(tool, tmp_path):
    """The evaluation-only aesthetic falling by 1 (about 3 base standard deviations) trips the trainer's warning at
    every seed's evaluation, and the report lists each (seed@step); a rising one trips none. The sample sheets'
    brightness drift is measured without their white grid lines."""
    gains = {"weighted_sum": 0.2, "marble_amortized": -1.0}
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    plan = [(m, s) for s in range(2) for m in gains]
    for method, seed in plan:
        gain = {r: 0.2 for r in tool.REWARDS} | {"world_aesthetic": gains[method]}
        workdir = tool.run_dir(runs, method, seed)
        fake_run(workdir, tool.COLUMNS, seed, gain, 0.0, 1.0)
        for step, pixel in ((0, (100, 50, 50)), (10, (120, 60, 60) if method == "marble_amortized" else (100, 50, 50))):
            images = np.broadcast_to(np.asarray(pixel, np.uint8), (4, 8, 8, 3))  # brighter, as saturated
            image_grid.save_grid(images, monitors.sheet_path(workdir, step), cols=2)
        tool.archive_run(workdir, tool.archive_path(archive, method, seed))
    tool.write_report(tool.collect(archive, plan), tmp_path / "out", 10, n_resamples=199, planned=len(plan))
    rows = json.loads((tmp_path / "out" / "reproduction.json").read_text())["rows"]
    assert rows["marble_amortized"]["sheet_drift"] == pytest.approx({"brightness": 1.2, "saturation": 1.0}, rel=1e-3)
    assert rows["weighted_sum"]["sheet_drift"] == pytest.approx({"brightness": 1.0, "saturation": 1.0})
    assert rows["weighted_sum"]["eval_only_warnings"] == []
    warned = rows["marble_amortized"]["eval_only_warnings"]
    assert [(w["seed"], w["step"], w["reward"]) for w in warned] == [(0, 10, "world_aesthetic"), (1, 10, "world_aesthetic")]
    assert all(-4 < w["shift"] < -2.5 for w in warned)
    report = (tmp_path / "out" / "reproduction.md").read_text()
    assert "| 0@10, 1@10 | +20% | +0% |" in report and "| none | +0% | +0% |" in report
