"""The RL loop: rollouts from the old policy, K rewards, per-reward advantages, DiffusionNFT updates balanced
by the configured method, on a ``(data, fsdp)`` mesh, checkpointed and resumable.

One epoch is one optimizer step (REFERENCE §2, the multi-reward config), as data::

    prompts of the epoch (prompts.prompt_groups)      -> cached embeddings, repeated per image  [B, L, D], [B, Dp]
    rollout(old params), in chunks                    -> latents x0 [B, h, w, c], images uint8 [B, H, W, 3]
    K reward functions on a host thread pool          -> rewards [K, B]  (overlapping the next chunk's rollout)
    train_step (one jitted program):
      advantages per reward (group = prompt)          -> r [K, B] (or one row: single / weighted sum / sequential)
      each sample's int(0.99 S) sampler timesteps     -> M = T x (B / train_batch) micro-batches
      v_old, v_ref per micro-batch; NFT terms; balance.accumulated_direction -> direction (+ diagnostics)
      clip + AdamW (skipped when not finite); old <- d old + (1 - d) theta; EMA for evaluation

Keys are derived by name from the run's root key and the step (``fold_in``), and the prompts from
``(seed, step)``, so a resumed run draws exactly the numbers of an uninterrupted one. Methods:
``single`` (one reward), ``weighted_sum`` (the public baseline: one reward = weighted sum of raw scores),
``sequential`` (one reward at a time, cycling through ``config.sequential_stages``), ``marble``,
``marble_amortized`` and ``marble_gram`` (the exact solve at every step from per-sample gradients)
(:mod:`marble_jax.balance`).
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from marble_jax import advantages, balance, dpo, mgda, monitors, prompt_cache, run_log, sampling, sharding, throughput
from marble_jax.checkpoint import Checkpointer
from marble_jax.experiment import Setup
from marble_jax.nft_loss import NFTConfig, NFTInputs
from marble_jax.prompts import Prompt, prompt_groups
from marble_jax.scoring import Evaluator

Array = jax.Array
PyTree = Any
METHODS = ("single", "weighted_sum", "sequential", "marble", "marble_amortized", "marble_gram", "dpo")
RESUMABLE_CHANGES = (
    "total_epochs",
    "eval",
    "eval.*",
    "checkpoint",
    "checkpoint.*",
    "log_every",
    "monitors",
    "monitors.*",
    "diagnostics_every",
    # where and how the same computation runs: a checkpoint restores onto any mesh (resharded), remat changes no value,
    # and a reward's batching, device and worker count change how it is computed, not its scores
    "mesh",
    "mesh.*",
    "model.remat",
    "lora.init_from",  # only a new run's initial adapter: a resumed run's comes from its checkpoint
    "model.scan_blocks",
    "model.attention",
    "model.encode_on_cpu",
    "model.text_batch",
    "prompts.cache_gb",
    "prompts.embeddings",
    "reward_options.*.batch_size",
    "reward_options.*.device",
    "reward_options.*.workers",
    "eval_reward_options.*.batch_size",
    "eval_reward_options.*.device",
    "eval_reward_options.*.workers",
)
"""Config entries (``fnmatch`` patterns over dotted keys) a resumed run may change; any other difference from the
checkpointed config is an error."""
_PURPOSE = {"rollout": 0, "train": 1, "eval": 2, "init": 3}
log = logging.getLogger("marble_jax.train")


class TrainState(NamedTuple):
    """The whole resumable state (a pytree; ``key`` is raw uint32 key data, ``step`` the data position)."""

    step: Array
    params: PyTree
    old_params: PyTree
    ema_params: PyTree
    opt_state: Any
    mgda: mgda.MGDAState
    key: Array


# ----------------------------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ValueError naming the config entry for settings the loop cannot run with (before any compute)."""
    if config.method not in METHODS:
        raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}")
    names = list(config.rewards)
    if not names:
        raise ValueError("config.rewards is empty")
    if config.method in ("single", "dpo") and config.single_reward not in names:
        raise ValueError(f"config.single_reward {config.single_reward!r} is not one of config.rewards {names}")
    if config.method == "weighted_sum":
        unknown = set(config.reward_weights) - set(names)
        if unknown:
            raise ValueError(f"config.reward_weights has rewards not in config.rewards: {sorted(unknown)}")
    if config.method == "sequential":
        if not config.sequential_stages:
            raise ValueError("config.sequential_stages is empty (method 'sequential' needs (reward, epochs) stages)")
        for name, epochs in config.sequential_stages:
            if name not in names or int(epochs) < 1:
                raise ValueError(
                    f"config.sequential_stages: stage ({name!r}, {epochs}) needs a reward of {names} and epochs >= 1"
                )
    s = config.sample
    batch = s.prompts_per_epoch * s.images_per_prompt
    for key, value in (("sample.rollout_batch", s.rollout_batch), ("sample.train_batch", s.train_batch)):
        if value < 1 or batch % value:
            raise ValueError(
                f"config.{key} = {value} must divide the epoch batch prompts_per_epoch x images_per_prompt = {batch}"
            )
        if value % num_devices:
            raise ValueError(f"config.{key} = {value} must be a multiple of the {num_devices} devices (batch-sharded)")
    if config.eval.batch % num_devices:
        raise ValueError(f"config.eval.batch = {config.eval.batch} must be a multiple of the {num_devices} devices")
    if config.method == "dpo" and s.prompts_per_epoch % dpo_pairs_per_micro_batch(config):
        raise ValueError(
            f"method 'dpo' trains one (winner, loser) pair per prompt, min(train_batch / 2, prompts_per_epoch) pairs per "
            f"micro-batch: config.sample.train_batch = {s.train_batch} gives {dpo_pairs_per_micro_batch(config)}, which "
            f"must divide prompts_per_epoch = {s.prompts_per_epoch}"
        )
    if trained_timesteps(config) < 1:
        raise ValueError(
            f"config.sample.timestep_fraction x num_steps trains no timestep ({s.timestep_fraction} x {s.num_steps})"
        )
    if config.method == "dpo" and dpo_timesteps(config) < 1:
        raise ValueError(f"method 'dpo' needs config.sample.num_steps >= 2 (t = 1 teaches DPO nothing), got {s.num_steps}")
    for key, value in (
        ("eval.every", config.eval.every),
        ("log_every", config.log_every),
        ("checkpoint.every", config.checkpoint.every),
    ):
        if value < 1:
            raise ValueError(f"config.{key} = {value} must be >= 1 (steps between two of them)")
    if config.checkpoint.every_minutes < 0:
        raise ValueError(f"config.checkpoint.every_minutes = {config.checkpoint.every_minutes} must be >= 0 (0: off)")
    if config.old_policy_schedule not in (1, 2):
        raise ValueError(f"config.old_policy_schedule = {config.old_policy_schedule!r} must be 1 or 2")
    for key, value in (("sample.method", s.method), ("eval.method", config.eval.method)):
        if value not in sampling.METHODS:
            raise ValueError(f"config.{key} = {value!r} is not one of {sampling.METHODS}")
    if config.finetune == "full" and config.lora.init_from:
        raise ValueError(
            f"config.lora.init_from = {config.lora.init_from!r} starts a LoRA run from an adapter; config.finetune is "
            "'full' (merge the adapter into the base weights, or train with --config.finetune=lora)"
        )
    if config.get("scale") == "sd35" and not config.model.path:
        raise ValueError(
            "config.scale = 'sd35' (the paper's run: --config=...:sd35) needs config.model.path, an SD3.5 snapshot; "
            "without it the run would train the embedded 32-px world under the real rewards' names"
        )


def dpo_pairs_per_micro_batch(config: ml_collections.ConfigDict) -> int:
    """Preference pairs (two samples each) per micro-batch of method ``dpo``."""
    return max(1, min(config.sample.train_batch // 2, config.sample.prompts_per_epoch))


def trained_timesteps(config: ml_collections.ConfigDict) -> int:
    """T, the timesteps of its own sampler grid each sample trains on: ``int(timestep_fraction * num_steps)``."""
    return int(config.sample.timestep_fraction * config.sample.num_steps)


def dpo_timesteps(config: ml_collections.ConfigDict) -> int:
    """The timesteps each DPO pair trains on: T, drawn from the grid without its first point ``t = 1``, where DPO's
    ``(1 - t)^2`` weight is exactly 0 (so at most ``num_steps - 1``)."""
    return min(trained_timesteps(config), config.sample.num_steps - 1)


def draw_timesteps(key: Array, count: int, sigmas: Array, config: ml_collections.ConfigDict) -> Array:
    """``t [count, T']``: each of ``count`` samples (pairs, for DPO) trains on timesteps of its own sampler grid
    ``sigmas [S + 1]``, shuffled per sample: ``T' = T`` of the grid's first S points for the NFT methods, and
    ``dpo_timesteps`` of points 1 .. S - 1 for DPO (no ``t = 1``)."""
    num_steps = config.sample.num_steps
    first, steps = (1, dpo_timesteps(config)) if config.method == "dpo" else (0, trained_timesteps(config))
    perms = jax.vmap(lambda k: first + jax.random.permutation(k, num_steps - first))(jax.random.split(key, count))
    return sigmas[perms[:, :steps]]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (REFERENCE §2 defaults in the configs)."""
    o = config.optim
    return optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )


def old_policy_decay(step: Array, schedule: int) -> Array:
    """``d`` of ``theta_old <- d theta_old + (1 - d) theta`` after optimizer step ``step`` (REFERENCE §2)."""
    step = step.astype(jnp.float32)
    if schedule == 1:
        return jnp.minimum(0.001 * step, 0.5)
    if schedule == 2:
        return jnp.where(step < 75, 0.0, jnp.minimum(0.0075 * (step - 75), 0.999))
    raise ValueError(f"config.old_policy_schedule must be 1 or 2, got {schedule}")


def ema_decay(step: Array, max_decay: float) -> Array:
    """Decay of the evaluation EMA with warm-up: ``min((1 + step) / (10 + step), max_decay)``."""
    step = step.astype(jnp.float32)
    return jnp.minimum((1 + step) / (10 + step), max_decay)


def stage_reward(config: ml_collections.ConfigDict, step: int) -> int:
    """Index (in ``config.rewards``) of the reward trained at ``step``: the single reward, or the sequential stage
    (stages cycle); 0 for the other methods (unused)."""
    names = list(config.rewards)
    if config.method in ("single", "dpo"):
        return names.index(config.single_reward)
    if config.method != "sequential":
        return 0
    stages = [(name, int(epochs)) for name, epochs in config.sequential_stages]
    pos = step % sum(e for _, e in stages)
    for name, epochs in stages:
        if pos < epochs:
            return names.index(name)
        pos -= epochs
    raise AssertionError("unreachable")


def _key(root: Array, step: Array | int, purpose: str) -> Array:
    return jax.random.fold_in(jax.random.fold_in(root, step), _PURPOSE[purpose])


# ------------------------------------------------------------------------------------------- jitted steps


def _reward_weights(rewards: Array, num_groups: int, config: ml_collections.ConfigDict) -> Array:
    """``r [K', B]`` of rewards ``[K', B]``: per-reward advantages (per prompt group) mapped to ``[0, 1]``."""
    groups = jnp.repeat(jnp.arange(num_groups), config.sample.images_per_prompt)
    kw = dict(global_std=config.advantage.global_std, adv_clip_max=config.nft.adv_clip_max, eps=config.advantage.eps)
    return advantages.reward_weights(rewards, groups, num_groups, **kw)


def live_rewards(r_all: Array) -> Array:
    """``[K]`` bools of the weights ``r_all [K, B]``: the rewards with an advantage signal in this batch. A reward
    that applies to no sample, or ties everywhere, has r = 0.5 on every sample: its policy gradient is then the
    neutral h = (s / 2B) sum_b grad (P_b + N_b), shared by every such reward and zero only at theta = theta_old. It
    carries no reward signal and is left out of the balance."""
    return jnp.any(r_all != 0.5, axis=1)


def optimality_weights(
    rewards: Array, active: Array, weights: Array, num_groups: int, config: ml_collections.ConfigDict
) -> tuple[Array, Array]:
    """``(r_all [K, B], r_applied)``: every reward's weights, and what the method trains on: ``[K, B]`` for the
    MARBLE methods, ``[B]`` otherwise (the weighted-sum reward's, or reward ``active``'s)."""
    r_all = _reward_weights(rewards, num_groups, config)
    if config.method in balance.SOLVING_MODES:
        return r_all, r_all
    if config.method == "weighted_sum":
        return r_all, _reward_weights(advantages.weighted_sum_rewards(rewards, weights)[None], num_groups, config)[0]
    return r_all, r_all[active]


def _micro_view(x: Array, train_batch: int) -> Array:
    """``[B, ...] -> [train_batch, C, ...]``, ``C = B / train_batch``: micro-batch ``c`` is ``view[:, c]``, the rows
    ``c, c + C, c + 2C, ...``. Strided, so that a batch-sharded ``x`` (contiguous rows per device) gives every device
    its own rows of every micro-batch: taking one inside the scan is a local slice, no collective."""
    return x.reshape((train_batch, -1) + x.shape[1:])


def _take(view: Array, c: Array) -> Array:
    """Micro-batch ``c`` ``[train_batch, ...]`` of a :func:`_micro_view`."""
    return jax.lax.dynamic_index_in_dim(view, c, axis=1, keepdims=False)


def nft_micro_batches(
    velocity: Callable,
    old_params: PyTree,
    x0: Array,
    context: Array,
    pooled: Array,
    rs: tuple[Array, ...],
    t_table: Array,
    key: Array,
    train_batch: int,
    *,
    kl: bool,
    mesh: jax.sharding.Mesh | None = None,
) -> balance.MicroBatches:
    """The NFT micro-batches of an epoch: ``get(i) -> (cond, NFTInputs, *r_i)``, ``cond = (x_t, t, context, pooled)``.

    ``x0 [B, h, w, c]``, ``context [B, L, D]``, ``pooled [B, Dp]``; ``rs``: weights ``[B]`` or ``[K, B]``;
    ``t_table [B, T]``: each sample's trained timesteps. Micro-batch ``i`` is timestep column ``i // C`` of the rows of
    :func:`_micro_view` chunk ``i % C`` (``C = B / train_batch``; M = T C in all), with noise drawn from
    ``fold_in(key, i)``, ``x_t = (1 - t) x0 + t eps``, and ``v_old = velocity(old_params, cond)``, ``v_ref =
    velocity(None, cond)`` (zeros without ``kl``) run there, under ``stop_gradient``. With ``mesh`` the micro-batch
    is constrained to the batch axes."""

    def on_batch_axes(x: Array) -> Array:
        return x if mesh is None else jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim))

    chunks = x0.shape[0] // train_batch
    t_view = _micro_view(t_table, train_batch)
    x0_v, ctx_v, pld_v = (on_batch_axes(_micro_view(a, train_batch)) for a in (x0, context, pooled))
    r_views = tuple(jnp.moveaxis(_micro_view(jnp.moveaxis(r, -1, 0), train_batch), (0, 1), (-2, -1)) for r in rs)

    def get(i: Array) -> tuple:
        j, c = i // chunks, i % chunks
        x0_i = on_batch_axes(_take(x0_v, c))
        t_i = _take(t_view, c)[:, j]
        eps = on_batch_axes(jax.random.normal(jax.random.fold_in(key, i), x0_i.shape, x0_i.dtype))
        tb = t_i[:, None, None, None]
        x_t = (1 - tb) * x0_i + tb * eps
        cond = (x_t, t_i, on_batch_axes(_take(ctx_v, c)), on_batch_axes(_take(pld_v, c)))
        v_old = jax.lax.stop_gradient(velocity(old_params, cond))
        v_ref = jax.lax.stop_gradient(velocity(None, cond)) if kl else jnp.zeros_like(v_old)
        r_i = tuple(jax.lax.dynamic_index_in_dim(v, c, axis=-1, keepdims=False) for v in r_views)
        return (cond, NFTInputs(x0_i, x_t, t_i, v_old, v_ref), *r_i)

    return balance.MicroBatches(t_table.shape[1] * chunks, get)


def make_train_step(
    setup: Setup,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable:
    """``train_step(state, base, x0 [B, h, w, c], context [B, L, D], pooled [B, Dp], rewards [K, B], active, weights [K],
    solve, diagnose) -> (state, metrics)``, ``solve`` and ``diagnose`` static: one optimizer step of the epoch's
    rollouts (see the module doc). With ``mesh``, every micro-batch is kept on the batch axes ``(data, fsdp)``.

    The M = T x B / train_batch micro-batches are made inside the accumulation scan by index (:class:`balance.
    MicroBatches`): each gathers its rows of ``x0``, ``context``, ``pooled`` and its timesteps, draws its noise and
    runs the frozen forwards (old and reference policies) there. Nothing is repeated per timestep, so memory beyond
    one micro-batch's activations does not grow with T x context."""
    nft = NFTConfig(**config.nft)
    dpo_cfg = dpo.DPOConfig(**config.dpo)
    mode = config.method if config.method in (*balance.SOLVING_MODES, "weighted_sum") else "single"
    bal = balance.BalanceConfig(mode=mode, **config.balance)
    s = config.sample
    num_groups, train_batch = s.prompts_per_epoch, s.train_batch
    sigmas = sampling.sigma_schedule(s.num_steps, shift=setup.shift)

    def dpo_direction(state: TrainState, velocity, x0, context, pooled, rewards, active, k_perm, k_eps) -> balance.Direction:
        """Step-level DPO (or Diffusion-DPO) on one (best, worst) pair per prompt of ``rewards[active]``."""
        winner, loser = dpo.best_worst_pairs(rewards[active], num_groups)  # [G] each
        pairs = winner.shape[0]
        per = dpo_pairs_per_micro_batch(config)
        chunks = pairs // per
        t_view = _micro_view(draw_timesteps(k_perm, pairs, sigmas, config), per)  # [per, G / per, T']
        x0_w, x0_l = _micro_view(x0[winner], per), _micro_view(x0[loser], per)
        ctx, pld = _micro_view(context[winner], per), _micro_view(pooled[winner], per)  # the pair's prompt

        def get(i: Array) -> tuple:
            j, c = i // chunks, i % chunks
            xw, xl, tt = _take(x0_w, c), _take(x0_l, c), _take(t_view, c)[:, j]
            eps = jax.random.normal(jax.random.fold_in(k_eps, i), xw.shape, xw.dtype)  # shared by winner and loser
            tb = tt[:, None, None, None]
            x_t = jnp.concatenate([(1 - tb) * xw + tb * eps, (1 - tb) * xl + tb * eps])  # [2 per, ...]
            both = lambda a: jnp.concatenate([a, a])  # noqa: E731
            cond = (x_t, both(tt), both(_take(ctx, c)), both(_take(pld, c)))
            return cond, jax.lax.stop_gradient(velocity(None, cond)), xw, xl, eps, tt

        def loss(params, c, v_r, x0w, x0l, e, tt):
            v_w, v_l = jnp.split(velocity(params, c), 2)
            r_w, r_l = jnp.split(v_r, 2)
            return dpo.dpo_loss(v_w, v_l, dpo.DPOInputs(x0w, x0l, e, tt, r_w, r_l), dpo_cfg)

        def one(c, v_r, x0w, x0l, e, tt):
            (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(state.params, c, v_r, x0w, x0l, e, tt)
            return grad, {"dpo_loss": value, **metrics}

        micro = balance.MicroBatches(dpo_timesteps(config) * chunks, get)
        grad, metrics = balance.micro_mean(one, micro)
        metrics["valid_pairs"] = jnp.mean(winner != loser)
        return balance.Direction(grad, state.mgda, balance.tree_all_finite(grad), metrics)

    def train_step(state: TrainState, base, x0, context, pooled, rewards, active, weights, solve: bool, diagnose: bool):
        def velocity(params, cond):
            x_t, t, ctx, pld = cond
            return setup.velocity_fn(base, params, x_t, t, ctx, pld)

        root = jax.random.wrap_key_data(state.key)
        k_perm, k_eps = jax.random.split(_key(root, state.step, "train"))
        if config.method == "dpo":
            direction = dpo_direction(state, velocity, x0, context, pooled, rewards, active, k_perm, k_eps)
            return _apply(state, direction, dict(direction.metrics))
        r_all, r_applied = optimality_weights(rewards, active, weights, num_groups, config)
        t_table = draw_timesteps(k_perm, x0.shape[0], sigmas, config)  # [B, T]: each sample's own grid, shuffled

        def feed(rs: tuple) -> balance.MicroBatches:
            kw = dict(kl=nft.kl_beta > 0, mesh=mesh)
            return nft_micro_batches(velocity, state.old_params, x0, context, pooled, rs, t_table, k_eps, train_batch, **kw)

        live = live_rewards(r_all)
        direction = balance.accumulated_direction(
            velocity, state.params, feed((r_applied,)), state.mgda, nft, bal, solve=solve, mask=live
        )
        metrics = dict(direction.metrics)
        if diagnose and mode not in balance.SOLVING_MODES:
            metrics.update(balance.accumulated_diagnostics(velocity, state.params, feed((r_all, r_applied)), nft, live))
        metrics.update(mean_r=jnp.mean(r_applied), live_rewards=live.astype(jnp.float32))
        return _apply(state, direction, metrics)

    def _apply(state: TrainState, direction: balance.Direction, metrics: dict) -> tuple[TrainState, dict]:
        """The optimizer step of ``direction`` (skipped when not finite), then the old-policy and EMA updates."""
        ok = direction.finite
        params, opt_state = balance.optimizer_step(tx, state.params, state.opt_state, direction)
        d = old_policy_decay(state.step, config.old_policy_schedule)
        e = ema_decay(state.step, config.ema_decay)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        old_params = keep(jax.tree.map(lambda o, p: d * o + (1 - d) * p, state.old_params, params), state.old_params)
        ema_params = keep(jax.tree.map(lambda m, p: e * m + (1 - e) * p, state.ema_params, params), state.ema_params)
        skipped_state = state.mgda._replace(nonfinite_count=state.mgda.nonfinite_count + 1)
        new_mgda = keep(direction.state, skipped_state)
        metrics.update(skipped=~ok, update_norm=optax.tree.norm(direction.update), old_decay=d)
        new_state = TrainState(state.step + 1, params, old_params, ema_params, opt_state, new_mgda, state.key)
        return new_state, metrics

    return train_step


def make_rollout(setup: Setup, config: ml_collections.ConfigDict) -> Callable:
    """``rollout(base, old, decode_params, context [b, L, D], pooled [b, Dp], key) -> (x0 [b, h, w, c], images uint8)``,
    CFG-free with ``config.sample.method`` on ``config.sample.num_steps`` steps."""
    s = config.sample
    sigmas = sampling.sigma_schedule(s.num_steps, shift=setup.shift)

    def rollout(base, old, decode_params, context, pooled, key):
        k_init, k_sde = jax.random.split(key)
        x_T = jax.random.normal(k_init, (context.shape[0], *setup.latent_shape), jnp.float32)
        fn = lambda x, t: setup.velocity_fn(base, old, x, t, context, pooled)  # noqa: E731
        x0 = sampling.sample(fn, x_T, sigmas, method=s.method, key=k_sde, eta=s.eta).latents
        return x0, setup.decode_fn(decode_params, x0)

    return rollout


# ---------------------------------------------------------------------------------------------- the loop


class _Stop:
    """SIGTERM (and SIGINT) while training: finish the step, save, return (every process: the loop asks them all at
    each step boundary). A second signal aborts at once (exit status 128 + signal)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            log.error("received %s again: aborting now, without saving", name)
            logging.shutdown()
            os._exit(128 + signum)
        log.warning("received %s: saving a checkpoint after this step, then stopping (again: abort now)", name)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def saved_config(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config (its ``config.json`` ``"config"``) over the defaults of its scale: keys added to the
    defaults after the run was saved take their default values (which is what the run computed with)."""
    from marble_jax import defaults

    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}  # fmt: skip

    return ml_collections.ConfigDict(merge(defaults.get_config(saved.get("scale", "world")).to_dict(), saved))


def _check_resumable(saved: dict, current: dict) -> None:
    old, new = _flat(_config_dict(saved_config(saved))), _flat(current)
    changed = sorted(
        k
        for k in set(old) | set(new)
        if old.get(k) != new.get(k) and not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE_CHANGES)
    )
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"the checkpointed run's config differs in {changed} ({detail}); use a new --workdir to change them")


def _score(name: str, fn: Callable, images: np.ndarray, prompts: Sequence[Prompt]) -> tuple[np.ndarray, str | None]:
    """``(rewards [B], fault)`` of one reward: NaN outside its domain is kept (n/a); a non-finite value where it
    applies is a fault, described by name and count (None when there is none)."""
    texts, meta = [p.text for p in prompts], [p.metadata for p in prompts]
    row = np.asarray(fn(images, texts, meta), np.float32)
    bad = ~np.isfinite(row) & fn.applies(texts, meta)
    return row, (f"{name} is not finite on {int(bad.sum())} of {len(row)} samples where it applies" if bad.any() else None)


def enable_compilation_cache(path: str) -> None:
    """Keeps the compiled programs in directory ``path`` (JAX's persistent compilation cache, programs that took over
    a second to compile): a later process running the same program, a resume after preemption or the next run of a
    study, loads it instead of compiling. Takes effect when called before the process's first compilation (as
    ``marble_jax.main`` does with ``config.compilation_cache_dir``); ``""`` does nothing."""
    if path:
        jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))


def run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The ``(data, fsdp)`` mesh of ``config.mesh`` over all devices (or the first ``num_devices``); sizes left unset
    follow the placement rule of :func:`sharding.default_mesh_shape` (LoRA: data-parallel; full fine-tuning: FSDP
    within each host)."""
    m = config.mesh
    devices = jax.devices()[: m.num_devices] if m.num_devices else jax.devices()
    data, fsdp = m.data, m.fsdp
    if data is None and fsdp is None:
        hosts = len({d.process_index for d in devices})
        data, fsdp = sharding.default_mesh_shape(len(devices), hosts, config.finetune)
    return sharding.make_mesh(data, fsdp, devices)


def frozen_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The dtype frozen weights are held in: the compute dtype (``model.compute_dtype``, else ``model.dtype``)."""
    return jnp.dtype(config.model.compute_dtype or config.model.dtype)


def frozen_layout(setup: Setup, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[PyTree, PyTree]:
    """``(abstract, shardings)`` of the frozen base on ``mesh``: in :func:`frozen_dtype`, replicated where it fits
    (:func:`sharding.frozen_shardings`, ``mesh.replicate_frozen_gb``)."""
    dtype = frozen_dtype(config)
    cast = lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)  # noqa: E731
    abstract = jax.tree.map(cast, setup.base_params)
    limit = int(config.mesh.replicate_frozen_gb * 2**30)
    return abstract, sharding.frozen_shardings(abstract, mesh, limit)


def place_frozen(setup: Setup, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> PyTree:
    """``setup.base_params`` cast and placed as :func:`frozen_layout` says (the trainer's frozen base)."""
    frozen, shardings = frozen_layout(setup, config, mesh)
    cast = lambda tree: jax.tree.map(lambda x, a: x.astype(a.dtype), tree, frozen)  # noqa: E731
    return jax.jit(cast, out_shardings=shardings)(setup.base_params)


def jit_train_step(
    setup: Setup, config: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[Callable, tuple]:
    """``(train_step, abstract_args)``: the jitted :func:`make_train_step` the trainer runs (static ``solve``,
    ``diagnose``; the state donated) and its arguments as ``ShapeDtypeStruct`` with shardings, up to the two static
    flags (what ``tools/plan_sd35.py`` lowers: the same program). Prompt embeddings are fed in :func:`frozen_dtype`
    (the network casts them to its compute dtype on entry)."""
    state, state_sh = state_layout(setup, config, tx, mesh)
    base, base_sh = frozen_layout(setup, config, mesh)
    rep = sharding.replicated(mesh)
    bsh = lambda ndim: sharding.batch_sharding(mesh, ndim)  # noqa: E731
    s = config.sample
    batch, k = s.prompts_per_epoch * s.images_per_prompt, len(config.rewards)
    (length, width), pooled_dim = setup.text_shape
    text = frozen_dtype(config)
    sds = jax.ShapeDtypeStruct
    args = (
        state,
        jax.tree.map(lambda a, sh: sds(a.shape, a.dtype, sharding=sh), base, base_sh),
        sds((batch, *setup.latent_shape), jnp.float32, sharding=bsh(4)),
        sds((batch, length, width), text, sharding=bsh(3)),
        sds((batch, pooled_dim), text, sharding=bsh(2)),
        sds((k, batch), jnp.float32, sharding=rep),
        sds((), jnp.int32, sharding=rep),
        sds((k,), jnp.float32, sharding=rep),
    )
    step = jax.jit(
        make_train_step(setup, config, tx, mesh),
        static_argnums=(8, 9),
        in_shardings=(state_sh, base_sh, bsh(4), bsh(3), bsh(2), rep, rep, rep),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )
    return step, args


def make_init_state(setup: Setup, config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> Callable:
    """``init(base) -> TrainState`` of a new run: step 0, fresh trainable parameters (old and EMA copies equal to
    them), optimizer and MGDA states, the root key of ``config.seed``."""
    root = jax.random.key(config.seed)

    def init(base: PyTree) -> TrainState:
        trainable = setup.init_trainable(base, _key(root, 0, "init"))
        state = tx.init(trainable)
        return TrainState(jnp.zeros((), jnp.int32), trainable, trainable, trainable, state, mgda.init_state(len(config.rewards)),
                          jax.random.key_data(root))  # fmt: skip

    return init


def fresh_state(setup: Setup, config: ml_collections.ConfigDict, tx: optax.GradientTransformation, shardings=None) -> TrainState:
    """A new run's state: :func:`make_init_state` of the master weights, jitted (placed by ``shardings`` if given)."""
    return jax.jit(make_init_state(setup, config, tx), out_shardings=shardings)(setup.base_params)


def state_layout(
    setup: Setup, config: ml_collections.ConfigDict, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[TrainState, TrainState]:
    """``(abstract, shardings)`` of the train state on ``mesh``: parameter-shaped trees (trainable, old, EMA,
    optimizer moments) FSDP-sharded, the step, key and MGDA state replicated. ``abstract`` carries the shardings
    (a restore target)."""
    abstract = jax.eval_shape(make_init_state(setup, config, tx), setup.base_params)
    rep = sharding.replicated(mesh)
    shardings = sharding.param_shardings(abstract, mesh)
    shardings = shardings._replace(step=rep, key=rep, mgda=jax.tree.map(lambda _: rep, abstract.mgda))
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
    return target, shardings


def restore_run(
    setup: Setup, config: ml_collections.ConfigDict, workdir: str | Path, step: int | None = None
) -> tuple[int, TrainState]:
    """``(step, state)`` of ``workdir``'s latest checkpoint (or ``step``), laid out on ``config``'s mesh.

    Raises:
      FileNotFoundError: no readable checkpoint (or none at ``step``) in ``workdir/checkpoints``.
    """
    target, _ = state_layout(setup, config, make_optimizer(config), run_mesh(config))
    with Checkpointer(Path(workdir) / "checkpoints", async_save=False) as ckpt:
        restored = ckpt.restore(target, step)
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {Path(workdir) / 'checkpoints'}")
    got_step, state, _ = restored
    return got_step, state


def run(setup: Setup, config: ml_collections.ConfigDict, workdir: str | Path, overwrite: bool = False) -> TrainState:
    """Trains ``config.total_epochs`` optimizer steps (resuming from ``workdir``'s latest checkpoint); returns the state.

    A workdir with another run's files and no checkpoint is refused unless ``overwrite`` (:mod:`marble_jax.run_log`);
    a resumed run drops its logs' rows past the restored step and evaluates where the interrupted run did not."""
    from clu import metric_writers

    workdir = Path(workdir)
    mesh = run_mesh(config)
    validate(config, mesh.size)
    names = list(config.rewards)
    k = len(names)
    tx = make_optimizer(config)
    s = config.sample
    batch = s.prompts_per_epoch * s.images_per_prompt
    log.info("model: %s | method %s | rewards %s | mesh %s", setup.name, config.method, names, dict(mesh.shape))

    root = jax.random.key(config.seed)
    rep = sharding.replicated(mesh)
    target, state_sh = state_layout(setup, config, tx, mesh)
    decode_params = jax.device_put(setup.decode_params, rep)

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    meta = {"config": _config_dict(config), "rewards": names, "model": setup.name}
    writes = jax.process_index() == 0
    run_log.claim_workdir(workdir, meta["config"], bool(ckpt.steps()), overwrite, writes)
    if ckpt.steps() and (workdir / "config.json").exists():  # a config collision is named before any restore
        _check_resumable(json.loads((workdir / "config.json").read_text()).get("config", {}), meta["config"])
    restored = ckpt.restore(target)
    if restored is None and ckpt.steps():
        raise RuntimeError(f"{ckpt.directory} has checkpoints {ckpt.steps()} but none is readable (see the warnings above)")
    if restored is None:  # from the master weights (full fine-tuning copies them), before the frozen cast
        state = fresh_state(setup, config, tx, state_sh)
        log.info("starting a new run in %s", workdir)
    else:
        step, state, saved_meta = restored
        _check_resumable(saved_meta.get("config", {}), meta["config"])
        log.info("resumed from %s step %d", workdir / "checkpoints", step)
    base = place_frozen(setup, config, mesh)
    if writes:
        (workdir / "config.json").write_text(json.dumps(meta, indent=1) + "\n")

    bsh = lambda ndim: sharding.batch_sharding(mesh, ndim)  # noqa: E731
    rollout_jit = jax.jit(make_rollout(setup, config), out_shardings=(bsh(4), bsh(4)))
    train_jit, train_args = jit_train_step(setup, config, tx, mesh)
    programs: dict[tuple, tuple[Any, float]] = {}  # compiled once per variant, with its FLOPs (throughput.py)

    def program(key: tuple, jitted, *args) -> tuple[Any, float]:
        if key not in programs:
            traced = jitted.trace(*args)
            programs[key] = traced.lower().compile(), throughput.jaxpr_flops(traced.jaxpr)
        return programs[key]

    live_fn = jax.jit(lambda r: live_rewards(_reward_weights(r, s.prompts_per_epoch, config)))
    embed = setup.encode if isinstance(setup.encode, prompt_cache.EmbeddingCache) else prompt_cache.EmbeddingCache(setup.encode)
    text_dtype = frozen_dtype(config)
    weights = np.array([float(config.reward_weights.get(n, 1.0)) for n in names], np.float32)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, k))
    monitor = monitors.Monitor(config, workdir)  # reward-hacking monitors: per-step scalars, evaluation-only checks
    evaluator = Evaluator(setup, config, mesh, monitor=monitor)
    total = config.total_epochs
    start_step = int(sharding.to_host(state.step))
    evaluated = run_log.resume_logs(workdir, start_step, writes)  # the steps already evaluated, up to start_step
    # TensorBoard event files (process 0), opened after resume_logs's purge file so that theirs sorts after it; the
    # console gets the progress line and the evaluations.
    writer = metric_writers.MultiWriter(
        [metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir)))] if jax.process_index() == 0 else []
    )
    times: list[float] = []
    last_save = time.monotonic()
    devices = list(mesh.devices.flat)

    with _Stop() as stop:
        for step in range(start_step, total):
            t0 = time.perf_counter()
            timer = throughput.PhaseTimer()
            if step % config.eval.every == 0 and step not in evaluated:
                with timer.phase("eval"):
                    evaluator.run(state.ema_params, base, decode_params, step, writer, workdir)
                evaluated.add(step)
            idx = prompt_groups(s.prompts_per_epoch, config.seed, step, len(setup.train_prompts))
            prompts = [setup.train_prompts[i] for i in idx for _ in range(s.images_per_prompt)]
            with timer.phase("encode"):
                context, pooled = (a.astype(text_dtype) for a in embed([p.text for p in prompts]))
            # Rollouts in chunks. Chunk c's images go to the reward pool as soon as they land, while the device rolls
            # out chunk c + 1 (a JAX reward's work is queued right behind it); host rewards overlap the rollouts.
            key = _key(root, step, "rollout")
            rollouts, futures, chunks = [], [], batch // s.rollout_batch
            with timer.phase("rollout"):
                for c in range(chunks + 1):
                    if c < chunks:
                        sl = slice(c * s.rollout_batch, (c + 1) * s.rollout_batch)
                        args = (base, state.old_params, decode_params, sharding.to_global(context[sl], bsh(3)),
                                sharding.to_global(pooled[sl], bsh(2)), jax.random.fold_in(key, c))  # fmt: skip
                        rollout, rollout_flops = program(("rollout",), rollout_jit, *args)
                        rollouts.append(rollout(*args))  # (x0, images) of chunk c
                    if c:  # chunk c - 1 lands while chunk c rolls out
                        rows, host = sharding.local_rows(rollouts[c - 1][1])  # this process's rows only
                        chunk_prompts = [prompts[(c - 1) * s.rollout_batch + i] for i in rows]
                        futures.append((rows, [pool.submit(_score, n, setup.rewards[n], host, chunk_prompts) for n in names]))
            with timer.phase("rewards"):
                scored = [(rows, [f.result() for f in chunk]) for rows, chunk in futures]
            rewards = np.concatenate(
                [sharding.gather_rows(rows, np.stack([row for row, _ in chunk], 1), s.rollout_batch).T for rows, chunk in scored],
                axis=1,
            )
            faults = [fault for _, chunk in scored for _, fault in chunk if fault]
            if sharding.any_process(bool(faults)) and not faults:
                faults = ["a reward fault on another process"]
            solve = config.method != "marble_amortized" or step % config.balance.solve_every == 0
            if not solve and not faults:  # a reward live now but not at the last solve has no cached coefficient
                solve = bool(sharding.to_host(mgda.needs_solve(state.mgda, live_fn(sharding.to_global(rewards, rep)))))
            diagnose = config.diagnostics_every > 0 and step % config.diagnostics_every == 0
            update_flops = 0.0
            if faults:
                log.warning("step %d: reward fault, update skipped (weights untouched): %s", step, "; ".join(faults))
                state = state._replace(step=state.step + 1)
                metrics = {"skipped": True}
            else:
                with timer.phase("update"):
                    train_step, update_flops = program(("train", solve, diagnose), train_jit, *train_args, solve, diagnose)
                    x0 = jax.device_put(jnp.concatenate([x for x, _ in rollouts]), bsh(4))
                    state, metrics = train_step(
                        state,
                        base,
                        x0,
                        sharding.to_global(context, bsh(3)),
                        sharding.to_global(pooled, bsh(2)),
                        sharding.to_global(rewards, rep),
                        sharding.to_global(np.int32(stage_reward(config, step)), rep),
                        sharding.to_global(weights, rep),
                    )
                    metrics = jax.tree.map(sharding.to_host, metrics)
                if bool(metrics["skipped"]):
                    log.warning("step %d: the update direction is not finite, update skipped (weights untouched)", step)
            done = step + 1 == total
            stopping = sharding.any_process(stop.requested)  # a stop asked on any process stops them all, here
            minutes = config.checkpoint.every_minutes
            timely = minutes > 0 and sharding.any_process(time.monotonic() - last_save >= 60 * minutes)
            if stopping or done or timely or (step + 1) % config.checkpoint.every == 0:
                with timer.phase("checkpoint"):
                    ckpt.save(step + 1, state, meta)
                last_save = time.monotonic()
            times.append(time.perf_counter() - t0)
            if writes and len(times) == 1:
                log.info(
                    "step %d took %.1fs, compiling included (once per session; left out of the step times)", step + 1, times[0]
                )
            scalars = _flat_metrics(metrics, names)
            scalars.update(
                {f"train/{n}": float(np.nanmean(rewards[i])) for i, n in enumerate(names) if np.isfinite(rewards[i]).any()}
            )
            scalars["diagnostics"] = float(diagnose and config.method not in balance.SOLVING_MODES)
            scalars.update(monitor.step_scalars(step, rollouts, scalars))  # monitor/*: image drift, train-eval gaps
            scalars.update(_throughput(timer.seconds, times[-1], batch, chunks * rollout_flops, update_flops, devices))
            writer.write_scalars(step + 1, scalars)
            if jax.process_index() == 0:
                with open(workdir / "metrics.jsonl", "a") as f:  # the same scalars, for scripts
                    f.write(json.dumps({"step": step + 1, **scalars}) + "\n")
            if writes and ((step + 1) % config.log_every == 0 or step + 1 == total):
                _progress(step + 1, total, times, scalars, names)
            if stopping:
                log.warning("stopped at step %d on request; resume by running the same command", step + 1)
                break
        else:  # also on resuming a run stopped in its last step, before its final evaluation
            if total >= start_step and total not in evaluated:
                evaluator.run(state.ema_params, base, decode_params, total, writer, workdir)
    ckpt.close()
    pool.shutdown()
    writer.flush()
    writer.close()
    return state


def _throughput(
    phases: dict[str, float], step_s: float, images: int, rollout_flops: float, update_flops: float, devices: list
) -> dict[str, float]:
    """Scalars of where a step's time went: ``time/<phase>_s`` (encode, rollout, rewards: the wait for the rewards
    after the last chunk, update, checkpoint, eval), ``time/step_s``, ``throughput/images_per_s`` (rollout images over
    the step), and, on devices of known peak, ``mfu/rollout``, ``mfu/update`` and ``mfu/step``
    (:mod:`marble_jax.throughput`)."""
    out = {f"time/{name}_s": seconds for name, seconds in phases.items()}
    out.update({"time/step_s": step_s, "throughput/images_per_s": images / step_s})
    if throughput.peak_flops(devices[0]) is not None:
        out["mfu/rollout"] = throughput.mfu(rollout_flops, phases.get("rollout", 0.0), devices)
        if update_flops:
            out["mfu/update"] = throughput.mfu(update_flops, phases.get("update", 0.0), devices)
        out["mfu/step"] = throughput.mfu(rollout_flops + update_flops, step_s, devices)
    return out


def _flat_metrics(metrics: dict, names: Sequence[str]) -> dict[str, float]:
    """Scalars for the writer: ``[K]`` vectors split per reward name (``lambda/<reward>``)."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 1 and value.shape[0] == len(names):
            out.update({f"{key}/{n}": float(v) for n, v in zip(names, value, strict=True)})
        elif value.ndim == 0:
            out[key] = float(value)
    return out


def _progress(step: int, total: int, times: list[float], scalars: dict, names: Sequence[str]) -> None:
    """One console line: a bar, step time (median of the last 10, the session's first step and its compilation
    excluded once there are others), ETA, this step's phases (rollout / rewards wait / update seconds), images/s and
    MFU where the device's peak is known, loss and rewards; ``step`` counts from the run's start (a resumed run's bar
    starts at its restored step)."""
    steady = times[1:][-10:] or times
    recent = sorted(steady)[len(steady) // 2]
    eta = recent * (total - step)
    width = 20
    filled = int(width * step / total)
    rewards = " ".join(f"{n}={scalars[f'train/{n}']:.3f}" for n in names if f"train/{n}" in scalars)
    loss = scalars.get("policy_loss", scalars.get("dpo_loss", float("nan")))
    phases = "/".join(f"{scalars.get(f'time/{p}_s', 0.0):.1f}" for p in ("rollout", "rewards", "update"))
    mfu = f"  MFU {100 * scalars['mfu/step']:.0f}%" if "mfu/step" in scalars else ""
    log.info(
        "[%s%s] %d/%d  %.2fs/step (rollout/rewards/update %ss)  %.1f img/s%s  ETA %dm%02ds  loss %.4f  %s",
        "#" * filled,
        "." * (width - filled),
        step,
        total,
        recent,
        phases,
        scalars["throughput/images_per_s"],
        mfu,
        eta // 60,
        eta % 60,
        loss,
        rewards,
    )
