"""Acceptance: ``configs/k5.py:sd35`` with ``--config.model.path`` and every reward's checkpoint options set runs the
paper's five-reward setup (PickScore, HPSv2, CLIPScore, OCR, GenEval; evaluation-only aesthetic) end to end, as
``python -m marble_jax.main`` in a subprocess, on tiny random stand-ins saved in the real formats (diffusers SD3
snapshot, transformers CLIPModel / Mask2Former directories, an OpenCLIP training checkpoint, a LAION MLP ``.pth``):
the same code path as real weights. OCR is the real Tesseract.

The reward options are passed on the command line (``--config.reward_options.<reward>.<option>=...``): the sd35
config lists every option of its rewards with its default, so ml_collections can override each one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    TINY_CLIP_VOCAB_SIZE,
    save_clip_processor,
    save_tiny_aesthetic_mlp,
    save_tiny_clip,
    save_tiny_mask2former,
    save_tiny_openclip,
    save_tiny_sd3_snapshot,
)
from PIL import Image

from marble_jax.checkpoint import Checkpointer

ROOT = Path(__file__).parents[1]
GENEVAL_METADATA = Path("/work/shared/data/prompts/geneval/test_metadata.jsonl")
FIVE = ("pickscore", "hpsv2", "clipscore", "ocr", "geneval")
OCR_PROMPTS = ['a storefront sign that says "open"', 'a birthday cake with "happy birthday" written in icing']
PLAIN_PROMPT = "a red cat sleeping on a sofa"
SIZES = [  # tiny: 2 steps of 2 prompts x 2 images (2 rollout chunks, 2 micro-batches), 2 sampler steps, 32 px images
    "--config.total_epochs=2",
    "--config.sample.num_steps=2",
    "--config.sample.images_per_prompt=2",
    "--config.sample.prompts_per_epoch=2",
    "--config.sample.rollout_batch=2",
    "--config.sample.train_batch=2",
    "--config.lora.rank=4",
    "--config.lora.alpha=8.0",
    "--config.eval.every=2",
    "--config.eval.num_prompts=4",
    "--config.eval.num_steps=2",
    "--config.eval.batch=4",
    "--config.eval.grid_images=4",
    "--config.checkpoint.every=1",
    "--config.model.resolution=32",  # the snapshot's VAE (2x) and position table (8 patches of 2) allow up to 32
    "--config.model.max_sequence_length=16",
    "--config.model.use_t5=True",
    "--config.model.compute_dtype=",  # float32
    "--config.model.remat=none",
]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """The snapshot, every reward checkpoint and the prompt files, by the option they are given to."""
    if not GENEVAL_METADATA.exists():
        pytest.skip(f"{GENEVAL_METADATA} not found")
    root = tmp_path_factory.mktemp("sd35_rewards")
    save_tiny_sd3_snapshot(root / "sd35", with_t5=True)
    save_tiny_clip(root / "pickscore", seed=1, hidden_act="gelu", logit_scale=4.2)  # PickScore: no processor files
    save_clip_processor(root / "clip_h", dict(size={"shortest_edge": 40}))  # CLIP-H's processor + tokenizer
    save_tiny_openclip(
        root / "HPS_v2.1_compressed.pt",
        32,
        vision=dict(width=64, layers=1, head_width=64, mlp_ratio=2.0, patch_size=32, image_size=224),  # HPSv2 pads to 224
        text=dict(context_length=77, vocab_size=TINY_CLIP_VOCAB_SIZE, width=64, heads=1, layers=1, mlp_ratio=2.0),
        seed=3,
    )
    save_tiny_clip(root / "clip_l", seed=0, legacy_eos=True, processor={})  # CLIP-L: CLIPScore, GenEval colours, aesthetic
    save_tiny_mask2former(root / "mask2former")
    save_tiny_aesthetic_mlp(root / "aesthetic.pth", dims=(16, 12, 8, 4, 2, 1), seed=2)

    rows = [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines() if line.strip()]
    geneval = [rows[0], rows[1], next(r for r in rows if r["tag"] == "position")]
    # Training: one GenEval row and one OCR prompt, so each step (2 prompts: a permutation) trains all five rewards.
    train = [geneval[0], {"prompt": OCR_PROMPTS[0]}]
    evaluation = [geneval[1], {"prompt": OCR_PROMPTS[1]}, geneval[2], {"prompt": PLAIN_PROMPT}]
    for name, prompts in (("train", train), ("eval", evaluation)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return {
        "model.path": root / "sd35",
        "reward_options.pickscore.path": root / "pickscore",
        "reward_options.pickscore.processor_path": root / "clip_h",
        "reward_options.hpsv2.path": root / "HPS_v2.1_compressed.pt",
        "reward_options.hpsv2.tokenizer_path": root / "clip_h",
        "reward_options.clipscore.path": root / "clip_l",
        "reward_options.geneval.detector_path": root / "mask2former",
        "reward_options.geneval.clip_path": root / "clip_l",
        "eval_reward_options.aesthetic.path": root / "aesthetic.pth",
        "eval_reward_options.aesthetic.clip_path": root / "clip_l",
        "prompts.train": root / "train.jsonl",
        "prompts.eval": root / "eval.jsonl",
    }


def run_k5(workdir: Path, options: dict[str, Path], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m marble_jax.main --config=configs/k5.py:sd35`` with ``options`` and :data:`SIZES`."""
    command = [sys.executable, "-m", "marble_jax.main", f"--config={ROOT / 'configs' / 'k5.py'}:sd35", f"--workdir={workdir}"]
    command += [f"--config.{key}={value}" for key, value in options.items()] + SIZES
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_k5_sd35_runs_end_to_end(stand_ins, tmp_path):
    result = run_k5(tmp_path, stand_ins)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "] 2/2 " in output  # the last progress line

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert math.isclose(sum(metrics[0][f"lambda/{name}"] for name in FIVE), 1.0, rel_tol=1e-5)  # step 0 solves over K = 5
    for m in metrics:
        assert m["skipped"] == 0.0, m  # every reward finite where it applies: the update ran
        for name in FIVE:
            assert math.isfinite(m[f"train/{name}"]), (name, m)

    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]  # the base model, then the end of the run
    for e in evals:
        assert set(e) == {"step", "aesthetic", *FIVE}
        assert all(math.isfinite(e[name]) for name in ("aesthetic", *FIVE)), e
        assert e["geneval"] in (0.0, 0.5, 1.0)  # strict in evaluation: 0 / 1 on each of the 2 GenEval prompts

    assert Checkpointer(tmp_path / "checkpoints").steps() == [1, 2]
    for step in (0, 2):
        with Image.open(tmp_path / "samples" / f"step_{step:06d}.png") as grid:
            assert grid.format == "PNG" and min(grid.size) >= 2 * 32  # a 2 x 2 grid of 32 px images, scaled x 2


def test_missing_reward_checkpoint_fails_before_any_rollout(stand_ins, tmp_path):
    missing = tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"
    result = run_k5(tmp_path / "run", {**stand_ins, "reward_options.hpsv2.path": missing}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"hpsv2: path checkpoint file '{missing}' not found" in output, output[-3000:]
    assert "xswu/HPSv2" in output  # the public checkpoint that belongs there
    assert "] 1/2 " not in output and not (tmp_path / "run" / "checkpoints").exists()
