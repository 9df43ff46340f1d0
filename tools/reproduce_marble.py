"""Re-measures the MARBLE paper's claims on the embedded world, every method on an equal budget.

    python tools/reproduce_marble.py                          # all methods, writes docs/reproduction.{md,json} + PNG
    python tools/reproduce_marble.py --epochs 60 --methods weighted_sum marble_amortized

Every run is ``configs/k5.py`` at the world scale (five rewards, 8 prompts x 8 images per epoch, DPM-Solver-2
with 10 steps, LoRA r 16, AdamW 1e-3) for ``--epochs`` optimizer steps, differing only in the method:
``single_<reward>`` (one per reward), ``weighted_sum``, ``sequential`` (stages of epochs / 10, two cycles),
``marble`` (a full solve every step), ``marble_amortized`` (N = 10, rho = 0.7) and ``marble_rho_<rho>`` (the EMA
ablation, amortised). ``base`` is the model before training. All runs are scored on the same held-out prompts
with the same noise (``config.eval``, EMA parameters). Runs live in ``--runs``; a finished run is not redone
and an interrupted one resumes, so the command can be re-run after a stop.

Measured per run: held-out means of the five rewards, the fraction of mini-batches whose applied direction is
anti-aligned with at least one reward's gradient (weighted sum: measured every second step with K + 1 extra
backward passes; MARBLE: at every full solve; not measured for the single-reward and sequential runs), and
iterations per second (wall clock of a training step, the first two steps and the diagnostic steps left out).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from marble_jax import defaults, experiment, results_table, train

REWARDS = defaults.FIVE_REWARDS["world"]
COLUMNS = (*REWARDS, *defaults.EVAL_ONLY_REWARDS["world"])  # held-out: the trained five, then the evaluation-only
RHOS = (0.1, 0.3, 0.5, 0.9)
METHODS = (
    *(f"single_{r}" for r in REWARDS),
    "weighted_sum",
    "sequential",
    "marble",
    "marble_amortized",
    *(f"marble_rho_{rho}" for rho in RHOS),
    "marble_gram",
    "marble_gram_no_ema",
)
PAPER = {"anti_aligned": {"weighted_sum": 0.80, "marble": 0.0}, "throughput": {"weighted_sum": 1.00, "marble": 0.56,
                                                                                 "marble_amortized": 0.97}}  # fmt: skip


def method_config(method: str, epochs: int, seed: int):
    """The k5 world config of ``method`` (see the module doc)."""
    c = defaults.with_rewards(defaults.get_config("world"), REWARDS)
    c.seed, c.total_epochs = seed, epochs
    c.eval.every = max(1, epochs // 3)
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


def train_unless_finished(config, workdir: Path, name: str) -> None:
    """Trains ``config`` in ``workdir`` unless its metrics already reach ``config.total_epochs`` (an interrupted run
    resumes), logging ``name`` and the wall time."""
    metrics = workdir / "metrics.jsonl"
    if metrics.is_file() and read_jsonl(metrics)[-1]["step"] >= config.total_epochs:
        return
    start = time.time()
    logging.info("%s", name)
    train.run(experiment.build_setup(config), config, workdir)
    logging.info("%s took %.0f s", name, time.time() - start)


def summarize(workdir: Path) -> dict:
    """Held-out means at the last evaluation, the anti-aligned fraction and iterations per second of a run."""
    evals = read_jsonl(workdir / "eval.jsonl")
    metrics = read_jsonl(workdir / "metrics.jsonl")
    measured = [m["anti_aligned"] for m in metrics if "anti_aligned" in m]
    times = [m["time/step_s"] for m in metrics[2:] if not m.get("diagnostics", 0)]
    return {
        "held_out": {r: evals[-1][r] for r in COLUMNS},
        "anti_aligned_fraction": float(np.mean(measured)) if measured else None,
        "anti_aligned_measured_steps": len(measured),
        "iterations_per_s": 1 / float(np.mean(times)) if times else None,
        "curve": [{"step": e["step"], **{r: e[r] for r in COLUMNS}} for e in evals],
        "base": {r: evals[0][r] for r in COLUMNS} if evals[0]["step"] == 0 else None,
    }


def plot_curves(runs: dict[str, dict], path: Path) -> None:
    """One panel per reward: held-out mean against the optimizer step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4))
    for ax, reward in zip(axes, COLUMNS, strict=True):
        for name, run in runs.items():
            if name.startswith("marble_rho_"):
                continue
            steps = [c["step"] for c in run["curve"]]
            style = "-" if name.startswith("marble") else ("--" if name in ("weighted_sum", "sequential") else ":")
            ax.plot(steps, [c[reward] for c in run["curve"]], style, marker="o", ms=3, label=name.removeprefix("single_world_"))
        ax.set_title(reward)
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_report(runs: dict[str, dict], out: Path, epochs: int) -> None:
    """``reproduction.json``, ``reproduction.md`` (+ the table's CSV) and ``reproduction_curves.png`` in ``out``."""
    base = next(r["base"] for r in runs.values() if r["base"] is not None)
    table = {"base": base, **{name: r["held_out"] for name, r in runs.items()}}
    doc = {
        "rewards": list(REWARDS),
        "eval_only": list(defaults.EVAL_ONLY_REWARDS["world"]),
        "epochs": epochs,
        "runs": {
            "base": {"held_out": base, "anti_aligned_fraction": None, "iterations_per_s": None},
            **{n: {k: r[k] for k in ("held_out", "anti_aligned_fraction", "iterations_per_s")} for n, r in runs.items()},
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduction.json").write_text(json.dumps(doc, indent=1) + "\n")
    results_table.write_table(table, list(COLUMNS), out / "reproduction_table")
    plot_curves(runs, out / "reproduction_curves.png")
    ws = runs.get("weighted_sum", {}).get("iterations_per_s")
    lines = [
        f"# MARBLE on the embedded world: {epochs} optimizer steps per method",
        "",
        "Written by `python tools/reproduce_marble.py`. Held-out means (EMA parameters, the same prompts and noise for",
        "every row); Composite = mean of the column-wise z-scores over the rows. GenEval is the strict score.",
        "",
        results_table.to_markdown(table, list(COLUMNS)),
        "",
        "| method | anti-aligned fraction (measured steps) | iterations / s | throughput vs weighted sum |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        frac = (
            "n/a"
            if r["anti_aligned_fraction"] is None
            else f"{r['anti_aligned_fraction']:.2f} ({r['anti_aligned_measured_steps']})"
        )
        ips = r["iterations_per_s"]
        ratio = f"{ips / ws:.2f}x" if ips and ws else "n/a"
        lines.append(f"| {name} | {frac} | {ips:.3f} | {ratio} |" if ips else f"| {name} | {frac} | n/a | n/a |")
    lines += ["", "![held-out rewards per step](reproduction_curves.png)", ""]
    (out / "reproduction.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--runs", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    summaries = {}
    for i, method in enumerate(args.methods):
        workdir, config = args.runs / method, method_config(method, args.epochs, args.seed)
        train_unless_finished(config, workdir, f"run {i + 1}/{len(args.methods)}: {method}")
        summaries[method] = summarize(workdir)
    write_report(summaries, args.out, args.epochs)
    print((args.out / "reproduction.md").read_text())


if __name__ == "__main__":
    main()
