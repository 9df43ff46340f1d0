"""Parity of the CLIP text towers, the T5 encoder and SD3's prompt encoding with transformers / diffusers."""

from __future__ import annotations

import json
import re
import shutil
import string

import jax
import numpy as np
import pytest
import torch
from helpers import float64_copy, perturb_torch_module, rel_err, torch_float64
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from marble_jax.models import clip, convert, prompt_encoding, t5
from marble_jax.models.functional import path_leaves
from marble_jax.models.weights import WeightError

# float32 parity, against transformers / diffusers run in float64 (float64 weights, float32 casts inside, T5's
# softmax and layer norm, made float64: helpers.torch_float64), so the error is our float32 rounding alone.
# Measured <= 6.1e-7 (T5; CLIP towers <= 4.5e-7, SD3's prompt embeddings <= 5.6e-7); 1e-5 leaves >= 16x.
TOL = 1e-5

# CLIP-L-like (legacy eos_token_id 2: pool at the largest id) and bigG-like (gelu; pool at the first
# eos_token_id, which here is not the largest id, so the two rules differ).
CLIP_L = dict(
    vocab_size=61, hidden_size=16, intermediate_size=40, num_attention_heads=2, num_hidden_layers=3, projection_dim=12,
    max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=60,
)  # fmt: skip
CLIP_G = dict(
    vocab_size=61, hidden_size=24, intermediate_size=48, num_attention_heads=3, num_hidden_layers=2, projection_dim=20,
    max_position_embeddings=77, hidden_act="gelu", eos_token_id=5, bos_token_id=0, pad_token_id=1,
)  # fmt: skip
T5_GATED = dict(
    vocab_size=34, d_model=48, d_kv=8, d_ff=64, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
)  # fmt: skip


def _save(model: torch.nn.Module, path, seed: int) -> None:
    perturb_torch_module(model, seed=seed)
    model.eval().save_pretrained(path)


def _clip(config: dict, path, seed: int = 0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    _save(model, path, seed)
    return model


def _t5(config: dict, path, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**config))
    _save(model, path, seed)
    return model


def _padded_ids(rng: np.random.Generator, lengths: list[int], total: int, bos: int | None, eos: int, pad: int, high: int):
    """Rows ``[bos] tokens [eos] pad...`` of the given content lengths; tokens in ``[6, high)``."""
    rows = []
    for n in lengths:
        row = ([bos] if bos is not None else []) + list(rng.integers(6, high, n)) + [eos]
        rows.append(row + [pad] * (total - len(row)))
    return np.array(rows, np.int32)


@pytest.mark.parametrize("config", [CLIP_L, CLIP_G], ids=["quick_gelu_legacy_eos", "gelu_first_eos"])
def test_clip_text_parity(tmp_path, config):
    model = float64_copy(_clip(config, tmp_path))
    apply_fn, params = convert.load_clip_text(tmp_path)
    eos = 60 if config["eos_token_id"] == 2 else config["eos_token_id"]  # legacy: the end-of-text id is the largest
    for length in (77, 9):
        ids = _padded_ids(np.random.default_rng(length), [length - 2, 3, 0, length // 2], length, 0, eos, eos, 60)
        ours = jax.jit(apply_fn)(params, ids)
        with torch.no_grad(), torch_float64():
            ref = model(torch.from_numpy(ids).long(), output_hidden_states=True)
            pooled = model.text_model(torch.from_numpy(ids).long()).pooler_output
        errors = {
            "last": rel_err(ours["last_hidden_state"], ref.last_hidden_state),
            "penultimate": rel_err(ours["penultimate_hidden_state"], ref.hidden_states[-2]),
            "pooled": rel_err(ours["pooler_output"], pooled),
            "text_embeds": rel_err(ours["text_embeds"], ref.text_embeds),
        }
        print(f"length {length} vs float64:", errors)
        assert max(errors.values()) < TOL, errors
        assert ours["text_embeds"].shape == (4, config["projection_dim"])


def _random_shapes(from_config, config: dict):
    """Shapes and dtypes of ``from_config``'s random params (traced, not compiled: XLA compiles init slowly)."""
    return jax.eval_shape(lambda key: from_config(config, key=key)[1], jax.random.key(0))


def _shapes(params):
    return jax.tree.map(lambda x: (x.shape, x.dtype), params)


def test_clip_random_init_matches_loaded_structure(tmp_path):
    _clip(CLIP_G, tmp_path)
    _, loaded = convert.load_clip_text(tmp_path)
    assert _shapes(_random_shapes(clip.text_from_config, CLIP_G)) == _shapes(loaded)


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_t5_parity(tmp_path, ffn):
    config = {**T5_GATED, "feed_forward_proj": ffn}
    model = float64_copy(_t5(config, tmp_path))
    apply_fn, params = convert.load_t5(tmp_path)
    ids = _padded_ids(np.random.default_rng(1), [40, 5, 0], 48, None, 1, 0, 34)  # beyond max_distance: log buckets
    ours = jax.jit(apply_fn)(params, ids)
    with torch.no_grad(), torch_float64():
        ref = model(torch.from_numpy(ids).long()).last_hidden_state
    err = rel_err(ours, ref)
    print(f"T5 vs float64: {err:.2e}")
    assert err < TOL


def test_t5_both_embedding_keys_and_random_init(tmp_path):
    _t5(T5_GATED, tmp_path)
    state = dict(load_file(tmp_path / "model.safetensors"))
    apply_fn, params = convert.load_t5(tmp_path)
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # SD3's files hold both copies
    _, both = t5.from_torch_state(T5_GATED, state, source="both", dtype=np.float32)
    state.pop("shared.weight")
    _, only_encoder = t5.from_torch_state(T5_GATED, state, source="encoder", dtype=np.float32)
    for other in (both, only_encoder):
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, other)))
    assert _shapes(_random_shapes(t5.from_config, T5_GATED)) == _shapes(params)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 300
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]
    for buckets, distance in [(32, 128), (8, 16)]:
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets, max_distance=distance)
        np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, distance), ref.numpy())


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_bad_checkpoints_raise_weight_error(tmp_path, which):
    if which == "clip":
        _clip(CLIP_L, tmp_path)
        key, load = "text_model.encoder.layers.1.mlp.fc1.weight", convert.load_clip_text
    else:
        _t5(T5_GATED, tmp_path)
        key, load = "encoder.block.2.layer.0.SelfAttention.q.weight", convert.load_t5
    good = load_file(tmp_path / "model.safetensors")
    renamed = {(k + "_renamed" if k == key else k): v for k, v in good.items()}
    bad_shape = {**good, key: good[key][:-1]}
    for name, state in [("renamed", renamed), ("bad_shape", bad_shape)]:
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "config.json", tmp_path / name / "config.json")
        save_file(state, tmp_path / name / "model.safetensors")
        with pytest.raises(WeightError, match=re.escape(key)):
            load(tmp_path / name)


def _tokenizers(tmp_path):
    """Tiny CLIP-L / CLIP-G (pad "!", as SD3's) BPE tokenizers from vocab.json + merges.txt, and a T5 Unigram one."""
    letters = string.ascii_lowercase
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    vocab = ["<|startoftext|>", "!"] + list(letters) + [c + "</w>" for c in letters]
    vocab += [a + b for a, b in (m.split() for m in merges)] + ["<|endoftext|>"]
    assert len(vocab) == CLIP_L["vocab_size"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok_l = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    tok_g = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=77, pad_token="!")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in ["a", "red", "cat", "dog"]] + [(c, -5.0) for c in letters]
    tok_t5 = T5TokenizerFast(vocab=pieces, extra_ids=0)
    assert len(tok_t5) == T5_GATED["vocab_size"]
    return tok_l, tok_g, tok_t5


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
def test_prompt_encoding_matches_sd3_pipeline(tmp_path, with_t5):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok_l, tok_g, tok_t5 = _tokenizers(tmp_path)
    # the bigG-like tower: eos is the end-of-text id (60, the pad of CLIP-L), pad is "!" (1): the first-eos rule
    clip_g_config = {**CLIP_G, "eos_token_id": tok_g.eos_token_id, "pad_token_id": tok_g.pad_token_id}
    text_l = float64_copy(_clip(CLIP_L, tmp_path / "l", seed=1))
    text_g = float64_copy(_clip(clip_g_config, tmp_path / "g", seed=2))
    text_t5 = float64_copy(_t5(T5_GATED, tmp_path / "t5", seed=3)) if with_t5 else None
    pooled_dim = CLIP_L["projection_dim"] + CLIP_G["projection_dim"]
    joint_dim = T5_GATED["d_model"]
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=joint_dim, caption_projection_dim=16, pooled_projection_dim=pooled_dim, out_channels=4,
        pos_embed_max_size=8,
    )  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_l, tokenizer=tok_l, text_encoder_2=text_g, tokenizer_2=tok_g,
        text_encoder_3=text_t5, tokenizer_3=tok_t5 if with_t5 else None,
    )  # fmt: skip

    prompts = ["a red cat", "A photo of a dog, 3 cats!", "", "a cat of red dog " * 14]  # the last is truncated (CLIP and T5)
    max_len = 24
    with torch.no_grad(), torch_float64():
        ref_ctx, ref_neg_ctx, ref_pooled, ref_neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True, max_sequence_length=max_len
        )

    clip_l = convert.load_clip_text(tmp_path / "l")
    clip_g = convert.load_clip_text(tmp_path / "g")
    t5_enc = convert.load_t5(tmp_path / "t5") if with_t5 else None

    @jax.jit
    def encode(params_l, params_g, params_t5, tokens):
        t5_pair = None if t5_enc is None else (t5_enc[0], params_t5)
        pair_l, pair_g = (clip_l[0], params_l), (clip_g[0], params_g)
        sizes = dict(joint_attention_dim=joint_dim, max_sequence_length=max_len)
        return prompt_encoding.encode_prompt(pair_l, pair_g, t5_pair, tokens, **sizes)

    params_t5 = None if t5_enc is None else t5_enc[1]
    for texts, ctx, pooled in [(prompts, ref_ctx, ref_pooled), ([""] * len(prompts), ref_neg_ctx, ref_neg_pooled)]:
        tokens = prompt_encoding.tokenize(texts, tok_l, tok_g, tok_t5 if with_t5 else None, max_sequence_length=max_len)
        assert tokens["clip_l"].shape == (len(prompts), 77)
        ours_ctx, ours_pooled = encode(clip_l[1], clip_g[1], params_t5, tokens)
        assert ours_ctx.shape == (len(prompts), 77 + max_len, joint_dim)
        assert ctx.dtype == pooled.dtype == torch.float64
        errors = (rel_err(ours_ctx, ctx), rel_err(ours_pooled, pooled))
        print(f"context, pooled vs float64: {errors[0]:.2e}, {errors[1]:.2e}")
        assert max(errors) < TOL, errors


# ---------------------------------------------------------------- lower-precision text encoders (T5's wo in float32)


def _t5_with_large_feed_forward(path, scale: float):
    """The tiny gated T5 with every ``wo`` scaled by ``scale``: its feed-forward outputs (and the residual stream)
    reach about 1e5 at ``scale`` 3e4, beyond float16's 65504."""
    _t5(T5_GATED, path)
    state = {k: v * np.float32(scale) if k.endswith("DenseReluDense.wo.weight") else v
             for k, v in load_file(path / "model.safetensors").items()}  # fmt: skip
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return T5EncoderModel.from_pretrained(path).eval()


def _dtypes(params):
    return {".".join(map(str, path)): leaf.dtype.name for path, leaf in path_leaves(params)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_t5_low_precision_keeps_wo_float32_in_every_path(tmp_path, dtype):
    _t5(T5_GATED, tmp_path)
    _, params32 = convert.load_t5(tmp_path)
    _, loaded = convert.load_t5(tmp_path, dtype)
    kinds = _dtypes(loaded)
    assert all(v == ("float32" if k.endswith(".ffn.wo.kernel") else dtype) for k, v in kinds.items()), kinds
    assert sum(v == "float32" for v in kinds.values()) == T5_GATED["num_layers"]
    # the loader's host cast, cast_params of the float32 tree and from_config's abstract tree agree
    cast = t5.cast_params(params32, dtype)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), cast, loaded)))
    assert _dtypes(_random_shapes(lambda c, key: t5.from_config(c, key=key, dtype=dtype), T5_GATED)) == kinds
    assert t5.cast_params(loaded, dtype)["blocks"][0]["ffn"]["wo"]["kernel"] is loaded["blocks"][0]["ffn"]["wo"]["kernel"]


# float16 (eps 2^-10), T5 with feed-forward outputs of about 1e5: transformers loads it with wo in float32
# (_keep_in_fp32_modules applies to float16) and so do we; all-float16 overflows. Measured vs transformers' float16:
# 2.7e-3, vs float64 2.9e-3 (transformers': 3.7e-3). 1e-2 (about 10 float16 ulps at max |ref|) leaves >= 3.4x.
F16_TOL = 1e-2


def test_t5_float16_with_wo_float32_matches_transformers_and_does_not_overflow(tmp_path):
    model = _t5_with_large_feed_forward(tmp_path, 3e4)
    ids = _padded_ids(np.random.default_rng(1), [40, 5, 0], 48, None, 1, 0, 34)
    with torch.no_grad(), torch_float64():
        ref64 = float64_copy(model)(torch.from_numpy(ids).long(), output_hidden_states=True)
    assert max(float(h.abs().max()) for h in ref64.hidden_states) > 1.5 * float(np.finfo(np.float16).max)
    ref16 = T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert ref16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    with torch.no_grad():
        ref = ref16(torch.from_numpy(ids).long()).last_hidden_state
    assert ref.dtype == torch.float16 and torch.isfinite(ref).all()

    apply_fn, params = convert.load_t5(tmp_path, "float16")
    ours = jax.jit(apply_fn)(params, ids)
    assert ours.dtype == np.float16 and np.isfinite(np.asarray(ours)).all()
    errors = rel_err(ours, ref.float()), rel_err(ours, ref64.last_hidden_state)
    print(f"T5 float16 (wo float32) vs transformers float16, vs float64: {errors[0]:.2e}, {errors[1]:.2e}")
    assert max(errors) < F16_TOL
    all_f16 = jax.tree.map(lambda x: x.astype(np.float16), params)
    assert not np.isfinite(np.asarray(jax.jit(apply_fn)(all_f16, ids))).all()  # what keeping wo in float32 avoids


# bfloat16 (eps 2^-7) against torch's bfloat16 T5 with wo in float32 (transformers' forward casts the hidden state to
# wo's dtype; from_pretrained keeps wo float32 for float16 only, so the test sets it). Measured 1.0e-2 (gated-gelu) and
# 7.5e-3 (relu); vs float64 1.3e-2 and 9.9e-3. 3e-2 (4 bfloat16 ulps at max |ref|) leaves >= 2.3x.
BF16_TOL = 3e-2


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_t5_bfloat16_with_wo_float32_matches_torch(tmp_path, ffn):
    model = _t5({**T5_GATED, "feed_forward_proj": ffn}, tmp_path)
    ids = _padded_ids(np.random.default_rng(1), [40, 5, 0], 48, None, 1, 0, 34)
    with torch.no_grad(), torch_float64():
        ref64 = float64_copy(T5EncoderModel.from_pretrained(tmp_path))(torch.from_numpy(ids).long()).last_hidden_state
    model = model.to(torch.bfloat16)
    for block in model.encoder.block:
        block.layer[1].DenseReluDense.wo.float()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).last_hidden_state
    apply_fn, params = convert.load_t5(tmp_path, "bfloat16")
    ours = jax.jit(apply_fn)(params, ids)
    assert ours.dtype.name == "bfloat16" and ref.dtype == torch.bfloat16
    errors = rel_err(ours.astype(np.float32), ref.float()), rel_err(ours.astype(np.float32), ref64)
    print(f"T5 bfloat16 (wo float32) vs torch bfloat16 (wo float32), vs float64: {errors[0]:.2e}, {errors[1]:.2e}")
    assert max(errors) < BF16_TOL
