"""Reading checkpoints: sharded safetensors with and without an index, bf16, the HF cache, errors."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from marble_jax.models import weights
from marble_jax.models.convert import component_dir


def test_sharded_with_index_and_without(tmp_path):
    a, b = torch.randn(3, 4), torch.randn(5)
    save_file({"a": a}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": b}, tmp_path / "model-00002-of-00002.safetensors")
    state = weights.read_safetensors(tmp_path, "model")  # no index: every shard
    np.testing.assert_array_equal(state["a"], a.numpy())
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    state = weights.read_safetensors(tmp_path)
    assert sorted(state) == ["a", "b"]
    np.testing.assert_array_equal(state["b"], b.numpy())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing.*model-00002-of-00002"):
        weights.read_safetensors(tmp_path)


def test_bf16_and_missing_file(tmp_path):
    x = torch.randn(2, 3).to(torch.bfloat16)
    save_file({"x": x}, tmp_path / "diffusion_pytorch_model.safetensors")
    got = weights.read_safetensors(tmp_path, "diffusion_pytorch_model")["x"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), x.float().numpy())
    with pytest.raises(FileNotFoundError, match=r"no model\*\.safetensors file in .*diffusion_pytorch_model"):
        weights.read_safetensors(tmp_path, "model")


def test_resolve_dir_local_pipeline_and_hf_cache(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.*not a directory"):
        weights.resolve_dir(tmp_path / "nope")
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    assert component_dir(pipe, "transformer") == pipe / "transformer"
    with pytest.raises(FileNotFoundError, match="no subfolder 'vae'"):
        component_dir(pipe, "vae")
    cache = tmp_path / "hub"
    snap = cache / "models--org--name" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--org--name" / "refs").mkdir()
    (cache / "models--org--name" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert weights.resolve_dir("org/name") == snap
    with pytest.raises(FileNotFoundError, match="org/other.*Hugging Face cache"):
        weights.resolve_dir("org/other")


def test_assign_reports_missing_unexpected_and_shapes():
    target = {"layer": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}
    plan = {("layer", "kernel"): ("l.weight", weights.linear_kernel), ("layer", "bias"): ("l.bias", weights.identity)}
    good = {"l.weight": np.ones((2, 3)), "l.bias": np.ones(2)}
    out = weights.assign(target, plan, good, source="ckpt")
    assert out["layer"]["kernel"].shape == (3, 2)
    with pytest.raises(weights.WeightError, match=r"missing keys: \['l.bias'\]; unexpected keys: \['l.b'\]"):
        weights.assign(target, plan, {"l.weight": np.ones((2, 3)), "l.b": np.ones(2)}, source="ckpt")
    with pytest.raises(weights.WeightError, match=r"'l.weight' has shape \(3, 3\); expected \(3, 2\)"):
        weights.assign(target, plan, {"l.weight": np.ones((3, 3)), "l.bias": np.ones(2)}, source="ckpt")


def test_torch_checkpoint_unwrapped_and_directory_fallback(tmp_path):
    inner = {"module.w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "module.b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save({"state_dict": inner, "epoch": 3}, tmp_path / "hps.pt")
    state = weights.read_torch_checkpoint(tmp_path / "hps.pt")
    assert sorted(state) == ["b", "w"]
    np.testing.assert_array_equal(state["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert state["b"].dtype == ml_dtypes.bfloat16
    # A directory with only pytorch_model.bin is read through it; safetensors wins when both exist.
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert list(weights.read_weights(tmp_path)) == ["x"]
    save_file({"y": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert list(weights.read_weights(tmp_path)) == ["y"]
    torch.save({"config": "not tensors"}, tmp_path / "bad.pt")
    with pytest.raises(weights.WeightError, match="bad.pt"):
        weights.read_torch_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        weights.read_torch_checkpoint(tmp_path / "nothing.pt")
