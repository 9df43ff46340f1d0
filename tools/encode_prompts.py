"""Encode every prompt of a prompt file once with an SD3 / SD3.5 snapshot's text encoders, so that training reads
the embeddings instead of running CLIP-L, CLIP-G and T5-XXL.

    python tools/encode_prompts.py --model PATH --prompts FILE.txt|.jsonl --out DIR \\
        [--max-sequence-length 128] [--dtype bfloat16] [--batch 16] [--shard-size 256] [--params-checkpoint DIR] [--no-t5]

The empty prompt (classifier-free guidance's negative) and the distinct prompt texts of the file
(``marble_jax.prompts.load_prompts``; first occurrence order) are cut into shards of ``--shard-size``; each shard
is encoded on the default device (the accelerator, if any) in batches of exactly ``--batch`` prompts (one compiled
program) with the encoders in ``--dtype`` (T5's ``wo`` in float32), and written as
``DIR/shard_NNNNN.{context,pooled}.npy`` in ``--dtype`` (bfloat16 stored as its uint16 bits) plus a ``.json``
marker; ``DIR/index.json`` (prompt text -> shard, row) is written last. Every file is written under a temporary
name and renamed, so an interrupted run loses at most the shard in progress, and a rerun skips the finished
shards. The format is :mod:`marble_jax.prompt_cache`'s, which reads it (``EmbeddingCache(..., precomputed=DIR)``).
The settings (model, T5 length, dtype, T5 on or off, shard size) must match those of a rerun on the same
``--out``, and the training run's (``model.max_sequence_length``...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from marble_jax import pipeline, prompt_cache
from marble_jax.prompts import load_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers SD3 / SD3.5 snapshot directory or HF cache repo id")
    parser.add_argument("--prompts", required=True, type=Path, help="prompt file (.txt: one a line, or .jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (a rerun resumes it)")
    parser.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (the config's model.max_sequence_length)")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="encoders and stored arrays"
    )
    parser.add_argument("--batch", type=int, default=16, help="prompts per encoder call (the last one padded)")
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard file (the unit of resumption)")
    parser.add_argument("--params-checkpoint", default="", help="orbax parameters of tools/convert_sd3.py (faster load)")
    parser.add_argument("--no-t5", action="store_true", help="encode without T5 (its states are zeros)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.shard_size < 1 or args.max_sequence_length < 1:
        parser.error("--batch, --shard-size and --max-sequence-length must be >= 1")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Encodes, writes ``--out``; returns the path of its ``index.json``."""
    args = parse_args(argv)
    texts = list(dict.fromkeys(["", *(p.text for p in load_prompts(args.prompts))]))  # "": CFG's negative prompt
    shards = [texts[i : i + args.shard_size] for i in range(0, len(texts), args.shard_size)]
    with_t5 = "text_encoder_3" in pipeline.snapshot_components(args.model, use_t5=not args.no_t5)[2]
    settings = {
        "model": str(args.model),
        "max_sequence_length": args.max_sequence_length,
        "dtype": args.dtype,
        "use_t5": with_t5,  # False also when the snapshot has no T5
        "shard_size": args.shard_size,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [n for n, shard in enumerate(shards) if not prompt_cache.finished_shard(args.out, n, shard, settings)]
    pending = set(todo)
    done = sum(len(shard) for n, shard in enumerate(shards) if n not in pending)
    print(f"{args.prompts}: {len(texts)} distinct prompts (with \"\") in {len(shards)} shards; "
          f"{len(shards) - len(todo)} already written in {args.out}", flush=True)  # fmt: skip
    if todo:
        start = time.perf_counter()
        dtype = jnp.dtype(args.dtype)
        pipe = pipeline.from_pretrained(args.model, dtype, use_t5=with_t5, text_dtype=dtype, text_only=True,
                                        params_checkpoint=args.params_checkpoint or None)  # fmt: skip
        print(f"loaded the text encoders of {args.model} ({args.dtype}) in {time.perf_counter() - start:.1f} s", flush=True)
        start, encoded = time.perf_counter(), 0
        for k, n in enumerate(todo, 1):
            context, pooled = pipe.encode(shards[n], max_sequence_length=args.max_sequence_length, batch=args.batch)
            prompt_cache.write_shard(args.out, n, shards[n], np.asarray(context), np.asarray(pooled), settings)
            encoded += len(shards[n])
            done += len(shards[n])
            rate = encoded / (time.perf_counter() - start)
            left = (len(texts) - done) / rate
            print(f"[{k}/{len(todo)}] {prompt_cache.shard_name(n)}: {done}/{len(texts)} prompts, {rate:.1f} prompts/s, "
                  f"{left / 60:.1f} min left", flush=True)  # fmt: skip
    index = prompt_cache.write_index(args.out, settings, shards)
    print(f"wrote {index}", flush=True)
    return index


if __name__ == "__main__":
    main(sys.argv[1:])
