"""marble_jax.statistics: coverage of the two-level bootstrap on a known distribution, paired differences,
and the fixed-reference Composite."""

import json
import math

import numpy as np
import pytest

from marble_jax import results_table, statistics

TRUE_MEAN = 2.0


def crossed(rng, seeds: int, prompts: int, seed_sd: float = 0.3, prompt_sd: float = 1.0, noise_sd: float = 1.0):
    """``[S, P]`` scores of the crossed random-effects model ``mu + a_s + b_p + e_sp`` (population mean ``mu``):
    a seed's training luck, a prompt's difficulty shared by every seed, and the cell's own noise."""
    return (
        TRUE_MEAN
        + rng.normal(0, seed_sd, (seeds, 1))
        + rng.normal(0, prompt_sd, (1, prompts))
        + rng.normal(0, noise_sd, (seeds, prompts))
    )


def binomial_band(nominal: float, n: int, method_slack: float) -> tuple[float, float]:
    """Acceptance band of a coverage estimated from ``n`` independent intervals: ``nominal`` +- 3 binomial standard
    deviations ``sqrt(nominal (1 - nominal) / n)`` (a correct method fails it with probability ~0.3%), widened
    below by ``method_slack`` for the bootstrap's own small-sample error, capped at 1."""
    sd = math.sqrt(nominal * (1 - nominal) / n)
    return nominal - 3 * sd - method_slack, min(1.0, nominal + 3 * sd)


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_interval_covers_the_true_mean_at_the_nominal_rate(method):
    # 200 data sets of 5 seeds x 40 prompts. n = 200 at 0.95: binomial sd 0.0154, so +-3 sd is [0.904, 0.996];
    # 0.02 of slack below for the method (5 seeds: the seed level's bootstrap variance is 4/5 of the plug-in one;
    # measured over 2000 data sets of this design: BCa 0.946, percentile 0.945), i.e. [0.884, 0.996].
    n = 200
    low, high = binomial_band(0.95, n, method_slack=0.02)
    assert (round(low, 3), round(high, 3)) == (0.884, 0.996)
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(n):
        ci = statistics.bootstrap_ci(crossed(rng, 5, 40), n_resamples=999, method=method, seed=rep)
        assert ci.levels == ("seeds", "prompts") and ci.method == method and ci.shape == (5, 40)
        hits += ci.low <= TRUE_MEAN <= ci.high
    assert low <= hits / n <= high, f"coverage {hits / n:.3f} outside [{low:.3f}, {high:.3f}]"


def test_interval_basics():
    x = crossed(np.random.default_rng(0), 4, 30)
    ci = statistics.bootstrap_ci(x, n_resamples=999)
    assert ci.mean == pytest.approx(x.mean()) and ci.low < ci.mean < ci.high
    assert ci == statistics.bootstrap_ci(x, n_resamples=999)  # seeded: reproducible
    assert str(ci).startswith(f"{x.mean():.4g} [")
    # prompts where the reward does not apply (NaN on every seed) are dropped
    with_nan = np.concatenate([x, np.full((4, 3), np.nan)], axis=1)
    assert statistics.bootstrap_ci(with_nan, n_resamples=999) == ci
    # one seed: only the prompts are resampled (a 1-D array is one seed)
    one = statistics.bootstrap_ci(x[0], n_resamples=999)
    assert one.levels == ("prompts",) and one.shape == (1, 30)
    assert statistics.bootstrap_ci(np.ones((3, 5)), n_resamples=99).low == 1.0  # constant: the point
    with pytest.raises(ValueError, match=r"\(seed, prompt\) \[\[1, 2\]\]"):
        bad = x.copy()
        bad[1, 2] = np.nan
        statistics.bootstrap_ci(bad)
    with pytest.raises(ValueError, match="method"):
        statistics.bootstrap_ci(x, method="basic")


def test_paired_difference_excludes_zero_for_an_effect_and_includes_it_for_none():
    rng = np.random.default_rng(2)
    n, with_zero = 40, 0
    for rep in range(n):
        shared = crossed(rng, 3, 32)  # what the method and its baseline share: seed luck, hard prompts, noise
        base = shared + rng.normal(0, 0.2, shared.shape)
        same = shared + rng.normal(0, 0.2, shared.shape)
        better = shared + 0.3 + rng.normal(0, 0.2, shared.shape)
        effect = statistics.paired_difference_ci(better, base, n_resamples=999, seed=rep)
        assert effect.excludes(0.0) and effect.low > 0, effect
        with_zero += not statistics.paired_difference_ci(same, base, n_resamples=999, seed=rep).excludes(0.0)
    # no effect: 0 inside at about the nominal rate (40 tries: binomial sd 0.034 at 0.95; 3 sd below -> >= 0.85)
    assert with_zero / n >= 0.85
    # the pairing is what finds the effect: the two means' own intervals overlap
    a, b = statistics.bootstrap_ci(better, n_resamples=999), statistics.bootstrap_ci(base, n_resamples=999)
    assert a.low < b.high
    with pytest.raises(ValueError, match="one shape"):
        statistics.paired_difference_ci(better, base[:2])


MEANS = {
    "base": {"pick": 2.7, "ocr": 0.0, "aes": 6.1},
    "weighted_sum": {"pick": 3.8, "ocr": 0.04, "aes": 6.0},
    "marble": {"pick": 3.6, "ocr": 0.06, "aes": 5.9},
}


def test_composite_z_fixed_reference():
    comp = statistics.composite_z(MEANS)
    # one run each of base and weighted sum: mu = midpoint, sigma = half the gap
    assert comp["base"] == pytest.approx((-1 - 1 + 1) / 3)  # aes: base is higher than the weighted sum
    assert comp["weighted_sum"] == pytest.approx((1 + 1 - 1) / 3)
    z = [(3.6 - 3.25) / 0.55, (0.06 - 0.02) / 0.02, (5.9 - 6.05) / 0.05]
    assert comp["marble"] == pytest.approx(np.mean(z))
    # adding rows (even a far outlier) moves no other row; results_table's z over the table's rows does move
    more = {**MEANS, "hacked": {"pick": 9.0, "ocr": 1.0, "aes": 0.0}, "partial": {"pick": 3.0, "ocr": math.nan}}
    comp_more = statistics.composite_z(more)
    assert {k: comp_more[k] for k in comp} == comp
    assert comp_more["partial"] == pytest.approx((3.0 - 3.25) / 0.55)  # NaN / missing cells left out of its mean
    cols = ["pick", "ocr", "aes"]
    rt = results_table.composite_scores(MEANS, cols)
    assert results_table.composite_scores({**MEANS, "hacked": more["hacked"]}, cols)["marble"] != pytest.approx(rt["marble"])


def test_composite_z_over_seeds_and_degenerate_rewards(caplog):
    means = {
        "base": {"pick": [2.6, 2.8], "ocr": 0.0},
        "weighted_sum": {"pick": [3.7, 3.9, 3.8], "ocr": 0.0},  # ocr: the reference rows agree -> no scale
        "marble": {"pick": [3.5, 3.7], "ocr": 0.5},
    }
    stats = statistics.reference_stats(means)
    pooled = np.array([2.6, 2.8, 3.7, 3.9, 3.8])
    assert stats["pick"] == pytest.approx((pooled.mean(), pooled.std()))
    comp = statistics.composite_z(means)
    assert comp["marble"] == pytest.approx((3.6 - pooled.mean()) / pooled.std())  # a row's value: its seeds' mean
    assert "ocr" in caplog.text
    assert statistics.composite_z(means, reference_rows=("base", "marble"))["weighted_sum"] != comp["weighted_sum"]
    with pytest.raises(ValueError, match="reference rows"):
        statistics.composite_z(means, reference_rows=("base", "sequential"))
    with pytest.raises(ValueError, match="'aes'"):
        statistics.composite_z(means, rewards=("pick", "aes"))


def two_rewards(rng, seeds: int, prompts: int) -> dict[str, np.ndarray]:
    """``{reward: [S, P]}`` of one method: ``pick`` on every prompt, ``ocr`` (a tenth of pick's scale, its own
    seed luck partly shared with pick's) only on every third prompt (NaN elsewhere, as a reward that does not apply)."""
    shared = rng.normal(0, 0.3, (seeds, 1))
    pick = crossed(rng, seeds, prompts) + shared
    ocr = 0.1 * (crossed(rng, seeds, prompts) + shared)
    ocr[:, np.arange(prompts) % 3 != 0] = np.nan
    return {"pick": pick, "ocr": ocr}


SCALE = {"pick": (1.5, 0.5), "ocr": (0.1, 0.05)}
TRUE_COMPOSITE = ((TRUE_MEAN - 1.5) / 0.5 + (0.1 * TRUE_MEAN - 0.1) / 0.05) / 2


def test_composite_interval_matches_composite_z_and_covers_at_the_nominal_rate():
    rng = np.random.default_rng(5)
    scores = two_rewards(rng, 4, 30)
    ci = statistics.composite_ci(scores, SCALE, n_resamples=999)
    # its mean is composite_z's value of the row, on the same scale (a seed's held-out mean: its prompts' mean)
    means = {"base": {"pick": 1.0, "ocr": 0.05}, "weighted_sum": {"pick": 2.0, "ocr": 0.15}}  # mu, sigma = SCALE
    means["m"] = {k: np.nanmean(v, axis=1).tolist() for k, v in scores.items()}
    assert {k: pytest.approx(v) for k, v in statistics.reference_stats(means).items()} == SCALE
    assert ci.mean == pytest.approx(statistics.composite_z(means)["m"])
    assert ci.low < ci.mean < ci.high and ci.shape == (4, 30)
    # one reward at offset 0 and scale 1 is bootstrap_ci itself (the same resamples)
    one = statistics.composite_ci({"pick": scores["pick"]}, {"pick": (0.0, 1.0)}, n_resamples=999)
    assert one == statistics.bootstrap_ci(scores["pick"], n_resamples=999)
    with pytest.raises(ValueError, match=r"no scores of rewards \['aes'\]"):
        statistics.composite_ci(scores, {**SCALE, "aes": (0.0, 1.0)})
    with pytest.raises(ValueError, match="same"):
        statistics.composite_ci({"pick": scores["pick"], "ocr": scores["ocr"][:3]}, SCALE)
    # coverage of the true Composite: the band of test_interval_covers_the_true_mean_at_the_nominal_rate
    n, hits = 200, 0
    low, high = binomial_band(0.95, n, method_slack=0.02)
    for rep in range(n):
        c = statistics.composite_ci(two_rewards(rng, 5, 40), SCALE, n_resamples=999, seed=rep)
        hits += c.low <= TRUE_COMPOSITE <= c.high
    assert low <= hits / n <= high, f"coverage {hits / n:.3f} outside [{low:.3f}, {high:.3f}]"


def test_per_prompt_scores_of_a_run(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "eval.jsonl").write_text('{"step": 0, "r": 1.0}\n{"step": 5, "r": 2.0}\n')
    doc = {"prompts": ["a", "b"], "prompt_index": [0, 0, 1, 1], "scores": {"r": [1.0, 3.0, 4.0, 6.0],
           "ocr": [math.nan, math.nan, 0.5, 1.0]}}  # fmt: skip
    (tmp_path / "samples" / "step_000005_scores.json").write_text(json.dumps(doc))
    got = statistics.per_prompt_scores(tmp_path)  # the last evaluation
    np.testing.assert_allclose(got["r"], [2.0, 5.0])
    np.testing.assert_allclose(got["ocr"], [math.nan, 0.75])
    with pytest.raises(FileNotFoundError, match="step 0"):
        statistics.per_prompt_scores(tmp_path, step=0)
