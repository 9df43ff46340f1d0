"""Trains a text-to-image model against several rewards.

    python -m marble_jax.main --config=configs/k5.py [--workdir=runs/k5] [--overwrite] [--config.total_epochs=100]

Without ``config.model.path`` the run uses the embedded world (a tiny model and five offline rewards shipped in
the package) and says so. Re-running the same command resumes from the workdir's latest checkpoint. Multi-host:
``--distributed`` calls ``jax.distributed.initialize()`` (auto-detected on TPU pods, SLURM, ...; or give
``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""

from __future__ import annotations

import logging as std_logging
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from marble_jax import cpu_memory
from marble_jax.checkpoint import quiet_orbax_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file (append :sd35 for the paper's scale)")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "checkpoints, TensorBoard events, samples; default runs/<config name>[_<scale>], e.g. runs/k5_sd35"
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "delete another run's files (no checkpoint) found in --workdir")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --distributed)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --distributed)")
_KEEP_FREED = flags.DEFINE_bool(
    "keep_freed_cpu_memory",
    True,
    "on the CPU backend, keep freed buffers in the process heap for reuse (marble_jax.cpu_memory): a buffer over "
    "32 MiB otherwise faults its whole size in again at every step",
)
flags.mark_flags_as_required(["config"])


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from the flags (CPU collectives over gloo when running on CPU)."""
    if not jax.config.jax_platforms or jax.config.jax_platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    std_logging.getLogger("marble_jax").setLevel(std_logging.INFO)
    quiet_orbax_logs()
    if _DISTRIBUTED.value:
        initialize_distributed()
    if _KEEP_FREED.value and jax.default_backend() == "cpu" and cpu_memory.keep_freed_memory():
        logging.info("CPU backend: freed buffers are kept for reuse (--nokeep_freed_cpu_memory returns them)")
    from marble_jax import experiment, run_log, train

    config = _CONFIG.value
    train.enable_compilation_cache(config.compilation_cache_dir)
    workdir = Path(_WORKDIR.value or run_log.default_workdir(flags.FLAGS["config"].config_filename))
    train.validate(config, train.run_mesh(config).size)  # every config check before any model is loaded
    if not config.model.path:
        logging.info("no config.model.path: training the embedded world (tiny model, offline rewards)")
    logging.info("process %d of %d, %d devices: %s", jax.process_index(), jax.process_count(), jax.device_count(), jax.devices())
    setup = experiment.build_setup(config)
    train.run(setup, config, workdir, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
    app.run(main)
