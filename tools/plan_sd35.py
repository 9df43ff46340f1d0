"""Plan the real SD3.5-Medium training step on an 8-device mesh without weights or accelerators.

    python tools/plan_sd35.py [--modes weighted_sum,marble,marble_amortized,marble_gram] [--tuning full,lora]
                              [--per-device-batch 2] [--k 5] [--fsdp 8]

The DiffusionNFT step (the trained, old and reference velocities on one timestep, the update
direction of the balancing mode, global-norm clipping and AdamW) is traced from abstract shapes
(``jax.ShapeDtypeStruct``: no parameter is ever allocated) for SD3.5-M at 512 px (64 x 64 x 16
latents, 77 + 128 text tokens), bf16 compute over fp32 master weights, remat per block, on a
``(data, fsdp)`` mesh of 8 host devices, then lowered and compiled by XLA. Printed per mode:
XLA's per-device memory (arguments, temporaries, output) and FLOPs, and the step time those
FLOPs take on one H200 (989 TFLOP/s dense bf16) at 40% and 60% MFU.

The compiler is XLA:CPU, so the memory figures are its buffer assignment (GPU fusion and
rematerialisation choices differ somewhat); FLOPs are a property of the program.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from marble_jax import balance, mgda, sharding  # noqa: E402
from marble_jax.models import lora, mmdit  # noqa: E402
from marble_jax.models.functional import functionalize  # noqa: E402
from marble_jax.models.sd3_configs import SD35_MEDIUM_TRANSFORMER  # noqa: E402
from marble_jax.nft_loss import NFTConfig, NFTInputs, noisy_latents  # noqa: E402

H200_BF16_FLOPS = 989e12
LATENT = (64, 64, 16)  # 512 px / 8
TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 77 + 128, 4096, 2048


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_step(mode: str, tuning: str, k: int, mesh, batch: int):
    """The jitted step and its abstract arguments."""
    module = mmdit.build(SD35_MEDIUM_TRANSFORMER, dtype=jnp.float32, compute_dtype=jnp.bfloat16, remat=True)
    apply_fn, base = functionalize(module)
    nft = NFTConfig(beta=0.1)
    cfg = balance.BalanceConfig(mode=mode)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4))
    spec = lora.LoRASpec()
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), base)  # frozen bf16 base
    if tuning == "lora":
        trainable = jax.eval_shape(lambda: lora.init_lora(base, spec, jax.random.key(0)))
        lora_apply = lora.with_lora(module, spec)
        net = lambda train, frozen, *a: lora_apply(frozen, train, *a)
        ref = lambda train, frozen, *a: lora_apply(frozen, None, *a)  # LoRA off: the base model
    else:
        trainable = base  # fp32 master weights; the frozen copy is the reference model
        net = lambda train, frozen, *a: apply_fn(train, *a)
        ref = lambda train, frozen, *a: apply_fn(frozen, *a)
    r_shape = (batch,) if mode == "weighted_sum" else (k, batch)

    def step(train, old, frozen, opt_state, mstate, x0, eps, t, context, pooled, r):
        x_t = noisy_latents(x0, eps, t)
        args = (x_t, 1000 * t, context, pooled)
        v_old = jax.lax.stop_gradient(net(old, frozen, *args))
        v_ref = jax.lax.stop_gradient(ref(old, frozen, *args))
        inputs = NFTInputs(x0, x_t, t, v_old, v_ref)
        # one micro-batch; the conditioning travels with each sample (marble_gram runs samples alone)
        velocity = lambda p, c: net(p, frozen, c[0], 1000 * c[1], c[2], c[3])  # noqa: E731
        one = jax.tree.map(lambda x: x[None], ((x_t, t, context, pooled), inputs, r))
        d = balance.accumulated_direction(velocity, train, *one, mstate, nft, cfg)
        train, opt_state = balance.optimizer_step(tx, train, opt_state, d)
        return train, opt_state, d.state

    p_shard = sharding.param_shardings(trainable, mesh)
    f_shard = sharding.param_shardings(frozen, mesh)
    opt = jax.eval_shape(tx.init, trainable)
    o_shard = jax.tree.map(lambda x: sharding.NamedSharding(mesh, sharding.param_spec(x.shape, mesh.shape["fsdp"])), opt)
    mst = jax.eval_shape(lambda: mgda.init_state(k))
    rep = sharding.replicated(mesh)
    bs = lambda nd: sharding.batch_sharding(mesh, nd)
    r_sharding = sharding.NamedSharding(mesh, sharding.PartitionSpec(*([None] * (len(r_shape) - 1)), sharding.BATCH_AXES))
    data = (
        jax.ShapeDtypeStruct((batch, *LATENT), jnp.float32, sharding=bs(4)),
        jax.ShapeDtypeStruct((batch, *LATENT), jnp.float32, sharding=bs(4)),
        jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=bs(1)),
        jax.ShapeDtypeStruct((batch, TEXT_TOKENS, TEXT_DIM), jnp.bfloat16, sharding=bs(3)),
        jax.ShapeDtypeStruct((batch, POOLED_DIM), jnp.bfloat16, sharding=bs(2)),
        jax.ShapeDtypeStruct(r_shape, jnp.float32, sharding=r_sharding),
    )
    args = (
        abstract(trainable, p_shard),
        abstract(trainable, p_shard),
        abstract(frozen, f_shard),
        abstract(opt, o_shard),
        abstract(mst, jax.tree.map(lambda _: rep, mst)),
        *data,
    )
    out_shardings = (p_shard, o_shard, jax.tree.map(lambda _: rep, mst))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    return jax.jit(step, out_shardings=out_shardings, donate_argnums=(0, 3)), args, n_train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="weighted_sum,marble")
    parser.add_argument("--tuning", default="lora,full")
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--fsdp", type=int, default=8)
    args = parser.parse_args()
    mesh = sharding.make_mesh(fsdp=args.fsdp)
    batch = args.per_device_batch * mesh.size
    print(f"mesh {dict(mesh.shape)}, global batch {batch} ({args.per_device_batch} per device), K = {args.k}, 512 px")
    header = ("tuning", "mode", "trainable", "args GB", "temp GB", "out GB", "TFLOP/dev", "ms @40%", "ms @60%", "compile s")
    widths = (7, 15, 11, 9, 9, 8, 11, 9, 9, 11)
    print("".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for tuning in args.tuning.split(","):
        for mode in args.modes.split(","):
            start = time.time()
            fn, fargs, n_train = build_step(mode, tuning, args.k, mesh, batch)
            compiled = fn.lower(*fargs).compile()
            mem = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            flops = float(cost.get("flops", 0.0))
            gb = 1024**3
            row = (
                tuning,
                mode,
                f"{n_train / 1e6:.1f}M",
                f"{mem.argument_size_in_bytes / gb:.2f}",
                f"{mem.temp_size_in_bytes / gb:.2f}",
                f"{mem.output_size_in_bytes / gb:.2f}",
                f"{flops / 1e12:.1f}",
                f"{1e3 * flops / (0.4 * H200_BF16_FLOPS):.0f}",
                f"{1e3 * flops / (0.6 * H200_BF16_FLOPS):.0f}",
                f"{time.time() - start:.0f}",
            )
            print("".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)), flush=True)


if __name__ == "__main__":
    main()
