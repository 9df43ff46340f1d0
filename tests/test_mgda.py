"""min_norm against an exact QP (quadprog, float64) and torchjd; gram_matrix; mgda_weights in optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import quadprog
import torch
from torchjd.aggregation import MGDA

from marble_jax import demo, mgda


def exact_min_norm(gram: np.ndarray) -> tuple[np.ndarray, float]:
    """The QP min lam^T G lam on the simplex, solved by quadprog in float64.

    Solved in the unit-normalised variables mu_k = lam_k ||g_k|| (constraint sum mu_k / ||g_k|| = 1),
    which keeps the matrix well scaled when norms span many decades; a 1e-10 ridge makes
    rank-deficient Gram matrices positive definite for quadprog's Cholesky (objective error
    <= 1e-10 * K * mean diag, far below the tolerances asserted).
    """
    k = gram.shape[0]
    n = np.sqrt(np.diag(gram))
    gu = gram / np.outer(n, n) + 1e-10 * np.eye(k)
    constraints = np.concatenate([(1 / n)[:, None], np.eye(k)], axis=1)
    b = np.concatenate([[1.0], np.zeros(k)])
    mu = quadprog.solve_qp(gu, np.zeros(k), constraints, b, 1)[0]
    lam = np.maximum(mu / n, 0)
    lam /= lam.sum()
    return lam, float(lam @ gram @ lam)


def problems(seed: int, count: int):
    """Random Jacobians [K, D], K = 1..16: generic, norms over 6 decades, low-rank conflicts."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        k = int(rng.integers(1, 17))
        kind = ("generic", "ill_conditioned", "low_rank_conflict")[i % 3]
        d = int(rng.integers(2, 64))
        jac = rng.normal(size=(k, d))
        if kind == "ill_conditioned":
            jac *= 10 ** rng.uniform(-3, 3, size=(k, 1))
        elif kind == "low_rank_conflict" and k > 1:
            rank = int(rng.integers(1, max(2, k // 2 + 1)))
            jac = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, d))
            jac[0] = -jac[1:].sum(0) * rng.uniform(0.5, 1.5)  # nearly cancelling rewards
        yield kind, jac


def objective(lam, gram) -> float:
    lam = np.asarray(lam, np.float64)
    return float(lam @ gram @ lam)


def test_min_norm_matches_exact_qp():
    solve = jax.jit(mgda.min_norm_with_info)
    worst = 0.0
    for _, jac in problems(0, 240):
        gram = jac @ jac.T
        lam_star, f_star = exact_min_norm(gram)
        info = solve(jnp.asarray(gram, jnp.float32))
        lam = np.asarray(info.weights)
        assert lam.min() >= 0 and abs(lam.sum() - 1) < 1e-5
        scale = np.trace(gram) / gram.shape[0]
        excess = objective(lam, gram) - f_star
        allowed = 1e-4 * f_star + 1e-6 * scale
        worst = max(worst, excess / allowed)
        assert excess <= allowed, (gram.shape, excess, allowed)
        assert float(info.gap) >= -1e-6 * scale
    print(f"worst objective excess / allowed = {worst:.3f}")


def test_reported_gap_certifies_the_objective_in_few_iterations():
    """The reported gap is a certificate: by Frank-Wolfe duality ``objective - optimum <= 2 gap``, checked against
    quadprog's float64 optimum; and the solver needs few iterations."""
    for _, jac in problems(1, 60):
        gram = jac @ jac.T
        info = mgda.min_norm_with_info(jnp.asarray(gram, jnp.float32))
        _, f_star = exact_min_norm(gram)
        scale = np.trace(gram) / gram.shape[0]
        # 1e-6 * scale: the solver sees G rounded to float32 (relative 6e-8 per entry, K <= 16 terms per product)
        assert objective(info.weights, gram) - f_star <= 2 * float(info.gap) + 1e-6 * scale
        assert float(info.gap) >= -1e-6 * scale
        assert int(info.iterations) < 100


def test_two_objectives_are_solved_exactly_without_iterations():
    """K = 2 (interior and vertex optima) against quadprog's float64 optimum, with no Frank-Wolfe iteration."""
    rng = np.random.default_rng(3)
    for i in range(30):
        jac = rng.normal(size=(2, 5))
        if i % 3 == 0:  # one gradient nearly a multiple of the other: the optimum is a vertex
            jac[1] = 3 * jac[0] + 0.1 * rng.normal(size=5)
        gram = jac @ jac.T
        info = mgda.min_norm_with_info(jnp.asarray(gram, jnp.float32))
        lam_star, f_star = exact_min_norm(gram)
        assert int(info.iterations) == 0
        scale = np.trace(gram) / 2
        assert objective(info.weights, gram) - f_star <= 1e-6 * scale  # float32 rounding of G, as above
        np.testing.assert_allclose(np.asarray(info.weights), lam_star, atol=1e-3)


def torchjd_objective(jac: np.ndarray, **kwargs) -> float:
    agg = MGDA(**kwargs)(torch.tensor(jac, dtype=torch.float64)).numpy()
    return float(agg @ agg)


def test_agrees_with_converged_torchjd():
    """torchjd's plain Frank-Wolfe, run long, approaches our optimum from above (O(1/t))."""
    rng = np.random.default_rng(4)
    for _ in range(2):
        jac = rng.normal(size=(5, 20))
        gram = jac @ jac.T
        ours = objective(mgda.min_norm(jnp.asarray(gram, jnp.float32)), gram)
        excess = [torchjd_objective(jac, epsilon=1e-12, max_iters=n) - ours for n in (20, 200, 2000, 20000)]
        assert all(e >= -1e-5 * ours for e in excess), excess
        assert excess[-1] <= 1e-3 * ours, excess
        assert excess[-1] < excess[1] < excess[0], excess


def test_never_worse_than_torchjd_defaults_and_better_on_hard_cases():
    better = []
    for kind, jac in problems(5, 45):
        if jac.shape[0] < 3:
            continue
        gram = jac @ jac.T
        scale = np.trace(gram) / gram.shape[0]
        ours = objective(mgda.min_norm(jnp.asarray(gram, jnp.float32)), gram)
        ref = torchjd_objective(jac)  # defaults: epsilon 1e-3, 100 iterations
        assert ours <= ref + 1e-4 * ref + 1e-6 * scale, (kind, ours, ref)
        if ref > 1.02 * ours + 1e-6 * scale:
            better.append((kind, jac.shape[0], ref / max(ours, 1e-30)))
    print("cases where torchjd's defaults stop above our optimum (kind, K, ratio):")
    for row in better:
        print("  ", row)
    assert better, "expected torchjd's step-size stopping rule to stop early on some hard case"


def test_degenerate_inputs():
    # identical gradients: uniform weights; opposite: (1/2, 1/2), zero direction
    g = np.array([[1.0, 2.0, 3.0]])
    lam = mgda.min_norm(jnp.asarray(np.repeat(g @ g.T, 3, 0).repeat(3, 1), jnp.float32))
    np.testing.assert_allclose(lam, np.full(3, 1 / 3), atol=1e-6)
    opp = np.array([[1.0, 2.0], [-1.0, -2.0]])
    lam = mgda.min_norm(jnp.asarray(opp @ opp.T, jnp.float32))
    np.testing.assert_allclose(lam, [0.5, 0.5], atol=1e-6)
    # K = 1
    assert np.asarray(mgda.min_norm(jnp.array([[4.0]]))).tolist() == [1.0]
    # a zero gradient is masked out by harmonize (it would otherwise make the optimum 0)
    grads = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    out = mgda.harmonize(mgda.gram_matrix(grads), mgda.init_state(3))
    assert float(out.coefficients[1]) == 0.0 and float(out.weights[1]) == 0.0
    np.testing.assert_allclose(np.asarray(out.weights)[[0, 2]], [0.5, 0.5], atol=1e-6)
    # all gradients zero: zero coefficients, finite
    out = mgda.harmonize(jnp.zeros((3, 3)), mgda.init_state(3))
    assert np.all(np.asarray(out.coefficients) == 0) and bool(out.finite)
    # all masked
    assert np.all(np.asarray(mgda.min_norm(jnp.eye(4), jnp.zeros(4, bool))) == 0)


def test_min_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        mgda.min_norm(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="mask"):
        mgda.min_norm(jnp.eye(3), jnp.ones(2, bool))


def test_gram_matrix_leaf_by_leaf_equals_flat():
    key = jax.random.key(0)
    tree = {"a": jax.random.normal(key, (4, 3, 5)), "b": {"c": jax.random.normal(jax.random.fold_in(key, 1), (4, 7))}}
    flat = np.concatenate([np.asarray(tree["a"]).reshape(4, -1), np.asarray(tree["b"]["c"])], axis=1)
    np.testing.assert_allclose(mgda.gram_matrix(tree), flat @ flat.T, rtol=1e-5)
    np.testing.assert_allclose(mgda.gram_matrix(jnp.asarray(flat)), flat @ flat.T, rtol=1e-5)
    with pytest.raises(ValueError, match="leading axis"):
        mgda.gram_matrix({"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))})


def test_harmonize_normalize_rescale_and_ema():
    g = jnp.array([[3.0, 0.0], [0.0, 0.01]])  # orthogonal, norms 3 and 0.01
    state = mgda.init_state(2)
    out = mgda.harmonize(mgda.gram_matrix(g), state, ema_decay=0.7)
    # unit vectors orthogonal -> lam = (1/2, 1/2); c_k = lam_k * mean_norm / n_k
    np.testing.assert_allclose(out.weights, [0.5, 0.5], atol=1e-6)
    s = (3.0 + 0.01) / 2
    np.testing.assert_allclose(out.coefficients, [0.5 * s / 3.0, 0.5 * s / 0.01], rtol=1e-5)
    d = mgda.combine(g, out.coefficients)
    np.testing.assert_allclose(d, [s / 2, s / 2], rtol=1e-5)  # both rewards get equal progress
    # second solve: EMA with rho = 0.7 of lambda
    g2 = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    out2 = mgda.harmonize(mgda.gram_matrix(g2), out.state, ema_decay=0.7)
    lam2 = np.asarray(out2.weights)
    ema2 = 0.7 * np.array([0.5, 0.5]) + 0.3 * lam2
    np.testing.assert_allclose(out2.state.ema_weights, ema2, rtol=1e-6)
    assert int(out2.state.count) == 2
    # the second solve's coefficients use the EMA weights, not this solve's raw ones. K = 3 in a plane with 0 inside
    # the hull, so lambda is interior and differs between the solves (on an edge of two unit gradients, and for any
    # two, it is always (1/2, 1/2))
    plane = lambda degrees: np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], 1)  # noqa: E731
    j1, j3 = plane(np.array([0.0, 100.0, 230.0])), plane(np.array([0.0, 150.0, 200.0])) * np.array([[1.0], [4.0], [0.3]])
    first = mgda.harmonize(jnp.asarray(j1 @ j1.T, jnp.float32), mgda.init_state(3), ema_decay=0.7)
    second = mgda.harmonize(jnp.asarray(j3 @ j3.T, jnp.float32), first.state, ema_decay=0.7)
    ema = 0.7 * np.asarray(first.weights) + 0.3 * np.asarray(second.weights)
    n3 = np.linalg.norm(j3, axis=1)
    np.testing.assert_allclose(second.coefficients, ema * n3.mean() / n3, rtol=1e-5)
    raw = np.asarray(second.weights) * n3.mean() / n3
    assert np.max(np.abs(raw - np.asarray(second.coefficients))) > 0.05 * np.max(raw)


@pytest.mark.parametrize(
    ("normalize", "rescale", "degree"), [(True, True, 1), (False, True, 1), (False, False, 1), (True, False, 0)]
)
def test_update_is_homogeneous_in_the_gradients_scale(normalize, rescale, degree):
    """Scaling every gradient by a scales the update by a (a^0 for the unit-gradient direction of normalize alone);
    with rescale the contributions' norms sum to the mean gradient norm."""
    jac = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)) * np.array([[1.0], [5.0], [0.2]]), jnp.float32)
    config = mgda.MGDAConfig(ema_decay=0.0, normalize=normalize, rescale=rescale)
    d1, st = mgda.mgda_aggregate(jac, mgda.init_state(3), config=config)
    for a in (0.1, 10.0):
        da, _ = mgda.mgda_aggregate(a * jac, mgda.init_state(3), config=config)
        np.testing.assert_allclose(np.asarray(da), a**degree * np.asarray(d1), rtol=2e-5)
    norms = np.linalg.norm(np.asarray(jac), axis=1)
    if rescale:
        np.testing.assert_allclose(np.sum(np.asarray(st.coefficients) * norms), norms.mean(), rtol=1e-5)


def test_ema_holds_the_weight_of_an_absent_reward():
    """A reward masked out of a solve keeps its EMA weight (neither decayed nor reset); over the live rewards the
    applied weights are the EMA of the solves' weights; when the reward returns it starts from the held weight."""
    rng = np.random.default_rng(1)
    grams = [jnp.asarray(j @ j.T, jnp.float32) for j in rng.normal(size=(6, 3, 8))]
    out = mgda.harmonize(grams[0], mgda.init_state(3), ema_decay=0.7)
    held = float(out.state.ema_weights[2])
    live = jnp.array([True, True, False])
    for gram in grams[1:4]:  # three solves without reward 2 (an OCR reward on batches without text prompts)
        before = np.asarray(out.state.ema_weights)
        out = mgda.harmonize(gram, out.state, ema_decay=0.7, mask=live)
        ema = np.asarray(out.state.ema_weights)
        assert ema[2] == held
        np.testing.assert_allclose(ema.sum(), 1.0, rtol=1e-6)
        m_before, m = before[:2].sum(), ema[:2].sum()
        np.testing.assert_allclose(ema[:2] / m, 0.7 * before[:2] / m_before + 0.3 * np.asarray(out.weights[:2]), rtol=1e-5)
        assert float(out.coefficients[2]) == 0.0
    back = mgda.harmonize(grams[4], out.state, ema_decay=0.7)  # reward 2 live again: blended from its held weight
    np.testing.assert_allclose(back.state.ema_weights[2], 0.7 * held + 0.3 * float(back.weights[2]), rtol=1e-5)


def test_amortised_coefficients_follow_the_live_rewards():
    """Between solves: a reward dead in this batch gets 0 and the others keep their ratios and the update's magnitude;
    a reward live now but not at the last solve needs a solve."""
    degrees = np.radians([0.0, 120.0, 250.0])  # 0 inside the hull: every coefficient non-zero
    jac = np.stack([np.cos(degrees), np.sin(degrees)], 1) * np.array([[1.0], [3.0], [0.5]])
    state = mgda.harmonize(jnp.asarray(jac @ jac.T, jnp.float32), mgda.init_state(3)).state
    np.testing.assert_array_equal(mgda.coefficients(state), state.coefficients)
    c, n = np.asarray(state.coefficients), np.asarray(state.norms)
    cm = np.asarray(mgda.coefficients(state, jnp.array([True, False, True])))
    assert np.all(c > 0) and cm[1] == 0.0
    np.testing.assert_allclose(cm[0] / cm[2], c[0] / c[2], rtol=1e-6)
    np.testing.assert_allclose(np.sum(cm * n), np.sum(c * n), rtol=1e-6)
    assert not bool(mgda.needs_solve(state, jnp.array([True, True, True])))
    assert bool(mgda.needs_solve(mgda.init_state(3), jnp.array([True, False, False])))
    without_1 = mgda.harmonize(jnp.asarray(jac @ jac.T, jnp.float32), state, mask=jnp.array([True, False, True])).state
    assert bool(mgda.needs_solve(without_1, jnp.array([True, True, True])))  # reward 1 has no cached coefficient
    assert not bool(mgda.needs_solve(without_1, jnp.array([True, False, False])))


def test_masked_noise_gradient_gets_no_weight():
    """A reward with no signal in the batch has a rounding-noise gradient: unmasked, normalisation turns it into a
    unit direction that takes weight; masked, it gets none and the others are solved as if K = 2."""
    g = jnp.array([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [3e-9, -2e-9, 1e-9]])
    unmasked = mgda.harmonize(g @ g.T, mgda.init_state(3))
    assert float(unmasked.weights[2]) > 0.1
    out = mgda.harmonize(g @ g.T, mgda.init_state(3), mask=jnp.array([True, True, False]))
    two = mgda.harmonize(g[:2] @ g[:2].T, mgda.init_state(2))
    np.testing.assert_allclose(out.weights, [*two.weights, 0.0], atol=1e-6)
    np.testing.assert_allclose(out.coefficients, [*two.coefficients, 0.0], rtol=1e-5, atol=1e-9)
    assert float(out.state.norms[2]) == 0.0


def test_nonfinite_gradient_leaves_state_untouched():
    state = mgda.harmonize(mgda.gram_matrix(jnp.eye(3)), mgda.init_state(3)).state
    bad = jnp.array([[1.0, jnp.nan, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = mgda.harmonize(mgda.gram_matrix(bad), state)
    assert not bool(out.finite)
    assert np.all(np.asarray(out.coefficients) == 0)
    for name in ("ema_weights", "norms", "coefficients", "count"):
        np.testing.assert_array_equal(getattr(out.state, name), getattr(state, name))
    assert int(out.state.nonfinite_count) == 1


# ---- mgda_weights as an optax transform -------------------------------------------------------


def test_mgda_weights_reaches_pareto_stationarity_where_sum_fails():
    """The README's demo: quadratics with conflicting minima and scales 1 / 100 / 0.01."""
    f0 = np.asarray(demo.objectives(demo.START))
    for solve_every in (1, 10):  # every step, and amortised through the cached coefficients
        x = demo.run_mgda(solve_every=solve_every)
        improvement = 1 - np.asarray(demo.objectives(x)) / f0
        assert np.all(improvement > 0.4), (solve_every, improvement)
        # Pareto-stationary: the min-norm point of the normalised gradients is ~0.
        jac = np.asarray(jax.jacrev(demo.objectives)(x), np.float64)
        unit = jac / np.linalg.norm(jac, axis=1, keepdims=True)
        _, f_star = exact_min_norm(unit @ unit.T)
        assert np.sqrt(max(f_star, 0.0)) < 0.05, (solve_every, f_star)
    # Gradient descent on the sum goes to the scale-100 objective's minimiser a_2, exactly as
    # far from a_1 and a_3 as the start: those two do not improve.
    sum_improvement = 1 - np.asarray(demo.objectives(demo.run_sum())) / f0
    assert sum_improvement[1] > 0.99
    assert np.all(np.abs(sum_improvement[[0, 2]]) < 0.05), sum_improvement


def test_mgda_weights_amortised_pass_through_and_state():
    tx = optax.chain(mgda.mgda_weights(2), optax.sgd(1.0))
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    grads = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])}
    updates, state = jax.jit(tx.update)(grads, state, params)
    c = mgda.coefficients(state)  # found inside the chain's state
    np.testing.assert_allclose(updates["w"], -(c[0] * grads["w"][0] + c[1] * grads["w"][1]), rtol=1e-6)
    # combined=True: the caller's combined gradient passes through, MGDA state unchanged
    combined = {"w": jnp.array([0.5, 0.5, 0.0])}
    upd2, state2 = tx.update(combined, state, params, combined=True)
    np.testing.assert_allclose(upd2["w"], -combined["w"])
    np.testing.assert_array_equal(optax.tree_utils.tree_get(state2, "count"), 1)
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(3, 3\), expected \(2, 3\)"):
        tx.update({"w": jnp.ones((3, 3))}, state, params)


def test_mgda_weights_mask_equals_the_pure_aggregate():
    """``mask`` leaves a reward out of the solve (coefficient 0); the transform is mgda_aggregate."""
    params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    rng = np.random.default_rng(5)
    jac = {"a": jnp.asarray(rng.normal(size=(3, 2, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    live = jnp.array([True, False, True])
    tx = mgda.mgda_weights(3, ema_decay=0.5)
    upd, state = jax.jit(lambda j, s, p, m: tx.update(j, s, p, mask=m))(jac, tx.init(params), params, live)
    ref, ref_state = mgda.mgda_aggregate(jac, mgda.init_state(3), live, config=mgda.MGDAConfig(ema_decay=0.5))
    assert float(state.coefficients[1]) == 0.0
    for x, y in zip(jax.tree.leaves(upd), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    np.testing.assert_allclose(state.coefficients, ref_state.coefficients, rtol=1e-6)
    # the update is the combination of the live rewards only
    two = mgda.mgda_aggregate(jax.tree.map(lambda x: x[jnp.array([0, 2])], jac), mgda.init_state(2))[0]
    for x, y in zip(jax.tree.leaves(upd), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5)


def test_mgda_weights_refuses_misplaced_inputs_naming_the_transform():
    params = {"w": jnp.zeros(3)}
    stacked = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])}
    flat = {"w": jnp.array([1.0, 2.0, 0.0])}
    tx = optax.chain(mgda.mgda_weights(2), optax.adam(1e-2))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"mgda_weights\(2\).*params-shaped: on an amortised step pass combined=True"):
        tx.update(flat, state, params)
    with pytest.raises(ValueError, match=r"mgda_weights\(2\): combined=True .*K-stacked Jacobian"):
        tx.update(stacked, state, params, combined=True)
    for before, name in (
        (optax.clip_by_global_norm(1.0), "clip_by_global_norm"),
        (optax.add_decayed_weights(0.1), "add_decayed_weights"),
    ):
        bad = optax.chain(before, mgda.mgda_weights(2), optax.adam(1e-2))
        with pytest.raises(ValueError, match=rf"must come first in its optax.chain.*{name}"):
            jax.jit(bad.update)(stacked, bad.init(params), params)
    nested = optax.chain(optax.scale(2.0), optax.chain(mgda.mgda_weights(2), optax.adam(1e-2)))
    with pytest.raises(ValueError, match="must come first.*scale"):
        nested.update(stacked, nested.init(params), params)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    with pytest.raises(ValueError, match="inside optax.MultiSteps"):
        multi.update(stacked, multi.init(params), params)
    guarded = optax.apply_if_finite(tx, 3)
    with pytest.raises(ValueError, match="inside optax.apply_if_finite.*skip_nonfinite"):
        guarded.update(stacked, guarded.init(params), params)


def test_mgda_weights_then_multisteps_accumulates_combined_updates():
    """MultiSteps placed after mgda_weights accumulates the params-shaped combined updates (a solve per micro-step)."""
    params = {"w": jnp.zeros(3)}
    tx = optax.chain(
        mgda.mgda_weights(2, ema_decay=0.0), optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2).gradient_transformation()
    )
    state = tx.init(params)
    j1 = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])}
    j2 = {"w": jnp.array([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])}
    u1, state = jax.jit(tx.update)(j1, state, params)
    np.testing.assert_array_equal(u1["w"], 0)  # accumulating
    u2, state = jax.jit(tx.update)(j2, state, params)
    expected = (
        sum(mgda.mgda_aggregate(j, mgda.init_state(2), config=mgda.MGDAConfig(ema_decay=0.0))[0]["w"] for j in (j1, j2)) / 2
    )
    np.testing.assert_allclose(u2["w"], -expected, rtol=1e-6)


def test_skip_nonfinite_leaves_params_and_moments_untouched():
    tx = mgda.skip_nonfinite(optax.chain(mgda.mgda_weights(2), optax.adamw(1e-2, weight_decay=0.1)))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    good = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    upd, state = jax.jit(tx.update)(good, state, params)
    params = optax.apply_updates(params, upd)
    bad = {"w": jnp.array([[jnp.nan, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    upd_bad, state_bad = jax.jit(tx.update)(bad, state, params)
    assert upd_bad["w"].shape == (3,)
    np.testing.assert_array_equal(upd_bad["w"], 0)
    assert int(state_bad.skipped) == 1
    for a, b in zip(jax.tree.leaves(state_bad.inner_state), jax.tree.leaves(state.inner_state), strict=True):
        np.testing.assert_array_equal(a, b)
    # without the wrapper mgda_weights alone still gives a zero (never NaN) update
    alone = mgda.mgda_weights(2)
    upd_alone, st = alone.update(bad, alone.init(params))
    np.testing.assert_array_equal(upd_alone["w"], 0)
    assert int(st.nonfinite_count) == 1
