"""Training-step cost of the update modes, side by side: weighted sum, MARBLE, amortised MARBLE, MARBLE from
per-sample gradients (``marble_gram``).

    python tools/bench_balance.py [--ks 5,16] [--solve-every 10] [--repeats 10]
    python tools/bench_balance.py --network world_train      # the trainer's real step on the embedded world
    python tools/bench_balance.py --kl-beta 0                 # without the KL-to-reference term

For each K, one jitted training step per mode (direction + AdamW with global-norm clipping),
timed in the same run, on LoRA (r = 32, the joint attention) over a frozen 12.6M-parameter
MMDiT-X (``--network mmdit_lora``, as the paper trains SD3.5-M) or with full fine-tuning of an
8M-parameter velocity MLP (``--network mlp``). Printed per mode: time per step,
throughput ratio to the weighted sum, the FLOP bound of that ratio from XLA's
``cost_analysis()`` of the compiled steps (and the analytic count: one shared forward plus
R backward rows, a backward ~ 2 forwards), and the ratio of peak temporary + output memory
from ``memory_analysis()``. ``marble_amortized`` is one solve step and N - 1 cached steps; the
``row_chunk=1`` rows run the K + 1 backward rows one at a time (``BalanceConfig.row_chunk``),
trading batching for memory. ``marble_gram`` solves exactly at every step from per-sample gradients: one forward
and 2 backward rows per sample (3 with the KL term) for any K, analytic bound ``3 / (1 + 2 x rows)``.

``--network world_train`` times the trainer's own jitted update (``train.make_train_step``: advantages, the
micro-batched NFT loss over the sampler timesteps, the balance, AdamW, old / EMA updates) on the embedded world
at the ``configs/k5.py`` scale, on one real epoch of rollouts and rewards, and the epoch's rollout + reward
time, so the ratios are given for the update alone and for the whole iteration (rollout + rewards + update).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from marble_jax import balance, mgda
from marble_jax.models import lora, mmdit
from marble_jax.models.toy import make_velocity_mlp
from marble_jax.nft_loss import NFTConfig, NFTInputs, noisy_latents

BATCH = 8
MLP = dict(shape=(16, 16, 4), cond=64, width=1536, depth=3)
MMDIT = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    num_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=256,
    caption_projection_dim=256,
    pooled_projection_dim=256,
    out_channels=16,
    pos_embed_max_size=16,
    dual_attention_layers=(0, 1),
    qk_norm="rms_norm",
)


def build(network: str, k: int):
    """``(net(trainable, x_t, timestep, c) -> v, trainable params, base parameter count, inputs, r, c)``; ``c`` the
    per-sample conditioning (leading axis B)."""
    ks = jax.random.split(jax.random.key(1), 6)
    if network == "mlp":  # full fine-tuning of a velocity MLP
        apply_fn, params = make_velocity_mlp(jax.random.key(0), MLP["shape"], MLP["cond"], MLP["width"], MLP["depth"])
        c = jax.random.normal(ks[3], (BATCH, MLP["cond"]))
        net = apply_fn
        trainable, n_base, shape = params, sum(x.size for x in jax.tree.leaves(params)), MLP["shape"]
    else:  # LoRA (r = 32 on the joint attention) over a frozen MMDiT-X, as the paper trains
        _, base = mmdit.from_config(MMDIT, key=jax.random.key(0))
        spec = lora.LoRASpec()
        trainable = jax.tree.map(lambda x: x + 0.01, lora.init_lora(base, spec, jax.random.key(2)))
        lora_apply = lora.with_lora(mmdit.build(MMDIT), spec)
        context = jax.random.normal(ks[3], (BATCH, 32, MMDIT["joint_attention_dim"]))
        pooled = jax.random.normal(ks[5], (BATCH, MMDIT["pooled_projection_dim"]))
        c = (context, pooled)
        net = lambda p, x, ts, cc: lora_apply(base, p, x, ts, *cc)
        n_base, s = sum(x.size for x in jax.tree.leaves(base)), MMDIT["sample_size"]
        shape = (s, s, MMDIT["in_channels"])
    x0 = jax.random.normal(ks[0], (BATCH, *shape))
    t = jax.random.uniform(ks[1], (BATCH,), minval=0.05, maxval=0.95)
    x_t = noisy_latents(x0, jax.random.normal(ks[2], x0.shape), t)
    v = net(trainable, x_t, 1000 * t, c)
    inputs = NFTInputs(x0, x_t, t, v + 0.01, v - 0.01)
    r = jax.random.uniform(ks[4], (k, BATCH))
    return net, trainable, n_base, inputs, r, c


def make_step(net, mode: str, solve: bool, nft: NFTConfig, tx, row_chunk: int | None = None):
    cfg = balance.BalanceConfig(mode=mode, row_chunk=row_chunk)

    def step(params, opt_state, mstate, inputs, r, c):
        velocity_fn = lambda p, cond: net(p, cond[0], 1000 * cond[1], cond[2])  # noqa: E731
        rr = jnp.mean(r, axis=0) if mode == "weighted_sum" else r
        one = jax.tree.map(lambda x: x[None], ((inputs.x_t, inputs.t, c), inputs, rr))  # one micro-batch
        d = balance.accumulated_direction(velocity_fn, params, one, mstate, nft, cfg, solve=solve)
        params, opt_state = balance.optimizer_step(tx, params, opt_state, d)
        return params, opt_state, d.state

    return jax.jit(step, donate_argnums=(0, 1))


def prepare(fn, args) -> tuple[Callable[[], None], float, float]:
    """``(run, XLA flops, peak temp + output bytes)`` of a jitted step; ``run()`` does one step (warmed up here) and
    carries its outputs (params, optimizer and MGDA state) into the next call."""
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    state = list(args)

    def run() -> None:
        out = compiled(*state)
        jax.block_until_ready(out)
        state[: len(out)] = out

    run()
    return run, float(cost.get("flops", 0.0)), float(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def interleaved_best(
    runs: dict[str, Callable[[], None]],
    repeats: int,
    warm_up: bool = False,
    settle: float = 0.0,
    rewarm: bool = False,
) -> dict[str, float]:
    """Best seconds per call of each ``run``, the modes taking turns in every repeat (so a slow spell of a shared
    machine hits all of them, not one); ``warm_up``: one untimed call of each first (compilation); ``settle``: seconds
    of untimed sleep before each call, so that the thread pools of the call before (OpenBLAS's, torch's, XLA's spin a
    while after their work) are asleep and do not take cores from the next; ``rewarm``: then one untimed call of the
    same run right before the timed one, so that its own thread pool is awake, as in a training loop where the step
    follows the same library's backward pass."""
    for run in runs.values() if warm_up else ():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(settle)
            if rewarm:
                run()
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def world_train(repeats: int, kl_beta: float) -> None:
    """The trainer's update per method on one real epoch of the embedded world (see the module doc)."""
    import numpy as np

    from marble_jax import defaults, experiment, train

    config = defaults.with_rewards(defaults.get_config("world"), defaults.FIVE_REWARDS["world"])
    config.nft.kl_beta = kl_beta
    setup = experiment.build_setup(config)
    s = config.sample
    idx = np.arange(s.prompts_per_epoch)
    prompts = [setup.train_prompts[i] for i in idx for _ in range(s.images_per_prompt)]
    context, pooled = setup.encode([p.text for p in prompts])
    rollout = jax.jit(train.make_rollout(setup, config))
    tx = train.make_optimizer(config)
    state = train.fresh_state(setup, config, tx)
    args = (setup.base_params, state.old_params, {}, jnp.asarray(context), jnp.asarray(pooled), jax.random.key(0))
    x0, images = jax.block_until_ready(rollout(*args))
    start = time.perf_counter()
    x0, images = jax.block_until_ready(rollout(*args))
    texts, meta = [p.text for p in prompts], [p.metadata for p in prompts]
    rewards = np.stack([fn(np.asarray(images), texts, meta) for fn in setup.rewards.values()])
    epoch_t = time.perf_counter() - start
    batch = (setup.base_params, x0, jnp.asarray(context), jnp.asarray(pooled), jnp.asarray(rewards), jnp.int32(0))
    weights = jnp.ones((len(config.rewards),), jnp.float32)
    runs = {}
    for name, method, solve in (
        ("weighted_sum", "weighted_sum", True),
        ("marble", "marble", True),
        ("amortized_solve", "marble_amortized", True),
        ("amortized_cached", "marble_amortized", False),
        ("marble_gram", "marble_gram", True),
    ):
        config.method = method
        step = jax.jit(train.make_train_step(setup, config, tx), static_argnums=(8, 9))
        run_state = [jax.tree.map(jnp.copy, state)]

        def run(step=step, solve=solve, run_state=run_state) -> None:
            run_state[0] = jax.block_until_ready(step(run_state[0], *batch, weights, solve, False)[0])

        run()  # compile + warm-up
        runs[name] = run
    times = interleaved_best(runs, repeats)
    n = config.balance.solve_every
    times["marble_amortized"] = (times["amortized_solve"] + (n - 1) * times["amortized_cached"]) / n
    ws = times["weighted_sum"]
    k, t_train = len(config.rewards), train.trained_timesteps(config)
    print(f"embedded world, K = {k}, batch {len(prompts)}, {t_train} timesteps, N = {n}, kl_beta {kl_beta}")
    print(f"rollout + rewards of the epoch: {epoch_t:.2f} s (the same for every method)")
    print(f"{'mode':<20}{'update s':>10}{'update speed':>14}{'iteration speed':>17}")
    for name in ("weighted_sum", "marble", "marble_amortized", "marble_gram"):
        t = times[name]
        print(f"{name:<20}{t:>10.2f}{ws / t:>13.2f}x{(epoch_t + ws) / (epoch_t + t):>16.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="5,16")
    parser.add_argument("--network", choices=("mmdit_lora", "mlp", "world_train"), default="mmdit_lora")
    parser.add_argument("--solve-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kl-beta", type=float, default=NFTConfig.kl_beta, help="0: no KL term (2 rows for marble_gram)")
    args = parser.parse_args()
    if args.network == "world_train":
        world_train(args.repeats, args.kl_beta)
        return
    nft = NFTConfig(beta=0.1, kl_beta=args.kl_beta)
    n = args.solve_every
    print(f"devices: {jax.devices()}  network: {args.network}, batch {BATCH}, kl_beta {nft.kl_beta}")
    for k in (int(x) for x in args.ks.split(",")):
        net, params, n_base, inputs, r, c = build(args.network, k)
        n_train = sum(x.size for x in jax.tree.leaves(params))
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=1e-4))
        prepared = {}
        for name, mode, solve, chunk in (
            ("weighted_sum", "weighted_sum", True, None),
            ("marble", "marble", True, None),
            ("marble_chunk1", "marble", True, 1),
            ("amortized_cached", "marble_amortized", False, None),
            ("marble_gram", "marble_gram", True, None),
        ):
            fn = make_step(net, mode, solve, nft, tx, chunk)
            p = jax.tree.map(jnp.copy, params)
            prepared[name] = prepare(fn, (p, tx.init(p), mgda.init_state(k), inputs, r, c))
        best = interleaved_best({name: run for name, (run, _, _) in prepared.items()}, args.repeats)
        results = {name: (best[name], flops, mem) for name, (_, flops, mem) in prepared.items()}
        ws_t, ws_f, ws_m = results["weighted_sum"]
        mb_t, mb_f, mb_m = results["marble"]
        # XLA's cost_analysis counts a while loop's body once: the chunked solve has marble's FLOPs.
        c1_t, _, c1_m = results["marble_chunk1"]
        c1_f = mb_f
        ca_t, ca_f, ca_m = results["amortized_cached"]
        gr_t, gr_f, gr_m = results["marble_gram"]
        gram_rows = 3 if nft.kl_beta > 0 else 2  # J_b per sample, h and the KL gradient reduced
        am_t, am_f = (mb_t + (n - 1) * ca_t) / n, (mb_f + (n - 1) * ca_f) / n
        a1_t, a1_f = (c1_t + (n - 1) * ca_t) / n, (c1_f + (n - 1) * ca_f) / n
        rows_full = k + (1 if nft.kl_beta > 0 else 0)
        print(f"\nK = {k}, {n_base / 1e6:.1f}M parameters ({n_train / 1e6:.2f}M trained), N = {n}")
        print(f"{'mode':<20}{'ms/step':>9}{'speed':>8}{'XLA bound':>11}{'analytic':>10}{'of bound':>10}{'memory':>8}")
        for name, t, f, mem, analytic in (
            ("weighted_sum", ws_t, ws_f, ws_m, 1.0),
            ("marble", mb_t, mb_f, mb_m, 3 / (1 + 2 * rows_full)),
            ("marble_amortized", am_t, am_f, max(mb_m, ca_m), 3 * n / (3 * (n - 1) + 1 + 2 * rows_full)),
            ("marble row_chunk=1", c1_t, c1_f, c1_m, 3 / (1 + 2 * rows_full)),
            ("amortized chunk=1", a1_t, a1_f, max(c1_m, ca_m), 3 * n / (3 * (n - 1) + 1 + 2 * rows_full)),
            ("marble_gram", gr_t, gr_f, gr_m, 3 / (1 + 2 * gram_rows)),
        ):
            speed, bound = ws_t / t, ws_f / f
            print(
                f"{name:<20}{1e3 * t:>9.2f}{speed:>7.2f}x{bound:>10.2f}x{analytic:>9.2f}x{speed / bound:>9.0%}{mem / ws_m:>7.2f}x"
            )


if __name__ == "__main__":
    main()
