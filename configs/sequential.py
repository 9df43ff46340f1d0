"""Sequential baseline: one reward at a time, in stages that cycle through the five rewards.

    python -m marble_jax.main --config=configs/sequential.py
    python -m marble_jax.main --config=configs/sequential.py --config.total_epochs=120

A run should show each reward rising during its own stage and drifting during the others'.
"""

from marble_jax import defaults


def get_config(scale: str = "world"):
    config = defaults.with_rewards(defaults.get_config(scale), defaults.FIVE_REWARDS[scale])
    config.method = "sequential"
    stage = max(1, config.total_epochs // (2 * len(config.rewards)))  # every reward gets two stages
    config.sequential_stages = tuple((name, stage) for name in config.rewards)
    return config
