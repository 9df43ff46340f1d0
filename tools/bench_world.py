"""Benchmarks the embedded world's base model: sampling time and held-out rule-reward scores.

    python tools/bench_world.py                       # the shipped checkpoint
    python tools/bench_world.py --ckpt DIR [DIR ...]  # other checkpoints (e.g. pretrain_world.py --save-every)

Time: one batch of 64 images, 10 Euler steps, after compilation (best of ``--repeats``).
Scores: ``--per-kind`` samples of every GenEval tag from the held-out prompts (cycled), scored by
``world_geneval`` partial and strict (reported per tag and as the mean over tags, GenEval's overall), and
``--per-kind`` held-out text prompts (unseen words) scored by ``world_ocr``. 10 Euler steps, fixed seed.

Measured (2-core CPU shared with other jobs; ``pretrain_world.py --seed 0``, batch 64, lr 1e-3; held-out,
``--per-kind 32`` except where noted; training loss is the mean of the last 25 steps):

    steps  loss   geneval partial  geneval strict  ocr
    200    0.221  0.192            0.219           0.039
    400    0.158  0.172            0.263           0.031   (per-kind 64: 0.184 / 0.263 / 0.027)
    800    0.116  0.201            0.247           0.027   (per-kind 64)
    1500   0.091  0.251            0.250           0.023
    2000   0.085  0.198            0.177           0.026
    3000   0.065  0.261            0.177           0.034   (the shipped checkpoint)

The rule scores barely move with training: strict GenEval stays in 0.18-0.26 (single and two objects
partly learned, counting never, colour binding rarely), OCR of unseen words near 0. What does change is
what the samples look like: at 800 steps they are multicoloured 4x4-patch specks that hardly depend on the
prompt; at 3000 steps each prompt's colours are right and the objects are coherent blobs with rough shapes
(``--grid``). The shipped base is the 3000-step one (``pretrain_world.py --steps 3000``, about 40 minutes
here): conditioned enough that the dense rewards see the prompt, still far from the rules (every reward keeps
headroom). Sampling 64 images x 10 Euler steps: 2.1 s after an 8 s first call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from marble_jax import rewards
from marble_jax.image_grid import save_grid
from marble_jax.rewards.geneval_rules import TAGS
from marble_jax.world import model as world_model
from marble_jax.world import scenes


def sample_prompts(world: world_model.WorldModel, prompts: list[str], key: jax.Array, batch: int = 64, **kw) -> np.ndarray:
    """uint8 ``[len(prompts), 32, 32, 3]`` samples, ``batch`` at a time (the last batch padded)."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        context, pooled = world.encode(chunk + chunk[-1:] * (batch - len(chunk)))
        out.append(np.asarray(world.sample(world.params, context, pooled, jax.random.fold_in(key, i), **kw))[: len(chunk)])
    return np.concatenate(out)


def heldout_scores(world: world_model.WorldModel, per_kind: int = 32, seed: int = 0, num_steps: int = 10) -> dict[str, float]:
    """``geneval_partial``, ``geneval_strict`` (means over tags), ``geneval_strict/<tag>`` and ``ocr`` on held-out prompts."""
    chosen = []
    for kind in (*TAGS, "text"):
        pool = scenes.split_prompts("heldout", (kind,))
        chosen += [pool[i % len(pool)] for i in range(per_kind)]
    images = sample_prompts(world, [p.text for p in chosen], jax.random.key(seed), num_steps=num_steps)
    texts, metas, kinds = [p.text for p in chosen], [p.metadata for p in chosen], np.array([p.kind for p in chosen])
    partial = rewards.get("world_geneval")(images, texts, metas)
    strict = rewards.get("world_geneval", strict=True)(images, texts, metas)
    ocr = rewards.get("world_ocr")(images, texts, metas)
    out = {
        "geneval_partial": float(np.mean([partial[kinds == t].mean() for t in TAGS])),
        "geneval_strict": float(np.mean([strict[kinds == t].mean() for t in TAGS])),
        "ocr": float(ocr[kinds == "text"].mean()),
    }
    out.update({f"geneval_strict/{t}": float(strict[kinds == t].mean()) for t in TAGS})
    return out


def sampling_time(world: world_model.WorldModel, batch: int = 64, num_steps: int = 10, repeats: int = 3) -> tuple[float, float]:
    """``(compile + first run, best later run)`` seconds to sample ``batch`` images."""
    context, pooled = world.encode(["a red circle and a blue bar"] * batch)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        world.sample(world.params, context, pooled, jax.random.key(i), num_steps=num_steps).block_until_ready()
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def sample_grid(world: world_model.WorldModel, path: Path, per_kind: int = 6, scale: int = 4, seed: int = 0) -> None:
    """PNG: for each prompt kind two rows over ``per_kind`` held-out prompts, the generator's
    ground-truth render above the base model's sample (10 Euler steps), each image ``scale`` x."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in scenes.KINDS:
        pool = scenes.split_prompts("heldout", (kind,))
        chosen = [pool[i % len(pool)] for i in range(per_kind)]
        truth = scenes.render_batch([scenes.make_scene(p, rng) for p in chosen])
        rows += [truth, sample_prompts(world, [p.text for p in chosen], jax.random.key(seed))]
    save_grid(np.concatenate(rows), path, cols=per_kind, scale=scale, pad=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, nargs="*", default=[None])
    parser.add_argument("--per-kind", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--grid", type=Path, help="write a PNG of held-out samples per prompt kind here")
    args = parser.parse_args(argv)
    for ckpt in args.ckpt:
        world = world_model.load_world_model(ckpt)
        n_params = sum(x.size for x in jax.tree.leaves(world.params))
        steps = world.config.get("training", {}).get("steps")
        print(f"{ckpt or world_model.ASSETS}: {n_params:,} parameters, {steps} training steps", flush=True)
        if not args.no_time:
            first, best = sampling_time(world, repeats=args.repeats)
            print(f"  sample 64 images x 10 euler steps: {best:.2f}s (first call incl. compile {first:.1f}s)", flush=True)
        if args.grid:
            sample_grid(world, args.grid)
            print(f"  wrote {args.grid}", flush=True)
        scores = heldout_scores(world, args.per_kind)
        print("  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
