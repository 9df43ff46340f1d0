"""DiffusionNFT on one reward (default: the world's GenEval; NFT beta 0.1 as the multi-reward runs, for equal
comparisons). The five rewards are still scored, held out, to show what single-reward training does to the others.

    python -m marble_jax.main --config=configs/single.py
    python -m marble_jax.main --config=configs/single.py --config.single_reward=world_ocr

A run should show the chosen reward rising fastest of all methods, and some of the others falling.
"""

from marble_jax import defaults


def get_config(scale: str = "world"):
    config = defaults.with_rewards(defaults.get_config(scale), defaults.FIVE_REWARDS[scale])
    config.method = "single"
    config.single_reward = config.rewards[-1]
    return config
