"""Step-level DPO (MSDDA, Lemma 1) on our own rollouts: each epoch pairs the best and the worst image of every
prompt by one reward (default: the world's CLIPScore) and trains on the pairs against the frozen base model.
``--config.dpo.step_level=False`` gives the Diffusion-DPO baseline (no step-level term).

    python -m marble_jax.main --config=configs/dpo.py
    python -m marble_jax.main --config=configs/dpo.py --config.single_reward=world_pickscore --config.dpo.beta=2000

A run should show the chosen reward rising over the base (more slowly than DiffusionNFT on the same reward: one
pair per prompt uses two of its eight images) and ``dpo_accuracy`` (pairs the model already ranks right) above 0.5.
"""

from marble_jax import defaults


def get_config(scale: str = "world"):
    config = defaults.with_rewards(defaults.get_config(scale), defaults.FIVE_REWARDS[scale])
    config.method = "dpo"
    config.single_reward = config.rewards[2]
    return config
