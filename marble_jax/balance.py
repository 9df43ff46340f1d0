"""Update directions for multi-reward DiffusionNFT: single, weighted sum, MARBLE, amortised MARBLE.

Every mode is a pure function of a velocity function ``velocity_fn(params) -> v [B, H, W, C]``
(the network applied to this step's ``x_t``, ``t`` and conditioning), the step's
:class:`~marble_jax.nft_loss.NFTInputs`, optimality weights and an
:class:`~marble_jax.mgda.MGDAState`, and they share one code path:

1. one forward, ``v, vjp = jax.vjp(velocity_fn, params)``;
2. cotangent rows on ``v``: the NFT policy loss depends on ``v`` sample by sample, so the
   cotangent of ``L(r)`` is ``(s / B) (r_b dP_b/dv_b + (1 - r_b) dN_b/dv_b)``, with
   ``s = adv_clip_max / beta``: linear in ``r`` and cheap (elementwise);
3. ``jax.vmap(vjp)`` over the rows: R backward passes batched through one traced graph.

Modes, with ``r`` the per-reward weights ``[K, B]``:

* ``single`` / ``weighted_sum``: one row, ``L(r) + KL`` for one weight vector ``r [B]`` (the
  weighted-sum baseline's ``r`` comes from the combined reward,
  :func:`marble_jax.advantages.weighted_sum_rewards`);
* ``marble``: K policy rows plus one KL row (K + 1 backward passes), Gram matrix, MGDA
  coefficients ``c`` (:func:`marble_jax.mgda.harmonize`), direction
  ``sum_k c_k g_k + kl_beta grad KL`` (REFERENCE §3: the KL term added after harmonisation);
* ``marble_amortized``: a ``marble`` solve when ``solve=True``; otherwise the cached
  coefficients (renormalised over the batch's live rewards) and ONE backward pass, by the affinity of ``L`` in ``r``:
  ``sum_k c_k grad L(r_k) = C grad L(sum_k c_k r_k / C)``, ``C = sum_k c_k``.

* ``marble_gram``: the ``marble`` direction (same Gram matrix, coefficients and update) at a cost that does not
  grow with K, from per-sample gradients (:func:`sample_gradients`). The policy loss is a per-sample sum and the
  network mixes nothing across samples, so every reward's gradient lies in the span of per-sample gradients:
  ``g_k = h + sum_b R[k, b] J_b`` with ``J_b = grad (P_b - N_b) / 2``, ``R[k, b] = (s / B) (2 r_kb - 1)`` and ``h``
  the reward-independent gradient at ``r = 1/2``; so ``g = R' J'`` with ``J' = [h; J]``, ``R' = [1, R]`` and
  ``G = R' (J' J'^T) R'^T``. One forward and three backward rows (the per-sample ``J_b``, the reduced ``h`` and
  the KL gradient; two without KL) replace the K + 1 backward rows; the K gradients are then a contraction of
  rows already computed. Over M micro-batches the ``g_k`` are accumulated (``J' J'^T`` has cross-micro-batch
  blocks that one micro-batch's rows cannot give), so the Gram matrix, coefficients and update are ``marble``'s,
  up to float32 summation order.

``solve`` is a static Python bool (the caller knows ``step % N``): two compiled programs, no
recompilation afterwards and no host round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from marble_jax import mgda
from marble_jax.nft_loss import NFTConfig, NFTInputs, kl_loss, policy_loss, policy_terms

Array = jax.Array
PyTree = Any
VelocityFn = Callable[[PyTree], Array]
MicroVelocityFn = Callable[[PyTree, Any], Array]  # (params, micro-batch conditioning) -> v

MODES = ("single", "weighted_sum", "marble", "marble_amortized", "marble_gram")
SOLVING_MODES = ("marble", "marble_amortized", "marble_gram")


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """How the K rewards are turned into one update.

    Attributes:
      mode: one of :data:`MODES`.
      ema_decay: rho, the EMA decay of the MGDA weights (paper: 0.7).
      solve_every: N, a full solve every N steps in ``marble_amortized`` (paper: 10).
      normalize, rescale: MARBLE's normalise-and-rescale (REFERENCE §3 steps 2 and 4).
      max_iters, tol: of the min-norm solver.
      row_chunk: backward rows (K rewards + KL) vmapped together in a full solve; None = all at
        once (fastest), 1 = one at a time (least memory: about one backward's activations).
    """

    mode: str = "marble_amortized"
    ema_decay: float = 0.7
    solve_every: int = 10
    normalize: bool = True
    rescale: bool = True
    max_iters: int = 1000
    tol: float = 1e-5
    row_chunk: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"BalanceConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.solve_every < 1:
            raise ValueError(f"BalanceConfig.solve_every must be >= 1, got {self.solve_every}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"BalanceConfig.ema_decay must be in [0, 1), got {self.ema_decay}")

    @property
    def mgda(self) -> mgda.MGDAConfig:
        """The MGDA recipe of this configuration."""
        return mgda.MGDAConfig(self.ema_decay, self.normalize, self.rescale, self.max_iters, self.tol)

    def solves_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` does a full solve (always, but in the amortised mode)."""
        return self.mode != "marble_amortized" or step % self.solve_every == 0


class Direction(NamedTuple):
    """An update direction (gradient-like, to be fed to the optimizer) and what came with it.

    Attributes:
      update: pytree like ``params``.
      state: the new MGDA state (unchanged by the modes that do not solve).
      finite: bool, the update is finite (checked once: on the Gram matrix of every gradient row in a solve,
        else on the one gradient).
      metrics: dict of scalars and ``[K]`` vectors: losses, and for a solve ``lambda``,
        ``ema_lambda``, ``coefficients``, ``grad_norms``, ``cosines`` of the applied policy
        direction with each reward's gradient, ``min_cosine``, ``anti_aligned`` (some cosine
        < 0), ``mgda_gap``, ``mgda_iterations``.
    """

    update: PyTree
    state: mgda.MGDAState
    finite: Array
    metrics: dict[str, Array]


class RewardGradients(NamedTuple):
    """Per-reward policy gradients from one forward pass, in one stack (no slice of it is copied out).

    Attributes:
      rows: pytree like ``params`` with a leading axis on every leaf: the K policy gradients, then
        ``kl_beta * grad KL`` when ``kl_beta > 0`` (``K + 1`` rows; K without the KL term).
      policy_losses: ``[K]`` policy loss of each reward.
      kl: the KL term's value (unweighted).
    """

    rows: PyTree
    policy_losses: Array
    kl: Array

    @property
    def grads(self) -> PyTree:
        """The K policy gradients (a sliced copy: for tests and reports)."""
        k = self.policy_losses.shape[0]
        return jax.tree.map(lambda leaf: leaf[:k], self.rows)

    @property
    def kl_grad(self) -> PyTree:
        """``kl_beta * grad KL`` (a sliced copy; zeros without the KL row)."""
        k = self.policy_losses.shape[0]
        return jax.tree.map(lambda leaf: leaf[k] if leaf.shape[0] > k else jnp.zeros_like(leaf[0]), self.rows)


def _cotangent_basis(v: Array, inputs: NFTInputs, config: NFTConfig):
    """Per-sample terms ``P, N [B]`` and their gradients w.r.t. ``v``, ``[B, H, W, C]`` each."""
    (pos, neg), pull = jax.vjp(lambda u: policy_terms(u, inputs, config), v)
    ones, zeros = jnp.ones_like(pos), jnp.zeros_like(pos)
    (d_pos,) = pull((ones, zeros))
    (d_neg,) = pull((zeros, ones))
    return pos, neg, d_pos, d_neg


def _policy_cotangent(d_pos: Array, d_neg: Array, r: Array, config: NFTConfig, scale: Array | float = 1.0) -> Array:
    """Cotangent on ``v`` of ``scale * policy_loss(r)``, ``r [B]``."""
    rb = r.astype(d_pos.dtype).reshape((-1,) + (1,) * (d_pos.ndim - 1))
    factor = scale * config.policy_scale / d_pos.shape[0]
    return factor * (rb * d_pos + (1 - rb) * d_neg)


def _kl_cotangent(v: Array, inputs: NFTInputs, config: NFTConfig) -> Array:
    """Cotangent on ``v`` of ``kl_beta * mean((v - v_ref)^2)``."""
    return (2 * config.kl_beta / v.size) * (v.astype(jnp.float32) - inputs.v_ref.astype(jnp.float32))


def reward_gradients(
    velocity_fn: VelocityFn, params: PyTree, inputs: NFTInputs, r: Array, config: NFTConfig, row_chunk: int | None = None
) -> RewardGradients:
    """K per-reward policy gradients (and the KL gradient) from one traced graph.

    One forward via ``jax.vjp``; the vjp ``vmap``-ped over K (+1 for KL) cotangent rows, kept as one stack. With ``row_chunk``
    the rows go through ``jax.lax.map`` in vmapped chunks of that size: the same FLOPs, activation-gradient memory
    of ``row_chunk`` rows instead of all K + 1.

    Args:
      velocity_fn: ``params -> v_theta [B, H, W, C]``.
      params: the trained parameters (a pytree).
      inputs: this timestep's NFT inputs.
      r: ``[K, B]`` optimality weights per reward.
      config: NFT hyper-parameters.
    """
    v, vjp = jax.vjp(velocity_fn, params)
    pos, neg, d_pos, d_neg = _cotangent_basis(v, inputs, config)
    rows = jax.vmap(lambda rk: _policy_cotangent(d_pos, d_neg, rk, config))(r)
    use_kl = config.kl_beta > 0
    if use_kl:
        rows = jnp.concatenate([rows, _kl_cotangent(v, inputs, config)[None]], axis=0)
    rows = rows.astype(v.dtype)
    (grads,) = jax.vmap(vjp)(rows) if row_chunk is None else jax.lax.map(vjp, rows, batch_size=row_chunk)
    kl = kl_loss(v, inputs.v_ref) if use_kl else jnp.zeros((), jnp.float32)
    losses = jax.vmap(lambda rk: policy_loss(pos, neg, rk, config))(r)
    return RewardGradients(grads, losses, kl)


class SampleGradients(NamedTuple):
    """Per-sample gradients of the NFT policy terms of one batch of B samples (:func:`sample_gradients`).

    With ``s = adv_clip_max / beta``, reward k's policy gradient is ``g_k = neutral + sum_b (s / B) (2 r_kb - 1) rows_b``.

    Attributes:
      stack: pytree like ``params`` with leading axes ``[B, R]`` on every leaf, as the vjp produced them (nothing is
        sliced out of it on the update's path): per sample b, ``(grad P_b - grad N_b) / 2``, then sample b's part of
        ``neutral``, then (R = 3, when ``kl_beta > 0``) its part of ``kl_beta * grad KL``.
      pos, neg: ``[B]`` the per-sample terms ``P_b``, ``N_b``.
      kl: the KL term's value (unweighted).
    """

    stack: PyTree
    pos: Array
    neg: Array
    kl: Array

    @property
    def rows(self) -> PyTree:
        """``[B, ...]`` leaves: ``(grad P_b - grad N_b) / 2``."""
        return jax.tree.map(lambda leaf: leaf[:, 0], self.stack)

    @property
    def neutral(self) -> PyTree:
        """The policy gradient at ``r = 1/2`` everywhere, ``(s / 2B) sum_b (grad P_b + grad N_b)``, like ``params``
        (shared by every reward; it vanishes at ``v_theta = v_old``)."""
        return jax.tree.map(lambda leaf: jnp.sum(leaf[:, 1], axis=0), self.stack)

    @property
    def kl_grad(self) -> PyTree:
        """``kl_beta * grad KL`` of the batch like ``params`` (zeros when ``kl_beta == 0``)."""
        return jax.tree.map(
            lambda leaf: jnp.sum(leaf[:, 2], axis=0) if leaf.shape[1] > 2 else jnp.zeros_like(leaf[0, 0]), self.stack
        )


def sample_gradients(
    velocity_fn: MicroVelocityFn,
    params: PyTree,
    cond: PyTree,
    inputs: NFTInputs,
    config: NFTConfig,
) -> SampleGradients:
    """``J``: the per-sample gradients of the NFT policy terms, weight gradients left unreduced over the batch.

    ``velocity_fn(params, cond) -> v [B, H, W, C]`` must treat samples independently (``v[b]`` depends on the leaves
    ``[b]`` of ``cond`` only, as the MMDiT does); every leaf of ``cond`` and ``inputs`` has the leading axis B. Each
    sample runs as a batch of one under ``jax.vmap`` (XLA batches it back, the weights shared): one forward and ONE
    vjp call over three cotangent rows per sample (two without the KL term), kept as one ``[B, R, ...]`` stack that
    the update contracts in one read (:func:`gradients_from_samples`, :func:`combine_rows`).
    Measured alternatives, both worse: per-sample zero offsets on the parameters (per-sample rows through the
    offsets, reduced ones through the parameters) make every sample's trained weights its own, 0.52x a weighted-sum
    update on the embedded world against 0.59-0.68x; a separate vjp call for the reduced rows lets XLA merge the two
    calls' rematerialised block forwards and keep every block's activations alive between them (1.97x a
    weighted-sum step's memory on the real SD3.5-M step against 1.18x). ``BalanceConfig.row_chunk`` does not apply.

    The basis: ``r P + (1 - r) N = (P + N) / 2 + (2 r - 1) (P - N) / 2``. With NFT's small ``beta`` the gradients of
    ``P`` and ``N`` nearly cancel (both policies sit close to ``v_old``), so per-sample rows ``grad P_b``, ``grad N_b``
    would leave every reward's gradient as a float32 difference of large, almost opposite vectors. The half
    difference is one row per sample and the reward-independent half sum one reduced row: no such cancellation.

    Why three rows and not two when ``kl_beta > 0``: per sample, the cotangents on ``v_b`` of ``P_b`` and ``N_b``
    span ``{x_t - t v_old - x0, v_theta - v_old}`` and the KL's adds ``v_old - v_ref``, which is in neither; the
    update needs the KL gradient with weight 1 while the Gram matrix needs ``neutral`` alone, so no two backward
    rows give all three.
    """
    batch = inputs.t.shape[0]
    use_kl = config.kl_beta > 0

    def one(c_b, inp_b):
        c1, i1 = jax.tree.map(lambda x: x[None], (c_b, inp_b))
        v, vjp = jax.vjp(lambda p: velocity_fn(p, c1), params)
        pos, neg, d_pos, d_neg = _cotangent_basis(v, i1, config)
        cots = [(d_pos - d_neg) / 2, config.policy_scale / (2 * batch) * (d_pos + d_neg)]
        if use_kl:  # the batch's kl_beta * mean((v - v_ref)^2) has this sample's part / B
            cots.append(_kl_cotangent(v, i1, config) / batch)
        (g,) = jax.vmap(vjp)(jnp.stack(cots).astype(v.dtype))
        kl_b = kl_loss(v, i1.v_ref) if use_kl else jnp.zeros((), jnp.float32)
        return g, pos[0], neg[0], kl_b

    g, pos, neg, kl_b = jax.vmap(one)(cond, inputs)  # g: [B, R, ...] leaves
    return SampleGradients(g, pos, neg, jnp.mean(kl_b))


def reward_matrix(r: Array, config: NFTConfig) -> Array:
    """``R [K, B]``: ``R[k, b] = (s / B) (2 r_kb - 1)``, the coefficients of the per-sample rows in reward k's
    gradient (:class:`SampleGradients`); ``r [K, B]``."""
    return (config.policy_scale / r.shape[1]) * (2 * r.astype(jnp.float32) - 1)


def _stack_weights(sg: SampleGradients, r: Array, config: NFTConfig) -> Array:
    """``W [K (+1), B, R]`` with ``g_k = sum_{b, i} W[k, b, i] stack[b, i]``: ``R[k, b]`` on the rows, 1 on the
    neutral parts, 0 on the KL parts; with the KL parts, a last row that sums them."""
    rm = reward_matrix(r, config)
    k, b = rm.shape
    num_rows = jax.tree.leaves(sg.stack)[0].shape[1]
    w = jnp.zeros((k, b, num_rows), jnp.float32).at[:, :, 0].set(rm).at[:, :, 1].set(1)
    if num_rows > 2:
        w = jnp.concatenate([w, jnp.zeros((1, b, num_rows), jnp.float32).at[0, :, 2].set(1)])
    return w


def sample_rows(sg: SampleGradients, r: Array, config: NFTConfig) -> tuple[PyTree, Array]:
    """``(J, R')`` for :func:`marble_jax.mgda.mgda_weights` with ``reward_matrix``, so that ``g = R' J``: ``J`` the
    stack's ``B R`` rows (a reshape, not a copy: per sample its policy row, its part of ``neutral`` and of the KL
    gradient, the last with weight 0) and ``R' [K, B R]``."""
    k = r.shape[0]
    rows = jax.tree.map(lambda leaf: leaf.reshape((-1,) + leaf.shape[2:]), sg.stack)
    return rows, _stack_weights(sg, r, config)[:k].reshape(k, -1)


def gradients_from_samples(sg: SampleGradients, r: Array, config: NFTConfig) -> RewardGradients:
    """The K per-reward gradients ``neutral + R J`` (and the KL row, and the losses) of per-sample gradients,
    ``r [K, B]``: one contraction of the stack, no network call."""
    w = _stack_weights(sg, r, config)

    def contract(leaf):
        return jnp.einsum("kbi,bi...->k...", w, leaf, preferred_element_type=jnp.float32).astype(leaf.dtype)

    losses = jax.vmap(lambda rk: policy_loss(sg.pos, sg.neg, rk, config))(r)
    return RewardGradients(jax.tree.map(contract, sg.stack), losses, sg.kl)


def combine_rows(sg: SampleGradients, r: Array, coefficients: Array, config: NFTConfig) -> PyTree:
    """``sum_k c_k g_k + kl_beta grad KL = sum_{b, i} (c^T W)[b, i] stack[b, i]`` of per-sample gradients,
    ``r [K, B]``, ``coefficients [K]``: the whole update in one read of the stack, without the K gradients."""
    w = _stack_weights(sg, r, config)
    c = coefficients.astype(jnp.float32)
    if w.shape[0] > c.shape[0]:
        c = jnp.concatenate([c, jnp.ones((1,), jnp.float32)])
    wc = jnp.einsum("k,kbi->bi", c, w)

    def contract(leaf):
        return jnp.einsum("bi,bi...->...", wc, leaf, preferred_element_type=jnp.float32).astype(leaf.dtype)

    return jax.tree.map(contract, sg.stack)


def weighted_gradient(
    velocity_fn: VelocityFn, params: PyTree, inputs: NFTInputs, r: Array, config: NFTConfig, scale: Array | float = 1.0
) -> tuple[PyTree, dict[str, Array]]:
    """Gradient of ``scale * L_policy(r) + kl_beta * KL`` for ``r [B]``: one backward pass."""
    v, vjp = jax.vjp(velocity_fn, params)
    pos, neg, d_pos, d_neg = _cotangent_basis(v, inputs, config)
    cot = _policy_cotangent(d_pos, d_neg, r, config, scale)
    metrics = {"policy_loss": scale * policy_loss(pos, neg, r, config)}
    if config.kl_beta > 0:
        cot = cot + _kl_cotangent(v, inputs, config)
        metrics["kl"] = kl_loss(v, inputs.v_ref)
    (grad,) = vjp(cot.astype(v.dtype))
    return grad, metrics


def tree_all_finite(tree: PyTree) -> Array:
    """True when every element of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _direction_from_gradients(
    rg: RewardGradients,
    state: mgda.MGDAState,
    cfg: BalanceConfig,
    mask: Array | None,
    combined_update: Callable[[Array], PyTree] | None = None,
) -> Direction:
    """The MARBLE direction of per-reward gradients: Gram matrix, harmonised coefficients, plus the KL gradient.

    The Gram matrix is taken over the whole stack, KL row included (the same one read of it, and its finiteness is
    the finiteness of every row: the one check of the step); the solve uses its K x K policy block.
    ``combined_update(c)``: ``sum_k c_k g_k + kl_beta grad KL`` computed some other way than from ``rg.rows`` (which
    is then read by the Gram matrix only, so XLA need not keep the stack through the solve)."""
    k = rg.policy_losses.shape[0]
    full = mgda.gram_matrix(rg.rows)
    gram = full[:k, :k]
    h = cfg.mgda.harmonize(gram, state, mask)
    if combined_update is None:
        with_kl = jnp.concatenate([h.coefficients, jnp.ones((full.shape[0] - k,), jnp.float32)])
        update = mgda.combine(rg.rows, with_kl)
    else:
        update = combined_update(h.coefficients)
    cos = mgda.direction_cosines(gram, h.coefficients)
    live = jnp.ones(cos.shape, bool) if mask is None else mask
    metrics = {
        "policy_losses": rg.policy_losses,
        "policy_loss": jnp.dot(h.coefficients, rg.policy_losses),
        "kl": rg.kl,
        "lambda": h.weights,
        "ema_lambda": h.state.ema_weights,
        "coefficients": h.coefficients,
        "grad_norms": jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0)),
        "cosines": cos,
        "min_cosine": jnp.min(jnp.where(live, cos, jnp.inf)),
        "anti_aligned": jnp.any(live & (cos < 0)),
        "mgda_gap": h.state.gap,
        "mgda_iterations": h.state.iterations,
    }
    return Direction(update, h.state, jnp.all(jnp.isfinite(full)), metrics)


class MicroBatches(NamedTuple):
    """M micro-batches made inside the accumulation scan: ``get(i)`` (``i`` a traced int32 scalar) returns micro-batch
    ``i``'s ``(cond, inputs, r, ...)``. Nothing of the M micro-batches is stacked up front: ``get`` gathers its rows by
    index from the epoch's arrays (and may run the frozen forwards there), so memory beyond one micro-batch's
    activations does not grow with M."""

    count: int
    get: Callable[[Array], tuple]

    @classmethod
    def stacked(cls, micro: tuple) -> MicroBatches:
        """The micro-batches of a tuple whose leaves all have the leading axis M (index ``i`` of each leaf)."""
        count = jax.tree.leaves(micro)[0].shape[0]
        return cls(count, lambda i: jax.tree.map(lambda x: x[i], micro))

    def map(self, fn: Callable[..., tuple]) -> MicroBatches:
        """The micro-batches ``fn(*get(i))``."""
        return MicroBatches(self.count, lambda i: fn(*self.get(i)))


def _batches(micro: MicroBatches | tuple) -> MicroBatches:
    return micro if isinstance(micro, MicroBatches) else MicroBatches.stacked(micro)


def micro_mean(fn: Callable[..., PyTree], micro: MicroBatches | tuple) -> PyTree:
    """Mean over the M micro-batches of ``fn(*micro_m)``, accumulated under ``jax.lax.scan`` (one micro-batch's
    activations live at a time). ``micro``: :class:`MicroBatches`, or a tuple of leaves with the leading axis M."""
    micro = _batches(micro)
    if micro.count == 1:
        return fn(*micro.get(jnp.zeros((), jnp.int32)))
    shapes = jax.eval_shape(lambda i: fn(*micro.get(i)), jax.ShapeDtypeStruct((), jnp.int32))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    body = lambda acc, i: (jax.tree.map(jnp.add, acc, fn(*micro.get(i))), None)  # noqa: E731
    total, _ = jax.lax.scan(body, init, jnp.arange(micro.count, dtype=jnp.int32))
    return jax.tree.map(lambda x: x / micro.count, total)


def accumulated_direction(
    velocity_fn: MicroVelocityFn,
    params: PyTree,
    micro: MicroBatches | tuple,
    state: mgda.MGDAState,
    nft: NFTConfig,
    cfg: BalanceConfig,
    *,
    solve: bool = True,
    mask: Array | None = None,
) -> Direction:
    """:func:`update_direction` of the mean loss over M micro-batches (e.g. the trained timesteps of a rollout batch).

    ``micro``: :class:`MicroBatches` whose ``get(i)`` gives ``(cond, inputs, r)``, or that tuple with a leading axis
    M on every leaf: ``cond`` is the micro-batch's conditioning, passed to ``velocity_fn(params, cond)``, and ``r``
    is ``[B]`` or ``[K, B]``. The per-reward gradients (or the one weighted gradient) are averaged over the
    micro-batches under ``jax.lax.scan`` before the MGDA solve, so the balance is computed on the whole batch's
    gradients, with one micro-batch's activations in memory at a time.
    ``mask [K]``: the rewards live in this batch (all by default); the others are left out of a solve (see
    :func:`marble_jax.mgda.harmonize`) and get coefficient 0 on an amortised step, whose cached coefficients are
    renormalised over the live ones (:func:`marble_jax.mgda.coefficients`). A reward live now but not at the last
    solve has no cached coefficient: the caller solves instead when :func:`marble_jax.mgda.needs_solve` says so.
    ``marble_gram`` runs each sample alone: every leaf of ``cond`` then also has the batch axis B.
    """
    micro = _batches(micro)
    _, _, r_shape = jax.eval_shape(micro.get, jax.ShapeDtypeStruct((), jnp.int32))
    if cfg.mode in ("single", "weighted_sum"):
        if r_shape.ndim != 1:
            raise ValueError(f"mode {cfg.mode!r} takes one weight vector r [B] per micro-batch, got shape {r_shape.shape}")
    elif r_shape.ndim != 2 or r_shape.shape[0] != state.ema_weights.shape[0]:
        k = state.ema_weights.shape[0]
        raise ValueError(f"mode {cfg.mode!r} takes r [K, B] with K = {k}, got shape {r_shape.shape}")
    if cfg.mode == "marble_gram":

        def rows(c, inp, rm):
            return gradients_from_samples(sample_gradients(velocity_fn, params, c, inp, nft), rm, nft)

        if micro.count > 1:
            return _direction_from_gradients(micro_mean(rows, micro), state, cfg, mask)
        # One micro-batch: the update is one contraction of the per-sample stack (combine_rows).
        c1, inp1, r1 = micro.get(jnp.zeros((), jnp.int32))
        sg = sample_gradients(velocity_fn, params, c1, inp1, nft)
        return _direction_from_gradients(
            gradients_from_samples(sg, r1, nft), state, cfg, mask, lambda c: combine_rows(sg, r1, c, nft)
        )
    if cfg.mode in ("marble", "marble_amortized") and (cfg.mode == "marble" or solve):

        def rows(c, inp, rm):
            return reward_gradients(lambda p: velocity_fn(p, c), params, inp, rm, nft, cfg.row_chunk)

        return _direction_from_gradients(micro_mean(rows, micro), state, cfg, mask)
    scale: Array | float = 1.0
    if cfg.mode == "marble_amortized":  # the last solve's coefficients over this batch's live rewards
        c = mgda.coefficients(state, mask)
        scale = c.sum()
        norm = jnp.where(scale > 0, scale, 1)
        micro = micro.map(lambda cond, inp, rm: (cond, inp, jnp.einsum("k,kb->b", c, rm) / norm))

    def one(c, inp, rm):
        return weighted_gradient(lambda p: velocity_fn(p, c), params, inp, rm, nft, scale)

    grad, metrics = micro_mean(one, micro)
    return Direction(grad, state, tree_all_finite(grad), metrics)


def update_direction(
    velocity_fn: VelocityFn,
    params: PyTree,
    inputs: NFTInputs,
    r: Array,
    state: mgda.MGDAState,
    nft: NFTConfig,
    cfg: BalanceConfig,
    *,
    solve: bool = True,
) -> Direction:
    """The update direction of ``cfg.mode`` for one batch.

    Args:
      velocity_fn: ``params -> v_theta [B, H, W, C]``.
      params: trained parameters.
      inputs: this timestep's NFT inputs.
      r: ``[B]`` for ``single`` / ``weighted_sum``; ``[K, B]`` for the MARBLE modes.
      state: MGDA state (passed through by the modes that do not solve).
      nft: NFT loss hyper-parameters.
      cfg: balancing configuration.
      solve: static; ``marble_amortized`` only: full solve (True) or cached coefficients (all rewards live).
    """
    if cfg.mode in ("single", "weighted_sum") and r.ndim != 1:
        raise ValueError(f"mode {cfg.mode!r} takes one weight vector r [B], got shape {r.shape}")
    if cfg.mode == "marble_gram":
        raise ValueError(
            "mode 'marble_gram' runs each sample alone: use accumulated_direction, whose velocity_fn(params, cond) "
            "takes the per-sample conditioning"
        )
    one = jax.tree.map(lambda x: x[None], (jnp.zeros((1,)), inputs, r))
    return accumulated_direction(lambda p, _: velocity_fn(p), params, one, state, nft, cfg, solve=solve)


def accumulated_diagnostics(
    velocity_fn: MicroVelocityFn,
    params: PyTree,
    micro: MicroBatches | tuple,
    nft: NFTConfig,
    mask: Array | None = None,
) -> dict[str, Array]:
    """Cosines between the policy direction of ``r_applied [B]`` and each reward's (``r [K, B]``), on the gradients
    averaged over M micro-batches (as :func:`accumulated_direction`; ``micro`` gives ``(cond, inputs, r, r_applied)``).

    For modes that do not compute per-reward gradients themselves (the weighted sum): K + 1 backward
    passes, so call it on a subset of steps. Returns ``cosines [K]``, ``min_cosine``, ``anti_aligned``
    and ``grad_norms [K]``; rewards ``False`` in ``mask [K]`` do not count in ``min_cosine`` / ``anti_aligned``.
    """
    no_kl = dataclasses.replace(nft, kl_beta=0.0)

    def rows(c, inp, rm, ra):
        return reward_gradients(lambda p: velocity_fn(p, c), params, inp, jnp.concatenate([rm, ra[None]]), no_kl).grads

    grads = micro_mean(rows, micro)
    gram = mgda.gram_matrix(grads)
    k = jax.tree.leaves(grads)[0].shape[0] - 1
    sel = jnp.zeros((k + 1,), jnp.float32).at[k].set(1)
    cos = mgda.direction_cosines(gram, sel)[:k]
    live = jnp.ones((k,), bool) if mask is None else mask
    return {
        "cosines": cos,
        "min_cosine": jnp.min(jnp.where(live, cos, jnp.inf)),
        "anti_aligned": jnp.any(live & (cos < 0)),
        "grad_norms": jnp.sqrt(jnp.maximum(jnp.diagonal(gram)[:k], 0)),
    }


def direction_diagnostics(
    velocity_fn: VelocityFn, params: PyTree, inputs: NFTInputs, r: Array, r_applied: Array, nft: NFTConfig
) -> dict[str, Array]:
    """:func:`accumulated_diagnostics` of one batch: ``r [K, B]``, ``r_applied [B]``."""
    one = jax.tree.map(lambda x: x[None], (jnp.zeros((1,)), inputs, r, r_applied))
    return accumulated_diagnostics(lambda p, _: velocity_fn(p), params, one, nft)


def optimizer_step(tx: optax.GradientTransformation, params: PyTree, opt_state: Any, direction: Direction) -> tuple[PyTree, Any]:
    """Applies ``direction.update`` through ``tx``; a non-finite direction leaves both untouched."""

    def run(_):
        updates, new_state = tx.update(direction.update, opt_state, params)
        return optax.apply_updates(params, updates), new_state

    return jax.lax.cond(direction.finite, run, lambda _: (params, opt_state), None)
