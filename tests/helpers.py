"""Shared test utilities (imported as ``from helpers import ...``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np


def rel_err(ours, ref) -> float:
    """``max |ours - ref| / max |ref|``: the relative error the parity tolerances refer to."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def perturb_torch_module(module, seed: int = 0, scale: float = 0.02) -> None:
    """Adds Gaussian noise to every parameter of a torch module, in place, so that layers
    initialised to zero (adaLN modulation, final layers, LoRA B) are exercised by parity tests."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def tiny_sd3_tokenizers(path):
    """Tiny tokenizers shaped like SD3's, built locally: CLIP-L (pads with its end-of-text token) and CLIP-G
    (pads with "!", id 1) BPE tokenizers over a 61-token vocabulary (end-of-text id 60), written to ``path``
    as vocab.json + merges.txt, and a 34-piece T5 Unigram tokenizer. Returns ``(clip_l, clip_g, t5)``."""
    import json
    import string
    from pathlib import Path

    from transformers import CLIPTokenizer, T5TokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    vocab = ["<|startoftext|>", "!"] + list(letters) + [c + "</w>" for c in letters]
    vocab += [a + b for a, b in (m.split() for m in merges)] + ["<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    clip_l = CLIPTokenizer.from_pretrained(path, model_max_length=77)
    clip_g = CLIPTokenizer.from_pretrained(path, model_max_length=77, pad_token="!")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in ["a", "red", "cat", "dog"]] + [(c, -5.0) for c in letters]
    return clip_l, clip_g, T5TokenizerFast(vocab=pieces, extra_ids=0)


def tiny_sd35_transformer_config(num_layers: int = 3) -> dict:
    """A tiny SD3.5-shaped ``SD3Transformer2DModel`` config: MMDiT-X attn2 in block 0, RMSNorm q/k,
    the context-pre-only last block, and a 12 x 12 position table cropped to smaller latent grids."""
    return dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        out_channels=4,
        pos_embed_max_size=12,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def save_tiny_sd35_transformer(directory, num_layers: int = 3):
    """The tiny SD3.5-shaped torch transformer (seed 0, every weight perturbed), saved to
    ``directory`` with ``save_pretrained``; returns the torch model (eval mode)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_sd35_transformer_config(num_layers)).eval()
    perturb_torch_module(model)
    model.save_pretrained(directory)
    return model


def save_tiny_world(directory, seed: int = 0):
    """A random 1-block world model (every weight non-zero, so LoRA gradients flow) saved in ``directory``."""
    import jax

    from marble_jax.world import model as world_model
    from marble_jax.world import scenes

    tokenizer = scenes.build_tokenizer(world_model.MAX_LENGTH)
    config = world_model.default_config(tokenizer)
    config["mmdit"] = {**config["mmdit"], "num_layers": 1, "num_attention_heads": 2, "caption_projection_dim": 64,
                       "dual_attention_layers": [0]}  # fmt: skip
    config["text"] = {**config["text"], "num_hidden_layers": 1}
    _, _, params = world_model.build(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])
    return world_model.save_world_model(directory, params, config)
