"""Evaluation-only rewards: ImageReward's glue (over a test double of the image-reward package) and
UnifiedReward against a real local HTTP server speaking the chat-completions protocol."""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from marble_jax.rewards.eval_only import UNIFIED_REWARD_QUESTION, final_score, imagereward, unified_reward


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- ImageReward


def fake_image_reward_module(calls: list) -> types.ModuleType:
    """TEST DOUBLE of the ``image-reward`` package's API (``ImageReward.load(name, device, download_root,
    med_config)`` -> a model whose ``score(prompt, [PIL images])`` returns a float for one image and a list
    for several, as the package's squeezed rewards do). Its score is a made-up function of the prompt and
    the pixels, so the glue's bookkeeping can be checked."""

    class FakeModel:
        def score(self, prompt, images):
            assert isinstance(images, list) and all(isinstance(im, Image.Image) for im in images)
            calls.append(("score", prompt, [np.asarray(im) for im in images]))
            rewards = [len(prompt) + float(np.asarray(im, np.float64).mean()) / 255 for im in images]
            return rewards[0] if len(rewards) == 1 else rewards

    def load(name="ImageReward-v1.0", device="cpu", download_root=None, med_config=None):
        calls.append(("load", name, device, med_config))
        return FakeModel()

    module = types.ModuleType("ImageReward")
    module.load = load
    return module


def test_imagereward_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(ImportError, match=r"pip install 'marble_jax\[imagereward\]'"):
        imagereward()


def test_imagereward_scores_each_image_with_its_prompt(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "ImageReward", fake_image_reward_module(calls))
    checkpoint, med_config = tmp_path / "ImageReward.pt", tmp_path / "med_config.json"
    checkpoint.write_bytes(b"")
    med_config.write_text("{}")
    reward_fn = imagereward(path=str(checkpoint), med_config=str(med_config), device="cpu")
    assert calls == [("load", str(checkpoint), "cpu", str(med_config))]

    images = random_images(5)
    prompts = ["a cat", "a red dog", "a cat", "a cat", "a bird"]
    rewards = reward_fn(images, prompts, [None] * 5)

    expected = [len(p) + images[i].astype(np.float64).mean() / 255 for i, p in enumerate(prompts)]
    assert rewards.dtype == np.float32
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)  # float64 scores rounded once to float32: <= 6e-8
    scored = calls[1:]
    assert [c[1] for c in scored] == ["a cat", "a red dog", "a bird"]  # one call per distinct prompt
    for got, want in zip(scored[0][2], images[[0, 2, 3]], strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(scored[1][2][0], images[1])


def test_imagereward_missing_checkpoint_names_the_public_one(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ImageReward", fake_image_reward_module([]))
    with pytest.raises(FileNotFoundError, match="nope.pt.*THUDM/ImageReward"):
        imagereward(path=str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="med_config.json.*THUDM/ImageReward"):
        imagereward(med_config=str(tmp_path / "med_config.json"))


# -------------------------------------------------------------------------------------------- UnifiedReward


class ChatServer:
    """A real HTTP server on 127.0.0.1 answering POST /v1/chat/completions with canned replies chosen by
    the caption: "good" -> "Final Score: 4", "ramble" -> a reply without a score, "crash" -> HTTP 500."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                text = body["messages"][0]["content"][1]["text"]
                if "crash" in text:
                    self.send_error(500, "model exploded")
                    return
                content = "Alignment: fine.\nFinal Score: 4" if "good" in text else "I would rather not say."
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def decode_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
    assert image.format == "PNG"
    return np.asarray(image)


def test_unified_reward_against_a_local_server(monkeypatch, caplog):
    monkeypatch.setenv("MARBLE_TEST_UR_KEY", "secret-token")
    images = random_images(3, seed=1)
    prompts = ["a good cat", "a cat that makes the model ramble", "another good cat"]
    with ChatServer() as server:
        reward_fn = unified_reward(server.endpoint + "/", "UnifiedReward-qwen-7b", api_key_env="MARBLE_TEST_UR_KEY")
        with caplog.at_level(logging.WARNING, logger="marble_jax.rewards.eval_only"):
            rewards = reward_fn(images, prompts, [None] * 3)

    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards[[0, 2]], np.float32([0.8, 0.8]))
    assert np.isnan(rewards[1])
    assert "sample 1" in caplog.text and "ramble" in caplog.text

    assert len(server.requests) == 3
    for path, headers, body in server.requests:
        assert path == "/v1/chat/completions"
        assert headers["Authorization"] == "Bearer secret-token"
        assert body["model"] == "UnifiedReward-qwen-7b"
        assert body["temperature"] == 0
        (message,) = body["messages"]
        assert message["role"] == "user"
        image_part, text_part = message["content"]
        assert image_part["type"] == "image_url" and text_part["type"] == "text"
        i = next(k for k, p in enumerate(prompts) if f"Text Caption: [{p}]" in text_part["text"])
        assert text_part["text"] == UNIFIED_REWARD_QUESTION.format(prompt=prompts[i])
        np.testing.assert_array_equal(decode_data_url(image_part["image_url"]["url"]), images[i])


def test_unified_reward_http_error_names_endpoint_and_status(monkeypatch):
    monkeypatch.delenv("MARBLE_TEST_UR_KEY", raising=False)
    with ChatServer() as server:
        reward_fn = unified_reward(server.endpoint, "UnifiedReward-qwen-7b", api_key_env="MARBLE_TEST_UR_KEY")
        with pytest.raises(RuntimeError, match=rf"{server.endpoint}/chat/completions answered HTTP 500"):
            reward_fn(random_images(2), ["a good cat", "a crash"], [None, None])
    assert all("Authorization" not in headers for _, headers, _ in server.requests)


def test_unified_reward_unreachable_endpoint():
    with ChatServer() as server:
        endpoint = server.endpoint
    reward_fn = unified_reward(endpoint, "m", timeout=5)
    with pytest.raises(RuntimeError, match=rf"cannot reach {endpoint}/chat/completions"):
        reward_fn(random_images(1), ["a good cat"], [None])


def test_final_score_parsing():
    assert final_score("Final Score: 4.5", 5.0) == 4.5
    assert final_score("Final Score: 2\n... on reflection, Final Score:3", 5.0) == 3.0  # the last one
    assert np.isnan(final_score("Final Score: 7", 5.0))  # outside [0, max_score]
    assert np.isnan(final_score("no score here", 5.0))
