"""Public loaders: a local diffusers / transformers directory (or HF cache snapshot) -> JAX.

Each ``load_*`` takes the component's own directory or a whole pipeline snapshot (a directory
with ``model_index.json``, whose component subfolder is then used) and returns pure functions
with their parameter pytree. Errors name the missing file or directory, the missing and
unexpected weight keys, or the key with its expected and found shape
(:class:`marble_jax.models.weights.WeightError`).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from marble_jax.models.weights import read_config, read_safetensors, read_weights, resolve_dir


def component_dir(path, subfolder: str) -> Path:
    """``path`` itself, or ``path/subfolder`` when ``path`` is a pipeline snapshot."""
    d = resolve_dir(path)
    if (d / "model_index.json").is_file():
        return resolve_dir(d, subfolder)
    return d


def load_mmdit(
    path,
    dtype=jnp.float32,
    *,
    compute_dtype=None,
    remat: str | bool = "none",
    scan_blocks: bool = False,
    attention: str = "auto",
):
    """``(apply_fn, params)``; ``apply_fn(params, latents [B,H,W,C], timestep [B], context [B,L,D],
    pooled [B,P]) -> velocity [B,H,W,C]`` with ``timestep = 1000 * t``. ``compute_dtype`` (e.g. bf16
    over ``dtype`` parameters), ``remat`` (``"none"``, ``"block"``, ``"dots"``; True / False for
    ``"block"`` / ``"none"``), ``scan_blocks`` and ``attention`` (the attention implementation) as in
    :func:`mmdit.from_torch_state`."""
    from marble_jax.models import mmdit

    d = component_dir(path, "transformer")
    state = read_safetensors(d, "diffusion_pytorch_model")
    return mmdit.from_torch_state(
        read_config(d),
        state,
        source=str(d),
        dtype=dtype,
        compute_dtype=compute_dtype,
        remat=remat,
        scan_blocks=scan_blocks,
        attention=attention,
    )


def load_vae(path, dtype=jnp.float32, *, remat: bool = False):
    """``(encode_fn, decode_fn, params)``; ``decode_fn(params, latents [B,h,w,c]) -> images
    [B,H,W,3]`` in [-1, 1] from model-space latents; ``encode_fn(params, images, key) -> latents``;
    ``remat`` checkpoints each block."""
    from marble_jax.models import vae

    d = component_dir(path, "vae")
    state = read_safetensors(d, "diffusion_pytorch_model")
    return vae.from_torch_state(read_config(d), state, source=str(d), dtype=dtype, remat=remat)


def load_clip_text(path, dtype=jnp.float32, subfolder: str = "text_encoder"):
    """``(apply_fn, params)``; ``apply_fn(params, input_ids [B,L]) -> dict`` with
    ``penultimate_hidden_state``, ``last_hidden_state`` ``[B,L,D]`` and ``text_embeds [B,P]``."""
    from marble_jax.models import clip

    d = component_dir(path, subfolder)
    return clip.text_from_torch_state(read_config(d), read_safetensors(d, "model"), source=str(d), dtype=dtype)


def load_t5(path, dtype=jnp.float32, subfolder: str = "text_encoder_3"):
    """``(apply_fn, params)``; ``apply_fn(params, input_ids [B,L]) -> last_hidden_state [B,L,D]``."""
    from marble_jax.models import t5

    d = component_dir(path, subfolder)
    return t5.from_torch_state(read_config(d), read_safetensors(d, "model"), source=str(d), dtype=dtype)


def load_clip_model(path, dtype=jnp.float32):
    """A whole transformers ``CLIPModel`` directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``; or a repo id in the HF cache) -> :class:`marble_jax.models.clip.CLIP`."""
    from marble_jax.models import clip

    d = resolve_dir(path)
    return clip.clip_from_torch_state(read_config(d), read_weights(d), source=str(d), dtype=dtype)
