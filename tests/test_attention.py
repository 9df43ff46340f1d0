"""attention(): the implementations available on CPU (einsum, xla) against a float64 reference and each other, with
bias and mask, in float32 and bfloat16; what "auto" picks for GPU inputs; the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F32_EPS, trace_cudnn_as_on_an_h200

from marble_jax.models.attention import (
    IMPLEMENTATIONS,
    attention,
    choose_implementation,
    cudnn_unsupported,
    even_length_attention,
)

B, LQ, LK, H, D = 2, 5, 7, 3, 8
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7: bf16 keeps 8 significant bits, rounding <= 2^-9 relative


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """q, k, v, a T5-like bias ``[1, H, Lq, Lk]`` and a padding mask ``[B, 1, 1, Lk]`` (no row fully masked)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, 1, 1, LK), bool)
    mask[0, ..., -2:] = False
    mask[1, ..., 0] = False
    return dict(
        q=rng.standard_normal((B, LQ, H, D)).astype(np.float32),
        k=rng.standard_normal((B, LK, H, D)).astype(np.float32),
        v=rng.standard_normal((B, LK, H, D)).astype(np.float32),
        bias=rng.standard_normal((1, H, LQ, LK)).astype(np.float32),
        mask=mask,
    )


def reference(q, k, v, bias=None, mask=None, scale=None) -> np.ndarray:
    """float64 numpy ``softmax(q k^T scale + bias, masked) v``, ``[B, Lq, H, D]``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def float32_bound(q, k, bias=None, scale=None) -> float:
    """A first-order bound on ``max |out - exact| / max |v|`` of a float32 attention (u = F32_EPS / 2).

    Each logit is a float32 dot of D products, scaled, plus the bias: ``|ds| <= (D + 2) u (scale sum_i |q_i k_i| +
    |bias|)``. Softmax moves by ``|dp_j| <= p_j (|ds_j| + sum_k p_k |ds_k|) <= 2 max|ds| p_j`` (plus ~(Lk + 2) u p_j
    for exp and the normalising sum); the output ``sum_j p_j v_j`` is a convex combination of v, so
    ``|do| <= (2 max|ds| + (Lk + 4) u) max|v|``. The condition is carried by ``max|ds|``: large logits, large error."""
    q, k = np.abs(np.asarray(q, np.float64)), np.abs(np.asarray(k, np.float64))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    magnitude = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        magnitude = magnitude + np.abs(np.asarray(bias, np.float64))
    u = F32_EPS / 2
    return float(2 * (q.shape[-1] + 2) * u * magnitude.max() + (k.shape[1] + 4) * u)


def err(ours, ref, v) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(np.asarray(v, np.float64))))


CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "mask": dict(mask=True),
    "bias_mask": dict(bias=True, mask=True),
    "bias_scale1": dict(bias=True, scale=1.0),  # T5: unscaled logits
}


def case_kwargs(x: dict, case: dict) -> dict:
    return dict(
        bias=x["bias"] if case.get("bias") else None, mask=x["mask"] if case.get("mask") else None, scale=case.get("scale")
    )


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_float32_implementations_match_float64(case):
    """einsum and xla (and auto, which is einsum on CPU) against float64, within the derived float32 bound
    (:func:`float32_bound`: 8.3e-6 - 2.2e-5 over these cases, a worst case; measured <= 1.4e-7, and einsum and xla equal
    here); against each other within twice it."""
    x = make_inputs()
    kw = case_kwargs(x, CASES[case])
    ref = reference(x["q"], x["k"], x["v"], **kw)
    bound = float32_bound(x["q"], x["k"], kw["bias"], kw["scale"])
    outs = {}
    for impl in ("einsum", "xla", "auto"):
        out = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, **kw, implementation=impl))(x["q"], x["k"], x["v"])
        assert out.shape == (B, LQ, H, D) and out.dtype == jnp.float32
        e = err(out, ref, x["v"])
        print(f"{case} {impl}: {e:.2e} (bound {bound:.2e})")
        assert e <= bound, (impl, e, bound)
        outs[impl] = np.asarray(out, np.float64)
    assert err(outs["xla"], outs["einsum"], x["v"]) <= 2 * bound
    np.testing.assert_array_equal(outs["auto"], outs["einsum"])  # auto is the einsum path on CPU


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bfloat16_implementations_match_float64(case):
    """bf16 q/k/v (the reference is computed from the same bf16-rounded inputs, so input rounding is not counted).
    Both paths take float32 logits and softmax, then round the probabilities to bf16 before the ``p v`` product and the
    output to bf16: two bf16 roundings of a convex combination of v, <= 2 * 2^-9 max|v| = 3.9e-3, plus the float32
    part (<= 2.2e-5, above). Bound: ``BF16_EPS`` = 2^-7, twice that; measured 1.5e-3 - 3.2e-3 here. An implementation
    that dropped the bias or the mask is off by O(0.1 - 1)."""
    x = make_inputs(seed=1)
    q, k, v = (jnp.asarray(x[n], jnp.bfloat16) for n in "qkv")
    kw = case_kwargs(x, CASES[case])
    ref = reference(q, k, v, **kw)
    outs = {}
    for impl in ("einsum", "xla"):
        out = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, **kw, implementation=impl))(q, k, v)
        assert out.dtype == jnp.bfloat16
        e = err(out, ref, v)
        print(f"{case} bf16 {impl}: {e:.2e}")
        assert e <= BF16_EPS, (impl, e)
        outs[impl] = np.asarray(out, np.float64)
    assert err(outs["xla"], outs["einsum"], v) <= 2 * BF16_EPS


@pytest.mark.parametrize("lengths", [(5, 7), (5, 5), (6, 7), (7, 6)], ids=str)
def test_odd_lengths_padded_to_even_give_the_unpadded_attention_and_gradients(lengths):
    """The cuDNN path's padding (:func:`even_length_attention`), run through XLA here: one zero token where a length is
    odd, the padded key masked by ``key_value_seq_lengths``, the padded query's row dropped. Output against float64
    within :func:`float32_bound`; q, k, v gradients of ``sum(out * w)`` against the unpadded einsum path's within
    ``4 (D + Lk + 4) u`` of the largest gradient (each path's float32 error is at most twice the logits' ``(D + 2) u``
    plus the ``(Lk + 2) u`` of the softmax sums, and they differ by at most both). A padded key left unmasked adds a
    zero logit to every row: an error of O(1 / Lk)."""
    lq, lk = lengths
    x = make_inputs()
    q, k, v = x["q"][:, :lq], x["k"][:, :lk], x["v"][:, :lk]
    if lq > LQ:
        q = np.concatenate([q, x["k"][:, : lq - LQ]], axis=1)
    w = np.random.default_rng(5).standard_normal((B, lq, H, D)).astype(np.float32)
    scale = D**-0.5

    def padded(q, k, v):
        return even_length_attention(q, k, v, scale=scale, implementation="xla")

    def plain(q, k, v):
        return attention(q, k, v, implementation="einsum")

    assert ("pad" in str(jax.make_jaxpr(padded)(q, k, v))) == bool(lq % 2 or lk % 2)
    out = jax.jit(padded)(q, k, v)
    assert out.shape == (B, lq, H, D)
    assert err(out, reference(q, k, v), v) <= float32_bound(q, k)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v) for f in (padded, plain)]
    u = F32_EPS / 2
    for ours, ref in zip(*grads, strict=True):
        scale_of = float(np.max(np.abs(ref)))
        assert float(np.max(np.abs(ours - ref))) <= 4 * (D + lk + 4) * u * scale_of


@pytest.mark.parametrize("lengths", [(5, 7), (6, 6)], ids=str)
def test_vmapped_backward_gives_the_einsum_paths_gradients(lengths):
    """:func:`even_length_attention`'s backward under ``vmap`` (:func:`backward_per_cotangent`), against the unpadded
    einsum path's, each q, k, v gradient within the odd-length test's ``4 (D + Lk + 4) u`` of the largest:

    - over K = 3 cotangents alone (marble mode's per-reward gradients): one backward call per cotangent, in a
      ``scan``;
    - over samples (per-sample gradients, the forward vmapped too): jax's own batching, no loop."""
    lq, lk = lengths
    x = make_inputs()
    rng = np.random.default_rng(6)
    q = rng.standard_normal((B, lq, H, D)).astype(np.float32)
    k, v = x["k"][:, :lk], x["v"][:, :lk]
    if lk > LK:
        k, v = (np.concatenate([a, a[:, : lk - LK]], axis=1) for a in (k, v))
    cotangents = rng.standard_normal((3, B, lq, H, D)).astype(np.float32)

    def per_cotangent(f):
        def run(q, k, v):
            return jax.vmap(jax.vjp(f, q, k, v)[1])(cotangents)

        return run

    def per_sample(f):
        def run(q, k, v):
            one = lambda q, k, v, ct: jax.vjp(f, q[None], k[None], v[None])[1](ct[None])  # noqa: E731
            return [g[:, 0] for g in jax.vmap(one)(q, k, v, cotangents[0])]

        return run

    padded = lambda q, k, v: even_length_attention(q, k, v, scale=D**-0.5, implementation="xla")  # noqa: E731
    plain = lambda q, k, v: attention(q, k, v, implementation="einsum")  # noqa: E731
    u = F32_EPS / 2
    for vmapped, rows, loops in ((per_cotangent, 3, True), (per_sample, B, False)):
        ours, ref = vmapped(padded), vmapped(plain)
        assert ("scan" in str(jax.make_jaxpr(ours)(q, k, v))) == loops
        for got, want in zip(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v), strict=True):
            assert got.shape == want.shape and got.shape[0] == rows
            assert float(np.max(np.abs(got - want))) <= 4 * (D + lk + 4) * u * float(np.max(np.abs(want)))


@pytest.mark.parametrize("length", [9, 10])
def test_cudnn_backward_traces_under_vmapped_cotangents(length, monkeypatch):
    """jax's cuDNN attention, traced (not run) on the CPU with its cuDNN-version and compute-capability checks
    answered as on an H200: ``vmap`` of the vjp over K = 3 cotangents, as marble mode takes it, traces, with the
    cuDNN backward called on unbatched ``[B, L, H, D]`` operands inside a ``scan``. jax 0.10.2's own batching
    rule for that backward fails here, reshaping the ``[K, B, L, H, D]`` cotangent to q's shape."""
    trace_cudnn_as_on_an_h200(monkeypatch)
    q = jnp.ones((2, length, 2, 64), jnp.bfloat16)
    cotangents = jnp.ones((3, *q.shape), jnp.bfloat16)

    def per_reward(q, k, v, cotangents):
        return jax.vmap(jax.vjp(lambda q, k, v: even_length_attention(q, k, v, scale=0.125), q, k, v)[1])(cotangents)

    closed = jax.make_jaxpr(per_reward)(q, q, q, cotangents)
    assert [out.aval.shape for out in closed.jaxpr.outvars] == [cotangents.shape] * 3
    (scan,) = [eqn for eqn in closed.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert scan.params["length"] == 3
    assert "dot_product_attention_bwd" in str(scan.params["jaxpr"])


def test_auto_choice_for_gpu_inputs():
    bf16, fp16, fp32 = jnp.bfloat16, jnp.float16, jnp.float32
    # SD3.5's MMDiT: bf16, 64-wide heads, no bias or mask -> cuDNN flash attention
    assert choose_implementation("gpu", bf16, 64) == "cudnn"
    assert choose_implementation("cuda", fp16, 128) == "cudnn"
    # float32 (cuDNN's kernel is bf16 / fp16 only), the VAE's single 512-wide head, head dims off the rule -> XLA
    assert choose_implementation("gpu", fp32, 64) == "xla"
    assert choose_implementation("gpu", bf16, 512) == "xla"
    assert choose_implementation("gpu", bf16, 60) == "xla"  # not a multiple of 8
    assert choose_implementation("gpu", bf16, 256) == "xla"  # over the 128 that holds on every CUDA GPU
    # bias / mask: over the full [Lq, Lk] with even lengths -> cuDNN; broadcast over a sequence axis or odd -> XLA
    full = dict(q_len=4096 + 206, kv_len=4096 + 206)
    assert choose_implementation("gpu", bf16, 64, bias_shape=(1, 24, 4302, 4302), **full) == "cudnn"
    assert choose_implementation("gpu", bf16, 64, mask_shape=(2, 1, 4302, 4302), **full) == "cudnn"
    assert choose_implementation("gpu", bf16, 64, mask_shape=(2, 1, 1, 4302), **full) == "xla"
    assert choose_implementation("gpu", bf16, 64, bias_shape=(1, 12, 77, 77), q_len=77, kv_len=77) == "xla"
    # other backends
    assert choose_implementation("cpu", bf16, 64) == "einsum"
    assert choose_implementation("tpu", bf16, 64) == "xla"
    assert choose_implementation("rocm", bf16, 64) == "xla"


def test_cudnn_unsupported_reasons():
    assert cudnn_unsupported("gpu", jnp.bfloat16, 64) is None
    assert "CUDA GPU" in cudnn_unsupported("cpu", jnp.bfloat16, 64)
    assert "float32" in cudnn_unsupported("gpu", jnp.float32, 64)
    assert "got 512" in cudnn_unsupported("gpu", jnp.bfloat16, 512)
    assert cudnn_unsupported("gpu", jnp.bfloat16, 256, max_head_dim=256) is None
    assert "even sequence lengths" in cudnn_unsupported("gpu", jnp.bfloat16, 64, bias_shape=(1, 1, 5, 5), q_len=5, kv_len=5)


def test_unknown_implementation():
    x = make_inputs()
    with pytest.raises(ValueError, match=r"unknown implementation 'flash'"):
        attention(x["q"], x["k"], x["v"], implementation="flash")
    assert set(IMPLEMENTATIONS) == {"auto", "cudnn", "xla", "einsum"}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the error is for a backend without cuDNN")
def test_cudnn_forced_on_cpu_says_why():
    x = make_inputs()
    q, k, v = (jnp.asarray(x[n], jnp.bfloat16) for n in "qkv")
    with pytest.raises(ValueError, match=r"implementation='cudnn' cannot run here: .*needs a CUDA GPU; the backend is 'cpu'"):
        attention(q, k, v, implementation="cudnn")


def test_none_means_auto():
    x = make_inputs()
    a = attention(x["q"], x["k"], x["v"], implementation=None)
    np.testing.assert_array_equal(a, attention(x["q"], x["k"], x["v"]))
