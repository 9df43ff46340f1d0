"""The world's learned rewards: ``world_clipscore``, ``world_pickscore``, ``world_hps``, ``world_aesthetic``.

All four run the Flax CLIP of :mod:`marble_jax.models.clip` at world scale (32x32 images, 8x8
patches, 2 layers of width 64 per tower, 32-d embeddings, the world tokenizer) from checkpoints
shipped in ``assets/rewards/`` (transformers ``CLIPModel`` layout: ``config.json`` +
``model.safetensors``, so transformers can load them too) and trained by
``tools/train_world_rewards.py`` on the world's training prompts only:

* ``world_clipscore`` = ``CLIPSCORE_SCALE * cos(image_embeds, text_embeds)`` (scale 2.5, as in
  CLIPScore, without its clamp at 0) of ``world_clip``, trained contrastively (InfoNCE with
  every same-caption pair a positive) on clean train scenes and their captions.
* ``world_pickscore`` = ``PICKSCORE_SCALE * cos`` (scale 10) of ``world_pickscore``, a copy of
  ``world_clip`` fine-tuned (as PickScore fine-tunes CLIP) with a Bradley-Terry loss on synthetic
  preference pairs of images for one prompt. The hidden "human" utility is :func:`human_utility`:
  prompt fidelity (the world's GenEval partial score, the OCR reward for text prompts, scene
  identity for plain prompts) minus :data:`NOISE_PENALTY` per unit of pixel noise std / 32 and
  :data:`BLUR_PENALTY` per unit of Gaussian blur sigma: it prefers correct, then clean images.
* ``world_hps`` = ``cos(image_embeds, text_embeds)`` (no scale, as HPSv2) of ``world_hps``, another copy of
  ``world_clip`` fine-tuned Bradley-Terry on its own pairs, ordered by :func:`hps_utility`: the human utility
  plus :data:`HPS_AESTHETIC_WEIGHT` x the aesthetic target / 10 (HPSv2's annotators judged alignment and
  appeal together); the world's stand-in for HPSv2.1, a second text-conditioned preference model beside
  PickScore as in the paper. Measured: on two correct renders of one held-out prompt it follows the
  aesthetic target no better than chance (0.49 of 343 pairs; PickScore 0.49): the fidelity and noise terms
  decide its training pairs, so in this world it is a second PickScore trained on other pairs.
* ``world_aesthetic`` = an MLP on ``world_clip``'s normalised image embedding (frozen, as the
  LAION aesthetic predictor) regressing :func:`aesthetic_target`, a 0-10 score of a clean render
  that likes few, large, centred, saturated objects in few colours.

Measured by the shipped run (``assets/rewards/report.json``; seed 0, 430 s of shared 2-core CPU):
held-out scenes scored above with their own prompt than with another held-out prompt: clipscore
97.2%, pickscore 92.8% (600 scenes); pickscore prefers a clean render over noise std 16 in 81%,
over blur sigma 1 in 92%, and picks the hidden-utility winner of 80% of held-out pairs (clipscore
prefers clean over noise 16 in only 69%); aesthetic vs its target: Spearman 0.78, RMSE 0.60.

Conflict: ``world_aesthetic`` and ``world_geneval`` (partial) pull apart on counting prompts.
Over fresh images of each counting prompt with 1..count+1 objects of its class (varied sizes and
colours, 6 per count), the Spearman correlation between the two is -0.70 on the held-out counting
prompts, -0.38 averaged over all 12 counting prompts, -0.48 pooled: more objects raise GenEval up
to the count and lower the aesthetic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import ndimage

from marble_jax.models import clip
from marble_jax.models.functional import abstract_module, functionalize, path_leaves
from marble_jax.models.weights import assign, conv_kernel, identity, linear_kernel, plan_by_path, read_config, read_safetensors
from marble_jax.world import scenes

ASSETS = Path(__file__).parent / "assets" / "rewards"
CLIPSCORE_SCALE = 2.5
PICKSCORE_SCALE = 10.0
NOISE_PENALTY = 0.5
BLUR_PENALTY = 0.5
HPS_AESTHETIC_WEIGHT = 0.5
MAX_LENGTH = 16
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25

_TOKENIZER_VOCAB = len(scenes.SPECIAL_TOKENS) + len(scenes.vocabulary())
WORLD_CLIP_CONFIG = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 32,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "vocab_size": _TOKENIZER_VOCAB + 1,  # + the end-of-text id the model sees, see tokenize()
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "bos_token_id": 1,
        "eos_token_id": _TOKENIZER_VOCAB,
        "pad_token_id": 0,
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": scenes.IMAGE_SIZE,
        "patch_size": 8,
        "hidden_act": "quick_gelu",
    },
}


# ---------------------------------------------------------------- inputs


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 ``[B,H,W,3]`` -> float32 ``(x / 255 - PIXEL_MEAN) / PIXEL_STD``."""
    return ((np.asarray(images, np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)


@functools.cache
def _tokenizer():
    return scenes.build_tokenizer(MAX_LENGTH)


def tokenize(prompts: Sequence[str]) -> np.ndarray:
    """int32 ``[B, MAX_LENGTH]`` world-tokenizer ids with ``[EOS]`` (id 2) remapped to the last id of the
    model's vocabulary: transformers' CLIP pools at the largest id when ``eos_token_id == 2`` (legacy rule)."""
    tok = _tokenizer()
    ids = np.asarray(tok(list(prompts), padding="max_length", truncation=True)["input_ids"], np.int32)
    return np.where(ids == tok.eos_token_id, _TOKENIZER_VOCAB, ids).astype(np.int32)


# ---------------------------------------------------------------- synthetic targets


def corrupt(image: np.ndarray, noise_std: float, blur_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[H,W,3]`` blurred (Gaussian, ``blur_sigma`` pixels) then with Gaussian noise of std ``noise_std``."""
    x = image.astype(np.float32)
    if blur_sigma > 0:
        x = ndimage.gaussian_filter(x, (blur_sigma, blur_sigma, 0))
    if noise_std > 0:
        x = x + rng.normal(0, noise_std, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def human_utility(fidelity: float, noise_std: float, blur_sigma: float) -> float:
    """The hidden preference of ``world_pickscore``: ``fidelity - NOISE_PENALTY noise_std / 32 - BLUR_PENALTY blur_sigma``."""
    return fidelity - NOISE_PENALTY * noise_std / 32.0 - BLUR_PENALTY * blur_sigma


def hps_utility(fidelity: float, aesthetic: float, noise_std: float, blur_sigma: float) -> float:
    """The hidden preference of ``world_hps``: :func:`human_utility` ``+ HPS_AESTHETIC_WEIGHT aesthetic / 10``
    (``aesthetic``: :func:`aesthetic_target` of the clean render)."""
    return human_utility(fidelity, noise_std, blur_sigma) + HPS_AESTHETIC_WEIGHT * aesthetic / 10.0


def aesthetic_target(image: np.ndarray) -> float:
    """The hidden aesthetic of a clean uint8 ``[H,W,3]`` render, in [0, 10]: ``10 x`` the mean of

    * sparsity ``1 - (n - 1) / 4`` (n objects = 8-connected non-background components, clipped at 0),
    * size ``min(1, area of the largest object / 150)``,
    * centring ``1 - |foreground centroid - image centre| / 12`` (clipped at 0),
    * saturation: the mean HSV saturation of the foreground pixels,
    * harmony ``1 - (k - 1) / 3`` (k distinct foreground colours, clipped at 0).

    An empty image scores 0."""
    fg = (image != np.array(scenes.BACKGROUND, np.uint8)).any(-1)
    if not fg.any():
        return 0.0
    comps, n = ndimage.label(fg, structure=np.ones((3, 3)))
    largest = np.bincount(comps[fg]).max()
    ys, xs = np.nonzero(fg)
    centre = (image.shape[0] - 1) / 2
    offset = np.hypot(ys.mean() - centre, xs.mean() - centre)
    pixels = image[fg].astype(np.float32)
    saturation = np.mean((pixels.max(-1) - pixels.min(-1)) / np.maximum(pixels.max(-1), 1))
    colours = len(np.unique(pixels, axis=0))
    terms = [
        max(0.0, 1 - (n - 1) / 4),
        min(1.0, largest / 150),
        max(0.0, 1 - offset / 12),
        float(saturation),
        max(0.0, 1 - (colours - 1) / 3),
    ]
    return 10.0 * float(np.mean(terms))


# ---------------------------------------------------------------- models and files


class AestheticMLP(nnx.Module):
    """``layers.0`` -> ReLU -> ``layers.1`` -> ReLU -> ``layers.2``; ``[B,P] -> [B]``."""

    def __init__(self, dims: Sequence[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)[:, 0]


def aesthetic_mlp(dims: Sequence[int], key: jax.Array | None = None) -> tuple[Callable, dict]:
    """``(apply_fn, params)`` of :class:`AestheticMLP` (random params from ``key``, or the abstract tree)."""
    apply_fn, params = functionalize(abstract_module(lambda rngs: AestheticMLP(dims, rngs=rngs)))
    if key is not None:
        params = functionalize(AestheticMLP(dims, rngs=nnx.Rngs(key)))[1]
    return apply_fn, params


_INVERSE = {linear_kernel: linear_kernel, identity: identity, conv_kernel: lambda x: x.transpose(3, 2, 0, 1)}


def torch_state(params: dict, plan: dict) -> dict[str, np.ndarray]:
    """The inverse of :func:`~marble_jax.models.weights.assign`: ``{torch key: float32 array}`` of ``params``."""
    return {
        plan[path][0]: np.ascontiguousarray(_INVERSE[plan[path][1]](np.asarray(v, np.float32))) for path, v in path_leaves(params)
    }


def clip_torch_state(model: clip.CLIP) -> dict[str, np.ndarray]:
    """A :class:`~marble_jax.models.clip.CLIP` as a transformers ``CLIPModel`` state dict."""
    text, vision = model.text[1], model.vision[1]
    return {
        **torch_state(text, plan_by_path(text)),
        **torch_state(vision, clip.vision_plan(vision)),
        "logit_scale": np.asarray(model.logit_scale, np.float32),
    }


def _need(directory: Path, *files: str) -> None:
    for name in files:
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"world reward checkpoint file missing: {directory / name}; rebuild it with `python tools/train_world_rewards.py`"
            )


@functools.cache
def load_clip(name: str, root: Path = ASSETS) -> clip.CLIP:
    """The shipped world CLIP ``root/name`` (``world_clip``, ``world_pickscore`` or ``world_hps``)."""
    d = Path(root) / name
    _need(d, "config.json", "model.safetensors")
    return clip.clip_from_torch_state(read_config(d), read_safetensors(d, "model"), source=str(d))


@functools.cache
def load_aesthetic(root: Path = ASSETS) -> tuple[Callable, dict]:
    """The shipped aesthetic head ``(apply_fn, params)`` (on normalised image embeddings)."""
    d = Path(root) / "world_aesthetic"
    _need(d, "config.json", "model.safetensors")
    apply_fn, target = aesthetic_mlp(read_config(d)["dims"])
    return apply_fn, assign(target, plan_by_path(target), read_safetensors(d, "model"), source=str(d))


def embed_images(model: clip.CLIP, images: np.ndarray) -> jax.Array:
    """Unit-norm image embeddings ``[B,P]`` of uint8 ``[B,H,W,3]`` images."""
    e = _jitted(model.vision[0])(model.vision[1], normalize(images))["image_embeds"]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def embed_texts(model: clip.CLIP, prompts: Sequence[str]) -> jax.Array:
    """Unit-norm text embeddings ``[B,P]`` of prompts."""
    e = _jitted(model.text[0])(model.text[1], tokenize(prompts))["text_embeds"]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


@functools.cache
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)


def _cosines(model: clip.CLIP, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    return np.asarray(jnp.sum(embed_images(model, images) * embed_texts(model, prompts), axis=-1), np.float32)


# ---------------------------------------------------------------- reward factories


def world_clipscore(root: str | Path = ASSETS):
    """CLIPScore of the world CLIP: ``CLIPSCORE_SCALE * cos(image, prompt)``, in [-2.5, 2.5]."""
    model = load_clip("world_clip", Path(root))

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 ``[B]`` CLIP scores of uint8 ``[B, 32, 32, 3]`` images."""
        return CLIPSCORE_SCALE * _cosines(model, images, prompts)

    return reward_fn


def world_pickscore(root: str | Path = ASSETS):
    """Preference score of the preference-tuned world CLIP: ``PICKSCORE_SCALE * cos(image, prompt)``, in [-10, 10]."""
    model = load_clip("world_pickscore", Path(root))

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 ``[B]`` preference scores of uint8 ``[B, 32, 32, 3]`` images."""
        return PICKSCORE_SCALE * _cosines(model, images, prompts)

    return reward_fn


def world_hps(root: str | Path = ASSETS):
    """HPS-style preference score of the world: ``cos(image, prompt)`` of ``world_hps``, in [-1, 1]."""
    model = load_clip("world_hps", Path(root))

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 ``[B]`` preference scores of uint8 ``[B, 32, 32, 3]`` images."""
        return _cosines(model, images, prompts)

    return reward_fn


def world_aesthetic(root: str | Path = ASSETS):
    """Aesthetic score (about 0-10) of an image, prompt-independent: the MLP head on the world CLIP image embedding."""
    model = load_clip("world_clip", Path(root))
    apply_fn, params = load_aesthetic(Path(root))

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """float32 ``[B]`` aesthetic scores of uint8 ``[B, 32, 32, 3]`` images."""
        return np.asarray(_jitted(apply_fn)(params, embed_images(model, images)), np.float32)

    return reward_fn


def match_accuracy(reward_fn, seed: int, n: int) -> dict[str, float]:
    """Fraction of held-out scenes scored higher with their own prompt than with another held-out prompt, per kind."""
    held = scenes.sample_scenes(seed, n, "heldout")
    rng = np.random.default_rng(seed)
    other = []
    for s in held:
        o = held[rng.integers(n)].prompt
        while o.text == s.prompt.text:
            o = held[rng.integers(n)].prompt
        other.append(o)
    images = scenes.render_batch(held)
    own = reward_fn(images, [s.prompt.text for s in held], [s.prompt.metadata for s in held])
    mis = reward_fn(images, [o.text for o in other], [o.metadata for o in other])
    win = own > mis
    out = {"all": float(win.mean())}
    for kind in scenes.KINDS:
        sel = np.array([s.prompt.kind == kind for s in held])
        if sel.any():
            out[kind] = float(win[sel].mean())
    return out
