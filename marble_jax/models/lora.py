"""LoRA over the frozen parameters of an NNX model, as pure functions over pytrees.

LoRA parameters are their own pytree, flat and keyed by the dotted module path of each target
linear (the diffusers / peft module name): ``{"transformer_blocks.3.attn.to_out.0": {"a": [in, r],
"b": [r, out]}}``. A target linear computes ``y = x W + s (x A) B`` with ``s = alpha / r``.

Design: the low-rank update runs in the activation path. :func:`with_lora` takes the model's NNX
module (its graph only: parameter values come with each call) and, inside the traced function,
wraps each target ``nnx.Linear`` so that it adds ``s (x A) B``; the model code is untouched. The
alternative, folding ``W + s A B`` before the call (``apply_fn(merge(base, lora, spec), ...)``),
gives the same values but differentiates through a full ``[in, out]`` cotangent of every target
kernel: each backward pays a full weight-gradient GEMM ``x^T dy`` per target (as full fine-tuning
does), and the merged kernels, built outside the remat'd blocks, live from the forward to the end
of the backward. XLA's ``memory_analysis`` / ``cost_analysis`` (CPU compiler, float32, remat per
block, one 1024 x 1024 sample: 4096 image + 205 text tokens, gradient w.r.t. the LoRA parameters)
on 8 SD3.5-M blocks (1536 wide, attn2 in blocks 0..3, 63 targets): merging costs +0.49 GB of
temporaries (about the merged kernels, 63 x 9.4 MB) and +0.57 TFLOP (+5%) over the activation path
(11.07 TFLOP; full fine-tuning 14.40). For SD3.5-M's 191 targets that is +1.8 GB per model
replica in float32 and ~+5% FLOPs per trained forward-backward, for nothing: the activation path
is the design.

The base parameters are frozen (``stop_gradient``): no gradient reaches them. ``lora=None`` runs
the base model itself (the reference model of the KL term), bit for bit.

Files: :func:`export_peft` writes diffusers' ``pytorch_lora_weights.safetensors`` (``lora_A``
``[r, in]``, ``lora_B`` ``[out, r]``, plus the ``lora_adapter_metadata`` that carries ``r`` and
``lora_alpha``; without it diffusers assumes ``alpha = r``), loadable with
``StableDiffusion3Pipeline.load_lora_weights`` / ``SD3Transformer2DModel.load_lora_adapter``
(which need ``peft``); :func:`load_lora` reads it back, and also a peft ``save_pretrained`` directory
(``adapter_config.json`` + ``adapter_model.safetensors``) and the checkpoints of the PyTorch trainers
DiffusionNFT and Flow-GRPO (``checkpoints/checkpoint-N/lora/``, peft's layout).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marble_jax.models.functional import functionalize, path_leaves

log = logging.getLogger("marble_jax.lora")

Array = jax.Array
PyTree = Any
LoRAParams = dict[str, dict[str, Array]]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# The joint attention of every MMDiT block (not MMDiT-X's ``attn2``), as the public DiffusionNFT /
# Flow-GRPO code targets with peft ``target_modules=["attn.to_q", ...]`` (suffix match).
JOINT_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha and targets (``re.fullmatch`` over the dotted module path of each 2-D kernel).

    ``init_std``: std of the Gaussian ``A`` at init, ``None`` for peft's ``"gaussian"`` init
    (``1 / rank``); ``B`` starts at zero.
    """

    rank: int = 32
    alpha: float = 64.0
    targets: str = JOINT_ATTENTION
    init_std: float | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _module_name(path: tuple) -> str:
    """Dotted module path of a parameter path: ``("transformer_blocks", 3, "attn", "to_q", "kernel")``
    -> ``"transformer_blocks.3.attn.to_q"``."""
    return ".".join(str(k) for k in path[:-1])


def target_shapes(params: PyTree, spec: LoRASpec) -> dict[str, tuple[int, int]]:
    """``{module path: (in, out)}`` of every 2-D ``kernel`` of ``params`` whose module path matches
    ``spec.targets``, in tree order. ``params`` may be abstract (``ShapeDtypeStruct`` leaves)."""
    pattern = re.compile(spec.targets)
    return {
        _module_name(path): tuple(leaf.shape)
        for path, leaf in path_leaves(params)
        if path[-1] == "kernel" and len(leaf.shape) == 2 and pattern.fullmatch(_module_name(path))
    }


def init_lora(params: PyTree, spec: LoRASpec, key: Array, dtype: Any = jnp.float32) -> LoRAParams:
    """Fresh LoRA for the targets of ``params``: ``a ~ N(0, init_std^2)`` ``[in, r]``, ``b = 0``
    ``[r, out]``, so the model is unchanged until ``b`` moves."""
    std = 1.0 / spec.rank if spec.init_std is None else spec.init_std
    shapes = target_shapes(params, spec)
    if not shapes:
        raise ValueError(f"LoRA: no 2-D kernel matches the targets {spec.targets!r}")
    keys = jax.random.split(key, len(shapes))
    return {
        name: {
            "a": (std * jax.random.normal(k, (din, spec.rank), jnp.float32)).astype(dtype),
            "b": jnp.zeros((spec.rank, dout), dtype),
        }
        for k, (name, (din, dout)) in zip(keys, shapes.items(), strict=True)
    }


class _LoRALinear(nnx.Module):
    """``base(x) + scale (x a) b``, computed in the base linear's compute dtype."""

    def __init__(self, base: nnx.Linear, a: Array, b: Array, scale: float):
        self.base = base
        self.a, self.b = nnx.Param(a), nnx.Param(b)
        self.scale = scale

    def __call__(self, x: Array) -> Array:
        y = self.base(x)
        h = jnp.dot(x.astype(y.dtype), self.a[...].astype(y.dtype)) * jnp.asarray(self.scale, y.dtype)
        return y + jnp.dot(h, self.b[...].astype(y.dtype))


class _WithLoRA(nnx.Module):
    """Calls ``model`` with its target linears wrapped by :class:`_LoRALinear` (none when ``lora`` is None)."""

    def __init__(self, model: nnx.Module, scale: float):
        self.model = model
        self.scale = scale

    def __call__(self, lora: LoRAParams | None, *args, **kwargs):
        for name, ab in (lora or {}).items():
            *parents, last = (int(k) if k.isdigit() else k for k in name.split("."))
            node = self.model
            for k in parents:
                node = node[k] if isinstance(k, int) else getattr(node, k)
            linear = node[last] if isinstance(last, int) else getattr(node, last)
            wrapped = _LoRALinear(linear, ab["a"], ab["b"], self.scale)
            if isinstance(last, int):
                node[last] = wrapped
            else:
                setattr(node, last, wrapped)
        return self.model(*args, **kwargs)


def with_lora(module: nnx.Module, spec: LoRASpec) -> Callable[..., Any]:
    """``apply(base_params, lora_params | None, *args, **kwargs)``: ``module`` called with
    ``base_params`` (its ``nnx.Param`` tree, frozen) and LoRA in the activation path of the targets.

    Only the graph of ``module`` is used: its parameters may be abstract, e.g.
    ``abstract_module(lambda rngs: mmdit.MMDiT(cfg, ..., rngs=rngs))``, and ``base_params`` is then
    the tree ``mmdit.from_config`` / ``load_mmdit`` give. ``lora_params=None`` is the base model exactly.
    """
    apply_fn, _ = functionalize(_WithLoRA(module, spec.scale))

    def apply(base: PyTree, lora: LoRAParams | None, *args, **kwargs):
        return apply_fn({"model": jax.lax.stop_gradient(base)}, lora, *args, **kwargs)

    return apply


def merge(base: PyTree, lora: LoRAParams, spec: LoRASpec) -> PyTree:
    """``base`` with each target kernel replaced by ``W + s A B`` (computed in float32, cast to W's dtype)."""

    def fold(path: tuple, w: Array) -> Array:
        ab = lora.get(_module_name(path)) if path[-1] == "kernel" else None
        if ab is None:
            return w
        delta = spec.scale * jnp.dot(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    return jax.tree.unflatten(jax.tree.structure(base), [fold(path, w) for path, w in path_leaves(base)])


def export_peft(lora: LoRAParams, spec: LoRASpec, directory, prefix: str | None = "transformer") -> Path:
    """Writes ``directory/pytorch_lora_weights.safetensors`` in diffusers' peft layout; returns its path.

    Keys ``{prefix}.{module}.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` (float32);
    the metadata (``{prefix}.r``, ``.lora_alpha``, ``.target_modules``) is what diffusers builds
    the peft ``LoraConfig`` from. The arrays must be addressable from this process (gather first).
    """
    from safetensors.numpy import save_file

    pre = "" if prefix is None else f"{prefix}."
    tensors = {}
    for name, ab in lora.items():
        tensors[f"{pre}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
        tensors[f"{pre}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
    config = {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(lora), "lora_dropout": 0.0, "bias": "none"}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({pre + k: v for k, v in config.items()}, sort_keys=True)}
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHT_NAME), metadata=metadata)
    return path / WEIGHT_NAME


# peft's file names (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) and PeftModel's key prefix.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# peft options a plain ``x W + s (x A) B`` over the unchanged base cannot hold: extra weights, another forward, or a
# base modified at init (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA; peft's converted saves reset init_lora_weights to True).
_UNSUPPORTED_OPTIONS = (
    "use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "layer_replication", "use_qalora", "use_bdlora", "arrow_config", "monteclora_config",
)  # fmt: skip
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def load_lora(path, base_params: PyTree | None = None, adapter: str = "default") -> tuple[LoRAParams, LoRASpec]:
    """Reads a PyTorch LoRA of the SD3 transformer: ``(lora_params, spec)``, float32, with ``spec.targets`` the
    exact loaded module names (so :func:`with_lora` wraps exactly those).

    ``path`` may be (first match wins):

    * diffusers' ``pytorch_lora_weights.safetensors`` (or its directory): what :func:`export_peft`,
      ``StableDiffusion3Pipeline.save_lora_weights`` (keys ``transformer.*``, metadata ``transformer.r`` ...) and
      ``SD3Transformer2DModel.save_lora_adapter`` (unprefixed keys and metadata) write. Without the
      ``lora_adapter_metadata``, alpha = r, as diffusers assumes (a warning is logged). Text-encoder keys are ignored.
    * a peft ``save_pretrained`` directory (or its ``adapter_model.safetensors`` / ``adapter_config.json``):
      keys ``base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight``; ``r``, ``lora_alpha``,
      ``rank_pattern`` / ``alpha_pattern`` (peft's suffix-regex rule per module; they must come to one rank and one
      alpha over the loaded modules), ``use_rslora`` (scale ``lora_alpha / sqrt(r)``: folded into
      ``spec.alpha = lora_alpha sqrt(r)``) and ``target_modules`` (every loaded module must be one) from
      ``adapter_config.json``. A non-default ``adapter`` is read from its subfolder, as peft saves it.
    * a DiffusionNFT / Flow-GRPO checkpoint ``<save_dir>/checkpoints/checkpoint-N`` (its ``lora/`` subfolder), or
      the ``<save_dir>`` itself (its highest N). Both trainers wrap the transformer with ``get_peft_model`` (or
      ``PeftModel.from_pretrained`` of ``train.lora_path``) and save with ``save_pretrained`` into
      ``checkpoint-N/lora``: NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` ``save_ckpt`` (l. 332-353, commit
      24af555), yifan123/flow_grpo ``scripts/train_sd3.py`` ``save_ckpt`` (l. 323-332, commit ac4c86e). With
      ``train.ema`` (DiffusionNFT's ``config/base.py`` default; set by each of Flow-GRPO's ``config/grpo.py``
      configs) the EMA is copied into the adapter before the save: the ``default`` adapter *is* the EMA; no separate
      EMA file exists. DiffusionNFT's model also holds the ``old`` adapter
      (``add_adapter("old", ...)``, l. 438), which ``save_pretrained`` writes to ``lora/old/`` (``adapter="old"``).
      Beside ``lora/`` lie ``optimizer.pt`` / ``scaler.pt`` (DiffusionNFT), not read. Their LoraConfig: r 32,
      alpha 64, ``init_lora_weights="gaussian"``, ``target_modules`` the 8 joint-attention projections.

    ``base_params`` (the MMDiT tree, abstract leaves allowed): each key must name a 2-D kernel of it and fit its
    ``[in, out]``.

    Raises:
      FileNotFoundError: no adapter at ``path``; a peft weights file without its ``adapter_config.json``.
      ValueError: naming the file and the key: a key that is not ``lora_A`` / ``lora_B``, half a pair, a rank
        other than the config's, per-module ranks / alphas, an unsupported peft option (DoRA, biases, base-modifying
        inits, ...), and with ``base_params`` a module the model lacks or a shape that does not fit.
    """
    weights, config_file = _locate(Path(path).expanduser(), adapter, str(path))
    if config_file is None:
        if adapter != "default":
            raise ValueError(f"{weights}: a diffusers LoRA file holds one adapter; adapter={adapter!r} is for peft directories")
        tensors, config, where = _read_diffusers(weights)
    else:
        tensors = _read_tensors(weights)
        config, where = json.loads(config_file.read_text()), str(config_file)
    lora, spec = _parse(weights, tensors, config, where)
    if base_params is not None:
        _check_fits(weights, lora, spec, base_params, _prefix_of(tensors))
    return lora, spec


def load_matching(path, spec: LoRASpec, base_params: PyTree, source: str) -> LoRAParams:
    """:func:`load_lora` of ``path`` for a model whose LoRA is ``spec``: its rank, alpha and modules must be
    ``spec``'s (no silent re-ranking or re-scaling), else a ValueError naming ``config.lora.<key>`` and what the
    adapter has (``source`` says where the path came from). Returns float32 host arrays."""
    adapter, found = load_lora(path, base_params=base_params)
    where = f"the adapter of {source} = {str(path)!r}"
    for key, want, got in (("rank", spec.rank, found.rank), ("alpha", spec.alpha, found.alpha)):
        if want != got:
            raise ValueError(f"config.lora.{key} = {want!r}, but {where} has {key} {got!r} (--config.lora.{key}={got!r})")
    ours = set(target_shapes(base_params, spec))
    if ours != set(adapter):
        raise ValueError(
            f"config.lora.targets = {spec.targets!r} matches {len(ours)} modules, {where} has {len(adapter)}: only in the "
            f"config {sorted(ours - set(adapter))[:4]}, only in the adapter {sorted(set(adapter) - ours)[:4]}"
        )
    return jax.tree.map(lambda x: np.asarray(x, np.float32), adapter)


def import_peft(directory) -> tuple[LoRAParams, LoRASpec]:
    """:func:`load_lora` (kept for old callers; it reads diffusers' file and every other layout alike)."""
    return load_lora(directory)


def _locate(p: Path, adapter: str, given: str) -> tuple[Path, Path | None]:
    """``(weights file, adapter_config.json or None for a diffusers file)`` of a path (see :func:`load_lora`)."""
    if not p.exists():  # a Hugging Face repo id with a snapshot in the local cache (nothing is downloaded)
        from marble_jax.models.weights import resolve_dir

        try:
            p = resolve_dir(given)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"LoRA adapter not found: {e}") from None
    if p.is_file():
        if p.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE):
            return _peft_files(p.parent, adapter)
        if p.suffix == ".safetensors":
            return p, None
        raise ValueError(f"{p}: not a LoRA file (expected {WEIGHT_NAME}, a peft {ADAPTER_WEIGHTS}, or a directory)")
    if (p / WEIGHT_NAME).is_file():
        return p / WEIGHT_NAME, None
    if any((p / name).is_file() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE)):
        return _peft_files(p, adapter)
    if (p / "lora").is_dir():  # DiffusionNFT / Flow-GRPO checkpoint-N
        return _locate(p / "lora", adapter, str(p / "lora"))
    found = ((re.fullmatch(r"checkpoint-(\d+)", c.name), c) for c in (p / "checkpoints").glob("checkpoint-*"))
    steps = {int(m.group(1)): c for m, c in found if m is not None}
    if steps:  # their save_dir: the latest checkpoint
        latest = steps[max(steps)]
        log.info("LoRA: %s holds checkpoints %s; reading the latest, %s", p, sorted(steps), latest)
        return _locate(latest, adapter, str(latest))
    raise FileNotFoundError(
        f"{p}: no LoRA adapter: looked for {WEIGHT_NAME} (diffusers), {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} (peft "
        "save_pretrained), lora/ (a DiffusionNFT / Flow-GRPO checkpoint-N) and checkpoints/checkpoint-N/ (their save_dir)"
    )


def _peft_files(d: Path, adapter: str) -> tuple[Path, Path]:
    """``(weights, adapter_config.json)`` of adapter ``adapter`` of a peft ``save_pretrained`` directory."""
    if adapter != "default":  # PeftModel.save_pretrained: non-default adapters in a subfolder of their name
        if not (d / adapter / ADAPTER_CONFIG).is_file():
            found = sorted(c.name for c in d.iterdir() if (c / ADAPTER_CONFIG).is_file())
            raise FileNotFoundError(f"{d}: no adapter {adapter!r} ({d / adapter / ADAPTER_CONFIG} is missing); adapters "
                                    f"there: {['default'] + found}")  # fmt: skip
        d = d / adapter
    weights = next((d / n for n in (ADAPTER_WEIGHTS, ADAPTER_PICKLE) if (d / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{d}: peft adapter without weights: neither {ADAPTER_WEIGHTS} nor {ADAPTER_PICKLE}")
    if not (d / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{d / ADAPTER_CONFIG} is missing: {weights} needs peft's adapter config (r, lora_alpha, ...) to be read"
        )
    return weights, d / ADAPTER_CONFIG


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (bf16 included) or, for ``adapter_model.bin``, of the torch pickle."""
    from marble_jax.models import weights

    if path.suffix == ".safetensors":
        return weights.read_safetensors_file(path)
    return weights.read_torch_checkpoint(path)


def _read_diffusers(path: Path) -> tuple[dict[str, np.ndarray], dict, str]:
    """``(tensors, peft config, where it came from)`` of a diffusers LoRA file: the config is the
    ``lora_adapter_metadata`` of the prefix the keys carry (``{}`` without one: r from the tensors, alpha = r)."""
    from safetensors import safe_open

    tensors = _read_tensors(path)
    with safe_open(str(path), framework="numpy") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    pre = _prefix_of(tensors)
    if raw is None:
        log.warning("%s has no %s: alpha = r, as diffusers assumes", path, METADATA_KEY)
        return tensors, {}, f"{path} (no {METADATA_KEY})"
    meta = json.loads(raw)
    config = {k[len(pre) :]: v for k, v in meta.items() if pre and k.startswith(pre)} or meta
    return tensors, config, f"{path} metadata {METADATA_KEY}"


def _prefix_of(tensors: dict[str, Any]) -> str:
    """The prefix of the transformer's keys: diffusers' ``transformer.``, PeftModel's ``base_model.model.`` or none."""
    return next((p for p in ("transformer.", PEFT_PREFIX) if any(k.startswith(p) for k in tensors)), "")


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``rank_pattern`` / ``alpha_pattern`` rule (``peft.utils.other.get_pattern_key``): the first pattern
    ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``, else ``default``."""
    for p, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return default


def _targeted(target_modules, module: str) -> bool:
    """peft's ``check_target_module_exists`` for a string (``re.fullmatch``) or a list (name or ``.name`` suffix)."""
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _parse(path: Path, tensors: dict[str, np.ndarray], config: dict, where: str) -> tuple[LoRAParams, LoRASpec]:
    """LoRA parameters and spec of the transformer keys of ``tensors`` under the peft ``config`` (read from ``where``)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config['peft_type']!r}; only LORA adapters can be read")
    bad = {k: config[k] for k in _UNSUPPORTED_OPTIONS if config.get(k)}
    if config.get("bias", "none") != "none":
        bad["bias"] = config["bias"]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        bad["init_lora_weights"] = init  # trained against a modified base: convert it in peft first
    if bad:
        raise ValueError(f"{where}: unsupported peft options {bad}: only a plain LoRA over the unchanged base is read")
    pre = _prefix_of(tensors)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if not key.startswith(pre):
            if key.startswith("text_encoder"):
                log.warning("%s: %s ignored (a text-encoder LoRA; only the transformer's is read)", path, key)
                continue
            raise ValueError(f"{path}: key {key} is not under the prefix {pre!r} of the transformer's keys")
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key[len(pre) :])
        if m is None or value.ndim != 2:
            raise ValueError(f"{path}: {key} {tuple(value.shape)} is not a LoRA lora_A / lora_B weight")
        halves.setdefault(m.group(1), {})[m.group(2)] = value
    if not halves:
        raise ValueError(f"{path}: no LoRA keys (*.lora_A.weight / *.lora_B.weight) in {sorted(tensors)[:4]}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    lora, per_module = {}, {}
    for name, ab in sorted(halves.items()):
        key = f"{pre}{name}.lora_{{}}.weight"
        for have, missing in (("A", "B"), ("B", "A")):
            if missing not in ab:
                raise ValueError(f"{path}: {key.format(have)} has no {key.format(missing)}")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        r = _pattern_value(rank_pattern, name, config.get("r", a.shape[0]))
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{path}: {key.format('A')} {tuple(a.shape)} / {key.format('B')} {tuple(b.shape)}: "
                             f"rank {r} expected ({where}: r / rank_pattern), so [{r}, in] / [out, {r}]")  # fmt: skip
        if not _targeted(config.get("target_modules"), name):
            raise ValueError(f"{path}: {key.format('A')}: {name!r} is not one of {where}'s target_modules "
                             f"{config['target_modules']!r}")  # fmt: skip
        alpha = float(_pattern_value(alpha_pattern, name, config.get("lora_alpha", r)))
        per_module[name] = (int(r), alpha)
        lora[name] = {"a": jnp.asarray(np.asarray(a, np.float32).T), "b": jnp.asarray(np.asarray(b, np.float32).T)}
    values = sorted(set(per_module.values()))
    if len(values) != 1:
        examples = {v: next(n for n, w in per_module.items() if w == v) for v in values}
        raise ValueError(f"{where}: the modules have different (rank, alpha) {examples} (rank_pattern / "
                         "alpha_pattern); a LoRASpec has one rank and one alpha")  # fmt: skip
    rank, alpha = values[0]
    if config.get("use_rslora"):  # scale lora_alpha / sqrt(r) = spec.alpha / r
        alpha = alpha * float(np.sqrt(rank))
    targets = "|".join(re.escape(name) for name in sorted(lora))
    return lora, LoRASpec(rank=rank, alpha=alpha, targets=targets)


def _check_fits(path: Path, lora: LoRAParams, spec: LoRASpec, base: PyTree, pre: str) -> None:
    """Raises ValueError naming the key when a module of ``lora`` is no 2-D kernel of ``base`` or does not fit it."""
    kernels = {_module_name(p): tuple(leaf.shape) for p, leaf in path_leaves(base) if p[-1] == "kernel" and len(leaf.shape) == 2}
    for name, ab in lora.items():
        key = f"{pre}{name}.lora_{{}}.weight"
        if name not in kernels:
            import difflib

            near = difflib.get_close_matches(name, list(kernels), n=3)
            raise ValueError(f"{path}: {key.format('A')}: the model has no linear {name!r} (nearest: {near})")
        din, dout = kernels[name]
        for half, got, want in (("A", ab["a"].shape[::-1], (spec.rank, din)), ("B", ab["b"].shape[::-1], (dout, spec.rank))):
            if tuple(got) != want:
                raise ValueError(f"{path}: {key.format(half)} has shape {tuple(got)}, the model's {name} "
                                 f"[in {din}, out {dout}] at rank {spec.rank} needs {want}")  # fmt: skip
