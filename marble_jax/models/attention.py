"""Scaled dot-product attention behind one function, so CPU and GPU paths can differ.

Every model calls :func:`attention`. Its ``implementation`` is one of:

- ``"einsum"``: einsum-softmax-einsum in ``[B, H, L, D]`` layout, float32 logits and softmax. On
  CPU it measured about 1.5x faster than ``jax.nn.dot_product_attention`` (DESIGN.md).
- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, XLA's kernel (it materialises
  the full ``[B, H, Lq, Lk]`` logits).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  attention (no ``[B, H, Lq, Lk]`` tensor in memory). CUDA GPUs only.
- ``"auto"`` (default; ``None`` means the same): :func:`choose_implementation` of the backend and
  the inputs: einsum on CPU; on a CUDA GPU cuDNN where it applies, else XLA; XLA elsewhere (TPU, ROCm).

When cuDNN applies (:func:`cudnn_unsupported`; the checks of jax 0.10's
``jax/_src/cudnn/fused_attention_stablehlo.py``: ``check_layout``, ``check_is_flash_attention``):

- q, k, v in bfloat16 or float16 (cuDNN raises for float32);
- head dim a multiple of 8 and at most 128 (cuDNN allows 256 on Hopper and later; ``auto`` keeps the
  bound that holds on every CUDA GPU, so it never depends on the device generation);
- a bias or mask, if any, covering the full ``[Lq, Lk]`` logits (cuDNN does not broadcast the sequence
  axes; its batch and head axes may be 1), with ``Lq`` and ``Lk`` even (cuDNN's backward with a bias
  needs even lengths; auto cannot know whether a gradient follows, so it asks for it always).

Without a bias or mask, odd lengths are padded to even on the cuDNN path (:func:`even_length_attention`):
jax's cuDNN check refuses odd lengths under a gradient even then, and SD3.5's joint sequence is odd at the
sizes it trains (1024 image + 205 or 333 text tokens at 512 px). The same function's backward, vmapped over
cotangents alone (marble mode's K per-reward gradients), runs once per cotangent in a loop
(:func:`backward_per_cotangent`): jax 0.10.2's batching rule for cuDNN's backward cannot take a batched
cotangent with unbatched residuals.

SD3.5's MMDiT (bf16 compute, 64-wide heads, no bias or mask) takes cuDNN; the VAE's single 512-wide
head and any float32 attention take XLA. On the cuDNN path a bias is cast to q's dtype and a mask
becomes a large negative bias in that dtype (as jax does); the einsum and XLA paths add it in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "einsum")
_CUDNN_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128


def _backend() -> str:
    """``jax.default_backend()``, with a GPU named ``"cuda"`` or ``"rocm"`` (cuDNN needs the former)."""
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version or backend == "rocm" else "cuda"
    return backend


def cudnn_unsupported(
    backend: str,
    dtype: Any,
    head_dim: int,
    *,
    q_len: int | None = None,
    kv_len: int | None = None,
    bias_shape: Sequence[int] | None = None,
    mask_shape: Sequence[int] | None = None,
    max_head_dim: int = CUDNN_MAX_HEAD_DIM,
) -> str | None:
    """Why cuDNN flash attention cannot run these inputs (a sentence), or None when it can.

    ``backend``: ``"cuda"`` / ``"gpu"`` (taken as CUDA), ``"rocm"``, ``"cpu"``, ``"tpu"``...;
    ``dtype`` of q, k, v; ``bias_shape`` / ``mask_shape`` as passed to :func:`attention` (broadcastable
    to ``[B, H, Lq, Lk]``; the sequence lengths are needed to judge them).
    """
    if backend not in ("cuda", "gpu"):
        return f"cuDNN flash attention needs a CUDA GPU; the backend is {backend!r}"
    if np.dtype(dtype) not in _CUDNN_DTYPES:
        return f"cuDNN flash attention needs bfloat16 or float16 q/k/v; got {np.dtype(dtype).name}"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and <= {max_head_dim}; got {head_dim}"
    for name, shape in (("bias", bias_shape), ("mask", mask_shape)):
        if shape is None:
            continue
        shape = (1,) * (4 - len(shape)) + tuple(shape)
        if q_len is None or kv_len is None or tuple(shape[-2:]) != (q_len, kv_len):
            full = f"[Lq, Lk] = [{q_len}, {kv_len}]"
            return f"cuDNN flash attention needs a {name} over the full {full} logits; got {name} shape {tuple(shape)}"
        if q_len % 2 or kv_len % 2:
            return f"cuDNN flash attention with a {name} needs even sequence lengths; got Lq {q_len}, Lk {kv_len}"
    return None


def choose_implementation(
    backend: str,
    dtype: Any,
    head_dim: int,
    *,
    q_len: int | None = None,
    kv_len: int | None = None,
    bias_shape: Sequence[int] | None = None,
    mask_shape: Sequence[int] | None = None,
) -> str:
    """The implementation ``"auto"`` picks: ``"einsum"`` on CPU; on a CUDA GPU ``"cudnn"`` where
    :func:`cudnn_unsupported` finds nothing against it, else ``"xla"``; ``"xla"`` on any other backend.
    Pure (no device query), so it can be tested anywhere."""
    if backend == "cpu":
        return "einsum"
    shapes = dict(q_len=q_len, kv_len=kv_len, bias_shape=bias_shape, mask_shape=mask_shape)
    if backend in ("cuda", "gpu") and cudnn_unsupported(backend, dtype, head_dim, **shapes) is None:
        return "cudnn"
    return "xla"


@jax.custom_batching.custom_vmap
def _apply_vjp(vjp_fn: Callable[[Array], tuple[Array, ...]], cotangent: Array) -> tuple[Array, ...]:
    return vjp_fn(cotangent)


@_apply_vjp.def_vmap
def _apply_vjp_vmapped(
    axis_size: int, in_batched: tuple[Any, bool], vjp_fn: Callable, cotangent: Array
) -> tuple[tuple[Array, ...], tuple[bool, ...]]:
    """Residuals vmapped (the forward was): jax's own batching of the backward. Residuals not vmapped (a vmap over
    cotangents alone): one unbatched backward call per cotangent, in a loop."""
    residuals_batched, cotangent_batched = in_batched
    if not cotangent_batched:
        cotangent = jnp.broadcast_to(cotangent, (axis_size, *cotangent.shape))
    if any(jax.tree.leaves(residuals_batched)):
        axes = jax.tree.map(lambda batched: 0 if batched else None, residuals_batched)
        grads = jax.vmap(lambda fn, ct: fn(ct), in_axes=(axes, 0))(vjp_fn, cotangent)
    else:
        grads = jax.lax.map(vjp_fn, cotangent)
    return grads, tuple(True for _ in grads)


def backward_per_cotangent(f: Callable[[Array, Array, Array], Array]) -> Callable[[Array, Array, Array], Array]:
    """``f(q, k, v)`` unchanged, except that its backward pass, vmapped over cotangents alone, runs once per cotangent.

    ``marble`` mode takes the K per-reward gradients as ``vmap(vjp)`` over K cotangents, so the attention's
    backward sees a batched cotangent and unbatched residuals (q, k, v, the forward's output and softmax
    statistics). jax's cuDNN backward batching rule (``_dot_product_attention_bwd_batcher``, jax 0.10.2 and
    0.11.0) folds the vmapped axis into the batch axis of every operand and so cannot take that mix: it fails
    at trace time reshaping the ``[K, B, L, H, D]`` cotangent to q's ``[B, L, H, D]`` (fixed on jax's main
    branch on 2026-07-30, in no release we pin). Here the backward is a ``custom_vjp`` whose application has
    its own vmap rule (``jax.custom_batching.custom_vmap``): with unbatched residuals each cotangent gets the
    unbatched cuDNN backward call in a loop, K calls of B sequences each (B x heads x Lq / 128 tiles: hundreds
    at SD3.5-M's sizes, enough to fill a GPU); where the forward was vmapped too (per-sample gradients), jax's
    own batching rule, one call over the folded batch.
    """

    @jax.custom_vjp
    def wrapped(q: Array, k: Array, v: Array) -> Array:
        return f(q, k, v)

    def forward(q: Array, k: Array, v: Array) -> tuple[Array, Callable]:
        return jax.vjp(f, q, k, v)

    def backward(vjp_fn: Callable, cotangent: Array) -> tuple[Array, ...]:
        return _apply_vjp(vjp_fn, cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped


def even_length_attention(q: Array, k: Array, v: Array, *, scale: float, implementation: str = "cudnn") -> Array:
    """``jax.nn.dot_product_attention`` (no bias or mask) with ``Lq`` and ``Lk`` padded to even lengths, and its
    backward run once per cotangent when vmapped over cotangents alone (:func:`backward_per_cotangent`).

    jax's cuDNN path refuses odd sequence lengths whenever a gradient is taken, with or without a bias:
    ``check_is_flash_attention`` (``jax/_src/cudnn/fused_attention_stablehlo.py``, jax 0.10 and 0.11) is
    handed a placeholder array for an absent bias and counts it as a bias. The SD3.5-M update failed so on
    an H200 at 1229 tokens. Where a length is odd, q, k and v get one zero token at the end; the padded key
    is masked out through ``key_value_seq_lengths`` and the padded query's output row is dropped, so the
    result is that of the unpadded inputs. ``implementation="xla"`` runs the same calls on any backend.

    Args:
      q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, H, D]``.

    Returns:
      ``[B, Lq, H, D]``.
    """
    lq, lk = q.shape[1], k.shape[1]

    def pad(x: Array, length: int) -> Array:
        return jnp.pad(x, ((0, 0), (0, length % 2), (0, 0), (0, 0)))

    def padded(q: Array, k: Array, v: Array) -> Array:
        if lq % 2 == 0 and lk % 2 == 0:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)

        # [B] lengths computed from q, so that they are vmapped wherever q is: jax's cuDNN forward batching rule
        # (jax 0.10.2) reshapes them to the folded batch and fails on unbatched ones (jax's own default for the
        # query's lengths is such a constant, so they are given too: all of the padded query)
        def lengths(n: int) -> Array:
            return jnp.where(jnp.isnan(q[:, 0, 0, 0]), n, n).astype(jnp.int32)

        out = jax.nn.dot_product_attention(
            pad(q, lq),
            pad(k, lk),
            pad(v, lk),
            scale=scale,
            query_seq_lengths=lengths(lq + lq % 2),
            key_value_seq_lengths=lengths(lk),
            implementation=implementation,
        )
        return out[:, :lq]

    return backward_per_cotangent(padded)(q, k, v)


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    implementation: str | None = "auto",
) -> Array:
    """Multi-head attention ``softmax(q k^T * scale + bias) v``.

    Args:
      q: ``[B, Lq, H, D]``.
      k, v: ``[B, Lk, H, D]``, the same dtype as ``q``.
      bias: optional additive logits bias broadcastable to ``[B, H, Lq, Lk]`` (e.g. T5's
        relative position bias).
      mask: optional boolean, broadcastable to ``[B, H, Lq, Lk]``; False positions are excluded.
      scale: logits scale, default ``1 / sqrt(D)`` (T5 uses 1).
      implementation: ``"auto"`` (or None), ``"cudnn"``, ``"xla"`` or ``"einsum"`` (module docstring).

    Returns:
      ``[B, Lq, H, D]`` in ``q``'s dtype; logits and softmax in float32 (einsum, xla; cuDNN inside its kernel).

    Raises:
      ValueError: an unknown ``implementation``, or ``"cudnn"`` where cuDNN cannot run (not a CUDA
        GPU, float32 inputs, an unsupported head dim, bias or mask), saying why.
    """
    if implementation is None:
        implementation = "auto"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation in ("auto", "cudnn"):
        shapes = dict(
            q_len=q.shape[1],
            kv_len=k.shape[1],
            bias_shape=None if bias is None else bias.shape,
            mask_shape=None if mask is None else mask.shape,
        )
        backend = _backend()
        if implementation == "auto":
            implementation = choose_implementation(backend, q.dtype, q.shape[-1], **shapes)
        else:
            # forced: cuDNN's own head-dim limit (256 from Hopper on, else 128) is left to jax to enforce
            reason = cudnn_unsupported(backend, q.dtype, q.shape[-1], max_head_dim=256, **shapes)
            if reason is not None:
                raise ValueError(f"attention: implementation='cudnn' cannot run here: {reason}")
    if implementation == "cudnn":
        if bias is None and mask is None:
            return even_length_attention(q, k, v, scale=scale)
        bias = None if bias is None else bias.astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
