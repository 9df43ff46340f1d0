"""T5 encoder (transformers' ``T5EncoderModel``, e.g. SD3's T5-v1.1-XXL) in Flax NNX.

Token embedding (no position embedding, no scaling), pre-norm blocks of self-attention and a
feed-forward layer, a final norm. The norm is T5's RMS norm (no mean subtraction, no bias,
variance in float32). Attention logits are not scaled; a learned relative-position bias
(bidirectional log-spaced buckets, one table owned by the first block in torch) is computed once
and added in every block. Feed-forward: ``wo(act(wi_0 x) * wi_1 x)`` for ``gated-*``
(``gated-gelu`` uses the tanh GELU), else ``wo(act(wi x))``. No attention mask: SD3 encodes the
padded sequence as it is.

Mixed precision: every parameter is held in the loader's ``dtype`` except the feed-forward output projections
``wo`` (:data:`KEEP_IN_FLOAT32`), held in at least float32, as transformers keeps them for T5
(``T5PreTrainedModel._keep_in_fp32_modules = ["wo"]``; transformers applies it when loading in float16,
not bfloat16). ``nnx.Linear`` promotes its input to its kernel's dtype, as transformers' feed-forward casts the
hidden state to ``wo.weight.dtype`` before ``wo``, so ``wo`` computes and returns float32; the residual sum
``x + ffn(...)`` then promotes the residual stream to float32 from the first block on, as torch's ``bf16 + fp32``
does. Every norm returns its scale's dtype, so attention, ``wi`` and the output (final norm) are in ``dtype``.
In float16 this is what keeps a large feed-forward output from overflowing; in bfloat16 it keeps the residual
stream's precision (:func:`cast_params` casts a loaded tree the same way).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marble_jax.models.activations import ACTIVATIONS, check_activation
from marble_jax.models.attention import attention
from marble_jax.models.functional import abstract_module, functionalize, path_leaves, random_params
from marble_jax.models.weights import assign, plan_by_path

Array = jax.Array
PyTree = Any
KEEP_IN_FLOAT32 = ("wo",)
"""Modules whose parameters stay in (at least) float32 in a lower-precision T5 (transformers' ``_keep_in_fp32_modules``)."""


def kept_dtype(dtype) -> jnp.dtype:
    """The dtype of a :data:`KEEP_IN_FLOAT32` parameter in a T5 of ``dtype``: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def cast_params(params: PyTree, dtype) -> PyTree:
    """``params`` (a T5 tree) with every floating leaf cast to ``dtype``, those under a :data:`KEEP_IN_FLOAT32`
    module to :func:`kept_dtype` ``(dtype)``; the result has the structure and dtypes of :func:`from_config`'s
    ``(dtype)``. Leaves already in their dtype are returned as they are (no copy)."""

    def cast(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        keys = {getattr(k, "key", getattr(k, "idx", k)) for k in path}
        target = kept_dtype(dtype) if keys & set(KEEP_IN_FLOAT32) else jnp.dtype(dtype)
        return x if x.dtype == target else x.astype(target)

    return jax.tree_util.tree_map_with_path(cast, params)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a transformers ``T5Config`` the encoder uses (its defaults)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> T5Config:
        """Reads a ``T5Config`` dict.

        Raises:
          ValueError: for a ``feed_forward_proj`` that is not ``ACT`` or ``gated-ACT`` with a supported ``ACT``.
        """
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}
        cfg = cls(**kwargs)
        parts = cfg.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5 config: feed_forward_proj {cfg.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        check_activation(cfg.activation, "T5 config feed_forward_proj")
        return cfg

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' rule: ``gated-gelu`` means the tanh approximation (``gelu_new``)."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets ``[L, L]`` (int32) of ``key_pos - query_pos``, in float32 like transformers.

    Half the buckets per direction; of those, half exact offsets and half log-spaced up to ``max_distance``.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    dist = np.abs(rel)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0): only where the exact branch is taken
        log_ratio = np.log(dist.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
        large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ((rel > 0) * half + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, the mean square in float32; ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: Array) -> Array:
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = x.astype(jnp.float32) * jax.lax.rsqrt(variance + self.eps)
        return self.scale[...] * normed.astype(self.scale.dtype)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias; ``[B,L,D] -> [B,L,D]``."""

    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.q = nnx.Linear(cfg.d_model, inner, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.k = nnx.Linear(cfg.d_model, inner, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.v = nnx.Linear(cfg.d_model, inner, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.o = nnx.Linear(inner, cfg.d_model, use_bias=False, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, bias: Array) -> Array:
        """``bias [1,H,L,L]`` added to the logits."""
        b, length, _ = x.shape

        def heads(t: Array) -> Array:
            return t.reshape(b, length, self.num_heads, -1)

        out = attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), bias=bias, scale=1.0)
        return self.o(out.reshape(b, length, -1))


class T5FeedForward(nnx.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``; ``[B,L,D] -> [B,L,D]`` in ``wo``'s dtype
    (:func:`kept_dtype`: the hidden state is promoted to it before ``wo``, as transformers casts it)."""

    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.act = cfg.activation
        self.gated = cfg.gated
        if cfg.gated:
            self.wi_0 = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=False, param_dtype=dtype, rngs=rngs)
            self.wi_1 = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=False, param_dtype=dtype, rngs=rngs)
        else:
            self.wi = nnx.Linear(cfg.d_model, cfg.d_ff, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.wo = nnx.Linear(cfg.d_ff, cfg.d_model, use_bias=False, param_dtype=kept_dtype(dtype), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.act]
        h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
        return self.wo(h)


class T5Block(nnx.Module):
    """``x + attn(norm(x), bias)``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: T5Config, *, dtype, rngs: nnx.Rngs):
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.attn = T5Attention(cfg, dtype=dtype, rngs=rngs)
        self.ffn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.ffn = T5FeedForward(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, bias: Array) -> Array:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nnx.Module):
    """The encoder stack: embedding, blocks sharing one relative-position bias table, final norm."""

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=dtype, rngs=rngs)
        self.relative_attention_bias = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([T5Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, input_ids: Array) -> Array:
        """``input_ids [B,L]`` -> ``last_hidden_state [B,L,D]``."""
        buckets = relative_position_buckets(input_ids.shape[-1], self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias.embedding[buckets].transpose(2, 0, 1)[None]  # [1, H, L, L]
        x = self.embed_tokens(input_ids)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_layer_norm(x)


_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # tied in transformers; a file may hold either or both

# Our module names -> transformers' ``T5EncoderModel`` module paths.
_TORCH_NAMES = {
    "blocks": "encoder.block",
    "attn_norm": "layer.0.layer_norm",
    "attn": "layer.0.SelfAttention",
    "ffn_norm": "layer.1.layer_norm",
    "ffn": "layer.1.DenseReluDense",
    "relative_attention_bias": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",  # owned by block 0
    "final_layer_norm": "encoder.final_layer_norm",
}


def _ignored(key: str) -> bool:
    """Both copies of the tied embedding (the one used is not "unexpected" anyway) and a full model's decoder."""
    return key in _EMBED_KEYS or key.startswith("decoder.")


def from_config(config: Mapping[str, Any], *, key: Array | None, dtype=jnp.float32) -> tuple[Callable, PyTree]:
    """``(apply_fn, params)`` with random params (:func:`~marble_jax.models.functional.random_params`), or
    with ``key=None`` the abstract ``ShapeDtypeStruct`` tree; ``apply_fn(params, input_ids [B,L]) -> [B,L,D]``.
    Parameters in ``dtype``, ``wo`` in :func:`kept_dtype` ``(dtype)`` (see the module doc)."""
    cfg = T5Config.from_transformers(config)
    apply_fn, abstract = functionalize(abstract_module(lambda rngs: T5Encoder(cfg, dtype=dtype, rngs=rngs)))
    return apply_fn, abstract if key is None else random_params(abstract, key)


def from_torch_state(
    config: Mapping[str, Any], state: Mapping[str, np.ndarray], *, source: str, dtype=jnp.float32
) -> tuple[Callable, PyTree]:
    """``(apply_fn, params)`` from a ``T5EncoderModel`` config and state dict;
    ``apply_fn(params, input_ids [B,L]) -> last_hidden_state [B,L,D]``.

    The embedding is read from the first of :data:`_EMBED_KEYS` present; decoder keys (a full T5
    checkpoint) and the second copy of the tied embedding are ignored. Each weight is cast on the host to its
    leaf's dtype (``dtype``; ``wo``: :func:`kept_dtype`), from the file's own values (``wo`` is never rounded
    through ``dtype``).

    Raises:
      WeightError: listing missing / unexpected keys, or naming a key with a wrong shape.
      ValueError: for a config this implementation does not support.
    """
    apply_fn, target = from_config(config, key=None, dtype=dtype)
    embed_key = next((k for k in _EMBED_KEYS if k in state), _EMBED_KEYS[0])
    renames = {**_TORCH_NAMES, "embed_tokens": embed_key.removesuffix(".weight")}
    plan = plan_by_path(target, renames)
    dtypes = dict(path_leaves(target))
    plan = {path: (key, _then_cast(transform, dtypes[path].dtype)) for path, (key, transform) in plan.items()}
    return apply_fn, assign(target, plan, state, source=source, dtype=None, ignore=_ignored)


def _then_cast(transform: Callable[[np.ndarray], np.ndarray], dtype) -> Callable[[np.ndarray], np.ndarray]:
    return lambda value: np.asarray(transform(value)).astype(dtype, copy=False)
