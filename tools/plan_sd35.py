"""Plan the trainer's own SD3.5-Medium epoch update on an 8-device mesh, without weights or accelerators.

    python tools/plan_sd35.py [--rows lora:weighted_sum,lora:marble_gram,full:weighted_sum] [--devices 8]
                              [--config configs/k5.py:sd35] [--set sample.train_batch=32 ...]

Each row lowers and compiles ``train.jit_train_step`` (the jitted :func:`marble_jax.train.make_train_step` that
``train.run`` compiles, with the same abstract arguments and shardings: no copy of it) for the ``k5:sd35``
configuration: SD3.5-M (``sd3_configs.SD35_MEDIUM_TRANSFORMER``) at 512 px, 48 prompts x 24 images, 24 trained
timesteps, bf16 compute over fp32 master weights, the frozen base in bf16, on the mesh the placement rule gives
(``sharding.default_mesh_shape``) over 8 host CPU devices. Printed per row, per device: XLA's argument, output,
temporary and peak memory (arguments + outputs + temporaries - donated aliases), the FLOPs of one epoch's update
(``throughput.jaxpr_flops``: XLA's ``cost_analysis`` counts a loop body once), the compile time, and the update's
time at 40% MFU on H200s (989 TFLOP/s dense bf16 each).

The compiler is XLA:CPU, so memory is its buffer assignment (GPU fusion and rematerialisation choices differ
somewhat); FLOPs are a property of the program.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402

from marble_jax import experiment, throughput, train  # noqa: E402
from marble_jax.experiment import Setup  # noqa: E402
from marble_jax.models.sd3_configs import SD35_MEDIUM_TRANSFORMER  # noqa: E402

H200_BF16_FLOPS = throughput.PEAK_FLOPS["H200"]
GB = 1024**3


@dataclasses.dataclass(frozen=True)
class Plan:
    """One compiled update: per-device bytes, FLOPs over all devices, compile seconds, the mesh and its HLO."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    compile_s: float
    mesh_shape: dict
    hlo: str

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def plan(setup: Setup, config: ml_collections.ConfigDict, solve: bool = True, diagnose: bool = False) -> Plan:
    """Lowers and compiles the trainer's update of ``setup`` / ``config`` on ``train.run_mesh(config)``."""
    mesh = train.run_mesh(config)
    start = time.perf_counter()
    step, args = train.jit_train_step(setup, config, train.make_optimizer(config), mesh)
    traced = step.trace(*args, solve, diagnose)
    lowered = traced.lower()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return Plan(
        mem.argument_size_in_bytes,
        mem.output_size_in_bytes,
        mem.temp_size_in_bytes,
        mem.alias_size_in_bytes,
        throughput.jaxpr_flops(traced.jaxpr),
        seconds,
        dict(mesh.shape),
        lowered.as_text(),
    )


def sd35_config(path: str, finetune: str, method: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """``get_config("sd35")`` of the config file ``path`` with ``finetune``, ``method`` and ``key=value`` overrides."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("plan_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or "sd35")
    config.finetune, config.method = finetune, method
    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        old = node[last]
        if isinstance(old, bool):
            node[last] = {"true": True, "false": False}[value.lower()]
        else:
            node[last] = type(old)(value) if old is not None else value
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="lora:weighted_sum,lora:marble_gram,full:weighted_sum")
    parser.add_argument("--config", default="configs/k5.py:sd35")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value, e.g. sample.train_batch=32")
    args = parser.parse_args(argv)
    header = ("tuning", "method", "mesh", "args GB", "out GB", "temp GB", "peak GB", "PFLOP", "s @40%", "compile s")
    widths = (7, 15, 10, 9, 8, 9, 9, 8, 8, 11)
    print(f"{len(jax.devices())} devices; config {args.config} {' '.join(args.set)}")
    print("".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)), flush=True)
    for row in args.rows.split(","):
        finetune, method = row.split(":")
        config = sd35_config(args.config, finetune, method, args.set)
        config.model.path = config.model.path or "(abstract)"  # planned from the architecture, no snapshot read
        train.validate(config, len(jax.devices()))
        setup = experiment.abstract_sd3_setup(config, SD35_MEDIUM_TRANSFORMER)
        p = plan(setup, config)
        seconds = p.flops / (0.4 * H200_BF16_FLOPS * len(jax.devices()))
        cells = (
            finetune,
            method,
            "x".join(str(v) for v in p.mesh_shape.values()),
            f"{p.argument_bytes / GB:.2f}",
            f"{p.output_bytes / GB:.2f}",
            f"{p.temp_bytes / GB:.2f}",
            f"{p.peak_bytes / GB:.2f}",
            f"{p.flops / 1e15:.1f}",
            f"{seconds:.0f}",
            f"{p.compile_s:.0f}",
        )
        print("".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)), flush=True)


if __name__ == "__main__":
    main()
