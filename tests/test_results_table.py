"""The evaluation table: Composite z-scores (by hand and against scipy), NaN cells, Markdown and CSV output."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from scipy import stats

from marble_jax.results_table import composite_scores, to_csv, to_markdown, write_table

NAN = math.nan
COLUMNS = ["GenEval", "OCR", "PickScore"]
TABLE = {
    "base": {"GenEval": 0.1, "OCR": 0.6, "PickScore": 21.0},
    "weighted_sum": {"GenEval": 0.3, "OCR": 0.6, "PickScore": 22.0},
    "marble": {"GenEval": 0.5, "OCR": 0.9, "PickScore": 23.5},
}


def test_composite_by_hand():
    # GenEval: mean 0.3, population std sqrt(0.08 / 3); OCR: mean 0.7, std sqrt(0.06 / 3);
    # PickScore: mean 22.1667, deviations -7/6, -1/6, 8/6, std sqrt(114 / 108)
    g = 0.2 / math.sqrt(0.08 / 3)
    o = 0.1 / math.sqrt(0.06 / 3)
    p = math.sqrt(114 / 108)
    want = {
        "base": (-g - o - 7 / 6 / p) / 3,
        "weighted_sum": (0 - o - 1 / 6 / p) / 3,
        "marble": (g + 2 * o + 8 / 6 / p) / 3,
    }
    got = composite_scores(TABLE, COLUMNS)
    assert list(got) == list(TABLE)
    for row in TABLE:
        assert got[row] == pytest.approx(want[row], rel=1e-12)
    assert sum(got.values()) == pytest.approx(0, abs=1e-12)


def test_composite_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)) * [1, 10, 0.01, 3] + [0, 5, 1, -2]
    table = {f"m{i}": {f"r{j}": float(x[i, j]) for j in range(4)} for i in range(5)}
    got = composite_scores(table, [f"r{j}" for j in range(4)])
    want = stats.zscore(x, axis=0, ddof=0).mean(axis=1)
    np.testing.assert_allclose([got[f"m{i}"] for i in range(5)], want, rtol=1e-12)
    # a column subset scores on those columns only
    sub = composite_scores(table, ["r1", "r3"])
    np.testing.assert_allclose([sub[f"m{i}"] for i in range(5)], stats.zscore(x[:, [1, 3]], axis=0).mean(axis=1), rtol=1e-12)


def test_composite_nan_and_constant_columns():
    table = {
        "a": {"x": 1.0, "y": NAN, "c": 0.1},
        "b": {"x": 2.0, "y": 4.0, "c": 0.1},
        "c": {"x": 3.0, "y": 6.0, "c": 0.1},
        "d": {"x": NAN, "y": NAN, "c": NAN},
    }
    got = composite_scores(table, ["x", "y", "c"])
    # x over a, b, c: z = -1.2247, 0, 1.2247; y over b, c: z = -1, 1; c constant (0.1 three times,
    # whose float mean is not exactly 0.1): 0
    zx = 1 / math.sqrt(2 / 3)
    assert got["a"] == pytest.approx((-zx + 0) / 2)
    assert got["b"] == pytest.approx((0 - 1 + 0) / 3)
    assert got["c"] == pytest.approx((zx + 1 + 0) / 3)
    assert math.isnan(got["d"])
    # scipy with the NaN cells omitted, same numbers for the rows with scores
    z = stats.zscore(np.array([[1, NAN], [2, 4], [3, 6], [NAN, NAN]]), axis=0, nan_policy="omit")
    assert got["b"] * 3 == pytest.approx(np.nansum(z[1]))


def test_bad_tables():
    with pytest.raises(ValueError, match=r"row 'b' has no value for columns \['y'\]"):
        composite_scores({"a": {"x": 1.0, "y": 2.0}, "b": {"x": 1.0}}, ["x", "y"])
    with pytest.raises(ValueError, match="'Composite' is computed"):
        to_csv(TABLE, ["GenEval", "Composite"])
    with pytest.raises(ValueError, match="at least one row"):
        composite_scores({}, COLUMNS)


def test_markdown():
    table = {**TABLE, "broken": {"GenEval": NAN, "OCR": 0.9, "PickScore": 20.0}}
    md = to_markdown(table, COLUMNS, digits=2)
    lines = md.splitlines()
    assert lines[0] == "| method | GenEval | OCR | PickScore | Composite |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    comp = composite_scores(table, COLUMNS)
    assert lines[2] == f"| base | 0.10 | 0.60 | 21.00 | {comp['base']:.2f} |"
    assert lines[4] == f"| marble | **0.50** | **0.90** | **23.50** | **{comp['marble']:.2f}** |"
    assert lines[5] == f"| broken | n/a | **0.90** | 20.00 | {comp['broken']:.2f} |"  # a tie is bold in both rows
    assert len(lines) == 6 and md.endswith("\n")
    low = to_markdown(table, COLUMNS, digits=3, higher_is_better=False).splitlines()
    assert low[2].startswith("| base | **0.100** | **0.600** | 21.000 |")
    assert low[5].startswith("| broken | n/a | 0.900 | **20.000** |")


def test_markdown_bold_follows_shown_digits():
    """Values equal at the shown precision are all bold, even when their floats differ."""
    md = to_markdown({"a": {"x": 0.12341}, "b": {"x": 0.12339}, "c": {"x": 0.1}}, ["x"], digits=3)
    assert "| a | **0.123** |" in md and "| b | **0.123** |" in md and "| c | 0.100 |" in md


def test_csv():
    table = {**TABLE, "broken": {"GenEval": NAN, "OCR": 0.9, "PickScore": 20.0}}
    rows = list(csv.reader(io.StringIO(to_csv(table, COLUMNS))))
    assert rows[0] == ["method", *COLUMNS, "Composite"]
    assert [r[0] for r in rows[1:]] == list(table)
    comp = composite_scores(table, COLUMNS)
    for r in rows[1:]:
        values = [float(v) for v in r[1:]]
        want = [table[r[0]][c] for c in COLUMNS] + [comp[r[0]]]
        np.testing.assert_array_equal(values, want)  # full precision, NaN kept
    assert rows[4][1] == "nan"


def test_write_table(tmp_path):
    md, csv_path = write_table(TABLE, COLUMNS, tmp_path / "eval" / "sd35.v2")
    assert (md, csv_path) == (tmp_path / "eval" / "sd35.v2.md", tmp_path / "eval" / "sd35.v2.csv")
    assert md.read_text() == to_markdown(TABLE, COLUMNS)
    assert csv_path.read_text() == to_csv(TABLE, COLUMNS)
    md, _ = write_table(TABLE, COLUMNS, tmp_path / "low", digits=1, higher_is_better=False)
    assert md.read_text() == to_markdown(TABLE, COLUMNS, digits=1, higher_is_better=False)
