"""MMDiT build options: scanned blocks vs the unrolled loop and every remat policy vs none (values, parameter and
LoRA gradients), the scan groups, the compiled program's size against depth, the attention switch, the errors."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F32_EPS, rel_err, tiny_sd35_transformer_config, trace_cudnn_as_on_an_h200

from marble_jax import throughput
from marble_jax.models import lora, mmdit
from marble_jax.models.sd3_configs import SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER

# MMDiT-X blocks 0-1, plain blocks 2-3, the context-pre-only block 4, RMSNorm q/k: two scanned groups of two and a
# lone last block, the SD3.5-M pattern at depth 5.
CONFIG = dict(tiny_sd35_transformer_config(num_layers=5), dual_attention_layers=(0, 1))
GROUPS = ((0, 2), (2, 4), (4, 5))
SPEC = lora.LoRASpec(rank=2, alpha=6.0)
# Scanned vs unrolled and remat vs none run the same float32 ops in the same order; only XLA's fusion and dot layout
# choices can differ between a loop body and straight-line code (or a rematerialised copy), which reorders a few
# summations. The velocity measured bit-equal (0.0) without LoRA, 1.6e-7 (1.4 F32_EPS) with it; FWD_TOL = 8 F32_EPS
# (9.5e-7) allows a few such reorderings. Gradients are compared as one vector (tree_error: max |difference| over all
# tensors / max |gradient|): each float32 gradient is within E of the exact one, E <= 1.2e-6 per tensor (so also for
# the vector) measured for this model family against float64 in tests/test_mmdit.py, so two of them are <= 2E apart;
# GRAD_TOL = 1e-5 (test_mmdit.py's parity tolerance) leaves >= 4x over 2E. Measured: parameter gradients <= 1.9e-7,
# LoRA gradients <= 2e-7 (per tensor: <= 7.8e-7 and 4.6e-6, the latter in a small LoRA ``a`` gradient with
# cancellation). A block run twice, skipped, run out of order or fed another block's weights moves them by O(1).
FWD_TOL = 8 * F32_EPS
GRAD_TOL = 1e-5
CHECKPOINT = re.compile(r"\b(?:remat2?|checkpoint)\[")  # the primitive's name varies across JAX versions


@functools.cache
def params():
    return mmdit.from_config(CONFIG, key=jax.random.key(0))[1]


def make_inputs(seed: int = 0) -> tuple[np.ndarray, ...]:
    """``latents [2, 4, 6, C]``, ``timestep [2]``, ``context [2, 3, D]``, ``pooled [2, P]``."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((2, 4, 6, CONFIG["in_channels"])).astype(np.float32),
        (1000 * rng.uniform(size=2)).astype(np.float32),
        rng.standard_normal((2, 3, CONFIG["joint_attention_dim"])).astype(np.float32),
        rng.standard_normal((2, CONFIG["pooled_projection_dim"])).astype(np.float32),
    )


WEIGHTS = np.random.default_rng(9).standard_normal((2, 4, 6, CONFIG["out_channels"])).astype(np.float32)


@functools.cache
def value_and_grads(remat: str, scan: bool):
    """``(velocity, d sum(velocity * WEIGHTS) / d params)`` of the build ``(remat, scan)``."""
    apply_fn = mmdit.from_config(CONFIG, key=None, remat=remat, scan_blocks=scan)[0]

    def loss(p, *inputs):
        v = apply_fn(p, *inputs)
        return jnp.sum(v * WEIGHTS), v

    (_, v), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params(), *make_inputs())
    return v, g


def tree_error(ours, ref) -> float:
    """``max |ours - ref| / max |ref|`` over all leaves: the relative error of the gradient as one vector."""
    leaves = zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True)
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in leaves]
    return max(float(np.max(np.abs(a - b))) for a, b in pairs) / max(float(np.max(np.abs(b))) for _, b in pairs)


def worst_tensor(ours, ref) -> float:
    """The largest per-tensor :func:`helpers.rel_err` (printed, for information)."""
    return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True))


def count_scans(fn, *args) -> int:
    return len(re.findall(r"\bscan\[", str(jax.make_jaxpr(fn)(*args))))


def test_block_groups_follow_the_config():
    assert mmdit.block_groups(mmdit.MMDiTConfig.from_dict(SD35_MEDIUM_TRANSFORMER)) == ((0, 13), (13, 23), (23, 24))
    assert mmdit.block_groups(mmdit.MMDiTConfig.from_dict(SD35_LARGE_TRANSFORMER)) == ((0, 37), (37, 38))
    assert mmdit.block_groups(mmdit.MMDiTConfig.from_dict(CONFIG)) == GROUPS


def test_parameter_tree_is_unchanged():
    plain = mmdit.from_config(CONFIG, key=None)[1]
    for kw in (dict(scan_blocks=True), dict(remat="dots", scan_blocks=True, attention="xla")):
        other = mmdit.from_config(CONFIG, key=None, **kw)[1]
        assert jax.tree.structure(other) == jax.tree.structure(plain)
        assert jax.tree.leaves(other) == jax.tree.leaves(plain)


def test_scanned_matches_unrolled():
    """Values and parameter gradients; two scans (one per group of two), the last block called alone."""
    apply_fn = mmdit.from_config(CONFIG, key=None, scan_blocks=True)[0]
    assert count_scans(apply_fn, params(), *make_inputs()) == 2
    v0, g0 = value_and_grads("none", False)
    v1, g1 = value_and_grads("none", True)
    fwd, grad, per = rel_err(v1, v0), tree_error(g1, g0), worst_tensor(g1, g0)
    print(f"scanned vs unrolled: velocity {fwd:.2e}, gradient {grad:.2e} (worst tensor {per:.2e})")
    assert fwd <= FWD_TOL
    assert grad <= GRAD_TOL


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_policy_matches_none(remat, scan):
    v0, g0 = value_and_grads("none", scan)
    v1, g1 = value_and_grads(remat, scan)
    fwd, grad, per = rel_err(v1, v0), tree_error(g1, g0), worst_tensor(g1, g0)
    print(f"remat={remat} scan={scan}: velocity {fwd:.2e}, gradient {grad:.2e} (worst tensor {per:.2e})")
    assert fwd <= FWD_TOL
    assert grad <= GRAD_TOL


@pytest.mark.parametrize(
    "remat, scan, checkpoints",
    [("block", False, 5), ("dots", False, 5), ("block", True, 3), ("dots", True, 3), ("none", True, 0)],
)
def test_remat_checkpoints(remat, scan, checkpoints):
    """One checkpoint per block unrolled; per scan body (two groups) plus the lone last block scanned; "dots" with
    the matmul-saving policy."""
    apply_fn = mmdit.from_config(CONFIG, key=None, remat=remat, scan_blocks=scan)[0]
    inputs = make_inputs()
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.mean(apply_fn(p, *inputs) ** 2)))(params()))
    assert len(CHECKPOINT.findall(jaxpr)) == checkpoints
    policies = re.findall(r"\bpolicy=(\S+)", jaxpr)
    assert len(policies) == checkpoints
    # jax 0.10 prints dots_with_no_batch_dims_saveable as DotsSaveable(only_if_no_batch_dims=True)
    dots = re.compile(r"dots_with_no_batch_dims_saveable|DotsSaveable\(only_if_no_batch_dims=True\)")
    assert all(bool(dots.fullmatch(p)) == (remat == "dots") for p in policies), policies
    assert all((p == "None") == (remat == "block") for p in policies), policies


def test_remat_booleans_and_errors():
    assert mmdit.remat_policy(True) == "block" and mmdit.remat_policy(False) == "none"
    assert [mmdit.remat_policy(r) for r in mmdit.REMAT_POLICIES] == list(mmdit.REMAT_POLICIES)
    with pytest.raises(ValueError, match=r"remat 'full' is not one of \('none', 'block', 'dots'\)"):
        mmdit.from_config(CONFIG, key=None, remat="full")
    with pytest.raises(ValueError, match=r"remat 1 is not one of"):
        mmdit.build(CONFIG, remat=1)
    with pytest.raises(ValueError, match=r"attention implementation 'flash' is not one of"):
        mmdit.from_config(CONFIG, key=None, attention="flash")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="cuDNN runs on a GPU")
def test_attention_implementation_reaches_every_block():
    """ "cudnn" forced on CPU fails in the attention call itself, with attention()'s message."""
    apply_fn = mmdit.from_config(CONFIG, key=None, attention="cudnn", compute_dtype=jnp.bfloat16, scan_blocks=True)[0]
    with pytest.raises(ValueError, match=r"implementation='cudnn' cannot run here: .*the backend is 'cpu'"):
        jax.eval_shape(apply_fn, params(), *make_inputs())


def random_lora(spec: lora.LoRASpec) -> lora.LoRAParams:
    fresh = lora.init_lora(params(), spec, jax.random.key(1))
    keys = jax.random.split(jax.random.key(2), len(fresh))
    b = [0.3 * jax.random.normal(k, ab["b"].shape) for k, ab in zip(keys, fresh.values(), strict=True)]
    return {n: {"a": ab["a"], "b": bn} for (n, ab), bn in zip(fresh.items(), b, strict=True)}


@pytest.mark.parametrize(
    "targets, scans",
    [(lora.JOINT_ATTENTION, 2), (r"transformer_blocks\.[03]\.attn\.to_q", 0)],
    ids=["joint_attention", "some_blocks"],
)
def test_lora_scanned_matches_unrolled(targets, scans):
    """Through lora.with_lora: values and LoRA gradients. The joint-attention targets wrap every block of a group
    alike, so both groups scan; LoRA on blocks 0 and 3 only leaves no two consecutive blocks with equal graphs, so
    every group falls back to plain calls (same values)."""
    spec = dataclasses.replace(SPEC, targets=targets)
    lp = random_lora(spec)
    inputs = make_inputs(seed=1)
    results = []
    for scan in (False, True):
        apply = lora.with_lora(mmdit.build(CONFIG, scan_blocks=scan, remat="block"), spec)
        if scan:
            assert count_scans(apply, params(), lp, *inputs) == scans

        def loss(lp, apply=apply):
            v = apply(params(), lp, *inputs)
            return jnp.sum(v * WEIGHTS), v

        results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(lp))
    (_, v0), g0 = results[0]
    (_, v1), g1 = results[1]
    fwd, grad, per = rel_err(v1, v0), tree_error(g1, g0), worst_tensor(g1, g0)
    print(f"LoRA ({targets}) scanned vs unrolled: velocity {fwd:.2e}, LoRA gradient {grad:.2e} (worst tensor {per:.2e})")
    assert fwd <= FWD_TOL
    assert grad <= GRAD_TOL


def hlo_size(blocks: int, scan: bool) -> tuple[int, int]:
    """``(lines, dot_general ops)`` of the lowered StableHLO of a forward + backward (remat per block) with ``blocks``
    plain blocks of one group (and the context-pre-only last block). Lowering only: nothing is compiled."""
    config = dict(CONFIG, num_layers=blocks + 1, dual_attention_layers=())
    apply_fn, abstract = mmdit.from_config(config, key=None, remat="block", scan_blocks=scan)
    inputs = make_inputs()
    text = jax.jit(jax.grad(lambda p: jnp.mean(apply_fn(p, *inputs) ** 2))).lower(abstract).as_text()
    return text.count("\n"), text.count("stablehlo.dot_general")


def test_compiled_program_does_not_grow_with_depth_when_scanned():
    """4 vs 8 blocks of one group. Unrolled, every block adds its forward, recomputation and backward: the matmuls
    grow in proportion (64 dot_general a block) and the program by ~1300 lines a block (6.4k -> 11.6k lines).
    Scanned, the group is one loop body: the same 134 matmuls at any depth; only the stacking of the weights and the
    slicing of their gradients grow, a few trivial ops per parameter per block (3.4k -> 3.8k lines, 7% of unrolled's
    growth). Asserted: the matmul count is fixed when scanned and grows by 4 blocks' worth unrolled; scanned lines
    grow by < 15% of unrolled's growth."""
    unrolled = {n: hlo_size(n, scan=False) for n in (4, 8)}
    scanned = {n: hlo_size(n, scan=True) for n in (4, 8)}
    print(f"StableHLO (lines, dot_general): unrolled {unrolled}, scanned {scanned}")
    assert scanned[8][1] == scanned[4][1]
    per_block_dots = (unrolled[8][1] - unrolled[4][1]) / 4
    assert per_block_dots >= 10  # >= 10 linears forward alone
    assert unrolled[4][1] >= 4 * per_block_dots
    assert unrolled[8][0] >= 1.4 * unrolled[4][0]
    assert scanned[8][0] - scanned[4][0] < 0.15 * (unrolled[8][0] - unrolled[4][0])


def test_cudnn_path_pads_odd_joint_sequences_in_the_model(monkeypatch):
    """The model's cuDNN path, emulated on CPU: ``jax.nn.dot_product_attention(implementation="cudnn")`` is replaced
    by XLA's kernel behind jax's cuDNN rule under a gradient, even lengths only (the H200 failure: 1229 tokens), with
    float32 compute admitted. The joint sequence here is 6 image + 3 text = 9 tokens, odd. Scanned with remat "dots",
    the velocity, the parameter gradient and the K = 3 per-objective vjp (vmapped over cotangents, as marble mode
    takes it) match the XLA build's within FWD_TOL / GRAD_TOL: the padded key adds an exact zero to each softmax sum,
    so only a changed summation order separates them."""
    from marble_jax.models import attention as attention_module

    real = jax.nn.dot_product_attention
    lengths = []

    def cudnn_as_xla(q, k, v, *args, implementation=None, **kwargs):
        if implementation == "cudnn":
            if q.shape[1] % 2 or k.shape[1] % 2:
                raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}, KV {k.shape[1]}.")
            lengths.append(k.shape[1])
            implementation = "xla"
        return real(q, k, v, *args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_as_xla)
    monkeypatch.setattr(attention_module, "_backend", lambda: "cuda")
    monkeypatch.setattr(attention_module, "cudnn_unsupported", lambda *args, **kwargs: None)
    cotangents = np.random.default_rng(4).standard_normal((3, *WEIGHTS.shape)).astype(np.float32)

    def run(impl: str):
        apply_fn = mmdit.from_config(CONFIG, key=None, remat="dots", scan_blocks=True, attention=impl)[0]
        inputs = make_inputs()
        velocity, vjp = jax.vjp(lambda p: apply_fn(p, *inputs), params())
        return velocity, vjp(WEIGHTS)[0], jax.vmap(vjp)(cotangents)[0]  # d sum(v * WEIGHTS) / d params; K = 3

    padded, plain = run("cudnn"), run("xla")
    assert set(lengths) == {10, 6}  # the joint 9 padded to 10; the dual blocks' image-only attention, 6
    assert rel_err(padded[0], plain[0]) <= FWD_TOL
    assert tree_error(padded[1], plain[1]) <= GRAD_TOL
    assert tree_error(padded[2], plain[2]) <= GRAD_TOL


def test_cudnn_marble_mode_traces_with_jaxs_cudnn_primitives(monkeypatch):
    """The model's real cuDNN path (jax's cuDNN primitives, not an emulation), traced on the CPU with jax's
    cuDNN-version and compute-capability checks answered as on an H200: bf16 compute, scanned with remat "dots",
    odd joint sequence (9 tokens). Marble mode's K = 3 per-objective vjp (vmapped over cotangents) traces, and every
    cuDNN backward call is an unbatched one (batch B, not K B: one per cotangent, ``attention.backward_per_cotangent``);
    jax 0.10.2's own batching rule for that backward fails at trace time here."""
    trace_cudnn_as_on_an_h200(monkeypatch)
    apply_fn, abstract = mmdit.from_config(
        CONFIG, key=None, compute_dtype=jnp.bfloat16, remat="dots", scan_blocks=True, attention="cudnn"
    )
    inputs = make_inputs()

    def per_objective(p, cotangents):
        return jax.vmap(jax.vjp(lambda p: apply_fn(p, *inputs), p)[1])(cotangents)[0]

    cotangents = jax.ShapeDtypeStruct((3, *WEIGHTS.shape), jnp.float32)
    closed = jax.make_jaxpr(per_objective)(abstract, cotangents)
    grads = jax.tree.unflatten(jax.tree.structure(abstract), [v.aval for v in closed.jaxpr.outvars])
    assert jax.tree.map(lambda g, p: g.shape == (3, *p.shape), grads, abstract) == jax.tree.map(lambda p: True, abstract)
    batches = []  # the batch sizes of each cuDNN backward call's [B, L, H, D] operands

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if "dot_product_attention_bwd" in eqn.primitive.name:
                batches.append({v.aval.shape[0] for v in eqn.invars if v.aval.ndim == 4})
            for sub in (j for value in eqn.params.values() for j in throughput.sub_jaxprs(value)):
                walk(sub)

    walk(closed.jaxpr)
    batch = inputs[0].shape[0]
    assert batches and all(sizes == {batch} for sizes in batches), batches  # not K * batch: one call per cotangent
