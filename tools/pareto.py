"""MSDDA against Reward Soup on the embedded world: a Pareto front of two rewards over preference weights.

    python tools/pareto.py [--runs /tmp/pareto] [--epochs 30] [--out docs] [--num-prompts 64] [--num-steps 20]

1. Trains, with the trainer (``configs/single.py`` at the world scale, ``--epochs`` optimizer steps each), one model
   aligned to ``world_clipscore`` and one to ``world_aesthetic``, and a MARBLE model (amortised, K = 2) on both.
   Runs live in ``--runs``; a finished run is not redone and an interrupted one resumes.
2. Samples ``--num-prompts`` held-out prompts (one image each, the same initial noise and SDE noise for every row)
   for each w in ``--weights`` (the weight of the CLIPScore model; the aesthetic model gets 1 - w):
   * ``msdda``: the two models' SDE steps fused in closed form (:func:`marble_jax.msdda.fused_sample`), each with its
     own noise level (``--etas``: 0.8 for the CLIPScore model and 1.0 for the aesthetic one, as the paper's
     ImageReward and VILA models);
   * ``reward_soup``: the LoRA parameters interpolated with w, sampled with the SDE at ``eta = w eta_1 + (1 - w) eta_2``;
   and once each: ``base`` and ``marble`` (one model, at the mean eta).
   At w = 0 and w = 1 both methods are the single model itself (same noise): their rows must coincide.
3. Scores both rewards, times the sampler (seconds per image after compilation, batch ``--batch``) and writes
   ``<out>/pareto.md`` (table), ``<out>/pareto.json`` and ``<out>/pareto.png`` (the front: aesthetic against
   CLIPScore).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from reproduce_marble import train_unless_finished  # noqa: E402

from marble_jax import defaults, msdda, rewards  # noqa: E402
from marble_jax.sample import base_trainable, load_trained, make_fused_sampler, sampling_setup  # noqa: E402
from marble_jax.scoring import eval_subset, mean_scores  # noqa: E402

REWARDS = ("world_clipscore", "world_aesthetic")
RUNS = {
    "clipscore": ("single", "world_clipscore"),
    "aesthetic": ("single", "world_aesthetic"),
    "marble": ("marble_amortized", ""),
}


def run_config(method: str, single: str, epochs: int, seed: int):
    """The world config of one training run on the two rewards."""
    c = defaults.with_rewards(defaults.get_config("world"), REWARDS)
    c.eval_only_rewards = ()
    c.seed, c.total_epochs, c.method, c.single_reward = seed, epochs, method, single
    c.eval.every = max(1, epochs // 3)
    c.checkpoint.every = epochs
    c.diagnostics_every = 0
    return c


def train_runs(runs: Path, epochs: int, seed: int) -> dict[str, Path]:
    """Trains (or resumes, or skips when finished) the three runs; returns their workdirs."""
    out = {}
    for name, (method, single) in RUNS.items():
        out[name] = runs / name
        train_unless_finished(run_config(method, single, epochs, seed), out[name], f"training {name}")
    return out


def evaluate(workdirs: dict[str, Path], args) -> dict:
    """Rows ``{method, w, world_clipscore, world_aesthetic, seconds_per_image}`` (see the module doc)."""
    config = run_config("single", REWARDS[0], args.epochs, args.seed)
    setup = sampling_setup(config)
    models = {name: load_trained(setup, config, w) for name, w in workdirs.items()}
    scorers = {n: rewards.get(n) for n in REWARDS}
    prompts = eval_subset(setup.eval_prompts, args.num_prompts)
    texts, meta = [p.text for p in prompts], [p.metadata for p in prompts]
    context, pooled = (jnp.asarray(a) for a in setup.encode(texts))
    sample = make_fused_sampler(setup, args.num_steps)
    key = jax.random.key(args.seed)
    etas = np.asarray(args.etas, np.float32)

    def run(stacked, w, eta) -> tuple[dict, float]:
        images, seconds = [], 0.0
        w, eta = jnp.asarray(w, jnp.float32), jnp.asarray(eta, jnp.float32)

        def call(i: int):
            sl = slice(i, i + args.batch)
            args_i = (setup.base_params, stacked, setup.decode_params, context[sl], pooled[sl], w, eta)
            return jax.block_until_ready(sample(*args_i, jax.random.fold_in(key, i)))

        for i in range(0, len(texts), args.batch):
            if i == 0:
                call(i)  # compile (and warm up) outside the timing
            start = time.perf_counter()
            images.append(np.asarray(call(i)))
            seconds += time.perf_counter() - start
        images = np.concatenate(images)
        return mean_scores({n: fn(images, texts, meta) for n, fn in scorers.items()}), seconds / len(texts)

    pair = msdda.stack_params([models["clipscore"], models["aesthetic"]])
    mean_eta = np.asarray([etas.mean()])
    rows = []
    for name, tree in (("base", base_trainable(setup)), ("marble", models["marble"])):
        scores, spi = run(msdda.stack_params([tree]), np.ones(1), mean_eta)
        rows.append({"method": name, "w": None, **scores, "seconds_per_image": spi})
        logging.info("%s: %s", name, rows[-1])
    for w in args.weights:
        ws = np.asarray([w, 1 - w])
        scores, spi = run(pair, ws, etas)
        rows.append({"method": "msdda", "w": w, **scores, "seconds_per_image": spi})
        logging.info("msdda w=%.2f: %s", w, rows[-1])
        soup = msdda.reward_soup([models["clipscore"], models["aesthetic"]], jnp.asarray(ws, jnp.float32))
        scores, spi = run(msdda.stack_params([soup]), np.ones(1), np.asarray([ws @ etas]))
        rows.append({"method": "reward_soup", "w": w, **scores, "seconds_per_image": spi})
        logging.info("reward_soup w=%.2f: %s", w, rows[-1])
    return {"rewards": list(REWARDS), "etas": list(args.etas), "num_prompts": len(texts), "num_steps": args.num_steps,
            "epochs": args.epochs, "rows": rows}  # fmt: skip


def dominance(rows: list[dict]) -> list[str]:
    """Per interior w: whether MSDDA's point is above Reward Soup's on both rewards, one, or neither."""
    lines = []
    by = {(r["method"], r["w"]): r for r in rows}
    for w in sorted({r["w"] for r in rows if r["method"] == "msdda"}):
        m, s = by[("msdda", w)], by[("reward_soup", w)]
        if all(abs(m[n] - s[n]) <= 1e-3 * abs(s[n]) for n in REWARDS):
            lines.append(f"w = {w:g}: the same model either way (equal within float rounding)")
            continue
        better = [n for n in REWARDS if m[n] > s[n]]
        lines.append(f"w = {w:g}: MSDDA higher on {', '.join(better) if better else 'neither reward'}")
    return lines


def write_report(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    single = float(np.median([r["seconds_per_image"] for r in rows if r["method"] != "msdda"]))  # one-model calls
    lines = [
        "# MSDDA against Reward Soup on the embedded world",
        "",
        f"Written by `python tools/pareto.py`. Two models trained {doc['epochs']} steps each on one reward (LoRA over the",
        f"world model), fused with weights (w, 1 - w); {doc['num_prompts']} held-out prompts, {doc['num_steps']} SDE steps,",
        f"etas {doc['etas']} (CLIPScore model, aesthetic model); the same noise for every row.",
        "",
        "| method | w (CLIPScore model) | world_clipscore | world_aesthetic | ms / image | latency vs one model (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        w = "" if r["w"] is None else f"{r['w']:g}"
        lines.append(f"| {r['method']} | {w} | {r['world_clipscore']:.4f} | {r['world_aesthetic']:.3f} | "
                     f"{1e3 * r['seconds_per_image']:.1f} | {r['seconds_per_image'] / single:.2f}x |")  # fmt: skip
    lines += ["", *dominance(rows), "", "![Pareto front](pareto.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.md").write_text("\n".join(lines))
    (out / "pareto.json").write_text(json.dumps(doc, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for method, style in (("msdda", "o-"), ("reward_soup", "s--")):
        pts = sorted((r["w"], r["world_clipscore"], r["world_aesthetic"]) for r in rows if r["method"] == method)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], style, label=method)
        for w, x, y in pts:
            ax.annotate(f"{w:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    for r in rows:
        if r["w"] is None:
            ax.plot(r["world_clipscore"], r["world_aesthetic"], "k*" if r["method"] == "base" else "r^", label=r["method"])
    ax.set_xlabel("world_clipscore")
    ax.set_ylabel("world_aesthetic")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/pareto"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8, 1.0])
    parser.add_argument("--etas", type=float, nargs=2, default=[0.8, 1.0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.num_prompts % args.batch:
        parser.error(f"--num-prompts ({args.num_prompts}) must be a multiple of --batch ({args.batch})")
    doc = evaluate(train_runs(args.runs, args.epochs, args.seed), args)
    write_report(doc, args.out)
    print((args.out / "pareto.md").read_text())


if __name__ == "__main__":
    main()
