"""The default run configuration: every default of the paper's setup (REFERENCE §2-3), named as the paper
names it, and the scale of the embedded world. The files under ``configs/`` start from :func:`get_config`.

Two scales:

* ``"sd35"``: the paper's SD3.5-Medium run (48 prompts x 24 images per epoch, DPM-Solver-2 with 25 steps,
  512 px, T5 length 128, LoRA r 32 / alpha 64, AdamW 3e-4); ``model.path`` must name a snapshot.
* ``"world"`` (the default): the same algorithm at the embedded world's scale (8 prompts x 8 images,
  10 sampler steps), so a run finishes in minutes on a laptop CPU. Only sizes, step counts and the
  learning rate differ; the loss, advantages, balancing and schedules are the paper's.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

SCALES = ("world", "sd35")
FIVE_REWARDS = {
    "world": ("world_pickscore", "world_hps", "world_clipscore", "world_ocr", "world_geneval"),
    "sd35": ("pickscore", "hpsv2", "clipscore", "ocr", "geneval"),
}
"""The paper's five rewards at each scale (the world's ``world_hps`` stands in for HPSv2.1)."""
EVAL_ONLY_REWARDS = {"world": ("world_aesthetic",), "sd35": ("aesthetic",)}
"""Scored in evaluation, not trained: the paper's Aesthetic column (add ``imagereward`` / ``unified_reward`` at sd35)."""


def get_config(scale: str = "world") -> ml_collections.ConfigDict:
    """The full default config at ``scale`` (see the module doc); method ``marble_amortized`` on no rewards."""
    if scale not in SCALES:
        raise ValueError(f"config scale must be one of {SCALES}, got {scale!r} (e.g. --config=configs/k5.py:sd35)")
    c = ml_collections.ConfigDict()
    c.scale = scale  # world | sd35: what the defaults below were chosen for (sd35 needs model.path)
    c.seed = 0
    c.total_epochs = 300  # optimizer steps (one per epoch)
    c.method = "marble_amortized"  # single | weighted_sum | sequential | marble | marble_amortized | marble_gram | dpo
    c.rewards = ()  # training rewards, in order (the K axis)
    c.reward_options = ml_collections.ConfigDict()  # {reward: {option: value}} for training
    c.eval_reward_options = ml_collections.ConfigDict()  # {reward: {option: value}} for held-out evaluation
    c.eval_only_rewards = ()  # rewards scored in evaluation but not trained (the paper's table: aesthetic, imagereward, ...)
    c.single_reward = ""  # method "single"
    c.reward_weights = ml_collections.ConfigDict()  # method "weighted_sum": {reward: weight}, default 1
    c.sequential_stages = ()  # method "sequential": ((reward, epochs), ...), cycled
    # method "dpo": step-level DPO (MSDDA Lemma 1; step_level=False: Diffusion-DPO) on one (best, worst) pair per
    # prompt of config.single_reward's scores on the rollouts; beta = the constant lambda_T omega (marble_jax/dpo.py)
    c.dpo = ml_collections.ConfigDict(dict(beta=1000.0, step_level=True))

    # DiffusionNFT (REFERENCE §2): beta 0.1 in the multi-reward config.
    c.nft = ml_collections.ConfigDict(dict(beta=0.1, adv_clip_max=5.0, kl_beta=1e-4, adaptive_weighting=True))
    c.advantage = ml_collections.ConfigDict(dict(global_std=True, eps=1e-4))
    # MARBLE (REFERENCE §3): EMA rho = 0.7, a full solve every N = 10 steps.
    c.balance = ml_collections.ConfigDict(
        dict(ema_decay=0.7, solve_every=10, normalize=True, rescale=True, max_iters=1000, tol=1e-5, row_chunk=None)
    )
    c.diagnostics_every = 10  # weighted sum / single / sequential: per-reward cosines every n steps (K + 1 backwards)

    # Rollouts: CFG-free DPM-Solver-2, 25 steps (multi-reward), 24 images per prompt, 48 prompts per epoch.
    c.sample = ml_collections.ConfigDict(
        dict(
            method="dpm2",
            num_steps=25,
            eta=0.7,  # method "sde" only
            shift=placeholder(float),  # None: the model's scheduler shift
            images_per_prompt=24,
            prompts_per_epoch=48,
            timestep_fraction=0.99,  # each sample trains on int(0.99 num_steps) of its grid's timesteps
            rollout_batch=48,  # images per rollout chunk (rewards of a chunk overlap the next chunk's rollout)
            # samples per micro-batch of the update (gradients accumulated over micro-batches; the update is the
            # epoch's mean whatever its size): 4 per device on 8 devices, so each device's matmuls are large enough
            train_batch=32,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(learning_rate=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, max_grad_norm=1.0)
    )
    c.finetune = "lora"  # lora | full
    c.lora = ml_collections.ConfigDict(
        dict(
            rank=32,
            alpha=64.0,
            targets=r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
            init_std=placeholder(float),
            # start from a trained adapter (lora.load_lora: diffusers' file, a peft save_pretrained directory, a
            # DiffusionNFT / Flow-GRPO checkpoint-N); its rank, alpha and modules must equal the three above
            init_from="",
        )
    )
    c.old_policy_schedule = 1  # 1: d = min(0.001 step, 0.5); 2 (OCR): 0 before step 75, then min(0.0075 (step - 75), 0.999)
    c.ema_decay = 0.9  # evaluation EMA of the trained parameters, with warm-up

    c.model = ml_collections.ConfigDict(
        dict(
            path="",  # a diffusers SD3 / SD3.5 snapshot (directory or HF cache id); empty: the embedded world
            world_dir="",  # the world model's checkpoint directory; empty: the one shipped in the package
            params_checkpoint="",  # orbax parameters written by tools/convert_sd3.py (skips the safetensors)
            dtype="float32",  # master weights
            compute_dtype="bfloat16",
            remat="block",  # none | block (checkpoint each MMDiT block) | dots (each block, its matmul outputs saved)
            scan_blocks=True,  # uniform consecutive MMDiT blocks under one lax.scan each (compile time flat in depth)
            attention="auto",  # auto (cuDNN flash for bf16 on NVIDIA GPUs, XLA where it does not apply) | cudnn | xla | einsum
            use_t5=True,
            max_sequence_length=128,
            resolution=512,
            text_dtype="bfloat16",  # CLIP-L/G and T5 parameters and compute ("" = model.dtype); T5's wo stays float32
            text_batch=16,  # prompts per text-encoder call, every call padded to it (one compiled program)
            encode_on_cpu=False,  # True: the encoders in host memory (then text_dtype "float32": bf16 is slow on CPU)
        )
    )
    # train / eval: .txt / .jsonl files (empty: the world's splits); embeddings: a directory written by
    # tools/encode_prompts.py (its prompts are never encoded; holding every prompt, the text encoders are not loaded);
    # cache_gb: the LRU bound of the in-memory embedding cache
    c.prompts = ml_collections.ConfigDict(dict(train="", eval="", embeddings="", cache_gb=4.0))
    # In-training evaluation: 40 Euler ODE steps, guidance 1.0, on the EMA parameters.
    c.eval = ml_collections.ConfigDict(
        dict(every=50, num_prompts=64, images_per_prompt=1, num_steps=40, method="euler", batch=16, grid_images=16)
    )
    # every: steps between saves; every_minutes: also save when this much time passed since the last save (0: off),
    # so that a preemption loses at most that much work whatever a step's length
    c.checkpoint = ml_collections.ConfigDict(dict(every=25, every_minutes=0.0, keep=3, async_save=True))
    # The (data, fsdp) mesh. Unset sizes follow the placement rule (sharding.py): LoRA data-parallel (data = all
    # devices), full fine-tuning FSDP within each host. num_devices: use the first n devices (default all).
    # replicate_frozen_gb: frozen weights (LoRA base, reference policy; in the compute dtype) up to this size are
    # replicated on every device, larger ones FSDP-sharded.
    c.mesh = ml_collections.ConfigDict(
        dict(data=placeholder(int), fsdp=placeholder(int), num_devices=placeholder(int), replicate_frozen_gb=16.0)
    )
    c.log_every = 1
    # A directory for JAX's persistent compilation cache: compiled programs are kept there and a resumed or repeated
    # run of the same program loads them instead of compiling ("": off)
    c.compilation_cache_dir = ""
    # Reward-hacking monitors (marble_jax/monitors.py): an evaluation-only reward below the step-0 evaluation's mean
    # by more than eval_only_margin x its per-image std there logs a warning (0.5: a "medium" effect; on the world the
    # aesthetic's std is 0.64 and the multi-reward runs lower it by 0.19 - 0.37 std)
    c.monitors = ml_collections.ConfigDict(dict(eval_only_margin=0.5))
    c.eval_only_rewards = EVAL_ONLY_REWARDS[scale]
    if scale == "world":
        c.total_epochs = 30
        c.sample.update(num_steps=10, images_per_prompt=8, prompts_per_epoch=8, rollout_batch=32, train_batch=64)
        c.model.compute_dtype = ""
        c.model.update(remat="none", scan_blocks=False)
        c.lora.rank = 16
        c.lora.alpha = 32.0
        c.optim.learning_rate = 1e-3
        c.eval.update(every=20, num_prompts=192, num_steps=10, batch=64, grid_images=36)
        c.checkpoint.every = 10
        c.diagnostics_every = 5
    return c


def with_rewards(config: ml_collections.ConfigDict, names: tuple[str, ...]) -> ml_collections.ConfigDict:
    """``config`` training ``names``. Each trained and evaluation-only reward's options are listed with their
    defaults (``--config.reward_options.pickscore.path=...`` then works); GenEval is scored partial in training
    and strict in evaluation (``eval_reward_options`` override the training options of a reward)."""
    from marble_jax import rewards

    config.rewards = tuple(names)
    for name in names:
        config.reward_options[name] = rewards.default_options(name)
    for name in config.eval_only_rewards:
        config.eval_reward_options[name] = rewards.default_options(name)
    for name in names:
        if name in ("world_geneval", "geneval"):
            config.eval_reward_options[name] = {"strict": True}
    return config
