"""Images per second of the real rewards on this CPU, ours against the PyTorch reference in the same run.

    python tools/bench_rewards.py [--rewards clipscore,pickscore,hpsv2,aesthetic,ocr,geneval] [--batch 8]
        [--repeats 3] [--size 512] [--detector-size 384]

Real-size architectures with random weights, written once into a temporary directory (removed at the end):
CLIP-L/14 (``openai/clip-vit-large-patch14``: QuickGELU, text 768 x 12, vision 1024 x 24, patch 14, 224 px),
CLIP-H/14 (``laion/CLIP-ViT-H-14``: GELU, text 1024 x 24, vision 1280 x 32), the same CLIP-H renamed into an
OpenCLIP ViT-H-14 ``.pt`` (HPSv2.1's format), LAION's aesthetic MLP (768-1024-128-64-16-1) and a Mask2Former
Swin-S COCO-instance detector (80 COCO labels; ``--detector-size`` square inputs, 384 as the hub checkpoint's
processor). Tokenizers: byte-level BPE learnt on the run's texts (a word, a token), ``<|endoftext|>`` = 49407 the
largest id, as OpenAI's.

Inputs: ``--batch`` uint8 ``[--size, --size, 3]`` images (gradients, shapes, a sign with the prompt's quoted text,
noise) with the OCR test prompts (quoted text), or the first GenEval metadata rows for ``geneval``.

Per reward: our reward from the registry (``marble_jax.rewards.get``) and the reference (what Flow-GRPO's scorers
run: transformers ``CLIPModel`` + ``CLIPImageProcessorPil`` + ``CLIPTokenizer``, fp32, ``torch.no_grad``, prompts
padded to the longest; HPSv2: the same CLIP-H on its torch-bicubic resize-and-pad pixels, 77 tokens, which is open_clip's ViT-H-14
layer for layer and FLOP for FLOP), each loaded once (load times printed), called once (our first call compiles),
then ``--repeats`` calls each, alternating, on the same batch. Printed per reward: load and first-call times, the
median seconds per batch, the largest relative difference of the two score vectors (a check that both compute the
same thing), and at the end a Markdown table: reward | ours img/s | torch img/s | ours/torch | notes.
OCR (tesseract) and GenEval (transformers' torch Mask2Former feeding our CLIP colour classifier) run the same host
engines either way: ours only. The random detector's class probabilities are about 1/81, so no detection reaches
GenEval's 0.3 and its row is the detector, its post-processing and the rules; the colour step, which a trained
detector's kept objects add (one CLIP-L image each), is timed alone against the same zero-shot computation in torch
(crops / s). JAX and torch each use every core of the machine, in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from marble_jax import rewards
from marble_jax.rewards import geneval as GE
from marble_jax.rewards.image_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from marble_jax.rewards.ocr import ocr_target

OCR_PROMPTS = Path("/work/shared/data/prompts/ocr/test.txt")
GENEVAL_METADATA = Path("/work/shared/data/prompts/geneval/test_metadata.jsonl")
FALLBACK_PROMPTS = (
    'A neon sign above a cafe door reading "Open Late" on a rainy night street',
    'A chalkboard menu outside a bakery with "Fresh Bread Daily" written in white chalk',
    'A vintage poster with the words "Summer Festival" over a sunset beach',
    'A wooden signpost in a forest pointing to "Hidden Lake" with moss on the post',
)
FALLBACK_METADATA = (
    {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a photo of a red cup"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "car", "count": 1}], "prompt": "a dog and a car"},
)

SOT, EOT = 49406, 49407  # OpenAI's CLIP vocabulary: <|endoftext|> is the largest of its 49408 ids
TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT)
VISION = dict(image_size=224, patch_size=14)
CLIP_ARCHS = {  # transformers CLIPConfig sizes of the public checkpoints
    "CLIP-L/14": dict(
        text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu"),
        vision=dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, hidden_act="quick_gelu"
        ),
        projection_dim=768,
    ),
    "CLIP-H/14": dict(
        text=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu"),
        vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, hidden_act="gelu"),
        projection_dim=1024,
    ),
}
SWIN_S = dict(  # facebook/mask2former-swin-small-coco-instance's backbone
    image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
    drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"],
)  # fmt: skip
COCO_LABELS = [{v: k for k, v in GE.COCO_RENAMES.items()}.get(n, n) for n in GE.OBJECT_NAMES]  # GenEval's, 3 renamed back
AESTHETIC_DIMS = (768, 1024, 128, 64, 16, 1)
CROPS_PER_IMAGE = 2  # object crops per image for the colour-step row


# ---------------------------------------------------------------- inputs


def load_prompts(batch: int) -> list[str]:
    """The first ``batch`` OCR test prompts (cycled), or a built-in few when the file is missing."""
    lines = OCR_PROMPTS.read_text().splitlines() if OCR_PROMPTS.is_file() else []
    prompts = [p for p in lines if ocr_target(p)] or list(FALLBACK_PROMPTS)
    return [prompts[i % len(prompts)] for i in range(batch)]


def load_metadata(batch: int) -> list[dict]:
    """The first ``batch`` GenEval metadata rows (cycled), or a built-in two when the file is missing."""
    lines = GENEVAL_METADATA.read_text().splitlines() if GENEVAL_METADATA.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()] or list(FALLBACK_METADATA)
    return [rows[i % len(rows)] for i in range(batch)]


def make_images(prompts: Sequence[str], size: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[B, size, size, 3]``: a two-colour gradient with a wave, five filled ellipses / rectangles, the prompt's
    quoted text (if any) in dark letters on a light sign, and Gaussian noise (std 6)."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[0:size, 0:size] / size)[..., None]
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", size // 14)
    except OSError:
        font = ImageFont.load_default(size // 14)
    out = []
    for prompt in prompts:
        c0, c1 = rng.uniform(0, 255, (2, 3))
        base = c0 * (1 - y) + c1 * y + 30 * np.sin(rng.uniform(3, 9) * (x + 0.5 * y))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x0, y0 = rng.integers(0, 3 * size // 4, 2)
            w, h = rng.integers(size // 10, size // 3, 2)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        if ocr_target(prompt):
            m = size // 10
            draw.rectangle((m, 3 * size // 8, size - m, 5 * size // 8), fill=(235, 232, 220))
            text = "\n".join(textwrap.wrap(prompt.split('"')[1], 18))
            draw.multiline_text((size // 2, size // 2), text, fill=(25, 25, 30), font=font, anchor="mm", align="center")
        noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (size, size, 3))
        out.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return np.stack(out)


# ---------------------------------------------------------------- random checkpoints


def write_tokenizer(directory: Path, texts: Sequence[str]) -> None:
    """A CLIP tokenizer in ``directory``: byte-level BPE merges learnt on ``texts`` (every word of them one token, about as
    OpenAI's 49k merges tokenise common words) over the 256 byte symbols, alone and word-final,
    ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407 (the largest id, as OpenAI's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    clip_pipeline = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).backend_tokenizer
    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    learner.normalizer, learner.pre_tokenizer = clip_pipeline.normalizer, clip_pipeline.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    learner.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=SOT, show_progress=False, initial_alphabet=alphabet, end_of_word_suffix="</w>")
    )
    learnt = json.loads(learner.to_str())["model"]
    tokens = sorted(alphabet) + sorted(a + "</w>" for a in alphabet) + list(learnt["vocab"])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))} | {"<|startoftext|>": SOT, "<|endoftext|>": EOT}
    source = directory / "bpe"
    source.mkdir(parents=True)
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learnt["merges"]))
    CLIPTokenizer.from_pretrained(source, model_max_length=77).save_pretrained(directory)


class LaionMLP(torch.nn.Module):
    """LAION's improved-aesthetic-predictor head (linear layers and dropouts, its ReLUs commented out)."""

    def __init__(self, d=AESTHETIC_DIMS):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d[0], d[1]), torch.nn.Dropout(0.2), torch.nn.Linear(d[1], d[2]), torch.nn.Dropout(0.2),
            torch.nn.Linear(d[2], d[3]), torch.nn.Dropout(0.1), torch.nn.Linear(d[3], d[4]), torch.nn.Linear(d[4], d[5]),
        )  # fmt: skip

    def forward(self, x):
        return self.layers(x)


def openclip_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict in OpenCLIP's ``open_clip.model.CLIP`` layout: q, k, v fused into
    ``attn.in_proj_*`` (stacked in that order), the two projections as ``[in, out]`` matrices."""
    out = {
        "logit_scale": hf["logit_scale"],
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].T.contiguous(),
    }
    norms = {"ln_final": "text_model.final_layer_norm", "visual.ln_pre": "vision_model.pre_layrnorm",
             "visual.ln_post": "vision_model.post_layernorm"}  # fmt: skip
    blocks = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
              "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for tower, prefix in (("text_model", "transformer.resblocks"), ("vision_model", "visual.transformer.resblocks")):
        layers = {int(m.group(1)) for k in hf if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", k))}
        for i in sorted(layers):
            src = f"{tower}.encoder.layers.{i}"
            norms |= {f"{prefix}.{i}.{ours}": f"{src}.{theirs}" for ours, theirs in blocks.items()}
            for leaf in ("weight", "bias"):
                out[f"{prefix}.{i}.attn.in_proj_{leaf}"] = torch.cat([hf[f"{src}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    for ours, theirs in norms.items():
        out[f"{ours}.weight"], out[f"{ours}.bias"] = hf[f"{theirs}.weight"], hf[f"{theirs}.bias"]
    return out


class Checkpoints:
    """The random real-size checkpoints, each written into ``root`` on first use (its torch model freed after saving)."""

    def __init__(self, root: Path, texts: Sequence[str], detector_size: int):
        self.root, self.texts, self.detector_size = root, list(texts), detector_size
        self.made: dict[str, Path] = {}

    def _once(self, name: str, write: Callable[[Path], None]) -> Path:
        if name not in self.made:
            start = time.perf_counter()
            write(self.root / name)
            print(f"  wrote random {name} in {time.perf_counter() - start:.1f} s", flush=True)
            self.made[name] = self.root / name
        return self.made[name]

    def clip(self, arch: str) -> Path:
        """A transformers ``CLIPModel`` directory of ``arch`` (a key of :data:`CLIP_ARCHS`) with its OpenAI-style
        ``preprocessor_config.json`` (shortest edge 224, crop 224, bicubic) and tokenizer."""

        def write(d: Path) -> None:
            from transformers import CLIPConfig, CLIPModel

            a = CLIP_ARCHS[arch]
            torch.manual_seed(0)
            config = CLIPConfig(
                text_config={**TEXT, **a["text"]}, vision_config={**VISION, **a["vision"]},
                projection_dim=a["projection_dim"], logit_scale_init_value=float(np.log(100.0)),
            )  # fmt: skip
            CLIPModel(config).eval().save_pretrained(d)
            processor = dict(
                do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), image_processor_type="CLIPImageProcessor",
            )  # fmt: skip
            (d / "preprocessor_config.json").write_text(json.dumps(processor))
            write_tokenizer(d, self.texts)

        return self._once(arch, write)

    def openclip_h(self) -> Path:
        """The CLIP-H weights as an OpenCLIP ViT-H-14 checkpoint ``.pt`` (``{"state_dict": ...}``, as HPSv2's)."""

        def write(path: Path) -> None:
            from safetensors.torch import load_file

            state = openclip_state(load_file(self.clip("CLIP-H/14") / "model.safetensors"))
            torch.save({"state_dict": state}, path)

        return self._once("openclip-ViT-H-14.pt", write)

    def aesthetic_mlp(self) -> Path:
        def write(path: Path) -> None:
            torch.manual_seed(1)
            torch.save(LaionMLP().state_dict(), path)

        return self._once("aesthetic-mlp.pth", write)

    def detector(self) -> Path:
        """A Mask2Former Swin-S COCO-instance directory (``detector_size`` square inputs, bilinear, ImageNet statistics)."""

        def write(d: Path) -> None:
            from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
            from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

            config = Mask2FormerConfig(
                backbone_config=SwinConfig(**SWIN_S), num_labels=80, id2label=dict(enumerate(COCO_LABELS)),
                label2id={n: i for i, n in enumerate(COCO_LABELS)},
            )  # fmt: skip
            torch.manual_seed(2)
            Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(d)
            s = self.detector_size
            Mask2FormerImageProcessorPil(size={"height": s, "width": s}, size_divisor=32, resample=2).save_pretrained(d)

        return self._once("mask2former-swin-s", write)


# ---------------------------------------------------------------- cases


@dataclasses.dataclass
class Batch:
    images: np.ndarray
    prompts: list[str]
    metadata: list[dict | None]


@dataclasses.dataclass
class Case:
    """One row: ``ours()`` / ``torch()`` score the same batch of ``count`` items; load times in seconds."""

    ours: Callable[[], np.ndarray]
    torch: Callable[[], np.ndarray] | None
    load_ours: float
    load_torch: float | None
    count: int
    unit: str
    notes: list[str]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def n_params(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params"


def load_torch_clip(d: Path):
    """transformers' ``CLIPModel`` (eval), ``CLIPImageProcessorPil`` and ``CLIPTokenizer`` of ``d``."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPModel.from_pretrained(d).eval(), CLIPImageProcessorPil.from_pretrained(d), CLIPTokenizer.from_pretrained(d)


def text_image_case(reward: str, options: dict, model_dir: Path, batch: Batch, score: Callable) -> Case:
    """A CLIP text-image reward against Flow-GRPO's scorer: processor pixels, prompts padded to the longest,
    ``score(model, CLIPOutput) -> [B]``."""
    load_ours, ours = timed(lambda: rewards.get(reward, **options))
    load_torch, (model, processor, tokenizer) = timed(lambda: load_torch_clip(model_dir))
    tokens = tokenizer(batch.prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")

    def reference() -> np.ndarray:
        pixels = processor(images=list(batch.images), return_tensors="pt")["pixel_values"]
        ids = tokenizer(batch.prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
            return score(model, out).numpy()

    notes = [n_params(model), f"torch text {tokens.input_ids.shape[1]} tokens (longest prompt), ours 77"]
    return Case(lambda: ours(batch.images, batch.prompts, batch.metadata), reference, load_ours, load_torch,
                len(batch.images), "img", notes)  # fmt: skip


def clipscore_case(ck: Checkpoints, batch: Batch) -> Case:
    d = ck.clip("CLIP-L/14")
    case = text_image_case(
        "clipscore", dict(path=str(d), batch_size=len(batch.images)), d, batch, lambda m, out: out.logits_per_image.diag() / 100
    )
    case.notes.insert(0, "CLIP-L/14")
    return case


def pickscore_case(ck: Checkpoints, batch: Batch) -> Case:
    d = ck.clip("CLIP-H/14")
    options = dict(path=str(d), processor_path=str(d), batch_size=len(batch.images))

    def score(model, out):
        return model.logit_scale.exp() * torch.sum(out.image_embeds * out.text_embeds, -1) / 26

    case = text_image_case("pickscore", options, d, batch, score)
    case.notes.insert(0, "CLIP-H/14")
    return case


def hps_pixels(images: np.ndarray, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform on PIL images: the longer side to ``size`` (bicubic), zero padding to a square,
    ``ToTensor``, OpenAI CLIP normalisation; float32 ``[B, 3, size, size]``."""
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
    out = []
    for img in images:
        h, w = img.shape[:2]
        nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), np.float32) / 255
        ph, pw = size - nh, size - nw
        padded = np.pad(resized, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        out.append(((padded - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def hpsv2_case(ck: Checkpoints, batch: Batch) -> Case:
    d, pt = ck.clip("CLIP-H/14"), ck.openclip_h()
    options = dict(path=str(pt), tokenizer_path=str(d), batch_size=len(batch.images))
    load_ours, ours = timed(lambda: rewards.get("hpsv2", **options))
    load_torch, (model, _, tokenizer) = timed(lambda: load_torch_clip(d))

    def reference() -> np.ndarray:
        ids = tokenizer(batch.prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():  # open_clip: 77 tokens, causal mask only
            out = model(input_ids=ids.input_ids, pixel_values=hps_pixels(batch.images))
            return torch.sum(out.image_embeds * out.text_embeds, -1).numpy()

    notes = ["OpenCLIP ViT-H-14 .pt", n_params(model), "torch: transformers CLIP-H (= open_clip ViT-H-14 layers and FLOPs)"]
    return Case(lambda: ours(batch.images, batch.prompts, batch.metadata), reference, load_ours, load_torch,
                len(batch.images), "img", notes)  # fmt: skip


def aesthetic_case(ck: Checkpoints, batch: Batch) -> Case:
    d, mlp_path = ck.clip("CLIP-L/14"), ck.aesthetic_mlp()
    options = dict(path=str(mlp_path), clip_path=str(d), batch_size=len(batch.images))
    load_ours, ours = timed(lambda: rewards.get("aesthetic", **options))

    def load():
        model, processor, _ = load_torch_clip(d)
        mlp = LaionMLP().eval()
        mlp.load_state_dict(torch.load(mlp_path, weights_only=True))
        return model, processor, mlp

    load_torch, (model, processor, mlp) = timed(load)

    def reference() -> np.ndarray:
        pixels = processor(images=list(batch.images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            embeds = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            return mlp(embeds)[:, 0].numpy()

    notes = ["CLIP-L/14 image tower + LAION MLP"]
    return Case(lambda: ours(batch.images, batch.prompts, batch.metadata), reference, load_ours, load_torch,
                len(batch.images), "img", notes)  # fmt: skip


def ocr_case(ck: Checkpoints, batch: Batch) -> Case:
    from marble_jax.rewards.ocr_engine import thread_count

    load_ours, ours = timed(lambda: rewards.get("ocr"))
    limit = os.environ.get("OMP_THREAD_LIMIT", "1")  # the reader sets 1 for its tesseract runs unless the caller sets it
    notes = [f"tesseract, {thread_count(0)} runs at once (one per chunk of images), OMP_THREAD_LIMIT={limit}"]
    return Case(lambda: ours(batch.images, batch.prompts, batch.metadata), None, load_ours, None, len(batch.images), "img", notes)


def geneval_case(ck: Checkpoints, batch: Batch) -> Case:
    det_dir, clip_dir = ck.detector(), ck.clip("CLIP-L/14")
    options = dict(detector_path=str(det_dir), clip_path=str(clip_dir), batch_size=len(batch.images))
    load_ours, ours = timed(lambda: rewards.get("geneval", **options))
    s = ck.detector_size
    notes = [f"torch Mask2Former Swin-S at {s}x{s} (the same either way)", "random detector: nothing passes 0.3, no colour step"]
    return Case(lambda: ours(batch.images, batch.prompts, batch.metadata), None, load_ours, None, len(batch.images), "img", notes)


def object_crops(batch: Batch, seed: int = 3) -> tuple[list[np.ndarray], list[str]]:
    """:data:`CROPS_PER_IMAGE` crops per image as GenEval cuts them (:func:`geneval.object_crop`: an elliptical mask,
    grey outside, cropped to a box of 15-60% of the side), named after the image's first include class."""
    rng = np.random.default_rng(seed)
    crops, names = [], []
    for image, meta in zip(batch.images, batch.metadata, strict=True):
        size = image.shape[0]
        for _ in range(CROPS_PER_IMAGE):
            w, h = rng.integers(int(0.15 * size), int(0.6 * size), 2)
            x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
            yy, xx = np.mgrid[0:size, 0:size]
            mask = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - y0 - h / 2) / (h / 2)) ** 2 <= 1
            name = meta["include"][0]["class"]
            crops.append(GE.object_crop(image, GE.Detection(name, 0.9, GE.mask_box(mask), mask=mask)))
            names.append(name)
    return crops, names


def colour_case(ck: Checkpoints, batch: Batch) -> Case:
    """GenEval's zero-shot colour step alone: our jitted CLIP-L vs transformers' (text classes cached on both sides)."""
    d = ck.clip("CLIP-L/14")
    crops, names = object_crops(batch)
    load_ours, classifier = timed(lambda: GE.load_color_classifier(str(d), batch_size=len(batch.images)))
    load_torch, (model, processor, tokenizer) = timed(lambda: load_torch_clip(d))
    classes: dict[str, torch.Tensor] = {}

    def reference() -> np.ndarray:
        with torch.no_grad():
            for name in set(names) - set(classes):
                texts = [t.format(color=c, object=name) for c in GE.COLORS for t in GE.COLOR_TEMPLATES]
                ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
                text = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
                classes[name] = F.normalize(text.reshape(len(GE.COLORS), len(GE.COLOR_TEMPLATES), -1).mean(1), dim=-1)
            pixels = processor(images=crops, return_tensors="pt")["pixel_values"]
            image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            return torch.stack([classes[n] @ image[k] for k, n in enumerate(names)]).numpy()

    notes = [
        f"CLIP-L/14, {CROPS_PER_IMAGE} object crops per image, 10 colours x 3 templates (cached)",
        "transformers' centre crop can sit a pixel off GenEval's (ours): scores differ slightly",
    ]
    return Case(lambda: GE.color_scores(classifier, crops, names), reference, load_ours, load_torch, len(crops), "crop", notes)


CASES: dict[str, list[tuple[str, Callable[[Checkpoints, Batch], Case]]]] = {
    "clipscore": [("clipscore", clipscore_case)],
    "pickscore": [("pickscore", pickscore_case)],
    "hpsv2": [("hpsv2", hpsv2_case)],
    "aesthetic": [("aesthetic", aesthetic_case)],
    "ocr": [("ocr", ocr_case)],
    "geneval": [("geneval", geneval_case), ("geneval colour step", colour_case)],
}


# ---------------------------------------------------------------- measuring


def rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    """``max |ours - ref| / max |ref|`` over the entries where both are finite."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    ok = np.isfinite(ours) & np.isfinite(ref)
    return float(np.max(np.abs(ours - ref)[ok]) / max(np.max(np.abs(ref[ok])), 1e-30))


def measure(name: str, case: Case, repeats: int) -> list[str]:
    """Times the case (first calls, then ``repeats`` alternating calls), prints the details, returns the table row."""
    first_ours, out = timed(case.ours)
    first_torch, ref = timed(case.torch) if case.torch else (None, None)
    ours_t, torch_t = [], []
    for _ in range(repeats):
        ours_t.append(timed(case.ours)[0])
        if case.torch:
            torch_t.append(timed(case.torch)[0])
    ours_s = statistics.median(ours_t)
    ours_rate = case.count / ours_s
    print(f"{name}: {case.count} {case.unit}s a call; load ours {case.load_ours:.1f} s, first call {first_ours:.1f} s; "
          f"median of {repeats}: {ours_s:.2f} s ({ours_rate:.2f} {case.unit}/s)", flush=True)  # fmt: skip
    notes = [*case.notes, f"load {case.load_ours:.0f} s, 1st call {first_ours:.0f} s"]
    if case.torch is None:
        print(f"  scores {np.round(np.asarray(out, np.float64), 3).tolist()}")
        return [name, f"{ours_rate:.2f}", "-", "-", "; ".join(notes)]
    torch_s = statistics.median(torch_t)
    torch_rate, diff = case.count / torch_s, rel_diff(out, ref)
    print(f"  torch: load {case.load_torch:.1f} s, first call {first_torch:.1f} s; median {torch_s:.2f} s "
          f"({torch_rate:.2f} {case.unit}/s); ours/torch {ours_rate / torch_rate:.2f}; max rel diff {diff:.1e}",
          flush=True)  # fmt: skip
    notes += [f"torch load {case.load_torch:.0f} s", f"max rel diff {diff:.0e}"]
    if case.unit != "img":
        notes.insert(0, f"{case.unit}s/s")
    return [name, f"{ours_rate:.2f}", f"{torch_rate:.2f}", f"{ours_rate / torch_rate:.2f}", "; ".join(notes)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rewards", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--detector-size", type=int, default=384, help="Mask2Former input side (detectron2 tests at 800)")
    args = parser.parse_args()
    chosen = [r.strip() for r in args.rewards.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        parser.error(f"unknown rewards {unknown}; choose from {list(CASES)}")
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    prompts, metadata = load_prompts(args.batch), load_metadata(args.batch)
    geneval_prompts = [m["prompt"] for m in metadata]
    batches = {
        "text": Batch(make_images(prompts, args.size), prompts, [None] * args.batch),
        "geneval": Batch(make_images(geneval_prompts, args.size, seed=1), geneval_prompts, metadata),
    }
    templates = [t.format(color=c, object=o) for t in GE.COLOR_TEMPLATES for c in GE.COLORS for o in GE.OBJECT_NAMES]
    print(f"{cores} cores: JAX ({jax.devices()[0].platform}) and torch ({torch.get_num_threads()} threads) each use all of "
          f"them, in turn; batch {args.batch} x {args.size}x{args.size}, fp32, median of {args.repeats}", flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_rewards_") as tmp:
        ck = Checkpoints(Path(tmp), prompts + geneval_prompts + templates, args.detector_size)
        for reward in chosen:
            batch = batches["geneval" if reward == "geneval" else "text"]
            for name, build in CASES[reward]:
                rows.append(measure(name, build(ck, batch), args.repeats))
                gc.collect()  # the case's models (torch and JAX) go before the next ones are built
                jax.clear_caches()
    print("\n| reward | ours img/s | torch img/s | ours/torch | notes |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
