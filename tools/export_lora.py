"""Export a LoRA run's adapter for PyTorch: diffusers' ``pytorch_lora_weights.safetensors`` with its rank and alpha.

    python tools/export_lora.py --workdir runs/k5_sd35 --out lora_k5 [--params ema] [--step N]

then, in PyTorch::

    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    pipe.load_lora_weights("lora_k5")

The run's latest checkpoint (or ``--step``) is restored with the config it was trained with (``config.json``); for
an SD3 run only the transformer's architecture is read from the snapshot (no weights are loaded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from marble_jax import experiment, train
from marble_jax.models import lora
from marble_jax.models.weights import read_config, resolve_dir


def export(workdir: Path, out: Path, params: str = "ema", step: int | None = None) -> Path:
    """Writes ``workdir``'s trained LoRA (``params``: ``ema`` or ``params``) to ``out``; returns the file.

    Raises:
      ValueError: the run is not a LoRA run.
      FileNotFoundError: no ``config.json`` or no readable checkpoint in ``workdir``.
    """
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir of marble_jax.train")
    config = train.saved_config(json.loads(path.read_text())["config"])
    if config.finetune != "lora":
        raise ValueError(f"{workdir} fine-tuned every weight (config.finetune = {config.finetune!r}): there is no LoRA")
    config.lora.init_from = ""  # the trained adapter comes from the checkpoint
    if config.model.path:
        transformer = read_config(resolve_dir(config.model.path) / "transformer")
        setup = experiment.abstract_sd3_setup(config, transformer)
    else:
        setup = experiment.build_setup(config)
    _, state = train.restore_run(setup, config, workdir, step)
    tree = state.ema_params if params == "ema" else state.params
    return lora.export_peft(jax.tree.map(np.asarray, tree), setup.lora_spec, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--params", choices=("ema", "params"), default="ema")
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    print(f"wrote {export(args.workdir, args.out, args.params, args.step)}")


if __name__ == "__main__":
    main()
