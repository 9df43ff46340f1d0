"""MARBLE on the paper's five rewards: amortised (a full solve every N = 10 steps), EMA rho = 0.7.

    python -m marble_jax.main --config=configs/k5.py                   # the embedded world, minutes on a CPU
    python -m marble_jax.main --config=configs/k5.py:sd35 --config.model.path=/path/to/stable-diffusion-3.5-medium \\
        --config.prompts.train=train.jsonl --config.prompts.eval=test.jsonl --workdir=runs/k5_sd35

A run should show the five held-out rewards (eval/* in TensorBoard, eval.jsonl) rising together above the base
model's (step 0), the MGDA weights (ema_lambda/*) moving away from uniform, and no anti-aligned solve
(anti_aligned = 0: the balanced direction never opposes a reward's gradient).
"""

from marble_jax import defaults


def get_config(scale: str = "world"):
    config = defaults.with_rewards(defaults.get_config(scale), defaults.FIVE_REWARDS[scale])
    config.method = "marble_amortized"
    return config
