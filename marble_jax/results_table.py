"""The paper's evaluation table (REFERENCE §3): rows = methods, columns = rewards, and a Composite column.

Composite = per-row mean of the column-wise z-scores over the table's rows: ``z = (x - mean_col) /
std_col`` with the population std; a column with zero std contributes 0; NaN cells are left out of both
the column statistics and the row mean (a row with only NaN cells gets a NaN Composite).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

COMPOSITE = "Composite"

Table = Mapping[str, Mapping[str, float]]


def _matrix(table: Table, columns: Sequence[str]) -> np.ndarray:
    """float64 ``[rows, columns]`` of the table's cells, rows in the table's order."""
    if not table or not columns:
        raise ValueError(f"need at least one row and one column, got rows {list(table)} and columns {list(columns)}")
    if COMPOSITE in columns:
        raise ValueError(f"{COMPOSITE!r} is computed, not a reward column: {list(columns)}")
    for row, cells in table.items():
        missing = [c for c in columns if c not in cells]
        if missing:
            raise ValueError(f"row {row!r} has no value for columns {missing} (use NaN for a missing score)")
    return np.array([[float(table[row][c]) for c in columns] for row in table], np.float64)


def composite_scores(table: Table, columns: Sequence[str]) -> dict[str, float]:
    """Row name -> mean of the row's column-wise z-scores over ``columns`` (rules in the module docstring)."""
    x = _matrix(table, columns)
    z = np.full_like(x, np.nan)
    for j, col in enumerate(x.T):
        ok = ~np.isnan(col)
        if ok.any():  # equal values (zero std, tested exactly) contribute 0
            z[ok, j] = 0.0 if np.ptp(col[ok]) == 0 else (col[ok] - col[ok].mean()) / col[ok].std()
    counts = (~np.isnan(z)).sum(axis=1)
    composite = np.divide(np.nansum(z, axis=1), counts, out=np.full(len(z), np.nan), where=counts > 0)
    return {row: float(c) for row, c in zip(table, composite, strict=True)}


def _with_composite(table: Table, columns: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The row names and float64 ``[rows, columns + 1]`` cells with the Composite column last."""
    composite = composite_scores(table, columns)
    x = _matrix(table, columns)
    return list(table), np.concatenate([x, np.array([[composite[row]] for row in table])], axis=1)


def to_markdown(table: Table, columns: Sequence[str], digits: int = 3, higher_is_better: bool = True) -> str:
    """A Markdown table: a ``method`` column, ``columns`` and Composite last, cells with ``digits`` decimals,
    NaN as ``n/a``, the best shown value of each column (highest, or lowest with ``higher_is_better=False``;
    ties all) in bold."""
    rows, x = _with_composite(table, columns)
    text = [["n/a" if math.isnan(v) else f"{v:.{digits}f}" for v in row] for row in x]
    shown = np.array([[float(t) if t != "n/a" else math.nan for t in row] for row in text])
    pick = max if higher_is_better else min
    best = [pick(col[~np.isnan(col)], default=math.nan) for col in shown.T]
    header = ["method", *columns, COMPOSITE]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for i, row in enumerate(rows):
        cells = [f"**{t}**" if shown[i, j] == best[j] else t for j, t in enumerate(text[i])]
        lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table, columns: Sequence[str]) -> str:
    """CSV with a header ``method,<columns>,Composite`` and full-precision values (``nan`` for NaN)."""
    rows, x = _with_composite(table, columns)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", *columns, COMPOSITE])
    writer.writerows([row, *(repr(float(v)) for v in x[i])] for i, row in enumerate(rows))
    return out.getvalue()


def write_table(
    table: Table, columns: Sequence[str], out_stem: str | Path, *, digits: int = 3, higher_is_better: bool = True
) -> tuple[Path, Path]:
    """Writes ``<out_stem>.md`` (:func:`to_markdown`) and ``<out_stem>.csv`` (:func:`to_csv`), creating the
    parent directories; returns the two paths."""
    out_stem = Path(out_stem)
    md, csv_path = out_stem.parent / f"{out_stem.name}.md", out_stem.parent / f"{out_stem.name}.csv"
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(to_markdown(table, columns, digits=digits, higher_is_better=higher_is_better))
    csv_path.write_text(to_csv(table, columns))
    return md, csv_path
