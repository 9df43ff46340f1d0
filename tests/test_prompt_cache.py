"""The bounded prompt-embedding cache, its precomputed-embeddings directory, and tools/encode_prompts.py end to end on
a tiny SD3 snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_tool, save_tiny_sd3_snapshot

from marble_jax import pipeline, prompt_cache
from marble_jax.prompt_cache import EmbeddingCache, MissingEmbeddingError, PrecomputedEmbeddings

L, D, DP = 3, 4, 2
ROW_BYTES = (L * D + DP) * 4  # one prompt's float32 context + pooled


def _fake_rows(texts):
    """A deterministic 'encoder': each prompt's rows are a function of its text alone."""
    seeds = [sum(map(ord, t)) + 1000 * len(t) for t in texts]
    context = np.stack([np.random.default_rng(s).normal(size=(L, D)).astype(np.float32) for s in seeds])
    pooled = np.stack([np.random.default_rng(s + 1).normal(size=DP).astype(np.float32) for s in seeds])
    return context, pooled


class FakeEncoder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return _fake_rows(texts)

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


def _assert_rows(out, texts):
    ref = _fake_rows(texts)
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])


def test_hits_are_not_reencoded_and_batches_are_bounded():
    encoder = FakeEncoder()
    cache = EmbeddingCache(encoder, batch=2)
    texts = ["a", "b", "a", "c", "d", "e"]
    _assert_rows(cache(texts), texts)
    assert encoder.calls == [["a", "b"], ["c", "d"], ["e"]]  # distinct prompts, chunks of at most `batch`
    _assert_rows(cache(["e", "b", "f"]), ["e", "b", "f"])
    assert encoder.calls[3:] == [["f"]]
    assert (cache.hits, cache.misses, cache.from_file, len(cache), cache.nbytes) == (2, 6, 0, 6, 6 * ROW_BYTES)
    empty = cache([])
    assert empty[0].shape == (0, L, D) and empty[1].shape == (0, DP)


def test_lru_eviction_keeps_the_bound():
    encoder = FakeEncoder()
    cache = EmbeddingCache(encoder, batch=8, max_bytes=3 * ROW_BYTES)
    cache(["a", "b", "c"])
    cache(["a"])  # a is now the most recently used: b goes first
    cache(["d"])
    assert list(cache._lru) == ["c", "a", "d"] and cache.evictions == 1
    cache(["b"])  # evicted, so encoded again (and c evicted)
    assert encoder.encoded == ["a", "b", "c", "d", "b"] and list(cache._lru) == ["a", "d", "b"]
    # one call with more distinct prompts than the bound holds: every row is right, the bound still holds
    many = [f"p{i}" for i in range(7)] + ["a"]
    _assert_rows(cache(many), many)
    assert cache.nbytes == 3 * ROW_BYTES and len(cache) == 3
    for step in range(20):
        cache([f"q{step}", f"q{step // 2}", "a"])
        assert cache.nbytes <= 3 * ROW_BYTES and cache.nbytes == sum(c.nbytes + p.nbytes for c, p in cache._lru.values())
    keep_none = EmbeddingCache(encoder, max_bytes=0)
    keep_none(["x"])
    keep_none(["x"])
    assert encoder.encoded[-2:] == ["x", "x"] and keep_none.nbytes == 0
    with pytest.raises(ValueError, match="encoder"):
        EmbeddingCache()


def _write_store(directory: Path, dtype, shards) -> tuple[dict, list]:
    """A precomputed directory of the fake rows of ``shards`` (prompt lists) in ``dtype``; returns settings, arrays."""
    settings = {"model": "fake", "max_sequence_length": L, "dtype": np.dtype(dtype).name, "use_t5": True}
    written = []
    for n, shard in enumerate(shards):
        context, pooled = (a.astype(dtype) for a in _fake_rows(shard))
        context[0, 0, 0] = -0.0  # bits, not values, must survive (a uint16 view of bfloat16)
        prompt_cache.write_shard(directory, n, shard, context, pooled, settings)
        written.append((context, pooled))
    prompt_cache.write_index(directory, settings, shards)
    return settings, written


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float32], ids=["bfloat16", "float32"])
def test_precomputed_rows_are_exactly_what_was_written(tmp_path, dtype):
    shards = [["a cat", "a dog"], ["red", "blue"], ["green"]]
    settings, written = _write_store(tmp_path, dtype, shards)
    stored = np.load(tmp_path / "shard_00000.context.npy")
    assert stored.dtype == (np.uint16 if dtype == jnp.bfloat16 else np.float32)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["prompts"]["blue"] == [1, 1] and index["dtype"] == np.dtype(dtype).name
    store = PrecomputedEmbeddings(tmp_path)
    assert len(store) == 5 and store.dtype == np.dtype(dtype) and store.context_shape == (L, D)
    store.check(max_sequence_length=L, use_t5=True)
    with pytest.raises(ValueError, match=f"{tmp_path / 'index.json'}.*max_sequence_length = {L}"):
        store.check(max_sequence_length=128)

    texts = ["green", "a dog", "red", "a dog", "a cat"]
    where = {t: (n, r) for n, shard in enumerate(shards) for r, t in enumerate(shard)}
    expected = [np.stack([written[where[t][0]][k][where[t][1]] for t in texts]) for k in range(2)]
    encoder = FakeEncoder()
    cache = EmbeddingCache(encoder, precomputed=tmp_path)
    context, pooled = cache(texts)
    assert context.dtype == pooled.dtype == np.dtype(dtype)
    assert context.tobytes() == expected[0].tobytes() and pooled.tobytes() == expected[1].tobytes()
    assert encoder.calls == [] and cache.from_file == 4
    # a prompt the file lacks is encoded, cast to the file's dtype
    context, _ = cache(["a cat", "yellow"])
    assert encoder.calls == [["yellow"]] and context.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(context[1], _fake_rows(["yellow"])[0][0].astype(dtype))


def test_precomputed_errors_name_the_file_and_prompt(tmp_path):
    _write_store(tmp_path, np.float32, [["a cat"]])
    cache = EmbeddingCache(precomputed=tmp_path)
    assert "a cat" in cache and "a dog" not in cache
    with pytest.raises(MissingEmbeddingError, match=f"{tmp_path / 'index.json'} holds no embedding of prompt 'a dog'"):
        cache(["a cat", "a dog"])
    with pytest.raises(KeyError):  # a MissingEmbeddingError is a KeyError
        cache(["a dog"])
    wrong = EmbeddingCache(lambda texts: (np.zeros((len(texts), L + 1, D)), np.zeros((len(texts), DP))), precomputed=tmp_path)
    with pytest.raises(ValueError, match=f"context rows of shape \\({L + 1}, {D}\\), but {tmp_path / 'index.json'}"):
        wrong(["a dog"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "index.json")):
        PrecomputedEmbeddings(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not prompt embeddings"):
        PrecomputedEmbeddings(tmp_path / "other")


def _encode_tool():
    return load_tool("encode_prompts")


def test_encode_prompts_tool_end_to_end_and_resumable(tmp_path, monkeypatch):
    snapshot = save_tiny_sd3_snapshot(tmp_path / "snapshot")
    texts = ["a red cat", "a dog", "a red cat", "cat dog", "red", "a cat a dog", "dog red cat"]
    distinct = list(dict.fromkeys(["", *texts]))  # the tool adds the empty prompt (CFG's negative)
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    tool = _encode_tool()
    out = tmp_path / "embeddings"
    argv = ["--model", str(snapshot), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
            "--max-sequence-length", "12", "--batch", "4", "--shard-size", "3"]  # fmt: skip
    index = tool.main(argv)
    assert index == out / "index.json"
    assert sorted(p.name for p in out.glob("shard_*.json")) == ["shard_00000.json", "shard_00001.json", "shard_00002.json"]
    assert not list(out.glob("*.tmp"))

    # what the file holds is the bfloat16 encoders' output (same batches: bit for bit)
    pipe = pipeline.from_pretrained(snapshot, text_dtype=jnp.bfloat16, text_only=True)
    shards = [distinct[i : i + 3] for i in range(0, len(distinct), 3)]
    ref = [pipe.encode(shard, max_sequence_length=12, batch=4) for shard in shards]
    ref_context = np.concatenate([np.asarray(c) for c, _ in ref])
    ref_pooled = np.concatenate([np.asarray(p) for _, p in ref])
    cache = EmbeddingCache(precomputed=out)
    assert cache.precomputed.dtype == jnp.bfloat16 and cache.precomputed.context_shape == (77 + 12, 32)
    cache.precomputed.check(max_sequence_length=12, use_t5=True, dtype="bfloat16")
    context, pooled = cache(distinct)
    assert context.dtype == jnp.bfloat16 and context.tobytes() == ref_context.tobytes()
    assert pooled.tobytes() == ref_pooled.tobytes()

    # interrupted after shard 1's arrays, before its marker and the index: the rerun writes shard 1 alone
    written = []
    write_shard = prompt_cache.write_shard
    monkeypatch.setattr(prompt_cache, "write_shard", lambda d, n, *a, **k: (written.append(n), write_shard(d, n, *a, **k)))
    before = (out / "index.json").read_text()
    (out / "shard_00001.json").unlink()
    (out / "index.json").unlink()
    (out / "shard_00002.context.npy.tmp").write_bytes(b"partial")
    tool.main(argv)
    assert written == [1] and (out / "index.json").read_text() == before

    # all written: nothing is loaded or encoded
    monkeypatch.setattr(pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    tool.main(argv)
    assert written == [1]
    # other settings into the same directory are refused, naming the shard written with others
    with pytest.raises(ValueError, match="shard_00000.json was written with settings"):
        tool.main(argv[:-5] + ["8"] + argv[-4:])
