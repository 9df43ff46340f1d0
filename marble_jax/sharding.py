"""The device mesh and the shardings of parameters and batches (the one place that knows them).

One 2-D mesh ``(data, fsdp)`` over all devices. Batches are split over both axes; trained parameters
(and everything shaped like them: optimizer moments, old / EMA copies, per-reward gradients
after their leading K axis) are fully sharded over ``fsdp`` along their largest divisible
axis and replicated over ``data``; leaves too small to be worth splitting stay replicated.

The placement rule (:func:`default_mesh_shape`, :func:`frozen_shardings`): frozen weights (a LoRA's base, the
reference policy) are held in the compute dtype and replicated on every device where they fit (SD3.5-M's 2.2B
parameters are 4.5 GB in bf16), so no forward all-gathers them; trained weights are FSDP-sharded only when they
are large (full fine-tuning: master weights, two Adam moments, old and EMA copies). So a LoRA run is data-parallel
(``data`` = all devices, ``fsdp`` = 1) and a full fine-tuning run is FSDP within each host (``fsdp`` = the host's
devices) and data-parallel across hosts.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
BATCH_AXES = ("data", "fsdp")
log = logging.getLogger(__name__)


def make_mesh(data: int | None = None, fsdp: int | None = None, devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default all). Give one size or both; by default
    all devices go to ``fsdp``.

    Over several hosts (processes) the mesh is hybrid (``mesh_utils.create_hybrid_device_mesh``): ``data`` spans the
    hosts over the slower data-centre network, each host's devices hold whole ``fsdp`` groups, so the parameter
    all-gathers stay on the fast links within a host and only gradients cross hosts. That needs ``data`` to be a
    multiple of the hosts and ``fsdp`` to divide each host's device count; otherwise the devices are laid out in
    order, with a warning.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    if data is None and fsdp is None:
        data, fsdp = 1, n
    elif data is None:
        data = n // fsdp
    elif fsdp is None:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
    hosts = len({d.process_index for d in devices.flat})
    if hosts > 1:
        if data % hosts == 0:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_hybrid_device_mesh(
                (data // hosts, fsdp), (hosts, 1), list(devices.flat), process_is_granule=True
            )
            return Mesh(grid, BATCH_AXES)
        log.warning("mesh data=%d over %d hosts: fsdp groups cross hosts (make data a multiple of the hosts)", data, hosts)
    return Mesh(devices.reshape(data, fsdp), BATCH_AXES)


REPLICATED_FROZEN_BYTES = 16 * 2**30
"""Frozen weights up to this size per copy are replicated (:func:`frozen_shardings`); larger ones are FSDP-sharded."""


def default_mesh_shape(num_devices: int, num_hosts: int, finetune: str) -> tuple[int, int]:
    """``(data, fsdp)`` of the placement rule (module doc): LoRA ``(n, 1)``; full fine-tuning ``(hosts, n / hosts)``."""
    if finetune == "full":
        return num_hosts, num_devices // num_hosts
    return num_devices, 1


def frozen_shardings(tree: PyTree, mesh: Mesh, max_replicated_bytes: int = REPLICATED_FROZEN_BYTES) -> PyTree:
    """Shardings of frozen weights: replicated when the whole tree (leaves with ``shape`` and ``dtype``) is at most
    ``max_replicated_bytes``, else FSDP as :func:`param_shardings`."""
    size = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    if size <= max_replicated_bytes:
        rep = replicated(mesh)
        return jax.tree.map(lambda _: rep, tree)
    return param_shardings(tree, mesh)


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14, leading: int = 0) -> PartitionSpec:
    """FSDP spec of one leaf: its largest axis divisible by ``fsdp_size`` goes to ``fsdp``.

    ``leading`` axes (e.g. the K of stacked per-reward gradients) are never split.
    """
    dims = [None] * len(shape)
    if fsdp_size > 1 and int(np.prod(shape[leading:], dtype=np.int64)) >= min_size:
        candidates = [i for i in range(leading, len(shape)) if shape[i] % fsdp_size == 0]
        if candidates:
            dims[max(candidates, key=lambda i: shape[i])] = "fsdp"
    return PartitionSpec(*dims)


def param_shardings(tree: PyTree, mesh: Mesh, leading: int = 0) -> PyTree:
    """``NamedSharding`` per leaf of a parameter-shaped pytree (leaves with ``.shape``)."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), size, leading=leading)), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over ``(data, fsdp)``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array of host data ``x`` (the same full array on every process) placed with ``sharding``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [n], values [n, ...])``: the distinct leading-axis rows of a batch-sharded global array that this
    process holds, ascending (all rows on one process), so that host work on them (rewards) is not repeated on
    every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.arange(x.shape[0]), np.asarray(x)
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        pieces.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    starts = sorted(pieces)
    rows = np.concatenate([np.arange(s, s + pieces[s].shape[0]) for s in starts])
    return rows, np.concatenate([pieces[s] for s in starts])


def gather_rows(rows: np.ndarray, values: np.ndarray, total: int) -> np.ndarray:
    """The full ``[total, ...]`` array, on every process, from each process's :func:`local_rows` ``(rows, values)``.

    Raises:
      ValueError: when the processes' rows do not cover ``0 .. total - 1``.
    """
    rows, values = np.asarray(rows), np.asarray(values)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1)
        values = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, *values.shape[1:])
    if sorted(set(rows.tolist())) != list(range(total)):
        raise ValueError(f"gather_rows: the processes hold rows {sorted(set(rows.tolist()))}, not 0..{total - 1}")
    out = np.empty((total, *values.shape[1:]), values.dtype)
    out[rows] = values
    return out


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True on any process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
