"""Reward-hacking monitors: signals that the policy is gaming its rewards rather than improving its images.

Users of the PyTorch originals report images drifting (oversaturation, wiped backgrounds, brightness creep) while
the trained reward rises. The trainer logs, at every step (scalars of step ``n + 1``, as the other per-step ones):

* ``monitor/brightness``: mean luma of the step's rollout images in [0, 1] (:func:`brightness`);
* ``monitor/saturation``: mean HSV saturation of those images in [0, 1] (:func:`saturation`);
* ``monitor/x0_norm``: mean root-mean-square of the rollouts' final latents x0 (:func:`x0_norm`), and
  ``monitor/x0_norm_ratio``: that over the base model's. The base's is ``monitor/x0_norm`` of the run's first step
  (step 0): its rollouts come from the old policy, which is the initial policy at step 0 (LoRA's B starts at zero,
  full fine-tuning starts from a copy), with the rollout sampler the later steps use, so the ratio is 1 at step 0
  and measures the drift of the same quantity. A resumed run reads it back from the first row of
  ``metrics.jsonl``. (The step-0 evaluation would see the same policy, but with another sampler and the held-out
  prompts, so its norm is not the rollouts'.) Each step's prompts differ, so the ratio moves with them a little;
* ``monitor/gap/<reward>``: each trained reward's training score (``train/<reward>``, the mean over this step's
  rollouts) minus its held-out score at the last evaluation (``eval/<reward>``). A gap that grows says the policy
  is fitting the reward on its own rollouts (or the training prompts) more than on the held-out prompts. The two
  are not the same measurement everywhere: the rollouts are sampled stochastically with the training sampler and
  the held-out images with the evaluation sampler, on other prompts, and GenEval is partial in training and strict
  in evaluation, so its gap is offset from the start; watch its trend, not its level.

At every evaluation after step 0, each evaluation-only reward (``config.eval_only_rewards`` that are not trained:
the aesthetic on the world and at sd35) is compared with the step-0 evaluation, the base: a value below the base's
mean by more than ``config.monitors.eval_only_margin`` times the base's per-image standard deviation (over the
evaluation images, ``ddof=0``) logs a WARNING naming the reward, the step, the value and the base's, and the
evaluation logs ``monitor/eval_only_shift/<reward>``, the change in those units. The default margin, 0.5, is
"medium" effect size on Cohen's scale: the whole distribution of images moved down by half its spread. Measured on
the world (192 held-out prompts): the base's aesthetic is 6.12 with a per-image std of 0.64, so the margin is 0.32;
the multi-reward runs of the README's reproduction lowered it by 0.12 - 0.24 (0.19 - 0.37 std), a trade-off the
paper's table shows too, and stay under it. A resumed run reads the base from ``eval.jsonl`` (the step-0 row) and
its standard deviations from ``samples/step_000000_scores.json`` (the evaluator's per-image scores).

Image statistics are pure ``jnp`` functions (jit-able, on the batch-sharded device arrays the trainer holds);
:class:`Monitor` keeps the per-run references on the host.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from marble_jax import sharding

Array = jax.Array
log = logging.getLogger("marble_jax.monitors")

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of gamma-encoded R, G, B (what JPEG and PIL's ``convert("L")`` use)."""


def brightness(images: Array) -> Array:
    """float32 ``[B]``: the mean luma ``Y' = 0.299 R + 0.587 G + 0.114 B`` of uint8 ``images [B, H, W, 3]``, in
    [0, 1] (white 1, black 0)."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return jnp.mean(x @ jnp.asarray(LUMA_WEIGHTS, jnp.float32), axis=(1, 2))


def saturation(images: Array) -> Array:
    """float32 ``[B]``: the mean HSV saturation ``(max - min) / max`` over the pixels of uint8 ``images [B, H, W,
    3]`` (0 for a black pixel), in [0, 1]: 0 for any grey image, 1 for pure primaries."""
    x = jnp.asarray(images, jnp.float32)
    hi, lo = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    return jnp.mean(jnp.where(hi > 0, (hi - lo) / jnp.maximum(hi, 1.0), 0.0), axis=(1, 2))


def x0_norm(x0: Array) -> Array:
    """float32 ``[B]``: the root-mean-square of each final latent ``x0 [B, h, w, c]`` (the L2 norm over
    ``sqrt(h w c)``, so a run's images and latents of any size compare)."""
    x = jnp.asarray(x0, jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim))))


@jax.jit
def _chunk_statistics(x0: Array, images: Array) -> Array:
    """float32 ``[3]``: the batch means of brightness, saturation and x0 norm of one rollout chunk."""
    return jnp.stack([jnp.mean(brightness(images)), jnp.mean(saturation(images)), jnp.mean(x0_norm(x0))])


def rollout_statistics(chunks: Sequence[tuple[Array, Array]]) -> dict[str, float]:
    """``{brightness, saturation, x0_norm}``: the means over every sample of the rollout chunks ``[(x0 [b, h, w, c],
    images uint8 [b, H, W, 3]), ...]`` (global, possibly multi-process arrays: every process gets the same)."""
    sizes = np.array([x0.shape[0] for x0, _ in chunks], np.float64)
    stats = np.stack([sharding.to_host(_chunk_statistics(x0, images)) for x0, images in chunks])
    mean = (sizes[:, None] * stats).sum(0) / sizes.sum()
    return dict(zip(("brightness", "saturation", "x0_norm"), (float(v) for v in mean), strict=True))


def _read_jsonl(path: Path, upto: int) -> list[dict]:
    """The rows of a ``*.jsonl`` log with ``step <= upto``, the last of each step, in step order."""
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["step"] <= upto:
                rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def scores_path(workdir: Path, step: int) -> Path:
    """Where the evaluator writes the per-image scores of its evaluation at ``step``."""
    return Path(workdir) / "samples" / f"step_{step:06d}_scores.json"


def sheet_path(workdir: Path, step: int) -> Path:
    """Where the evaluator writes the sample sheet (a grid of the first held-out images) of its evaluation at
    ``step``."""
    return Path(workdir) / "samples" / f"step_{step:06d}.png"


class Monitor:
    """The per-run state of the monitors (module doc): the base's references and the last held-out scores.

    Used by the trainer: :meth:`step_scalars` once per step, :meth:`on_eval` after every evaluation (through
    :class:`marble_jax.scoring.Evaluator`). References missing from this session (a resumed run) are read from the
    workdir's logs the first time either is called, up to the step it is called at (the logs past a resumed step
    are the interrupted run's)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        self.workdir = Path(workdir)
        self.trained = tuple(config.rewards)
        self.eval_only = tuple(n for n in config.eval_only_rewards if n not in self.trained)
        self.margin = float(config.monitors.eval_only_margin)
        self.base_x0_norm: float | None = None
        self.base: dict[str, tuple[float, float]] | None = None  # step-0 evaluation: reward -> (mean, per-image std)
        self.last_eval: dict[str, float] | None = None
        self._restored = False
        self._said: set[str] = set()

    def _once(self, key: str, message: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    def _restore(self, step: int) -> None:
        """Fills the references not measured in this session from the logs' rows up to ``step`` (once)."""
        if self._restored:
            return
        self._restored = True
        evals = _read_jsonl(self.workdir / "eval.jsonl", step)
        if evals and self.last_eval is None:
            self.last_eval = {k: v for k, v in evals[-1].items() if k != "step"}
        if evals and evals[0]["step"] == 0 and self.base is None:
            path = scores_path(self.workdir, 0)
            per_image = json.loads(path.read_text())["scores"] if path.exists() else {}
            self.base = {
                k: (float(v), _std(per_image[k]) if k in per_image else math.nan) for k, v in evals[0].items() if k != "step"
            }
        if self.base_x0_norm is None:
            first = _read_jsonl(self.workdir / "metrics.jsonl", step)[:1]
            if first and first[0]["step"] == 1 and "monitor/x0_norm" in first[0]:
                self.base_x0_norm = float(first[0]["monitor/x0_norm"])

    def step_scalars(self, step: int, chunks: Sequence[tuple[Array, Array]], scalars: Mapping[str, float]) -> dict:
        """The ``monitor/*`` scalars of optimizer step ``step`` (0-based; logged at ``step + 1``) from its rollout
        chunks ``[(x0, images), ...]`` and the step's other scalars (``train/<reward>``)."""
        self._restore(step)
        stats = rollout_statistics(chunks)
        if step == 0:
            self.base_x0_norm = stats["x0_norm"]
        out = {f"monitor/{k}": v for k, v in stats.items()}
        if self.base_x0_norm:
            out["monitor/x0_norm_ratio"] = stats["x0_norm"] / self.base_x0_norm
        else:
            self._once("x0", "monitors: no base x0 norm (no step-1 row of %s with it): no monitor/x0_norm_ratio",
                       self.workdir / "metrics.jsonl")  # fmt: skip
        for name in self.trained:
            train, held_out = scalars.get(f"train/{name}"), (self.last_eval or {}).get(name)
            if train is not None and held_out is not None and math.isfinite(train) and math.isfinite(held_out):
                out[f"monitor/gap/{name}"] = float(train) - float(held_out)
        return out

    def on_eval(self, step: int, scores: Mapping[str, float], per_image: Mapping[str, np.ndarray]) -> dict:
        """After the evaluation at ``step``: its mean ``scores`` and ``per_image`` scores. Step 0 is the base; later
        steps warn for each evaluation-only reward below the base by more than the margin (module doc). Returns the
        ``monitor/eval_only_shift/<reward>`` scalars of this evaluation."""
        self._restore(step)
        if step == 0:
            self.base = {n: (float(v), _std(per_image[n]) if n in per_image else math.nan) for n, v in scores.items()}
        self.last_eval = {n: float(v) for n, v in scores.items()}
        out: dict[str, float] = {}
        if step == 0 or not self.eval_only:
            return out
        if self.base is None:
            self._once("base", "monitors: no step-0 evaluation in %s: the evaluation-only rewards are not checked",
                       self.workdir / "eval.jsonl")  # fmt: skip
            return out
        for name in self.eval_only:
            mean0, std0 = self.base.get(name, (math.nan, math.nan))
            value = float(scores.get(name, math.nan))
            if not (math.isfinite(value) and math.isfinite(mean0)):
                continue
            if not math.isfinite(std0):
                self._once(f"std/{name}", "monitors: no per-image base scores of %s (%s): its drop is not checked",
                           name, scores_path(self.workdir, 0))  # fmt: skip
                continue
            if std0 > 0:
                out[f"monitor/eval_only_shift/{name}"] = (value - mean0) / std0
            if value < mean0 - self.margin * std0:
                log.warning(
                    "monitors: evaluation-only reward %s fell to %.4f at step %d, below the base's %.4f (step 0) by "
                    "%.4f, more than config.monitors.eval_only_margin = %g x the base's per-image std %.4f: the trained "
                    "rewards may be being hacked (look at samples/step_%06d.png)",
                    name,
                    value,
                    step,
                    mean0,
                    mean0 - value,
                    self.margin,
                    std0,
                    step,
                )
        return out


def eval_only_shift(workdir: str | Path, step: int, reward: str) -> float:
    """The change of ``reward``'s held-out mean from the step-0 evaluation (the base) to the evaluation at ``step``,
    in units of the base's per-image standard deviation: what :meth:`Monitor.on_eval` logs as
    ``monitor/eval_only_shift/<reward>`` (it warns below ``-config.monitors.eval_only_margin``), read back from the
    evaluator's per-image score files of a run. NaN when the reward is not among the scores or the base's std is 0.

    Raises:
      FileNotFoundError: a run without the per-image scores of step 0 or ``step``.
    """
    values = []
    for s in (0, step):
        path = scores_path(Path(workdir), s)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no per-image scores of {workdir}'s evaluation at step {s}")
        values.append(np.asarray(json.loads(path.read_text())["scores"].get(reward, [math.nan]), np.float64))
    base, now = values
    std0 = _std(base)
    if not (math.isfinite(std0) and std0 > 0):
        return math.nan
    return (float(np.nanmean(now)) - float(np.nanmean(base))) / std0


def _std(values) -> float:
    """The population standard deviation of the finite ``values`` (NaN: where the reward does not apply)."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    return float(x.std()) if len(x) else math.nan
