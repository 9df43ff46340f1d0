"""Latency of MSDDA fused sampling against one model, side by side in one run.

    python tools/bench_msdda.py [--batch 8] [--num-steps 10] [--repeats 5]

On the embedded world (its MMDiT with LoRA adapters r 16 on the joint attention, random non-zero factors so the
models differ), jitted, after a warm-up call, the median of ``--repeats`` calls of ``--batch`` images with
``--num-steps`` SDE steps: one model (``sampling.sample``, method ``sde``), then M = 2 and M = 4 models fused by
:func:`marble_jax.msdda.fused_sample` (one vmapped network call per step), and M = 2 full parameter trees stacked
(no LoRA). Prints seconds per image and the ratio to one model (the issue's goal: M = 2 <= 2.1x, M = 4 <= 4.2x;
the paper reports about 2x for two models).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from marble_jax import msdda, sampling
from marble_jax.models import lora, mmdit
from marble_jax.world import model as world_model


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    world = world_model.load_world_model()
    base = world.params["mmdit"]
    spec = lora.LoRASpec(rank=16, alpha=16.0, targets=lora.JOINT_ATTENTION)
    lora_apply = lora.with_lora(mmdit.build(world.config["mmdit"]), spec)

    def adapter(i: int):
        fresh = lora.init_lora(base, spec, jax.random.key(i))
        return jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(100 + i), x.shape), fresh)

    adapters = [adapter(i) for i in range(4)]
    context, pooled = world.encode(["a red circle above a blue square"] * args.batch)
    x_T = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
    sigmas = sampling.sigma_schedule(args.num_steps, shift=float(world.config["shift"]))
    key = jax.random.key(1)

    def lora_velocity(params, x, t):
        return lora_apply(base, params, x, 1000 * t, context, pooled)

    def full_velocity(params, x, t):
        return world.apply_fn(params, x, 1000 * t, context, pooled)

    single = jax.jit(lambda p: sampling.sample(lambda x, t: lora_velocity(p, x, t), x_T, sigmas, method="sde", key=key).latents)

    def fused(velocity):
        return jax.jit(lambda s, w, e: msdda.fused_sample(velocity, s, x_T, sigmas, w, e, key).latents)

    fused_lora, fused_full = fused(lora_velocity), fused(full_velocity)
    full_trees = [jax.tree.map(lambda x, i=i: x * (1 + 0.01 * i), base) for i in range(2)]
    rows = [("one model (LoRA)", timed(lambda: single(adapters[0]), args.repeats))]
    for m in (2, 4):
        stacked, w, etas = msdda.stack_params(adapters[:m]), jnp.full((m,), 1 / m), jnp.linspace(0.7, 1.0, m)
        rows.append((f"MSDDA M = {m} (LoRA)", timed(lambda s=stacked, w=w, e=etas: fused_lora(s, w, e), args.repeats)))
    stacked = msdda.stack_params(full_trees)
    rows.append(
        (
            "MSDDA M = 2 (full trees)",
            timed(lambda: fused_full(stacked, jnp.full((2,), 0.5), jnp.asarray([0.8, 1.0])), args.repeats),
        )
    )
    one = rows[0][1]
    print(f"embedded world, batch {args.batch}, {args.num_steps} SDE steps, {jax.devices()[0].platform}")
    print(f"{'sampler':<28}{'ms / image':>12}{'vs one model':>14}")
    for name, t in rows:
        print(f"{name:<28}{1e3 * t / args.batch:>12.2f}{t / one:>13.2f}x")


if __name__ == "__main__":
    main()
