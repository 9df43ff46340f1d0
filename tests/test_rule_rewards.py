"""Reward registry, the OCR formula, GenEval's rules, and the world's rule rewards."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from marble_jax import rewards
from marble_jax.rewards import geneval_rules as G
from marble_jax.rewards.ocr import levenshtein, ocr_score, ocr_scores
from marble_jax.world import rule_rewards as R
from marble_jax.world import scenes as S

GENEVAL_METADATA = Path("/work/shared/data/prompts/geneval/test_metadata.jsonl")


def geneval_rows(tag: str, n: int = 3) -> list[dict]:
    """The first ``n`` rows of ``tag`` in GenEval's metadata file."""
    if not GENEVAL_METADATA.exists():
        pytest.skip(f"{GENEVAL_METADATA} not found")
    rows = [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["tag"] == tag][:n]


def det(name, box=(0, 0, 10, 10), score=0.95, color=None):
    return G.Detection(name, score, tuple(box), color)


def scores(meta, dets, **kw):
    return G.strict_score(meta, dets, **kw), G.partial_score(meta, dets, **kw)


def prompt(text: str) -> S.Prompt:
    return next(p for p in S.all_prompts() if p.text == text)


def scene(text: str, seed: int = 0) -> S.Scene:
    return S.make_scene(prompt(text), np.random.default_rng(seed))


def noisy(images, sigma, seed=0):
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


def blur(images):
    """3x3 [1, 2, 1] / 4 separable blur of ``[B, H, W, 3]``."""
    x = images.astype(np.float64)
    for axis in (1, 2):
        x = ndimage.convolve1d(x, np.array([1, 2, 1]) / 4, axis=axis, mode="nearest")
    return x.round().astype(np.uint8)


# --- registry -------------------------------------------------------------------------------


def test_registry_names_and_unknown():
    assert {"world_geneval", "world_ocr"} <= set(rewards.names()) and rewards.names() == sorted(rewards.names())
    with pytest.raises(KeyError, match="unknown reward 'pickscroe'.*world_geneval.*world_ocr"):
        rewards.get("pickscroe")


def test_registry_validates_inputs():
    fn = rewards.get("world_ocr")
    ok = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(TypeError, match="'world_ocr'.*uint8.*float32"):
        fn(ok.astype(np.float32), ["a", "b"], [None, None])
    with pytest.raises(ValueError, match=r"shape \(2, 32, 32\)"):
        fn(ok[..., 0], ["a", "b"], [None, None])
    with pytest.raises(ValueError, match=r"shape \(2, 32, 32, 4\)"):
        fn(np.zeros((2, 32, 32, 4), np.uint8), ["a", "b"], [None, None])
    with pytest.raises(ValueError, match="2 images, 3 prompts, 2 metadata"):
        fn(ok, ["a", "b", "c"], [None, None])
    with pytest.raises(ValueError, match="2 images, 2 prompts, 1 metadata"):
        fn(ok, ["a", "b"], [None])
    with pytest.raises(TypeError, match="one string"):
        fn(ok[:1], "a", [None])


def test_registry_does_not_import_the_world():
    code = "import sys, marble_jax.rewards as r; r.names(); assert not any(m.startswith('marble_jax.world') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_rewards_nan_where_they_do_not_apply():
    scenes = [scene('a sign that says "cat"'), scene("a red circle"), scene("red and blue shapes")]
    images = S.render_batch(scenes)
    prompts, meta = [s.prompt.text for s in scenes], [s.prompt.metadata for s in scenes]
    for name, opts in (("world_geneval", {}), ("world_geneval", {"strict": True}), ("world_ocr", {})):
        out = rewards.get(name, **opts)(images, prompts, meta)
        assert out.dtype == np.float32 and out.shape == (3,)
        expect = [np.nan, 1.0, np.nan] if name == "world_geneval" else [1.0, np.nan, np.nan]
        np.testing.assert_array_equal(out, expect)
        # applies() says where a NaN would be a fault: exactly the finite entries here
        np.testing.assert_array_equal(rewards.get(name, **opts).applies(prompts, meta), np.isfinite(expect))
    # a reward without its own applies() applies everywhere
    assert rewards.get("world_aesthetic").applies(prompts, meta).tolist() == [True, True, True]


# --- OCR formula ----------------------------------------------------------------------------


def test_ocr_formula():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    p = 'a sign that says "Cat"'
    assert ocr_score("cat", p) == 1.0
    assert ocr_score("C A T", p) == 1.0  # spaces dropped, lower-cased
    assert ocr_score("xxcatxx", p) == 1.0  # substring: dist 0
    assert ocr_score("cot", p) == pytest.approx(1 - 1 / 3)
    assert ocr_score("ca", p) == pytest.approx(1 - 1 / 3)
    assert ocr_score("", p) == 0.0
    assert ocr_score("zzzzzzzzzz", p) == 0.0  # distance capped at len(target)
    assert ocr_score("hithere", 'say "Hi There" now') == 1.0
    assert np.isnan(ocr_score("cat", "a cat")) and np.isnan(ocr_score("cat", 'an empty ""'))
    out = ocr_scores(["cat", "dog"], [p, "plain"])
    assert out.dtype == np.float32 and out[0] == 1 and np.isnan(out[1])
    with pytest.raises(ValueError, match="1 recognised strings for 2 prompts"):
        ocr_scores(["cat"], [p, p])


# --- GenEval rules on hand-written detections ---------------------------------------------


def test_relative_position():
    a, b = (0, 0, 10, 10), (12, 0, 22, 10)
    assert G.relative_position(a, b) == {"left of"} and G.relative_position(b, a) == {"right of"}
    # offset 12, slack 0.6 * (10 + 10) = 12: no relation left.
    assert G.relative_position(a, b, slack=0.6) == set()
    assert G.relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    assert G.relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert G.relative_position(a, a) == set()


def perfect_detections(meta: dict) -> list[G.Detection]:
    """Detections satisfying ``meta``: position subjects 40 px from their target, others apart."""
    offsets = {"left of": (-40, 0), "right of": (40, 0), "above": (0, -40), "below": (0, 40)}
    dets, boxes = [], []
    for i, req in enumerate(meta["include"]):
        if "position" in req:
            rel, j = req["position"]
            x, y = boxes[j][0] + offsets[rel][0], boxes[j][1] + offsets[rel][1]
        else:
            x, y = 100 + 30 * i, 100
        boxes.append((x, y, x + 20, y + 20))
        dets += [
            det(req["class"], (x + 200 * k, y, x + 200 * k + 20, y + 20), 0.95, req.get("color", "red"))
            for k in range(req["count"])
        ]
    return dets


@pytest.mark.parametrize("tag", G.TAGS)
def test_rules_on_real_geneval_rows(tag):
    for meta in geneval_rows(tag):
        dets = perfect_detections(meta)
        assert scores(meta, dets) == (1.0, 1.0), meta["prompt"]
        first, count = meta["include"][0]["class"], meta["include"][0]["count"]
        dropped = [d for d in dets if d is not next(d for d in dets if d.name == first)]
        n_terms = sum(1 + ("color" in r) + ("position" in r) for r in meta["include"])
        if tag == "counting":  # one missing, one extra, one below the counting threshold 0.9
            extra = [*dets, det(first, (500, 500, 520, 520))]
            faint = [dataclasses.replace(d, score=0.85) if d is dropped[0] else d for d in dets]
            assert scores(meta, dropped) == scores(meta, extra) == scores(meta, faint) == (0.0, 1 - 1 / count)
        elif tag == "colors":
            wrong = [dataclasses.replace(dets[0], color="green" if meta["include"][0]["color"] != "green" else "blue")]
            assert scores(meta, wrong) == (0.0, 0.5)
            assert scores(meta, dropped) == (0.0, 0.0)
        elif tag == "color_attr":  # terms: count, colour for each clause
            c1 = meta["include"][1]["color"]
            wrong = [
                dataclasses.replace(d, color="green" if c1 != "green" else "blue") if i == 1 else d for i, d in enumerate(dets)
            ]
            assert scores(meta, wrong) == (0.0, 0.75)
            assert scores(meta, dropped) == (0.0, 0.5)  # [0, 0 | 1, 1]
        elif tag == "position":  # terms: target count, subject count, position
            target, subject = dets
            opposite = (2 * target.box[0] - subject.box[0], 2 * target.box[1] - subject.box[1])
            moved = [target, dataclasses.replace(subject, box=(*opposite, opposite[0] + 20, opposite[1] + 20))]
            assert scores(meta, moved) == (0.0, pytest.approx(2 / 3))
            assert scores(meta, [subject]) == (0.0, pytest.approx(1 / 3))  # target missing: [0, 1, 0]
        else:  # single_object, two_object: one count term per clause
            assert scores(meta, dropped) == (0.0, 1 - 1 / n_terms)


def test_rules_by_hand_on_first_rows():
    count = geneval_rows("counting")[0]
    assert count["prompt"] == "a photo of two wine glasses"
    glasses = [det("wine glass", (30 * i, 0, 30 * i + 20, 20), s) for i, s in enumerate((0.95, 0.92))]
    assert scores(count, [*glasses, det("wine glass", score=0.9)]) == (1.0, 1.0)  # 0.9 is not > 0.9
    assert scores(count, [*glasses, det("wine glass", score=0.91)]) == (0.0, 0.5)  # exclude hit; 1 - 1/2
    # The thresholds are parameters.
    assert scores(count, [*glasses, det("wine glass", score=0.91)], counting_threshold=0.93) == (0.0, 0.5)
    assert scores(count, glasses, counting_threshold=0.93) == (0.0, 0.5)

    colors = geneval_rows("colors")[0]
    assert colors["prompt"] == "a photo of a purple cup"
    # GenEval checks the most confident cup only; the training count term sees 2 cups: max(0, 1 - 1) = 0.
    assert scores(colors, [det("cup", color="purple", score=0.9), det("cup", color="red", score=0.8)]) == (1.0, 0.0)
    assert scores(colors, [det("cup", color="red", score=0.9), det("cup", color="purple", score=0.8)]) == (0.0, 0.0)
    assert scores(colors, [det("cup", color="purple", score=0.9), det("cup", color="red", score=0.2)]) == (1.0, 1.0)

    single = geneval_rows("single_object")[0]
    assert single["prompt"] == "a photo of a bowl"
    assert scores(single, [det("bowl", score=0.3)]) == (0.0, 0.0)  # kept only when score > 0.3
    assert scores(single, [det("bowl", score=0.31)]) == (1.0, 1.0)
    assert scores(single, [det("bowl", score=0.31)], threshold=0.5) == (0.0, 0.0)
    assert scores(single, [det("bowl")] * 3) == (1.0, 0.0)  # 1 - 2/1 clipped at 0
    assert scores(single, [det("bowl")] * 20, threshold=0.3)[1] == 0.0
    assert len(G.group_detections(single, [det("bowl")] * 20)["bowl"]) == 16  # GenEval's max_objects

    pos = geneval_rows("position")[0]
    assert pos["prompt"] == "a photo of a cow right of a laptop"
    # centres (5, 5) and (16, 13): offset (11, 8); slack 0.1 * 20 = 2 -> (9, 6) / 13.6 = (0.66, 0.44).
    laptop, cow = det("laptop", (0, 0, 10, 10)), det("cow", (11, 8, 21, 18))
    assert scores(pos, [laptop, cow]) == (1.0, 1.0)
    # slack 0.3 * 20 = 6 -> (5, 2) / 13.6: dx = 0.37, no relation.
    assert scores(pos, [laptop, cow], position_slack=0.3) == (0.0, pytest.approx(2 / 3))

    attr = geneval_rows("color_attr")[0]
    assert attr["prompt"] == "a photo of a pink handbag and a black scissors"
    dets = [det("handbag", color="pink"), det("scissors", color="white", score=0.9), det("scissors", color="black", score=0.8)]
    assert scores(attr, dets) == (0.0, 0.5)  # [1, 1 | 0 (2 scissors), 0 (count not exact)]

    two = geneval_rows("two_object")[0]
    assert two["prompt"] == "a photo of a bowl and a skis"
    assert scores(two, [det("bowl", score=0.5), det("skis", score=0.29)]) == (0.0, 0.5)


# --- the world's rule rewards ------------------------------------------------------------


def test_detector_and_reader_accuracy_on_the_generators_renders():
    """Ground-truth renders score 1 (strict and partial GenEval, OCR) over 300 scenes, clean and
    with light noise / blur. Measured: 100% in every condition below (and on 800 scenes also with
    noise std 24, Gaussian blur sigma 0.7; 98.5% / 99% at noise std 32)."""
    scenes = S.sample_scenes(11, 300)
    images = S.render_batch(scenes)
    prompts, meta = [s.prompt.text for s in scenes], [s.prompt.metadata for s in scenes]
    gen, gen_strict, ocr = rewards.get("world_geneval"), rewards.get("world_geneval", strict=True), rewards.get("world_ocr")
    has_meta = np.array([m is not None for m in meta])
    has_text = np.array([s.text is not None for s in scenes])
    assert has_meta.sum() > 150 and has_text.sum() > 20
    for name, x in [("clean", images), ("noise8", noisy(images, 8)), ("noise16", noisy(images, 16)), ("blur", blur(images))]:
        g, gs, o = gen(x, prompts, meta), gen_strict(x, prompts, meta), ocr(x, prompts, meta)
        assert np.isnan(g[~has_meta]).all() and np.isnan(o[~has_text]).all()
        accuracy = {"strict": gs[has_meta].mean(), "partial": g[has_meta].mean(), "ocr": o[has_text].mean()}
        assert accuracy == {"strict": 1.0, "partial": 1.0, "ocr": 1.0}, (name, accuracy)


def test_detector_finds_the_ground_truth_objects():
    for s in S.sample_scenes(5, 100, kinds=("counting", "color_attr", "plain")):
        found = sorted((d.name, d.color, d.box, d.score) for d in R.detect(S.render(s)))
        assert found == sorted((a.name, a.color, a.box, 1.0) for a in s.shapes)


def world_scores(images, meta):
    return R.world_geneval(strict=True)(images, [""] * len(meta), meta), R.world_geneval()(images, [""] * len(meta), meta)


def test_world_geneval_wrong_count_colour_position():
    three = scene("three squares")
    meta = three.prompt.metadata
    two = S.render(dataclasses.replace(three, shapes=three.shapes[:2]))
    four = S.render(scene("four squares"))
    strict, partial = world_scores(np.stack([S.render(three), two, four]), [meta] * 3)
    np.testing.assert_allclose(strict, [1, 0, 0])
    np.testing.assert_allclose(partial, [1, 2 / 3, 2 / 3], rtol=1e-6)  # 1 - |n - 3| / 3

    red = scene("a red circle")
    blue = dataclasses.replace(red, shapes=(dataclasses.replace(red.shapes[0], color="blue"),))
    attr = scene("a red circle and a blue bar")
    green_bar = dataclasses.replace(attr, shapes=(attr.shapes[0], dataclasses.replace(attr.shapes[1], color="green")))
    images = np.stack([S.render(blue), S.render(green_bar)])
    strict, partial = world_scores(images, [red.prompt.metadata, attr.prompt.metadata])
    np.testing.assert_allclose(strict, [0, 0])
    np.testing.assert_allclose(partial, [0.5, 0.75])  # [count 1, colour 0]; [1, 1 | 1, 0]

    left = scene("a circle left of a bar")
    mirrored = S.render(left)[:, ::-1]  # shapes are left-right symmetric: now right of
    strict, partial = world_scores(np.stack([S.render(left), mirrored]), [left.prompt.metadata] * 2)
    np.testing.assert_allclose(strict, [1, 0])
    np.testing.assert_allclose(partial, [1, 2 / 3], rtol=1e-6)  # [bar count 1, circle count 1, position 0]


def test_world_ocr_on_renders():
    cat = scene('a sign that says "cat"')
    cot = dataclasses.replace(cat, text="cot")
    blank = np.full((S.IMAGE_SIZE, S.IMAGE_SIZE, 3), S.BACKGROUND, np.uint8)
    images = np.stack([S.render(cat), S.render(cot), blank, S.render(cat)])
    prompts = [cat.prompt.text] * 3 + ["a cat"]
    out = rewards.get("world_ocr")(images, prompts, [None] * 4)
    np.testing.assert_allclose(out[:3], [1.0, 1 - 1 / 3, 0.0])
    assert np.isnan(out[3])
    assert [R.read_text(S.render(scene(f'the word "{w}"', i))) for i, w in enumerate(S.WORDS)] == list(S.WORDS)
    assert R.read_text(blank) == ""
