"""``python -m marble_jax.sample``: fused sampling of trained workdirs, pairing with single-model sampling, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_config
from helpers import load_tool, save_tiny_world
from PIL import Image

from marble_jax import experiment, train
from marble_jax.models import lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-epoch single-reward runs on the same tiny world, and one on another world."""
    out, worlds = {}, {seed: save_tiny_world(tmp_path_factory.mktemp(f"world{seed}"), seed=seed) for seed in (0, 1)}
    for name, reward, seed in (("a", "world_geneval", 0), ("b", "world_aesthetic", 0), ("other", "world_ocr", 1)):
        world = worlds[seed]
        config = tiny_config.get_config(str(world))
        config.update(method="single", single_reward=reward, total_epochs=1)
        config.eval.every = 100
        workdir = tmp_path_factory.mktemp(name)
        train.run(experiment.build_setup(config), config, workdir)
        out[name] = workdir
    return out


def sample(out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "marble_jax.sample", "--prompts=a red circle", "--num_steps=3", "--images_per_prompt=2",
           "--batch=2", f"--out={out}", *flags]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def images(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("0000_*.png"))])


def test_fused_sampling_writes_images_and_vertices_pair_with_one_model(runs, tmp_path):
    fused = sample(tmp_path / "fused", f"--models={runs['a']},{runs['b']}", "--weights=1,0", "--etas=0.7,1.0")
    assert fused.returncode == 0, fused.stderr[-3000:]
    alone = sample(tmp_path / "alone", f"--models={runs['a']}", "--etas=0.7")
    assert alone.returncode == 0, alone.stderr[-3000:]
    a, b = images(tmp_path / "fused"), images(tmp_path / "alone")
    assert a.shape == (2, 32, 32, 3) and (tmp_path / "fused" / "grid.png").is_file()
    # w = e_1 is model a's own SDE sampling with the same noise: equal up to the uint8 rounding of float noise
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    mixed = sample(tmp_path / "mixed", f"--models=base,{runs['b']}", "--weights=0.5,0.5", "--guidance=2.0")
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    settings = json.loads((tmp_path / "mixed" / "sample.json").read_text())
    assert settings["weights"] == [0.5, 0.5] and settings["models"][0] == "base" and settings["guidance"] == 2.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [(("--weights=0.5,0.6",), "sum to 1"), (("--weights=1",), "1 values for 2 models"), (("--etas=0.5,-1",), "non-negative")],
)  # fmt: skip
def test_bad_weights_are_named(runs, tmp_path, flags, message):
    proc = sample(tmp_path, f"--models={runs['a']},{runs['b']}", *flags)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_models_of_different_bases_are_refused(runs, tmp_path):
    proc = sample(tmp_path, f"--models={runs['a']},{runs['other']}")
    assert proc.returncode != 0 and "config.model differs" in proc.stderr, proc.stderr[-2000:]
    proc = sample(tmp_path, f"--models={tmp_path / 'nowhere'}")
    assert proc.returncode != 0 and "not a training workdir" in proc.stderr, proc.stderr[-2000:]


def test_a_pytorch_users_adapter_samples_as_the_run_it_was_exported_from(runs, tmp_path):
    """``--models=lora:DIR`` (a diffusers adapter: here run a's EMA LoRA written by ``tools/export_lora.py``) on the
    base model of ``--config`` gives run a's images: the same parameters, seeds and noise."""
    written = load_tool("export_lora").export(runs["a"], tmp_path / "adapter")
    config = train.saved_config(json.loads((runs["a"] / "config.json").read_text())["config"])
    _, state = train.restore_run(experiment.build_setup(config), config, runs["a"])
    loaded, _ = lora.load_lora(written)
    for name, ab in loaded.items():
        for k in ("a", "b"):
            np.testing.assert_array_equal(ab[k], state.ema_params[name][k])
    world = config.model.world_dir
    adapter = sample(tmp_path / "adapter_images", f"--models=lora:{tmp_path / 'adapter'}",
                     f"--config={ROOT / 'tests' / 'tiny_config.py'}:{world}")  # fmt: skip
    assert adapter.returncode == 0, adapter.stderr[-3000:]
    run = sample(tmp_path / "run_images", f"--models={runs['a']}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.abs(images(tmp_path / "adapter_images").astype(int) - images(tmp_path / "run_images").astype(int)).max() <= 1
    proc = sample(tmp_path / "no_config", f"--models=lora:{tmp_path / 'adapter'}")
    assert proc.returncode != 0 and "needs --config" in proc.stderr, proc.stderr[-2000:]
