"""Latency of MSDDA fused sampling against one model, side by side in one run.

    python tools/bench_msdda.py [--batch 8] [--num-steps 10] [--repeats 5]

On the embedded world (its MMDiT with LoRA adapters r 16 on the joint attention, random non-zero factors so the
models differ), jitted, after a warm-up call, the median of ``--repeats`` calls (interleaved across the samplers) of
``--batch`` images with ``--num-steps`` SDE steps: one model (``sampling.sample``, method ``sde``), then M = 2 and
M = 4 models fused by :func:`marble_jax.msdda.fused_sample` (one vmapped network call per step); once for LoRA
adapters over one frozen base, once for M full parameter trees stacked (no LoRA). Prints one row per kind:
milliseconds per image for M = 1, 2, 4 and the ratios to M = 1 (the issue's goal: M = 2 <= 2.1x, M = 4 <= 4.2x; the
paper reports about 2x for two models).
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


def timed(calls: list[tuple], repeats: int) -> list[float]:
    """Median seconds of each ``fn(*args)`` in ``calls`` after a compiling warm-up call, the repeats interleaved
    (round-robin over the calls) so that load from other processes hits every call alike."""
    for fn, args in calls:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), ts in zip(calls, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


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

    def single(velocity):
        return jax.jit(lambda p: sampling.sample(lambda x, t: velocity(p, x, t), x_T, sigmas, method="sde", key=key).latents)

    def fused(velocity):
        return jax.jit(lambda s, w, e: msdda.fused_sample(velocity, s, x_T, sigmas, w, e, key).latents)

    full_trees = [jax.tree.map(lambda x, i=i: x * (1 + 0.01 * i), base) for i in range(4)]
    print(
        f"embedded world, batch {args.batch}, {args.num_steps} SDE steps, {jax.devices()[0].platform}, median of {args.repeats}"
    )
    print(f"{'models':<26}{'M = 1 ms/img':>14}{'M = 2 ms/img':>14}{'M = 4 ms/img':>14}{'M = 2 / M = 1':>15}{'M = 4 / M = 1':>15}")
    for name, velocity, trees in (
        ("LoRA r 16 adapters", lora_velocity, adapters),
        ("full parameter trees", full_velocity, full_trees),
    ):
        many = fused(velocity)
        calls = [(single(velocity), (trees[0],))]
        calls += [(many, (msdda.stack_params(trees[:m]), jnp.full((m,), 1 / m), jnp.linspace(0.7, 1.0, m))) for m in (2, 4)]
        times = timed(calls, args.repeats)
        ms = "".join(f"{1e3 * t / args.batch:>14.2f}" for t in times)
        print(f"{name:<26}{ms}{times[1] / times[0]:>14.2f}x{times[2] / times[0]:>14.2f}x")


if __name__ == "__main__":
    main()
