"""``marble_gram`` (per-sample gradients, ``g = R J``) against the vmapped-vjp ``marble`` mode on a tiny MMDiT-X."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err, tiny_sd35_transformer_config

from marble_jax import balance, mgda
from marble_jax.models import lora, mmdit
from marble_jax.nft_loss import NFTConfig, NFTInputs, noisy_latents

M, B = 2, 3  # micro-batches of B samples
TINY = tiny_sd35_transformer_config(num_layers=2)
NFT = NFTConfig(beta=0.1, adv_clip_max=5.0, kl_beta=1e-2)
# float32: the two modes sum the same products in different orders (per-sample weight gradients contracted with R
# against one batched backward per reward); 1e-4 relative leaves room for that rounding over M micro-batches.
TOL = 1e-4


def assert_combined_close(ours, ref, tol: float = TOL) -> None:
    """A combined update ``sum_k c_k g_k``: within TOL of the whole update's scale, and leaf by leaf within 10 TOL (the
    K terms partly cancel in the sum, so the smallest leaves lose a few more digits)."""
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    assert rel_err(flat(ours), flat(ref)) < tol
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert rel_err(np.asarray(a), np.asarray(b)) < 10 * tol


def _problem(finetune: str):
    """``(velocity_fn(params, cond), params, cond [M, B, ...], inputs [M, B, ...])``."""
    apply_fn, base = mmdit.from_config(TINY, key=jax.random.key(0))
    ks = jax.random.split(jax.random.key(1), 8)
    if finetune == "lora":
        spec = lora.LoRASpec(rank=4, alpha=8)
        lora_apply = lora.with_lora(mmdit.build(TINY), spec)
        params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(ks[7], x.shape), lora.init_lora(base, spec, ks[6]))
        net = lambda p, *args: lora_apply(base, p, *args)  # noqa: E731
        ref_params = None
    else:
        params, net = base, apply_fn
        ref_params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(ks[7], x.shape), base)

    x0 = jax.random.normal(ks[0], (M, B, 8, 8, 4))
    t = jax.random.uniform(ks[1], (M, B), minval=0.05, maxval=0.95)
    x_t = jax.vmap(noisy_latents)(x0, jax.random.normal(ks[2], x0.shape), t)
    ctx = jax.random.normal(ks[3], (M, B, 5, TINY["joint_attention_dim"]))
    pooled = jax.random.normal(ks[4], (M, B, TINY["pooled_projection_dim"]))
    cond = (x_t, t, ctx, pooled)

    def velocity(p, c):
        x, tt, cx, pl = c
        return net(p, x, 1000 * tt, cx, pl)

    v = jax.vmap(lambda c: velocity(params, c))(cond)
    v_ref = v - 0.05 if ref_params is None else jax.vmap(lambda c: velocity(ref_params, c))(cond)
    inputs = NFTInputs(x0, x_t, t, v + 0.02 * jax.random.normal(ks[5], v.shape), v_ref)
    return velocity, params, cond, inputs


@pytest.fixture(scope="module", params=["lora", "full"])
def problem(request):
    return _problem(request.param)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_gram_mode_equals_vmapped_vjp_mode(problem, k):
    velocity, params, cond, inputs = problem
    r = jax.random.uniform(jax.random.key(10 + k), (M, k, B))
    if k > 1:
        r = r.at[:, 1].set(0.5)  # a reward that applies to no sample: only the neutral gradient h, no reward signal
        r = r.at[:, 0, 0].set(0.5)  # and one that does not apply to one sample
    mask = jnp.ones((k,), bool).at[1].set(False) if k > 1 else None
    state = mgda.init_state(k)

    def run(mode):
        cfg = balance.BalanceConfig(mode=mode)
        step = lambda p: balance.accumulated_direction(velocity, p, (cond, inputs, r), state, NFT, cfg, mask=mask)  # noqa: E731
        return jax.jit(step)(params)

    ref, gram = run("marble"), run("marble_gram")
    for name in ("lambda", "coefficients", "grad_norms", "cosines", "policy_losses"):
        live = slice(None) if k == 1 else np.r_[0, 2:k]
        a, b = np.asarray(gram.metrics[name])[live], np.asarray(ref.metrics[name])[live]
        assert rel_err(a, b) < TOL, (name, a, b)
    assert rel_err(float(gram.metrics["kl"]), float(ref.metrics["kl"])) < TOL
    assert_combined_close(gram.update, ref.update)
    assert bool(gram.finite)


def test_per_reward_gradients_are_R_times_per_sample_rows(problem):
    """``g = R J`` and ``G = R (J J^T) R^T`` on one micro-batch, against the K backward passes of ``marble``."""
    velocity, params, cond, inputs = problem
    c0, i0 = jax.tree.map(lambda x: x[0], (cond, inputs))
    r = jax.random.uniform(jax.random.key(3), (5, B))
    sg = balance.sample_gradients(velocity, params, c0, i0, NFT)
    assert all(leaf.shape[0] == B for leaf in jax.tree.leaves(sg.rows))
    rg = balance.reward_gradients(lambda p: velocity(p, c0), params, i0, r, NFT)
    rows, rm = balance.sample_rows(sg, r, NFT)
    assert rm.shape == (5, 3 * B)  # per sample: its row, its part of h, its part of the KL gradient (weight 0)
    jjt = mgda.gram_matrix(rows)
    assert rel_err(np.asarray(rm @ jjt @ rm.T), np.asarray(mgda.gram_matrix(rg.grads))) < TOL
    for a, b in zip(jax.tree.leaves(balance.gradients_from_samples(sg, r, NFT).grads), jax.tree.leaves(rg.grads), strict=True):
        assert rel_err(np.asarray(a), np.asarray(b)) < TOL
    for a, b in zip(jax.tree.leaves(sg.kl_grad), jax.tree.leaves(rg.kl_grad), strict=True):
        assert rel_err(np.asarray(a), np.asarray(b)) < TOL
    c = jnp.array([0.3, 0.0, 1.2, 0.5, 0.1])
    expected = jax.tree.map(jnp.add, mgda.combine(rg.grads, c), rg.kl_grad)
    assert_combined_close(balance.combine_rows(sg, r, c, NFT), expected)


def test_one_micro_batch_update_from_rows(problem):
    """With one micro-batch the update is one contraction of the per-sample stack (no K gradients kept): still
    marble's."""
    velocity, params, cond, inputs = problem
    one = jax.tree.map(lambda x: x[:1], (cond, inputs))
    r = jax.random.uniform(jax.random.key(7), (1, 5, B))

    def run(mode):
        cfg = balance.BalanceConfig(mode=mode)
        return jax.jit(lambda p: balance.accumulated_direction(velocity, p, (*one, r), mgda.init_state(5), NFT, cfg))(params)

    ref, gram = run("marble"), run("marble_gram")
    assert rel_err(np.asarray(gram.metrics["coefficients"]), np.asarray(ref.metrics["coefficients"])) < TOL
    assert_combined_close(gram.update, ref.update)


def test_update_direction_refuses_gram_mode(problem):
    velocity, params, cond, inputs = problem
    c0, i0 = jax.tree.map(lambda x: x[0], (cond, inputs))
    with pytest.raises(ValueError, match="accumulated_direction"):
        balance.update_direction(
            lambda p: velocity(p, c0), params, i0, jnp.full((2, B), 0.7), mgda.init_state(2), NFT,
            balance.BalanceConfig(mode="marble_gram"),
        )  # fmt: skip


def test_mgda_weights_takes_per_sample_rows_and_reward_matrix(problem):
    """The optax transform on ``(J, R)`` gives what it gives on the stacked ``R J``, state included."""
    velocity, params, cond, inputs = problem
    c0, i0 = jax.tree.map(lambda x: x[0], (cond, inputs))
    r = jax.random.uniform(jax.random.key(4), (5, B))
    sg = balance.sample_gradients(velocity, params, c0, i0, NFT)
    rows, rm = balance.sample_rows(sg, r, NFT)
    tx = mgda.mgda_weights(5)
    state = tx.init(params)
    ours, ours_state = tx.update(rows, state, reward_matrix=rm)
    ref, ref_state = tx.update(balance.gradients_from_samples(sg, r, NFT).grads, state)
    # 3 TOL: the output (c^T R') J' sums the 3B rows where the reference sums K contracted gradients; with full
    # fine-tuning the rows partly cancel (measured 1.2e-4)
    assert_combined_close(ours, ref, tol=3 * TOL)
    assert rel_err(np.asarray(ours_state.coefficients), np.asarray(ref_state.coefficients)) < TOL
    with pytest.raises(ValueError, match="reward_matrix must be"):
        tx.update(rows, state, reward_matrix=rm[:3])
    with pytest.raises(ValueError, match="N = 7"):
        tx.update(rows, state, reward_matrix=jnp.ones((5, 7)))
