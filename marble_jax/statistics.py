"""Statistics for the reproduction reports: held-out means with bootstrap intervals over seeds and prompts, paired
differences against a baseline, and a Composite score on a fixed reference scale.

The data of one method and one reward is a matrix ``scores [S, P]``: the held-out score of training seed ``s`` on
evaluation prompt ``p`` (the mean over the prompt's images when ``config.eval.images_per_prompt > 1``). Every run
of a comparison is evaluated on the same prompts with the same noise (:class:`marble_jax.scoring.Evaluator`), and
run ``s`` of every method uses ``config.seed = s``, so the design is **crossed**: prompt ``p`` of seed 0 is prompt
``p`` of seed 1, and seed ``s`` of a method pairs with seed ``s`` of its baseline.

Two-level bootstrap, as used here (Owen's "pigeonhole" bootstrap for crossed random effects, Ann. Appl. Stat.
2007). One resample draws ``S`` seeds with replacement and, independently, ``P`` prompts with replacement; its
statistic is the mean of the ``S x P`` sub-matrix of those rows and columns. It is computed with
:func:`scipy.stats.bootstrap` on two samples, the seed indices ``0..S-1`` and the prompt indices ``0..P-1``,
resampled independently (``paired=False``) by a vectorised statistic that indexes the matrix; so the interval
method is scipy's (``"percentile"`` or ``"BCa"``: BCa's jackknife leaves one seed out, then one prompt out). A
crossed design is not nested: a prompt effect is shared by every seed and does not average out over seeds, so
resampling prompts independently within each seed (the nested hierarchical bootstrap) would shrink its variance
by a factor S; the two-way resample keeps it. It estimates ``var(a)/S + var(b)/P`` of the model ``x = mu + a_s +
b_p + e_sp`` well and counts the interaction ``e`` up to about three times over (``var(e)/SP``, Owen), so it errs
on the wide side. With few seeds the seed term is estimated from few values (its bootstrap variance is
``(S-1)/S`` of the plug-in one): 3 seeds give an interval that is too narrow when the seed-to-seed variance
dominates, so the report should say how many seeds it has. With one seed (or one prompt) that level cannot be
resampled and the interval covers the other level only: :attr:`Interval.levels` says which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.stats

log = logging.getLogger("marble_jax.statistics")

METHODS = ("percentile", "BCa")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval ``[low, high]`` and how it was computed."""

    mean: float
    low: float
    high: float
    confidence_level: float
    method: str  # "percentile" | "BCa" (scipy.stats.bootstrap)
    n_resamples: int
    seed: int
    levels: tuple[str, ...]  # the resampled levels: ("seeds", "prompts"), or one of them
    shape: tuple[int, int]  # (S, P) after dropping prompts where the reward does not apply

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside ``[low, high]``."""
        return not self.low <= value <= self.high

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _matrix(scores, what: str) -> np.ndarray:
    """float64 ``[S, P]`` of ``scores`` with the prompts NaN on every seed dropped (a reward that does not apply to
    them: OCR without quoted text, GenEval without metadata); any other NaN is an error naming its cells."""
    x = np.asarray(scores, np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{what}: scores must be [seeds, prompts], got shape {np.shape(scores)}")
    x = x[:, ~np.isnan(x).all(0)]
    bad = np.argwhere(~np.isfinite(x))
    if x.shape[1] == 0:
        raise ValueError(f"{what}: every score is NaN (the reward applies to none of the prompts)")
    if len(bad):
        raise ValueError(
            f"{what}: non-finite scores at (seed, prompt) {bad[:5].tolist()} (after dropping the prompts NaN on every "
            "seed): a reward applies to a prompt on every seed or on none"
        )
    return x


def _two_way_statistic(x: np.ndarray, offsets: np.ndarray, scales: np.ndarray, levels: tuple[str, ...]):
    """The vectorised statistic of the module doc on index samples: seed indices ``[..., S]`` and / or prompt
    indices ``[..., P]`` (batch axes in front) -> ``[...]``. ``x [K, S, P]`` holds K rewards (NaN: reward ``k`` does
    not apply to prompt ``p``, on every seed); the statistic is the mean over k of ``(m_k - offsets[k]) /
    scales[k]``, ``m_k`` the mean of reward k over the drawn cells where it applies (K = 1, offset 0, scale 1: the
    mean of the drawn sub-matrix)."""
    applies = (~np.isnan(x[:, 0])).astype(np.float64)  # [K, P_all]
    filled = np.nan_to_num(x)

    def statistic(*idx, axis=-1):
        rows = idx[levels.index("seeds")] if "seeds" in levels else np.arange(x.shape[1])
        cols = idx[levels.index("prompts")] if "prompts" in levels else np.arange(x.shape[2])
        rows, cols = np.asarray(rows), np.asarray(cols)
        if axis != -1:
            rows, cols = np.moveaxis(rows, axis, -1), np.moveaxis(cols, axis, -1)
        batch = np.broadcast_shapes(rows.shape[:-1], cols.shape[:-1])
        col_means = filled[:, rows].mean(-2)  # [K, ..., P_all]: the mean over the drawn seeds of every prompt
        col_means = col_means.reshape(len(x), *(1,) * (len(batch) + 2 - col_means.ndim), *col_means.shape[1:])
        col_means = np.broadcast_to(col_means, (len(x), *batch, x.shape[2]))
        cols = np.broadcast_to(cols, (len(x), *batch, cols.shape[-1]))
        counts = np.take_along_axis(applies.reshape(len(x), *(1,) * len(batch), -1), cols, axis=-1)
        sums = (np.take_along_axis(col_means, cols, axis=-1) * counts).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):  # a reward drawn on none of its prompts: left out
            z = (sums / counts.sum(-1) - offsets.reshape(-1, *(1,) * len(batch))) / scales.reshape(-1, *(1,) * len(batch))
        return np.nanmean(z, axis=0)

    return statistic


def _bootstrap(
    x: np.ndarray,
    offsets: np.ndarray,
    scales: np.ndarray,
    *,
    confidence_level: float,
    n_resamples: int,
    method: str,
    seed: int,
    what: str,
) -> Interval:
    """:func:`bootstrap_ci` / :func:`composite_ci` on the checked ``x [K, S, P]`` (see :func:`_two_way_statistic`)."""
    if method not in METHODS:
        raise ValueError(f"{what}: method must be one of {METHODS}, got {method!r}")
    levels = tuple(name for name, n in zip(("seeds", "prompts"), x.shape[1:], strict=True) if n > 1)
    full = tuple(np.arange(n) for n in x.shape[1:])
    mean = float(_two_way_statistic(x, offsets, scales, ("seeds", "prompts"))(*full))
    kw = dict(confidence_level=confidence_level, method=method, n_resamples=n_resamples, seed=seed, shape=x.shape[1:])
    if not levels:
        return Interval(mean, mean, mean, levels=(), **kw)
    data = tuple(np.arange(x.shape[1 if name == "seeds" else 2]) for name in levels)
    if all(np.ptp(v[~np.isnan(v)]) == 0 for v in x):  # every resample gives the mean (BCa is undefined there)
        return Interval(mean, mean, mean, levels=levels, **kw)
    result = scipy.stats.bootstrap(
        data,
        _two_way_statistic(x, offsets, scales, levels),
        n_resamples=n_resamples,
        batch=max(1, min(n_resamples, 2_000_000 // x.size)),  # at most ~16 MB of resampled means at once
        vectorized=True,
        paired=False,
        confidence_level=confidence_level,
        method=method,
        rng=np.random.default_rng(seed),
    )
    low, high = (float(v) for v in (result.confidence_interval.low, result.confidence_interval.high))
    return Interval(mean, low, high, levels=levels, **kw)


def bootstrap_ci(
    scores,
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    method: str = "BCa",
    seed: int = 0,
    what: str = "scores",
) -> Interval:
    """The mean of ``scores [S, P]`` (seeds x prompts) with its two-level bootstrap interval.

    Method (module doc): ``n_resamples`` (default 9999) resamples, each ``S`` seeds and ``P`` prompts drawn
    independently with replacement, the statistic the mean of the drawn ``S x P`` sub-matrix;
    :func:`scipy.stats.bootstrap` with ``method`` ``"BCa"`` (default: bias-corrected and accelerated, jackknife
    leaving out one seed, then one prompt) or ``"percentile"``, at ``confidence_level`` (two-sided), its generator
    ``numpy.random.default_rng(seed)`` (default 0: a report's intervals are reproducible). Prompts NaN on every seed
    (a reward that does not apply to them) are dropped first. A level with a single member (one seed, one prompt) is
    not resampled and is missing from :attr:`Interval.levels`; with neither resampled the interval is the point.
    ``scores [P]`` (a 1-D array) is one seed.

    Raises:
      ValueError: a shape other than ``[S, P]``, a NaN on some seeds of a prompt but not others, an unknown method.
    """
    x = _matrix(scores, what)
    kw = dict(confidence_level=confidence_level, n_resamples=n_resamples, method=method, seed=seed, what=what)
    return _bootstrap(x[None], np.zeros(1), np.ones(1), **kw)


def composite_ci(
    scores: Mapping[str, object],
    scale: Mapping[str, tuple[float, float]],
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    method: str = "BCa",
    seed: int = 0,
    what: str = "Composite",
) -> Interval:
    """Composite (:func:`composite_z`) with its two-level bootstrap interval: ``scores`` ``{reward: [S, P]}`` (one
    method's rows over the same seeds and prompts for every reward, NaN where a reward does not apply to a prompt),
    ``scale`` ``{reward: (mu, sigma)}`` (:func:`reference_stats`; only the rewards in ``scale`` count). One resample
    draws seeds and prompts once for every reward (the rewards are scores of the same images), so the interval keeps
    their correlation. A paired Composite difference ``a - b`` is this on ``{k: a_k - b_k}`` with every mu 0.

    Raises:
      ValueError: a reward of ``scale`` missing from ``scores``, shapes that differ, :func:`bootstrap_ci`'s errors.
    """
    missing = [k for k in scale if k not in scores]
    if missing:
        raise ValueError(f"{what}: no scores of rewards {missing}")
    mats = {k: np.atleast_2d(np.asarray(scores[k], np.float64)) for k in scale}
    shapes = {k: v.shape for k, v in mats.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{what}: every reward needs the same [seeds, prompts], got {shapes}")
    for k, v in mats.items():
        _matrix(v, f"{what}: {k}")  # the NaN pattern of each reward: per prompt, on every seed or on none
    x = np.stack(list(mats.values()))
    x = x[:, :, ~np.isnan(x).all((0, 1))]  # prompts where no reward applies
    offsets, scales = (np.asarray([scale[k][i] for k in mats], np.float64) for i in (0, 1))
    kw = dict(confidence_level=confidence_level, n_resamples=n_resamples, method=method, seed=seed, what=what)
    return _bootstrap(x, offsets, scales, **kw)


def paired_difference_ci(a, b, **kwargs) -> Interval:
    """The mean difference ``a - b`` of a method ``a [S, P]`` and its baseline ``b [S, P]`` (the same seeds, prompts
    and evaluation noise, row ``s`` of both from ``config.seed = s``), with its paired two-level interval.

    Paired: each resample draws one set of seeds and one set of prompts and takes them from both methods, i.e.
    :func:`bootstrap_ci` of the cell-wise difference ``a - b`` (same method, resamples, seed and keyword arguments).
    What the two share (a hard prompt, a lucky noise draw, a seed's prompt order) cancels in the difference, so the
    interval is much narrower than that of either mean when the methods agree on which prompts are hard. The
    difference is significant at ``1 - confidence_level`` when :meth:`Interval.excludes` ``(0)``.

    Raises:
      ValueError: shapes differ (the pairing is cell by cell), or :func:`bootstrap_ci`'s errors.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape (the same seeds and prompts): {a.shape} != {b.shape}")
    if (np.isnan(a) != np.isnan(b)).any():
        raise ValueError("paired scores must be NaN in the same cells (the same prompts, where the reward applies)")
    return bootstrap_ci(a - b, **{"what": "a - b", **kwargs})


def per_prompt_scores(workdir: str | Path, step: int | None = None) -> dict[str, np.ndarray]:
    """``{reward: float64 [P]}``: a run's held-out score of each evaluation prompt at the evaluation of ``step``
    (default: the run's last, the last row of its ``eval.jsonl``), the mean over the prompt's images (NaN where the
    reward does not apply), read from ``samples/step_<step>_scores.json`` (written by
    :meth:`marble_jax.scoring.Evaluator.run`). Rows of :func:`bootstrap_ci`'s ``scores [S, P]``: one run per seed,
    ``np.stack([per_prompt_scores(w)[reward] for w in seed_workdirs])``.

    Raises:
      FileNotFoundError: no such evaluation (runs from before the per-image scores were written have none).
    """
    from marble_jax.monitors import scores_path

    workdir = Path(workdir)
    if step is None:
        lines = [ln for ln in (workdir / "eval.jsonl").read_text().splitlines() if ln.strip()]
        step = int(json.loads(lines[-1])["step"])
    path = scores_path(workdir, step)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-image scores of {workdir}'s evaluation at step {step}")
    doc = json.loads(path.read_text())
    return {r: prompt_means(doc["prompt_index"], v, len(doc["prompts"])) for r, v in doc["scores"].items()}


def prompt_means(prompt_index: Sequence[int], values: Sequence[float], num_prompts: int) -> np.ndarray:
    """float64 ``[num_prompts]``: the mean of the per-image ``values [N]`` of each prompt (image ``i`` is of prompt
    ``prompt_index[i]``), NaN images left out, NaN where a prompt has none."""
    index, x = np.asarray(prompt_index), np.asarray(values, np.float64)
    sums = np.bincount(index, weights=np.nan_to_num(x), minlength=num_prompts)
    counts = np.bincount(index, weights=~np.isnan(x), minlength=num_prompts)
    return np.divide(sums, counts, out=np.full(len(sums), np.nan), where=counts > 0)


def _values(cell) -> np.ndarray:
    """A table cell as float64 ``[n]``: one value (one run) or the values of several seeds."""
    return np.atleast_1d(np.asarray(cell, np.float64)).ravel()


def reference_stats(
    means: Mapping[str, Mapping[str, float | Sequence[float]]],
    reference_rows: Sequence[str] = ("base", "weighted_sum"),
    rewards: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """``{reward: (mu, sigma)}``: the mean and the population standard deviation (``ddof=0``) of every value of the
    reference rows pooled (each row's cell: one run's held-out mean or a list of them, one per seed), NaN left out.
    ``rewards``: default the columns of the first reference row, in its order.

    Raises:
      ValueError: a reference row missing from ``means``, or a reward missing from a reference row.
    """
    missing = [r for r in reference_rows if r not in means]
    if missing or not reference_rows:
        raise ValueError(f"reference rows {missing or list(reference_rows)} are not among the rows {list(means)}")
    rewards = list(means[reference_rows[0]]) if rewards is None else list(rewards)
    out = {}
    for reward in rewards:
        absent = [r for r in reference_rows if reward not in means[r]]
        if absent:
            raise ValueError(f"reward {reward!r} has no value in reference rows {absent} (use NaN for a missing score)")
        values = np.concatenate([_values(means[r][reward]) for r in reference_rows])
        values = values[~np.isnan(values)]
        out[reward] = (float(values.mean()), float(values.std())) if len(values) else (math.nan, math.nan)
    return out


def composite_z(
    means: Mapping[str, Mapping[str, float | Sequence[float]]],
    reference_rows: Sequence[str] = ("base", "weighted_sum"),
    rewards: Sequence[str] | None = None,
) -> dict[str, float]:
    """``{row: Composite}`` on a fixed reference scale, so that adding a row never moves the others.

    Definition: for each reward ``k``, ``(mu_k, sigma_k)`` = :func:`reference_stats` (the mean and population std of
    the reference rows' values, every seed of every reference row pooled); a row's value ``x_k`` is its mean over its
    seeds (its cell: a number or the list of per-seed means); ``z_k = (x_k - mu_k) / sigma_k``; Composite = the mean
    of ``z_k`` over the rewards where ``x_k`` is not NaN (NaN when there is none). A reward whose ``sigma_k`` is 0 or
    NaN (the reference rows agree, or have no value) has no scale and is left out of every row, with a warning.
    With one seed of ``base`` and one of ``weighted_sum`` as the reference, ``mu_k`` is their midpoint and
    ``sigma_k`` half their gap, so base scores -1 and the weighted sum +1 on every reward where the weighted sum is
    higher: Composite is in units of half the weighted sum's gain over the base. Unlike
    :func:`marble_jax.results_table.composite_scores` (z-scores over the table's own rows), a row's Composite
    depends on that row and the reference rows only.

    Raises:
      ValueError: as :func:`reference_stats`.
    """
    stats = reference_stats(means, reference_rows, rewards)
    scaled = {k: v for k, v in stats.items() if np.isfinite(v[1]) and v[1] > 0}
    if len(scaled) < len(stats):
        log.warning(
            "composite_z: rewards without a reference scale (std 0 or NaN over %s) left out: %s",
            list(reference_rows),
            sorted(set(stats) - set(scaled)),
        )
    return {row: composite_of(cells, scaled) for row, cells in means.items()}


def composite_of(cells: Mapping[str, float | Sequence[float]], scale: Mapping[str, tuple[float, float]]) -> float:
    """One row's Composite on ``scale`` ``{reward: (mu, sigma)}``: the mean over the rewards of ``scale`` of ``(x_k -
    mu_k) / sigma_k``, ``x_k`` the mean of the row's cell (one value or one per seed), rewards missing or NaN left
    out (NaN when none is left)."""
    z = []
    for reward, (mu, sigma) in scale.items():
        values = _values(cells.get(reward, math.nan))
        if not np.isnan(values).all():
            z.append((float(np.nanmean(values)) - mu) / sigma)
    return float(np.mean(z)) if z else math.nan
