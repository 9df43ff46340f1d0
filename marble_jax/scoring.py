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
from marble_jax.monitors import Monitor, scores_path, sheet_path
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

    def __init__(self, setup: Setup, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, monitor: Monitor | None = None):
        e = config.eval
        self.monitor = monitor  # the trainer's reward-hacking monitors (marble_jax/monitors.py), told every result
        self.setup, self.mesh, self.batch = setup, mesh, e.batch
        self.eval_prompts = eval_subset(setup.eval_prompts, e.num_prompts)
        self.prompts = [p for p in self.eval_prompts for _ in range(e.images_per_prompt)]
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

    def per_image_scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 ``[N]`` scores of every evaluation reward on ``images`` (of :meth:`images`; NaN: n/a)."""
        texts, meta = [p.text for p in self.prompts], [p.metadata for p in self.prompts]
        return {n: np.asarray(fn(images, texts, meta), np.float32) for n, fn in self.setup.eval_rewards.items()}

    def scores(self, images: np.ndarray) -> dict[str, float]:
        """Mean held-out score of every evaluation reward on ``images`` (of :meth:`images`)."""
        return mean_scores(self.per_image_scores(images))

    def run(self, trainable: PyTree | None, base: PyTree, decode_params: PyTree, step: int, writer, workdir: Path) -> dict:
        """Samples, scores, and writes ``eval/<reward>`` scalars, ``samples/step_<n>.png``, a line of ``eval.jsonl``
        and the per-image scores ``samples/step_<n>_scores.json`` (``{"prompts": [P], "prompt_index": [N], "scores":
        {reward: [N]}}``: image i is of held-out prompt ``prompt_index[i]``, NaN where a reward does not apply; the
        data of :mod:`marble_jax.statistics`' intervals over prompts). With a monitor, its ``monitor/*`` scalars of this
        evaluation are written with the ``eval/*`` ones (:meth:`marble_jax.monitors.Monitor.on_eval`)."""
        images = self.images(trainable, base, decode_params)
        per_image = self.per_image_scores(images)
        scores = mean_scores(per_image)
        # --- monitors: the evaluation's result handed to the reward-hacking monitors (marble_jax/monitors.py) ---
        extra = self.monitor.on_eval(step, scores, per_image) if self.monitor is not None else {}
        writer.write_scalars(step, {**{f"eval/{n}": v for n, v in scores.items()}, **extra})
        if jax.process_index() == 0:
            grid = image_grid.grid(images[: self.grid_images], cols=int(np.ceil(np.sqrt(self.grid_images))), scale=2)
            writer.write_images(step, {"samples": grid[None]})
            image_grid.save_grid(images[: self.grid_images], sheet_path(workdir, step),
                                 cols=int(np.ceil(np.sqrt(self.grid_images))), scale=2)  # fmt: skip
            with open(Path(workdir) / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scores}) + "\n")
            per_prompt = len(self.prompts) // len(self.eval_prompts)
            detail = {
                "prompts": [p.text for p in self.eval_prompts],
                "prompt_index": [i // per_prompt for i in range(len(self.prompts))],
                "scores": {n: v.tolist() for n, v in per_image.items()},
            }
            scores_path(workdir, step).write_text(json.dumps(detail) + "\n")  # rewritten when a resume re-evaluates
        log.info("eval at step %d: %s", step, "  ".join(f"{n}={v:.4f}" for n, v in scores.items()))
        return scores
