"""MARBLE on three dense rewards (the public multi-reward recipe's PickScore + HPSv2.1 + CLIPScore), amortised.

    python -m marble_jax.main --config=configs/k3.py
    python -m marble_jax.main --config=configs/k3.py:sd35 --config.model.path=/path/to/stable-diffusion-3.5-medium ...

A run should show the three held-out rewards rising above the base model's with no anti-aligned solve.
"""

from marble_jax import defaults


def get_config(scale: str = "world"):
    config = defaults.with_rewards(defaults.get_config(scale), defaults.FIVE_REWARDS[scale][:3])
    config.method = "marble_amortized"
    return config
