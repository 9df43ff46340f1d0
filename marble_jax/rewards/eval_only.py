"""Evaluation-only rewards of the paper's table: ImageReward and UnifiedReward ("UniReward").

- ``imagereward``: the ImageReward model (BLIP + MLP head) through the optional ``image-reward``
  package (``import ImageReward``), PyTorch on ``device``. Scores are the package's normalised
  rewards, one per image, the images of one prompt scored in one ``model.score(prompt, [PIL images])``
  call.
- ``unified_reward``: UnifiedReward (e.g. ``CodeGoat24/UnifiedReward-qwen-7b``) served behind an
  OpenAI-compatible chat-completions endpoint (vLLM, SGLang). Each image is sent as a base64 PNG data
  URL with the point-score instruction of the public Flow-GRPO scorer (``UNIFIED_REWARD_QUESTION``:
  caption alignment and image quality, "assign a score from 1 to 5 after 'Final Score:'"), at
  temperature 0; the reward is the last ``Final Score: x`` of the reply divided by ``max_score``
  (Flow-GRPO divides by 5). A reply without a score in ``[0, max_score]`` gives NaN and a logged
  warning naming the sample; HTTP and connection errors raise, naming the endpoint. Only the standard
  library is used (urllib, one thread per request in flight). Differences from Flow-GRPO: the image
  is sent at its own size (Flow-GRPO resizes to 512x512, the size SD3.5-M generates in the paper), and
  a reply without a score is NaN rather than 0.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGEREWARD_MODELS = ("ImageReward-v1.0",)  # names the package downloads itself from the Hugging Face hub

UNIFIED_REWARD_QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to "
    "evaluate this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image "
    "aligns with the provided caption. Consider the accuracy of depicted objects, their relationships, and "
    "attributes as described in the caption.\n2. Overall Image Quality: Examine the visual quality of this "
    "image, including clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nBased on the "
    "above criteria, assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
FINAL_SCORE = re.compile(r"Final Score:\s*(\d+(?:\.\d+)?)")


def imagereward(path: str = "ImageReward-v1.0", med_config: str | None = None, device: str = "cpu"):
    """The ImageReward reward function: ``path`` is ``"ImageReward-v1.0"`` (downloaded by the package) or
    a local ``ImageReward.pt``; ``med_config`` the BLIP ``med_config.json`` (None: downloaded)."""
    try:
        import ImageReward as RM
    except ImportError as e:
        raise ImportError(
            "reward 'imagereward' needs the ImageReward package (image-reward), which is not installed: "
            "pip install 'marble_jax[imagereward]'"
        ) from e
    import torch

    if path not in IMAGEREWARD_MODELS and not os.path.isfile(path):
        raise FileNotFoundError(
            f"reward 'imagereward': path={path!r} is neither {IMAGEREWARD_MODELS[0]!r} (downloaded by the package) nor a "
            "file; download ImageReward.pt from THUDM/ImageReward there"
        )
    if med_config is not None and not os.path.isfile(med_config):
        raise FileNotFoundError(
            f"reward 'imagereward': med_config={med_config!r} is not a file; download med_config.json from "
            "THUDM/ImageReward there"
        )
    model = RM.load(path, device=device, med_config=med_config)

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """ImageReward of each image for its prompt: float32 ``[B]``."""
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        out = np.empty(len(prompts), np.float32)
        with torch.no_grad():
            for prompt, index in groups.items():
                # One image gives a float (the package squeezes its [1] rewards), several a list.
                out[index] = np.atleast_1d(model.score(prompt, [Image.fromarray(images[i]) for i in index]))
        return out

    return reward_fn


def unified_reward(
    endpoint: str,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 60,
    max_score: float = 5.0,
    workers: int = 8,
):
    """The UnifiedReward reward function asking the chat-completions server at ``endpoint`` (e.g.
    ``http://127.0.0.1:8000/v1``) for model ``model``; the bearer token is read from the environment
    variable ``api_key_env`` when set; ``workers`` requests in flight."""
    url = endpoint.rstrip("/") + "/chat/completions"
    api_key = os.environ.get(api_key_env)

    def ask(image: np.ndarray, prompt: str) -> str:
        body = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                        {"type": "text", "text": UNIFIED_REWARD_QUESTION.format(prompt=prompt)},
                    ],
                }
            ],
            "temperature": 0,
        }
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"reward 'unified_reward': {url} answered HTTP {e.code} {e.reason}: {detail}") from e
        except urllib.error.URLError as e:
            raise RuntimeError(f"reward 'unified_reward': cannot reach {url}: {e.reason}") from e
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"reward 'unified_reward': {url} sent no choices[0].message.content: {str(reply)[:500]}") from e

    def reward_fn(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict | None]) -> np.ndarray:
        """UnifiedReward score of each image for its prompt over ``max_score``: float32 ``[B]``, NaN where
        the reply holds no score."""
        with ThreadPoolExecutor(max(1, min(workers, len(prompts)))) as pool:
            replies = list(pool.map(ask, images, prompts))
        out = np.empty(len(prompts), np.float32)
        for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            score = final_score(reply, max_score)
            if math.isnan(score):
                log.warning(
                    "unified_reward: no 'Final Score: x' with x in [0, %g] in the reply for sample %d (prompt %r): %r",
                    max_score,
                    i,
                    prompt,
                    reply[-300:],
                )
            out[i] = score / max_score
        return out

    return reward_fn


def png_data_url(image: np.ndarray) -> str:
    """``data:image/png;base64,...`` of one uint8 ``[H, W, 3]`` image."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def final_score(reply: str, max_score: float) -> float:
    """The last ``Final Score: x`` of ``reply``, NaN without one or when ``x`` is outside ``[0, max_score]``."""
    found = FINAL_SCORE.findall(reply)
    if not found or not 0 <= float(found[-1]) <= max_score:
        return float("nan")
    return float(found[-1])
