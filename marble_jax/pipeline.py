"""SD3 / SD3.5 text-to-image in JAX from a diffusers snapshot: prompts -> latents -> uint8 images.

:func:`from_pretrained` reads a pipeline snapshot in diffusers layout (``model_index.json``; subfolders
``transformer``, ``vae``, ``text_encoder`` (CLIP-L), ``text_encoder_2`` (CLIP-G), optional ``text_encoder_3``
(T5), ``tokenizer``, ``tokenizer_2``, ``tokenizer_3``, ``scheduler``) or a Hugging Face cache repo id, and
returns an :class:`SD3Pipeline`: the components' pure functions, one parameter pytree per component, the
tokenizers and the sampling constants. Its steps reproduce diffusers' ``StableDiffusion3Pipeline``:
prompt encoding (``prompt_encoding``), the ``FlowMatchEulerDiscreteScheduler`` grid with the snapshot's
shift (``sampling.sigma_schedule``), the MMDiT called with ``timestep = 1000 * sigma``, classifier-free
guidance for ``guidance > 1`` with negative prompt ``""``, and the VAE's post-processing.

The text encoders may be held in another dtype than the rest (``from_pretrained(..., text_dtype=...)`` or
:func:`cast_text_encoders`), e.g. bfloat16 on the accelerator with T5's ``wo`` kept float32
(:mod:`marble_jax.models.t5`); :meth:`SD3Pipeline.encode` with ``batch`` pads every call to one batch size
so its program compiles once, whatever the number of prompts.

Parameters can also come from an orbax checkpoint written by ``tools/convert_sd3.py`` (one item per
component, :func:`save_params` / :func:`restore_params`: the only orbax calls of this module), which
skips reading and converting the safetensors.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from marble_jax.models import clip, convert, mmdit, t5, vae
from marble_jax.models.prompt_encoding import encode_prompt, tokenize
from marble_jax.models.weights import read_config, resolve_dir
from marble_jax.sampling import guided_velocity, sample, sigma_schedule, skip_layer_guidance_steps

Array = jax.Array
PyTree = Any
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
"""Parameter-carrying subfolders of a snapshot; also the keys of :attr:`SD3Pipeline.params`."""
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""The components of :data:`COMPONENTS` that encode prompts (CLIP-L, CLIP-G, T5)."""
_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "spiece.model")  # a tokenizer directory has one of them
_SCHEDULER_OPTIONS = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                      "use_beta_sigmas", "stochastic_sampling")  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class SD3Pipeline:
    """Pure functions, parameters and constants of an SD3 / SD3.5 pipeline.

    Attributes:
      transformer_fn: ``(params, latents [B,h,w,C], timestep [B], context [B,L,D], pooled [B,P]) -> velocity``
        (None when loaded with ``text_only``).
      vae_decode_fn: ``(params, latents [B,h,w,C]) -> images [B,H,W,3]`` in [-1, 1] (applies the VAE's own
        ``latents / vae_scale + vae_shift``; None when loaded with ``text_only``).
      clip_l_fn, clip_g_fn: ``(params, ids [B,77]) -> dict`` of CLIP hidden states and projections (None when
        loaded without ``text_encoders``).
      t5_fn: ``(params, ids [B,Lt]) -> [B,Lt,D]``, or None (T5 states are then zeros, as in diffusers; also None
        without ``text_encoders``).
      params: ``{component: pytree}`` for the components of :data:`COMPONENTS` that are present.
      tokenizer, tokenizer_2, tokenizer_3: the transformers tokenizers (``tokenizer_3`` None without T5).
      shift, num_train_timesteps: the scheduler's.
      vae_scale, vae_shift: the VAE's ``scaling_factor`` / ``shift_factor``.
      vae_scale_factor: image pixels per latent pixel (8 for SD3).
      latent_channels, sample_size, patch_size, joint_attention_dim: from the transformer config; the
        default latent size is ``sample_size`` (diffusers' default image size ``sample_size * vae_scale_factor``).
    """

    transformer_fn: Callable[..., Array] | None
    vae_decode_fn: Callable[..., Array] | None
    clip_l_fn: Callable[..., dict] | None
    clip_g_fn: Callable[..., dict] | None
    t5_fn: Callable[..., Array] | None
    params: dict[str, PyTree]
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    shift: float
    num_train_timesteps: int
    vae_scale: float
    vae_shift: float
    vae_scale_factor: int
    latent_channels: int
    sample_size: int
    patch_size: int
    joint_attention_dim: int

    def encode(self, prompts: Sequence[str], *, max_sequence_length: int = 256, batch: int | None = None) -> tuple[Array, Array]:
        """``(context [B, 77 + max_sequence_length, D], pooled [B, P])`` of B prompts (diffusers' ``encode_prompt``),
        in the text encoders' dtype.

        Args:
          batch: None encodes the B prompts in one call (one compiled program per B). An int encodes them in
            chunks of exactly ``batch`` rows, the last chunk padded with empty prompts whose rows are dropped:
            one program for any B (each row is its prompt's alone: no op mixes the rows of a batch).

        Raises:
          ValueError: for ``batch < 1``, or a pipeline loaded without its text encoders.
        """
        prompts = list(prompts)
        if self.clip_l_fn is None:
            raise ValueError("this SD3Pipeline was loaded without its text encoders (from_pretrained text_encoders=False)")
        if batch is None:
            return self._encode_rows(prompts, max_sequence_length)
        if batch < 1:
            raise ValueError(f"encode: batch must be >= 1, got {batch}")
        chunks = []
        for i in range(0, max(len(prompts), 1), batch):
            chunk = prompts[i : i + batch]
            chunks.append(self._encode_rows(chunk + [""] * (batch - len(chunk)), max_sequence_length))
        if len(chunks) == 1 and len(prompts) == batch:
            return chunks[0]
        return tuple(jnp.concatenate(parts)[: len(prompts)] for parts in zip(*chunks, strict=True))

    def _encode_rows(self, prompts: list[str], max_sequence_length: int) -> tuple[Array, Array]:
        tokens = tokenize(prompts, self.tokenizer, self.tokenizer_2, self.tokenizer_3, max_sequence_length=max_sequence_length)
        text_params = {k: v for k, v in self.params.items() if k in TEXT_ENCODERS}
        return _encode(self.clip_l_fn, self.clip_g_fn, self.t5_fn, text_params, tokens,
                       joint_attention_dim=self.joint_attention_dim, max_sequence_length=max_sequence_length)  # fmt: skip

    def with_text_dtype(self, dtype) -> SD3Pipeline:
        """This pipeline with its text encoders' parameters cast by :func:`cast_text_encoders`."""
        return dataclasses.replace(self, params=cast_text_encoders(self.params, dtype))

    def sigmas(self, num_steps: int) -> Array:
        """The sampling grid ``[num_steps + 1]`` (diffusers' ``scheduler.sigmas``)."""
        return sigma_schedule(num_steps, self.shift, self.num_train_timesteps)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        """``(B, height / f, width / f, C)``, ``f = vae_scale_factor``, for an image size in pixels (default: the
        transformer's sample size in latent pixels).

        Raises:
          ValueError: if a side is not a multiple of ``vae_scale_factor * patch_size``.
        """
        multiple = self.vae_scale_factor * self.patch_size
        height = height or self.sample_size * self.vae_scale_factor
        width = width or self.sample_size * self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(f"image height and width must be multiples of {multiple}; got {height} x {width}")
        return batch, height // self.vae_scale_factor, width // self.vae_scale_factor, self.latent_channels

    def generate_latents(
        self,
        context: Array,
        pooled: Array,
        start: Array,
        *,
        negative: tuple[Array, Array] | None = None,
        num_steps: int = 40,
        guidance: float = 4.5,
        method: str = "euler",
        key: Array | None = None,
        eta: float = 0.7,
        height: int | None = None,
        width: int | None = None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
    ) -> Array:
        """Final latents ``[B, h, w, C]`` from text embeddings ``context [B, L, D]``, ``pooled [B, P]``.

        Args:
          start: initial latents ``[B, h, w, C]`` (at sigma 1), or a PRNG key to draw them from
            (``N(0, I)`` of :meth:`latent_shape` ``(B, height, width)``).
          negative: ``(context, pooled)`` of the negative prompts; by default those of ``""``. Unused without CFG.
          guidance: CFG weight; as in diffusers, guidance is applied only when ``guidance > 1``.
          method: ``"euler"`` (diffusers' scheduler), ``"sde"`` or ``"dpm2"`` (see ``sampling.sample``).
          key, eta: the SDE's noise key (default: derived from ``start`` when it is a key) and level.
          skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop:
            SD3.5's skip-layer guidance, as diffusers' ``StableDiffusion3Pipeline`` (SD3.5-M: layers ``[7, 8, 9]``):
            with CFG on (``guidance > 1``), on the steps ``i`` with ``num_steps * start < i < num_steps * stop``
            (``sampling.skip_layer_guidance_steps``), the velocity gets
            ``+ (v_cond - v_cond_without_those_blocks) * scale``. None (or empty) is off; each step that has it
            costs one more MMDiT call on the B conditional rows.

        Raises:
          ValueError: where skip-layer guidance runs, a skip layer that is not a block index of the MMDiT (naming it).
        """
        if jnp.ndim(start) == 4:
            x_T = jnp.asarray(start, jnp.float32)
        else:
            x_T = jax.random.normal(start, self.latent_shape(context.shape[0], height, width), jnp.float32)
            key = jax.random.fold_in(start, 1) if key is None else key
        key = key if method == "sde" else None  # the deterministic methods take no key (and need no recompilation)
        guidance = float(guidance) if guidance > 1 else 1.0
        if guidance == 1.0:
            negative = None
        elif negative is None:
            t5_length = context.shape[1] - self.tokenizer.model_max_length
            negative = self.encode([""] * context.shape[0], max_sequence_length=t5_length)
        # diffusers: skip-layer calls only with CFG, on the steps in range
        skip_layers = tuple(skip_guidance_layers or ()) if guidance != 1.0 else ()
        skip_steps = jnp.zeros(num_steps, bool)
        if skip_layers:
            skip_steps = jnp.asarray(skip_layer_guidance_steps(num_steps, skip_layer_guidance_start, skip_layer_guidance_stop))
            skip_layers = skip_layers if bool(skip_steps.any()) else ()
        return _denoise(self.transformer_fn, self.params["transformer"], x_T, self.sigmas(num_steps), (context, pooled),
                        negative, key, eta, skip_steps, jnp.float32(skip_layer_guidance_scale),
                        guidance=guidance, method=method, skip_layers=skip_layers)  # fmt: skip

    def decode_float(self, latents: Array) -> Array:
        """Latents ``[B, h, w, C]`` -> float32 images ``[B, H, W, 3]`` in [0, 1] (diffusers' ``output_type="np"``)."""
        return _decode(self.vae_decode_fn, self.params["vae"], latents)

    def decode(self, latents: Array) -> Array:
        """Latents ``[B, h, w, C]`` -> uint8 images ``[B, H, W, 3]``, rounded as diffusers' ``numpy_to_pil``."""
        return _to_uint8(self.decode_float(latents))

    def __call__(
        self,
        prompts: Sequence[str],
        key: Array,
        *,
        negative_prompt: str | Sequence[str] = "",
        num_steps: int = 40,
        guidance: float = 4.5,
        method: str = "euler",
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
    ) -> Array:
        """uint8 images ``[B, H, W, 3]`` of B prompts, initial noise drawn from ``key``; the skip-layer guidance
        arguments: :meth:`generate_latents`."""
        prompts = list(prompts)
        context, pooled = self.encode(prompts, max_sequence_length=max_sequence_length)
        negative = None
        if guidance > 1:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            negative = self.encode(negatives, max_sequence_length=max_sequence_length)
        latents = self.generate_latents(context, pooled, key, negative=negative, num_steps=num_steps, guidance=guidance,
                                        method=method, height=height, width=width,
                                        skip_guidance_layers=skip_guidance_layers,
                                        skip_layer_guidance_scale=skip_layer_guidance_scale,
                                        skip_layer_guidance_start=skip_layer_guidance_start,
                                        skip_layer_guidance_stop=skip_layer_guidance_stop)  # fmt: skip
        return self.decode(latents)


def cast_text_encoders(params: dict[str, PyTree], dtype) -> dict[str, PyTree]:
    """``params`` (``{component: pytree}``, as :attr:`SD3Pipeline.params`) with the :data:`TEXT_ENCODERS` cast
    to ``dtype`` (floating leaves), T5's ``wo`` kept in at least float32 (:func:`marble_jax.models.t5.cast_params`);
    the other components are returned as they are. The encoders then compute in ``dtype`` (bfloat16: half the
    memory of float32, and the accelerator's fast path) and :meth:`SD3Pipeline.encode` returns ``dtype``.
    ``from_pretrained(..., text_dtype=dtype)`` loads them so without a float32 copy."""
    out = dict(params)
    for name in TEXT_ENCODERS:
        if name in out:
            if name == "text_encoder_3":
                out[name] = t5.cast_params(out[name], dtype)
            else:
                out[name] = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, out[name])
    return out


@functools.partial(jax.jit, static_argnames=("clip_l_fn", "clip_g_fn", "t5_fn", "joint_attention_dim", "max_sequence_length"))
def _encode(clip_l_fn, clip_g_fn, t5_fn, params, tokens, *, joint_attention_dim: int, max_sequence_length: int):
    t5_pair = None if t5_fn is None else (t5_fn, params["text_encoder_3"])
    pair_l, pair_g = (clip_l_fn, params["text_encoder"]), (clip_g_fn, params["text_encoder_2"])
    sizes = dict(joint_attention_dim=joint_attention_dim, max_sequence_length=max_sequence_length)
    return encode_prompt(pair_l, pair_g, t5_pair, tokens, **sizes)


@functools.partial(jax.jit, static_argnames=("transformer_fn", "guidance", "method", "skip_layers"))
def _denoise(transformer_fn, params, x_T, sigmas, cond, uncond, key, eta, skip_steps, skip_scale, *, guidance: float,
             method: str, skip_layers: tuple[int, ...]) -> Array:  # fmt: skip
    """``sampling.sample`` of the (guided) MMDiT velocity; ``cond`` / ``uncond`` are ``(context, pooled)``. With
    ``skip_layers`` (needs ``guidance != 1``), skip-layer guidance of scale ``skip_scale`` on the steps where
    ``skip_steps [S]`` is true."""

    def model_fn(x: Array, t: Array, conditioning: tuple[Array, Array]) -> Array:
        return transformer_fn(params, x, 1000 * t, *conditioning)

    if not skip_layers:
        velocity_fn = guided_velocity(model_fn, cond, uncond, guidance)
        return sample(velocity_fn, x_T, sigmas, method=method, key=key, eta=eta).latents

    def skip_layer_fn(x: Array, t: Array, conditioning: tuple[Array, Array]) -> Array:
        return transformer_fn(params, x, 1000 * t, *conditioning, skip_layers=skip_layers)

    velocity_fn = guided_velocity(model_fn, cond, uncond, guidance, skip_layer_fn=skip_layer_fn, skip_layer_scale=skip_scale)
    return sample(velocity_fn, x_T, sigmas, method=method, key=key, eta=eta, skip_layer_steps=skip_steps).latents


@functools.partial(jax.jit, static_argnames="decode_fn")
def decode_images(decode_fn: Callable, params: PyTree, latents: Array) -> Array:
    """Latents ``[B, h, w, C]`` -> uint8 images ``[B, H, W, 3]`` with the VAE ``decode_fn(params, latents)``."""
    return _to_uint8(_decode(decode_fn, params, latents))


def _decode(decode_fn, params, latents: Array) -> Array:
    return jnp.clip(decode_fn(params, latents) * 0.5 + 0.5, 0, 1)


@jax.jit
def _to_uint8(images: Array) -> Array:
    return jnp.round(images * 255).astype(jnp.uint8)


def snapshot_components(path: str | os.PathLike, use_t5: bool = True) -> tuple[Path, dict, tuple[str, ...]]:
    """``(snapshot directory, model_index dict, present parameter components)`` of a pipeline snapshot.

    ``text_encoder_3`` is present when ``model_index.json`` names it (not ``[null, null]``) and ``use_t5``.

    Raises:
      FileNotFoundError: naming the directory without ``model_index.json`` or the missing subfolder.
    """
    d = resolve_dir(path)
    if not (d / "model_index.json").is_file():
        raise FileNotFoundError(f"{d} is not a diffusers pipeline snapshot: it has no model_index.json")
    index = read_config(d, "model_index.json")
    names = [n for n in COMPONENTS if n != "text_encoder_3" or (use_t5 and (index.get(n) or [None])[0] is not None)]
    for name in (*names, "tokenizer", "tokenizer_2", "scheduler") + (("tokenizer_3",) if "text_encoder_3" in names else ()):
        resolve_dir(d, name)
    return d, index, tuple(names)


def load_component(snapshot: Path, name: str, dtype=jnp.float32) -> tuple[Callable, PyTree]:
    """``(apply_fn, params)`` of one component of :data:`COMPONENTS` from its safetensors (the VAE's decoder)."""
    if name == "transformer":
        return convert.load_mmdit(snapshot, dtype)
    if name == "vae":
        _, decode_fn, params = convert.load_vae(snapshot, dtype)
        return decode_fn, params
    if name == "text_encoder_3":
        return convert.load_t5(snapshot, dtype)
    return convert.load_clip_text(snapshot, dtype, subfolder=name)


def abstract_component(snapshot: Path, name: str, dtype=jnp.float32) -> tuple[Callable, PyTree]:
    """``(apply_fn, params as ShapeDtypeStructs)`` of one component, from its config only (nothing allocated)."""
    config = read_config(snapshot / name)
    if name == "transformer":
        return mmdit.from_config(config, key=None, dtype=dtype)
    if name == "vae":
        _, decode_fn, abstract = vae.from_config(config, key=None, dtype=dtype)
        return decode_fn, abstract
    if name == "text_encoder_3":
        return t5.from_config(config, key=None, dtype=dtype)
    return clip.text_from_config(config, key=None, dtype=dtype)


def save_params(directory: str | os.PathLike, params: PyTree) -> None:
    """Writes one parameter pytree as an orbax checkpoint at ``directory`` (which must not exist)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), params)
        checkpointer.wait_until_finished()


def restore_params(directory: str | os.PathLike, abstract: PyTree) -> PyTree:
    """The pytree :func:`save_params` wrote, restored to the shapes and dtypes (cast) of ``abstract``.

    Raises:
      FileNotFoundError: naming ``directory``.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"parameter checkpoint not found: {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory, abstract)


def _tokenizer(snapshot: Path, index: dict, name: str):
    import transformers

    directory = resolve_dir(snapshot, name)
    if not any((directory / f).is_file() for f in _VOCABULARY_FILES):
        raise FileNotFoundError(f"tokenizer directory {directory} has none of the vocabulary files {_VOCABULARY_FILES}")
    cls = getattr(transformers, (index.get(name) or [None, None])[1] or "AutoTokenizer")
    try:
        return cls.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"cannot load tokenizer {name!r} from {directory}: {e}") from e


def _scheduler_config(snapshot: Path) -> dict:
    config = read_config(snapshot / "scheduler", "scheduler_config.json")
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{snapshot / 'scheduler'}: scheduler {name!r} unsupported (only FlowMatchEulerDiscreteScheduler)")
    used = [k for k in _SCHEDULER_OPTIONS if config.get(k)]
    if used:
        raise ValueError(f"{snapshot / 'scheduler'}: scheduler options {used} are not supported")
    return config


def from_pretrained(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    use_t5: bool = True,
    params_checkpoint: str | os.PathLike | None = None,
    text_dtype=None,
    text_only: bool = False,
    text_encoders: bool = True,
) -> SD3Pipeline:
    """An :class:`SD3Pipeline` from a diffusers SD3 / SD3.5 snapshot directory or HF cache repo id.

    Args:
      path: the snapshot (configs, tokenizers, and weights unless ``params_checkpoint`` is given).
      dtype: parameter dtype (and the MMDiT's compute dtype).
      use_t5: load T5 if the snapshot has it; False runs without it (diffusers' ``text_encoder_3=None``).
      params_checkpoint: a directory written by ``tools/convert_sd3.py`` to read the parameters from
        (cast to ``dtype``) instead of the safetensors.
      text_dtype: the text encoders' parameter (and compute) dtype, default ``dtype``; T5's ``wo`` stays in at
        least float32 (:func:`cast_text_encoders`). Each weight is cast on the host as it is read.
      text_only: load only the text encoders and tokenizers (``transformer_fn`` / ``vae_decode_fn`` None; the
        sampling constants still come from the configs): what encoding prompts needs.
      text_encoders: False loads no text encoder (``clip_l_fn``, ``clip_g_fn``, ``t5_fn`` None; the tokenizers are
        still read): for prompts whose embeddings were precomputed (``tools/encode_prompts.py``).

    Raises:
      FileNotFoundError: naming a missing ``model_index.json``, subfolder, tokenizer or checkpoint item.
      ValueError / WeightError: for an unsupported config or weights that do not fit it, or ``text_only`` without
        ``text_encoders``.
    """
    if text_only and not text_encoders:
        raise ValueError("from_pretrained: text_only and text_encoders=False leave nothing to load")
    snapshot, index, names = snapshot_components(path, use_t5)
    with_t5 = "text_encoder_3" in names
    transformer = mmdit.MMDiTConfig.from_dict(read_config(snapshot / "transformer"))
    vae_config = vae.VAEConfig.from_diffusers(read_config(snapshot / "vae"))
    scheduler = _scheduler_config(snapshot)
    tokenizers = [_tokenizer(snapshot, index, name) for name in ("tokenizer", "tokenizer_2")]
    tokenizers.append(_tokenizer(snapshot, index, "tokenizer_3") if with_t5 else None)
    fns, params = {}, {}
    for name in names:
        if (text_only and name not in TEXT_ENCODERS) or (not text_encoders and name in TEXT_ENCODERS):
            continue
        component_dtype = text_dtype if name in TEXT_ENCODERS and text_dtype is not None else dtype
        if params_checkpoint is None:
            fns[name], params[name] = load_component(snapshot, name, component_dtype)
        else:
            fns[name], abstract = abstract_component(snapshot, name, component_dtype)
            params[name] = restore_params(Path(params_checkpoint) / name, abstract)
    return SD3Pipeline(
        transformer_fn=fns.get("transformer"),
        vae_decode_fn=fns.get("vae"),
        clip_l_fn=fns.get("text_encoder"),
        clip_g_fn=fns.get("text_encoder_2"),
        t5_fn=fns.get("text_encoder_3"),
        params=params,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        tokenizer_3=tokenizers[2],
        shift=float(scheduler.get("shift", 1.0)),
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        vae_scale=vae_config.scaling_factor,
        vae_shift=vae_config.shift_factor,
        vae_scale_factor=2 ** (len(vae_config.block_out_channels) - 1),
        latent_channels=transformer.in_channels,
        sample_size=transformer.sample_size,
        patch_size=transformer.patch_size,
        joint_attention_dim=transformer.joint_attention_dim,
    )
