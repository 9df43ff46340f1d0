"""A seconds-per-step training config for the trainer tests: a tiny random world model (built by
``helpers.save_tiny_world``) at ``get_config("<world_dir>")``, 2 prompts x 4 images, 4 sampler steps, K = 3.
``get_config("<world_dir>|<clip_dir>")`` trains on GenEval and a JAX reward instead: CLIPScore of the tiny
transformers CLIP in ``clip_dir`` (``helpers.save_tiny_clip``)."""

from marble_jax import defaults


def get_config(world_dir: str = ""):
    world_dir, _, clip_dir = world_dir.partition("|")
    names = ("world_geneval", "clipscore") if clip_dir else ("world_geneval", "world_ocr", "world_aesthetic")
    config = defaults.with_rewards(defaults.get_config("world"), names)
    if clip_dir:
        config.reward_options.clipscore = {"path": clip_dir, "batch_size": 2}
    config.method = "marble_amortized"
    config.model.world_dir = world_dir
    config.total_epochs = 4
    config.sample.update(
        num_steps=4, images_per_prompt=4, prompts_per_epoch=2, rollout_batch=4, train_batch=8, timestep_fraction=0.5
    )
    config.balance.solve_every = 2
    config.lora.update(rank=4, alpha=8.0)
    config.eval.update(every=2, num_prompts=8, images_per_prompt=1, num_steps=2, batch=8, grid_images=4)
    config.checkpoint.update(every=1, keep=3)
    config.diagnostics_every = 2
    return config
