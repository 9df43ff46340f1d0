"""The JAX SD3.5 pipeline against diffusers' StableDiffusion3Pipeline (prompt -> latents -> images), the
orbax parameter checkpoint of tools/convert_sd3.py, and snapshot errors."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import load_tool, rel_err, t64, tiny_sd3_pipeline, torch_float64

from marble_jax import pipeline
from marble_jax.models.functional import path_leaves

# float32 parity against diffusers' pipeline run in float64 (every component, its float32 casts too): measured
# <= 3.7e-7 (latents after 4 guided steps) and 7.6e-7 (decoded images); 1e-5 leaves >= 13x.
TOL = 1e-5
PROMPTS = ["a red cat", "A dog, 3 cats!"]
T5_LENGTH = 12
STEPS = 4


def _build(tmp_path_factory, with_t5: bool):
    """``(snapshot directory, torch pipeline, our pipeline)``; without T5, model_index.json names text_encoder_3 null.
    The snapshot is float32; the torch pipeline, the reference, is then made float64."""
    path = tmp_path_factory.mktemp("t5" if with_t5 else "no_t5") / "snapshot"
    ref_pipe = tiny_sd3_pipeline(with_t5)
    ref_pipe.save_pretrained(path)
    return path, ref_pipe.to(torch.float64), pipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def with_t5(tmp_path_factory):
    return _build(tmp_path_factory, True)


@pytest.fixture(scope="module")
def without_t5(tmp_path_factory):
    return _build(tmp_path_factory, False)


@pytest.mark.parametrize("variant", ["with_t5", "without_t5"])
def test_prompt_to_latents_and_images_match_diffusers(request, variant):
    path, ref_pipe, pipe = request.getfixturevalue(variant)
    assert (pipe.t5_fn is None) == (variant == "without_t5")
    assert (pipe.shift, pipe.vae_scale_factor, pipe.latent_shape(2)) == (3.0, 2, (2, 8, 8, 16))
    x_T = jax.random.normal(jax.random.key(0), pipe.latent_shape(len(PROMPTS)), jnp.float32)
    final = {}

    def keep_latents(_, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad(), torch_float64():
        ref_images = ref_pipe(PROMPTS, latents=t64(np.array(x_T)).permute(0, 3, 1, 2), num_inference_steps=STEPS,
                              guidance_scale=4.5, max_sequence_length=T5_LENGTH, output_type="np",
                              callback_on_step_end=keep_latents).images  # fmt: skip
    ref_latents = final["latents"].permute(0, 2, 3, 1)
    assert ref_latents.dtype == torch.float64 and ref_images.dtype == np.float64

    context, pooled = pipe.encode(PROMPTS, max_sequence_length=T5_LENGTH)
    negative = pipe.encode([""] * len(PROMPTS), max_sequence_length=T5_LENGTH)
    latents = pipe.generate_latents(context, pooled, x_T, negative=negative, num_steps=STEPS, guidance=4.5)
    images = pipe.decode_float(latents)
    errors = rel_err(latents, ref_latents), rel_err(images, ref_images)
    print(f"latents, images vs float64: {errors[0]:.2e}, {errors[1]:.2e}")
    assert errors[0] < TOL
    assert images.shape == (2, 16, 16, 3) and errors[1] < TOL
    # uint8 as diffusers' numpy_to_pil rounds; a value within float error of a .5 boundary may round the other way
    ref_uint8 = (ref_images * 255).round().astype(np.uint8)
    uint8 = np.asarray(pipe.decode(latents))
    assert uint8.dtype == np.uint8 and np.abs(uint8.astype(int) - ref_uint8).max() <= 1 and np.mean(uint8 == ref_uint8) > 0.99

    # the default negative prompt is "", and __call__ draws x_T from its key (same shapes: no recompilation)
    assert np.array_equal(pipe.generate_latents(context, pooled, x_T, num_steps=STEPS), latents)
    key = jax.random.key(7)
    drawn = jax.random.normal(key, x_T.shape, jnp.float32)
    expected = pipe.decode(pipe.generate_latents(context, pooled, drawn, negative=negative, num_steps=STEPS))
    assert np.array_equal(pipe(PROMPTS, key, num_steps=STEPS, max_sequence_length=T5_LENGTH), expected)


def _convert_tool():
    return load_tool("convert_sd3")


def test_orbax_checkpoint_loads_the_same_params_and_functions(with_t5, tmp_path):
    path, _, pipe = with_t5
    convert_sd3 = _convert_tool()
    examples = {
        "transformer": (
            np.zeros((1, 8, 8, 16), np.float32),
            np.ones(1, np.float32),
            np.zeros((1, 5, 32), np.float32),
            np.zeros((1, 20), np.float32),
        ),  # fmt: skip
        "vae": (np.zeros((1, 8, 8, 16), np.float32),),
        "text_encoder": (np.zeros((1, 77), np.int32),),
        "text_encoder_2": (np.zeros((1, 77), np.int32),),
        "text_encoder_3": (np.zeros((1, T5_LENGTH), np.int32),),
    }
    fns = {"transformer": "transformer_fn", "vae": "vae_decode_fn", "text_encoder": "clip_l_fn", "text_encoder_2": "clip_g_fn",
           "text_encoder_3": "t5_fn"}  # fmt: skip
    convert_sd3.main(["--snapshot", str(path), "--out", str(tmp_path / "f32")])
    fast = pipeline.from_pretrained(path, params_checkpoint=tmp_path / "f32")
    assert set(fast.params) == set(pipeline.COMPONENTS)
    assert jax.tree.structure(fast.params) == jax.tree.structure(pipe.params)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), fast.params, pipe.params)))
    # the functions built from configs alone (the orbax path) trace to the same programs as the safetensors loaders'
    for name, args in examples.items():
        jaxprs = [str(jax.make_jaxpr(getattr(p, fns[name]))(pipe.params[name], *args)) for p in (fast, pipe)]
        assert jaxprs[0] == jaxprs[1], name

    # --dtype bfloat16: the loaders' float32 -> bfloat16 cast (round to nearest even) equals astype's
    convert_sd3.main(["--snapshot", str(path), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    for name, params in pipe.params.items():
        expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)  # numpy: no per-shape compilation
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
        restored = pipeline.restore_params(tmp_path / "bf16" / name, abstract)
        assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), restored, expected)))


def test_snapshot_resolution_and_errors_naming_what_is_missing(with_t5, tmp_path, monkeypatch):
    path = with_t5[0]
    assert "text_encoder_3" not in pipeline.snapshot_components(path, use_t5=False)[2]
    repo = tmp_path / "hub" / "models--tiny--sd35"  # a Hugging Face cache entry of repo id "tiny/sd35"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / "abc123").symlink_to(path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert pipeline.snapshot_components("tiny/sd35")[0] == repo / "snapshots" / "abc123"
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.from_pretrained(path / "vae")
    for missing in ("vae", "tokenizer_2", "text_encoder_3"):
        broken = tmp_path / f"no_{missing}"
        shutil.copytree(path, broken)
        shutil.rmtree(broken / missing)
        with pytest.raises(FileNotFoundError, match=f"{broken}.*'{missing}'"):
            pipeline.from_pretrained(broken)
    empty_tokenizer = tmp_path / "empty_tokenizer"
    shutil.copytree(path, empty_tokenizer)
    for f in (empty_tokenizer / "tokenizer").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=f"{empty_tokenizer / 'tokenizer'}"):
        pipeline.from_pretrained(empty_tokenizer)
    with pytest.raises(FileNotFoundError, match="nothing/transformer"):
        pipeline.from_pretrained(path, params_checkpoint=tmp_path / "nothing")


# Each row of a padded batch against the prompt encoded alone (float32, both ours): XLA's batch-size-dependent GEMM
# blocking is the only difference. Measured <= 3.0e-7 of max |row|; TOL leaves >= 33x.
ENCODE_PROMPTS = [f"a {' '.join(['red', 'cat', 'dog'][: i % 3 + 1])} {'cat ' * (i // 3)}{chr(97 + i)}" for i in range(17)]


def test_encode_pads_to_a_fixed_batch_and_compiles_once(with_t5):
    _, _, pipe = with_t5
    alone = [pipe.encode([p], max_sequence_length=T5_LENGTH) for p in ENCODE_PROMPTS]
    before = pipeline._encode._cache_size()
    errors = []
    for n in (3, 5, 17, 4):
        context, pooled = pipe.encode(ENCODE_PROMPTS[:n], max_sequence_length=T5_LENGTH, batch=4)
        assert context.shape == (n, 77 + T5_LENGTH, 32) and pooled.shape == (n, 20)
        for i in range(n):
            errors += [rel_err(context[i], alone[i][0][0]), rel_err(pooled[i], alone[i][1][0])]
    assert pipeline._encode._cache_size() - before == 1  # one program (batch 4) for 3, 5, 17 and 4 prompts
    print(f"padded batch rows vs each prompt alone: {max(errors):.2e}")
    assert max(errors) < TOL
    empty = pipe.encode([], max_sequence_length=T5_LENGTH, batch=4)
    assert empty[0].shape == (0, 77 + T5_LENGTH, 32) and empty[1].shape == (0, 20)
    with pytest.raises(ValueError, match="batch"):
        pipe.encode(ENCODE_PROMPTS, batch=0)


# bfloat16 text encoders (T5's wo float32) against float32: bfloat16 rounding of weights and activations through two
# CLIP towers and T5, measured 1.1e-2 (context) and 7.2e-3 (pooled); 3e-2 (4 bfloat16 ulps at max |ref|) leaves >= 2.6x.
BF16_TOL = 3e-2


def test_text_encoders_in_bfloat16_with_t5_wo_float32(with_t5):
    path, _, pipe = with_t5
    text = pipeline.from_pretrained(path, text_dtype=jnp.bfloat16, text_only=True)
    assert text.transformer_fn is None and text.vae_decode_fn is None and set(text.params) == set(pipeline.TEXT_ENCODERS)
    leaves = [(name, p, leaf) for name in text.params for p, leaf in path_leaves(text.params[name])]
    assert all(leaf.dtype == (jnp.float32 if p[-2] == "wo" else jnp.bfloat16) for _, p, leaf in leaves), leaves
    assert sum(p[-2] == "wo" for _, p, _ in leaves) == 2  # the tiny T5's two blocks
    cast = pipe.with_text_dtype(jnp.bfloat16)  # the same cast of the float32 parameters, on the device
    assert cast.params["transformer"] is pipe.params["transformer"]
    for name in pipeline.TEXT_ENCODERS:
        same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), cast.params[name], text.params[name])
        assert all(jax.tree.leaves(same)), name
    context, pooled = text.encode(PROMPTS, max_sequence_length=T5_LENGTH, batch=2)
    assert context.dtype == pooled.dtype == jnp.bfloat16
    ref = pipe.encode(PROMPTS, max_sequence_length=T5_LENGTH)
    errors = rel_err(context.astype(jnp.float32), ref[0]), rel_err(pooled.astype(jnp.float32), ref[1])
    print(f"bfloat16 encoders vs float32: context {errors[0]:.2e}, pooled {errors[1]:.2e}")
    assert max(errors) < BF16_TOL


def test_without_text_encoders(with_t5):
    path, _, pipe = with_t5
    bare = pipeline.from_pretrained(path, text_encoders=False)
    assert set(bare.params) == {"transformer", "vae"} and bare.clip_l_fn is bare.t5_fn is None
    assert bare.transformer_fn is not None and bare.latent_shape(1) == pipe.latent_shape(1)
    with pytest.raises(ValueError, match="without its text encoders"):
        bare.encode(PROMPTS)
    with pytest.raises(ValueError, match="nothing to load"):
        pipeline.from_pretrained(path, text_only=True, text_encoders=False)
