"""marble_jax: multi-reward RL fine-tuning of text-to-image diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

TEST = [
    # The CPU wheel of torch: an unpinned torch pulls several GB of CUDA libraries.
    "torch==2.13.0",
    "diffusers>=0.42",
    "scipy>=1.11",
    "quadprog>=0.1.12",
    "torchjd>=0.18",
    "pytest>=8",
    "ruff>=0.15",
    "peft>=0.17",  # diffusers needs it to load LoRA files (the LoRA export test)
]

setup(
    name="marble_jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["marble_jax", "marble_jax.*"]),
    package_data={"marble_jax": ["**/*.json", "**/*.msgpack", "**/*.txt", "**/*.safetensors", "csrc/*.cc"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "einops>=0.8",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "safetensors>=0.4",
        "transformers>=5.0",
        "absl-py>=2.0",
        "pillow>=10.0",
        # clu's metric writers (TensorBoard event files) need TensorFlow; the CPU wheel is enough.
        "clu>=0.0.12",
        "tensorflow-cpu>=2.16",
        "tensorboard>=2.16",
        "matplotlib>=3.8",  # tools/reproduce_marble.py's reward curves
        "pytesseract>=0.3.10",  # the OCR reward's default engine (needs Debian's tesseract-ocr)
    ],
    extras_require={
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "test": TEST,
        "imagereward": ["image-reward>=1.5"],  # the evaluation-only ImageReward column
        "paddleocr": ["paddleocr", "paddlepaddle"],  # the OCR reward's optional engine (engine="paddle")
    },
)
