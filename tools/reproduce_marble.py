"""Re-measures the MARBLE paper's claims on the embedded world over seeds, every method on an equal budget.

    python tools/reproduce_marble.py                      # every run missing, then docs/reproduction.{md,json} + PNGs
    python tools/reproduce_marble.py --train-only --budget-minutes 120     # one session's share of the study
    python tools/reproduce_marble.py --report-only        # the report of the runs finished so far
    python tools/reproduce_marble.py --report-only --rearchive   # archive finished runs again first (new fields)
    python tools/reproduce_marble.py --seeds 3 --headline-seeds 5 --methods weighted_sum marble_amortized

Every run is ``configs/k5.py`` at the world scale (five rewards, 8 prompts x 8 images per epoch, DPM-Solver-2
with 10 steps, LoRA r 16, AdamW 1e-3) for ``--epochs`` optimizer steps, differing only in the method and the seed:
``single_<reward>`` (one per reward), ``weighted_sum``, ``sequential`` (stages of epochs / 10, two cycles),
``marble`` (a full solve every step), ``marble_amortized`` (N = 10, rho = 0.7), ``marble_gram`` (the exact
per-sample solve every step, rho = 0.7), the EMA ablation ``marble_rho_<rho>`` (amortised) and
``marble_gram_rho_<rho>`` for rho in 0.1 / 0.3 / 0.5 / 0.9, and ``marble_gram_no_ema``. ``base`` is the model before
training (the step-0 evaluation of the runs). Run ``s`` of every method uses ``config.seed = s``: the same
held-out prompts and evaluation noise (``config.eval``, EMA parameters, 4 images per prompt), so rows pair seed by
seed. The headline rows (:data:`HEADLINE`) run over ``--headline-seeds`` seeds, the others over ``--seeds``, in
the order of :func:`schedule` (a study stopped anywhere has comparable rows). Runs live in
``--runs/<method>/seed_<s>``; a finished run is not redone, an interrupted one resumes (SIGTERM saves and stops
the study; the same command goes on), compiled programs are kept in ``--runs/xla_cache``, and each run's CPU time
is added to its ``cost.json``. A finished run's report data (:func:`summarize`, a few tens of kB) is archived in
``--archive/<method>/seed_<s>.json`` (default ``docs/study``, committed): the report reads only the archive, and
an archived run is never trained again, so a study spans sessions whose ``--runs`` directories are gone.

Measured per run: held-out per-prompt scores of the five rewards and the evaluation-only aesthetic, the fraction
of mini-batches whose applied direction is anti-aligned with at least one reward's gradient (weighted sum:
measured every second step with K + 1 extra backward passes; MARBLE: at every full solve; not measured for the
single-reward and sequential runs), iterations per second (wall clock of a training step, the first two steps and
the diagnostic steps left out) and the reward-hacking monitors. The report: means with 95% two-level bootstrap
intervals over seeds and prompts (:mod:`marble_jax.statistics`), paired differences against the weighted sum and
the base, a verdict per claim (:func:`verdicts`), per-seed rows and plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from marble_jax import defaults, experiment, monitors, run_log, statistics, train

REWARDS = defaults.FIVE_REWARDS["world"]
COLUMNS = (*REWARDS, *defaults.EVAL_ONLY_REWARDS["world"])  # held-out: the trained five, then the evaluation-only
RHOS = (0.1, 0.3, 0.5, 0.9)  # with the default 0.7 (marble_amortized, marble_gram): the paper's EMA ablation
HEADLINE = ("weighted_sum", "marble", "marble_amortized", "marble_gram")  # with base: the rows run over most seeds
ABLATION = (*(f"marble_rho_{rho}" for rho in RHOS), *(f"marble_gram_rho_{rho}" for rho in RHOS))
METHODS = (
    *(f"single_{r}" for r in REWARDS),
    "weighted_sum",
    "sequential",
    "marble",
    "marble_amortized",
    "marble_gram",
    *ABLATION,
    "marble_gram_no_ema",
)
IMAGES_PER_PROMPT = 4  # held-out images per prompt at every evaluation (the intervals' cells average them)
REFERENCE = ("base", "weighted_sum")  # the rows whose seeds set Composite's scale
DEFAULT = "marble_amortized"  # configs/k5.py's world method; the other MARBLE settings are paired against it
MARBLE_SETTINGS = ("marble", "marble_gram", *ABLATION, "marble_gram_no_ema")
PAPER = {"anti_aligned": {"weighted_sum": 0.80, "marble": 0.0}, "throughput": {"weighted_sum": 1.00, "marble": 0.56,
                                                                                 "marble_amortized": 0.97}}  # fmt: skip


def method_config(method: str, epochs: int, seed: int):
    """The k5 world config of ``method`` (see the module doc)."""
    c = defaults.with_rewards(defaults.get_config("world"), REWARDS)
    c.seed, c.total_epochs = seed, epochs
    c.eval.every, c.eval.images_per_prompt = max(1, epochs // 3), IMAGES_PER_PROMPT
    c.checkpoint.every = epochs  # one checkpoint at the end (and on SIGTERM)
    c.diagnostics_every = 0  # the single-reward and sequential runs: no K + 1 extra backward passes
    if method.startswith("single_"):
        c.method, c.single_reward = "single", method.removeprefix("single_")
    elif method == "sequential":
        c.method = "sequential"
        stage = max(1, epochs // (2 * len(REWARDS)))
        c.sequential_stages = tuple((r, stage) for r in REWARDS)
    elif method.startswith("marble_rho_"):
        c.method, c.balance.ema_decay = "marble_amortized", float(method.removeprefix("marble_rho_"))
    elif method.startswith("marble_gram_rho_"):
        c.method, c.balance.ema_decay = "marble_gram", float(method.removeprefix("marble_gram_rho_"))
    elif method == "marble_gram_no_ema":
        c.method, c.balance.ema_decay = "marble_gram", 0.0
    elif method == "weighted_sum":
        c.method, c.diagnostics_every = method, 2
    elif method in ("marble", "marble_amortized", "marble_gram"):
        c.method = method
    else:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    return c


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a metrics / eval JSONL file, the last row of each step kept (a resumed run rewrites some steps)."""
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def finished(workdir: Path, epochs: int) -> bool:
    """Whether the run in ``workdir`` has logged step ``epochs`` and evaluated it."""
    metrics, evals = workdir / "metrics.jsonl", workdir / "eval.jsonl"
    return (
        metrics.is_file()
        and evals.is_file()
        and read_jsonl(metrics)[-1]["step"] >= epochs
        and read_jsonl(evals)[-1]["step"] >= epochs
    )


def train_unless_finished(config, workdir: Path, name: str) -> bool:
    """Trains ``config`` in ``workdir`` unless it is finished (an interrupted run resumes), logging ``name``; adds the
    wall and CPU seconds spent (this process, every thread) to ``workdir/cost.json`` (the report's budget). Returns
    whether the run is finished: False when the trainer stopped early on request (SIGTERM saves and returns)."""
    if finished(workdir, config.total_epochs):
        return True
    wall, cpu = time.time(), time.process_time()
    logging.info("%s", name)
    try:
        train.run(experiment.build_setup(config), config, workdir)
    finally:
        cost_path = workdir / "cost.json"
        cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {"wall_s": 0.0, "cpu_s": 0.0, "sessions": 0}
        cost["wall_s"] += time.time() - wall
        cost["cpu_s"] += time.process_time() - cpu
        cost["sessions"] += 1
        workdir.mkdir(parents=True, exist_ok=True)
        run_log.replace_atomically(cost_path, lambda f: f.write(json.dumps(cost) + "\n"))
    logging.info("%s took %.0f s", name, time.time() - wall)
    return finished(workdir, config.total_epochs)


def schedule(methods: list[str], seeds: int, headline_seeds: int) -> list[tuple[str, int]]:
    """The (method, seed) runs in the order they are trained, so that a study stopped anywhere has equal seeds across
    the rows of each comparison: the headline rows over the first ``seeds`` seeds, then the rho ablation over them,
    then the headline rows' extra seeds (up to ``headline_seeds``), then the other rows."""
    head = [m for m in methods if m in HEADLINE]
    ablation = [m for m in methods if m in ABLATION]
    rest = [m for m in methods if m not in HEADLINE and m not in ABLATION]
    first = min(seeds, headline_seeds)
    return (
        [(m, s) for s in range(first) for m in head]
        + [(m, s) for s in range(seeds) for m in ablation]
        + [(m, s) for s in range(first, headline_seeds) for m in head]
        + [(m, s) for s in range(seeds) for m in rest]
    )


def run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / method / f"seed_{seed}"


def sheet_statistics(path: Path) -> dict[str, float] | None:
    """Brightness and saturation (:mod:`marble_jax.monitors`) of an evaluation's sample sheet (``samples/step_<n>.png``:
    the first held-out images, the same prompts and noise at every step), its white grid lines left out; None when
    the sheet is missing."""
    if not path.is_file():
        return None
    from PIL import Image

    sheet = np.asarray(Image.open(path).convert("RGB"))
    white = sheet.min(axis=-1) == 255
    cells = sheet[~white.all(axis=1)][:, ~white.all(axis=0)][None]
    return {"brightness": float(monitors.brightness(cells)[0]), "saturation": float(monitors.saturation(cells)[0])}


def summarize(workdir: Path) -> dict:
    """One finished run: held-out means and per-prompt scores at the last evaluation (and at step 0, the base), the
    curve of held-out means, the anti-aligned fraction, iterations per second, the reward-hacking monitors at the
    end (the last five steps' mean), the evaluation-only rewards' shift from the base at every evaluation (what the
    trainer's warning reads), the sample sheet's brightness and saturation at the last evaluation over step 0's
    (:func:`sheet_statistics`: paired images, unlike the rollouts') and the CPU time spent."""
    evals = read_jsonl(workdir / "eval.jsonl")
    metrics = read_jsonl(workdir / "metrics.jsonl")
    measured = [m["anti_aligned"] for m in metrics if "anti_aligned" in m]
    times = [m["time/step_s"] for m in metrics[2:] if not m.get("diagnostics", 0)]
    last = metrics[-5:]
    monitor_keys = sorted({k for m in last for k in m if k.startswith("monitor/")})
    cost, eval_only = workdir / "cost.json", defaults.EVAL_ONLY_REWARDS["world"]
    sheets = [sheet_statistics(monitors.sheet_path(workdir, e["step"])) for e in (evals[0], evals[-1])]
    shifts = [{"step": e["step"], **{r: monitors.eval_only_shift(workdir, e["step"], r) for r in eval_only}}
              for e in evals if e["step"] > 0]  # fmt: skip
    return {
        "held_out": {r: evals[-1][r] for r in COLUMNS},
        "per_prompt": statistics.per_prompt_scores(workdir),
        "anti_aligned_fraction": float(np.mean(measured)) if measured else None,
        "anti_aligned_measured_steps": len(measured),
        "iterations_per_s": 1 / float(np.mean(times)) if times else None,
        "curve": [{"step": e["step"], **{r: e[r] for r in COLUMNS}} for e in evals],
        "base": {r: evals[0][r] for r in COLUMNS} if evals[0]["step"] == 0 else None,
        "base_per_prompt": statistics.per_prompt_scores(workdir, 0) if evals[0]["step"] == 0 else None,
        "monitors": {k: float(np.mean([m[k] for m in last if k in m])) for k in monitor_keys},
        "eval_only_shift": {r: shifts[-1][r] for r in eval_only},
        "eval_only_shift_curve": shifts,
        "sheet_drift": (
            {k: sheets[1][k] / sheets[0][k] if sheets[0][k] > 0 else float("nan") for k in sheets[0]}
            if all(sheets) and evals[0]["step"] == 0
            else None
        ),
        "cpu_s": json.loads(cost.read_text())["cpu_s"] if cost.is_file() else None,
    }


def archive_path(archive: Path, method: str, seed: int) -> Path:
    """Where the report's data of run (``method``, ``seed``) is kept: ``<archive>/<method>/seed_<seed>.json``."""
    return archive / method / f"seed_{seed}.json"


def archive_run(workdir: Path, path: Path) -> None:
    """:func:`summarize` of a finished run, written to ``path`` (floats to 7 digits, NaN where a reward does not
    apply): the few tens of kB a report needs, kept in the repository so that a study spans sessions whose run
    directories (checkpoints, events) are gone."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple | np.ndarray):
            return [plain(v) for v in x]
        return float(f"{x:.7g}") if isinstance(x, float | np.floating) else x

    path.parent.mkdir(parents=True, exist_ok=True)
    run_log.replace_atomically(path, lambda f: f.write(json.dumps(plain(summarize(workdir))) + "\n"))


def load_archived(path: Path) -> dict:
    """A run archived by :func:`archive_run`, its per-prompt scores as float64 arrays."""
    run = json.loads(path.read_text())
    for key in ("per_prompt", "base_per_prompt"):
        run[key] = {r: np.asarray(v, np.float64) for r, v in run[key].items()}
    return run


def collect(archive: Path, plan: list[tuple[str, int]]) -> dict[str, dict[int, dict]]:
    """``{row: {seed: run}}`` of the archived runs of ``plan``, ``base`` first: its seed ``s`` is the step-0
    evaluation of seed ``s``'s runs (the same initial LoRA, prompts and noise for every method, so one run's is
    every run's; the agreement is checked)."""
    rows: dict[str, dict[int, dict]] = {"base": {}}
    for method, seed in plan:
        path = archive_path(archive, method, seed)
        if not path.is_file():
            continue
        run = load_archived(path)
        rows.setdefault(method, {})[seed] = run
        base = {"held_out": run["base"], "per_prompt": run["base_per_prompt"], "anti_aligned_fraction": None,
                "iterations_per_s": None, "curve": None, "monitors": {}, "eval_only_shift": {}, "cpu_s": 0.0}  # fmt: skip
        if seed not in rows["base"]:
            rows["base"][seed] = base
        elif any(abs(base["held_out"][r] - rows["base"][seed]["held_out"][r]) > 1e-4 for r in COLUMNS):
            logging.warning("%s seed %d: its step-0 evaluation differs from another run's of that seed", method, seed)
    return {row: dict(sorted(seeds.items())) for row, seeds in rows.items() if seeds}


def interval_dict(interval: statistics.Interval) -> dict:
    return {"mean": interval.mean, "low": interval.low, "high": interval.high}


def over_seeds(values: list[float | None], n_resamples: int) -> dict | None:
    """Mean and bootstrap interval of one value per seed (``None`` when there is no value)."""
    x = [v for v in values if v is not None]
    return interval_dict(statistics.bootstrap_ci(np.asarray(x)[:, None], n_resamples=n_resamples)) if x else None


def comparisons(rows: dict[str, dict[int, dict]]) -> list[tuple[str, str]]:
    """The (row, baseline) pairs the report and its verdicts compare: every row against the weighted sum and the
    base, rho 0.7 against the other rhos (amortised and ``marble_gram``), each single-reward run against MARBLE,
    every other MARBLE setting against the default (:data:`DEFAULT`)."""
    pairs = [(row, base) for row in rows for base in ("weighted_sum", "base") if row != base]
    pairs += [("marble_amortized", f"marble_rho_{rho}") for rho in RHOS]
    pairs += [("marble_gram", f"marble_gram_rho_{rho}") for rho in RHOS]
    pairs += [(f"single_{r}", "marble_amortized") for r in REWARDS]
    pairs += [(row, DEFAULT) for row in MARBLE_SETTINGS]
    return [(a, b) for a, b in pairs if a in rows and b in rows and set(rows[a]) & set(rows[b])]


def analyse(rows: dict[str, dict[int, dict]], n_resamples: int) -> dict:
    """Per row: seeds, per-seed rows, each column's mean with its two-level interval (:mod:`marble_jax.statistics`),
    Composite with its interval, the anti-aligned fraction, iterations per second and the throughput ratio to the
    weighted sum over seeds, the monitors at the end. ``pairs["a - b"]``: the paired differences of the
    :func:`comparisons`, per column and Composite, on the seeds both rows have. Composite's reference scale: every
    seed of ``base`` and ``weighted_sum`` pooled (:func:`marble_jax.statistics.reference_stats`)."""
    means = {row: {r: [run["held_out"][r] for run in seeds.values()] for r in COLUMNS} for row, seeds in rows.items()}
    scale = None
    if all(r in rows for r in REFERENCE):
        scale = {r: v for r, v in statistics.reference_stats(means, REFERENCE, COLUMNS).items() if v[1] > 0}

    def matrices(row: str, seeds: list[int]) -> dict[str, np.ndarray]:
        return {r: np.stack([rows[row][s]["per_prompt"][r] for s in seeds]) for r in COLUMNS}

    margin = method_config(DEFAULT, 1, 0).monitors.eval_only_margin  # the trainer's warning threshold
    out = {}
    for row, seeds in rows.items():
        logging.info("statistics of %s (%d seeds)", row, len(seeds))
        mats, runs, ws = matrices(row, list(seeds)), list(seeds.values()), rows.get("weighted_sum", {})
        per_seed = []
        for s, run in seeds.items():
            composite = statistics.composite_of(run["held_out"], scale) if scale else None
            kept = {k: run[k] for k in ("anti_aligned_fraction", "iterations_per_s", "monitors", "eval_only_shift", "cpu_s")}
            per_seed.append({"seed": s, **run["held_out"], "Composite": composite, **kept})
        ratios = [run["iterations_per_s"] / ws[s]["iterations_per_s"] for s, run in seeds.items()
                  if s in ws and run["iterations_per_s"] and ws[s]["iterations_per_s"]]  # fmt: skip
        out[row] = {
            "seeds": list(seeds),
            "per_seed": per_seed,
            "held_out": {r: interval_dict(statistics.bootstrap_ci(mats[r], n_resamples=n_resamples)) for r in COLUMNS},
            "Composite": interval_dict(statistics.composite_ci(mats, scale, n_resamples=n_resamples)) if scale else None,
            "anti_aligned_fraction": over_seeds([run["anti_aligned_fraction"] for run in runs], n_resamples),
            "iterations_per_s": over_seeds([run["iterations_per_s"] for run in runs], n_resamples),
            "throughput_vs_weighted_sum": over_seeds(ratios, n_resamples),
            "monitors": {
                k: float(np.mean([run["monitors"][k] for run in runs if k in run["monitors"]]))
                for k in sorted({k for run in runs for k in run["monitors"]})
            },  # fmt: skip
            "eval_only_shift": {
                r: float(np.mean([run["eval_only_shift"][r] for run in runs]))
                for r in defaults.EVAL_ONLY_REWARDS["world"]
                if row != "base"
            },  # fmt: skip
            "eval_only_warnings": eval_only_warnings(seeds, margin),
            "sheet_drift": {
                k: float(np.mean([run["sheet_drift"][k] for run in runs if run.get("sheet_drift")]))
                for k in ("brightness", "saturation")
                if any(run.get("sheet_drift") for run in runs)
            },  # fmt: skip
        }
    pairs = {}
    for a, b in comparisons(rows):
        common = sorted(set(rows[a]) & set(rows[b]))
        x, y = matrices(a, common), matrices(b, common)
        pair = {"seeds": common}
        pair |= {r: interval_dict(statistics.paired_difference_ci(x[r], y[r], n_resamples=n_resamples)) for r in COLUMNS}
        if scale:
            diff, zero = {r: x[r] - y[r] for r in COLUMNS}, {r: (0.0, sigma) for r, (_, sigma) in scale.items()}
            pair["Composite"] = interval_dict(statistics.composite_ci(diff, zero, n_resamples=n_resamples))
        pairs[f"{a} - {b}"] = pair
    return {"reference_scale": scale, "rows": out, "pairs": pairs}


def eval_only_warnings(seeds: dict[int, dict], margin: float) -> list[dict] | None:
    """The evaluations of a row's runs at which the trainer's reward-hacking warning tripped: an evaluation-only
    reward below the base by more than ``margin`` (``config.monitors.eval_only_margin``) per-image standard deviations.
    ``[{"seed", "step", "reward", "shift"}]``; None when no run of the row has the shifts per evaluation (runs
    archived before they were kept: ``--rearchive`` adds them from the run directories)."""
    curves = {s: run.get("eval_only_shift_curve") for s, run in seeds.items()}
    if not any(curves.values()):
        return None
    return [
        {"seed": s, "step": point["step"], "reward": r, "shift": point[r]}
        for s, curve in curves.items()
        for point in curve or []
        for r in defaults.EVAL_ONLY_REWARDS["world"]
        if point.get(r) is not None and point[r] < -margin
    ]


def verdict(interval: dict | None, seeds: int) -> str:
    """``reproduced`` when the interval of a claimed positive effect lies above zero, ``not reproduced`` when it lies
    below, ``inconclusive`` when it holds zero or rests on fewer than two seeds (one seed's interval covers its
    prompts only, not the training's seed-to-seed variation)."""
    if interval is None:
        return "not measured"
    if seeds < 2:
        return "inconclusive (one seed)"
    return "reproduced" if interval["low"] > 0 else "not reproduced" if interval["high"] < 0 else "inconclusive"


def _all(verdicts: list[str]) -> str:
    """A claim made of several effects: reproduced when every one is, not reproduced when any one is not."""
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if "not reproduced" in verdicts:
        return "not reproduced"
    return next((v for v in verdicts if v.startswith("inconclusive (")), "inconclusive")


def fmt_ci(iv: dict | None, digits: int = 3) -> str:
    return "n/a" if iv is None else f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _short(reward: str) -> str:
    return reward.removeprefix("world_")


def verdicts(analysis: dict, n_resamples: int) -> list[str]:
    """The claims, one markdown item each, with the effect, its 95% interval and the :func:`verdict`."""
    rows, pairs = analysis["rows"], analysis["pairs"]
    lines = []
    ws, marble = rows.get("weighted_sum"), rows.get("marble")
    if ws and marble and ws["anti_aligned_fraction"] and marble["anti_aligned_fraction"]:
        of_ws = {r["seed"]: r["anti_aligned_fraction"] for r in ws["per_seed"]}
        diff = [of_ws[r["seed"]] - r["anti_aligned_fraction"] for r in marble["per_seed"] if r["seed"] in of_ws]
        iv = over_seeds(diff, n_resamples)
        lines.append(
            f"1. **The weighted sum's direction is often anti-aligned with a reward, MARBLE's never** (paper 0.80 "
            f"against 0). Fraction of measured steps: weighted sum {fmt_ci(ws['anti_aligned_fraction'], 2)}, MARBLE "
            f"{fmt_ci(marble['anti_aligned_fraction'], 2)}; difference {fmt_ci(iv, 2)} over {len(diff)} seeds: "
            f"**{verdict(iv, len(diff))}**."
        )
    for row in ("marble_amortized", "marble", "marble_gram"):
        gain, vs = pairs.get(f"{row} - base"), pairs.get(f"{row} - weighted_sum")
        if not gain:
            continue
        n = len(gain["seeds"])
        each = [verdict(gain[r], n) for r in REWARDS]
        above = sum(gain[r]["low"] > 0 for r in REWARDS)
        text = ", ".join(f"{_short(r)} {fmt_ci(gain[r])}" for r in REWARDS)
        line = (
            f"2. **{row} lifts all five trained rewards above the base**: {above} of 5 gains above zero ({text}; "
            f"{n} seeds): **{_all(each)}**."
        )
        if vs and "Composite" in vs:
            line += (
                f" **It beats the weighted sum**: Composite difference {fmt_ci(vs['Composite'], 2)} ({len(vs['seeds'])} "
                f"paired seeds): **{verdict(vs['Composite'], len(vs['seeds']))}**."
            )
        lines.append(line)
    for row in ("marble", "marble_amortized"):
        iv, paper = rows.get(row, {}).get("throughput_vs_weighted_sum"), PAPER["throughput"][row]
        if iv:
            held = iv["low"] <= paper <= iv["high"] or (row == "marble_amortized" and iv["low"] > paper)
            seeds = len(rows[row]["seeds"])
            found = "inconclusive (one seed)" if seeds < 2 else "reproduced" if held else "not reproduced"
            lines.append(
                f"3. **Throughput of {row} against the weighted sum** (paper {paper:.2f}x): {fmt_ci(iv, 2)}x over "
                f"{seeds} seeds: **{found}** (rule: reproduced when the interval holds the paper's ratio"
                + (", or lies above it" if row == "marble_amortized" else "")
                + "; wall clock of the training steps on a shared 2-core CPU)."
            )
    for family, best, name in (
        ("amortised", "marble_amortized", "marble_rho_{}"),
        ("marble_gram", "marble_gram", "marble_gram_rho_{}"),
    ):
        diffs = {rho: pairs[f"{best} - {name.format(rho)}"] for rho in RHOS if f"{best} - {name.format(rho)}" in pairs}
        if diffs:
            text = ", ".join(f"{rho}: {fmt_ci(d['Composite'], 2)}" for rho, d in diffs.items() if "Composite" in d)
            seeds = sorted({len(d["seeds"]) for d in diffs.values()})
            lines.append(
                f"4. **rho = 0.7 is best** ({family}). Composite of rho 0.7 minus that of rho {text} ({'/'.join(map(str, seeds))}"
                f" paired seeds): **{_all([verdict(d.get('Composite'), len(d['seeds'])) for d in diffs.values()])}**."
            )  # fmt: skip
    for reward in REWARDS:
        gain, vs = pairs.get(f"single_{reward} - base"), pairs.get(f"single_{reward} - marble_amortized")
        if not gain or not vs:
            continue
        below_base = [_short(r) for r in COLUMNS if r != reward and gain[r]["high"] < 0]
        behind = [_short(r) for r in REWARDS if r != reward and vs[r]["high"] < 0]
        ahead = all(vs[r]["low"] > 0 for r in REWARDS if r != reward)
        lines.append(
            f"5. **Training {_short(reward)} alone trades the others away**: its own reward {fmt_ci(gain[reward])} over "
            f"the base; significantly below the base on {', '.join(below_base) or 'none'}; below MARBLE (amortised) on "
            f"{', '.join(behind) or 'none'} ({len(vs['seeds'])} seeds): "
            f"**{'reproduced' if behind else 'not reproduced' if ahead else 'inconclusive'}** (reproduced: another "
            "trained reward below MARBLE's; not reproduced: above MARBLE's on all four others)."
        )
    default = rows.get(DEFAULT, {}).get("Composite")
    others = {row: pairs[f"{row} - {DEFAULT}"] for row in MARBLE_SETTINGS if f"{row} - {DEFAULT}" in pairs}
    others = {row: d for row, d in others.items() if "Composite" in d}
    if default and others:
        best = max(others, key=lambda row: rows[row]["Composite"]["mean"])
        better = [row for row, d in others.items() if len(d["seeds"]) >= 3 and d["Composite"]["low"] > 0]
        text = ", ".join(f"{row} {fmt_ci(d['Composite'], 2)} ({len(d['seeds'])})" for row, d in others.items())
        lines.append(
            f"6. **The default** ({DEFAULT}, Composite {fmt_ci(default, 2)}): the highest Composite of the other MARBLE "
            f"settings is {best}'s, {fmt_ci(rows[best]['Composite'], 2)}. Paired Composite differences against the "
            f"default (setting minus default, paired seeds): {text}. Rule: another setting becomes the default when "
            "its difference's interval lies above zero over 3 seeds or more: "
            + (f"**switch to {', '.join(better)}**." if better else "**keep the default** (none is ahead beyond the noise).")
        )  # fmt: skip
    return lines


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: dict[str, dict[int, dict]], path: Path) -> None:
    """One panel per reward: the held-out mean over seeds against the optimizer step, with the band from the lowest
    to the highest seed, for the headline rows and the sequential schedule."""
    plt = pyplot()
    fig, axes = plt.subplots(2, (len(COLUMNS) + 1) // 2, figsize=(13, 7), squeeze=False)
    for ax, reward in zip(axes.flat, COLUMNS, strict=True):
        for row in (*HEADLINE, "sequential"):
            curves = [run["curve"] for run in rows.get(row, {}).values()]
            if not curves:
                continue
            steps = [c["step"] for c in curves[0]]
            values = np.asarray([[c[reward] for c in curve] for curve in curves if len(curve) == len(steps)])
            (line,) = ax.plot(steps, values.mean(0), "-" if row.startswith("marble") else "--", marker="o", ms=3,
                              label=f"{row} ({len(values)} seeds)")  # fmt: skip
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(_short(reward) + (" (evaluation only)" if reward not in REWARDS else ""))
        ax.set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out mean (band: lowest to highest seed)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_composite(analysis: dict, path: Path) -> None:
    """Left: every row's Composite with its 95% interval and one dot per seed. Right: Composite against rho (the EMA
    ablation), amortised and ``marble_gram``."""
    plt = pyplot()
    rows = {k: v for k, v in analysis["rows"].items() if v["Composite"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.8), width_ratios=(1.4, 1))
    for y, (name, row) in enumerate(reversed(rows.items())):
        c = row["Composite"]
        color = "C3" if name.startswith("marble") else "C7" if name == "base" else "C0"
        left.errorbar(c["mean"], y, xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]], fmt="o", color=color, capsize=3)
        left.plot([r["Composite"] for r in row["per_seed"]], [y] * len(row["per_seed"]), "|", color="k", ms=7, alpha=0.6)
    left.set_yticks(range(len(rows)), [f"{n} ({len(r['seeds'])})" for n, r in reversed(rows.items())], fontsize=8)
    left.axvline(0, color="k", lw=0.5)
    left.set_xlabel("Composite (z on base + weighted sum), 95% interval; ticks: seeds")
    for label, best, name, marker in (("amortised", "marble_amortized", "marble_rho_{}", "o-"),
                                      ("marble_gram", "marble_gram", "marble_gram_rho_{}", "s--")):  # fmt: skip
        points = sorted((rho, analysis["rows"][n]["Composite"]) for rho, n in
                        [(0.7, best), *((r, name.format(r)) for r in RHOS)] if n in rows)  # fmt: skip
        if len(points) > 1:  # rho 0.7 and at least one other
            x = [p[0] for p in points]
            m = np.asarray([[p[1]["mean"], p[1]["mean"] - p[1]["low"], p[1]["high"] - p[1]["mean"]] for p in points])
            right.errorbar(x, m[:, 0], yerr=m[:, 1:].T, fmt=marker, capsize=3, label=label)
    right.set_xlabel("EMA rho of the MGDA coefficients")
    right.set_ylabel("Composite, 95% interval")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no rho-ablation runs yet", ha="center", transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budget(rows: dict[str, dict[int, dict]]) -> dict:
    runs = [run for row, seeds in rows.items() if row != "base" for run in seeds.values()]
    return {"runs": len(runs), "cpu_minutes": sum(r["cpu_s"] or 0.0 for r in runs) / 60,
            "runs_without_cost": sum(r["cpu_s"] is None for r in runs)}  # fmt: skip


def write_report(rows: dict[str, dict[int, dict]], out: Path, epochs: int, n_resamples: int, planned: int) -> None:
    """``reproduction.json``, ``reproduction.md``, ``reproduction_curves.png`` and ``reproduction_composite.png`` in
    ``out`` from the finished runs ``rows`` (:func:`collect`)."""
    analysis = analyse(rows, n_resamples)
    budget = _budget(rows)
    doc = {
        "rewards": list(REWARDS),
        "eval_only": list(defaults.EVAL_ONLY_REWARDS["world"]),
        "epochs": epochs,
        "images_per_prompt": IMAGES_PER_PROMPT,
        "statistics": f"two-level bootstrap over seeds and prompts (marble_jax.statistics), BCa, {n_resamples} "
        "resamples, 95%; paired differences on the seeds both rows have",  # fmt: skip
        "budget": {**budget, "planned_runs": planned},
        **analysis,
    }
    for row in doc["rows"].values():
        row["seeds"] = list(row["seeds"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduction.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot_curves(rows, out / "reproduction_curves.png")
    plot_composite(analysis, out / "reproduction_composite.png")
    num_prompts = len(next(iter(rows["base"].values()))["per_prompt"][COLUMNS[0]])
    head = ["method", "seeds", *(_short(r) for r in COLUMNS), "Composite"]
    lines = [
        f"# MARBLE on the embedded world: {epochs} optimizer steps per run, seeds per row as listed",
        "",
        "Written by `python tools/reproduce_marble.py`. Held-out means over seeds (EMA parameters; "
        f"{num_prompts} held-out prompts x {IMAGES_PER_PROMPT} images, the same prompts and noise for every row of a seed)",
        f"with 95% intervals ({doc['statistics']}). GenEval is the",
        "strict score; the aesthetic is evaluated, not trained. Composite: the mean over the six columns of the z-score",
        "on a fixed reference (every seed of base and weighted_sum pooled), so adding a row moves no other.",
        f"Budget: {budget['runs']} finished runs of {planned} planned, {budget['cpu_minutes']:.0f} CPU minutes "
        "(process CPU time, both cores).",
        "",
        "## Verdicts",
        "",
        *verdicts(analysis, n_resamples),
        "",
        "## Held-out means",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |",
    ]
    for name, row in analysis["rows"].items():
        cells = [fmt_ci(row["held_out"][r]) for r in COLUMNS] + [fmt_ci(row["Composite"], 2)]
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences against the weighted sum", "",
              "Same seeds, prompts and noise; * where the interval excludes zero.", "",
              "| method | seeds | " + " | ".join(_short(r) for r in COLUMNS) + " | Composite |",
              "| --- | --- | " + " | ".join(["---:"] * (len(COLUMNS) + 1)) + " |"]  # fmt: skip
    for key, pair in analysis["pairs"].items():
        if key.endswith(" - weighted_sum"):
            cells = [
                fmt_ci(pair[c]) + ("*" if pair[c]["low"] > 0 or pair[c]["high"] < 0 else "")
                for c in (*COLUMNS, "Composite")
                if c in pair
            ]
            lines.append(f"| {key.removesuffix(' - weighted_sum')} | {len(pair['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Directions and throughput", "",
              "| method | anti-aligned fraction | iterations / s | throughput vs weighted sum |",
              "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for name, row in analysis["rows"].items():
        if name != "base":
            lines.append(f"| {name} | {fmt_ci(row['anti_aligned_fraction'], 2)} | {fmt_ci(row['iterations_per_s'], 3)} | "
                         f"{fmt_ci(row['throughput_vs_weighted_sum'], 2)} |")  # fmt: skip
    keys = ["monitor/brightness", "monitor/saturation", "monitor/x0_norm_ratio"]
    lines += ["", "## Reward-hacking monitors (marble_jax/monitors.py), mean over seeds", "",
              "Rollout image statistics over the last five steps (step 1: the base's rollouts); the evaluation-only",
              "aesthetic's shift from the base in base per-image standard deviations (the warning trips below -0.5);",
              "the mean train-minus-held-out gap of the trained rewards; the evaluations at which the warning tripped",
              "(seed@step, over every seed's evaluations at steps 10, 20, 30); the evaluation sample sheet's brightness",
              "and saturation at the end against step 0's (the same prompts and noise: the paired measure of drift).", "",
              "| method | brightness | saturation | x0 norm / base | aesthetic shift (std) | mean gap | warnings | sheet "
              "brightness | sheet saturation |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    for name, row in analysis["rows"].items():
        if name == "base":
            continue
        m = row["monitors"]
        gaps = [v for k, v in m.items() if k.startswith("monitor/gap/")]
        shift = row["eval_only_shift"].get("world_aesthetic", float("nan"))
        warned = row["eval_only_warnings"]
        warned = "n/a" if warned is None else ", ".join(f"{w['seed']}@{w['step']}" for w in warned) or "none"
        drift = " | ".join(f"{row['sheet_drift'][k] - 1:+.0%}" if k in row["sheet_drift"] else "n/a"
                           for k in ("brightness", "saturation"))  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in keys)
                     + f" | {shift:+.2f} | {np.mean(gaps) if gaps else float('nan'):.3f} | {warned} | {drift} |")  # fmt: skip
    lines += ["", "## Per-seed rows", "",
              "| method | seed | " + " | ".join(_short(r) for r in COLUMNS) + " | Composite | CPU min |",
              "| --- | --- | " + " | ".join(["---:"] * (len(COLUMNS) + 2)) + " |"]  # fmt: skip
    for name, row in analysis["rows"].items():
        for r in row["per_seed"]:
            comp = "" if r["Composite"] is None else f"{r['Composite']:.2f}"
            cpu = "" if not r["cpu_s"] else f"{r['cpu_s'] / 60:.1f}"
            lines.append(f"| {name} | {r['seed']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + f" | {comp} | {cpu} |")
    lines += ["", "![held-out rewards per step](reproduction_curves.png)", "",
              "![Composite with intervals; the rho ablation](reproduction_composite.png)", ""]  # fmt: skip
    (out / "reproduction.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of every row (0 .. seeds - 1)")
    parser.add_argument("--headline-seeds", type=int, default=5, help=f"seeds of the headline rows {HEADLINE}")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--runs", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--archive", type=Path, default=Path("docs/study"), help="each finished run's report data")
    parser.add_argument("--compilation-cache", type=Path, default=None, help="default <runs>/xla_cache ('': off)")
    parser.add_argument("--resamples", type=int, default=9999, help="bootstrap resamples per interval")
    parser.add_argument("--budget-minutes", type=float, default=0.0, help="start no run after this long (0: no limit)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true", help="train what is missing, write no report")
    mode.add_argument("--report-only", action="store_true", help="report the finished runs, train nothing")
    parser.add_argument("--rearchive", action="store_true", help="archive again every finished run of --runs (new fields)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    plan = schedule(args.methods, args.seeds, args.headline_seeds)
    train.enable_compilation_cache(str(args.runs / "xla_cache" if args.compilation_cache is None else args.compilation_cache))
    for method, seed in plan:  # runs finished in --runs but not archived yet (a study stopped between the two)
        workdir, path = run_dir(args.runs, method, seed), archive_path(args.archive, method, seed)
        if (args.rearchive or not path.is_file()) and finished(workdir, args.epochs):
            archive_run(workdir, path)
    if not args.report_only:
        start = time.time()
        todo = [(m, s) for m, s in plan if not archive_path(args.archive, m, s).is_file()]
        logging.info("%d of %d runs archived in %s; %d to train", len(plan) - len(todo), len(plan), args.archive, len(todo))
        for i, (method, seed) in enumerate(todo):
            if args.budget_minutes and time.time() - start > 60 * args.budget_minutes:
                logging.info("budget of %.0f min spent: %d runs left for the next call", args.budget_minutes, len(todo) - i)
                break
            config, workdir = method_config(method, args.epochs, seed), run_dir(args.runs, method, seed)
            if not train_unless_finished(config, workdir, f"run {i + 1}/{len(todo)}: {method} seed {seed}"):
                logging.info("stopped on request: the same command resumes")
                return
            archive_run(workdir, archive_path(args.archive, method, seed))
    if not args.train_only:
        write_report(collect(args.archive, plan), args.out, args.epochs, args.resamples, len(plan))
        print((args.out / "reproduction.md").read_text())


if __name__ == "__main__":
    main()
