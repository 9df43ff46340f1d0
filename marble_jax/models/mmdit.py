"""The SD3 / SD3.5 MMDiT (diffusers ``SD3Transformer2DModel``) as a Flax NNX module.

Submodules are named after the diffusers modules, so a parameter path reads like the checkpoint
key: ``params['transformer_blocks'][3]['attn']['to_q']['kernel']`` is
``transformer_blocks.3.attn.to_q.weight`` (transposed), ``...['attn']['to_out'][0]`` is
``attn.to_out.0``. LoRA targets these paths.

Mixed precision: parameters are stored in ``dtype``; with ``compute_dtype`` (e.g. bf16) every
linear / conv casts its parameters and inputs to it at use, while layer norms, RMS norms and the
attention softmax run in float32.

Build options (:class:`MMDiT`, :func:`build`, :func:`from_config`, :func:`from_torch_state`,
``convert.load_mmdit``); none changes a value, only what is stored, recomputed and compiled:

- ``remat``: ``"none"``; ``"block"`` checkpoints each joint block (only the block inputs are kept
  for the backward, the block's forward runs again in it); ``"dots"`` checkpoints each block with
  ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``: the outputs of the matmuls without
  batch dimensions (every linear layer's ``x W``) are kept, the rest (norms, modulation, activations,
  and the attention itself, whose einsums batch over ``B, H``; on GPU the cuDNN kernel) is recomputed.
  ``True`` / ``False`` mean ``"block"`` / ``"none"`` (older callers and configs).
- ``scan_blocks``: runs each run of consecutive blocks of one structure (:func:`block_groups`: in
  SD3.5-M the MMDiT-X blocks 0..12, the plain blocks 13..22, then the context-pre-only block 23)
  as one ``jax.lax.scan``, so the compiled program holds one copy of each block kind instead of one
  per block and compile time stops growing with depth. The parameter tree keeps its per-block layout
  (``params['transformer_blocks'][i]``, which weight conversion, LoRA and export rely on): inside the
  traced call each block is ``nnx.split``, the states of a group are stacked (``jnp.stack`` per
  leaf) and the scan body ``nnx.merge``s one slice. Blocks whose graphs differ (e.g. LoRA on some
  blocks of a group only) are split into runs of equal graphs; a run of one block is called plainly.
  The cost: the stack is a copy of the group's weights in the parameter dtype, written on every call
  and read again by the backward scan (whose weight gradients are sliced back per block): for SD3.5-M
  2.17 G of the 2.24 G parameters are in scanned groups, 8.7 GB in float32 (4.3 GB bf16) of copying
  per call. Peak memory did not grow with it in XLA's CPU ``memory_analysis`` (SD3.5-M, remat
  ``"block"``, batch 1 at 64x64x16 latents and 205 tokens; temporaries scanned vs unrolled):
  gradient w.r.t. the float32 parameters with float32 compute 16.7 vs 17.3 GiB, with bf16 compute
  16.7 vs 20.6 GiB, w.r.t. the latents only (frozen weights, as under LoRA) with bf16 compute 9.1 vs
  22.8 GiB; the GPU compiler schedules differently, so measure there before relying on it. Compile
  time of that bf16 forward + backward on the shared 2-core CPU: 15 s scanned vs 46 s unrolled (float32
  compute: 12 s vs 276 s).
- ``attention``: the implementation of every attention call (:func:`marble_jax.models.attention.attention`:
  ``"auto"``, ``"cudnn"``, ``"xla"``, ``"einsum"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marble_jax.models.attention import IMPLEMENTATIONS, attention
from marble_jax.models.embeddings import timestep_embedding
from marble_jax.models.functional import abstract_module, functionalize, random_params
from marble_jax.models.weights import assign, plan_by_path

Array = jax.Array
PyTree = Any
_EPS = 1e-6  # every norm of the MMDiT
REMAT_POLICIES = ("none", "block", "dots")


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The fields of a diffusers ``SD3Transformer2DModel`` config (defaults as diffusers')."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MMDiTConfig:
        """From a ``config.json`` dict; keys that are not architecture fields (``_class_name``...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("dual_attention_layers") is not None:
            kwargs["dual_attention_layers"] = tuple(kwargs["dual_attention_layers"])
        cfg = cls(**kwargs)
        if cfg.pos_embed_max_size is None:
            raise ValueError("MMDiT config: pos_embed_max_size must be set (every SD3 / SD3.5 checkpoint sets it)")
        if cfg.qk_norm not in (None, "rms_norm", "layer_norm"):
            raise ValueError(f"MMDiT config: qk_norm {cfg.qk_norm!r} is not supported (None, 'rms_norm', 'layer_norm')")
        if cfg.caption_projection_dim != cfg.inner_dim:
            raise ValueError(
                f"MMDiT config: caption_projection_dim {cfg.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {cfg.inner_dim}"
            )
        if cfg.inner_dim % 4:
            raise ValueError(f"MMDiT config: inner dim {cfg.inner_dim} must be divisible by 4 (2D sin-cos table)")
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels


def pos_embed_crop(height: int, width: int, dim: int, max_size: int, base_size: int) -> np.ndarray:
    """``[height * width, dim]`` float32: the centred ``height x width`` crop of diffusers' ``max_size^2``
    2D sin-cos table (first half of ``dim`` encodes the column, second half the row; positions
    scaled by ``base_size / max_size``). Only the crop is computed."""
    step = np.float32(max_size / base_size)
    rows = np.arange((max_size - height) // 2, (max_size - height) // 2 + height, dtype=np.float32) / step
    cols = np.arange((max_size - width) // 2, (max_size - width) // 2 + width, dtype=np.float32) / step
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def sincos(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.astype(np.float64), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    half = dim // 2
    col = np.broadcast_to(sincos(cols)[None, :, :], (height, width, half))
    row = np.broadcast_to(sincos(rows)[:, None, :], (height, width, half))
    return np.concatenate([col, row], axis=-1).reshape(height * width, dim).astype(np.float32)


def _modulate(normed: Array, shift: Array, scale: Array) -> Array:
    """adaLN: ``normed [B, L, D] * (1 + scale [B, D]) + shift [B, D]`` in float32."""
    return normed * (1 + scale[:, None].astype(jnp.float32)) + shift[:, None].astype(jnp.float32)


class _Layers:
    """Makes every parametrised layer: linears / conv compute in ``compute_dtype`` over
    ``param_dtype`` parameters, norms compute in float32."""

    def __init__(self, compute_dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.kw = dict(dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_kw = dict(epsilon=_EPS, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

    def linear(self, din: int, dout: int) -> nnx.Linear:
        return nnx.Linear(din, dout, **self.kw)

    def patch_conv(self, din: int, dout: int, patch: int) -> nnx.Conv:
        return nnx.Conv(din, dout, kernel_size=(patch, patch), strides=(patch, patch), padding="VALID", **self.kw)

    def layer_norm(self, dim: int) -> nnx.LayerNorm:
        """Without affine parameters; two-pass variance, as torch."""
        return nnx.LayerNorm(dim, use_scale=False, use_bias=False, use_fast_variance=False, **self.norm_kw)

    def qk_norm(self, kind: str | None, dim: int) -> nnx.Module | None:
        """Per-head norm of queries / keys (learned scale, and bias for ``layer_norm``), or None."""
        if kind == "rms_norm":
            return nnx.RMSNorm(dim, **self.norm_kw)
        if kind == "layer_norm":
            return nnx.LayerNorm(dim, use_fast_variance=False, **self.norm_kw)
        return None


class TwoLayerMLP(nnx.Module):
    """``linear_2(silu(linear_1(x)))``: diffusers' ``TimestepEmbedding`` and ``PixArtAlphaTextProjection(act_fn="silu")``."""

    def __init__(self, din: int, dim: int, layers: _Layers):
        self.linear_1 = layers.linear(din, dim)
        self.linear_2 = layers.linear(dim, dim)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """``temb [B, D]`` from ``timestep [B]`` (0..1000) and ``pooled [B, P]``."""

    def __init__(self, dim: int, pooled_dim: int, layers: _Layers):
        self.timestep_embedder = TwoLayerMLP(256, dim, layers)
        self.text_embedder = TwoLayerMLP(pooled_dim, dim, layers)

    def __call__(self, timestep: Array, pooled: Array, dtype: Any) -> Array:
        t = timestep_embedding(timestep, 256).astype(dtype)
        return self.timestep_embedder(t) + self.text_embedder(pooled)


class PatchEmbed(nnx.Module):
    """Latents ``[B, H, W, C]`` -> tokens ``[B, (H/p)(W/p), D]`` plus the cropped position table."""

    def __init__(self, cfg: MMDiTConfig, layers: _Layers):
        p = cfg.patch_size
        self.patch_size = p
        self.max_size = cfg.pos_embed_max_size
        self.base_size = cfg.sample_size // p
        self.proj = layers.patch_conv(cfg.in_channels, cfg.inner_dim, p)

    def __call__(self, latents: Array) -> Array:
        _, h, w, _ = latents.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"MMDiT: latent size {h}x{w} is not divisible by the patch size {p}")
        if h // p > self.max_size or w // p > self.max_size:
            raise ValueError(f"MMDiT: latent grid {h // p}x{w // p} exceeds pos_embed_max_size {self.max_size}")
        x = self.proj(latents)
        b, gh, gw, d = x.shape
        table = pos_embed_crop(gh, gw, d, self.max_size, self.base_size)
        return (x.reshape(b, gh * gw, d) + table).astype(x.dtype)


class AdaLayerNormZero(nnx.Module):
    """adaLN-Zero: ``chunks = 6`` is diffusers' ``AdaLayerNormZero``, ``9`` its ``SD35AdaLayerNormZeroX``.

    ``__call__(x [B, L, D], temb [B, D])`` returns the modulated ``x`` (float32) and the remaining
    modulation vectors ``[B, D]``: ``gate_msa, shift_mlp, scale_mlp, gate_mlp`` (+ ``x2, gate_msa2``).
    """

    def __init__(self, dim: int, chunks: int, layers: _Layers):
        self.chunks = chunks
        self.linear = layers.linear(dim, chunks * dim)
        self.norm = layers.layer_norm(dim)

    def __call__(self, x: Array, temb: Array) -> tuple[Array, ...]:
        mods = jnp.split(self.linear(nnx.silu(temb)), self.chunks, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = self.norm(x)
        out = (_modulate(normed, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp)
        if self.chunks == 9:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            out += (_modulate(normed, shift_msa2, scale_msa2), gate_msa2)
        return out


class AdaLayerNormContinuous(nnx.Module):
    """``norm(x) * (1 + scale) + shift`` with ``scale, shift = linear(silu(temb))`` (scale first); float32 out."""

    def __init__(self, dim: int, layers: _Layers):
        self.linear = layers.linear(dim, 2 * dim)
        self.norm = layers.layer_norm(dim)

    def __call__(self, x: Array, temb: Array) -> Array:
        scale, shift = jnp.split(self.linear(nnx.silu(temb)), 2, axis=-1)
        return _modulate(self.norm(x), shift, scale)


class Attention(nnx.Module):
    """Self-attention over the image tokens, joint with the context tokens when ``joint``.

    ``context_pre_only`` (last block): the context stream gets queries but no output projection.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        qk_norm: str | None,
        layers: _Layers,
        *,
        joint: bool,
        context_pre_only: bool,
        implementation: str = "auto",
    ):
        inner = heads * head_dim
        self.heads = heads
        self.implementation = implementation
        self.to_q, self.to_k, self.to_v = (layers.linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = layers.qk_norm(qk_norm, head_dim), layers.qk_norm(qk_norm, head_dim)
        self.to_out = nnx.List([layers.linear(inner, dim)])  # diffusers' to_out.1 is a dropout
        self.joint = joint
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (layers.linear(dim, inner) for _ in range(3))
            self.norm_added_q, self.norm_added_k = layers.qk_norm(qk_norm, head_dim), layers.qk_norm(qk_norm, head_dim)
            self.to_add_out = None if context_pre_only else layers.linear(inner, dim)

    def _heads(self, proj: nnx.Linear, norm: nnx.Module | None, x: Array) -> Array:
        """``[B, L, D] -> [B, L, H, Dh]``, normalised per head when ``norm`` is set."""
        y = proj(x)
        y = y.reshape(*y.shape[:2], self.heads, -1)
        return y if norm is None else norm(y).astype(y.dtype)

    def __call__(self, x: Array, context: Array | None = None) -> Array | tuple[Array, Array | None]:
        """``x [B, N, D]`` (and ``context [B, L, D]`` when joint) -> ``[B, N, D]`` (and ``[B, L, D]`` or None)."""
        q, k, v = self._heads(self.to_q, self.norm_q, x), self._heads(self.to_k, self.norm_k, x), self._heads(self.to_v, None, x)
        if self.joint:
            q = jnp.concatenate([q, self._heads(self.add_q_proj, self.norm_added_q, context)], axis=1)
            k = jnp.concatenate([k, self._heads(self.add_k_proj, self.norm_added_k, context)], axis=1)
            v = jnp.concatenate([v, self._heads(self.add_v_proj, None, context)], axis=1)
        out = attention(q, k, v, implementation=self.implementation)
        out = out.reshape(*out.shape[:2], -1)
        n = x.shape[1]
        x_out = self.to_out[0](out[:, :n])
        if not self.joint:
            return x_out
        return x_out, None if self.to_add_out is None else self.to_add_out(out[:, n:])


class GELU(nnx.Module):
    """``gelu_tanh(proj(x))`` (diffusers ``GELU(approximate="tanh")``)."""

    def __init__(self, din: int, dout: int, layers: _Layers):
        self.proj = layers.linear(din, dout)

    def __call__(self, x: Array) -> Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """``net.2(net.0(x))``, hidden width ``4 * dim``; ``net.1`` is diffusers' dropout, absent here."""

    def __init__(self, dim: int, layers: _Layers):
        self.net = nnx.List([GELU(dim, 4 * dim, layers), None, layers.linear(4 * dim, dim)])

    def __call__(self, x: Array) -> Array:
        return self.net[2](self.net[0](x))


class JointTransformerBlock(nnx.Module):
    """One MMDiT block: joint attention over image + context, adaLN-Zero, optional MMDiT-X ``attn2``."""

    def __init__(self, cfg: MMDiTConfig, layers: _Layers, *, context_pre_only: bool, dual: bool, attention_impl: str = "auto"):
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim, 9 if dual else 6, layers)
        self.norm1_context = AdaLayerNormContinuous(dim, layers) if context_pre_only else AdaLayerNormZero(dim, 6, layers)
        attn = dict(layers=layers, implementation=attention_impl)
        self.attn = Attention(dim, heads, head_dim, cfg.qk_norm, joint=True, context_pre_only=context_pre_only, **attn)
        self.attn2 = Attention(dim, heads, head_dim, cfg.qk_norm, joint=False, context_pre_only=False, **attn) if dual else None
        self.norm2 = layers.layer_norm(dim)
        self.ff = FeedForward(dim, layers)
        if not context_pre_only:
            self.norm2_context = layers.layer_norm(dim)
            self.ff_context = FeedForward(dim, layers)

    def __call__(self, x: Array, context: Array, temb: Array) -> tuple[Array, Array | None]:
        """``x [B, N, D]``, ``context [B, L, D]``, ``temb [B, D]`` -> ``(x, context)``; context is None after the last block."""
        dt = x.dtype
        mods = self.norm1(x, temb)
        x_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:5]
        if self.context_pre_only:
            c_msa = self.norm1_context(context, temb)
        else:
            c_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        attn_x, attn_c = self.attn(x_msa.astype(dt), c_msa.astype(dt))
        x = x + gate_msa[:, None] * attn_x
        if self.attn2 is not None:
            x2, gate_msa2 = mods[5:]
            x = x + gate_msa2[:, None] * self.attn2(x2.astype(dt))
        x = x + gate_mlp[:, None] * self.ff(_modulate(self.norm2(x), shift_mlp, scale_mlp).astype(dt))
        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None] * attn_c
        ff_in = _modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp).astype(dt)
        return x, context + c_gate_mlp[:, None] * self.ff_context(ff_in)


def _run_block(block: JointTransformerBlock, x: Array, context: Array, temb: Array) -> tuple[Array, Array | None]:
    return block(x, context, temb)


def remat_policy(remat: str | bool | None) -> str:
    """``remat`` as one of :data:`REMAT_POLICIES`: booleans (older callers and configs) map ``True`` to
    ``"block"`` and ``False`` (or None) to ``"none"``.

    Raises:
      ValueError: any other value, naming it.
    """
    if remat is None or isinstance(remat, bool | np.bool_):
        return "block" if remat else "none"
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return remat
    raise ValueError(f"MMDiT: remat {remat!r} is not one of {REMAT_POLICIES} (or True / False)")


def _checkpoint_policy(remat: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy of a remat mode other than ``"none"``."""
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None


def block_groups(cfg: MMDiTConfig) -> tuple[tuple[int, int], ...]:
    """``((start, stop), ...)``: the runs of consecutive blocks of one structure (MMDiT-X ``attn2`` or
    not, context-pre-only or not), which ``scan_blocks`` scans. SD3.5-M: ``((0, 13), (13, 23), (23, 24))``."""
    kinds = [(i in cfg.dual_attention_layers, i == cfg.num_layers - 1) for i in range(cfg.num_layers)]
    groups, start = [], 0
    for i in range(1, cfg.num_layers + 1):
        if i == cfg.num_layers or kinds[i] != kinds[start]:
            groups.append((start, i))
            start = i
    return tuple(groups)


def _equal_graph_runs(blocks: list[nnx.Module]) -> list[tuple[nnx.GraphDef, list[nnx.Module], list[nnx.State]]]:
    """``blocks`` split (``nnx.split``) and cut into runs of consecutive equal graph definitions:
    ``[(graphdef, blocks, states)]``."""
    runs: list[tuple[nnx.GraphDef, list[nnx.Module], list[nnx.State]]] = []
    for block in blocks:
        graphdef, state = nnx.split(block)
        if runs and runs[-1][0] == graphdef:
            runs[-1][1].append(block)
            runs[-1][2].append(state)
        else:
            runs.append((graphdef, [block], [state]))
    return runs


def _scan_run(
    graphdef: nnx.GraphDef, states: list[nnx.State], x: Array, context: Array, temb: Array, remat: str
) -> tuple[Array, Array]:
    """The blocks ``nnx.merge(graphdef, states[i])`` applied in order, as one ``jax.lax.scan`` over the
    stacked states; the body is checkpointed per block as ``remat`` says."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def block_fn(state: nnx.State, x: Array, context: Array) -> tuple[Array, Array]:
        return nnx.merge(graphdef, state)(x, context, temb)

    if remat != "none":
        # scan already keeps the body's recomputation apart from the forward: no CSE barrier needed
        block_fn = jax.checkpoint(block_fn, prevent_cse=False, policy=_checkpoint_policy(remat))

    def body(carry: tuple[Array, Array], state: nnx.State) -> tuple[tuple[Array, Array], None]:
        return block_fn(state, *carry), None

    (x, context), _ = jax.lax.scan(body, (x, context), stacked)
    return x, context


def _skip_set(skip_layers: Sequence[int], num_layers: int) -> frozenset[int]:
    """``skip_layers`` as a set of block indices.

    Raises:
      ValueError: an entry that is not an integer in ``[0, num_layers)``, naming it.
    """
    for i in skip_layers:
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < num_layers:
            raise ValueError(f"MMDiT: skip layer {i!r} is not a block index in [0, {num_layers})")
    return frozenset(int(i) for i in skip_layers)


def _runs_without(indices: range, skip: frozenset[int]) -> list[list[int]]:
    """``indices`` cut into runs of consecutive indices not in ``skip``: ``range(0, 5)``, ``{1, 2}`` -> ``[[0], [3, 4]]``."""
    runs: list[list[int]] = []
    for i in indices:
        if i in skip:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class MMDiT(nnx.Module):
    """diffusers ``SD3Transformer2DModel`` on NHWC latents.

    ``__call__(latents [B, H, W, C], timestep [B], context [B, L, joint_attention_dim], pooled [B, P])
    -> velocity [B, H, W, out_channels]`` in ``latents``' dtype; ``timestep = 1000 * t``. The keyword
    ``skip_layers`` (a static tuple of block indices) leaves those blocks out, as diffusers' ``skip_layers``
    (SD3.5's skip-layer guidance); scanned, a group's runs are cut around the skipped blocks.

    ``remat`` (:data:`REMAT_POLICIES` or a bool), ``scan_blocks`` and ``attention`` (the attention
    implementation): the module docstring.
    """

    def __init__(
        self,
        cfg: MMDiTConfig,
        *,
        dtype: Any = jnp.float32,
        compute_dtype: Any = None,
        remat: str | bool = "none",
        scan_blocks: bool = False,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        if attention not in IMPLEMENTATIONS:
            raise ValueError(f"MMDiT: attention implementation {attention!r} is not one of {IMPLEMENTATIONS}")
        self.compute_dtype = dtype if compute_dtype is None else compute_dtype
        self.remat = remat_policy(remat)
        self.scan_blocks = bool(scan_blocks)
        self.block_groups = block_groups(cfg)
        self.patch_size, self.out_channels = cfg.patch_size, cfg.out_dim
        layers = _Layers(self.compute_dtype, dtype, rngs)
        dim = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg, layers)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim, layers)
        self.context_embedder = layers.linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(
                    cfg,
                    layers,
                    context_pre_only=i == cfg.num_layers - 1,
                    dual=i in cfg.dual_attention_layers,
                    attention_impl=attention,
                )
                for i in range(cfg.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, layers)
        self.proj_out = layers.linear(dim, cfg.patch_size**2 * cfg.out_dim)

    def _blocks(self, x: Array, c: Array, temb: Array, skip: frozenset[int]) -> Array:
        """The joint blocks in order, those in ``skip`` left out: ``x [B, N, D]``, ``c [B, L, D]`` -> ``x``."""
        run = _run_block if self.remat == "none" else nnx.remat(_run_block, policy=_checkpoint_policy(self.remat))
        if not self.scan_blocks:
            for i, block in enumerate(self.transformer_blocks):
                if i not in skip:
                    x, c = run(block, x, c, temb)
            return x
        for start, stop in self.block_groups:
            for kept in _runs_without(range(start, stop), skip):
                for graphdef, blocks, states in _equal_graph_runs([self.transformer_blocks[i] for i in kept]):
                    if len(blocks) > 1:
                        x, c = _scan_run(graphdef, states, x, c, temb, self.remat)
                    else:
                        x, c = run(blocks[0], x, c, temb)
        return x

    def __call__(
        self, latents: Array, timestep: Array, context: Array, pooled: Array, *, skip_layers: Sequence[int] = ()
    ) -> Array:
        """``skip_layers`` (static): indices of joint blocks left out (image and context states pass them unchanged),
        diffusers' ``skip_layers`` (skip-layer guidance).

        Raises:
          ValueError: a skip layer that is not a block index, naming it.
        """
        skip = _skip_set(skip_layers, len(self.transformer_blocks))
        dt = self.compute_dtype
        b, h, w, _ = latents.shape
        x = self.pos_embed(latents.astype(dt))
        temb = self.time_text_embed(timestep, pooled.astype(dt), dt)
        x = self._blocks(x, self.context_embedder(context.astype(dt)), temb, skip)
        x = self.proj_out(self.norm_out(x, temb).astype(dt))
        p, co = self.patch_size, self.out_channels
        x = x.reshape(b, h // p, w // p, p, p, co).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, co)
        return x.astype(latents.dtype)


def build(
    config: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    remat: str | bool = "none",
    scan_blocks: bool = False,
    attention: str = "auto",
) -> MMDiT:
    """The :class:`MMDiT` module of a diffusers config dict with abstract (shape-only) parameters,
    for callers that need the graph itself (e.g. :func:`marble_jax.models.lora.with_lora`)."""
    cfg = MMDiTConfig.from_dict(config)
    kw = dict(dtype=dtype, compute_dtype=compute_dtype, remat=remat, scan_blocks=scan_blocks, attention=attention)
    return abstract_module(lambda rngs: MMDiT(cfg, **kw, rngs=rngs))


def from_config(
    config: Mapping[str, Any],
    *,
    key: Array | None,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    remat: str | bool = "none",
    scan_blocks: bool = False,
    attention: str = "auto",
) -> tuple[Callable[..., Array], PyTree]:
    """``(apply_fn, params)`` from a diffusers config dict, with random parameters (kernels
    ``N(0, 1 / fan_in)``, zero biases, unit norm scales: :func:`~marble_jax.models.functional.random_params`),
    or with ``key=None`` the abstract ``ShapeDtypeStruct`` tree (about two seconds for SD3.5-Large).
    ``apply_fn(params, latents [B,H,W,C], timestep [B], context [B,L,D], pooled [B,P], *, skip_layers=()) -> [B,H,W,C]``.
    Under ``jax.eval_shape`` it costs the same as ``key=None``. ``remat``, ``scan_blocks``, ``attention``:
    the module docstring; the parameter tree is the same for every choice."""
    module = build(config, dtype=dtype, compute_dtype=compute_dtype, remat=remat, scan_blocks=scan_blocks, attention=attention)
    apply_fn, abstract = functionalize(module)
    return apply_fn, abstract if key is None else random_params(abstract, key)


def from_torch_state(
    config: Mapping[str, Any],
    state: Mapping[str, np.ndarray],
    *,
    source: str,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    remat: str | bool = "none",
    scan_blocks: bool = False,
    attention: str = "auto",
) -> tuple[Callable[..., Array], PyTree]:
    """``(apply_fn, params)`` from a diffusers ``SD3Transformer2DModel`` config and state dict.

    The position table buffer ``pos_embed.pos_embed`` is not read: it is recomputed from the config.
    ``remat``, ``scan_blocks``, ``attention``: as :func:`from_config`.

    Raises:
      ValueError: unsupported config or build option.
      WeightError: missing / unexpected keys or a wrong shape, naming ``source``.
    """
    apply_fn, target = from_config(
        config,
        key=None,
        dtype=dtype,
        compute_dtype=compute_dtype,
        remat=remat,
        scan_blocks=scan_blocks,
        attention=attention,
    )
    return apply_fn, assign(
        target, plan_by_path(target), state, source=source, dtype=dtype, ignore=lambda k: k == "pos_embed.pos_embed"
    )
