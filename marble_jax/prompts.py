"""Prompt sets for training and evaluation, and the per-step prompt draw.

* :func:`load_prompts` reads ``.txt`` (one prompt per line) or ``.jsonl`` (one object per line with
  ``"prompt"`` and optionally GenEval metadata: ``tag``, ``include``, ``exclude``, the format of GenEval's
  ``test_metadata.jsonl`` described in :mod:`marble_jax.rewards.geneval_rules`). Every row is validated;
  errors name the file and the 1-based line.
* :func:`prompt_groups` gives the prompt indices of a training step: an epoch-wise permutation walk that
  depends only on ``(seed, step)``, so a resumed run draws the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from marble_jax.rewards.geneval_rules import RELATIONS, TAGS

SUFFIXES = (".txt", ".jsonl")
_METADATA_KEYS = ("tag", "include", "exclude")
_CLAUSE_KEYS = ("class", "count", "color", "position")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt and its GenEval metadata (``{"tag", "include", "exclude"?}``) or None."""

    text: str
    metadata: dict | None = None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _clause_problem(clause, where: str, index: int) -> str | None:
    """What is wrong with GenEval clause number ``index`` of ``where`` (include / exclude), or None."""
    name = f"{where}[{index}]"
    if not isinstance(clause, dict):
        return f"{name} is not an object: {clause!r}"
    unknown = sorted(set(clause) - set(_CLAUSE_KEYS))
    if unknown:
        return f"{name} has unknown keys {unknown} (known: {list(_CLAUSE_KEYS)})"
    if not isinstance(clause.get("class"), str) or not clause["class"]:
        return f"{name} needs a non-empty string 'class', got {clause.get('class')!r}"
    if not _is_int(clause.get("count")) or clause["count"] < 1:
        return f"{name} needs a positive integer 'count', got {clause.get('count')!r}"
    if "color" in clause and (not isinstance(clause["color"], str) or not clause["color"]):
        return f"{name} 'color' must be a non-empty string, got {clause['color']!r}"
    if "position" in clause:
        pos = clause["position"]
        if not (isinstance(pos, list) and len(pos) == 2 and isinstance(pos[0], str) and _is_int(pos[1])):
            return f"{name} 'position' must be [relation, clause index], got {pos!r}"
        if pos[0] not in RELATIONS:
            return f"{name} 'position' relation {pos[0]!r} is not one of {list(RELATIONS)}"
        if where != "include" or not 0 <= pos[1] < index:
            return f"{name} 'position' index {pos[1]} must point to an earlier include clause"
    return None


def metadata_problem(metadata: dict) -> str | None:
    """What is wrong with GenEval ``metadata`` (a description), or None when it is valid. A ``"prompt"`` key,
    as in GenEval's own rows, is allowed."""
    unknown = sorted(set(metadata) - {"prompt", *_METADATA_KEYS})
    if unknown:
        return f"unknown keys {unknown} (known: {['prompt', *_METADATA_KEYS]})"
    if not isinstance(metadata.get("tag"), str):
        return f"metadata needs a string 'tag', got {metadata.get('tag')!r}"
    if metadata["tag"] not in TAGS:
        return f"'tag' {metadata['tag']!r} is not one of {list(TAGS)}"
    for where in ("include", "exclude"):
        clauses = metadata.get(where, [])
        if not isinstance(clauses, list) or (where == "include" and not clauses):
            return f"'{where}' must be a {'non-empty ' if where == 'include' else ''}list of clauses, got {clauses!r}"
        for i, clause in enumerate(clauses):
            problem = _clause_problem(clause, where, i)
            if problem:
                return problem
    return None


def _parse_jsonl_row(line: str) -> Prompt | str:
    """The prompt of one ``.jsonl`` row, or a description of what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    text = row.pop("prompt", None)
    if not isinstance(text, str) or not text.strip():
        return f"missing or empty 'prompt' string, got {text!r}"
    if not row:
        return Prompt(text.strip())
    return metadata_problem(row) or Prompt(text.strip(), row)


def load_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a ``.txt`` file (one per line, blank lines skipped) or a ``.jsonl`` file (one
    ``{"prompt": ..., "tag"?, "include"?, "exclude"?}`` object per line, blank lines skipped)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported prompt file extension {path.suffix!r} (supported: {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(Prompt(line.strip()))
            continue
        parsed = _parse_jsonl_row(line)
        if isinstance(parsed, str):
            raise ValueError(f"{path}:{lineno}: {parsed}")
        prompts.append(parsed)
    if not prompts:
        raise ValueError(f"prompt file {path} contains no prompts")
    return prompts


def prompt_groups(num_prompts: int, seed: int, step: int, num_available: int) -> np.ndarray:
    """int64 ``[num_prompts]`` indices into ``num_available`` prompts for training step ``step``.

    The concatenation of permutations ``default_rng([seed, p]).permutation(num_available)``, p = 0, 1, ...
    sliced at ``[step * num_prompts, (step + 1) * num_prompts)``: every prompt is drawn once per pass,
    and the result depends on ``(seed, step)`` only.
    """
    if num_prompts < 1 or num_available < 1 or step < 0:
        raise ValueError(f"need num_prompts >= 1, num_available >= 1, step >= 0; got {num_prompts}, {num_available}, {step}")
    start, stop = step * num_prompts, (step + 1) * num_prompts
    first, last = start // num_available, (stop - 1) // num_available
    walk = np.concatenate([np.random.default_rng([seed, p]).permutation(num_available) for p in range(first, last + 1)])
    offset = start - first * num_available
    return walk[offset : offset + num_prompts].astype(np.int64)
