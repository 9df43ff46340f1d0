"""Reading PyTorch checkpoints into parameter pytrees: files, keys, shapes, and clear errors.

The pieces every converter uses (maxdiffusion's recipe: abstract target tree, rename, transpose,
assert shape):

* :func:`resolve_dir` — a local directory in diffusers / transformers layout (optionally a
  subfolder), or a Hugging Face cache snapshot named by its repo id;
* :func:`read_config` — the ``config.json``;
* :func:`read_safetensors` — every tensor of a directory (one file, or shards with or without
  an ``*.safetensors.index.json``), memory-mapped, bf16 included, without torch;
* :func:`read_torch_checkpoint` — a ``.bin`` / ``.pt`` / ``.pth`` pickle (torch imported on call,
  ``weights_only``), unwrapped from ``{"state_dict": ...}`` and DataParallel's ``module.`` prefix;
* :func:`read_weights` — a directory's safetensors, else its ``pytorch_model.bin``;
* :func:`plan_by_path` — the plan ``{target_path: (torch_key, transform)}`` of a tree whose
  module names mirror the torch ones (up to a per-model rename table);
* :func:`assign` — fills a target pytree from a ``{torch_key: array}`` dict following a plan,
  and raises :class:`WeightError` listing missing and unexpected keys or naming the key and
  both shapes on a mismatch.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from marble_jax.models.functional import path_leaves

PyTree = Any

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class WeightError(ValueError):
    """A checkpoint does not fit the model: missing / unexpected keys or a wrong shape."""


def _hf_cache_roots() -> list[Path]:
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    return roots


def _snapshot(repo_id: str) -> Path | None:
    name = "models--" + repo_id.replace("/", "--")
    for root in _hf_cache_roots():
        repo = root / name
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = repo / "snapshots" / ref.read_text().strip()
            if snap.is_dir():
                return snap
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (repo / "snapshots").is_dir() else []
        if snaps:
            return snaps[-1]
    return None


def resolve_dir(path: str | os.PathLike, subfolder: str | None = None) -> Path:
    """The directory holding a model: ``path[/subfolder]``, or the HF cache snapshot of a repo id.

    Raises:
      FileNotFoundError: naming what was looked for.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        snap = _snapshot(str(path)) if str(path).count("/") == 1 and not p.exists() else None
        if snap is None:
            where = ", ".join(str(r) for r in _hf_cache_roots())
            raise FileNotFoundError(
                f"model directory not found: {str(path)!r} is not a directory, nor a repo id with a snapshot in the "
                f"Hugging Face cache ({where}); nothing is downloaded at run time"
            )
        p = snap
    if subfolder:
        p = p / subfolder
        if not p.is_dir():
            raise FileNotFoundError(f"model directory {str(p.parent)!r} has no subfolder {subfolder!r}")
    return p


def read_config(directory: Path, name: str = "config.json") -> dict:
    """The JSON config of a model directory."""
    f = Path(directory) / name
    if not f.is_file():
        raise FileNotFoundError(f"missing file: {f}")
    return json.loads(f.read_text())


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file, memory-mapped (read lazily), any dtype."""
    path = Path(path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise WeightError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[key] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_safetensors(directory: Path, stem: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a model directory, sharded or not, with or without an index file.

    Args:
      directory: the model directory.
      stem: file stem to prefer, e.g. ``"diffusion_pytorch_model"`` or ``"model"``; by default
        any index file, else every ``*.safetensors`` file of the directory.
    """
    directory = Path(directory)
    indexes = sorted(directory.glob(f"{stem}.safetensors.index.json" if stem else "*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} names shard files that are missing: {missing}")
    else:
        files = sorted(directory.glob(f"{stem or ''}*.safetensors"))
        if not files:
            present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise FileNotFoundError(f"no {stem or '*'}*.safetensors file in {directory} (it holds: {present})")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors_file(f))
    return tensors


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a pickled torch state dict (``.bin``, ``.pt``, ``.pth``) as numpy, bf16 kept as bf16.

    A checkpoint wrapped as ``{"state_dict": {...}}`` (or ``"model"``) is unwrapped and a ``module.``
    prefix on every key (DataParallel) is dropped. torch is imported only here.

    Raises:
      FileNotFoundError: naming the path.
      WeightError: naming the path when it holds no state dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint file: {path}")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightError(f"{path}: not a state dict of tensors (found {type(state).__name__})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        out[key] = value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16 else value.numpy()
    return out


def read_weights(directory: Path, stem: str = "model") -> dict[str, np.ndarray]:
    """A transformers / diffusers directory's tensors: ``{stem}*.safetensors`` (sharded or not), else the
    ``pytorch_{stem}.bin`` pickle (older hub repos ship only that).

    Raises:
      FileNotFoundError: naming the directory and what it holds when it has neither.
    """
    directory = Path(directory)
    if not any(directory.glob(f"{stem}*.safetensors")) and (directory / f"pytorch_{stem}.bin").is_file():
        return read_torch_checkpoint(directory / f"pytorch_{stem}.bin")
    return read_safetensors(directory, stem)


Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(x: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight [out, in]`` -> Flax kernel ``[in, out]``."""
    return x.T


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight [out, in, kh, kw]`` -> Flax NHWC kernel ``[kh, kw, in, out]``."""
    return x.transpose(2, 3, 1, 0)


_KERNELS: dict[int, Transform] = {2: linear_kernel, 4: conv_kernel}
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")  # Flax leaf names torch calls ``weight``


def plan_by_path(target: PyTree, renames: Mapping[str, str] | None = None) -> dict[tuple, tuple[str, Transform]]:
    """``{param path: (torch key, transform)}`` for every leaf of ``target``.

    The key is the path joined by dots, each component replaced by ``renames[component]`` when
    present (``{"attention": "attentions.0"}``; the value may hold dots), the leaf names ``kernel``,
    ``scale`` and ``embedding`` read as ``weight``. Kernels are transposed by rank (2: linear,
    4: conv); every other leaf is read as it is.

    Raises:
      ValueError: for a kernel of another rank.
    """
    renames = renames or {}
    plan = {}
    for path, leaf in path_leaves(target):
        *modules, name = path
        transform = identity
        if name == "kernel":
            if len(leaf.shape) not in _KERNELS:
                raise ValueError(f"plan_by_path: kernel {path} has rank {len(leaf.shape)}; expected 2 (linear) or 4 (conv)")
            transform = _KERNELS[len(leaf.shape)]
        parts = [renames.get(str(m), str(m)) for m in modules] + ["weight" if name in _WEIGHT_LEAVES else str(name)]
        plan[path] = (".".join(parts), transform)
    return plan


def _set(tree: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def assign(
    target: PyTree,
    plan: Mapping[tuple, tuple[str, Transform]],
    state: Mapping[str, np.ndarray],
    *,
    source: str,
    dtype: Any = np.float32,
    ignore: Callable[[str], bool] = lambda key: False,
) -> PyTree:
    """Builds the parameter pytree shaped like ``target`` from a torch state dict.

    Args:
      target: nested dict whose leaves have ``.shape`` (e.g. ``jax.eval_shape`` output).
      plan: ``{path in target: (torch key, transform)}`` covering every leaf of ``target``.
      state: ``{torch key: array}``.
      source: file or directory named in errors.
      dtype: dtype of the returned leaves (JAX arrays).
      ignore: torch keys that are allowed to be left unused (buffers such as position ids).

    Raises:
      WeightError: listing the missing and the unexpected keys, or naming the key, the expected
        and the found shape.
    """
    leaves = path_leaves(target)
    paths = [path for path, _ in leaves]
    unplanned = [p for p in paths if p not in plan]
    if unplanned:
        raise WeightError(f"{source}: no conversion rule for parameters {unplanned[:10]} (bug in the converter)")
    used = {plan[p][0] for p in paths}
    missing = sorted(k for k in used if k not in state)
    unexpected = sorted(k for k in state if k not in used and not ignore(k))
    if missing or unexpected:
        raise WeightError(
            f"{source}: checkpoint does not match the model; missing keys: {missing}; unexpected keys: {unexpected}"
        )
    out: dict = {}
    for path, (_, leaf) in zip(paths, leaves, strict=True):
        key, transform = plan[path]
        value = transform(np.asarray(state[key]))
        if tuple(value.shape) != tuple(leaf.shape):
            raise WeightError(
                f"{source}: weight {key!r} has shape {tuple(state[key].shape)}; expected {tuple(leaf.shape)} "
                f"after conversion (found {tuple(value.shape)})"
            )
        _set(out, path, jnp.asarray(value, dtype=dtype))
    return out
