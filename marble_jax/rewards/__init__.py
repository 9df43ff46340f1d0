"""Reward registry: ``get(name, **options) -> reward_fn`` and ``names()``.

A reward function maps ``(images uint8 [B, H, W, 3], prompts: list[str], metadata: list[dict |
None])`` to float32 ``[B]`` rewards, NaN where the reward does not apply to a sample (OCR on a
prompt without quoted text, GenEval on a prompt without metadata). ``get`` returns it wrapped
with the input checks, so every reward validates its inputs the same way, and with
``reward_fn.applies(prompts, metadata) -> bool [B]``: where the reward is defined (the factory's
function's own ``applies``, else everywhere). A NaN where the reward applies is a fault (a
broken reward model), which the trainer tells apart from "does not apply".

Entries are ``"module:factory"`` strings imported on ``get``: this module (floor 2) never
imports the world (floor 3) or a heavy model at import time. ``factory(**options)`` returns
the unwrapped reward function.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

import numpy as np

RewardFn = Callable[[np.ndarray, Sequence[str], Sequence[dict | None]], np.ndarray]

_REGISTRY: dict[str, str] = {
    # The embedded world's rule rewards (pixel detector / pixel-font reader).
    "world_geneval": "marble_jax.world.rule_rewards:world_geneval",
    "world_ocr": "marble_jax.world.rule_rewards:world_ocr",
    # Deliberately hackable (pays for mean brightness), to exercise the reward-hacking monitors (monitors.py).
    "world_brightness": "marble_jax.world.rule_rewards:world_brightness",
    # The embedded world's learned scorers (tiny Flax CLIPs / MLP, checkpoints shipped in world/assets/rewards).
    "world_clipscore": "marble_jax.world.model_rewards:world_clipscore",
    "world_pickscore": "marble_jax.world.model_rewards:world_pickscore",
    "world_hps": "marble_jax.world.model_rewards:world_hps",
    "world_aesthetic": "marble_jax.world.model_rewards:world_aesthetic",
    # The paper's rewards on real images (REFERENCE §4); checkpoints are paths in the reward's options.
    "pickscore": "marble_jax.rewards.clip_scores:pickscore",
    "clipscore": "marble_jax.rewards.clip_scores:clipscore",
    "hpsv2": "marble_jax.rewards.clip_scores:hpsv2",
    "aesthetic": "marble_jax.rewards.clip_scores:aesthetic",
    "ocr": "marble_jax.rewards.ocr_engine:ocr",
    "geneval": "marble_jax.rewards.geneval:geneval",
    # Evaluation only (the paper's table): optional package / an OpenAI-compatible endpoint.
    "imagereward": "marble_jax.rewards.eval_only:imagereward",
    "unified_reward": "marble_jax.rewards.eval_only:unified_reward",
}


def names() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def _factory(name: str) -> Callable:
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(names())}")
    module, factory = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), factory)


def default_options(name: str) -> dict[str, str | int | float | bool]:
    """The options of reward ``name`` that have a plain default (checkpoint paths, batch sizes, ...), with it:
    what a config lists so that each can be overridden on the command line."""
    params = inspect.signature(_factory(name)).parameters.values()
    return {p.name: p.default for p in params if isinstance(p.default, str | int | float | bool)}


def get(name: str, **options) -> RewardFn:
    """The reward function ``name`` built with ``options``, with its inputs validated."""
    fn = _factory(name)(**options)

    def reward_fn(images, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        images = np.asarray(images)
        check_inputs(name, images, prompts, metadata)
        out = np.asarray(fn(images, list(prompts), list(metadata)), np.float32)
        if out.shape != (images.shape[0],):
            raise ValueError(f"reward {name!r} returned shape {out.shape}, expected ({images.shape[0]},)")
        return out

    def applies(prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        own = getattr(fn, "applies", None)
        return np.ones(len(prompts), bool) if own is None else np.asarray(own(list(prompts), list(metadata)), bool)

    reward_fn.__name__ = name
    reward_fn.__doc__ = fn.__doc__
    reward_fn.applies = applies
    return reward_fn


def check_inputs(name: str, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> None:
    """Raises TypeError / ValueError naming the reward and the offending dtype, shape or lengths."""
    if images.dtype != np.uint8:
        raise TypeError(f"reward {name!r}: images must be uint8 [B, H, W, 3], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"reward {name!r}: images must be uint8 [B, H, W, 3], got shape {images.shape}")
    if isinstance(prompts, str):
        raise TypeError(f"reward {name!r}: prompts must be a list of strings, got one string")
    if len(prompts) != images.shape[0] or len(metadata) != images.shape[0]:
        raise ValueError(
            f"reward {name!r}: batch lengths differ: {images.shape[0]} images, {len(prompts)} prompts, "
            f"{len(metadata)} metadata entries"
        )
