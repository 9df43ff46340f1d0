"""The weighted-sum baseline on the five rewards: one reward = sum of the raw scores (weights 1, REFERENCE §2),
normalised as one reward.

    python -m marble_jax.main --config=configs/weighted_sum.py
    python -m marble_jax.main --config=configs/weighted_sum.py --config.reward_weights.world_ocr=2.0

A run should show the sum rising, with the rewards whose scale or variance is largest dominating, and the
diagnostics (every diagnostics_every steps) flagging anti-aligned directions (anti_aligned = 1) often.
"""

from marble_jax import defaults


def get_config(scale: str = "world"):
    config = defaults.with_rewards(defaults.get_config(scale), defaults.FIVE_REWARDS[scale])
    config.method = "weighted_sum"
    for name in config.rewards:
        config.reward_weights[name] = 1.0
    return config
