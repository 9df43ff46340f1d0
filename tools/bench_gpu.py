"""The SD3.5-M training epoch's pieces on one accelerator, with random weights, side by side in one run.

    python tools/bench_gpu.py                 # SD3.5-M at 512 px, bf16 (sized for < 8 minutes on one H200)
    python tools/bench_gpu.py --tiny          # a tiny MMDiT at 64 px: the CPU smoke test of this script

Rows, in the order they run:

* the bf16 8192^3 matrix product's rate, the ceiling measured on this device (MFU is against the datasheet peak);
* attention at the MMDiT's shapes (joint image + text tokens, 24 heads of 64, bf16, forward and backward): cuDNN
  flash against XLA on a GPU (einsum against XLA elsewhere);
* the trainer's update (``train.jit_train_step``, the program ``train.run`` compiles) of ``weighted_sum``,
  ``marble_gram`` and ``marble_amortized`` at N = 10 (one solve and nine cached steps: ``(t_solve + 9
  t_cached) / 10``), then the rollout below, then ``marble`` (a solve, K = 5, not in the acceptance), on an
  epoch of ``--batch`` samples x ``--timesteps`` trained timesteps in micro-batches of ``--train-batch``: median
  seconds, the ratio to the weighted sum (its time over theirs), MFU
  (``throughput.jaxpr_flops`` over the time and the device's bf16 peak), and peak device memory
  (``device.memory_stats()``, the process's high-water mark so far) with XLA's temporaries for the program;
* a ``--num-steps``-step DPM-2 rollout of ``--rollout-batch`` images, the SD3 VAE decode included, in images/s.

It imports only what an accelerator image has (jax, flax, optax, numpy, orbax) plus ml_collections, a small
pure-Python wheel to carry where the image lacks it (``pip download --no-deps ml_collections -d .whl``, then
``pip install --no-deps --target /tmp/site .whl/*.whl`` there): no clu, tensorflow or torch. Use the image's
flax: flax 0.12.8, our CPU pin, does not import under jax 0.11 (``jax.experimental.hijax`` has no
``HiPrimitive``).

Each row runs guarded: one that fails prints its error and the next runs. On an H200 (2026-12-04) the set-up,
the bf16 matrix product and the rollout took 63 s together; the update and attention rows failed on cuDNN's
refusal of odd sequence lengths under a gradient, which ``attention`` now pads around. Every program here is
lowered for CUDA on the CPU by ``tests/test_epoch_program.py`` (cuDNN attention included), so a trace- or
lowering-time failure shows there, before a device is spent on it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import statistics
import time
import traceback

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from marble_jax import defaults, experiment, throughput, train
from marble_jax.models import vae
from marble_jax.models.attention import attention
from marble_jax.models.functional import random_params
from marble_jax.models.sd3_configs import SD3_VAE, SD35_MEDIUM_TRANSFORMER
from marble_jax.pipeline import decode_images

TINY_TRANSFORMER = dict(SD35_MEDIUM_TRANSFORMER, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
                        pos_embed_max_size=16, dual_attention_layers=[0, 1])  # fmt: skip
TINY_VAE = dict(SD3_VAE, block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4)  # fmt: skip
METHODS = ("weighted_sum", "marble_gram", "marble_amortized", "marble")
GB = 1024**3


def bench_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """``k5:sd35`` at the benchmark's sizes: K rewards (names only: the update sees their scores), an epoch of
    ``batch`` samples (2 prompts), ``timesteps`` trained timesteps, ``num_steps`` DPM-2 sampler steps."""
    c = defaults.get_config("sd35")
    c.rewards = tuple(f"reward_{i}" for i in range(args.k))
    c.model.update(path="(random weights)", resolution=args.resolution, max_sequence_length=args.text_tokens - 77)
    c.sample.update(num_steps=args.num_steps, images_per_prompt=args.batch // 2, prompts_per_epoch=2,
                    timestep_fraction=(args.timesteps + 0.5) / args.num_steps, train_batch=args.train_batch,
                    rollout_batch=args.rollout_batch)  # fmt: skip
    c.diagnostics_every = 0
    return c


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` (blocked on its result) over ``reps`` calls after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gb() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / GB


def trace_update(setup, config, method: str, solve: bool) -> tuple:
    """``(traced, config, tx, mesh, args)``: the trainer's update program for ``method`` (``train.jit_train_step``,
    the program ``train.run`` compiles) traced on its abstract arguments ``args`` (static flags excluded)."""
    config = copy.deepcopy(config)
    config.method = method
    mesh = train.run_mesh(config)
    tx = train.make_optimizer(config)
    step, args = train.jit_train_step(setup, config, tx, mesh)
    return step.trace(*args, solve, False), config, tx, mesh, args


def update_row(setup, config, method: str, solve: bool, reps: int, key) -> dict:
    """Time, FLOPs, memory and compile time of one update program."""
    start = time.perf_counter()
    traced, config, tx, mesh, args = trace_update(setup, config, method, solve)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    state_sh = jax.tree.map(lambda a: a.sharding, args[0])
    state = train.fresh_state(setup, config, tx, state_sh)
    base = train.place_frozen(setup, config, mesh)
    x0, context, pooled, rewards, active, weights = args[2:]
    keys = jax.random.split(key, 4)
    data = [jax.random.normal(kk, a.shape, a.dtype) for kk, a in zip(keys[:3], (x0, context, pooled), strict=True)]
    data += [jax.random.uniform(keys[3], rewards.shape), jnp.zeros((), jnp.int32), jnp.ones(weights.shape, jnp.float32)]
    data = [jax.device_put(x, a.sharding) for x, a in zip(data, args[2:], strict=True)]
    box = [state]

    def run():
        box[0], metrics = compiled(box[0], base, *data)
        return metrics

    seconds = timed(run, reps)
    flops = throughput.jaxpr_flops(traced.jaxpr)
    mem = compiled.memory_analysis()
    return dict(seconds=seconds, flops=flops, compile_s=compile_s, temp_gb=mem.temp_size_in_bytes / GB, peak_gb=peak_memory_gb())


def attention_rows(args: argparse.Namespace, reps: int) -> dict[str, float]:
    """Seconds of attention forward + backward at the MMDiT's shapes, per implementation available here."""
    heads, head_dim = (24, 64) if not args.tiny else (2, 16)
    tokens = (args.resolution // 16) ** 2 + args.text_tokens
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (args.train_batch, tokens, heads, head_dim), jnp.bfloat16) for kk in keys)
    gpu = jax.default_backend() in ("gpu", "cuda")
    out = {}
    for impl in ("xla", "cudnn") if gpu else ("einsum", "xla"):
        loss = lambda q, k, v, impl=impl: attention(q, k, v, implementation=impl).astype(jnp.float32).sum()  # noqa: E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        out[impl] = timed(lambda grad=grad: grad(q, k, v), reps)
    return out


def matmul_rate(reps: int) -> float:
    """FLOP/s of an 8192^3 bf16 matrix product (1024^3 on a CPU): the ceiling measured here."""
    n = 8192 if jax.default_backend() != "cpu" else 1024
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(2)))
    product = jax.jit(jnp.matmul)
    return 2 * n**3 / timed(lambda: product(a, b), reps)


def guarded(name: str, fn, *args):
    """``fn(*args)``, or None after printing why it failed: one failing row must not cost the others on a lent
    machine, where there is time for one run."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - the row's error is reported, and the next row runs
        print(f"  {name} FAILED: {type(error).__name__}: {str(error)[:2000]}", flush=True)
        traceback.print_exc(limit=-6)
        return None


def trace_rollout(setup, config, frozen, trainable, vae_params, batch: int, key) -> tuple:
    """``(traced, args)``: the rollout program (``train.make_rollout``) of ``batch`` images with zero bf16 prompt
    embeddings, traced on ``args``; the weights may be arrays or ``ShapeDtypeStruct``."""
    (length, width), pooled_dim = setup.text_shape
    ctx = jnp.zeros((batch, length, width), jnp.bfloat16)
    pooled = jnp.zeros((batch, pooled_dim), jnp.bfloat16)
    args = (frozen, trainable, vae_params, ctx, pooled, key)
    return jax.jit(train.make_rollout(setup, config)).trace(*args), args


def rollout_row(setup, config, args: argparse.Namespace, vae_params, key) -> dict:
    """Seconds and MFU of a ``--num-steps``-step rollout of ``--rollout-batch`` images with the VAE decode."""
    mesh = train.run_mesh(config)
    trainable = train.make_init_state(setup, config, train.make_optimizer(config))(setup.base_params).params
    frozen = train.place_frozen(setup, config, mesh)
    start = time.perf_counter()
    traced, inputs = trace_rollout(setup, config, frozen, trainable, vae_params, args.rollout_batch, key)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    seconds = timed(lambda: compiled(*inputs), args.reps)
    return dict(seconds=seconds, flops=throughput.jaxpr_flops(traced.jaxpr), compile_s=compile_s)


def amortized_row(setup, config, reps: int, key) -> dict:
    """``marble_amortized`` at N = 10: one solving update and nine cached ones, ``(t_solve + 9 t_cached) / 10``."""
    solve = update_row(setup, config, "marble_amortized", True, reps, key)
    cached = update_row(setup, config, "marble_amortized", False, reps, key)
    print(f"    (solving update {solve['seconds']:.3f} s, cached {cached['seconds']:.3f} s)", flush=True)
    return dict(solve, seconds=(solve["seconds"] + 9 * cached["seconds"]) / 10,
                flops=(solve["flops"] + 9 * cached["flops"]) / 10,
                compile_s=solve["compile_s"] + cached["compile_s"])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny MMDiT and VAE (the CPU smoke test)")
    parser.add_argument("--methods", default=",".join(METHODS), help="update rows, run in this order")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="samples in the epoch (2 prompts)")
    parser.add_argument("--timesteps", type=int, default=2, help="trained timesteps per sample")
    parser.add_argument("--train-batch", type=int, default=4, help="samples per micro-batch")
    parser.add_argument("--rollout-batch", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=77 + 128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution, args.text_tokens = 64, 77 + 8
    begin = time.perf_counter()
    device = jax.devices()[0]
    peak = throughput.peak_flops(device)
    print(f"device: {device.device_kind} ({jax.default_backend()}), bf16 peak "
          f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} (datasheet), jax {jax.__version__}, "
          f"flax {flax.__version__}, optax {optax.__version__}", flush=True)  # fmt: skip
    rate = matmul_rate(args.reps)
    print(f"measured bf16 matmul ceiling: {rate / 1e12:.1f} TFLOP/s", flush=True)

    config = bench_config(args)
    transformer, vae_config = (TINY_TRANSFORMER, TINY_VAE) if args.tiny else (SD35_MEDIUM_TRANSFORMER, SD3_VAE)
    setup = experiment.abstract_sd3_setup(config, transformer)
    k_base, k_vae, k_run = jax.random.split(jax.random.key(0), 3)
    base = random_params(setup.base_params, k_base, per_leaf=True)  # drawn on the device
    _, decode_fn, vae_abstract = vae.from_config(vae_config, key=None, dtype=jnp.bfloat16)
    vae_params = random_params(vae_abstract, k_vae, per_leaf=True)
    setup = dataclasses.replace(
        setup, base_params=base, decode_fn=functools.partial(decode_images, decode_fn), decode_params=vae_params
    )
    print(f"epoch: {args.batch} samples x {args.timesteps} timesteps in micro-batches of {args.train_batch}, "
          f"K = {args.k}, {args.resolution} px, {args.text_tokens} text tokens", flush=True)  # fmt: skip

    attn = guarded("attention", attention_rows, args, args.reps)
    if attn:
        fast, slow = ("cudnn", "xla") if "cudnn" in attn else ("einsum", "xla")
        print("attention fwd+bwd: " + "  ".join(f"{k} {1e3 * v:.2f} ms" for k, v in attn.items())
              + f"  ({fast} {attn[slow] / attn[fast]:.2f}x {slow})", flush=True)  # fmt: skip

    header = f"{'row':>18}{'s':>9}{'x weighted_sum':>16}{'MFU':>7}{'TFLOP':>9}{'temp GB':>9}{'peak GB':>9}{'compile s':>11}"

    def update(method: str) -> None:
        if method == "marble_amortized":
            row = guarded(method, amortized_row, setup, config, args.reps, k_run)
        else:
            row = guarded(method, update_row, setup, config, method, True, args.reps, k_run)
        if row:
            rows[method] = row
            mfu = throughput.mfu(row["flops"], row["seconds"], [device])
            print(f"  {method}: {row['seconds']:.3f} s, MFU {100 * mfu:.0f}% ({row['compile_s']:.0f} s to compile, "
                  f"{time.perf_counter() - begin:.0f} s so far)", flush=True)  # fmt: skip

    rows = {}
    methods = args.methods.split(",")
    for method in [m for m in methods if m != "marble"]:  # the rows the acceptance names, first
        update(method)
    roll = guarded("rollout", rollout_row, setup, config, args, vae_params, k_run)
    if roll:
        b = args.rollout_batch
        mfu = throughput.mfu(roll["flops"], roll["seconds"], [device])
        print(f"rollout: {args.num_steps}-step {config.sample.method} of {b} images + VAE decode: "
              f"{roll['seconds']:.2f} s, {b / roll['seconds']:.2f} images/s, MFU {100 * mfu:.0f}% "
              f"({roll['compile_s']:.0f} s to compile)")  # fmt: skip
    for method in [m for m in methods if m == "marble"]:
        update(method)
    print(header)
    ref = rows.get("weighted_sum", next(iter(rows.values()), None))
    for method, row in rows.items():
        mfu = throughput.mfu(row["flops"], row["seconds"], [device])
        print(f"{method:>18}{row['seconds']:>9.3f}{ref['seconds'] / row['seconds']:>16.2f}{100 * mfu:>6.0f}%"
              f"{row['flops'] / 1e12:>9.1f}{row['temp_gb']:>9.2f}{row['peak_gb']:>9.2f}{row['compile_s']:>11.0f}")  # fmt: skip
    print(f"MFU is against the datasheet peak; against the measured matmul ceiling multiply by "
          f"{(peak or float('nan')) / rate:.2f}. total {time.perf_counter() - begin:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
