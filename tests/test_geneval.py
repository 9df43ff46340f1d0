"""The GenEval reward (rewards/geneval.py): rules per tag by hand, metadata errors, and the whole path with a tiny
random Mask2Former and a tiny random CLIP, against transformers' post-processing and a torch zero-shot classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import COCO_LABELS, float64_copy, normalise_bound, rel_err, save_tiny_clip, save_tiny_mask2former, t64, torch_float64
from PIL import Image

from marble_jax.rewards import geneval as GE
from marble_jax.rewards.geneval_rules import Detection

GENEVAL_METADATA = Path("/work/shared/data/prompts/geneval/test_metadata.jsonl")

GENEVAL_SPELLING = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
TEMPLATES = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")  # GenEval's, for the torch side
IMAGE = 64


def metadata_rows() -> list[dict]:
    if not GENEVAL_METADATA.exists():
        pytest.skip(f"{GENEVAL_METADATA} not found")
    return [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines() if line.strip()]


def det(name, box=(0, 0, 10, 10), score=0.95, color=None):
    return Detection(name, score, tuple(float(v) for v in box), color)


def side_by_side(name, n):
    return [det(name, (30 * k, 0, 30 * k + 20, 20)) for k in range(n)]


# --- names -------------------------------------------------------------------------------------


def test_object_names_cover_the_metadata_and_the_detector_labels():
    rows = metadata_rows()
    classes = {c["class"] for r in rows for c in r["include"] + r.get("exclude", [])}
    assert len(set(GE.OBJECT_NAMES)) == 80 and classes == set(GE.OBJECT_NAMES)
    names = GE.geneval_names({str(i): label for i, label in enumerate(COCO_LABELS)}, "det")
    assert [names[i] for i in range(80)] == [GENEVAL_SPELLING.get(label, label) for label in COCO_LABELS]
    assert names[40] == "wine glass" and names[60] == "dining table" and names[64] == "computer mouse"
    with pytest.raises(ValueError, match=r"det: detector labels \['sky', 'wall'\] are not GenEval object names"):
        GE.geneval_names({0: "person", 1: "sky", 2: "wall"}, "det")


# --- rules through score(), one real metadata row per tag -------------------------------------------------
# (tests/test_rule_rewards.py covers perfect / dropped / extra / faint detections on the first rows; these add
# renamed classes, count 3 with a faint extra and an over-count, swapped colours, "above" with a near-miss
# diagonal, distractor classes, and strict-passes-but-partial-does-not.)

CASES = {
    # row 164: three computer keyboards (exclude 4); counting threshold 0.9
    "counting": (
        164,
        [
            # 3 kept, the 0.85 one is below 0.9: exact count, exclude not hit -> strict 1; count term 1 -> 1
            ([*side_by_side("computer keyboard", 3), det("computer keyboard", score=0.85)], 1.0, 1.0),
            # 5 kept: exclude (>= 4) hit -> 0; count term 1 - |5 - 3| / 3 = 1/3
            (side_by_side("computer keyboard", 5), 0.0, 1 / 3),
        ],
    ),
    # row 255: an orange computer mouse; terms [count, colour]
    "colors": (
        255,
        [
            ([det("computer mouse", color="orange", score=0.8), det("cup", color="red")], 1.0, 1.0),  # other classes ignored
            # two orange mice: GenEval checks the top one only -> 1; count 1 - 1/1 = 0 and colour 0 (n != c) -> 0
            ([det("computer mouse", color="orange"), det("computer mouse", color="orange", score=0.5)], 1.0, 0.0),
            # the most confident mouse is brown -> 0; count 0, colour 0 -> 0
            ([det("computer mouse", color="brown"), det("computer mouse", color="orange", score=0.5)], 0.0, 0.0),
        ],
    ),
    # row 5: a purple computer keyboard and a red chair; terms [count, colour | count, colour]
    "color_attr": (
        5,
        [
            ([det("computer keyboard", color="purple"), det("chair", (40, 0, 50, 10), color="red")], 1.0, 1.0),
            # colours swapped -> 0; [1, 0 | 1, 0] -> 0.5
            ([det("computer keyboard", color="red"), det("chair", (40, 0, 50, 10), color="purple")], 0.0, 0.5),
        ],
    ),
    # row 218: a wine glass (clause 1) above a kite (clause 0); terms [kite count, glass count, position]
    "position": (
        218,
        [
            # offset (0, -40), slack 0.1 * 20 = 2 -> (0, -38) / 40: dy = -0.95 < -0.5 -> above
            ([det("kite", (0, 40, 10, 50)), det("wine glass", (0, 0, 10, 10))], 1.0, 1.0),
            # offset (30, -20) -> (28, -18) / 36.06: dx = 0.78 (right of), dy = -0.499 (not above) -> 0; [1, 1, 0]
            ([det("kite", (0, 40, 10, 50)), det("wine glass", (30, 20, 40, 30))], 0.0, 2 / 3),
        ],
    ),
    # row 105: a tv remote
    "single_object": (
        105,
        [
            ([det("tv remote", score=0.5), det("laptop", score=0.99), det("cell phone")], 1.0, 1.0),  # distractors ignored
            ([det("cell phone"), det("tv remote", score=0.3)], 0.0, 0.0),  # the remote is not > 0.3: count 0
        ],
    ),
    # row 16: a computer keyboard and a laptop; terms [count, count]
    "two_object": (
        16,
        [
            ([det("computer keyboard"), det("laptop", (40, 0, 50, 10), score=0.7)], 1.0, 1.0),
            # two keyboards: no exclude clause -> strict 1; [max(0, 1 - 1/1) = 0, 1] -> 0.5
            ([det("computer keyboard"), det("computer keyboard", score=0.8), det("laptop", score=0.7)], 1.0, 0.5),
            ([det("laptop")], 0.0, 0.5),  # keyboard missing -> 0; [0, 1]
        ],
    ),
}


def test_rule_cases_cover_every_tag_of_the_metadata():
    assert set(CASES) == {r["tag"] for r in metadata_rows()}


@pytest.mark.parametrize("tag", sorted(CASES))
def test_rules_by_hand(tag):
    index, cases = CASES[tag]
    meta = metadata_rows()[index]
    assert meta["tag"] == tag
    GE.check_metadata([meta])
    for dets, strict, partial in cases:
        assert GE.score(meta, dets, strict=True) == strict, (meta["prompt"], dets)
        assert GE.score(meta, dets, strict=False) == pytest.approx(partial, abs=1e-12), (meta["prompt"], dets)


def test_bad_metadata_names_the_sample_and_the_field():
    good = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}]}
    GE.check_metadata([None, good])
    bad = [
        ({"tag": "colours", "include": good["include"]}, r"metadata\[1\] has 'tag' 'colours'"),
        ({"tag": "colors", "include": [{"count": 1, "color": "red"}]}, r"metadata\[1\]: include\[0\] has no 'class'"),
        ({"tag": "colors"}, r"metadata\[1\] has 'include' \[\]; expected a non-empty list"),
        ({"tag": "colors", "include": [{"class": "wineglass", "count": 1}]}, r"include\[0\] has 'class' 'wineglass'"),
        ({"tag": "counting", "include": [{"class": "cup", "count": 0}]}, r"include\[0\] has 'count' 0"),
        ({"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "teal"}]}, r"include\[0\] has 'color' 'teal'"),
        (
            {"tag": "position", "include": [{"class": "cup", "count": 1}, {"class": "cat", "count": 1, "position": ["near", 0]}]},
            r"include\[1\] has 'position' \['near', 0\]",
        ),
        (
            {"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["above", 0]}]},
            r"include\[0\] has 'position'",  # must point to an earlier clause
        ),
        ({"tag": "counting", "include": good["include"], "exclude": [{"count": 2}]}, r"exclude\[0\] has no 'class'"),
        ("a photo of a cup", r"metadata\[1\] must be a dict or None, got str"),
    ]
    for meta, message in bad:
        with pytest.raises(ValueError, match=message):
            GE.check_metadata([good, meta])


# --- tiny checkpoints ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    save_tiny_mask2former(root / "detector", IMAGE)
    save_tiny_clip(root / "clip", seed=1, legacy_eos=True, processor={})  # legacy eos_token_id 2: pool at the largest id
    return root / "detector", root / "clip"


def test_missing_checkpoints_name_the_option_and_the_public_checkpoint(checkpoints, tmp_path):
    detector, clip_dir = checkpoints
    with pytest.raises(FileNotFoundError, match=r"detector_path='.*nowhere'.*facebook/mask2former-swin-small-coco-instance"):
        GE.geneval(detector_path=str(tmp_path / "nowhere"), clip_path=str(clip_dir))
    with pytest.raises(FileNotFoundError, match=r"clip_path='.*nowhere'.*openai/clip-vit-large-patch14"):
        GE.load_color_classifier(str(tmp_path / "nowhere"))
    partial = tmp_path / "clip"
    shutil.copytree(clip_dir, partial)
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"clip_path=.* has no preprocessor_config.json; download openai/clip"):
        GE.load_color_classifier(str(partial))


def test_device_auto_is_the_accelerator_when_torch_sees_one(monkeypatch):
    from marble_jax import rewards

    assert rewards.default_options("geneval")["device"] == "auto"  # the config key and its default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert GE.resolve_device("auto") == "cpu"
    assert GE.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"device='cuda': torch sees 0 CUDA devices"):
        GE.resolve_device("cuda")

    class FakeGpu:
        platform, local_hardware_id = "gpu", 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert GE.resolve_device("auto") == "cuda"  # JAX on the CPU here: torch's current GPU
    monkeypatch.setattr(GE.jax, "local_devices", lambda: [FakeGpu()])
    assert GE.resolve_device("auto") == "cuda:2"  # this process's JAX GPU (one process per GPU)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert GE.resolve_device("auto") == "cuda"  # an ordinal torch does not see: its current GPU
    assert GE.resolve_device("cuda:1") == "cuda:1"  # explicit values are kept
    assert GE.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"device='cuda:2': torch sees 2 CUDA devices"):
        GE.resolve_device("cuda:2")
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match=rf"geneval option device={bad!r} is not a torch device; use one of auto, cpu"):
            GE.resolve_device(bad)


def test_detector_device_auto_and_unknown(checkpoints):
    detector, clip_dir = checkpoints
    with pytest.raises(ValueError, match="device='tpu0' is not a torch device"):
        GE.geneval(detector_path=str(detector), clip_path=str(clip_dir), device="tpu0")
    loaded = GE.load_detector(str(detector))  # device "auto": the CPU here, the accelerator where torch sees one
    assert loaded.device == GE.resolve_device("auto")
    assert next(loaded.model.parameters()).device.type == torch.device(loaded.device).type


# --- colour ---------------------------------------------------------------------------------------------


def test_object_crop_and_pixels_match_pil_and_the_clip_processor(checkpoints):
    from transformers import AutoImageProcessor

    _, clip_dir = checkpoints
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[5:30, 8:20] = rng.random((25, 12)) > 0.3
    d = Detection("cup", 0.9, GE.mask_box(mask), mask=mask)
    ys, xs = np.nonzero(mask)
    assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # GenEval: Image.composite(image, Image.new("RGB", size, "#999"), Image.fromarray(mask)).crop(box)
    blank = Image.new("RGB", (50, 40), color="#999")
    ref = Image.composite(Image.fromarray(image), blank, Image.fromarray(mask)).crop(d.box)
    np.testing.assert_array_equal(GE.object_crop(image, d), np.asarray(ref))
    np.testing.assert_array_equal(GE.object_crop(image, det("cup", (3, 4, 9, 7))), image[4:7, 3:9])  # no mask: plain crop

    spec = GE.PixelSpec.from_file(clip_dir / "preprocessor_config.json")
    assert spec.shortest_edge == 32 and spec.crop == (32, 32)
    processor = AutoImageProcessor.from_pretrained(clip_dir, backend="pil")
    mean, std = np.asarray(processor.image_mean, np.float64), np.asarray(processor.image_std, np.float64)

    def reference(images, **options):  # the processor's resized (and cropped) uint8 pixels, normalised in float64
        raw = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np", **options)["pixel_values"]
        return (raw.transpose(0, 2, 3, 1) * processor.rescale_factor - mean) / std

    # our float32 normalisation against the exact one: helpers.normalise_bound, a-priori (1.06e-6)
    bound = normalise_bound(mean, std)
    # Crops whose centre-crop offsets agree between torchvision (round half to even) and transformers (floor):
    # the resized excess is not 3 mod 4 (20x30 -> 32x48: offset 8 both; 64x44 -> 46x32: offset 7 both).
    crops = [rng.integers(0, 256, s + (3,), np.uint8) for s in [(20, 30), (30, 20), (32, 32), (9, 13), (5, 50), (64, 44)]]
    err = np.abs(GE.clip_pixels(crops, spec) - reference(crops)).max()
    print(f"pixels vs float64: {err:.2e}, bound {bound:.2e}")
    assert err < bound
    # 17x40 -> 32x75: horizontal offset round(43 / 2) = 22 (torchvision, GenEval) where transformers takes 43 // 2 = 21.
    crop = rng.integers(0, 256, (17, 40, 3), np.uint8)
    full = reference([crop], do_center_crop=False)[0]
    assert full.shape == (32, 75, 3)
    assert np.abs(GE.clip_pixels([crop], spec)[0] - full[:, 22:54]).max() < bound


def test_classify_colors_matches_torch_clip(checkpoints):
    """Zero-shot colours of our jitted Flax CLIP vs transformers' CLIPModel: GenEval's three templates per colour, unit
    text embeddings averaged and renormalised, cosine with the unit image embedding, argmax."""
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    _, clip_dir = checkpoints
    classifier = GE.load_color_classifier(str(clip_dir), batch_size=4)
    rng = np.random.default_rng(1)
    shapes = [(20, 30), (30, 20), (32, 32), (9, 13), (5, 50), (64, 44), (12, 12)]
    palette = np.array([[220, 30, 30], [30, 30, 220], [240, 240, 240], [20, 20, 20], [250, 150, 0], [120, 60, 20], [30, 200, 60]])
    crops = [np.clip(palette[k] + rng.normal(0, 20, s + (3,)), 0, 255).astype(np.uint8) for k, s in enumerate(shapes)]
    names = ["wine glass", "dining table", "computer mouse", "wine glass", "cup", "dining table", "cup"]
    ours = GE.color_scores(classifier, crops, names)
    colors = GE.classify_colors(classifier, crops, names)

    model = float64_copy(CLIPModel.from_pretrained(clip_dir))
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    processor = AutoImageProcessor.from_pretrained(clip_dir, backend="pil")
    raw = processor(images=crops, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    mean, std = (np.asarray(v, np.float64)[:, None, None] for v in (processor.image_mean, processor.image_std))
    pixels = t64((raw * processor.rescale_factor - mean) / std)  # the processor's pixels, normalised in float64
    with torch.no_grad(), torch_float64():
        classes = {}
        for name in set(names):
            texts = [t.format(c=c, o=name) for c in GE.COLORS for t in TEMPLATES]
            ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
            text = F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)
            classes[name] = F.normalize(text.reshape(len(GE.COLORS), len(TEMPLATES), -1).mean(1), dim=-1)
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        ref = torch.stack([classes[n] @ image[k] for k, n in enumerate(names)]).numpy()
    err = rel_err(ours, ref)
    print(f"colour cosines vs float64: rel err {err:.2e}")
    assert err < 1e-5  # float32 parity against transformers in float64: measured 3.6e-7, >= 27x
    assert colors == [GE.COLORS[k] for k in ref.argmax(1)]
    assert len(set(colors)) > 1  # the random model does not answer one colour for everything
    assert GE.classify_colors(classifier, [], []) == []


# --- the whole path ---------------------------------------------------------------------------------------


def reference_detections(detector_dir: Path, images: np.ndarray, batch: int) -> list[list[tuple]]:
    """(name, score, box, mask) per instance from transformers' model + post-processing, boxes from np.nonzero."""
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(detector_dir).eval()
    processor = AutoImageProcessor.from_pretrained(detector_dir, backend="pil")
    out = []
    for start in range(0, len(images), batch):
        chunk = list(images[start : start + batch])
        with torch.no_grad():
            outputs = model(**processor(images=chunk, return_tensors="pt"))
        results = processor.post_process_instance_segmentation(
            outputs, threshold=0.3, target_sizes=[(IMAGE, IMAGE)] * len(chunk), return_binary_maps=True
        )
        for r in results:
            dets, masks = [], r["segmentation"].numpy().astype(bool) if r["segments_info"] else []
            for s, m in zip(r["segments_info"], masks, strict=True):
                ys, xs = np.nonzero(m)
                label = COCO_LABELS[s["label_id"]]
                box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                dets.append((GENEVAL_SPELLING.get(label, label), s["score"], box, m))
            out.append(dets)
    return out


def test_whole_path_with_tiny_models(checkpoints):
    """The factory on 5 images (one without metadata), with metadata written from what the random detector finds, so
    that the expected scores can be stated by hand; then the pieces against transformers and the rules."""
    from collections import Counter

    detector_dir, clip_dir = checkpoints
    rng = np.random.default_rng(0)
    images = np.repeat(np.repeat(rng.integers(0, 256, (5, 8, 8, 3), np.uint8), 8, axis=1), 8, axis=2)  # 8x8 blocks
    prompts = ["p"] * 5
    with_meta = [0, 2, 3, 4]  # image 1 has no metadata
    sub = images[with_meta]

    # Detections the rules see = transformers' post-processing, renamed, boxes from the masks (same batches of 2).
    # On the CPU, as the reference: exact comparisons (on a GPU, TF32 convolutions move the scores).
    detections = GE.detect(GE.load_detector(str(detector_dir), device="cpu", batch_size=2), sub)
    expected = reference_detections(detector_dir, sub, batch=2)
    for ours, ref in zip(detections, expected, strict=True):
        assert [(d.name, d.score, d.box) for d in ours] == [(n, s, tuple(float(v) for v in b)) for n, s, b, _ in ref]
        for d, (_, _, _, m) in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(d.mask, m)
    assert {d.name for dets in detections for d in dets} >= {"computer mouse", "dining table", "cup"}  # renamed "mouse"
    counts = [Counter(n for n, s, _, _ in ref if s > 0.3) for ref in expected]  # kept by GenEval's threshold
    assert len(counts[0]) >= 2 and max(counts[1].values()) >= 2 and counts[2] and "zebra" not in counts[3]

    (a, na), (b, nb) = counts[0].most_common(2)
    many = counts[1].most_common(1)[0][0]
    c, nc = counts[2].most_common(1)[0]
    classifier = GE.load_color_classifier(str(clip_dir), batch_size=2)
    kept_c = sorted((d for d in detections[2] if d.name == c and d.score > 0.3), key=lambda d: -d.score)
    colors_c = GE.classify_colors(classifier, [GE.object_crop(sub[2], d) for d in kept_c], [c] * nc)
    k = colors_c.count(colors_c[0])
    metadata = [
        # exact counts of both classes: (strict 1, partial 1)
        {"tag": "two_object", "include": [{"class": a, "count": na}, {"class": b, "count": nb}]},
        None,
        # one object asked, n >= 2 found: the top one is there -> strict 1; count term max(0, 1 - (n - 1)) = 0
        {"tag": "single_object", "include": [{"class": many, "count": 1}]},
        # the colour of the most confident one, k of the nc kept have it: strict k == nc; partial (1 + k / nc) / 2
        {"tag": "colors", "include": [{"class": c, "count": nc, "color": colors_c[0]}]},
        # nothing found: (0, 0)
        {"tag": "single_object", "include": [{"class": "zebra", "count": 1}]},
    ]
    paths = dict(detector_path=str(detector_dir), clip_path=str(clip_dir), device="cpu", batch_size=2)
    reward, strict = GE.geneval(**paths), GE.geneval(**paths, strict=True)
    partial_out, strict_out = reward(images, prompts, metadata), strict(images, prompts, metadata)
    print(f"partial {partial_out}, strict {strict_out}; colours of {nc} {c}: {colors_c}")
    for out in (partial_out, strict_out):
        assert out.dtype == np.float32 and out.shape == (5,)
    np.testing.assert_array_equal(strict_out, np.float32([1, np.nan, 1, k == nc, 0]))
    np.testing.assert_allclose(partial_out, np.float32([1, np.nan, 0, (1 + k / nc) / 2, 0]), rtol=1e-6)
    assert reward.applies(prompts, metadata).tolist() == [True, False, True, True, True]
    with pytest.raises(ValueError, match=r"metadata\[3\]: include\[0\] has no 'class'"):
        reward(images, prompts, [None, None, None, {"tag": "single_object", "include": [{"count": 1}]}, None])

    # Colours go on exactly the kept detections of classes with a colour clause; the reward is the rules on them.
    metas = [metadata[i] for i in with_meta]
    colored = GE.label_colors(classifier, sub, metas, detections)
    for meta, dets in zip(metas, colored, strict=True):
        wanted = {c["class"] for c in meta["include"] if "color" in c}
        assert all((d.color in GE.COLORS) == (d.name in wanted and d.score > 0.3) for d in dets)
    assert [d.color for d in sorted(colored[2], key=lambda d: -d.score) if d.color] == colors_c
    pairs = list(zip(metas, colored, strict=True))
    np.testing.assert_array_equal(partial_out[with_meta], [GE.score(m, d, strict=False) for m, d in pairs])
    np.testing.assert_array_equal(strict_out[with_meta], [GE.score(m, d, strict=True) for m, d in pairs])
