"""The paper's evaluation table from checkpoints: every held-out reward per run, plus the Composite z-score.

    python -m marble_jax.evaluate --config=configs/k5.py --checkpoint=runs/k5 --checkpoint=runs/weighted_sum \\
        [--step=N] [--out=runs/table]

Rows: ``base`` (the model without fine-tuning) and one per ``--checkpoint`` workdir (named after it), scored on
the EMA parameters of its latest (or ``--step``) checkpoint with the same prompts and the same noise
(``config.eval``). Each run is restored and sampled with the config it was trained with (its ``config.json``: LoRA
scale, fine-tuning mode, rewards), not the command line's. Writes ``<out>.md`` and ``<out>.csv``
(:mod:`marble_jax.results_table`) and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from marble_jax import results_table, sharding, train
from marble_jax.checkpoint import quiet_orbax_logs
from marble_jax.experiment import Setup, build_setup
from marble_jax.scoring import Evaluator

PyTree = Any

# The command line's flags exist only when this module runs as a program: the module is also a library
# (tools import it), and absl flags defined at import clash with another command's of the same name.
if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "the evaluation's config (prompts, noise, rewards); each run is restored with its own config.json"
    )
    _CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", [], "a training workdir (repeat the flag for several runs)")
    _STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the latest)")
    _OUT = flags.DEFINE_string("out", "eval_table", "output path without extension: <out>.md and <out>.csv")
    flags.mark_flags_as_required(["config"])


MODEL_KEYS = ("model", "finetune", "lora")
"""Config entries that define a trained model (its base, what is trained, the LoRA's rank and scale)."""


def run_setup(setup: Setup, config: ml_collections.ConfigDict, workdir: Path) -> tuple[Setup, ml_collections.ConfigDict]:
    """``(setup, config)`` of the run in ``workdir``, as it was trained (its ``config.json``): the state is restored
    and sampled with the run's own model entries (:data:`MODEL_KEYS`), optimizer and rewards, on this command's mesh;
    the prompts, noise and rewards it is scored with stay this command's. ``setup`` is reused when the model entries
    agree, else the run's model is built."""
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint={workdir}: no {path} (the config the run was trained with)")
    run_config = train.saved_config(json.loads(path.read_text())["config"])
    run_config.mesh = config.mesh
    run_config.lora.init_from = ""  # the trained adapter comes from the checkpoint
    same = all(json.dumps(run_config[k].to_dict() if hasattr(run_config[k], "to_dict") else run_config[k], sort_keys=True)
               == json.dumps(config[k].to_dict() if hasattr(config[k], "to_dict") else config[k], sort_keys=True)
               for k in MODEL_KEYS)  # fmt: skip
    if same:
        return setup, run_config
    built = build_setup(run_config)
    return dataclasses.replace(built, eval_prompts=setup.eval_prompts, eval_rewards=setup.eval_rewards), run_config


def evaluate_runs(
    setup: Setup, config: ml_collections.ConfigDict, workdirs: Sequence[str | Path], step: int | None = None
) -> dict[str, dict[str, float]]:
    """``{row: {reward: held-out mean}}`` for ``base`` and each workdir's EMA parameters, each run restored and
    sampled as it was trained (:func:`run_setup`), all scored on the same prompts and noise.

    Raises:
      FileNotFoundError: a workdir without a readable checkpoint (or without ``step``), or without its config.json.
    """
    mesh = train.run_mesh(config)
    placed_setups: dict[int, tuple[Evaluator, PyTree, PyTree]] = {}

    def placed(s: Setup, c: ml_collections.ConfigDict) -> tuple[Evaluator, PyTree, PyTree]:
        """The evaluator of ``s`` and its base (held as the trainer holds it under config ``c``:
        :func:`marble_jax.train.place_frozen`) and decoder parameters on the mesh, placed once per setup."""
        if id(s) not in placed_setups:
            base = train.place_frozen(s, c, mesh)
            decode = jax.device_put(s.decode_params, sharding.replicated(mesh))
            placed_setups[id(s)] = (Evaluator(s, config, mesh), base, decode)
        return placed_setups[id(s)]

    evaluator, base, decode_params = placed(setup, config)
    rows = {"base": evaluator.scores(evaluator.images(None, base, decode_params))}
    for workdir in workdirs:
        workdir = Path(workdir)
        own_setup, own_config = run_setup(setup, config, workdir)
        got_step, state = train.restore_run(own_setup, own_config, workdir, step)
        evaluator, base, decode_params = placed(own_setup, own_config)
        rows[workdir.name] = evaluator.scores(evaluator.images(state.ema_params, base, decode_params))
        logging.info("%s (step %d): %s", workdir.name, got_step, rows[workdir.name])
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    std_logging.getLogger("marble_jax").setLevel(std_logging.INFO)
    quiet_orbax_logs()
    config = _CONFIG.value
    for workdir in _CHECKPOINTS.value:
        if not (Path(workdir) / "checkpoints").is_dir():
            raise FileNotFoundError(f"--checkpoint={workdir}: no checkpoints directory {Path(workdir) / 'checkpoints'}")
    rows = evaluate_runs(build_setup(config), config, _CHECKPOINTS.value, _STEP.value)
    columns = list(dict.fromkeys([*config.rewards, *config.eval_only_rewards]))
    md, csv = results_table.write_table(rows, columns, Path(_OUT.value))
    print(results_table.to_markdown(rows, columns))
    print(f"wrote {md} and {csv}")


if __name__ == "__main__":
    app.run(main)
