"""The epoch update as a program: micro-batches fed by index, the plan lowering the trainer's own step, placement,
full fine-tuning's compute dtype and remat, and the FLOP count behind MFU."""

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_config
from helpers import load_tool, save_tiny_world, trace_cudnn_as_on_an_h200

from marble_jax import balance, experiment, mgda, sharding, throughput, train
from marble_jax.nft_loss import NFTConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_tiny_world(tmp_path_factory.mktemp("tiny_world"))


def _plan_tool():
    return load_tool("plan_sd35")


def _toy_velocity(params, cond):
    """A velocity that mixes nothing across samples: ``v_b = w * x_t,b + t_b + mean(context_b) + mean(pooled_b)``."""
    x_t, t, ctx, pld = cond
    w = 1.0 if params is None else params["w"]
    side = (t + ctx.mean(axis=(1, 2)) + pld.mean(axis=1))[:, None, None, None]
    return w * x_t + side


def _epoch(seed: int, b: int, steps: int, k: int) -> tuple:
    """A synthetic epoch: ``x0 [b, 2, 2, 3]``, ``context [b, 5, 6]``, ``pooled [b, 7]``, ``r [k, b]``, ``t [b, steps]``."""
    keys = jax.random.split(jax.random.key(seed), 5)
    return (jax.random.normal(keys[0], (b, 2, 2, 3)), jax.random.normal(keys[1], (b, 5, 6)),
            jax.random.normal(keys[2], (b, 7)), jax.random.uniform(keys[3], (k, b)),
            jax.random.uniform(keys[4], (b, steps), minval=0.1, maxval=0.9))  # fmt: skip


def test_micro_batch_i_holds_its_rows_timestep_noise_and_frozen_forwards():
    """Micro-batch i = timestep column i // C of the strided chunk i % C: every field against a numpy rebuild."""
    b, mb, steps, k = 12, 4, 3, 2
    x0, context, pooled, r, t_table = _epoch(0, b, steps, k)
    old = {"w": jnp.float32(0.7)}
    micro = train.nft_micro_batches(_toy_velocity, old, x0, context, pooled, (r, r[0]), t_table, jax.random.key(9), mb, kl=True)
    chunks = b // mb
    assert micro.count == steps * chunks
    for i in range(micro.count):
        cond, inputs, r_i, r0_i = jax.jit(micro.get)(jnp.int32(i))
        j, c = i // chunks, i % chunks
        rows = c + chunks * np.arange(mb)
        t = np.asarray(t_table)[rows, j]
        eps = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(9), i), (mb, 2, 2, 3)))
        x_t = (1 - t[:, None, None, None]) * np.asarray(x0)[rows] + t[:, None, None, None] * eps
        np.testing.assert_allclose(inputs.t, t, rtol=0)
        np.testing.assert_allclose(inputs.x0, np.asarray(x0)[rows], rtol=0)
        np.testing.assert_allclose(inputs.x_t, x_t, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cond[2], np.asarray(context)[rows], rtol=0)
        np.testing.assert_allclose(cond[3], np.asarray(pooled)[rows], rtol=0)
        np.testing.assert_allclose(r_i, np.asarray(r)[:, rows], rtol=0)
        np.testing.assert_allclose(r0_i, np.asarray(r)[0, rows], rtol=0)
        side = t + np.asarray(context)[rows].mean(axis=(1, 2)) + np.asarray(pooled)[rows].mean(axis=1)
        np.testing.assert_allclose(inputs.v_old, 0.7 * x_t + side[:, None, None, None], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(inputs.v_ref, 1.0 * x_t + side[:, None, None, None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["weighted_sum", "marble", "marble_gram"])
def test_fed_by_index_equals_the_stacked_micro_batches(mode):
    """The direction from micro-batches made inside the scan equals the one from all of them stacked up front (the
    old feeding), for the three accumulation paths. Same operations in the same order: float32 agreement to a few
    ulps of the sums (bound 1e-5 relative)."""
    b, mb, steps, k = 8, 4, 2, 3
    x0, context, pooled, r, t_table = _epoch(1, b, steps, k)
    params = {"w": jnp.float32(1.3)}
    old = {"w": jnp.float32(1.1)}
    rs = (r,) if mode != "weighted_sum" else (r[0],)
    micro = train.nft_micro_batches(_toy_velocity, old, x0, context, pooled, rs, t_table, jax.random.key(2), mb, kl=True)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[micro.get(jnp.int32(i)) for i in range(micro.count)])
    nft, cfg, state = NFTConfig(beta=0.1), balance.BalanceConfig(mode=mode), mgda.init_state(k)
    run = lambda m: balance.accumulated_direction(_toy_velocity, params, m, state, nft, cfg)  # noqa: E731
    fed, ref = run(micro), run(stacked)
    np.testing.assert_allclose(fed.update["w"], ref.update["w"], rtol=1e-5)
    for name, value in ref.metrics.items():
        if name in ("mgda_gap", "mgda_iterations"):  # the solver's stopping residual: float32 noise near 0
            continue
        np.testing.assert_allclose(fed.metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_plan_lowers_the_program_the_trainer_runs(world, tmp_path, monkeypatch):
    """``tools/plan_sd35.plan`` and ``train.run`` lower the same program (HLO text) for the same config."""
    config = tiny_config.get_config(str(world))
    config.total_epochs = 1
    setup = experiment.build_setup(config)
    lowered = []
    jit_train_step = train.jit_train_step

    def spy(*args, **kwargs):
        step, abstract = jit_train_step(*args, **kwargs)

        def trace(*a):
            traced = step.trace(*a)
            lowered.append((a[-2:], traced.lower().as_text()))
            return traced

        return types.SimpleNamespace(trace=trace), abstract

    monkeypatch.setattr(train, "jit_train_step", spy)
    train.run(setup, config, tmp_path / "run")
    monkeypatch.undo()
    assert [flags for flags, _ in lowered] == [(True, True)]  # step 0: a solve, with diagnostics
    assert _plan_tool().plan(setup, config, solve=True, diagnose=True).hlo == lowered[0][1]


def test_update_memory_does_not_grow_with_timesteps(world):
    """Nothing is stacked per timestep: the planned update's temporaries are the same for 2 and 8 trained timesteps
    (the stacked feeding held T x B copies of x0, noise, x_t, v_old, v_ref and the context: +6 x that here)."""
    tool = _plan_tool()
    config = tiny_config.get_config(str(world))
    config.method, config.diagnostics_every = "weighted_sum", 0
    setup = experiment.build_setup(config)
    temps = {}
    for steps in (2, 8):
        config.sample.update(num_steps=8, timestep_fraction=steps / 8)
        temps[steps] = tool.plan(setup, config, solve=True).temp_bytes
    s = config.sample
    batch = s.prompts_per_epoch * s.images_per_prompt
    per_timestep = batch * 4 * (5 * int(np.prod(setup.latent_shape)) + int(np.prod(setup.text_shape[0])))
    assert abs(temps[8] - temps[2]) < 0.5 * 6 * per_timestep, temps


def test_full_finetuning_computes_in_compute_dtype_with_remat(world):
    """``finetune = "full"`` builds the MMDiT with ``model.compute_dtype`` and ``model.remat`` (it used the pipeline's
    float32, remat-free function)."""
    config = tiny_config.get_config(str(world))
    config.finetune = "full"
    config.model.update(compute_dtype="bfloat16", remat="block")
    setup = experiment.build_setup(config)
    (length, width), pooled = setup.text_shape
    args = (jnp.zeros((2, *setup.latent_shape)), jnp.full((2,), 0.5), jnp.zeros((2, length, width)), jnp.zeros((2, pooled)))

    def program(setup):
        loss = lambda p: jnp.sum(setup.velocity_fn(None, p, *args) ** 2)  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(setup.base_params))

    text = program(setup)
    assert "bf16" in text and ("remat" in text or "checkpoint" in text)
    config.model.update(compute_dtype="", remat="none")
    text = program(experiment.build_setup(config))
    assert "bf16" not in text and "remat" not in text


def test_placement_rule():
    """LoRA: data-parallel with the frozen base replicated in the compute dtype; full fine-tuning: FSDP per host."""
    assert sharding.default_mesh_shape(8, 1, "lora") == (8, 1)
    assert sharding.default_mesh_shape(8, 1, "full") == (1, 8)
    assert sharding.default_mesh_shape(16, 2, "full") == (2, 8)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    tree = {"w": jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16)}
    assert sharding.frozen_shardings(tree, mesh)["w"].spec == jax.sharding.PartitionSpec()
    assert sharding.frozen_shardings(tree, mesh, max_replicated_bytes=1024)["w"] == sharding.param_shardings(tree, mesh)["w"]


def test_frozen_base_is_fed_in_the_compute_dtype(world):
    config = tiny_config.get_config(str(world))
    config.model.compute_dtype = "bfloat16"
    setup = experiment.build_setup(config)
    mesh = train.run_mesh(config)
    _, args = train.jit_train_step(setup, config, train.make_optimizer(config), mesh)
    assert {leaf.dtype for leaf in jax.tree.leaves(args[1])} == {jnp.dtype(jnp.bfloat16)}
    assert args[3].dtype == jnp.bfloat16  # the prompt embeddings too
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(args[1]))
    assert {leaf.dtype for leaf in jax.tree.leaves(args[0].params)} == {jnp.dtype(jnp.float32)}  # trained: fp32


def test_jaxpr_flops_counts_scans_and_remat():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    mm = 2 * 64 * 32 * 16

    def f(a, b):
        body = lambda x, i: (x, jax.checkpoint(lambda a: jnp.tanh(a @ (b + i)))(a))  # noqa: E731
        return jax.lax.scan(body, 0.0, jnp.arange(10.0))[1].sum()

    assert throughput.jaxpr_flops(jax.make_jaxpr(f)(a, b)) == 10 * mm
    # grad w.r.t. a: forward, its rematerialisation and one transposed product per iteration
    assert throughput.jaxpr_flops(jax.make_jaxpr(jax.grad(f))(a, b)) == 30 * mm
    cond = lambda p, a: jax.lax.cond(p, lambda: a @ b, lambda: jnp.zeros((64, 16)))  # noqa: E731
    assert throughput.jaxpr_flops(jax.make_jaxpr(cond)(True, a)) == mm
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((2, 2, 3, 5))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    assert throughput.jaxpr_flops(jax.make_jaxpr(conv)(x, w)) == 2 * (2 * 4 * 4 * 5) * (2 * 2 * 3)


def test_peak_flops_by_device_kind():
    assert throughput.peak_flops(types.SimpleNamespace(device_kind="NVIDIA H200")) == 989e12
    assert throughput.peak_flops(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert throughput.peak_flops(types.SimpleNamespace(device_kind="cpu")) is None
    h200 = [types.SimpleNamespace(device_kind="NVIDIA H200")] * 2
    assert throughput.mfu(0.4 * 2 * 989e12, 1.0, h200) == pytest.approx(0.4)


def test_step_rows_carry_phase_times_and_throughput(world, tmp_path):
    config = tiny_config.get_config(str(world))
    config.total_epochs = 2
    train.run(experiment.build_setup(config), config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("time/encode_s", "time/rollout_s", "time/rewards_s", "time/update_s", "time/step_s"):
            assert 0 <= row[key] <= row["time/step_s"] + 1e-6, (key, row[key])
        batch = config.sample.prompts_per_epoch * config.sample.images_per_prompt
        assert row["throughput/images_per_s"] == pytest.approx(batch / row["time/step_s"])
        assert "mfu/step" not in row  # a CPU has no known peak
    assert "time/checkpoint_s" in rows[-1] and "time/eval_s" in rows[0]


def test_bench_gpu_smoke(capsys):
    """``tools/bench_gpu.py --tiny`` (the H200 benchmark's CPU smoke test) runs the trainer's update, attention and a
    rollout and prints its table."""
    module = load_tool("bench_gpu")
    module.main(["--tiny", "--methods", "weighted_sum,marble_gram", "--reps", "1", "--num-steps", "4"])
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("weighted_sum ", "marble_gram "))]
    assert [row[0] for row in table] == ["weighted_sum", "marble_gram"] and float(table[0][2]) == 1.0
    assert all(float(row[1]) > 0 for row in table)
    assert "attention fwd+bwd: einsum" in out and "images/s" in out and "FAILED" not in out


@pytest.mark.parametrize("size", ["tiny", "sd35_medium"])
def test_bench_gpu_programs_lower_for_cuda_with_cudnn_attention(size, monkeypatch):
    """Every program ``tools/bench_gpu.py`` runs on an H200 (the four update methods, amortised with and without a
    solve, and the rollout), at the tiny size and at its own (SD3.5-M, 512 px, 1024 + 205 tokens, abstract weights:
    nothing is allocated), traced and lowered to StableHLO for CUDA on the CPU, with jax's
    cuDNN-version and compute-capability checks answered as on an H200 and ``auto`` attention choosing as on a CUDA
    GPU: each lowers, with cuDNN's flash-attention custom calls in it (forward everywhere, backward in the updates).
    Only XLA's GPU compilation and the run are left to the device. Two GPU-only failures were found this way:
    jax's cuDNN batching rules take neither marble mode's per-reward cotangents (vmapped alone) nor marble_gram's
    per-sample forward with unbatched sequence lengths."""
    bench_gpu = load_tool("bench_gpu")
    trace_cudnn_as_on_an_h200(monkeypatch)
    tiny = size == "tiny"
    args = types.SimpleNamespace(k=5, batch=16, timesteps=2, train_batch=4, rollout_batch=2, num_steps=2,
                                 resolution=64 if tiny else 512, text_tokens=77 + (8 if tiny else 128))  # fmt: skip
    config = bench_gpu.bench_config(args)
    setup = experiment.abstract_sd3_setup(config, bench_gpu.TINY_TRANSFORMER if tiny else bench_gpu.SD35_MEDIUM_TRANSFORMER)
    programs = {}
    for method in bench_gpu.METHODS:
        for solve in (True, False) if method == "marble_amortized" else (True,):
            programs[method, solve] = bench_gpu.trace_update(setup, config, method, solve)[0]
    mesh = train.run_mesh(config)
    frozen = train.frozen_layout(setup, config, mesh)[0]
    trainable = train.state_layout(setup, config, train.make_optimizer(config), mesh)[0].params
    programs["rollout"] = bench_gpu.trace_rollout(
        setup, config, frozen, trainable, setup.decode_params, args.rollout_batch, jax.random.key(0)
    )[0]
    for name, traced in programs.items():
        hlo = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "__cudnn$fmhaSoftmax(" in hlo, name
        assert ("__cudnn$fmhaSoftmaxBackward" in hlo) == (name != "rollout"), name


def test_full_finetuning_refuses_a_lora_adapter():
    config = tiny_config.get_config()
    config.finetune, config.lora.init_from = "full", "/adapters/run"
    with pytest.raises(ValueError, match=r"config.lora.init_from = '/adapters/run'.*'full'"):
        train.validate(config, 1)


def test_frozen_base_in_bf16_adds_less_error_than_bf16_compute(world):
    """Holding the frozen base in bf16 (``train.place_frozen``) rounds what bf16 compute rounds at use anyway, plus the
    norm scales: its velocity stays closer to the float32-held base's than bf16 compute is to float32 (measured on
    the tiny world: 1.3e-3 against 5.5e-3 relative)."""
    config = tiny_config.get_config(str(world))
    config.model.compute_dtype = "bfloat16"
    setup = experiment.build_setup(config)
    base16 = train.place_frozen(setup, config, train.run_mesh(config))
    trained = setup.init_trainable(setup.base_params, jax.random.key(1))
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), trained)
    (length, width), pooled = setup.text_shape
    k = jax.random.split(jax.random.key(3), 4)
    args = (jax.random.normal(k[0], (4, *setup.latent_shape)), jax.random.uniform(k[1], (4,)),
            jax.random.normal(k[2], (4, length, width)), jax.random.normal(k[3], (4, pooled)))  # fmt: skip
    held32 = setup.velocity_fn(setup.base_params, trained, *args)
    held16 = setup.velocity_fn(base16, trained, *args)
    config.model.compute_dtype = ""
    exact = experiment.build_setup(config).velocity_fn(setup.base_params, trained, *args)
    rel = lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))  # noqa: E731
    assert 0 < rel(held16, held32) < rel(held32, exact)
