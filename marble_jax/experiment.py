"""The :class:`Setup` of a run: what the trainer and the evaluator see of a model, built from a config for the
embedded world (``config.model.path`` empty: the default) or for an SD3 / SD3.5 snapshot in diffusers layout.

Everything a run needs is resolved and checked here, before any compute is spent: the model files, the prompt
files (:func:`marble_jax.prompts.load_prompts`), the reward names and their checkpoints (a reward factory that
cannot find its files raises here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from marble_jax import rewards as reward_registry
from marble_jax.models import lora, mmdit
from marble_jax.models.functional import functionalize
from marble_jax.prompts import Prompt, load_prompts

log = logging.getLogger("marble_jax.experiment")

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """Everything the loop needs from a model.

    Attributes:
      name: what the model is (shown in logs).
      velocity_fn: ``(base, trainable | None, x [B, h, w, c], t [B] in [0, 1], context [B, L, D], pooled [B, Dp])
        -> v``; ``trainable=None`` is the reference (base) model.
      base_params: the frozen parameters.
      init_trainable: ``(base, key) -> trainable`` (a fresh LoRA, the ``lora.init_from`` adapter, or a copy of the
        base for full fine-tuning).
      decode_fn: ``(decode_params, latents [B, h, w, c]) -> uint8 [B, H, W, 3]``, jittable.
      decode_params: the decoder's parameters (``{}`` for pixel latents).
      encode: host-side ``prompts -> (context [P, L, D], pooled [P, Dp])`` (numpy); the trainer caches it per prompt.
      latent_shape: ``(h, w, c)``.
      text_shape: ``((L, D), Dp)``, one prompt's context and pooled sizes.
      shift: the sampler grid's shift.
      train_prompts, eval_prompts: the prompt sets.
      rewards: training reward functions by name, in the order of the K axis.
      eval_rewards: held-out reward functions by name (e.g. GenEval strict instead of partial).
      lora_spec: the LoRA of ``trainable``, None for full fine-tuning.
    """

    name: str
    velocity_fn: Callable[..., Array]
    base_params: PyTree
    init_trainable: Callable[[PyTree, Array], PyTree]
    decode_fn: Callable[[PyTree, Array], Array]
    decode_params: PyTree
    encode: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
    latent_shape: tuple[int, int, int]
    text_shape: tuple[tuple[int, int], int]
    shift: float
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    rewards: dict[str, Callable]
    eval_rewards: dict[str, Callable]
    lora_spec: lora.LoRASpec | None


def build_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The MMDiT build options of ``config.model``: master ``dtype``, ``compute_dtype`` (empty: the master dtype),
    ``remat`` (none / block / dots), ``scan_blocks`` and ``attention`` (the kernel); the same for LoRA and full
    fine-tuning."""
    m = config.model
    compute = jnp.dtype(m.compute_dtype) if m.compute_dtype else None
    return dict(dtype=jnp.dtype(m.dtype), compute_dtype=compute, remat=m.remat, scan_blocks=m.scan_blocks, attention=m.attention)


def _velocity(module_config: dict, config: ml_collections.ConfigDict) -> tuple[Callable, Callable, Any]:
    """``(velocity_fn, init_trainable, lora_spec)`` for ``config.finetune`` over the MMDiT of ``module_config``,
    built with :func:`build_kwargs` (full fine-tuning and LoRA alike compute in ``compute_dtype`` with ``remat``)."""
    module = mmdit.build(module_config, **build_kwargs(config))
    if config.finetune == "full":
        apply_fn, _ = functionalize(module)

        def velocity(base, trainable, x, t, context, pooled):
            return apply_fn(base if trainable is None else trainable, x, 1000 * t, context, pooled)

        return velocity, lambda base, key: jax.tree.map(jnp.copy, base), None
    if config.finetune != "lora":
        raise ValueError(f"config.finetune must be 'lora' or 'full', got {config.finetune!r}")
    spec = lora.LoRASpec(
        rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets, init_std=config.lora.init_std
    )
    lora_apply = lora.with_lora(module, spec)

    def velocity(base, trainable, x, t, context, pooled):
        return lora_apply(base, trainable, x, 1000 * t, context, pooled)

    init_from = config.lora.init_from
    if not init_from:
        return velocity, lambda base, key: lora.init_lora(base, spec, key), spec
    # A run started from a PyTorch / exported adapter (lora.load_lora), checked here, before any compute.
    _, abstract = functionalize(module)
    adapter = lora.load_matching(init_from, spec, abstract, "config.lora.init_from")
    return velocity, lambda base, key: jax.tree.map(jnp.asarray, adapter), spec


def _train_and_eval_rewards(config: ml_collections.ConfigDict) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """The training and held-out reward functions by name (held-out: the trained ones, then
    ``config.eval_only_rewards``; a trained reward's held-out options are its training options updated by
    ``config.eval_reward_options``); a reward with the same options in both is built (its checkpoint read) once.
    Unknown reward names and missing reward checkpoints raise here; changed options of a reward not used are
    ignored with a warning."""
    names, eval_only, known = list(config.rewards), list(config.eval_only_rewards), reward_registry.names()
    unknown = [n for n in names + eval_only if n not in known]
    if unknown:
        raise ValueError(f"config.rewards / eval_only_rewards: unknown reward(s) {unknown}; registered rewards: {known}")
    eval_only = [n for n in eval_only if n not in names]  # a trained reward is evaluated anyway
    for field, used in (("reward_options", names), ("eval_reward_options", names + eval_only)):
        unused = sorted(set(config[field]) - set(used))
        if any(n not in known for n in unused):
            raise ValueError(f"config.{field}: options for unknown reward(s) {[n for n in unused if n not in known]}")
        changed = [n for n in unused if not dict(config[field][n]).items() <= reward_registry.default_options(n).items()]
        if changed:  # the configs list every reward's defaults; a changed option of a reward not used does nothing
            log.warning("config.%s: options set for rewards that are not used are ignored: %s", field, changed)
    built: dict[tuple[str, str], Callable] = {}

    def get(name: str, *options: ml_collections.ConfigDict) -> Callable:
        opts = {k: v for o in options for k, v in dict(o.get(name, {})).items()}
        key = (name, json.dumps(opts, sort_keys=True))
        if key not in built:
            built[key] = reward_registry.get(name, **opts)
        return built[key]

    train = {n: get(n, config.reward_options) for n in names}
    return train, {n: get(n, config.reward_options, config.eval_reward_options) for n in names + eval_only}


def _prompt_set(path: str | None, default: Callable[[], list[Prompt]], what: str) -> list[Prompt]:
    if path:
        return load_prompts(path)
    if default is None:
        raise ValueError(f"config.prompts.{what} must name a prompt file (.txt or .jsonl) for a model snapshot")
    return default()


def build_setup(config: ml_collections.ConfigDict) -> Setup:
    """The :class:`Setup` of ``config``: the embedded world when ``config.model.path`` is empty, else the snapshot."""
    if config.model.path:
        return _sd3_setup(config)
    return _world_setup(config)


def _world_setup(config: ml_collections.ConfigDict) -> Setup:
    from marble_jax.world import model as world_model
    from marble_jax.world import scenes

    train_rewards, eval_rewards = _train_and_eval_rewards(config)
    world = world_model.load_world_model(config.model.world_dir or None)
    velocity, init_trainable, spec = _velocity(world.config["mmdit"], config)
    context, pooled = world.encode([""])

    def world_prompts(split: str) -> Callable[[], list[Prompt]]:
        return lambda: [Prompt(p.text, p.metadata) for p in scenes.split_prompts(split)]

    return Setup(
        name=f"embedded world ({world_model.ASSETS if not config.model.world_dir else config.model.world_dir})",
        velocity_fn=velocity,
        base_params=world.params["mmdit"],
        init_trainable=init_trainable,
        decode_fn=lambda _, latents: world_model.to_uint8(latents),
        decode_params={},
        encode=lambda texts: tuple(np.asarray(a) for a in world.encode(list(texts))),
        latent_shape=(scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3),
        text_shape=(tuple(context.shape[1:]), pooled.shape[1]),
        shift=float(world.config["shift"]) if config.sample.shift is None else config.sample.shift,
        train_prompts=_prompt_set(config.prompts.train, world_prompts("train"), "train"),
        eval_prompts=_prompt_set(config.prompts.eval, world_prompts("heldout"), "eval"),
        rewards=train_rewards,
        eval_rewards=eval_rewards,
        lora_spec=spec,
    )


def sd3_text_shape(transformer_config: dict, max_sequence_length: int) -> tuple[tuple[int, int], int]:
    """``((77 + max_sequence_length, joint_attention_dim), pooled_projection_dim)``: SD3's prompt embedding sizes."""
    cfg = mmdit.MMDiTConfig.from_dict(transformer_config)
    return (77 + max_sequence_length, cfg.joint_attention_dim), cfg.pooled_projection_dim


def abstract_sd3_setup(config: ml_collections.ConfigDict, transformer_config: dict, scheduler_shift: float = 3.0) -> Setup:
    """A :class:`Setup` of an SD3 transformer from its config alone, with abstract (``ShapeDtypeStruct``) base
    parameters and no text encoders, decoder or rewards: what ``tools/plan_sd35.py`` lowers the trainer's step on."""
    velocity, init_trainable, spec = _velocity(transformer_config, config)
    _, base = mmdit.from_config(transformer_config, key=None, dtype=jnp.dtype(config.model.dtype))
    cfg = mmdit.MMDiTConfig.from_dict(transformer_config)
    side = config.model.resolution // 8

    def no_encoder(texts):
        raise RuntimeError("an abstract setup has no text encoders")

    return Setup(
        name="abstract SD3 transformer",
        velocity_fn=velocity,
        base_params=base,
        init_trainable=init_trainable,
        decode_fn=lambda _, latents: latents,
        decode_params={},
        encode=no_encoder,
        latent_shape=(side, side, cfg.in_channels),
        text_shape=sd3_text_shape(transformer_config, config.model.max_sequence_length),
        shift=scheduler_shift if config.sample.shift is None else config.sample.shift,
        train_prompts=[],
        eval_prompts=[],
        rewards={},
        eval_rewards={},
        lora_spec=spec,
    )


def _sd3_setup(config: ml_collections.ConfigDict) -> Setup:
    from marble_jax import pipeline as sd3
    from marble_jax import prompt_cache
    from marble_jax.models.weights import read_config

    m = config.model
    dtype = jnp.dtype(m.dtype)
    text_dtype = jnp.dtype(m.text_dtype) if m.text_dtype else dtype
    train_prompts = _prompt_set(config.prompts.train, None, "train")  # before the (slow) weights
    eval_prompts = _prompt_set(config.prompts.eval, None, "eval")
    train_rewards, eval_rewards = _train_and_eval_rewards(config)
    snapshot, _, names = sd3.snapshot_components(m.path, m.use_t5)
    transformer_config = read_config(snapshot / "transformer")
    text_shape = sd3_text_shape(transformer_config, m.max_sequence_length)
    store = None
    if config.prompts.embeddings:  # written by tools/encode_prompts.py
        store = prompt_cache.PrecomputedEmbeddings(config.prompts.embeddings)
        store.check(max_sequence_length=m.max_sequence_length, use_t5="text_encoder_3" in names)
        if tuple(store.context_shape) != text_shape[0]:
            raise ValueError(f"{store.path}: context rows {store.context_shape}, the model needs {text_shape[0]}")
        if store.settings.get("model") != str(m.path):
            log.warning("%s was encoded with %s; this run's model is %s", store.path, store.settings.get("model"), m.path)
    covered = store is not None and all(t in store for t in {"", *(p.text for p in train_prompts + eval_prompts)})
    velocity, init_trainable, spec = _velocity(transformer_config, config)  # an init_from adapter is checked here
    # The text encoders run in text_dtype (T5's wo in float32) on the default device, or with encode_on_cpu in host
    # memory; when the precomputed embeddings hold every prompt they are not loaded at all.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu) if m.encode_on_cpu else contextlib.nullcontext():
        pipe = sd3.from_pretrained(m.path, dtype, use_t5=m.use_t5, params_checkpoint=m.params_checkpoint or None,
                                   text_dtype=text_dtype, text_encoders=not covered)  # fmt: skip
    _, h, w, c = pipe.latent_shape(1, m.resolution, m.resolution)

    def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        with jax.default_device(cpu) if m.encode_on_cpu else contextlib.nullcontext():
            context, pooled = pipe.encode(list(texts), max_sequence_length=m.max_sequence_length, batch=m.text_batch)
            return np.asarray(context), np.asarray(pooled)

    embed = prompt_cache.EmbeddingCache(None if covered else encode, batch=m.text_batch,
                                        max_bytes=int(config.prompts.cache_gb * 2**30), precomputed=store)  # fmt: skip
    return Setup(
        name=f"SD3 snapshot {m.path}",
        velocity_fn=velocity,
        base_params=pipe.params["transformer"],
        init_trainable=init_trainable,
        decode_fn=functools.partial(sd3.decode_images, pipe.vae_decode_fn),
        decode_params=pipe.params["vae"],
        encode=embed,
        latent_shape=(h, w, c),
        text_shape=text_shape,
        shift=pipe.shift if config.sample.shift is None else config.sample.shift,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        rewards=train_rewards,
        eval_rewards=eval_rewards,
        lora_spec=spec,
    )
