"""OpenCLIP ``open_clip.model.CLIP`` checkpoints (ViT image tower, built-in text tower) -> our Flax CLIP.

OpenCLIP's ViT CLIP is transformers' CLIP under other names: ``visual.conv1`` (bias-free patch conv),
``visual.class_embedding`` / ``visual.positional_embedding``, ``visual.ln_pre``, pre-LN residual blocks
(``ln_1``, ``nn.MultiheadAttention`` with a fused ``in_proj_weight [3D, D]`` = q, k, v stacked, ``ln_2``,
``mlp.c_fc`` / ``mlp.c_proj``), ``visual.ln_post`` on the class token, ``visual.proj [D, E]`` used as
``x @ proj``; text: ``token_embedding``, ``positional_embedding``, the same blocks with a causal mask,
``ln_final`` before pooling, pooling at ``argmax(token ids)`` (the end-of-text token 49407 has the largest id
of the vocabulary) and ``text_projection [D, E]``. LayerNorm eps is 1e-5 everywhere. So the checkpoint is
renamed into :mod:`marble_jax.models.clip`'s towers: q / k / v sliced from ``in_proj``, linear weights
transposed, the two projections taken as they are (already ``[in, out]``).

What a state dict does not show — attention heads (``width // head_width``) and the activation (GELU, or
QuickGELU for OpenAI-trained weights) — comes from a named config (:data:`NAMED_CONFIGS`, OpenCLIP's
``model_configs/*.json``); without a name, a checkpoint whose shapes equal a named config's takes that
config, anything else ``head_width = 64`` and GELU (OpenCLIP's defaults).

Variants whose weights this does not implement (timm or ResNet image towers, attentional pooling / CoCa,
HF or custom text towers, layer scale, custom attention blocks, a biased text projection, SigLIP's
``logit_bias``) are refused naming the key that shows them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from marble_jax.models import clip
from marble_jax.models.weights import (
    WeightError,
    assign,
    identity,
    plan_by_path,
    read_safetensors_file,
    read_torch_checkpoint,
)

PyTree = Any
Transform = Callable[[np.ndarray], np.ndarray]

EOT_TOKEN_ID = 49407
"""OpenCLIP's (OpenAI BPE) end-of-text token: the largest id of the 49408-token vocabulary."""


@dataclasses.dataclass(frozen=True)
class OpenCLIPConfig:
    """An OpenCLIP ViT CLIP's architecture (``CLIPVisionCfg`` / ``CLIPTextCfg`` resolved to sizes)."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    patch_size: int
    image_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = False


def _named(embed, v_width, v_layers, v_head_width, v_mlp, patch, image, t_width, t_layers, t_heads) -> OpenCLIPConfig:
    return OpenCLIPConfig(
        embed, v_width, v_layers, v_width // v_head_width, v_mlp, patch, image, t_width, t_layers, t_heads, 4 * t_width
    )


_BASE_CONFIGS = {  # OpenCLIP 3.3 model_configs/<name>.json; mlp = int(width * mlp_ratio)
    "ViT-B-32": _named(512, 768, 12, 64, 3072, 32, 224, 512, 12, 8),
    "ViT-B-16": _named(512, 768, 12, 64, 3072, 16, 224, 512, 12, 8),
    "ViT-L-14": _named(768, 1024, 24, 64, 4096, 14, 224, 768, 12, 12),
    "ViT-L-14-336": _named(768, 1024, 24, 64, 4096, 14, 336, 768, 12, 12),
    "ViT-H-14": _named(1024, 1280, 32, 80, 5120, 14, 224, 1024, 24, 16),
    "ViT-g-14": _named(1024, 1408, 40, 88, 6144, 14, 224, 1024, 24, 16),
    "ViT-bigG-14": _named(1280, 1664, 48, 104, 8192, 14, 224, 1280, 32, 20),
}
NAMED_CONFIGS: dict[str, OpenCLIPConfig] = {
    **_BASE_CONFIGS,
    **{
        f"{name}-quickgelu": dataclasses.replace(_BASE_CONFIGS[name], quick_gelu=True)
        for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14")
    },
}
"""OpenCLIP model names -> architecture; ``-quickgelu`` variants (OpenAI-trained weights) use QuickGELU."""

_UNSUPPORTED = (  # (regex on a state-dict key, what it shows)
    (r"^visual\.trunk\.", "a timm image tower (TimmModel)"),
    (r"^visual\.(layer\d|attnpool|bn1|conv2)\.", "a ModifiedResNet image tower"),
    (r"^visual\.attn_pool", "an attentional pooler (CoCa-style image tower)"),
    (r"^text\.", "a separate text tower (CustomTextCLIP: HF or custom text model)"),
    (r"^text_decoder\.", "a CoCa text decoder"),
    (r"(^|\.)cls_emb$", "a text class embedding (embed_cls)"),
    (r"\.ls_[12]\.gamma$", "layer scale (ls_init_value)"),
    (r"\.(attn\.ln_q|attn\.ln_k|attn\.ln_inner|ln_attn|mlp\.ln)\.|\.attn\.(logit_scale|head_scale)$", "a custom attention block"),
    (r"^text_projection\.(weight|bias)$", "a linear text projection with bias (proj_bias)"),
    (r"^logit_bias$", "a sigmoid-loss (SigLIP) logit bias"),
)

_REQUIRED = (
    "visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.proj",
    "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight", "text_projection",
    "logit_scale",
)  # fmt: skip

_IGNORED = ("logit_scale", "attn_mask")  # read separately / the text causal mask buffer (rebuilt, never read)


def check_supported(state: Mapping[str, Any], *, source: str) -> None:
    """Raises ValueError naming the first key of ``state`` that shows an unsupported OpenCLIP variant."""
    for key in state:
        for pattern, what in _UNSUPPORTED:
            if re.search(pattern, key):
                raise ValueError(
                    f"{source}: unsupported OpenCLIP variant: key {key!r} shows {what}; only ViT image towers with "
                    "the built-in text transformer (open_clip.model.CLIP, e.g. ViT-H-14) are implemented"
                )


def _num_layers(state: Mapping[str, Any], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1


_SHAPE_SOURCES = {  # the fields a state dict determines (not the head counts, not the activation): key read from
    "embed_dim": "visual.proj",
    "vision_width": "visual.conv1.weight",
    "vision_layers": "visual.transformer.resblocks.*",
    "vision_mlp": "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "patch_size": "visual.conv1.weight",
    "image_size": "visual.positional_embedding",
    "text_width": "token_embedding.weight",
    "text_layers": "transformer.resblocks.*",
    "text_mlp": "transformer.resblocks.0.mlp.c_fc.weight",
    "context_length": "positional_embedding",
    "vocab_size": "token_embedding.weight",
}


def _shapes(cfg: OpenCLIPConfig) -> dict[str, int]:
    return {name: getattr(cfg, name) for name in _SHAPE_SOURCES}


def openclip_config(state: Mapping[str, Any], *, source: str, model_name: str | None = None) -> OpenCLIPConfig:
    """The architecture of an OpenCLIP state dict (values need only ``.shape``).

    Sizes are read from the shapes. With ``model_name`` (a key of :data:`NAMED_CONFIGS`) they must equal that
    config's, which also gives the head counts and the activation; without it, the named config with equal sizes
    gives them (GELU preferred: an OpenAI-trained QuickGELU checkpoint needs its ``-quickgelu`` name), else
    ``width // 64`` heads (OpenCLIP's default ``head_width``) and GELU.

    Raises:
      ValueError: for an unknown ``model_name``, an unsupported variant (naming the key) or a width under 64
        without a name.
      WeightError: listing the missing keys the sizes are read from, or naming each size that differs from
        ``model_name``'s and the key it is read from.
    """
    check_supported(state, source=source)
    if model_name is not None and model_name not in NAMED_CONFIGS:
        raise ValueError(f"{source}: unknown OpenCLIP model_name {model_name!r}; known: {sorted(NAMED_CONFIGS)}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise WeightError(f"{source}: not an OpenCLIP ViT CLIP state dict; missing keys: {missing}")
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    t_vocab, t_width = state["token_embedding.weight"].shape
    inferred = OpenCLIPConfig(
        embed_dim=state["visual.proj"].shape[1],
        vision_width=v_width,
        vision_layers=_num_layers(state, "visual.transformer.resblocks."),
        vision_heads=v_width // 64,
        vision_mlp=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        patch_size=patch,
        image_size=grid * patch,
        text_width=t_width,
        text_layers=_num_layers(state, "transformer.resblocks."),
        text_heads=t_width // 64,
        text_mlp=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        context_length=state["positional_embedding"].shape[0],
        vocab_size=t_vocab,
    )
    if model_name is not None:
        named, found = _shapes(NAMED_CONFIGS[model_name]), _shapes(inferred)
        differ = [f"{k} {v} (from {_SHAPE_SOURCES[k]}), {model_name} has {named[k]}" for k, v in found.items() if v != named[k]]
        if differ:
            raise WeightError(f"{source}: checkpoint is not an OpenCLIP {model_name}: " + "; ".join(differ))
        return NAMED_CONFIGS[model_name]
    known = [cfg for cfg in _BASE_CONFIGS.values() if _shapes(cfg) == _shapes(inferred)]
    if known:
        return known[0]
    if min(v_width, t_width) < 64:
        raise ValueError(f"{source}: widths {v_width} / {t_width} < 64 match no named config; pass model_name")
    return inferred


def _hf_configs(cfg: OpenCLIPConfig) -> tuple[dict, dict]:
    """``(text, vision)`` config dicts for :mod:`marble_jax.models.clip`'s towers. OpenCLIP pools text at
    ``argmax(ids)``; the text tower pools at the first ``eos_token_id``, the same position when that is the largest
    id of the vocabulary (49407) and every row holds it, as OpenCLIP's tokenizer ensures (also when truncating)."""
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    text = dict(
        hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp, num_attention_heads=cfg.text_heads,
        num_hidden_layers=cfg.text_layers, hidden_act=act, layer_norm_eps=1e-5, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.context_length, projection_dim=cfg.embed_dim, eos_token_id=cfg.vocab_size - 1,
    )  # fmt: skip
    vision = dict(
        hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp, num_attention_heads=cfg.vision_heads,
        num_hidden_layers=cfg.vision_layers, hidden_act=act, layer_norm_eps=1e-5, image_size=cfg.image_size,
        patch_size=cfg.patch_size, num_channels=3, projection_dim=cfg.embed_dim,
    )  # fmt: skip
    return text, vision


_EXACT = {  # transformers-named key -> OpenCLIP key
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding.weight": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "visual_projection.weight": "visual.proj",
}
_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_PREFIX = {"text_model": "transformer.resblocks", "vision_model": "visual.transformer.resblocks"}
_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def _qkv_slice(index: int, transform: Transform) -> Transform:
    """Row block ``index`` (0 q, 1 k, 2 v) of a fused ``in_proj_weight [3D, D]`` / ``in_proj_bias [3D]``, then ``transform``."""

    def select(x: np.ndarray) -> np.ndarray:
        d = x.shape[0] // 3
        return transform(x[index * d : (index + 1) * d])

    return select


def _openclip_rule(key: str, transform: Transform) -> tuple[str, Transform]:
    """The OpenCLIP key and transform for a transformers-named key and its transform."""
    if key in _EXACT:  # the projections are stored [in, out] already: read as they are
        return _EXACT[key], identity if key.endswith("projection.weight") else transform
    m = _LAYER.match(key)
    if m is None or (m.group(3) not in _BLOCK and m.group(3) not in _QKV):
        raise WeightError(f"no OpenCLIP name for parameter {key!r} (bug in the converter)")
    tower, layer, module, leaf = m.groups()
    prefix = f"{_BLOCK_PREFIX[tower]}.{layer}"
    if module in _QKV:
        return f"{prefix}.attn.in_proj_{leaf}", _qkv_slice(_QKV[module], transform)
    return f"{prefix}.{_BLOCK[module]}.{leaf}", transform


def openclip_plan(target: PyTree) -> dict[tuple, tuple[str, Transform]]:
    """``{param path: (OpenCLIP key, transform)}`` for a ``{"text": ..., "vision": ...}`` params tree of
    :mod:`marble_jax.models.clip`'s towers."""
    plan = {}
    for tower, tree in target.items():
        for path, (key, transform) in plan_by_path(tree).items():
            plan[(tower, *path)] = _openclip_rule(key, transform)
    return plan


def openclip_towers(cfg: OpenCLIPConfig, *, dtype=jnp.float32) -> tuple[Callable, Callable, PyTree]:
    """``(text_apply_fn, vision_apply_fn, target)``: :mod:`marble_jax.models.clip`'s towers for ``cfg`` and their
    abstract params tree ``{"text": ..., "vision": ...}`` (``ShapeDtypeStruct`` leaves), the one
    :func:`openclip_plan` fills."""
    text_cfg, vision_cfg = _hf_configs(cfg)
    text_fn, text_target = clip.text_from_config(text_cfg, key=None, dtype=dtype)
    vision_fn, vision_target = clip.vision_from_config(vision_cfg, key=None, dtype=dtype)
    return text_fn, vision_fn, {"text": text_target, "vision": vision_target}


def openclip_from_state(
    state: Mapping[str, np.ndarray], *, source: str, model_name: str | None = None, dtype=jnp.float32
) -> clip.CLIP:
    """:class:`~marble_jax.models.clip.CLIP` from an OpenCLIP ``open_clip.model.CLIP`` state dict.

    ``text[0](text[1], input_ids [B, context_length]) -> {"text_embeds": [B, E], ...}`` (``encode_text``; ids as
    OpenCLIP's tokenizer gives them: start, tokens, end-of-text 49407, zero padding), ``vision[0](vision[1],
    pixels [B, S, S, 3] normalised, NHWC) -> {"image_embeds": [B, E], ...}`` (``encode_image``); ``logit_scale``
    as stored (log of the inverse temperature).

    Raises:
      ValueError: for an unknown ``model_name`` or an unsupported OpenCLIP variant (naming the key).
      WeightError: listing missing / unexpected keys, or naming a key with a wrong shape.
    """
    cfg = openclip_config(state, source=source, model_name=model_name)
    text_fn, vision_fn, target = openclip_towers(cfg, dtype=dtype)
    params = assign(target, openclip_plan(target), state, source=source, dtype=dtype, ignore=lambda k: k in _IGNORED)
    return clip.CLIP(
        text=(text_fn, params["text"]),
        vision=(vision_fn, params["vision"]),
        logit_scale=float(np.asarray(state["logit_scale"], np.float32).reshape(())),
    )


def load_openclip(path: str | os.PathLike, *, model_name: str | None = None, dtype=jnp.float32) -> clip.CLIP:
    """An OpenCLIP checkpoint file -> :class:`~marble_jax.models.clip.CLIP` (see :func:`openclip_from_state`).

    ``path``: a ``.pt`` / ``.pth`` / ``.bin`` torch pickle (``{"state_dict": ...}`` and ``module.`` unwrapped,
    e.g. HPSv2's ``HPS_v2.1_compressed.pt``) or a ``.safetensors`` file (e.g. OpenCLIP's hub
    ``open_clip_model.safetensors``). ``model_name``: a key of :data:`NAMED_CONFIGS` (e.g. ``"ViT-H-14"``).

    Raises:
      FileNotFoundError: naming the path.
      ValueError / WeightError: as :func:`openclip_from_state`.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"missing OpenCLIP checkpoint file: {p}")
    state = read_safetensors_file(p) if p.suffix == ".safetensors" else read_torch_checkpoint(p)
    return openclip_from_state(state, source=str(p), model_name=model_name, dtype=dtype)
