"""Shared test utilities (imported as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np


def rel_err(ours, ref) -> float:
    """``max |ours - ref| / max |ref|``: the relative error the parity tolerances refer to."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---------------------------------------------------------------- float64 references and float32 bounds

F32_EPS = float(np.finfo(np.float32).eps)
"""2^-23 = 1.19e-7, the spacing of float32 numbers at 1: a float32 operation rounds by at most F32_EPS / 2 relative."""


def trace_cudnn_as_on_an_h200(monkeypatch) -> None:
    """Lets jax's real cuDNN attention be traced and lowered for CUDA on a CPU (never run): its cuDNN-version and
    compute-capability checks answered as on an H200 (cuDNN 9.10, sm_90), and ``attention``'s ``auto`` choosing as on
    a CUDA GPU."""
    from jax._src.cudnn import fused_attention_stablehlo

    from marble_jax.models import attention

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused_attention_stablehlo, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(attention, "_backend", lambda: "cuda")


def torch_float64():
    """A context in which the float32 that library code asks for explicitly (``dtype=torch.float32``, ``.float()``,
    ``.to(torch.float32)``) is float64. Parameters and inputs are cast by the caller (:func:`float64_copy`,
    :func:`t64`); this catches the casts inside a reference: diffusers' timestep sinusoid, its RMSNorm variance and
    its schedulers' steps, T5's softmax and layer norm. A reference run in it rounds at 2^-53 throughout, so a
    parity test against it measures our float32 rounding alone."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Float64Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
            if func is torch.Tensor.float:
                return args[0].double()
            if func in (torch.Tensor.to, torch.Tensor.type):
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            return func(*args, **kwargs)

    return Float64Mode()


def float64_copy(module):
    """A float64 copy of a torch module in eval mode (every parameter and floating buffer cast by ``.double()``);
    the module itself stays float32."""
    import copy

    return copy.deepcopy(module).double().eval()


def t64(x):
    """A float64 torch tensor of ``x`` (a numpy / JAX array or a torch tensor); integer arrays stay integer."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    x = np.asarray(x)
    return torch.from_numpy(np.array(x, np.float64) if np.issubdtype(x.dtype, np.floating) else np.array(x))


def normalise_bound(mean, std) -> float:
    """A bound on the absolute float32 error of CLIP's pixel normalisation ``y = (p / 255 - mean) / std`` of uint8
    ``p`` computed as ours is: ``x = p * fl(1/255)``, then ``(x - fl(mean)) / fl(std)``, every float32 constant and
    operation correctly rounded (within u = F32_EPS / 2 relative). To first order in u: ``x`` (in [0, 1]) is within
    2u, ``x - mean`` within ``(2 + mean + |x - mean|) u``, and the quotient (or its product with a rounded reciprocal,
    as XLA may compile it) within that over ``std`` plus ``3u |y|``: ``u (2 + mean + 4 max(mean, 1 - mean)) / std``,
    the largest over the channels (1.06e-6 for OpenAI CLIP's statistics). Every uint8 value tried, the error of
    ours is at most 4.5e-7 there."""
    u = F32_EPS / 2
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return float(np.max(u * (2 + m + 4 * np.maximum(m, 1 - m)) / s))


def cosine_bound(tol: float, cosines) -> float:
    """A bound on ``rel_err`` of cosines (dot products of unit vectors; or a positive multiple of them: CLIP logits,
    CLIPScore, PickScore) when each unit vector is within L2 distance ``tol`` of the exact one: ``|d cos| <= |d a| +
    |d b| <= 2 tol``, relative to ``max |cos|``. The float32 error of a cosine scales with its unit vectors, not with
    the cosine, so the bound grows as the sum cancels: random tiny models give cosines of 0.01 - 0.2."""
    return 2 * tol / float(np.max(np.abs(np.asarray(cosines, np.float64))))


def use_our_timestep_sinusoid(model) -> None:
    """Replaces, in place, the timestep sinusoid of a diffusers SD3 transformer (``time_text_embed.time_proj``)
    by ours (:func:`marble_jax.models.embeddings.timestep_embedding`, float32, then cast to float64).

    ``sin(t f)`` with ``t f`` up to 1000 is ill-conditioned: any float32 sinusoid is ~4e-5 (absolute) off the
    exact one (ours and torch's alike; tests/test_mmdit.py::test_timestep_sinusoid_matches_diffusers bounds it),
    and parameter gradients downstream of it pick up several 1e-6. A float64 reference fed our float32 sinusoid
    measures the well-conditioned rest of the network alone."""
    import jax.numpy as jnp
    import torch

    from marble_jax.models.embeddings import timestep_embedding

    proj = model.time_text_embed.time_proj
    assert (proj.flip_sin_to_cos, proj.downscale_freq_shift, proj.scale) == (True, 0, 1)  # ours: cos first, f = 1e4^(-k/half)

    class OurSinusoid(torch.nn.Module):
        def forward(self, t):
            return t64(np.asarray(timestep_embedding(jnp.asarray(t.detach().numpy(), jnp.float32), proj.num_channels)))

    model.time_text_embed.time_proj = OurSinusoid()


def perturb_torch_module(module, seed: int = 0, scale: float = 0.02) -> None:
    """Adds Gaussian noise to every parameter of a torch module, in place, so that layers
    initialised to zero (adaLN modulation, final layers, LoRA B) are exercised by parity tests."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def write_tiny_bpe_files(path, extra_tokens: tuple[str, ...] = ()) -> int:
    """``vocab.json`` + ``merges.txt`` of a letter-level CLIP BPE in ``path``: start-of-text, "!", the letters alone
    and word-final, six merges (cat, dog, red), ``extra_tokens``, then end-of-text (the largest id). Returns the
    vocabulary size (61 without extras)."""
    import json
    import string
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    vocab = ["<|startoftext|>", "!"] + list(letters) + [c + "</w>" for c in letters]
    vocab += [a + b for a, b in (m.split() for m in merges)] + list(extra_tokens) + ["<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_sd3_tokenizers(path):
    """Tiny tokenizers shaped like SD3's, built locally: CLIP-L (pads with its end-of-text token) and CLIP-G
    (pads with "!", id 1) BPE tokenizers over :func:`write_tiny_bpe_files`' 61-token vocabulary (end-of-text id 60),
    written to ``path``, and a 34-piece T5 Unigram tokenizer. Returns ``(clip_l, clip_g, t5)``."""
    import string

    from transformers import CLIPTokenizer, T5TokenizerFast

    write_tiny_bpe_files(path)
    clip_l = CLIPTokenizer.from_pretrained(path, model_max_length=77)
    clip_g = CLIPTokenizer.from_pretrained(path, model_max_length=77, pad_token="!")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in ["a", "red", "cat", "dog"]] + [(c, -5.0) for c in string.ascii_lowercase]
    return clip_l, clip_g, T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_sd35_transformer_config(num_layers: int = 3) -> dict:
    """A tiny SD3.5-shaped ``SD3Transformer2DModel`` config: MMDiT-X attn2 in block 0, RMSNorm q/k,
    the context-pre-only last block, and a 12 x 12 position table cropped to smaller latent grids."""
    return dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        out_channels=4,
        pos_embed_max_size=12,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def save_tiny_sd35_transformer(directory, num_layers: int = 3):
    """The tiny SD3.5-shaped torch transformer (seed 0, every weight perturbed), saved to
    ``directory`` with ``save_pretrained``; returns the torch model (eval mode)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_sd35_transformer_config(num_layers)).eval()
    perturb_torch_module(model)
    model.save_pretrained(directory)
    return model


def save_tiny_world(directory, seed: int = 0):
    """A random 1-block world model (every weight non-zero, so LoRA gradients flow) saved in ``directory``."""
    import jax

    from marble_jax.world import model as world_model
    from marble_jax.world import scenes

    tokenizer = scenes.build_tokenizer(world_model.MAX_LENGTH)
    config = world_model.default_config(tokenizer)
    config["mmdit"] = {**config["mmdit"], "num_layers": 1, "num_attention_heads": 2, "caption_projection_dim": 64,
                       "dual_attention_layers": [0]}  # fmt: skip
    config["text"] = {**config["text"], "num_hidden_layers": 1}
    _, _, params = world_model.build(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    return world_model.save_world_model(directory, params, config)


def real_looking_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[n,H,W,3]``: smooth gradients and waves, hard-edged rectangles, saturated corners and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = []
    for i in range(n):
        f = 4 + 6 * rng.random()
        img = np.stack([255 * x, 255 * y, 127 + 127 * np.sin(f * (x + i) * (y + 0.3))], -1)
        for _ in range(3):
            top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
            img[top : top + rng.integers(2, height // 3 + 3), left : left + rng.integers(2, width // 3 + 3)] = rng.integers(
                0, 256, 3
            )
        img[: height // 8, : width // 8] = 0
        img[-height // 8 :, -width // 8 :] = 255
        img = img + rng.normal(0, 12, img.shape)
        out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return np.stack(out)


# ---------------------------------------------------------------- tiny reward checkpoints

TINY_CLIP_EXTRA_TOKENS = ("-", "-</w>")  # GenEval's "a photo of a red-colored cup" template
TINY_CLIP_VOCAB_SIZE = 61 + len(TINY_CLIP_EXTRA_TOKENS)  # end-of-text: the last id
TINY_CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=32, patch_size=8
)
TINY_CLIP_PROCESSOR = dict(
    image_processor_type="CLIPImageProcessor", do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
    resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
)  # fmt: skip
"""The defaults of a tiny ``preprocessor_config.json``: OpenAI CLIP's statistics (as transformers states them),
bicubic, resize the shorter side to 32 and centre-crop 32 x 32."""


def save_clip_processor(directory, processor: dict | None = None):
    """A CLIP processor directory: ``preprocessor_config.json`` (:data:`TINY_CLIP_PROCESSOR` updated by ``processor``)
    and the tiny CLIP BPE tokenizer (:func:`write_tiny_bpe_files` with "-"). Returns the ``CLIPTokenizer``."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    directory = Path(directory)
    write_tiny_bpe_files(directory, TINY_CLIP_EXTRA_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({**TINY_CLIP_PROCESSOR, **(processor or {})}))
    return tokenizer


def save_tiny_clip(
    directory,
    *,
    seed: int = 0,
    hidden_act: str = "quick_gelu",
    logit_scale: float = float(np.log(100.0)),
    legacy_eos: bool = False,
    processor: dict | None = None,
):
    """A tiny perturbed transformers ``CLIPModel`` (2 layers of width 32 per tower, 32 x 32 images in patches of 8,
    projection 16, 77 positions) saved to ``directory``; with ``processor`` (a dict, ``{}`` for the defaults) also
    :func:`save_clip_processor` files, without it none (a PickScore-like model directory whose processor lives
    elsewhere). ``legacy_eos``: the text config's ``eos_token_id`` is 2, as in OpenAI's CLIP-L config (pooling at
    the largest id, the end-of-text token), else the tokenizer's end-of-text id. Returns the torch model (eval mode)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    eos = TINY_CLIP_VOCAB_SIZE - 1
    text = dict(
        vocab_size=TINY_CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=77, eos_token_id=2 if legacy_eos else eos, bos_token_id=0, pad_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={**text, "hidden_act": hidden_act}, vision_config={**TINY_CLIP_VISION, "hidden_act": hidden_act},
        projection_dim=16, logit_scale_init_value=logit_scale,
    )  # fmt: skip
    model = CLIPModel(config)
    perturb_torch_module(model, seed=seed, scale=0.05)
    model.eval().save_pretrained(directory)
    if processor is not None:
        save_clip_processor(directory, processor)
    return model


def tiny_laion_mlp(dims: tuple[int, ...] = (16, 24, 12, 8, 4, 1)):
    """LAION's improved-aesthetic-predictor layout scaled down: a module whose ``layers`` is the ``nn.Sequential`` of
    linear layers and dropouts (its ReLUs are commented out upstream), keys ``layers.{0,2,4,6,7}.*``. Eval mode;
    score with ``model.layers(embeddings)``."""
    import torch

    d = dims
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(
        torch.nn.Linear(d[0], d[1]), torch.nn.Dropout(0.2), torch.nn.Linear(d[1], d[2]), torch.nn.Dropout(0.2),
        torch.nn.Linear(d[2], d[3]), torch.nn.Dropout(0.1), torch.nn.Linear(d[3], d[4]), torch.nn.Linear(d[4], d[5]),
    )  # fmt: skip
    return model.eval()


def save_tiny_aesthetic_mlp(path, dims: tuple[int, ...] = (16, 24, 12, 8, 4, 1), seed: int = 0):
    """:func:`tiny_laion_mlp` (seed ``seed``) saved as its ``state_dict`` ``.pth``, as LAION ships it; returns it."""
    import torch

    torch.manual_seed(seed)
    model = tiny_laion_mlp(dims)
    torch.save(model.state_dict(), path)
    return model


def open_clip_model_module():
    """OpenCLIP's real ``open_clip.model``. The package ``__init__`` (image transforms) and ``open_clip.utils``
    import torchvision, which is not installed: for the import only, ``torchvision.ops.misc`` is a stub holding a
    ``FrozenBatchNorm2d`` placeholder (used by ResNet towers only) and the package is entered without its
    ``__init__``; every module the import added is removed again afterwards."""
    import importlib
    import importlib.util
    import sys
    import types

    import pytest
    import torch

    # open_clip.hf_model's imports, resolved before the stub exists: transformers probes for torchvision by module spec
    import transformers.modeling_outputs  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401

    before = set(sys.modules)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    ops = types.ModuleType("torchvision.ops")
    ops.misc = misc
    tv = types.ModuleType("torchvision")
    tv.ops = ops
    package = types.ModuleType("open_clip")
    package.__path__ = list(importlib.util.find_spec("open_clip").submodule_search_locations)
    with pytest.MonkeyPatch.context() as mp:
        stubs = {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc, "open_clip": package}
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        model = importlib.import_module("open_clip.model")
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("open_clip", "torchvision"):
            del sys.modules[name]
    return model


def save_tiny_openclip(path, embed_dim: int, vision: dict, text: dict, seed: int = 0, oc=None):
    """A perturbed OpenCLIP ``CLIP(embed_dim, CLIPVisionCfg(**vision), CLIPTextCfg(**text))`` built with OpenCLIP's own
    class (``oc``: :func:`open_clip_model_module`, imported when None) and saved to ``path`` as a training script
    saves it: ``{"epoch": 1, "state_dict": ...}`` under DataParallel's ``module.`` prefix, with the ``attn_mask``
    buffer some checkpoints carry. Returns the torch model (eval mode)."""
    import torch

    oc = oc or open_clip_model_module()
    torch.manual_seed(seed)
    model = oc.CLIP(embed_dim, vision_cfg=oc.CLIPVisionCfg(**vision), text_cfg=oc.CLIPTextCfg(**text))
    perturb_torch_module(model, seed=seed, scale=0.05)  # LayerNorm scales / biases, zero biases, logit_scale: all off default
    model.eval()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["module.attn_mask"] = model.attn_mask
    torch.save({"epoch": 1, "state_dict": state}, path)
    return model


COCO_LABELS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
"""transformers' coco-detection-mmdet-id2label.json (the id2label of facebook/mask2former-*-coco-instance)."""


def save_tiny_mask2former(path, image_size: int = 64, boosted=("dining table", "mouse", "wine glass", "cup")) -> None:
    """A random Mask2Former (tiny Swin) with COCO labels and a ``image_size`` square image processor, saved to
    ``path``; the class head favours ``boosted`` so that detections pass GenEval's 0.3 (scores come out about
    0.3-0.47), and queries disagree on the class."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    backbone = SwinConfig(
        image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=12, num_labels=80,
        id2label=dict(enumerate(COCO_LABELS)), label2id={label: i for i, label in enumerate(COCO_LABELS)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        bias = torch.full((81,), -6.0)
        bias[[COCO_LABELS.index(b) for b in boosted]] = 3.0
        model.class_predictor.bias.copy_(bias)
        model.class_predictor.weight.mul_(30)
    model.save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)


# ---------------------------------------------------------------- a tiny SD3.5 snapshot

# SD3.5-shaped and tiny: CLIP-L (legacy eos id: pooled at the largest id) and CLIP-G (pooled at the first
# eos) with projections, a gated-gelu T5 as wide as the MMDiT's context, an MMDiT-X (dual attention in
# block 0, RMSNorm q/k, a context-pre-only last block), a 16-channel VAE (2x downsampling: SD3's 8x only
# adds blocks that tests/test_vae.py covers). Latents up to 16 x 16 (pos_embed_max_size 8 x patch 2): images up to 32 px.
SD3_CLIP_L = dict(vocab_size=61, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                  projection_dim=8, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2,
                  bos_token_id=0)  # fmt: skip
SD3_CLIP_G = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
                  projection_dim=12, max_position_embeddings=77, hidden_act="gelu", eos_token_id=60, bos_token_id=0,
                  pad_token_id=1)  # fmt: skip
SD3_T5 = dict(vocab_size=34, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, feed_forward_proj="gated-gelu")  # fmt: skip
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                       joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=20, out_channels=16,
                       pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")  # fmt: skip
SD3_VAE = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               layers_per_block=1, latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=1.5305, shift_factor=0.0609)  # fmt: skip


def tiny_sd3_pipeline(with_t5: bool = True):
    """diffusers' ``StableDiffusion3Pipeline`` of the tiny SD3.5-shaped components above (every weight perturbed,
    seeds 1-5), scheduler shift 3, :func:`tiny_sd3_tokenizers`; without T5 its third encoder and tokenizer are None."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def perturbed(model, seed: int):
        perturb_torch_module(model, seed=seed)
        return model.eval()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as vocab:
        tok_l, tok_g, tok_t5 = tiny_sd3_tokenizers(vocab)
    return StableDiffusion3Pipeline(
        transformer=perturbed(SD3Transformer2DModel(**SD3_TRANSFORMER), 1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=perturbed(AutoencoderKL(**SD3_VAE), 2),
        text_encoder=perturbed(CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_L)), 3),
        tokenizer=tok_l,
        text_encoder_2=perturbed(CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_G)), 4),
        tokenizer_2=tok_g,
        text_encoder_3=perturbed(T5EncoderModel(T5Config(**SD3_T5)), 5) if with_t5 else None,
        tokenizer_3=tok_t5 if with_t5 else None,
    )


def save_tiny_sd3_snapshot(directory, with_t5: bool = True):
    """:func:`tiny_sd3_pipeline` saved as a diffusers snapshot in ``directory`` (``model_index.json`` names
    ``text_encoder_3`` null without T5); returns the directory as a Path."""
    from pathlib import Path

    tiny_sd3_pipeline(with_t5).save_pretrained(directory)
    return Path(directory)


def load_tool(name: str) -> types.ModuleType:
    """``tools/<name>.py`` as a module (registered in ``sys.modules``, which dataclasses need). A tool that sets
    ``XLA_FLAGS`` for itself on import (``plan_sd35``: 8 host devices) does not leak it: jax is already initialised
    here, and a later subprocess must not inherit it."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    saved = os.environ.get("XLA_FLAGS")
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved
    return module
