"""Step-level DPO (MSDDA paper, Lemma 1) and Diffusion-DPO in the flow-matching convention, NHWC latents.

Lemma 1's loss for a preference pair (winner ``x0_w``, loser ``x0_l``) noised with the same ``t`` and ``eps``:

    L = -log sigmoid(-beta (D_w - D_l - D_diff)),
    D_* = ||eps - eps_theta(x*_t)||^2 - ||eps - eps_ref(x*_t)||^2,
    D_diff = ||eps_theta(x^w_t) - eps_ref(x^w_t)||^2 - ||eps_theta(x^l_t) - eps_ref(x^l_t)||^2,

``eps_ref`` the frozen pretrained (reference) model. Diffusion-DPO (Wallace et al.) is the same without ``D_diff``.
The step-level term keeps the model closer to the reference on the loser than on the winner (the paper's Remark 1).
The winner and the loser share ``t`` and ``eps``, as Diffusion-DPO's public code does: the lemma draws them
independently, but sharing makes ``D_w - D_l`` a paired comparison in which the noise's own difficulty cancels.

Epsilon from the velocity: with ``x_t = (1 - t) x0 + t eps`` and ``v = eps - x0``,
``x_t + (1 - t) v = (1 - t) x0 + t eps + (1 - t) eps - (1 - t) x0 = eps``, so ``eps_theta = x_t + (1 - t) v_theta``,
and ``eps - eps_theta = (1 - t) (v* - v_theta)`` with ``v* = eps - x0``: every squared norm is ``(1 - t)^2`` times its
velocity-space counterpart, computed that way (no cancellation through ``x_t``). Norms are per-sample means over
H, W, C, as Diffusion-DPO's public code does.

Weighting: the paper's ``lambda_T omega(lambda_t)`` is a constant (omega constant, as the paper and Diffusion-DPO use
in practice), ``beta``. Diffusion-DPO's public code writes ``-logsigmoid(-0.5 beta_dpo (...))`` with ``beta_dpo``
2000-5000 for SD1.5 on mean-reduced norms; our default ``beta = 1000`` is its 2000 with the 0.5 folded in. The
``(1 - t)^2`` factor is the epsilon parametrisation's own weighting of the velocity errors; it is kept so that
``D_*`` are the lemma's quantities.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Attributes: ``beta`` (the constant ``lambda_T omega``), ``step_level`` (False: Diffusion-DPO, no ``D_diff``)."""

    beta: float = 1000.0
    step_level: bool = True

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")


class DPOInputs(NamedTuple):
    """A batch of P preference pairs at one timestep, everything but the trained velocities.

    Attributes:
      x0_w, x0_l: ``[P, H, W, C]`` winner and loser latents.
      eps: ``[P, H, W, C]`` the noise of both (``x*_t = (1 - t) x0* + t eps``).
      t: ``[P]`` times in [0, 1].
      v_ref_w, v_ref_l: ``[P, H, W, C]`` the reference model's velocities at ``x^w_t``, ``x^l_t`` (no gradient).
    """

    x0_w: Array
    x0_l: Array
    eps: Array
    t: Array
    v_ref_w: Array
    v_ref_l: Array


def _sq(x: Array) -> Array:
    return jnp.mean(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))


def _check_shapes(v_w: Array, v_l: Array, inputs: DPOInputs) -> None:
    shape = inputs.x0_w.shape
    if len(shape) != 4:
        raise ValueError(f"DPOInputs.x0_w must be [P, H, W, C], got shape {shape}")
    for name, x in (("v_w", v_w), ("v_l", v_l), *((f"DPOInputs.{k}", getattr(inputs, k)) for k in DPOInputs._fields)):
        expected = shape[:1] if name == "DPOInputs.t" else shape
        if x.shape != expected:
            raise ValueError(f"{name} must have shape {expected} (x0_w is {shape}), got {x.shape}")


def dpo_loss(v_w: Array, v_l: Array, inputs: DPOInputs, config: DPOConfig) -> tuple[Array, dict[str, Array]]:
    """``(loss, metrics)`` of the trained velocities ``v_w, v_l [P, H, W, C]`` at ``x^w_t``, ``x^l_t``: the mean over
    pairs of the module doc's loss. Metrics: ``dpo_accuracy`` (fraction of pairs whose implicit reward margin
    ``-(D_w - D_l - D_diff)`` is positive), ``d_w``, ``d_l``, ``d_diff`` (means)."""
    _check_shapes(v_w, v_l, inputs)
    scale = jnp.square(1 - inputs.t.astype(jnp.float32))  # [P]: eps-space = (1 - t)^2 velocity-space
    target_w = inputs.eps - inputs.x0_w
    target_l = inputs.eps - inputs.x0_l
    d_w = scale * (_sq(target_w - v_w) - _sq(target_w - inputs.v_ref_w))
    d_l = scale * (_sq(target_l - v_l) - _sq(target_l - inputs.v_ref_l))
    d_diff = scale * (_sq(v_w - inputs.v_ref_w) - _sq(v_l - inputs.v_ref_l)) if config.step_level else jnp.zeros_like(d_w)
    margin = -config.beta * (d_w - d_l - d_diff)
    loss = jnp.mean(-jax.nn.log_sigmoid(margin))
    metrics = {"dpo_accuracy": jnp.mean(margin > 0), "d_w": jnp.mean(d_w), "d_l": jnp.mean(d_l), "d_diff": jnp.mean(d_diff)}
    return loss, metrics


def best_worst_pairs(scores: Array, num_groups: int) -> tuple[Array, Array]:
    """One pair per prompt group from one reward: ``(winner [G], loser [G])`` indices into ``scores [B]``.

    Samples are grouped contiguously (``B = G x n``, group g = samples ``g n .. g n + n - 1``, as the trainer lays out
    a prompt's images). The winner is the group's best score, the loser its worst; NaN (the reward does not apply) is
    never picked. A group with fewer than two scored samples, or all of them tied, gives ``winner == loser``: a pair
    whose loss is the constant ``log 2`` with zero gradient (it counts in the mean over pairs, nothing else).
    """
    if scores.ndim != 1 or num_groups < 1 or scores.shape[0] % num_groups:
        raise ValueError(f"scores must be [B] with B a multiple of num_groups = {num_groups}, got shape {scores.shape}")
    groups = scores.reshape(num_groups, -1)
    finite = jnp.isfinite(groups)
    winner = jnp.argmax(jnp.where(finite, groups, -jnp.inf), axis=1)
    loser = jnp.argmin(jnp.where(finite, groups, jnp.inf), axis=1)
    best = jnp.take_along_axis(groups, winner[:, None], 1)[:, 0]
    worst = jnp.take_along_axis(groups, loser[:, None], 1)[:, 0]
    valid = (jnp.sum(finite, axis=1) >= 2) & (best > worst)
    offset = jnp.arange(num_groups) * groups.shape[1]
    return offset + winner, offset + jnp.where(valid, loser, winner)
