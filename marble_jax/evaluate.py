"""The paper's evaluation table from checkpoints: every held-out reward per run, plus the Composite z-score.

    python -m marble_jax.evaluate --config=configs/k5.py --checkpoint=runs/k5 --checkpoint=runs/weighted_sum \\
        [--step=N] [--out=runs/table]

Rows: ``base`` (the model without fine-tuning) and one per ``--checkpoint`` workdir (named after it), scored on
the EMA parameters of its latest (or ``--step``) checkpoint with the same prompts and the same noise
(``config.eval``). Writes ``<out>.md`` and ``<out>.csv`` (:mod:`marble_jax.results_table`) and prints the table.
"""

from __future__ import annotations

import logging as std_logging
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from marble_jax import results_table, sharding, train
from marble_jax.checkpoint import quiet_orbax_logs
from marble_jax.experiment import Setup, build_setup
from marble_jax.scoring import Evaluator

_CONFIG = config_flags.DEFINE_config_file("config", None, "the config the checkpoints were trained with")
_CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", [], "a training workdir (repeat the flag for several runs)")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the latest)")
_OUT = flags.DEFINE_string("out", "eval_table", "output path without extension: <out>.md and <out>.csv")
flags.mark_flags_as_required(["config"])


def evaluate_runs(
    setup: Setup, config: ml_collections.ConfigDict, workdirs: Sequence[str | Path], step: int | None = None
) -> dict[str, dict[str, float]]:
    """``{row: {reward: held-out mean}}`` for ``base`` and each workdir's EMA parameters.

    Raises:
      FileNotFoundError: a workdir without a readable checkpoint (or without ``step``).
    """
    mesh = train.run_mesh(config)
    base = jax.device_put(setup.base_params, sharding.param_shardings(setup.base_params, mesh))
    decode_params = jax.device_put(setup.decode_params, sharding.replicated(mesh))
    evaluator = Evaluator(setup, config, mesh)
    rows = {"base": evaluator.scores(evaluator.images(None, base, decode_params))}
    for workdir in workdirs:
        workdir = Path(workdir)
        got_step, state = train.restore_run(setup, config, workdir, step)
        name = workdir.name
        rows[name] = evaluator.scores(evaluator.images(state.ema_params, base, decode_params))
        logging.info("%s (step %d): %s", name, got_step, rows[name])
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
