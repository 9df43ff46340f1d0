"""MSDDA against Reward Soup on the embedded world: a Pareto front of two rewards over preference weights, over seeds.

    python tools/pareto.py [--seeds 3] [--runs runs/pareto] [--epochs 30] [--out docs] [--num-prompts 64]

For each seed ``s`` (``0 .. --seeds - 1``; every step resumable, a finished one is not redone):

1. Trains, with the trainer (``configs/single.py`` at the world scale, ``--epochs`` optimizer steps each,
   ``config.seed = s``), one model aligned to ``world_clipscore`` and one to ``world_aesthetic``, and a MARBLE model
   (amortised, K = 2) on both, in ``<runs>/seed_<s>/``.
2. Samples ``--num-prompts`` held-out prompts x ``--images-per-prompt`` images (the same initial and SDE noise for
   every row of the seed) for each w in ``--weights`` (the weight of the CLIPScore model; the aesthetic model gets
   1 - w):
   * ``msdda``: the two models' SDE steps fused in closed form (:func:`marble_jax.msdda.fused_sample`), each with its
     own noise level (``--etas``: 0.8 for the CLIPScore model and 1.0 for the aesthetic one, as the paper's
     ImageReward and VILA models);
   * ``reward_soup``: the LoRA parameters interpolated with w, sampled with the SDE at ``eta = w eta_1 + (1 - w) eta_2``;
   and once each: ``base`` and ``marble`` (one model, at the mean eta).
   At w = 0 and w = 1 both methods are the single model itself (same noise): their rows must coincide.
   Scores both rewards per image and times the sampler (seconds per image after compilation, batch ``--batch``):
   ``<archive>/seed_<s>.json`` (default ``docs/study/pareto``, committed: a later session reuses it while its
   settings are the same).
3. Writes ``<out>/pareto.md`` (means with 95% intervals of a two-level bootstrap over seeds and prompts, paired
   MSDDA - Reward Soup differences per w, the verdict, per-seed rows), ``<out>/pareto.json`` and ``<out>/pareto.png``
   (the fronts, aesthetic against CLIPScore, with intervals).
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
from reproduce_marble import fmt_ci, interval_dict, over_seeds, pyplot, train_unless_finished  # noqa: E402

from marble_jax import defaults, msdda, rewards, run_log, statistics, train  # noqa: E402
from marble_jax.sample import base_trainable, load_trained, make_fused_sampler, sampling_setup  # noqa: E402
from marble_jax.scoring import eval_subset  # noqa: E402

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


def train_runs(runs: Path, epochs: int, seed: int) -> dict[str, Path] | None:
    """Trains (or resumes, or skips when finished) the three runs of ``seed``; returns their workdirs, or ``None``
    when a run stopped early on request."""
    out = {}
    for name, (method, single) in RUNS.items():
        out[name] = runs / name
        if not train_unless_finished(run_config(method, single, epochs, seed), out[name], f"seed {seed}: training {name}"):
            return None
    return out


def settings(args) -> dict:
    """What a seed's ``front.json`` depends on besides the trained models: a file with others is redone."""
    keys = ("epochs", "weights", "etas", "num_prompts", "images_per_prompt", "num_steps", "batch")
    return {k: getattr(args, k) for k in keys}


def sample_front(workdirs: dict[str, Path], seed: int, args) -> dict:
    """Per-image scores and seconds per image of every row (module doc, step 2) for one seed."""
    config = run_config("single", REWARDS[0], args.epochs, seed)
    setup = sampling_setup(config)
    models = {name: load_trained(setup, config, w) for name, w in workdirs.items()}
    scorers = {n: rewards.get(n) for n in REWARDS}
    prompts = [p for p in eval_subset(setup.eval_prompts, args.num_prompts) for _ in range(args.images_per_prompt)]
    texts, meta = [p.text for p in prompts], [p.metadata for p in prompts]
    context, pooled = (jnp.asarray(a) for a in setup.encode(texts))
    sample = make_fused_sampler(setup, args.num_steps)
    key = jax.random.key(seed)
    etas = np.asarray(args.etas, np.float32)
    cpu = time.process_time()

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
        scores = {n: np.asarray(fn(images, texts, meta), np.float64).tolist() for n, fn in scorers.items()}
        return scores, seconds / len(texts)

    pair = msdda.stack_params([models["clipscore"], models["aesthetic"]])
    mean_eta = np.asarray([etas.mean()])
    rows = []
    for name, tree in (("base", base_trainable(setup)), ("marble", models["marble"])):
        scores, spi = run(msdda.stack_params([tree]), np.ones(1), mean_eta)
        rows.append({"method": name, "w": None, "scores": scores, "seconds_per_image": spi})
    for w in args.weights:
        ws = np.asarray([w, 1 - w])
        scores, spi = run(pair, ws, etas)
        rows.append({"method": "msdda", "w": w, "scores": scores, "seconds_per_image": spi})
        soup = msdda.reward_soup([models["clipscore"], models["aesthetic"]], jnp.asarray(ws, jnp.float32))
        scores, spi = run(msdda.stack_params([soup]), np.ones(1), np.asarray([ws @ etas]))
        rows.append({"method": "reward_soup", "w": w, "scores": scores, "seconds_per_image": spi})
        logging.info("seed %d, w = %g: msdda %s, reward soup %s", seed, w,
                     *({n: round(float(np.mean(r["scores"][n])), 4) for n in REWARDS} for r in rows[-2:]))  # fmt: skip
    return {"settings": settings(args), "prompt_index": [i // args.images_per_prompt for i in range(len(texts))],
            "rows": rows, "cpu_s": time.process_time() - cpu}  # fmt: skip


def front_of_seed(runs: Path, seed: int, args) -> dict | None:
    """The seed's front (module doc, steps 1-2) from ``<archive>/seed_<seed>.json`` when it was made with the same
    settings (or from ``<runs>/seed_<seed>/front.json``, then archived), else trained and sampled now and archived;
    ``None`` when a training run stopped early on request."""
    archived = args.archive / f"seed_{seed}.json"
    for path in (archived, runs / f"seed_{seed}" / "front.json"):
        if path.is_file() and (doc := json.loads(path.read_text()))["settings"] == settings(args):
            if path != archived:
                write_front(doc, archived)
            return doc
    workdirs = train_runs(runs / f"seed_{seed}", args.epochs, seed)
    if workdirs is None:
        return None
    doc = sample_front(workdirs, seed, args)
    doc["train_cpu_s"] = sum(json.loads((w / "cost.json").read_text())["cpu_s"] for w in workdirs.values()
                             if (w / "cost.json").is_file())  # fmt: skip
    write_front(doc, archived)
    return doc


def write_front(doc: dict, path: Path) -> None:
    """A seed's front as JSON (scores to 7 digits): kept in the repository, so a study spans sessions."""
    rows = [{**r, "scores": {n: [float(f"{x:.7g}") for x in v] for n, v in r["scores"].items()}} for r in doc["rows"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    run_log.replace_atomically(path, lambda f: f.write(json.dumps({**doc, "rows": rows}) + "\n"))


def _key(row: dict) -> str:
    return row["method"] if row["w"] is None else f"{row['method']} w={row['w']:g}"


def _per_prompt(doc: dict, row: dict, reward: str) -> np.ndarray:
    return statistics.prompt_means(doc["prompt_index"], row["scores"][reward], max(doc["prompt_index"]) + 1)


def analyse(fronts: dict[int, dict], n_resamples: int) -> dict:
    """Per row (method, w): the seeds, per-seed means, each reward's mean with its two-level interval, seconds per
    image and the latency against one model (the median of the single-model rows, per seed) over seeds; per interior
    w: the paired MSDDA - Reward Soup differences (same seeds, prompts and noise) and their verdict."""
    seeds = sorted(fronts)
    keys = [_key(r) for r in fronts[seeds[0]]["rows"]]
    table = {}
    for key in keys:
        per_seed, mats = [], {n: [] for n in REWARDS}
        for s in seeds:
            doc = fronts[s]
            row = next(r for r in doc["rows"] if _key(r) == key)
            single = float(np.median([r["seconds_per_image"] for r in doc["rows"] if r["method"] != "msdda"]))
            per_seed.append({"seed": s, **{n: float(np.mean(row["scores"][n])) for n in REWARDS},
                             "seconds_per_image": row["seconds_per_image"],
                             "latency_vs_one_model": row["seconds_per_image"] / single})  # fmt: skip
            for n in REWARDS:
                mats[n].append(_per_prompt(doc, row, n))
        first = next(r for r in fronts[seeds[0]]["rows"] if _key(r) == key)
        table[key] = {
            "method": first["method"],
            "w": first["w"],
            "seeds": seeds,
            "per_seed": per_seed,
            **{n: interval_dict(statistics.bootstrap_ci(np.stack(mats[n]), n_resamples=n_resamples)) for n in REWARDS},
            "latency_vs_one_model": over_seeds([r["latency_vs_one_model"] for r in per_seed], n_resamples),
            "seconds_per_image": float(np.mean([r["seconds_per_image"] for r in per_seed])),
        }
    pairs = {}
    for w in sorted({r["w"] for r in fronts[seeds[0]]["rows"] if r["method"] == "msdda"}):
        if w in (0.0, 1.0):
            continue
        diff = {}
        for n in REWARDS:
            a = np.stack([_per_prompt(fronts[s], _row(fronts[s], "msdda", w), n) for s in seeds])
            b = np.stack([_per_prompt(fronts[s], _row(fronts[s], "reward_soup", w), n) for s in seeds])
            diff[n] = interval_dict(statistics.paired_difference_ci(a, b, n_resamples=n_resamples))
        pairs[f"{w:g}"] = {"w": w, **diff, "verdict": dominance(diff)}
    return {"rows": table, "msdda_minus_reward_soup": pairs}


def _row(doc: dict, method: str, w: float) -> dict:
    return next(r for r in doc["rows"] if r["method"] == method and r["w"] == w)


def dominance(diff: dict[str, dict]) -> str:
    """MSDDA against Reward Soup at one w from the paired differences of the two rewards: ``MSDDA above`` (one
    interval above zero, none below), ``Reward Soup above`` (the reverse), ``a trade`` (one above, one below) or
    ``inconclusive`` (every interval holds zero)."""
    up = [n for n in REWARDS if diff[n]["low"] > 0]
    down = [n for n in REWARDS if diff[n]["high"] < 0]
    if up and down:
        return "a trade"
    return "MSDDA above" if up else "Reward Soup above" if down else "inconclusive"


def claim_verdict(pairs: dict) -> str:
    """ "MSDDA is above Reward Soup": reproduced when it is at every interior w, not reproduced when Reward Soup is
    above or the two trade at some w, inconclusive otherwise."""
    found = [p["verdict"] for p in pairs.values()]
    if found and all(v == "MSDDA above" for v in found):
        return "reproduced"
    return "not reproduced" if {"Reward Soup above", "a trade"} & set(found) else "inconclusive"


def write_report(doc: dict, out: Path) -> None:
    """``pareto.md``, ``pareto.json`` and ``pareto.png`` in ``out`` from :func:`analyse`'s ``doc``."""
    rows, pairs = doc["rows"], doc["msdda_minus_reward_soup"]
    b = doc["budget"]
    lines = [
        "# MSDDA against Reward Soup on the embedded world",
        "",
        f"Written by `python tools/pareto.py`. Per seed ({len(doc['seeds'])}: {doc['seeds']}), two models trained "
        f"{doc['settings']['epochs']} steps each on one reward (LoRA over the world model) and fused with weights "
        f"(w, 1 - w); {doc['settings']['num_prompts']} held-out prompts x {doc['settings']['images_per_prompt']} "
        f"images, {doc['settings']['num_steps']} SDE steps, etas {doc['settings']['etas']} (CLIPScore model, "
        "aesthetic model); the same noise for every row of a seed. Means over seeds with 95% intervals "
        f"({doc['statistics']}). Budget: {b['runs']} training runs and {len(doc['seeds'])} fronts, "
        f"{b['cpu_minutes']:.0f} CPU minutes.",
        "",
        f"**MSDDA is above Reward Soup** (at every interior w): **{doc['verdict']}**.",
        "",
        "| w (CLIPScore model) | MSDDA - Reward Soup: world_clipscore | world_aesthetic | verdict |",
        "| ---: | ---: | ---: | --- |",
    ]
    for w, p in pairs.items():
        lines.append(f"| {w} | {fmt_ci(p['world_clipscore'], 4)} | {fmt_ci(p['world_aesthetic'], 3)} | {p['verdict']} |")
    lines += [
        "",
        "| method | w (CLIPScore model) | world_clipscore | world_aesthetic | ms / image | latency vs one model |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows.values():
        w = "" if r["w"] is None else f"{r['w']:g}"
        lines.append(f"| {r['method']} | {w} | {fmt_ci(r['world_clipscore'], 4)} | {fmt_ci(r['world_aesthetic'], 3)} | "
                     f"{1e3 * r['seconds_per_image']:.1f} | {fmt_ci(r['latency_vs_one_model'], 2)}x |")  # fmt: skip
    lines += [
        "",
        "Per seed:",
        "",
        "| method | w | seed | world_clipscore | world_aesthetic |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows.values():
        w = "" if r["w"] is None else f"{r['w']:g}"
        for x in r["per_seed"]:
            lines.append(f"| {r['method']} | {w} | {x['seed']} | {x['world_clipscore']:.4f} | {x['world_aesthetic']:.3f} |")
    lines += ["", "![Pareto fronts with 95% intervals](pareto.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.md").write_text("\n".join(lines))
    (out / "pareto.json").write_text(json.dumps(doc, indent=1) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.6))

    def errorbar(points, fmt, label):
        x = np.asarray([[p["world_clipscore"][k] for k in ("mean", "low", "high")] for p in points])
        y = np.asarray([[p["world_aesthetic"][k] for k in ("mean", "low", "high")] for p in points])
        ax.errorbar(x[:, 0], y[:, 0], xerr=[x[:, 0] - x[:, 1], x[:, 2] - x[:, 0]],
                    yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]], fmt=fmt, capsize=2, label=label)  # fmt: skip
        return x, y

    for method, fmt in (("msdda", "o-"), ("reward_soup", "s--")):
        points = sorted((r for r in rows.values() if r["method"] == method), key=lambda r: r["w"])
        x, y = errorbar(points, fmt, method)
        for r, xi, yi in zip(points, x, y, strict=True):
            ax.annotate(f"{r['w']:g}", (xi[0], yi[0]), fontsize=7, textcoords="offset points", xytext=(4, 4))
    for r in rows.values():
        if r["w"] is None:
            errorbar([r], "k*" if r["method"] == "base" else "r^", r["method"])
    ax.set_xlabel("world_clipscore")
    ax.set_ylabel("world_aesthetic")
    ax.set_title(f"means over {len(doc['seeds'])} seeds, 95% intervals; labels: w", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/pareto"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--archive", type=Path, default=Path("docs/study/pareto"), help="each seed's front")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8, 1.0])
    parser.add_argument("--etas", type=float, nargs=2, default=[0.8, 1.0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=9999, help="bootstrap resamples per interval")
    parser.add_argument("--compilation-cache", type=Path, default=None, help="default <runs>/xla_cache")
    args = parser.parse_args(argv)
    args.weights, args.etas = list(args.weights), list(args.etas)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if (args.num_prompts * args.images_per_prompt) % args.batch:
        parser.error(f"--num-prompts x --images-per-prompt must be a multiple of --batch ({args.batch})")
    train.enable_compilation_cache(str(args.compilation_cache or args.runs / "xla_cache"))
    fronts = {}
    for seed in range(args.seeds):
        front = front_of_seed(args.runs, seed, args)
        if front is None:
            logging.info("stopped on request: the same command resumes")
            return
        fronts[seed] = front
    doc = {"settings": settings(args), "seeds": sorted(fronts),
           "statistics": f"two-level bootstrap over seeds and prompts, BCa, {args.resamples} resamples",
           "budget": {"runs": len(RUNS) * len(fronts),
                      "cpu_minutes": sum(f.get("train_cpu_s", 0.0) + f["cpu_s"] for f in fronts.values()) / 60},
           **analyse(fronts, args.resamples)}  # fmt: skip
    doc["verdict"] = claim_verdict(doc["msdda_minus_reward_soup"])
    write_report(doc, args.out)
    print((args.out / "pareto.md").read_text())


if __name__ == "__main__":
    main()
