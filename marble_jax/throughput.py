"""Where a step's time goes: per-phase wall times, images per second, and model FLOPs utilisation (MFU).

FLOPs are counted on the program's jaxpr (:func:`jaxpr_flops`), not taken from XLA's ``cost_analysis()``: XLA counts
the body of a loop once, whatever its trip count (measured: a ``lax.scan`` of 10 matmuls reports the FLOPs of one),
and the trainer's update is a scan over micro-batches around a scan over blocks. The count is of matrix products
and convolutions (``dot_general``, ``conv_general_dilated``), the work an accelerator's peak is quoted for, with
every ``scan`` multiplied by its length and rematerialised forwards included (hardware FLOPs, as XLA would count
them). MFU is those FLOPs over the wall time and the devices' dense bf16 peak (:data:`PEAK_FLOPS`, by device kind).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}
"""Dense bf16 peak FLOP/s per device, matched as a substring of ``device.device_kind`` (longest match first)."""


def peak_flops(device: Any) -> float | None:
    """The dense bf16 peak of ``device`` (a ``jax.Device``), None when unknown (CPUs)."""
    kind = str(getattr(device, "device_kind", ""))
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name]
    return None


def _eqn_flops(eqn: Any) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        contracted = math.prod(lhs[i] for i in lhs_contract)
        return 2.0 * math.prod(out) * contracted
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        dn = eqn.params["dimension_numbers"]
        out = eqn.outvars[0].aval.shape
        kernel_spatial = math.prod(rhs[i] for i in dn.rhs_spec[2:])
        in_features = rhs[dn.rhs_spec[1]]
        return 2.0 * math.prod(out) * kernel_spatial * in_features / eqn.params["feature_group_count"]
    return 0.0


def sub_jaxprs(value: Any) -> Iterator[Any]:
    """The jaxprs inside one equation parameter's ``value`` (a ``Jaxpr``, ``ClosedJaxpr`` or nested tuples of them)."""
    if isinstance(value, jex.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from sub_jaxprs(v)


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs of a (closed) jaxpr's matrix products and convolutions, scans multiplied by their length, a ``cond``
    counted as its costliest branch, a ``while`` body once (its trip count is data-dependent)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        if eqn.primitive.name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
            continue
        inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in sub_jaxprs(v))
        total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def program_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
    """FLOPs (:func:`jaxpr_flops`) of ``fn(*args, **kwargs)`` over all devices; args may be ``ShapeDtypeStruct``."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


class PhaseTimer:
    """Wall seconds per named phase of one step: ``with timer.phase("rollout"): ...``; phases may repeat (summed)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def mfu(flops: float, seconds: float, devices: list) -> float:
    """``flops`` (over all ``devices``) in ``seconds`` over their peak; NaN when a peak is unknown or no time passed."""
    peaks = [peak_flops(d) for d in devices]
    if not devices or seconds <= 0 or any(p is None for p in peaks):
        return float("nan")
    return float(flops / (seconds * np.sum(peaks)))
