"""Pretrains the embedded world's base model (marble_jax/world/model.py) and writes its checkpoint.

    python tools/pretrain_world.py --steps 3000 --out marble_jax/world/assets --seed 0

Deterministic in ``--seed``: batch ``i`` is ``scenes.sample_scenes(seed * 1_000_003 + i, batch, "train")``
(every prompt kind uniformly), its noise ``fold_in(key, i)``. AdamW with a linear warmup then a constant
learning rate, so a run of N steps is exactly the first N steps of any longer run (``--save-every`` writes those
prefixes, for picking the step count). The step count is chosen to keep the model mediocre on purpose: see
the curve measured in the module docstring of ``tools/bench_world.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from marble_jax.world import model as world_model
from marble_jax.world import scenes

DEFAULT_STEPS = 3000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", type=Path, default=world_model.ASSETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=0, help="also write <out>/step_<n> every n steps (0: never)")
    parser.add_argument("--log-every", type=int, default=25)
    return parser.parse_args(argv)


def batch(seed: int, step: int, size: int, tokenizer, config: dict) -> tuple[jax.Array, jax.Array]:
    """``(x0 [size, 32, 32, 3] in [-1, 1], ids [size, L])`` of training batch ``step``."""
    drawn = scenes.sample_scenes(seed * 1_000_003 + step, size, "train")
    ids = world_model.token_ids(tokenizer, [s.prompt.text for s in drawn], config)
    return world_model.to_pixels(scenes.render_batch(drawn)), jnp.asarray(ids)


def main(argv: list[str] | None = None) -> list[float]:
    """Trains, writes ``--out``; returns the per-step losses."""
    args = parse_args(argv)
    tokenizer = scenes.build_tokenizer(world_model.MAX_LENGTH)
    config = world_model.default_config(tokenizer)
    key = jax.random.key(args.seed)
    mmdit_fn, text_fn, params = world_model.build(config, jax.random.fold_in(key, 0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"world model: {n_params:,} parameters; {args.steps} steps of batch {args.batch}", flush=True)
    warmup = optax.linear_schedule(0.0, args.lr, args.warmup)
    schedule = optax.join_schedules([warmup, optax.constant_schedule(args.lr)], [args.warmup])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x0, ids, step_key):
        loss_fn = lambda p: world_model.flow_matching_loss(mmdit_fn, text_fn, p, x0, ids, step_key)  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_key = jax.random.fold_in(key, 1)
    losses, start, window = [], time.time(), []
    for step in range(args.steps):
        x0, ids = batch(args.seed, step, args.batch, tokenizer, config)
        params, opt_state, loss = train_step(params, opt_state, x0, ids, jax.random.fold_in(train_key, step))
        window.append(loss)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            losses += [float(v) for v in window]
            window = []
            elapsed = time.time() - start
            eta = elapsed / done * (args.steps - done)
            recent = losses[-args.log_every :]
            print(f"step {done}/{args.steps}  loss {sum(recent) / len(recent):.4f}  {elapsed:.0f}s  eta {eta:.0f}s", flush=True)
        if args.save_every and done % args.save_every == 0 and done != args.steps:
            world_model.save_world_model(args.out / f"step_{done}", params, {**config, "training": _meta(args, done)})
    losses += [float(v) for v in window]
    world_model.save_world_model(args.out, params, {**config, "training": _meta(args, args.steps)})
    print(f"wrote {args.out} after {time.time() - start:.0f}s", flush=True)
    return losses


def _meta(args: argparse.Namespace, steps: int) -> dict:
    """The training settings recorded in the checkpoint's JSON config."""
    return {"steps": steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "warmup": args.warmup}


if __name__ == "__main__":
    main()
