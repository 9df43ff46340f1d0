"""Step-level DPO / Diffusion-DPO against a PyTorch implementation written from the paper's epsilon-space formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import rel_err

from marble_jax import dpo
from marble_jax.nft_loss import noisy_latents

P, SHAPE = 4, (4, 4, 3)


def torch_dpo_loss(v_w, v_l, x0_w, x0_l, eps, t, v_ref_w, v_ref_l, beta, step_level):
    """Lemma 1 in epsilon space: eps_model = x_t + (1 - t) v, squared norms as per-sample means."""
    tb = t.reshape(-1, 1, 1, 1)
    x_w, x_l = (1 - tb) * x0_w + tb * eps, (1 - tb) * x0_l + tb * eps
    eps_of = lambda x, v: x + (1 - tb) * v  # noqa: E731
    sq = lambda a: (a**2).mean(dim=(1, 2, 3))  # noqa: E731
    d_w = sq(eps - eps_of(x_w, v_w)) - sq(eps - eps_of(x_w, v_ref_w))
    d_l = sq(eps - eps_of(x_l, v_l)) - sq(eps - eps_of(x_l, v_ref_l))
    d_diff = sq(eps_of(x_w, v_w) - eps_of(x_w, v_ref_w)) - sq(eps_of(x_l, v_l) - eps_of(x_l, v_ref_l))
    d_diff = d_diff if step_level else torch.zeros_like(d_diff)
    inside = d_w - d_l - d_diff
    terms = {"d_w": d_w.mean(), "d_l": d_l.mean(), "d_diff": d_diff.mean(), "dpo_accuracy": (inside < 0).float().mean()}
    return -torch.nn.functional.logsigmoid(-beta * inside).mean(), terms


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    a = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    x0_w, x0_l, eps = a(P, *SHAPE), a(P, *SHAPE), a(P, *SHAPE)
    t = rng.uniform(0.1, 0.9, P).astype(np.float32)
    v_ref_w, v_ref_l = eps - x0_w + 0.3 * a(P, *SHAPE), eps - x0_l + 0.3 * a(P, *SHAPE)
    v_w, v_l = v_ref_w + 0.02 * a(P, *SHAPE), v_ref_l + 0.02 * a(P, *SHAPE)
    return dict(x0_w=x0_w, x0_l=x0_l, eps=eps, t=t, v_ref_w=v_ref_w, v_ref_l=v_ref_l, v_w=v_w, v_l=v_l)


def inputs_of(d) -> dpo.DPOInputs:
    return dpo.DPOInputs(*(jnp.asarray(d[k]) for k in ("x0_w", "x0_l", "eps", "t", "v_ref_w", "v_ref_l")))


@pytest.mark.parametrize("step_level", [True, False])
def test_loss_and_gradient_match_torch(pairs, step_level):
    cfg = dpo.DPOConfig(beta=200.0, step_level=step_level)
    inp = inputs_of(pairs)
    (loss, metrics), (g_w, g_l) = jax.value_and_grad(lambda a, b: dpo.dpo_loss(a, b, inp, cfg), argnums=(0, 1), has_aux=True)(
        jnp.asarray(pairs["v_w"]), jnp.asarray(pairs["v_l"])
    )
    tt = {k: torch.tensor(v) for k, v in pairs.items()}
    tt["v_w"].requires_grad_(True)
    tt["v_l"].requires_grad_(True)
    ref, terms = torch_dpo_loss(tt["v_w"], tt["v_l"], tt["x0_w"], tt["x0_l"], tt["eps"], tt["t"], tt["v_ref_w"],
                                tt["v_ref_l"], cfg.beta, step_level)  # fmt: skip
    ref.backward()
    # float32: torch goes through x_t (eps_model - eps differences of O(1) terms, ~1e-7 each), ours through
    # (1 - t)(v* - v); the D_* are differences of two O(1) norms (~1e-6 absolute), amplified by beta in the gradient.
    assert rel_err(float(loss), ref.item()) < 1e-5
    for k in ("d_w", "d_l", "d_diff"):
        assert abs(float(metrics[k]) - terms[k].item()) < 1e-5, k
    assert float(metrics["dpo_accuracy"]) == terms["dpo_accuracy"].item()
    assert rel_err(np.asarray(g_w), tt["v_w"].grad.numpy()) < 1e-4
    assert rel_err(np.asarray(g_l), tt["v_l"].grad.numpy()) < 1e-4


def test_parameter_gradient_through_a_velocity_model_matches_torch(pairs):
    """Gradient w.r.t. the weights of a tiny linear velocity model ``v = x_t W + b`` (per pixel, channels mixed)."""
    rng = np.random.default_rng(3)
    w0, b0 = rng.normal(size=(3, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    cfg = dpo.DPOConfig(beta=50.0)
    inp = inputs_of(pairs)
    t = jnp.asarray(pairs["t"])

    def loss(params):
        x_w = noisy_latents(inp.x0_w, inp.eps, t)
        x_l = noisy_latents(inp.x0_l, inp.eps, t)
        return dpo.dpo_loss(x_w @ params[0] + params[1], x_l @ params[0] + params[1], inp, cfg)[0]

    g = jax.grad(loss)((jnp.asarray(w0), jnp.asarray(b0)))
    tw, tb_ = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    tt = {k: torch.tensor(v) for k, v in pairs.items()}
    tb = tt["t"].reshape(-1, 1, 1, 1)
    x_w, x_l = (1 - tb) * tt["x0_w"] + tb * tt["eps"], (1 - tb) * tt["x0_l"] + tb * tt["eps"]
    ref = torch_dpo_loss(x_w @ tw + tb_, x_l @ tw + tb_, tt["x0_w"], tt["x0_l"], tt["eps"], tt["t"], tt["v_ref_w"],
                         tt["v_ref_l"], cfg.beta, True)[0]  # fmt: skip
    ref.backward()
    assert rel_err(np.asarray(g[0]), tw.grad.numpy()) < 1e-4
    assert rel_err(np.asarray(g[1]), tb_.grad.numpy()) < 1e-4


def test_epsilon_from_velocity():
    rng = np.random.default_rng(1)
    x0, eps = rng.normal(size=(2, *SHAPE)), rng.normal(size=(2, *SHAPE))
    t = np.array([0.3, 0.8])
    x_t = np.asarray(noisy_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)))
    np.testing.assert_allclose(x_t + (1 - t[:, None, None, None]) * (eps - x0), eps, atol=1e-6)


def eps_space_terms(p: dict, v_w, v_l) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``D_w, D_l, D_diff [P]`` in float64 from Lemma 1's epsilon-space definitions: the noisy latents
    ``x_t = (1 - t) x0 + t eps`` and each model's noise prediction ``eps_model = x_t + (1 - t) v``, formed explicitly."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    v_w, v_l = np.asarray(v_w, np.float64), np.asarray(v_l, np.float64)
    tb = p["t"][:, None, None, None]
    x_w, x_l = (1 - tb) * p["x0_w"] + tb * p["eps"], (1 - tb) * p["x0_l"] + tb * p["eps"]
    eps_of = lambda x, v: x + (1 - tb) * v  # noqa: E731
    sq = lambda a: (a**2).mean(axis=(1, 2, 3))  # noqa: E731
    d_w = sq(p["eps"] - eps_of(x_w, v_w)) - sq(p["eps"] - eps_of(x_w, p["v_ref_w"]))
    d_l = sq(p["eps"] - eps_of(x_l, v_l)) - sq(p["eps"] - eps_of(x_l, p["v_ref_l"]))
    d_diff = sq(eps_of(x_w, v_w) - eps_of(x_w, p["v_ref_w"])) - sq(eps_of(x_l, v_l) - eps_of(x_l, p["v_ref_l"]))
    return d_w, d_l, d_diff


def test_d_terms_are_the_epsilon_space_definitions(pairs):
    """Our D terms (computed in velocity space) against the epsilon-space definitions, formed in float64."""
    d_w, d_l, d_diff = eps_space_terms(pairs, pairs["v_w"], pairs["v_l"])
    _, m = dpo.dpo_loss(jnp.asarray(pairs["v_w"]), jnp.asarray(pairs["v_l"]), inputs_of(pairs), dpo.DPOConfig())
    for k, ref in (("d_w", d_w), ("d_l", d_l), ("d_diff", d_diff)):
        # differences of float32 means of O(1) squares: a few eps32 of the squares' size, which is O(1) here
        np.testing.assert_allclose(float(m[k]), ref.mean(), atol=1e-6, err_msg=k)


def test_d_diff_sign_and_loss_at_a_finite_step(pairs):
    """Half-way from the reference to the winner's target (a finite step, where D_diff is not negligible): the winner
    moved and the loser did not, so D_diff > 0, and it enters the margin as ``-(D_w - D_l - D_diff)``: the loss
    equals that formula and not the one with D_diff's sign flipped."""
    inp = inputs_of(pairs)
    v_w = inp.v_ref_w + 0.5 * (inp.eps - inp.x0_w - inp.v_ref_w)
    v_l = inp.v_ref_l
    cfg = dpo.DPOConfig(step_level=True)
    loss, m = dpo.dpo_loss(v_w, v_l, inp, cfg)
    d_w, d_l, d_diff = eps_space_terms(pairs, v_w, v_l)
    assert np.all(d_diff > 0) and float(m["d_diff"]) > 0
    softplus = lambda x: np.logaddexp(0.0, x)  # noqa: E731  (-log sigmoid(-x) = softplus(x))
    expected = np.mean(softplus(cfg.beta * (d_w - d_l - d_diff)))
    flipped = np.mean(softplus(cfg.beta * (d_w - d_l + d_diff)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert abs(flipped - expected) > 100 * 1e-5 * expected


def test_at_the_reference_the_loss_is_log2_and_both_losses_agree(pairs):
    inp = inputs_of(pairs)
    v_w, v_l = inp.v_ref_w, inp.v_ref_l
    for step_level in (True, False):
        loss, m = dpo.dpo_loss(v_w, v_l, inp, dpo.DPOConfig(step_level=step_level))
        np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)
        assert float(m["d_diff"]) == 0.0
    # away from the reference the step-level term changes the loss
    a = dpo.dpo_loss(jnp.asarray(pairs["v_w"]), jnp.asarray(pairs["v_l"]), inp, dpo.DPOConfig(step_level=True))[0]
    b = dpo.dpo_loss(jnp.asarray(pairs["v_w"]), jnp.asarray(pairs["v_l"]), inp, dpo.DPOConfig(step_level=False))[0]
    assert abs(float(a) - float(b)) > 1e-4


def test_moving_toward_the_winner_lowers_the_loss(pairs):
    inp = inputs_of(pairs)
    target_w = inp.eps - inp.x0_w
    for step_level in (True, False):
        cfg = dpo.DPOConfig(step_level=step_level)
        at_ref = dpo.dpo_loss(inp.v_ref_w, inp.v_ref_l, inp, cfg)[0]
        toward = dpo.dpo_loss(inp.v_ref_w + 0.01 * (target_w - inp.v_ref_w), inp.v_ref_l, inp, cfg)
        assert float(toward[0]) < float(at_ref)
        assert float(toward[1]["dpo_accuracy"]) == 1.0


def test_best_worst_pairs():
    nan = np.nan
    scores = jnp.asarray([
        0.1, 0.9, 0.5,      # group 0: winner 1, loser 0
        nan, 0.2, 0.7,      # group 1: NaN never picked: winner 5, loser 4
        nan, nan, 0.3,      # group 2: one scored sample -> no pair (winner == loser)
        0.4, 0.4, 0.4,      # group 3: all tied -> no pair
        nan, nan, nan,      # group 4: nothing scored -> no pair
        0.8, 0.8, -0.2,     # group 5: tied best -> the first of them: winner 15, loser 17
    ])  # fmt: skip
    winner, loser = dpo.best_worst_pairs(scores, 6)
    np.testing.assert_array_equal(np.asarray(winner)[[0, 1, 5]], [1, 5, 15])
    np.testing.assert_array_equal(np.asarray(loser)[[0, 1, 5]], [0, 4, 17])
    np.testing.assert_array_equal(np.asarray(winner)[2:5], np.asarray(loser)[2:5])
    assert 6 <= int(winner[2]) < 9 and 9 <= int(winner[3]) < 12 and 12 <= int(winner[4]) < 15
    # a no-pair row has zero gradient and loss log 2
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, *SHAPE)), jnp.float32)
    inp = dpo.DPOInputs(x, x, x + 1, jnp.asarray([0.5]), x, x)
    g = jax.grad(lambda v: dpo.dpo_loss(v, v, inp, dpo.DPOConfig())[0])(x + 0.3)
    assert float(jnp.abs(g).max()) == 0.0


def test_validation(pairs):
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo.DPOConfig(beta=0.0)
    inp = inputs_of(pairs)
    with pytest.raises(ValueError, match=r"v_l must have shape \(4, 4, 4, 3\).*got \(4, 4, 3\)"):
        dpo.dpo_loss(inp.v_ref_w, inp.v_ref_l[0], inp, dpo.DPOConfig())
    with pytest.raises(ValueError, match=r"DPOInputs.t must have shape \(4,\)"):
        dpo.dpo_loss(inp.v_ref_w, inp.v_ref_l, inp._replace(t=inp.t[:2]), dpo.DPOConfig())
    with pytest.raises(ValueError, match=r"multiple of num_groups = 4, got shape \(6,\)"):
        dpo.best_worst_pairs(jnp.zeros(6), 4)
