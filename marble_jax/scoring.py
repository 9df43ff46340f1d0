"""Held-out scoring of a policy: sample the evaluation prompts (CFG-free ODE, REFERENCE §2: Euler, guidance 1),
score them with every evaluation reward, write metrics, a PNG grid and a JSON line.

Used by the trainer (every ``config.eval.every`` steps, on the EMA parameters) and by
:mod:`marble_jax.evaluate` (the paper's table from checkpoints).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from marble_jax import image_grid, sampling, sharding
from marble_jax.experiment import Setup
from marble_jax.prompts import Prompt

PyTree = Any
log = logging.getLogger("marble_jax.scoring")


def eval_subset(prompts: Sequence[Prompt], num: int) -> list[Prompt]:
    """``num`` prompts spread evenly over ``prompts`` (all of them when ``num`` is 0 or too large), in order."""
    if num <= 0 or num >= len(prompts):
        return list(prompts)
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, num).round().astype(int)]


def mean_scores(rewards: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of each reward over the samples where it applies (NaN: applies nowhere)."""
    return {n: float(np.nanmean(r)) if np.isfinite(r).any() else float("nan") for n, r in rewards.items()}


class Evaluator:
    """Samples and scores ``config.eval.num_prompts`` held-out prompts x ``config.eval.images_per_prompt`` images.

    The noise is fixed (``config.seed``): every evaluation of a run, and of every run of a comparison, sees the
    same initial latents, so differences between evaluations are the policy's.
    """

    def __init__(self, setup: Setup, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        e = config.eval
        self.setup, self.mesh, self.batch = setup, mesh, e.batch
        base = eval_subset(setup.eval_prompts, e.num_prompts)
        self.prompts = [p for p in base for _ in range(e.images_per_prompt)]
        self.key = jax.random.fold_in(jax.random.key(config.seed), 10_000_019)
        self.grid_images = e.grid_images
        self._context: np.ndarray | None = None
        sigmas = sampling.sigma_schedule(e.num_steps, shift=setup.shift)

        def generate(base_params, trainable, decode_params, context, pooled, key):
            x_T = jax.random.normal(key, (context.shape[0], *setup.latent_shape))
            fn = lambda x, t: setup.velocity_fn(base_params, trainable, x, t, context, pooled)  # noqa: E731
            return setup.decode_fn(decode_params, sampling.sample(fn, x_T, sigmas, method=e.method).latents)

        self._generate = jax.jit(generate, out_shardings=sharding.batch_sharding(mesh, 4))

    def images(self, trainable: PyTree | None, base: PyTree, decode_params: PyTree) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` samples of the evaluation prompts (``trainable=None``: the base model)."""
        if self._context is None:
            self._context, self._pooled = self.setup.encode([p.text for p in self.prompts])
        out = []
        for i in range(0, len(self.prompts), self.batch):
            n = min(self.batch, len(self.prompts) - i)
            rows = np.minimum(np.arange(i, i + self.batch), i + n - 1)  # the last batch padded with its last prompt
            ctx = sharding.to_global(self._context[rows], sharding.batch_sharding(self.mesh, 3))
            pooled = sharding.to_global(self._pooled[rows], sharding.batch_sharding(self.mesh, 2))
            imgs = self._generate(base, trainable, decode_params, ctx, pooled, jax.random.fold_in(self.key, i))
            out.append(sharding.to_host(imgs)[:n])
        return np.concatenate(out)

    def scores(self, images: np.ndarray) -> dict[str, float]:
        """Mean held-out score of every evaluation reward on ``images`` (of :meth:`images`)."""
        texts, meta = [p.text for p in self.prompts], [p.metadata for p in self.prompts]
        return mean_scores({n: fn(images, texts, meta) for n, fn in self.setup.eval_rewards.items()})

    def run(self, trainable: PyTree | None, base: PyTree, decode_params: PyTree, step: int, writer, workdir: Path) -> dict:
        """Samples, scores, and writes ``eval/<reward>`` scalars, ``samples/step_<n>.png`` and a line of ``eval.jsonl``."""
        images = self.images(trainable, base, decode_params)
        scores = self.scores(images)
        writer.write_scalars(step, {f"eval/{n}": v for n, v in scores.items()})
        if jax.process_index() == 0:
            grid = image_grid.grid(images[: self.grid_images], cols=int(np.ceil(np.sqrt(self.grid_images))), scale=2)
            writer.write_images(step, {"samples": grid[None]})
            image_grid.save_grid(images[: self.grid_images], Path(workdir) / "samples" / f"step_{step:06d}.png",
                                 cols=int(np.ceil(np.sqrt(self.grid_images))), scale=2)  # fmt: skip
            with open(Path(workdir) / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scores}) + "\n")
        log.info("eval at step %d: %s", step, "  ".join(f"{n}={v:.4f}" for n, v in scores.items()))
        return scores
