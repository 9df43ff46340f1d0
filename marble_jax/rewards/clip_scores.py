"""The CLIP-based rewards of REFERENCE §4, as the public scorers behind the papers' tables compute them, in JAX.

The public scorers are DiffusionNFT's ``flow_grpo/{pickscore,clip,hpsv2,aesthetic}_scorer.py`` (NVlabs/DiffusionNFT),
fed by its ``flow_grpo/rewards.py`` with the float images in [0, 1] its pipeline decodes (``output_type="pt"``);
Flow-GRPO's (yifan123/flow_grpo) are the same but where an option says otherwise. Pinned there: torch 2.6,
torchvision 0.21, transformers 4.40, Pillow 10.4.

* :func:`pickscore` — PickScore (CLIP-H fine-tuned on human preferences): ``exp(logit_scale) * cos(image, text) /
  26``; images rounded to uint8, transformers' ``CLIPImageProcessor`` of CLIP-ViT-H-14 (PIL bicubic).
* :func:`clipscore` — CLIPScore with OpenAI CLIP-L/14: ``logits_per_image.diag() / divisor`` (= ``exp(logit_scale)
  * cos / divisor``; 100 in DiffusionNFT, 30 in Flow-GRPO); images as float tensors through torchvision's
  ``Resize(224)`` (bilinear, antialiased), ``CenterCrop(224)``, ``Normalize``.
* :func:`aesthetic` — the LAION improved-aesthetic-predictor: a stack of linear layers (no activations; its dropouts
  are the identity at inference) on the unit-norm CLIP-L/14 image embedding; prompt-free; images rounded to uint8,
  transformers' ``CLIPImageProcessor`` of CLIP-L/14.
* :func:`hpsv2` — HPSv2.1 (OpenCLIP ViT-H-14): ``cos(image, text)``, no scale; images as float tensors through
  HPSv2's ``ResizeMaxSize(224)`` (longest edge, bicubic, antialiased, zero padding) and ``Normalize``.

Each factory loads its models once and returns ``reward_fn(images [B,H,W,3], prompts, metadata) -> float32 [B]``;
the images are uint8 (what the registry, which wraps it with the input checks, lets through) or float in [0, 1]
(the VAE's output before quantisation, what the public trainers score). Preprocessing (:mod:`.image_preprocess`:
PIL's resize reproduced pixel for pixel, torch's antialiased interpolation in float32) and the towers run in one
jitted program per batch. Batches of ``batch_size`` images (fewer for a smaller call), padded to a multiple of the
device count, are split over all devices along the batch axis like the trainer's batches; the parameters are
replicated. Prompts are tokenised on the host (transformers tokenizer of the checkpoint, 77 tokens, truncated) and
padded to 77: the text towers are causal and pool at the end-of-text token, so the padding length does not change a
score.

A path option is a local directory / file or, for defaults, a Hugging Face repo id found in the local HF
cache (nothing is downloaded); a missing one raises FileNotFoundError naming the option and the public
checkpoint that belongs there.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marble_jax import sharding
from marble_jax.models import clip
from marble_jax.models.convert import load_clip_model
from marble_jax.models.functional import abstract_module, functionalize
from marble_jax.models.weights import (
    WeightError,
    assign,
    plan_by_path,
    read_config,
    read_torch_checkpoint,
    read_weights,
    resolve_dir,
)
from marble_jax.rewards.image_preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PIL_ORDERS,
    ProcessorSpec,
    resize_max_and_pad,
)

PyTree = Any
MAX_LENGTH = 77
PICKSCORE_DIVISOR = 26.0
CLIPSCORE_DIVISOR = 100.0  # DiffusionNFT's flow_grpo/clip_scorer.py; Flow-GRPO's divides by 30
CLIPSCORE_PREPROCESS = ("torchvision", "pil")
HPS_IMAGE_SIZE = 224

CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
HPS_V21 = "xswu/HPSv2/HPS_v2.1_compressed.pt"
AESTHETIC_MLP = "sac+logos+ava1-l14-linearMSE.pth"
_AESTHETIC_SOURCE = f"{AESTHETIC_MLP} (github.com/christophschuhmann/improved-aesthetic-predictor)"


# ---------------------------------------------------------------- files


def model_dir(reward: str, option: str, value: str, public: str) -> Path:
    """:func:`~marble_jax.models.weights.resolve_dir` of option ``option`` of reward ``reward``.

    Raises:
      FileNotFoundError: naming the reward, the option, the path and the public checkpoint ``public``.
    """
    try:
        return resolve_dir(value)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{reward}: {option} directory {value!r} not found; put {public} there or in the Hugging Face cache ({e})"
        ) from None


def checkpoint_file(reward: str, option: str, value: str, public: str) -> Path:
    """A checkpoint file: a local path, or ``<owner>/<repo>/<file>`` inside that repo's HF cache snapshot.

    Raises:
      FileNotFoundError: naming the reward, the option, the path and the public checkpoint ``public``.
    """
    p = Path(value).expanduser()
    if p.is_file():
        return p
    parts = str(value).split("/")
    if len(parts) >= 3 and not p.exists():
        try:
            candidate = resolve_dir("/".join(parts[:2])) / "/".join(parts[2:])
        except FileNotFoundError:
            candidate = None
        if candidate is not None and candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{reward}: {option} checkpoint file {value!r} not found; put {public} there (a local path, or "
        "<owner>/<repo>/<file> of a snapshot in the Hugging Face cache; nothing is downloaded at run time)"
    )


Tokenize = Callable[[Sequence[str]], np.ndarray]


def load_processor(reward: str, option: str, directory: Path, public: str, **transform) -> ProcessorSpec:
    """:meth:`ProcessorSpec.from_dir` of ``directory`` with ``transform`` (``backend``, ``order``) replaced.

    Raises:
      FileNotFoundError: when ``directory`` has no ``preprocessor_config.json``, naming the option and ``public``.
      ValueError: naming the file and key this preprocessing does not implement.
    """
    if not (directory / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{reward}: {option} directory {str(directory)!r} has no preprocessor_config.json; put {public} there"
        )
    return dataclasses.replace(ProcessorSpec.from_dir(directory), **transform)


def check_choice(reward: str, option: str, value: str, choices: Sequence[str]) -> None:
    """Raises ValueError naming the reward, the option and its choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{reward}: {option} = {value!r} is not one of {tuple(choices)}")


def load_tokenizer(reward: str, option: str, directory: Path, public: str) -> Tokenize:
    """``tokenize(prompts) -> int32 [B, 77]`` with the transformers tokenizer of ``directory`` (truncated, padded).

    Raises:
      FileNotFoundError: when ``directory`` holds no tokenizer files, naming the option and ``public``.
    """
    if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(
            f"{reward}: {option} directory {str(directory)!r} has no tokenizer (tokenizer.json or vocab.json + "
            f"merges.txt); put {public} there"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)

    def tokenize(prompts: Sequence[str]) -> np.ndarray:
        if not prompts:  # the tokenizer refuses an empty batch
            return np.zeros((0, MAX_LENGTH), np.int32)
        out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)

    return tokenize


# ---------------------------------------------------------------- scoring


def unit(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm, ``[B,P] -> [B,P]``."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def embed_images(vision_fn: Callable, vision_params: PyTree, pixels: jax.Array) -> jax.Array:
    """Unit-norm image embeddings ``[B,P]`` of normalised pixels ``[B,S,S,3]`` (``vision_fn`` as in ``clip.CLIP.vision``)."""
    return unit(vision_fn(vision_params, pixels)["image_embeds"])


def embed_texts(text_fn: Callable, text_params: PyTree, input_ids: jax.Array) -> jax.Array:
    """Unit-norm text embeddings ``[B,P]`` of token ids ``[B,L]`` (``text_fn`` as in ``clip.CLIP.text``)."""
    return unit(text_fn(text_params, input_ids)["text_embeds"])


class ShardedBatches:
    """``score_fn(params, *arrays) -> [b]`` jitted and run over the leading axis of host arrays in batches.

    Each batch holds ``batch_size`` rows (or all rows, when fewer), rounded up to a multiple of the device
    count; the last one is zero-padded to that size (one compiled shape per input shape) and its padding
    cut from the result. Batches are placed with :func:`marble_jax.sharding.batch_sharding` over this
    process's devices, the parameters replicated once: with several processes (``jax.distributed``) each
    scores the rows it was given, whole, with no collective between processes (the trainer hands each its
    own rollouts).
    """

    def __init__(self, score_fn: Callable[..., jax.Array], params: PyTree, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.mesh = sharding.make_mesh(devices=jax.local_devices())
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        self.fn = jax.jit(score_fn)

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        """float32 ``[N]`` scores of host arrays with a common leading axis ``N``."""
        total = arrays[0].shape[0]
        if total == 0:
            return np.zeros((0,), np.float32)
        devices = self.mesh.size
        step = -(-min(self.batch_size, total) // devices) * devices
        out = []
        for start in range(0, total, step):
            chunk = [np.asarray(a[start : start + step]) for a in arrays]
            real = chunk[0].shape[0]
            chunk = [np.concatenate([c, np.zeros((step - real, *c.shape[1:]), c.dtype)]) for c in chunk]
            placed = [sharding.to_global(c, sharding.batch_sharding(self.mesh, c.ndim)) for c in chunk]
            out.append(sharding.to_host(self.fn(self.params, *placed))[:real])
        return np.concatenate(out).astype(np.float32)


def _text_image_reward(
    model: clip.CLIP, preprocess: Callable[[jax.Array], jax.Array], tokenize: Tokenize, scale: float, batch_size: int
) -> Callable:
    """``reward_fn`` with score ``scale * cos(image embedding, text embedding)``."""

    def score(params: PyTree, images: jax.Array, input_ids: jax.Array) -> jax.Array:
        image = embed_images(model.vision[0], params["vision"], preprocess(images))
        text = embed_texts(model.text[0], params["text"], input_ids)
        return scale * jnp.sum(image * text, axis=-1)

    run = ShardedBatches(score, {"vision": model.vision[1], "text": model.text[1]}, batch_size)

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        return run(np.asarray(images), tokenize(prompts))

    return reward_fn


# ---------------------------------------------------------------- reward factories


def pickscore(path: str = PICKSCORE, processor_path: str = CLIP_H, pil_order: str = "horizontal_first", batch_size: int = 32):
    """PickScore ``exp(logit_scale) * cos(image, prompt) / 26`` (about 0.8-0.9 for good matches).

    ``path``: the PickScore transformers ``CLIPModel`` directory; ``processor_path``: the directory with the
    ``preprocessor_config.json`` and tokenizer PickScore uses (CLIP-ViT-H-14's). Images: the public
    ``pickscore_scorer.py``'s ``AutoProcessor`` (transformers' ``CLIPImageProcessor``, PIL bicubic) on the images
    rounded to uint8 (:func:`~.image_preprocess.clip_preprocess`); ``pil_order``: PIL's pass order,
    "horizontal_first" (Pillow 10.4, which the public trainers pin) or "pillow13" (they differ only for images more
    than twice as tall as wide)."""
    check_choice("pickscore", "pil_order", pil_order, PIL_ORDERS)
    model = load_clip_model(model_dir("pickscore", "path", path, f"{PICKSCORE} (transformers CLIPModel)"))
    public = f"{CLIP_H} (its preprocessor_config.json and tokenizer files)"
    processor = model_dir("pickscore", "processor_path", processor_path, public)
    tokenize = load_tokenizer("pickscore", "processor_path", processor, public)
    scale = float(np.exp(model.logit_scale)) / PICKSCORE_DIVISOR
    preprocess = load_processor("pickscore", "processor_path", processor, public, backend="pil", order=pil_order)
    fn = _text_image_reward(model, preprocess, tokenize, scale, batch_size)
    fn.__doc__ = "float32 [B] PickScore of uint8 (or float in [0, 1]) [B,H,W,3] images and their prompts."
    return fn


def clipscore(path: str = CLIP_L, divisor: float = CLIPSCORE_DIVISOR, preprocess: str = "torchvision", batch_size: int = 32):
    """CLIPScore ``logits_per_image.diag() / divisor`` (``exp(logit_scale) * cos(image, prompt) / divisor``; OpenAI
    CLIP's scale is 100, so with the default divisor it is the cosine).

    ``path``: a transformers ``CLIPModel`` directory with its ``preprocessor_config.json`` and tokenizer;
    ``divisor``: 100 as DiffusionNFT's ``flow_grpo/clip_scorer.py`` divides, 30 as Flow-GRPO's does; ``preprocess``:
    "torchvision", the public ``ClipScorer``'s transform (shortest edge bilinear with antialiasing on float images,
    torchvision's centre crop, :func:`~.image_preprocess.torchvision_clip_preprocess`), or "pil", transformers'
    ``CLIPImageProcessor`` as the checkpoint's config states it (PIL bicubic on uint8, Pillow 10.4's pass order; the
    processor other CLIPScore implementations use)."""
    check_choice("clipscore", "preprocess", preprocess, CLIPSCORE_PREPROCESS)
    if not divisor > 0:
        raise ValueError(f"clipscore: divisor = {divisor!r} must be positive")
    public = f"{CLIP_L} (transformers CLIPModel with its preprocessor_config.json and tokenizer)"
    d = model_dir("clipscore", "path", path, public)
    model = load_clip_model(d)
    transform = load_processor("clipscore", "path", d, public, backend=preprocess, order="horizontal_first")
    scale = float(np.exp(model.logit_scale)) / divisor
    fn = _text_image_reward(model, transform, load_tokenizer("clipscore", "path", d, public), scale, batch_size)
    fn.__doc__ = "float32 [B] CLIPScore of uint8 (or float in [0, 1]) [B,H,W,3] images and their prompts."
    return fn


def hpsv2(path: str = HPS_V21, tokenizer_path: str = CLIP_H, batch_size: int = 32):
    """HPSv2.1 ``cos(image, prompt)`` of OpenCLIP ViT-H-14 with the HPS_v2.1 weights (about 0.2-0.35).

    ``path``: ``HPS_v2.1_compressed.pt`` (an OpenCLIP checkpoint; default: in the HF cache snapshot of
    ``xswu/HPSv2``); ``tokenizer_path``: a directory with CLIP-ViT-H-14's tokenizer files (the OpenAI BPE
    vocabulary OpenCLIP's tokenizer uses). Images: :func:`~.image_preprocess.resize_max_and_pad` to 224 with the
    OpenAI CLIP mean / std, HPSv2's evaluation transform on float tensors (``ResizeMaxSize``: longest edge, bicubic
    with antialiasing, zero padding), as DiffusionNFT's ``hpsv2_scorer.py`` applies it to its float images and
    HPSv2's own ``img_score.py`` (and Flow-GRPO's scorer) after ``ToTensor`` of a uint8 image. The HF tokenizer
    matches OpenCLIP's on ordinary text; OpenCLIP also unescapes HTML entities and repairs mojibake (ftfy) first."""
    from marble_jax.models.openclip import load_openclip

    model = load_openclip(checkpoint_file("hpsv2", "path", path, "HPS_v2.1_compressed.pt of the Hugging Face repo xswu/HPSv2"))
    public = f"{CLIP_H} (its tokenizer files)"
    tokenize = load_tokenizer("hpsv2", "tokenizer_path", model_dir("hpsv2", "tokenizer_path", tokenizer_path, public), public)
    preprocess = functools.partial(resize_max_and_pad, size=HPS_IMAGE_SIZE, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    fn = _text_image_reward(model, preprocess, tokenize, 1.0, batch_size)
    fn.__doc__ = "float32 [B] HPSv2.1 scores of uint8 (or float in [0, 1]) [B,H,W,3] images and their prompts."
    return fn


class LinearStack(nnx.Module):
    """Linear layers in sequence without activations: the LAION aesthetic MLP; ``[B, dims[0]] -> [B]``."""

    def __init__(self, dims: Sequence[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x[:, 0]


def load_aesthetic_mlp(path: str | Path) -> tuple[Callable, PyTree]:
    """``(apply_fn, params)`` of a LAION aesthetic MLP state dict (``layers.<i>.weight`` / ``.bias`` of the
    ``nn.Sequential``'s linear layers; the indices in between are dropouts). Sizes come from the weights;
    ``apply_fn(params, embeddings [B, D]) -> scores [B]``.

    Raises:
      WeightError: naming the file and the keys when they are not a chain of linear layers ending in one output.
    """
    state = read_torch_checkpoint(path)
    indices = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.weight", k)))
    if not indices:
        raise WeightError(f"{path}: no 'layers.<i>.weight' keys, not a LAION aesthetic MLP; keys: {sorted(state)[:10]}")
    shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in indices]
    for i, shape in zip(indices, shapes, strict=True):
        if len(shape) != 2:
            raise WeightError(f"{path}: layers.{i}.weight has shape {shape}; expected a linear weight [out, in]")
    for n in range(len(indices) - 1):
        if shapes[n + 1][1] != shapes[n][0]:
            raise WeightError(
                f"{path}: layers.{indices[n]}.weight {shapes[n]} does not feed layers.{indices[n + 1]}.weight {shapes[n + 1]}"
            )
    if shapes[-1][0] != 1:
        raise WeightError(f"{path}: last layer layers.{indices[-1]}.weight has shape {shapes[-1]}; expected one output")
    dims = [shapes[0][1]] + [s[0] for s in shapes]
    apply_fn, target = functionalize(abstract_module(lambda rngs: LinearStack(dims, rngs=rngs)))
    plan = plan_by_path(target, renames={str(n): str(i) for n, i in enumerate(indices)})
    return apply_fn, assign(target, plan, state, source=str(path))


def aesthetic(path: str = AESTHETIC_MLP, clip_path: str = CLIP_L, pil_order: str = "horizontal_first", batch_size: int = 32):
    """LAION aesthetic score (about 1-10; prompt-free) of the MLP on the unit-norm CLIP-L/14 image embedding.

    ``path``: the MLP state dict ``sac+logos+ava1-l14-linearMSE.pth``; ``clip_path``: the transformers
    ``CLIPModel`` directory of ``openai/clip-vit-large-patch14`` with its ``preprocessor_config.json``. Images: the
    public ``aesthetic_scorer.py``'s ``CLIPProcessor`` (PIL bicubic) on the images rounded to uint8; ``pil_order``:
    PIL's pass order, as for :func:`pickscore`."""
    check_choice("aesthetic", "pil_order", pil_order, PIL_ORDERS)
    mlp_fn, mlp_params = load_aesthetic_mlp(checkpoint_file("aesthetic", "path", path, _AESTHETIC_SOURCE))
    public = f"{CLIP_L} (transformers CLIPModel with its preprocessor_config.json)"
    d = model_dir("aesthetic", "clip_path", clip_path, public)
    preprocess = load_processor("aesthetic", "clip_path", d, public, backend="pil", order=pil_order)
    vision_fn, vision_params = clip.vision_from_torch_state(read_config(d), read_weights(d), source=str(d))
    width = vision_params["visual_projection"]["kernel"].shape[-1]
    if width != mlp_params["layers"][0]["kernel"].shape[0]:
        raise WeightError(
            f"aesthetic: the MLP {path} takes {mlp_params['layers'][0]['kernel'].shape[0]}-d embeddings, the CLIP model "
            f"{d} gives {width}-d ones"
        )

    def score(params: PyTree, images: jax.Array) -> jax.Array:
        return mlp_fn(params["mlp"], embed_images(vision_fn, params["vision"], preprocess(images)))

    run = ShardedBatches(score, {"vision": vision_params, "mlp": mlp_params}, batch_size)

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 [B] aesthetic scores of uint8 (or float in [0, 1]) [B,H,W,3] images (prompts unused)."""
        return run(np.asarray(images))

    return reward_fn
