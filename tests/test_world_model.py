"""The embedded world's base model: the shipped checkpoint and tools/pretrain_world.py."""

import jax
import numpy as np
import pytest
from helpers import load_tool

from marble_jax.world import model as world_model


def _pretrain_module():
    return load_tool("pretrain_world")


def test_shipped_checkpoint_samples_deterministically():
    world = world_model.load_world_model()
    params = jax.tree.leaves(world.params)
    assert sum(x.size for x in params) < 2_000_000
    assert set(world.params) == {"mmdit", "text"}
    context, pooled = world.encode(["a red circle", 'the word "cat"'])
    assert context.shape == (2, world_model.MAX_LENGTH, 64) and pooled.shape == (2, 64)
    key = jax.random.key(3)
    first = np.asarray(world.sample(world.params, context, pooled, key, num_steps=4))
    again = np.asarray(world.sample(world.params, context, pooled, key, num_steps=4))
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert first.std() > 0  # not a constant image
    other = np.asarray(world.sample(world.params, context, pooled, jax.random.key(4), num_steps=4))
    assert not np.array_equal(first, other)


def test_missing_checkpoint_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain_world.py"):
        world_model.load_world_model(tmp_path)


def test_pretrain_few_steps_loads_and_loss_decreases(tmp_path):
    args = ["--steps", "8", "--batch", "8", "--warmup", "1", "--out", str(tmp_path), "--log-every", "4"]
    losses = _pretrain_module().main(args)
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * losses[0]
    world = world_model.load_world_model(tmp_path)
    assert world.config["training"]["steps"] == 8
    context, pooled = world.encode(["a blue square"])
    images = np.asarray(world.sample(world.params, context, pooled, jax.random.key(0), num_steps=2, method="dpm2"))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
