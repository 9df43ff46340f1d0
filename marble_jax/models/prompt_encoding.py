"""SD3's prompt encoding (diffusers' ``StableDiffusion3Pipeline.encode_prompt``) over the JAX encoders.

Context ``[B, Lc + Lt, Dt]``: the penultimate hidden states of CLIP-L and CLIP-G (bigG)
concatenated on the feature axis and zero-padded to the T5 width ``Dt``, followed along the
sequence by T5's last hidden state (or zeros ``[B, max_sequence_length, joint_attention_dim]``
without T5). Pooled ``[B, Pl + Pg]``: both CLIP projected pooled outputs concatenated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Encoder = tuple[Callable[..., Any], Any]
"""``(apply_fn, params)`` as returned by ``convert.load_clip_text`` / ``convert.load_t5``."""


def tokenize(
    prompts: Sequence[str], tokenizer, tokenizer_2, tokenizer_3=None, *, max_sequence_length: int = 256
) -> dict[str, np.ndarray]:
    """Token ids as the SD3 pipeline makes them, padded to fixed lengths and truncated.

    Args:
      prompts: B prompts.
      tokenizer, tokenizer_2: the CLIP-L and CLIP-G transformers tokenizers; both use ``tokenizer``'s
        ``model_max_length`` (77), as diffusers does.
      tokenizer_3: the T5 tokenizer, or None (no T5 ids).
      max_sequence_length: T5 length.

    Returns:
      ``{"clip_l": [B, 77], "clip_g": [B, 77]}`` int32, plus ``"t5": [B, max_sequence_length]`` with a T5 tokenizer.
    """
    prompts = list(prompts)
    clip_length = tokenizer.model_max_length

    def ids(tok, length: int) -> np.ndarray:
        out = tok(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)

    tokens = {"clip_l": ids(tokenizer, clip_length), "clip_g": ids(tokenizer_2, clip_length)}
    if tokenizer_3 is not None:
        tokens["t5"] = ids(tokenizer_3, max_sequence_length)
    return tokens


def encode_prompt(
    clip_l: Encoder,
    clip_g: Encoder,
    t5: Encoder | None,
    tokens: dict[str, Array],
    *,
    joint_attention_dim: int = 4096,
    max_sequence_length: int = 256,
) -> tuple[Array, Array]:
    """``(context [B, 77 + Lt, Dt], pooled [B, Pl + Pg])`` from the ids of :func:`tokenize`.

    With ``t5`` None the T5 part is zeros ``[B, max_sequence_length, joint_attention_dim]`` (the MMDiT's
    ``joint_attention_dim``); otherwise ``Dt`` and ``Lt`` come from T5 and the two keywords are unused.
    The outputs are in the encoders' output dtype (bfloat16 encoders, e.g. ``pipeline.cast_text_encoders``, give
    bfloat16; T5's float32 ``wo`` does not change its output dtype). Each row depends on its own ids alone.
    Pure in the params: ``jax.jit`` it by closing over the three ``apply_fn``.
    """
    out_l = clip_l[0](clip_l[1], tokens["clip_l"])
    out_g = clip_g[0](clip_g[1], tokens["clip_g"])
    clip = jnp.concatenate([out_l["penultimate_hidden_state"], out_g["penultimate_hidden_state"]], axis=-1)
    if t5 is None:
        t5_states = jnp.zeros((clip.shape[0], max_sequence_length, joint_attention_dim), clip.dtype)
    else:
        t5_states = t5[0](t5[1], tokens["t5"])
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5_states.shape[-1] - clip.shape[-1])))
    context = jnp.concatenate([clip, t5_states], axis=1)
    pooled = jnp.concatenate([out_l["text_embeds"], out_g["text_embeds"]], axis=-1)
    return context, pooled
