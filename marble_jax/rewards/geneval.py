"""The GenEval reward: a Mask2Former detector and a CLIP colour classifier feeding :mod:`geneval_rules`.

As GenEval's ``evaluation/evaluate_images.py`` (and Flow-GRPO's reward server, a copy of it) does:

* **Detection**: Mask2Former Swin-S on COCO instances. Here transformers' PyTorch port
  (``facebook/mask2former-swin-small-coco-instance``, eval mode, ``torch.no_grad``) with its image
  processor and ``post_process_instance_segmentation`` (one binary mask per instance at the image's
  size); GenEval runs the mmdetection checkpoint, whose post-processing is the same (softmax class
  scores x mean mask probability, top 100 (query, class) pairs, masks = logits > 0) but whose input
  resolution and mask upsampling differ (transformers upsamples the mask logits to 384 x 384,
  thresholds, then resizes the binary masks to the image by nearest neighbour). Each instance
  becomes a :class:`Detection`: the detector's COCO label renamed to GenEval's object name
  (:data:`COCO_RENAMES`), the score, the mask and its bounding box ``(x0, y0, x1 + 1, y1 + 1)``
  (mmdetection's ``mask2bbox``, which GenEval's boxes come from). The detector runs on the accelerator
  when torch sees one (``device="auto"``, :func:`resolve_device`), as GenEval runs it; there torch's
  default TF32 convolutions and other kernels move the scores by float rounding, so a detection at a
  threshold may differ from a CPU run.
* **Filtering** (in the rules): per class keep scores ``> 0.3`` (``> 0.9`` for counting prompts),
  most confident first, at most 16; no NMS.
* **Colour**: for the kept detections of every class with a colour clause, the image with the pixels
  outside the mask set to ``#999`` (GenEval's ``bgcolor``), cropped to the box, preprocessed as
  open_clip's CLIP transform (bicubic resize of the shorter side, centre crop with torchvision's
  rounding, normalisation; sizes and constants from the CLIP directory's
  ``preprocessor_config.json``) and classified zero-shot by CLIP-L/14 among :data:`COLORS`: per
  colour, the mean of the unit text embeddings of :data:`COLOR_TEMPLATES` (clip_benchmark's
  ``zero_shot_classifier``), renormalised; the colour of largest cosine with the unit image
  embedding. Our Flax CLIP, jitted, fp32 (GenEval runs it under CUDA autocast).
* **Score**: :func:`geneval_rules.strict_score` (GenEval's correctness, evaluation) or
  :func:`geneval_rules.partial_score` (Flow-GRPO's training reward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from marble_jax.models import clip
from marble_jax.models.convert import load_clip_model
from marble_jax.models.weights import read_config, resolve_dir
from marble_jax.rewards.geneval_rules import RELATIONS, TAGS, Box, Detection, group_detections, partial_score, strict_score

DETECTOR = "facebook/mask2former-swin-small-coco-instance"
CLIP_MODEL = "openai/clip-vit-large-patch14"

# GenEval's evaluate_images.py options (its defaults).
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_SLACK = 0.1

# GenEval's object_names.txt: the 80 COCO instance classes in COCO order, three of them renamed.
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# The detector's COCO labels (transformers' coco-detection-mmdet-id2label.json) that GenEval spells differently.
COCO_RENAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {color} {object}", "a photo of a {color}-colored {object}", "a photo of a {color} object")
BACKGROUND = (153, 153, 153)  # GenEval's bgcolor "#999"


def _model_dir(path: str, option: str, public: str, files: Sequence[str | tuple[str, ...]]) -> Path:
    """``resolve_dir(path)``, checked to hold each of ``files`` (a tuple: any of its names; globs allowed).

    Raises:
      FileNotFoundError: naming the option, the path, what is missing and the public checkpoint.
    """
    fix = f"download {public} there (or into the Hugging Face cache and pass its repo id)"
    try:
        d = resolve_dir(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"geneval option {option}={path!r}: {e}; {fix}") from None
    for names in files:
        names = (names,) if isinstance(names, str) else names
        if not any(any(d.glob(n)) for n in names):
            raise FileNotFoundError(f"geneval option {option}={path!r}: {d} has no {' or '.join(names)}; {fix}")
    return d


# ---------------------------------------------------------------- detection


def geneval_names(id2label: Mapping[Any, str], source: str) -> dict[int, str]:
    """Detector label id -> GenEval object name (:data:`COCO_RENAMES` applied).

    Raises:
      ValueError: naming ``source`` and the labels that are not GenEval object names.
    """
    names = {int(i): COCO_RENAMES.get(label, label) for i, label in id2label.items()}
    unknown = sorted(label for i, label in id2label.items() if names[int(i)] not in OBJECT_NAMES)
    if unknown:
        raise ValueError(f"{source}: detector labels {unknown} are not GenEval object names (a COCO instance detector is needed)")
    return names


def mask_box(mask: np.ndarray) -> Box:
    """``(x0, y0, x1 + 1, y1 + 1)`` of the True pixels of a non-empty ``[H, W]`` mask (mmdetection's ``mask2bbox``)."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def detections_from_outputs(
    processor, outputs, names: Mapping[int, str], image_sizes: Sequence[tuple[int, int]], threshold: float = THRESHOLD
) -> list[list[Detection]]:
    """Per image, the instances of transformers' ``post_process_instance_segmentation`` scoring ``>= threshold``
    (scores as it reports them, rounded to 6 decimals), in its order.

    Args:
      processor: the detector's image processor.
      outputs: ``Mask2FormerForUniversalSegmentation`` outputs for ``B`` images.
      names: label id -> GenEval object name (:func:`geneval_names`).
      image_sizes: ``B`` ``(H, W)``: the masks are resized to these.
      threshold: lowest score kept (the rules filter again, with ``>`` and their own thresholds).
    """
    results = processor.post_process_instance_segmentation(
        outputs, threshold=threshold, target_sizes=[tuple(s) for s in image_sizes], return_binary_maps=True
    )
    out = []
    for result in results:
        segments = result["segments_info"]
        masks = result["segmentation"].cpu().numpy().astype(bool) if segments else []
        pairs = zip(segments, masks, strict=True)
        out.append([Detection(names[s["label_id"]], float(s["score"]), mask_box(m), mask=m) for s, m in pairs])
    return out


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(device: str = "auto") -> str:
    """The torch device of the detector: ``"auto"`` is the accelerator when torch sees CUDA, else ``"cpu"``;
    other values (``"cpu"``, ``"cuda"``, ``"cuda:1"``, any torch device string) are kept.

    With CUDA, ``"auto"`` is ``"cuda:N"`` for the GPU of this process's first local JAX device when JAX runs
    on GPUs (one process per GPU then puts each detector on its own GPU, not all on GPU 0), else ``"cuda"``.

    Raises:
      ValueError: naming the option, for a string that is not a torch device, or a CUDA device torch
        does not see.
    """
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        ordinal = _jax_gpu_ordinal()
        return f"cuda:{ordinal}" if ordinal is not None and ordinal < torch.cuda.device_count() else "cuda"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"geneval option device={device!r} is not a torch device; use one of {', '.join(DEVICES)}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"geneval option device={device!r}: torch sees {count} CUDA devices; use 'auto' or 'cpu'")
    return device


def _jax_gpu_ordinal() -> int | None:
    """The CUDA ordinal of this process's first local JAX device when it is a GPU, else None."""
    device = jax.local_devices()[0]
    return getattr(device, "local_hardware_id", None) if device.platform == "gpu" else None


@dataclasses.dataclass(frozen=True)
class Detector:
    """A loaded Mask2Former: the torch model (eval mode, on ``device``), its image processor, label id -> name."""

    model: Any
    processor: Any
    names: dict[int, str]
    device: str
    batch_size: int


def load_detector(path: str = DETECTOR, device: str = "auto", batch_size: int = 8) -> Detector:
    """A transformers ``Mask2FormerForUniversalSegmentation`` directory (or HF-cache repo id) with its image processor,
    on ``device`` (:func:`resolve_device`).

    Raises:
      FileNotFoundError: for a missing directory or file, naming ``detector_path`` and :data:`DETECTOR`.
      ValueError: when its labels are not GenEval's object names, or for an unknown device.
    """
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    device = resolve_device(device)
    weights = ("model*.safetensors", "pytorch_model*.bin")
    d = _model_dir(path, "detector_path", DETECTOR, ["config.json", "preprocessor_config.json", weights])
    model = Mask2FormerForUniversalSegmentation.from_pretrained(d).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(d, backend="pil")
    return Detector(model, processor, geneval_names(model.config.id2label, str(d)), device, batch_size)


def detect(detector: Detector, images: np.ndarray, threshold: float = THRESHOLD) -> list[list[Detection]]:
    """uint8 ``[B, H, W, 3]`` -> per image its detections (:func:`detections_from_outputs`), ``batch_size`` at a time."""
    import torch

    out = []
    for start in range(0, len(images), detector.batch_size):
        batch = images[start : start + detector.batch_size]
        inputs = detector.processor(images=list(batch), return_tensors="pt").to(detector.device)
        with torch.no_grad():
            outputs = detector.model(**inputs)
        out += detections_from_outputs(detector.processor, outputs, detector.names, [b.shape[:2] for b in batch], threshold)
    return out


# ---------------------------------------------------------------- colour


def object_crop(image: np.ndarray, det: Detection, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> the crop of ``det.box`` with the pixels outside ``det.mask`` (if any) set to ``background``
    (GenEval: ``Image.composite(image, blank, mask).crop(box)``)."""
    if det.mask is not None:
        image = np.where(det.mask[..., None], image, np.asarray(background, np.uint8))
    x0, y0, x1, y1 = (int(round(v)) for v in det.box)
    return image[y0:y1, x0:x1]


@dataclasses.dataclass(frozen=True)
class PixelSpec:
    """The CLIP transform: shorter side -> ``shortest_edge`` (PIL ``resample``), centre crop ``crop``, ``x * rescale``
    normalised by ``mean`` / ``std``."""

    shortest_edge: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_file(cls, path: Path) -> PixelSpec:
        """From a transformers ``preprocessor_config.json`` (``size`` / ``crop_size`` as ints or dicts)."""
        c = read_config(path.parent, path.name)
        size, crop = c.get("size", 224), c.get("crop_size", 224)
        size = size if isinstance(size, int) else size["shortest_edge"]
        crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        if max(crop) > size:
            raise ValueError(f"{path}: crop_size {crop} larger than the resized shorter side {size} is not supported")
        mean, std = tuple(c["image_mean"]), tuple(c["image_std"])
        return cls(size, crop, mean, std, c.get("rescale_factor", 1 / 255), c.get("resample", Image.Resampling.BICUBIC))


def clip_pixels(crops: Sequence[np.ndarray], spec: PixelSpec) -> np.ndarray:
    """uint8 crops ``[h, w, 3]`` (any sizes) -> normalised float32 ``[N, crop_h, crop_w, 3]``, as open_clip's
    ``Resize(shortest_edge, bicubic), CenterCrop(crop)`` on PIL images: new long side ``int(size * long / short)``,
    crop offset ``round((resized - crop) / 2)``."""
    ch, cw = spec.crop
    out = np.empty((len(crops), ch, cw, 3), np.float32)
    for k, crop in enumerate(crops):
        h, w = crop.shape[:2]
        short = spec.shortest_edge
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # PIL (width, height)
        resized = np.asarray(Image.fromarray(crop).resize(size, spec.resample))
        top, left = int(round((size[1] - ch) / 2)), int(round((size[0] - cw) / 2))
        out[k] = resized[top : top + ch, left : left + cw].astype(np.float32) * np.float32(spec.rescale)
    return (out - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


@dataclasses.dataclass(frozen=True)
class ColorClassifier:
    """A loaded CLIP with its tokenizer and pixel transform; ``text_fn`` / ``image_fn`` are the jitted towers."""

    model: clip.CLIP
    tokenizer: Any
    text_length: int
    pixels: PixelSpec
    batch_size: int
    text_fn: Callable
    image_fn: Callable
    _classes: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def load_color_classifier(path: str = CLIP_MODEL, batch_size: int = 8) -> ColorClassifier:
    """A transformers ``CLIPModel`` directory (or HF-cache repo id) with its tokenizer and ``preprocessor_config.json``.

    Raises:
      FileNotFoundError: for a missing directory or file, naming ``clip_path`` and :data:`CLIP_MODEL`.
    """
    from transformers import CLIPTokenizer

    weights = ("model*.safetensors", "pytorch_model.bin")
    tokenizer_files = ("tokenizer.json", "vocab.json")
    d = _model_dir(path, "clip_path", CLIP_MODEL, ["config.json", "preprocessor_config.json", tokenizer_files, weights])
    model = load_clip_model(d)
    text_length = read_config(d)["text_config"].get("max_position_embeddings", 77)
    return ColorClassifier(
        model=model,
        tokenizer=CLIPTokenizer.from_pretrained(d),
        text_length=text_length,
        pixels=PixelSpec.from_file(d / "preprocessor_config.json"),
        batch_size=batch_size,
        text_fn=jax.jit(lambda p, ids: model.text[0](p, ids)["text_embeds"]),
        image_fn=jax.jit(lambda p, x: model.vision[0](p, x)["image_embeds"]),
    )


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def color_embeddings(classifier: ColorClassifier, object_name: str) -> jax.Array:
    """Unit ``[len(COLORS), P]``: per colour the renormalised mean of the unit embeddings of :data:`COLOR_TEMPLATES`
    (cached per object name)."""
    if object_name not in classifier._classes:
        texts = [t.format(color=c, object=object_name) for c in COLORS for t in COLOR_TEMPLATES]
        ids = classifier.tokenizer(texts, padding="max_length", max_length=classifier.text_length, truncation=True)["input_ids"]
        emb = _unit(classifier.text_fn(classifier.model.text[1], np.asarray(ids, np.int32)))
        classifier._classes[object_name] = _unit(emb.reshape(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1))
    return classifier._classes[object_name]


def color_scores(classifier: ColorClassifier, crops: Sequence[np.ndarray], object_names: Sequence[str]) -> np.ndarray:
    """float32 ``[N, len(COLORS)]``: cosine of each crop's CLIP image embedding with its object's colour embeddings."""
    if not crops:
        return np.zeros((0, len(COLORS)), np.float32)
    pixels = clip_pixels(crops, classifier.pixels)
    n, b = len(pixels), classifier.batch_size
    padded = np.concatenate([pixels, np.zeros(((-n) % b, *pixels.shape[1:]), np.float32)])
    images = jnp.concatenate([_unit(classifier.image_fn(classifier.model.vision[1], padded[i : i + b])) for i in range(0, n, b)])
    classes = jnp.stack([color_embeddings(classifier, name) for name in object_names])
    return np.asarray(jnp.einsum("np,ncp->nc", images[:n], classes), np.float32)


def classify_colors(classifier: ColorClassifier, crops: Sequence[np.ndarray], object_names: Sequence[str]) -> list[str]:
    """The zero-shot colour (one of :data:`COLORS`) of each uint8 crop (:func:`object_crop`) of the named object."""
    return [COLORS[k] for k in np.argmax(color_scores(classifier, crops, object_names), axis=-1)]


def label_colors(
    classifier: ColorClassifier, images: np.ndarray, metadata: Sequence[Mapping], detections: Sequence[Sequence[Detection]]
) -> list[list[Detection]]:
    """``detections`` with ``color`` set on the kept detections (the rules' filtering) of each class that has a
    colour clause in its image's metadata; one batched classification for all images."""
    jobs = []  # (image index, detection)
    for i, (meta, dets) in enumerate(zip(metadata, detections, strict=True)):
        kept = group_detections(meta, dets, threshold=THRESHOLD, counting_threshold=COUNTING_THRESHOLD, max_objects=MAX_OBJECTS)
        classes = {req["class"] for req in meta["include"] if "color" in req}
        jobs += [(i, d) for name in sorted(classes) for d in kept.get(name, [])]
    colors = classify_colors(classifier, [object_crop(images[i], d) for i, d in jobs], [d.name for _, d in jobs])
    colored = {(i, id(d)): dataclasses.replace(d, color=c) for (i, d), c in zip(jobs, colors, strict=True)}
    return [[colored.get((i, id(d)), d) for d in dets] for i, dets in enumerate(detections)]


# ---------------------------------------------------------------- rules and the reward


def _clause_error(clause: Any, j: int, exclude: bool) -> str | None:
    """What is wrong with include / exclude clause ``j``, or None."""
    if not isinstance(clause, Mapping):
        return f"is not a dict ({clause!r})"
    if "class" not in clause:
        return "has no 'class'"
    if clause["class"] not in OBJECT_NAMES:
        return f"has 'class' {clause['class']!r}, not one of GenEval's 80 object names"
    count = clause.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return f"has 'count' {count!r}; expected a positive integer"
    if exclude:
        return None
    if "color" in clause and clause["color"] not in COLORS:
        return f"has 'color' {clause['color']!r}; expected one of {list(COLORS)}"
    if "position" in clause:
        pos = clause["position"]
        ok = isinstance(pos, Sequence) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)
        if not ok or not 0 <= pos[1] < j:
            return f"has 'position' {pos!r}; expected [relation in {list(RELATIONS)}, index of an earlier include clause]"
    return None


def check_metadata(metadata: Sequence[Mapping | None]) -> None:
    """Raises ValueError naming the sample index and the field when a non-None entry is not GenEval metadata
    (``tag`` in :data:`TAGS`, a non-empty ``include`` list of ``{class, count, color?, position?}`` clauses,
    an optional ``exclude`` list of ``{class, count}``)."""
    for i, meta in enumerate(metadata):
        if meta is None:
            continue
        where = f"geneval metadata[{i}]"
        if not isinstance(meta, Mapping):
            raise ValueError(f"{where} must be a dict or None, got {type(meta).__name__}")
        if meta.get("tag") not in TAGS:
            raise ValueError(f"{where} has 'tag' {meta.get('tag')!r}; expected one of {list(TAGS)}")
        for field in ("include", "exclude"):
            clauses = meta.get(field, [])
            if not isinstance(clauses, list) or (field == "include" and not clauses):
                raise ValueError(f"{where} has {field!r} {clauses!r}; expected a {'non-empty ' * (field == 'include')}list")
            for j, clause in enumerate(clauses):
                error = _clause_error(clause, j, exclude=field == "exclude")
                if error:
                    raise ValueError(f"{where}: {field}[{j}] {error}")


def score(metadata: Mapping, detections: Sequence[Detection], strict: bool) -> float:
    """GenEval's strict correctness (``strict``) or the partial training score of one image, with GenEval's options."""
    rule = strict_score if strict else partial_score
    return rule(
        metadata,
        detections,
        threshold=THRESHOLD,
        counting_threshold=COUNTING_THRESHOLD,
        position_slack=POSITION_SLACK,
        max_objects=MAX_OBJECTS,
    )


def geneval(
    detector_path: str = DETECTOR, clip_path: str = CLIP_MODEL, strict: bool = False, device: str = "auto", batch_size: int = 8
):
    """The GenEval reward: partial score for training, strict correctness with ``strict=True``; NaN without metadata.

    Args:
      detector_path: Mask2Former directory or HF-cache repo id (:data:`DETECTOR`).
      clip_path: CLIP-L/14 directory or HF-cache repo id (:data:`CLIP_MODEL`).
      strict: GenEval's 0/1 correctness instead of the partial score.
      device: torch device of the detector: ``"auto"`` (the GPU when torch sees CUDA, else the CPU;
        :func:`resolve_device`), ``"cpu"``, ``"cuda"``, ``"cuda:N"``. The colour CLIP is JAX, on JAX's device.
      batch_size: images per detector call and crops per CLIP call.
    """
    detector = load_detector(detector_path, device=device, batch_size=batch_size)
    classifier = load_color_classifier(clip_path, batch_size=batch_size)

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping | None]) -> np.ndarray:
        """float32 ``[B]`` GenEval scores in [0, 1] of uint8 ``[B, H, W, 3]`` images, NaN where metadata is None."""
        check_metadata(metadata)
        out = np.full(len(images), np.nan, np.float32)
        rows = [i for i, meta in enumerate(metadata) if meta is not None]
        if rows:
            metas = [metadata[i] for i in rows]
            dets = label_colors(classifier, images[rows], metas, detect(detector, images[rows]))
            out[rows] = [score(m, d, strict) for m, d in zip(metas, dets, strict=True)]
        return out

    reward_fn.applies = _applies
    return reward_fn


def _applies(prompts: Sequence[str], metadata: Sequence[Mapping | None]) -> np.ndarray:
    """bool ``[B]``: where the sample has GenEval metadata."""
    return np.array([meta is not None for meta in metadata], bool)
