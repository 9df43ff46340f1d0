"""Images from one trained model or from several fused at denoising time (MSDDA) for any preference weights.

    python -m marble_jax.sample --models=runs/clip,runs/aesthetic --weights=0.3,0.7 --prompts="a red car" \\
        [--etas=0.8,1.0] [--num_steps=20] [--images_per_prompt=4] [--guidance=1.0] [--seed=0] [--out=samples]

``--models``: training workdirs of :mod:`marble_jax.train` (each with ``config.json`` and ``checkpoints/``), all
fine-tuned from the same base model (the same ``model`` and LoRA settings), ``base`` for the base model itself, or
``lora:PATH`` for a LoRA adapter a PyTorch trainer wrote (:func:`marble_jax.models.lora.load_lora`: diffusers' file,
a peft directory, a DiffusionNFT / Flow-GRPO checkpoint). Without a workdir among them, ``--config`` names the base
model (e.g. ``--config=configs/k5.py:sd35 --config.model.path=DIR``) and the adapters' rank, alpha and modules set
its LoRA; with one, adapters must match its LoRA.
Their EMA parameters (``--params=ema``, the default, as evaluation uses) or raw parameters (``--params=params``) are
stacked and every sampler step runs the M models in one batched network call (:func:`marble_jax.msdda.fused_sample`):
each model's Flow-GRPO SDE step with its own ``--etas`` noise level, fused in closed form with ``--weights`` (on the
simplex). One model with weight 1 is plain SDE sampling; ``--etas=0`` everywhere fuses deterministic (Euler) steps.

``--prompts``: a prompt file (``.txt``, one per line, or ``.jsonl``) or one literal prompt. Writes one PNG per image
(``<out>/<prompt index>_<image index>.png``), ``<out>/grid.png`` and ``<out>/sample.json`` (the settings).
"""

from __future__ import annotations

import json
import logging as std_logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from marble_jax import image_grid, msdda, sampling, train
from marble_jax.checkpoint import quiet_orbax_logs
from marble_jax.experiment import Setup, build_setup
from marble_jax.models import lora
from marble_jax.prompts import load_prompts

PyTree = Any
BASE = "base"
ADAPTER = "lora:"
# Settings that must agree between fused runs: the base model and the shape of what was trained on it.
_SHARED = ("model", "finetune", "lora")

# The command line's flags exist only when this module runs as a program: the module is also a library
# (tools import it), and absl flags defined at import clash with another command's of the same name.
if __name__ == "__main__":
    _MODELS = flags.DEFINE_list("models", None, "training workdirs (or 'base'), comma-separated")
    _WEIGHTS = flags.DEFINE_list("weights", None, "preference weights, one per model, summing to 1 (default: uniform)")
    _ETAS = flags.DEFINE_list("etas", None, "SDE noise level per model (default: config.sample.eta of each run)")
    _PROMPTS = flags.DEFINE_string("prompts", None, "a prompt file (.txt / .jsonl) or one literal prompt")
    _NUM_STEPS = flags.DEFINE_integer("num_steps", 20, "sampler steps")
    _IMAGES = flags.DEFINE_integer("images_per_prompt", 1, "images per prompt")
    _SEED = flags.DEFINE_integer("seed", 0, "noise seed (the same seed gives the same noise for any models / weights)")
    _PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "params"], "which parameters of each run")
    _BATCH = flags.DEFINE_integer("batch", 16, "images per sampler call")
    _GUIDANCE = flags.DEFINE_float("guidance", 1.0, "classifier-free guidance scale of every model (1: none, as training)")
    _OUT = flags.DEFINE_string("out", "samples", "output directory")
    _CONFIG = config_flags.DEFINE_config_file("config", None, "the base model's config, for --models without a workdir")
    flags.mark_flags_as_required(["models", "prompts"])


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a training workdir was run with (its ``config.json``)."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir of marble_jax.train")
    return train.saved_config(json.loads(path.read_text())["config"])


def shared_config(workdirs: Sequence[str | Path]) -> ml_collections.ConfigDict:
    """The config of the first run, checked against the others on the base model and the fine-tuning settings."""
    configs = [run_config(w) for w in workdirs]
    plain = lambda c, key: c[key].to_dict() if isinstance(c[key], ml_collections.ConfigDict) else c[key]  # noqa: E731
    for w, c in zip(workdirs[1:], configs[1:], strict=True):
        for key in _SHARED:
            if plain(c, key) != plain(configs[0], key):
                raise ValueError(f"{w}: config.{key} differs from {workdirs[0]}'s; fused models must share the base model")
    return configs[0]


def sampling_setup(config: ml_collections.ConfigDict) -> Setup:
    """The :class:`~marble_jax.experiment.Setup` of ``config`` without its rewards (sampling reads no reward model)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.rewards, config.eval_only_rewards = (), ()
    return build_setup(config)


def load_trained(setup: Setup, config: ml_collections.ConfigDict, workdir: str | Path, which: str = "ema") -> PyTree:
    """The trained parameters (``which``: ``ema`` or ``params``) of ``workdir``'s latest checkpoint."""
    _, state = train.restore_run(setup, config, workdir)
    return state.ema_params if which == "ema" else state.params


def base_trainable(setup: Setup) -> PyTree:
    """Trainable parameters that give the base model: zero LoRA factors, or a copy of the base weights."""
    fresh = setup.init_trainable(setup.base_params, jax.random.key(0))
    return jax.tree.map(jnp.zeros_like, fresh) if setup.lora_spec is not None else fresh


def adapter_config(config: ml_collections.ConfigDict, paths: Sequence[str]) -> ml_collections.ConfigDict:
    """``config`` with the LoRA (rank, alpha, modules) of the adapters at ``paths``, which must all agree."""
    specs = [lora.load_lora(p)[1] for p in paths]
    for p, spec in zip(paths[1:], specs[1:], strict=True):
        if (spec.rank, spec.alpha, spec.targets) != (specs[0].rank, specs[0].alpha, specs[0].targets):
            raise ValueError(f"adapter {p}: rank, alpha or modules differ from {paths[0]}'s; fused adapters must agree")
    config = ml_collections.ConfigDict(config.to_dict())
    config.finetune = "lora"
    config.lora.update(rank=specs[0].rank, alpha=specs[0].alpha, targets=specs[0].targets)
    return config


def make_fused_sampler(setup: Setup, num_steps: int, guidance: float = 1.0):
    """Jitted ``sample(base, stacked, decode_params, context [B, L, D], pooled [B, Dp], w [M], etas [M], key) ->
    uint8 [B, H, W, 3]``: :func:`marble_jax.msdda.fused_sample` of the M stacked trainable trees; ``guidance > 1``:
    each model with classifier-free guidance against the empty prompt (:func:`marble_jax.sampling.guided_velocity`)."""
    sigmas = sampling.sigma_schedule(num_steps, shift=setup.shift)
    empty = setup.encode([""]) if guidance != 1.0 else None

    @jax.jit
    def sample(base, stacked, decode_params, context, pooled, w, etas, key):
        k_init, k_sde = jax.random.split(key)
        x_T = jax.random.normal(k_init, (context.shape[0], *setup.latent_shape))

        def velocity(params, x, t):
            if empty is None:
                return setup.velocity_fn(base, params, x, t, context, pooled)
            uncond = tuple(jnp.broadcast_to(jnp.asarray(e), (context.shape[0], *e.shape[1:])) for e in empty)
            model = lambda xx, tt, c: setup.velocity_fn(base, params, xx, tt, *c)  # noqa: E731
            return sampling.guided_velocity(model, (context, pooled), uncond, guidance)(x, t)

        latents = msdda.fused_sample(velocity, stacked, x_T, sigmas, w, etas, k_sde).latents
        return setup.decode_fn(decode_params, latents)

    return sample


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    std_logging.getLogger("marble_jax").setLevel(std_logging.INFO)
    quiet_orbax_logs()
    models = _MODELS.value
    runs = [m for m in models if m != BASE and not m.startswith(ADAPTER)]
    adapters = [m[len(ADAPTER) :] for m in models if m.startswith(ADAPTER)]
    if not runs and not adapters:
        raise app.UsageError("--models needs a training workdir or a lora:PATH adapter (the base model: --models=base,<run>)")
    if not runs and _CONFIG.value is None:
        raise app.UsageError("--models without a training workdir needs --config, the base model's config")
    m = len(models)
    w = np.full(m, 1 / m) if _WEIGHTS.value is None else np.asarray([float(x) for x in _WEIGHTS.value])
    if w.shape != (m,):
        raise app.UsageError(f"--weights has {w.size} values for {m} models")
    config = shared_config(runs) if runs else adapter_config(_CONFIG.value, adapters)
    etas = np.asarray([float(x) for x in _ETAS.value]) if _ETAS.value else None
    if etas is None:
        etas = np.asarray([run_config(mm).sample.eta if mm in runs else config.sample.eta for mm in models])
    if etas.shape != (m,) or np.any(etas < 0):
        raise app.UsageError(f"--etas needs {m} non-negative values, got {list(etas)}")
    msdda.check_weights(w, m)
    setup = sampling_setup(config)

    def trained(model: str) -> PyTree:
        if model == BASE:
            return base_trainable(setup)
        if model.startswith(ADAPTER):
            return lora.load_matching(model[len(ADAPTER) :], setup.lora_spec, setup.base_params, "--models lora:")
        return load_trained(setup, config, model, _PARAMS.value)

    trees = [trained(mm) for mm in models]
    stacked = msdda.stack_params(trees)

    p = Path(_PROMPTS.value)
    prompts = [q.text for q in load_prompts(p)] if p.is_file() else [_PROMPTS.value]
    texts = [t for t in prompts for _ in range(_IMAGES.value)]
    context, pooled = setup.encode(texts)
    sample = make_fused_sampler(setup, _NUM_STEPS.value, _GUIDANCE.value)
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(_SEED.value)
    images, start = [], time.perf_counter()
    for i in range(0, len(texts), _BATCH.value):
        n = min(_BATCH.value, len(texts) - i)
        rows = np.minimum(np.arange(i, i + _BATCH.value), i + n - 1)  # a fixed batch shape: one compilation
        imgs = sample(setup.base_params, stacked, setup.decode_params, context[rows], pooled[rows], jnp.asarray(w, jnp.float32),
                      jnp.asarray(etas, jnp.float32), jax.random.fold_in(key, i))  # fmt: skip
        images.append(np.asarray(imgs)[:n])
        logging.info("%d / %d images", i + n, len(texts))
    images = np.concatenate(images)
    for j, img in enumerate(images):
        Image.fromarray(img).save(out / f"{j // _IMAGES.value:04d}_{j % _IMAGES.value:02d}.png")
    image_grid.save_grid(images, out / "grid.png", cols=int(np.ceil(np.sqrt(len(images)))))
    settings = dict(models=models, weights=w.tolist(), etas=etas.tolist(), prompts=prompts, guidance=_GUIDANCE.value)
    settings.update(num_steps=_NUM_STEPS.value, images_per_prompt=_IMAGES.value, seed=_SEED.value, params=_PARAMS.value)
    (out / "sample.json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"wrote {len(images)} images to {out} in {time.perf_counter() - start:.1f} s (compilation included)")


if __name__ == "__main__":
    app.run(main)
