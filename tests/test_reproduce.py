"""tools/reproduce_marble.py: every method's config is valid and differs from k5 only where it should; the
summary reads what the trainer writes."""

import json

import pytest
from helpers import load_tool

from marble_jax import train


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


def test_summary_of_a_run(tool, tmp_path):
    rewards = dict.fromkeys(tool.COLUMNS, 0.5)
    evals = [{"step": 0, **rewards}, {"step": 10, **{**rewards, "world_ocr": 0.75}}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    metrics = [{"step": s, "time/step_s": t, "diagnostics": d} for s, t, d in [(1, 60, 1), (2, 30, 0), (3, 2, 0), (4, 9, 1)]]
    metrics += [
        {"step": 5, "time/step_s": 4, "diagnostics": 0, "anti_aligned": 1.0},
        {"step": 6, "time/step_s": 2, "anti_aligned": 0.0},
    ]
    metrics.append({"step": 6, "time/step_s": 3, "anti_aligned": 1.0})  # step 6 again after a resume: the last row counts
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    out = tool.summarize(tmp_path)
    assert out["held_out"]["world_ocr"] == 0.75 and out["base"]["world_ocr"] == 0.5
    assert out["anti_aligned_fraction"] == 1.0 and out["anti_aligned_measured_steps"] == 2
    assert out["iterations_per_s"] == pytest.approx(1 / 3)  # steps 3, 5, 6: 2, 4, 3 s (1-2 compile, 4 diagnostic)
