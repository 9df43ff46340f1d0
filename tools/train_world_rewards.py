"""Trains the world's learned rewards and writes them to marble_jax/world/assets/rewards/.

    python tools/train_world_rewards.py [--out DIR] [--seed 0] [--quick] [--reuse-clip]

``--reuse-clip`` loads ``world_clip`` from ``--out`` instead of training it again (step 1 is the slow one).

Deterministic in the seed; a few minutes on a laptop CPU. Steps (see marble_jax/world/model_rewards.py):
1. ``world_clip``: contrastive training on clean train scenes (and "plain"-captioned varied scenes).
2. ``world_pickscore``: ``world_clip`` fine-tuned Bradley-Terry on synthetic preference pairs.
3. ``world_hps``: ``world_clip`` fine-tuned the same way on pairs ordered by ``hps_utility`` (appeal counts too).
4. ``world_aesthetic``: an MLP on frozen ``world_clip`` image embeddings regressing ``aesthetic_target``.
Then held-out evaluation (matching-vs-mismatching accuracy, clean-vs-noisy preference, aesthetic rank
correlation, the aesthetic / GenEval conflict), written to ``report.json`` beside the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file
from scipy.stats import spearmanr

from marble_jax import rewards
from marble_jax.models import clip
from marble_jax.models.weights import plan_by_path
from marble_jax.world import model_rewards as mr
from marble_jax.world import scenes

NOISES = (0.0, 0.0, 8.0, 16.0, 24.0, 32.0)
BLURS = (0.0, 0.0, 0.0, 0.7, 1.0)
_TRAIN_PLAIN = {p.text for p in scenes.split_prompts("train", ("plain",))}


# ---------------------------------------------------------------- data


def varied_scene(rng: np.random.Generator, names: list[str], colors: list[str], max_size: int = 16) -> scenes.Scene | None:
    """Shapes of random size in [5, max_size] at random non-touching places (None when they do not fit)."""
    prompt = scenes.Prompt("", "plain")
    for _ in range(50):
        shapes: list[scenes.Shape] = []
        for name, color in zip(names, colors, strict=True):
            h, w = scenes.shape_dims(name, int(rng.integers(5, max_size + 1)), bool(rng.random() < 0.5))
            if h > scenes.IMAGE_SIZE - 2 or w > scenes.IMAGE_SIZE - 2:
                break
            for _ in range(30):
                x, y = int(rng.integers(1, scenes.IMAGE_SIZE - w)), int(rng.integers(1, scenes.IMAGE_SIZE - h))
                box = (x, y, x + w, y + h)
                if all(_apart(box, s.box) for s in shapes):
                    shapes.append(scenes.Shape(name, color, box))
                    break
        if len(shapes) == len(names):
            return scenes.Scene(prompt, tuple(shapes))
    return None


def _apart(a, b) -> bool:
    g = scenes.GAP
    return a[0] >= b[2] + g or b[0] >= a[2] + g or a[1] >= b[3] + g or b[1] >= a[3] + g


def random_varied(rng: np.random.Generator, max_objects: int = 5) -> np.ndarray:
    """A clean render of 1..max_objects shapes of random classes, sizes and 1-3 colours."""
    while True:
        n = int(rng.integers(1, max_objects + 1))
        palette = rng.choice(scenes.COLORS, size=int(rng.integers(1, 4)), replace=False)
        names = [scenes.CLASSES[i] for i in rng.integers(len(scenes.CLASSES), size=n)]
        scene = varied_scene(rng, names, [str(c) for c in rng.choice(palette, size=n)], max(6, 18 - 2 * n))
        if scene is not None:
            return scenes.render(scene)


def plain_caption(image: np.ndarray) -> str | None:
    """The world's "plain" caption of a clean render ("red and blue shapes"), if it is a train prompt."""
    rgb = {tuple(int(v) for v in p) for p in image.reshape(-1, 3)} - {scenes.BACKGROUND}
    names = [c for c in scenes.COLORS if scenes.PALETTE[c] in rgb]
    text = f"{' and '.join(names)} shapes"
    return text if text in _TRAIN_PLAIN and len(names) == len(rgb) else None


def clip_data(seed: int, n_scenes: int, n_varied: int) -> tuple[np.ndarray, list[str]]:
    scene_list = scenes.sample_scenes(seed, n_scenes, "train")
    images, captions = list(scenes.render_batch(scene_list)), [s.prompt.text for s in scene_list]
    rng = np.random.default_rng(seed + 1)
    while len(images) < n_scenes + n_varied:
        image = random_varied(rng, 3)
        caption = plain_caption(image)
        if caption is not None:
            images.append(image)
            captions.append(caption)
    return np.stack(images), captions


def fidelity(image: np.ndarray, prompt: scenes.Prompt, own: bool) -> float:
    """Prompt fidelity of a clean image: GenEval partial score, OCR reward, or (plain prompts) scene identity."""
    if prompt.kind == "text":
        return float(rewards.get("world_ocr")(image[None], [prompt.text], [None])[0])
    if prompt.metadata is None:
        return float(own)
    return float(rewards.get("world_geneval")(image[None], [prompt.text], [prompt.metadata])[0])


def preference_pairs(seed: int, n: int, split: str, hps: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(winners, losers, prompts)``: pairs of images for one prompt ordered by :func:`~mr.human_utility`, or
    with ``hps`` by :func:`~mr.hps_utility` (pairs closer than 0.1 in utility are dropped). Candidates are a
    fresh correct scene or another prompt's scene, each with random noise / blur."""
    rng = np.random.default_rng(seed)
    pool = scenes.sample_scenes(seed + 1, 2000, split)
    winners, losers, prompts = [], [], []
    while len(prompts) < n:
        prompt = pool[rng.integers(len(pool))].prompt
        cands = []
        for _ in range(2):
            own = rng.random() < 0.6
            if own:
                scene = scenes.make_scene(prompt, rng)
            else:
                scene = pool[rng.integers(len(pool))]
                while scene.prompt.text == prompt.text:
                    scene = pool[rng.integers(len(pool))]
            clean = scenes.render(scene)
            noise, blur = float(rng.choice(NOISES)), float(rng.choice(BLURS))
            fid = fidelity(clean, prompt, own)
            utility = mr.hps_utility(fid, mr.aesthetic_target(clean), noise, blur) if hps else mr.human_utility(fid, noise, blur)
            cands.append((utility, mr.corrupt(clean, noise, blur, rng)))
        (ua, a), (ub, b) = cands
        if abs(ua - ub) < 0.1:
            continue
        winners.append(a if ua > ub else b)
        losers.append(b if ua > ub else a)
        prompts.append(prompt.text)
    return np.stack(winners), np.stack(losers), prompts


# ---------------------------------------------------------------- training


def _adamw(lr: float, steps: int) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def _run(loss_fn, params, batches, steps: int, lr: float, label: str):
    opt = _adamw(lr, steps)
    state = opt.init(params)

    @jax.jit
    def step(params, state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
        params, state, loss = step(params, state, *batches(i))
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"  {label} step {i}: loss {float(loss):.4f}", flush=True)
    return params


def _embed(fns, params, pixels, ids):
    image = fns[1](params["vision"], pixels)["image_embeds"]
    text = fns[0](params["text"], ids)["text_embeds"]
    return image / jnp.linalg.norm(image, axis=-1, keepdims=True), text / jnp.linalg.norm(text, axis=-1, keepdims=True)


def train_clip(seed: int, steps: int, batch: int, n_scenes: int, n_varied: int) -> clip.CLIP:
    images, captions = clip_data(seed, n_scenes, n_varied)
    pixels, ids = mr.normalize(images), mr.tokenize(captions)
    caption_ids = np.unique(np.array(captions), return_inverse=True)[1]
    key = jax.random.key(seed)
    text_fn, text_params = clip.text_from_config(mr.WORLD_CLIP_CONFIG, key=jax.random.fold_in(key, 0))
    vision_fn, vision_params = clip.vision_from_config(mr.WORLD_CLIP_CONFIG, key=jax.random.fold_in(key, 1))
    fns = (text_fn, vision_fn)
    params = {
        "text": text_params,
        "vision": vision_params,
        "logit_scale": jnp.float32(mr.WORLD_CLIP_CONFIG["logit_scale_init_value"]),
    }

    def loss_fn(params, pixels, ids, same):
        image, text = _embed(fns, params, pixels, ids)
        logits = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0))) * image @ text.T
        target = same / same.sum(-1, keepdims=True)
        return (optax.softmax_cross_entropy(logits, target).mean() + optax.softmax_cross_entropy(logits.T, target).mean()) / 2

    rng = np.random.default_rng(seed + 2)

    def batches(_):
        idx = rng.choice(len(pixels), batch, replace=False)
        c = caption_ids[idx]
        return pixels[idx], ids[idx], (c[:, None] == c[None]).astype(np.float32)

    params = _run(loss_fn, params, batches, steps, 2e-3, "world_clip")
    scale = float(jnp.minimum(params["logit_scale"], np.log(100.0)))
    return clip.CLIP(text=(text_fn, params["text"]), vision=(vision_fn, params["vision"]), logit_scale=scale)


def train_preference(
    base: clip.CLIP, seed: int, steps: int, batch: int, n_pairs: int, name: str, scale: float, hps: bool = False
) -> clip.CLIP:
    """``base`` fine-tuned Bradley-Terry on ``n_pairs`` preference pairs, margin ``scale * (cos_w - cos_l)``."""
    winners, losers, prompts = preference_pairs(seed, n_pairs, "train", hps)
    pw, pl, ids = mr.normalize(winners), mr.normalize(losers), mr.tokenize(prompts)
    fns = (base.text[0], base.vision[0])
    params = {"text": base.text[1], "vision": base.vision[1]}

    def loss_fn(params, pw, pl, ids):
        iw, text = _embed(fns, params, pw, ids)
        il = fns[1](params["vision"], pl)["image_embeds"]
        il = il / jnp.linalg.norm(il, axis=-1, keepdims=True)
        margin = scale * jnp.sum((iw - il) * text, axis=-1)
        return -jax.nn.log_sigmoid(margin).mean()

    rng = np.random.default_rng(seed + 3)

    def batches(_):
        idx = rng.choice(len(ids), batch, replace=False)
        return pw[idx], pl[idx], ids[idx]

    params = _run(loss_fn, params, batches, steps, 5e-4, name)
    return clip.CLIP(text=(fns[0], params["text"]), vision=(fns[1], params["vision"]), logit_scale=base.logit_scale)


AESTHETIC_DIMS = (mr.WORLD_CLIP_CONFIG["projection_dim"], 64, 64, 1)


def aesthetic_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Half varied renders (1-5 objects), half world train scenes, with their :func:`~mr.aesthetic_target`."""
    rng = np.random.default_rng(seed)
    images = [random_varied(rng) for _ in range(n // 2)]
    images += list(scenes.render_batch(scenes.sample_scenes(seed + 1, n - n // 2, "train")))
    return np.stack(images), np.array([mr.aesthetic_target(i) for i in images], np.float32)


def train_aesthetic(base: clip.CLIP, seed: int, steps: int, batch: int, n: int):
    images, targets = aesthetic_data(seed, n)
    emb = np.concatenate([np.asarray(mr.embed_images(base, images[i : i + 512])) for i in range(0, n, 512)])
    apply_fn, params = mr.aesthetic_mlp(AESTHETIC_DIMS, jax.random.key(seed))

    def loss_fn(params, x, y):
        return jnp.mean((apply_fn(params, x) - y) ** 2)

    rng = np.random.default_rng(seed + 4)

    def batches(_):
        idx = rng.choice(n, batch, replace=False)
        return emb[idx], targets[idx]

    return apply_fn, _run(loss_fn, params, batches, steps, 3e-3, "world_aesthetic")


# ---------------------------------------------------------------- files


def save_clip(model: clip.CLIP, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(mr.WORLD_CLIP_CONFIG, indent=1))
    save_file(mr.clip_torch_state(model), str(directory / "model.safetensors"))


def save_aesthetic(params: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"dims": list(AESTHETIC_DIMS), "input": "world_clip unit image_embeds"}))
    save_file(mr.torch_state(params, plan_by_path(params)), str(directory / "model.safetensors"))


# ---------------------------------------------------------------- evaluation


def clean_vs_noisy(reward_fn, seed: int, n: int, noise: float, blur: float) -> float:
    held = scenes.sample_scenes(seed, n, "heldout")
    rng = np.random.default_rng(seed)
    clean = scenes.render_batch(held)
    dirty = np.stack([mr.corrupt(i, noise, blur, rng) for i in clean])
    prompts, meta = [s.prompt.text for s in held], [s.prompt.metadata for s in held]
    return float((reward_fn(clean, prompts, meta) > reward_fn(dirty, prompts, meta)).mean())


def counting_conflict(root: Path, seed: int, per_count: int = 6) -> dict[str, float]:
    """Spearman correlation of world_aesthetic with world_geneval over images of each counting prompt with
    1..count+1 objects of its class (varied sizes and colours): mean over prompts, and pooled."""
    rng = np.random.default_rng(seed)
    aesthetic, geneval = rewards.get("world_aesthetic", root=root), rewards.get("world_geneval")
    per_prompt, pooled_a, pooled_g = {}, [], []
    for split in scenes.SPLITS:
        for p in scenes.split_prompts(split, ("counting",)):
            clause = p.metadata["include"][0]
            images = []
            for k in range(1, clause["count"] + 2):
                while len(images) < k * per_count:
                    colors = [str(c) for c in rng.choice(scenes.COLORS, size=k)]
                    scene = varied_scene(rng, [clause["class"]] * k, colors, max(7, 18 - 2 * k))
                    if scene is not None:
                        images.append(scenes.render(scene))
            images = np.stack(images)
            a = aesthetic(images, [p.text] * len(images), [p.metadata] * len(images))
            g = geneval(images, [p.text] * len(images), [p.metadata] * len(images))
            per_prompt[f"{split}:{p.text}"] = float(spearmanr(a, g).statistic)
            pooled_a.append(a)
            pooled_g.append(g)
    held = [v for k, v in per_prompt.items() if k.startswith("heldout:")]
    return {
        "mean_spearman_all_counting_prompts": float(np.mean(list(per_prompt.values()))),
        "mean_spearman_heldout_counting_prompts": float(np.mean(held)),
        "pooled_spearman": float(spearmanr(np.concatenate(pooled_a), np.concatenate(pooled_g)).statistic),
        "per_prompt": per_prompt,
    }


def evaluate(out: Path, seed: int) -> dict:
    clipscore, pickscore, hps, aesthetic = (
        rewards.get(n, root=out) for n in ("world_clipscore", "world_pickscore", "world_hps", "world_aesthetic")
    )
    report = {
        "clipscore_match_accuracy": mr.match_accuracy(clipscore, seed, 600),
        "pickscore_match_accuracy": mr.match_accuracy(pickscore, seed, 600),
        "hps_match_accuracy": mr.match_accuracy(hps, seed, 600),
        "pickscore_clean_over_noise16": clean_vs_noisy(pickscore, seed, 300, 16.0, 0.0),
        "pickscore_clean_over_blur1": clean_vs_noisy(pickscore, seed, 300, 0.0, 1.0),
        "clipscore_clean_over_noise16": clean_vs_noisy(clipscore, seed, 300, 16.0, 0.0),
    }
    won, lost, p = preference_pairs(seed + 7, 600, "heldout")
    report["pickscore_heldout_pair_accuracy"] = float(
        (pickscore(won, p, [None] * len(p)) > pickscore(lost, p, [None] * len(p))).mean()
    )
    won, lost, p = preference_pairs(seed + 11, 600, "heldout", hps=True)
    report["hps_heldout_pair_accuracy"] = float((hps(won, p, [None] * len(p)) > hps(lost, p, [None] * len(p))).mean())
    images, targets = aesthetic_data(seed + 8, 600)
    pred = aesthetic(images, [""] * len(images), [None] * len(images))
    report["aesthetic_heldout_spearman"] = float(spearmanr(pred, targets).statistic)
    report["aesthetic_heldout_rmse"] = float(np.sqrt(np.mean((pred - targets) ** 2)))
    report["aesthetic_vs_geneval_counting"] = counting_conflict(out, seed + 9)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=mr.ASSETS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests (not for shipping)")
    ap.add_argument("--reuse-clip", action="store_true", help="load world_clip from --out instead of training it")
    args = ap.parse_args()
    q = args.quick
    times = {}
    t = time.time()
    if args.reuse_clip:
        world = mr.load_clip("world_clip", args.out)
    else:
        world = train_clip(args.seed, 30 if q else 1200, 128, 500 if q else 12000, 100 if q else 3000)
        save_clip(world, args.out / "world_clip")
        times["world_clip_s"] = time.time() - t
    t = time.time()
    pick = train_preference(
        world, args.seed + 10, 20 if q else 400, 64, 200 if q else 4000, "world_pickscore", mr.PICKSCORE_SCALE
    )
    save_clip(pick, args.out / "world_pickscore")
    times["world_pickscore_s"], t = time.time() - t, time.time()
    # HPSv2 scores are bare cosines; its Bradley-Terry margin uses PickScore's scale all the same (a usable temperature).
    hps = train_preference(world, args.seed + 30, 20 if q else 400, 64, 200 if q else 4000, "world_hps", mr.PICKSCORE_SCALE, True)
    save_clip(hps, args.out / "world_hps")
    times["world_hps_s"], t = time.time() - t, time.time()
    _, head = train_aesthetic(world, args.seed + 20, 50 if q else 2000, 128, 300 if q else 6000)
    save_aesthetic(head, args.out / "world_aesthetic")
    times["world_aesthetic_s"] = time.time() - t
    mr.load_clip.cache_clear()
    mr.load_aesthetic.cache_clear()
    if args.reuse_clip:  # keep the recorded time of the shipped world_clip
        times = {**json.loads((args.out / "report.json").read_text())["train_seconds"], **times}
    report = {"train_seconds": times, **evaluate(args.out, args.seed + 100)}
    report["bytes"] = {str(f.relative_to(args.out)): f.stat().st_size for f in sorted(args.out.rglob("*")) if f.is_file()}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "aesthetic_vs_geneval_counting"}, indent=1))
    print(json.dumps({k: v for k, v in report["aesthetic_vs_geneval_counting"].items() if k != "per_prompt"}, indent=1))


if __name__ == "__main__":
    main()
