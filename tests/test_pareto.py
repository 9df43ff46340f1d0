"""tools/pareto.py: the statistics of the fronts over seeds, the dominance rule and the report, on synthetic fronts."""

import json

import numpy as np
import pytest
from helpers import load_tool

PROMPTS, IMAGES = 20, 2


@pytest.fixture(scope="module")
def tool():
    return load_tool("pareto")


def fake_front(seed: int, msdda_gain: dict[float, tuple[float, float]]) -> dict:
    """A seed's front.json: base, marble, and msdda / reward_soup at each w; MSDDA's per-image scores are Reward
    Soup's plus ``msdda_gain[w]`` (CLIPScore, aesthetic) and a little noise; MSDDA takes twice the time."""
    rng = np.random.default_rng(seed)
    n = PROMPTS * IMAGES

    def scores(clip: float, aes: float) -> dict:
        return {
            "world_clipscore": (clip + rng.normal(0, 0.1, n)).tolist(),
            "world_aesthetic": (aes + rng.normal(0, 0.3, n)).tolist(),
        }

    rows = [{"method": "base", "w": None, "scores": scores(1.0, 6.1), "seconds_per_image": 0.03},
            {"method": "marble", "w": None, "scores": scores(1.05, 6.3), "seconds_per_image": 0.03}]  # fmt: skip
    for w, (dc, da) in msdda_gain.items():
        soup = scores(0.2 + w, 7.2 - 1.4 * w)
        fused = {
            k: (np.asarray(v) + d + rng.normal(0, 0.01, n)).tolist() for (k, v), d in zip(soup.items(), (dc, da), strict=True)
        }
        rows += [{"method": "msdda", "w": w, "scores": fused, "seconds_per_image": 0.06},
                 {"method": "reward_soup", "w": w, "scores": soup, "seconds_per_image": 0.03}]  # fmt: skip
    return {"settings": {}, "prompt_index": [i // IMAGES for i in range(n)], "rows": rows, "cpu_s": 60.0, "train_cpu_s": 600.0}


def test_the_commands_modules_import_together(tool):
    """tools/pareto.py imports marble_jax.sample as a library; with marble_jax.evaluate in the same process their
    command-line flags (both have --out and --config) raised DuplicateFlagError when defined at import."""
    import marble_jax.evaluate
    import marble_jax.sample

    assert tool.sampling_setup is marble_jax.sample.sampling_setup and marble_jax.evaluate.evaluate_runs


def test_dominance_rule(tool):
    up, down, zero = ({"low": a, "high": b, "mean": (a + b) / 2} for a, b in ((0.1, 0.2), (-0.2, -0.1), (-0.1, 0.1)))
    assert tool.dominance({"world_clipscore": up, "world_aesthetic": zero}) == "MSDDA above"
    assert tool.dominance({"world_clipscore": down, "world_aesthetic": zero}) == "Reward Soup above"
    assert tool.dominance({"world_clipscore": up, "world_aesthetic": down}) == "a trade"
    assert tool.dominance({"world_clipscore": zero, "world_aesthetic": zero}) == "inconclusive"
    assert tool.claim_verdict({"0.2": {"verdict": "MSDDA above"}, "0.5": {"verdict": "MSDDA above"}}) == "reproduced"
    assert tool.claim_verdict({"0.2": {"verdict": "MSDDA above"}, "0.5": {"verdict": "a trade"}}) == "not reproduced"
    assert tool.claim_verdict({"0.2": {"verdict": "MSDDA above"}, "0.5": {"verdict": "inconclusive"}}) == "inconclusive"


def test_fronts_over_seeds_and_report(tool, tmp_path):
    gains = {0.0: (0.0, 0.0), 0.5: (0.05, 0.0), 0.8: (-0.05, 0.2), 1.0: (0.0, 0.0)}
    fronts = {s: fake_front(s, gains) for s in range(3)}
    doc = tool.analyse(fronts, n_resamples=199)
    pairs = doc["msdda_minus_reward_soup"]
    assert list(pairs) == ["0.5", "0.8"]  # w = 0 and 1: one model either way, not compared
    assert pairs["0.5"]["verdict"] == "MSDDA above" and pairs["0.8"]["verdict"] == "a trade"
    assert pairs["0.5"]["world_clipscore"]["low"] > 0.04 and pairs["0.5"]["world_clipscore"]["high"] < 0.06
    row = doc["rows"]["msdda w=0.5"]
    assert row["seeds"] == [0, 1, 2] and len(row["per_seed"]) == 3
    assert row["world_clipscore"]["mean"] == pytest.approx(np.mean([r["world_clipscore"] for r in row["per_seed"]]))
    assert row["latency_vs_one_model"]["mean"] == pytest.approx(2.0)
    doc |= {"settings": {"epochs": 30, "num_prompts": PROMPTS, "images_per_prompt": IMAGES, "num_steps": 20, "etas": [0.8, 1.0]},
            "seeds": [0, 1, 2], "statistics": "test", "budget": {"runs": 9, "cpu_minutes": 33.0},
            "verdict": tool.claim_verdict(pairs)}  # fmt: skip
    assert doc["verdict"] == "not reproduced"
    tool.write_report(doc, tmp_path)
    report = (tmp_path / "pareto.md").read_text()
    assert "**MSDDA is above Reward Soup** (at every interior w): **not reproduced**" in report
    lines = report.splitlines()
    assert any(ln.startswith("| 0.5 | 0.0") and ln.endswith("| MSDDA above |") for ln in lines)
    assert any(ln.startswith("| 0.8 | -0.0") and ln.endswith("| a trade |") for ln in lines)
    assert json.loads((tmp_path / "pareto.json").read_text())["rows"]["base"]["seeds"] == [0, 1, 2]
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_a_seeds_front_is_archived_and_reused(tool, tmp_path):
    args = tool.argparse.Namespace(epochs=30, weights=[0.0, 0.5, 1.0], etas=[0.8, 1.0], num_prompts=PROMPTS,
                                   images_per_prompt=IMAGES, num_steps=20, batch=8, archive=tmp_path / "archive")  # fmt: skip
    front = {**fake_front(0, {0.0: (0.0, 0.0), 0.5: (0.0, 0.0), 1.0: (0.0, 0.0)}), "settings": tool.settings(args)}
    (tmp_path / "runs" / "seed_0").mkdir(parents=True)
    (tmp_path / "runs" / "seed_0" / "front.json").write_text(json.dumps(front))
    doc = tool.front_of_seed(tmp_path / "runs", 0, args)  # from the run directory, then archived: nothing trained
    archived = json.loads((tmp_path / "archive" / "seed_0.json").read_text())
    assert archived["settings"] == doc["settings"] == tool.settings(args)
    np.testing.assert_allclose(
        archived["rows"][2]["scores"]["world_clipscore"], front["rows"][2]["scores"]["world_clipscore"], rtol=1e-6
    )
    (tmp_path / "runs" / "seed_0" / "front.json").unlink()
    assert tool.front_of_seed(tmp_path / "runs", 0, args)["rows"][0]["method"] == "base"  # the archive alone serves
