"""Per-reward advantages against a numpy transcription of the public per-prompt stat tracker."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from marble_jax import advantages as adv


def reference_advantages(rewards: np.ndarray, prompts: np.ndarray, global_std: bool) -> np.ndarray:
    """The public code's rule over applicable samples: (R - prompt mean) / (std + 1e-4), np.std."""
    out = np.zeros_like(rewards, dtype=np.float64)
    valid = np.isfinite(rewards)
    for p in np.unique(prompts):
        sel = (prompts == p) & valid
        if not sel.any():
            continue
        mean = rewards[sel].mean()
        std = (rewards[valid].std() if global_std else rewards[sel].std()) + 1e-4
        out[sel] = (rewards[sel] - mean) / std
    return out


def float32_bound(rewards: np.ndarray, prompts: np.ndarray, ref: np.ndarray, global_std: bool) -> np.ndarray:
    """Per-sample bound on the float32 error of the advantages (to first order in u = 2^-24), from the conditioning
    ``k = max|R| / (std + 1e-4)`` of the std's population (of n rewards) and the group size g: the rewards round to
    float32 (u |R|) and a group mean is within (g + 1) u max|R|, so ``R - mean``, a cancelling difference, is within
    (g + 2) u max|R| = (g + 2) k u (std + 1e-4); the std is within (k + n / 2 + 2) u relative, the quotient rounds
    once more: ``u ((g + 2) k + |A| (k + n / 2 + 3))``."""
    valid = np.isfinite(rewards)
    bound = np.zeros_like(ref)
    for p in np.unique(prompts):
        sel = (prompts == p) & valid
        if not sel.any():
            continue
        population = valid if global_std else sel
        n, g = population.sum(), sel.sum()
        k = np.abs(rewards[population]).max() / (rewards[population].std() + 1e-4)
        bound[sel] = 2.0**-24 * ((g + 2) * k + np.abs(ref[sel]) * (k + n / 2 + 3))
    return bound


def test_matches_reference_global_and_group_std():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 4)
    rewards = rng.normal(size=24) * rng.uniform(0.1, 3, size=24)
    rewards[[1, 5, 6, 7]] = np.nan  # group 1 is entirely n/a
    for global_std in (True, False):
        ours = adv.group_advantages(jnp.asarray(rewards), jnp.asarray(groups), 6, global_std=global_std)
        ref = reference_advantages(rewards, groups, global_std)
        ratio = np.abs(np.asarray(ours) - ref) / np.maximum(float32_bound(rewards, groups, ref, global_std), 1e-30)
        print(f"global_std={global_std}: error / bound <= {ratio.max():.3f}")
        assert np.all(ratio <= 1), ratio
        assert np.all(np.asarray(ours)[[1, 5, 6, 7]] == 0)


def test_optimality_weights_clip_and_map():
    a = jnp.array([-100.0, -5.0, -2.5, 0.0, 2.5, 5.0, 100.0])
    np.testing.assert_allclose(adv.optimality_weights(a, 5.0), [0, 0, 0.25, 0.5, 0.75, 1, 1])


def test_edge_cases_are_finite_and_neutral():
    groups = jnp.array([0, 1, 1, 2, 2, 2])
    # a group of size one, all-equal rewards, all-NaN rewards
    rewards = jnp.array(
        [
            [3.0, 1.0, 2.0, 0.0, 1.0, 2.0],
            [7.0, 7.0, 7.0, 7.0, 7.0, 7.0],
            [jnp.nan] * 6,
        ]
    )
    r = np.asarray(adv.reward_weights(rewards, groups, 3))
    assert np.all(np.isfinite(r))
    assert r[0, 0] == 0.5  # alone in its group
    assert np.all(r[1] == 0.5) and np.all(r[2] == 0.5)
    r_group = np.asarray(adv.reward_weights(rewards, groups, 3, global_std=False))
    assert np.all(np.isfinite(r_group)) and r_group[0, 0] == 0.5
    # a two-sample group with its own std: the samples sit at -1 and +1 std
    assert r_group[0, 1] < 0.5 < r_group[0, 2]


def test_weighted_sum_rewards_fill_na_with_reward_mean():
    rewards = jnp.array([[1.0, 2.0, 3.0, 4.0], [jnp.nan, 10.0, jnp.nan, 20.0], [jnp.nan] * 4])
    total = np.asarray(adv.weighted_sum_rewards(rewards, jnp.array([1.0, 0.5, 2.0])))
    # reward 2 mean is 15, reward 3 applies nowhere -> 0
    np.testing.assert_allclose(total, [1 + 7.5, 2 + 5, 3 + 7.5, 4 + 10])
    only_na = adv.weighted_sum_rewards(jnp.array([[jnp.nan, 1.0]]), jnp.array([1.0]))
    assert np.isnan(np.asarray(only_na)[0]) and np.asarray(only_na)[1] == 1.0
