"""The native CPU kernels of the MGDA step (``csrc/cpu_kernels.cc``): building, loading and calling them through XLA's FFI.

Both run over float32 operands ``x_o [K, n_o]`` (one gradient per row) on XLA's CPU thread pool, in a fixed order
(see the source's header for the orders and their rounding bounds):

* :func:`gram_f32`: ``G [K, K] = sum_o x_o x_o^T`` in one pass over the operands;
* :func:`combine_f32`: ``y_o = c^T x_o [n_o]`` for coefficients ``c [K]``, in one pass, writing its fresh results on
  transparent huge pages where the kernel allows it (a fresh result over glibc's mmap threshold otherwise faults in
  4 KiB at a time: 9766 faults for 40 MB, more time than the pass itself).

:mod:`marble_jax.mgda` uses them for float32 leaves on CPU in a one-device process (XLA does not partition a custom
call: it would gather operands sharded over several devices).

Build: on the first :func:`available` in a process, ``$CXX`` (default ``g++``) compiles the source with
:data:`FLAGS` and ``-I jax.ffi.include_dir()`` into a shared library in the cache directory ``$MARBLE_JAX_CACHE``
(default ``~/.cache/marble_jax/ffi``), named by a hash of the source, the compiler and its version, the flags, the
jaxlib version and the CPU (``-march=native``), so a changed source, compiler or machine builds anew. It is written
under a temporary name and renamed into place, so concurrent processes never load a half-written library; after a
build, the other builds not used for :data:`STALE_DAYS` days are removed (a build found in the cache is touched).
The library is loaded with ctypes and its handlers registered as the FFI targets :data:`GRAM_TARGET` and
:data:`COMBINE_TARGET` for the CPU, once per process.

Fallback: no compiler, or a failed build or load, makes :func:`available` False with one logged warning naming the
reason; callers then keep their XLA path. ``MARBLE_JAX_NATIVE_KERNELS=0`` makes it False without building (read at
each call, i.e. when a caller traces).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

Array = jax.Array

GRAM_TARGET = "marble_jax_gram_f32"
COMBINE_TARGET = "marble_jax_combine_f32"
_SYMBOLS = {GRAM_TARGET: "MarbleGramF32", COMBINE_TARGET: "MarbleCombineF32"}
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17")
DISABLE_ENV = "MARBLE_JAX_NATIVE_KERNELS"
STALE_DAYS = 30  # other builds in the cache older than this are removed after a build (_prune)

log = logging.getLogger(__name__)
_register_lock = threading.Lock()
_registered = False


def cache_dir() -> Path:
    """Where built libraries are kept: ``$MARBLE_JAX_CACHE`` or ``~/.cache/marble_jax/ffi``."""
    return Path(os.environ.get("MARBLE_JAX_CACHE") or Path.home() / ".cache" / "marble_jax" / "ffi")


def _cpu_identity() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for), or what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "cpu family", "model\t", "CPU part", "Features")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _build(cxx: str) -> Path:
    """The library for this source, compiler, flags and CPU: from the cache, else compiled into it."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), *(s.encode() for s in version), " ".join(FLAGS).encode()):
        key.update(part + b"\0")
    key.update(f"{jaxlib.__version__}\0{_cpu_identity()}".encode())
    directory = cache_dir()
    path = directory / f"cpu_kernels-{key.hexdigest()[:20]}.so"
    if path.exists():
        try:
            os.utime(path)  # used now: _prune keeps it
        except OSError:  # a read-only cache
            pass
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".cpu_kernels-", suffix=".so")
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune(directory, keep=path)
    return path


def _prune(directory: Path, keep: Path) -> None:
    """Removes the cache's other builds (``cpu_kernels-*.so``, and ``gram_cpu-*.so`` of earlier versions) not used
    (built or found, :func:`_build`) for :data:`STALE_DAYS` days: each source, compiler or jaxlib change adds one
    (about 150 kB). A process that has one loaded keeps it (the mapping outlives the file); a checkout that needs a
    removed one builds it again."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in (*directory.glob("cpu_kernels-*.so"), *directory.glob("gram_cpu-*.so")):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # removed meanwhile by another process, or not ours to remove
            continue


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (after one warning with the reason) when it cannot be built or loaded."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        log.warning("native CPU kernels unavailable: no C++ compiler %r (set $CXX); keeping XLA's path", cxx)
        return None
    try:
        return ctypes.cdll.LoadLibrary(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native CPU kernels unavailable: %s; keeping XLA's path", e)
        return None


def available() -> bool:
    """Whether the kernels can run: built, loaded and registered, and not disabled by the env var."""
    global _registered
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    lib = _library()
    if lib is None:
        return False
    with _register_lock:
        if not _registered:
            for target, symbol in _SYMBOLS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _registered = True
    return True


def _ffi_gram(*operands: Array) -> Array:
    """The kernel's custom call on ``x_o [K, n_o]``: ``[K, K]`` (under ``vmap`` one call per batch element)."""
    k = operands[0].shape[0]
    return jax.ffi.ffi_call(GRAM_TARGET, jax.ShapeDtypeStruct((k, k), jnp.float32), vmap_method="sequential")(*operands)


@jax.custom_jvp
def _differentiable_gram(*operands: Array) -> Array:
    return _ffi_gram(*operands)


@_differentiable_gram.defjvp
def _gram_jvp(primals: tuple[Array, ...], tangents: tuple[Array, ...]) -> tuple[Array, Array]:
    """``dG = sum_o dx_o x_o^T + x_o dx_o^T``, by XLA's products (the custom call has no derivative rule)."""
    half = sum(jnp.matmul(dx, x.T, preferred_element_type=jnp.float32) for x, dx in zip(primals, tangents, strict=True))
    return _ffi_gram(*primals), half + half.T


def gram_f32(*operands: Array) -> Array:
    """``G [K, K]`` float32, ``G = sum_o x_o x_o^T`` over float32 operands ``x_o [K, n_o]``, by the native kernel.

    CPU only; call it only when :func:`available`. Under ``vmap`` it runs once per batch element; inside ``shard_map``
    its result varies over the operands' manual axes, as XLA's product's would; derivatives go through XLA's
    products. XLA does not partition a custom call: it would gather operands sharded over several devices.
    """
    k = operands[0].shape[0] if operands and operands[0].ndim else None
    _check_operands("gram_f32", operands, k, "[K, n] with one K")
    return _varying_like(_differentiable_gram(*operands), operands)


def _check_operands(name: str, operands: tuple[Array, ...], k: int | None, wanted: str) -> None:
    """Raises, naming ``name``, unless there are operands, all float32 ``[k, n]``, and the kernels are available."""
    if not operands:
        raise ValueError(f"{name}: no operands")
    for x in operands:
        if x.ndim != 2 or x.shape[0] != k or x.dtype != jnp.float32:
            got = [(str(o.dtype), o.shape) for o in operands]
            raise ValueError(f"{name}: operands must be float32 {wanted}, got {got}")
    if not available():
        raise RuntimeError(f"{name}: the native CPU kernels are not available (see cpu_kernels.available)")


def _varying_like(result: Array, operands: tuple[Array, ...]) -> Array:
    """``result`` marked as varying over the manual (``shard_map``) axes its operands vary over: an FFI call's result
    carries none, XLA's own ops would carry them all."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    varying -= jax.typeof(result).manual_axis_type.varying
    return jax.lax.pcast(result, tuple(sorted(varying)), to="varying") if varying else result


def _ffi_combine(coefficients: Array, *operands: Array) -> tuple[Array, ...]:
    """The kernel's custom call: ``c [K]``, ``x_o [K, n_o]`` to the ``[n_o]`` results."""
    shapes = tuple(jax.ShapeDtypeStruct(x.shape[1:], jnp.float32) for x in operands)
    return tuple(jax.ffi.ffi_call(COMBINE_TARGET, shapes, vmap_method="sequential")(coefficients, *operands))


@jax.custom_jvp
def _differentiable_combine(coefficients: Array, *operands: Array) -> tuple[Array, ...]:
    return _ffi_combine(coefficients, *operands)


@_differentiable_combine.defjvp
def _combine_jvp(primals: tuple[Array, ...], tangents: tuple[Array, ...]) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """``dy_o = dc^T x_o + c^T dx_o``, by XLA's products (bilinear in ``c`` and ``x_o``)."""
    c, *xs = primals
    dc, *dxs = tangents
    outs = _ffi_combine(c, *xs)
    return outs, tuple(jnp.tensordot(dc, x, axes=1) + jnp.tensordot(c, dx, axes=1) for x, dx in zip(xs, dxs, strict=True))


def combine_f32(coefficients: Array, *operands: Array) -> tuple[Array, ...]:
    """``y_o = sum_k c_k x_o[k] [n_o]`` float32, for ``c [K]`` and float32 operands ``x_o [K, n_o]``, by the native kernel.

    CPU only; call it only when :func:`available`. One pass over the operands (XLA's fused sum reads them as fast but
    writes its fresh result page by page). Under ``vmap`` it runs once per batch element; derivatives go through
    XLA's products.
    """
    if coefficients.ndim != 1 or coefficients.dtype != jnp.float32:
        raise ValueError(f"combine_f32: coefficients must be float32 [K], got {coefficients.dtype} {coefficients.shape}")
    k = coefficients.shape[0]
    _check_operands("combine_f32", operands, k, f"[{k}, n] (K = the coefficients' length)")
    return tuple(_varying_like(y, (coefficients, *operands)) for y in _differentiable_combine(coefficients, *operands))
