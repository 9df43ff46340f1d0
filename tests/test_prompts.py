"""Prompt files (the shared prompt sets and malformed files) and the per-step prompt draw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from marble_jax.prompts import Prompt, load_prompts, metadata_problem, prompt_groups
from marble_jax.world import scenes

DATA = Path("/work/shared/data/prompts")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")


@needs_data
@pytest.mark.parametrize(
    "name, count",
    [("drawbench/test.txt", 1000), ("ocr/test.txt", 1018), ("pickscore/test.txt", 2048), ("pickscore/train.txt", 25432)],
)
def test_text_files(name, count):
    path = DATA / name
    prompts = load_prompts(path)
    raw = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(prompts) == count == len(raw)
    assert [p.text for p in prompts] == raw
    assert all(p.metadata is None for p in prompts)


@needs_data
def test_geneval_file():
    path = DATA / "geneval" / "test_metadata.jsonl"
    prompts = load_prompts(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(prompts) == len(rows) == 2212
    assert prompts[0] == Prompt(
        "a photo of two wine glasses",
        {"tag": "counting", "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": "wine glass", "count": 3}]},
    )
    for p, row in zip(prompts, rows, strict=True):
        assert p.text == row.pop("prompt")
        assert p.metadata == row
    tags = {p.metadata["tag"] for p in prompts}
    assert tags == {"single_object", "two_object", "counting", "colors", "color_attr", "position"}
    assert sum("position" in c for p in prompts for c in p.metadata["include"]) == 400


def test_jsonl_prompt_only_and_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    dog = '{"prompt": "a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}'
    path.write_text('{"prompt": " a cat "}\n\n   \n' + dog + "\n")
    assert load_prompts(path) == [
        Prompt("a cat"),
        Prompt("a dog", {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}),
    ]
    txt = tmp_path / "p.txt"
    txt.write_text("  first \n\n\t\nsecond")
    assert load_prompts(txt) == [Prompt("first"), Prompt("second")]


def test_world_metadata_is_valid_geneval():
    """The embedded world's prompts carry metadata the loader's validator accepts."""
    with_meta = [p for p in scenes.all_prompts() if p.metadata is not None]
    assert with_meta
    assert [metadata_problem(p.metadata) for p in with_meta] == [None] * len(with_meta)


GOOD = {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}


def _with(**changes) -> str:
    row = {"prompt": "a dog left of a cat", **GOOD, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not None})


def _position(position) -> str:
    return _with(include=[{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": position}])


def _clause(**changes) -> str:
    clause = {"class": "dog", "count": 1, "color": "red", **changes}
    return _with(include=[{k: v for k, v in clause.items() if v is not None}])


@pytest.mark.parametrize(
    "line, problem",
    [
        ("{not json", "not valid JSON"),
        ('["a cat"]', "expected a JSON object"),
        ('{"tag": "colors"}', "missing or empty 'prompt'"),
        ('{"prompt": "   "}', "missing or empty 'prompt'"),
        ('{"prompt": 3}', "missing or empty 'prompt'"),
        (_with(tag=None), "needs a string 'tag'"),
        (_with(tag=["position"]), "needs a string 'tag'"),
        (_with(tag="positions"), "'tag' 'positions' is not one of"),
        (_with(include=None), "'include' must be a non-empty list"),
        (_with(include=[]), "'include' must be a non-empty list"),
        (_with(include={"class": "dog", "count": 1}), "'include' must be a non-empty list"),
        (_with(exclude={"class": "dog", "count": 1}), "'exclude' must be a list"),
        (_with(include=["dog"]), "include[0] is not an object"),
        (_with(exlude=[]), "unknown keys ['exlude']"),
        (_clause(**{"class": None}), "include[0] needs a non-empty string 'class'"),
        (_clause(count=None), "include[0] needs a positive integer 'count', got None"),
        (_clause(count=0), "positive integer 'count', got 0"),
        (_clause(count=1.5), "positive integer 'count', got 1.5"),
        (_clause(count="2"), "positive integer 'count', got '2'"),
        (_clause(count=True), "positive integer 'count', got True"),
        (_clause(color=3), "'color' must be a non-empty string"),
        (_clause(colour="red"), "include[0] has unknown keys ['colour']"),
        (_position("left of"), "include[1] 'position'"),
        (_position([0, "left of"]), "include[1] 'position'"),
        (_position(["near", 0]), "relation 'near'"),
        (_with(include=[{"class": "cat", "count": 1, "position": ["above", 0]}]), "index 0 must point to an earlier"),
        (_position(["above", 1]), "index 1"),
        (_with(exclude=[{"class": "cat", "count": 0}]), "exclude[0] needs a positive integer 'count'"),
    ],
)
def test_bad_jsonl_rows(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(_with() + "\n\n" + line + "\n" + _with() + "\n")
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    assert f"{path}:3: " in str(err.value)
    assert problem in str(err.value)


def test_good_row_passes():
    """The base row of the bad-row cases is itself valid, so each case fails for its own change."""
    assert metadata_problem(json.loads(_with())) is None
    assert metadata_problem(json.loads(_clause())) is None
    assert metadata_problem(json.loads(_position(["above", 0]))) is None


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")
    for name in ("empty.txt", "empty.jsonl"):
        (tmp_path / name).write_text("\n  \n")
        with pytest.raises(ValueError, match=f"{name} contains no prompts"):
            load_prompts(tmp_path / name)
    (tmp_path / "p.csv").write_text("a cat\n")
    with pytest.raises(ValueError, match=r"'\.csv'.*supported: \.txt, \.jsonl"):
        load_prompts(tmp_path / "p.csv")


@pytest.mark.parametrize("num_prompts, num_available", [(4, 12), (5, 12), (7, 3), (12, 12)])
def test_prompt_groups_cover_each_pass(num_prompts, num_available):
    steps = 3 * num_available  # a whole number of passes for any num_prompts
    walk = np.concatenate([prompt_groups(num_prompts, 7, s, num_available) for s in range(steps)])
    assert walk.dtype == np.int64 and walk.shape == (steps * num_prompts,)
    passes = walk.reshape(-1, num_available)
    assert (np.sort(passes, axis=1) == np.arange(num_available)).all()
    assert len({tuple(p) for p in passes}) > 1  # each pass its own permutation


def test_prompt_groups_deterministic():
    a = prompt_groups(8, 3, 17, 100)
    assert (a == prompt_groups(8, 3, 17, 100)).all()  # the same on resume, with no state carried over
    assert not (a == prompt_groups(8, 4, 17, 100)).all()
    assert not (a == prompt_groups(8, 3, 18, 100)).all()
    assert len(set(a)) == 8
    # step 17 x 8 = 136 starts pass 1 at offset 36: the slice of the second permutation
    assert (a == np.random.default_rng([3, 1]).permutation(100)[36:44]).all()


def test_prompt_groups_bad_args():
    for args in [(0, 0, 0, 10), (4, 0, -1, 10), (4, 0, 0, 0)]:
        with pytest.raises(ValueError, match="num_prompts >= 1"):
            prompt_groups(*args)
