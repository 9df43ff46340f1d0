"""The native CPU Gram-matrix kernel (``csrc/gram_cpu.cc``): building it, loading it and calling it through XLA's FFI.

:func:`gram_f32` computes ``G [K, K] = sum_o x_o x_o^T`` of float32 operands ``x_o [K, n_o]`` in one pass over them,
float32 accumulation in a fixed order (see the source's header for the order and its rounding bound), on XLA's CPU
thread pool. :func:`marble_jax.mgda.gram_matrix` uses it for float32 leaves on CPU in a one-device process (XLA does
not partition a custom call: it would gather operands sharded over several devices).

Build: on the first :func:`available` in a process, ``$CXX`` (default ``g++``) compiles the source with
:data:`FLAGS` and ``-I jax.ffi.include_dir()`` into a shared library in the cache directory ``$MARBLE_JAX_CACHE``
(default ``~/.cache/marble_jax/ffi``), named by a hash of the source, the compiler and its version, the flags, the
jaxlib version and the CPU (``-march=native``), so a changed source, compiler or machine builds anew. It is written
under a temporary name and renamed into place, so concurrent processes never load a half-written library. The
library is loaded with ctypes and its handler registered as the FFI target :data:`TARGET` for the CPU platform, once
per process.

Fallback: no compiler, or a failed build or load, makes :func:`available` False with one logged warning naming the
reason; callers then keep their XLA path. ``MARBLE_JAX_NATIVE_GRAM=0`` makes it False without building (read at
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
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

Array = jax.Array

TARGET = "marble_jax_gram_f32"
SYMBOL = "MarbleGramF32"
SOURCE = Path(__file__).parent / "csrc" / "gram_cpu.cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17")
DISABLE_ENV = "MARBLE_JAX_NATIVE_GRAM"

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
    path = directory / f"gram_cpu-{key.hexdigest()[:20]}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gram_cpu-", suffix=".so")
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
    return path


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (after one warning with the reason) when it cannot be built or loaded."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        log.warning("native Gram kernel unavailable: no C++ compiler %r (set $CXX); keeping XLA's product", cxx)
        return None
    try:
        return ctypes.cdll.LoadLibrary(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native Gram kernel unavailable: %s; keeping XLA's product", e)
        return None


def available() -> bool:
    """Whether :func:`gram_f32` can run: the kernel built, loaded and registered, and not disabled by the env var."""
    global _registered
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    lib = _library()
    if lib is None:
        return False
    with _register_lock:
        if not _registered:
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, SYMBOL)), platform="cpu")
            _registered = True
    return True


def _ffi_gram(*operands: Array) -> Array:
    """The kernel's custom call on ``x_o [K, n_o]``: ``[K, K]`` (under ``vmap`` one call per batch element)."""
    k = operands[0].shape[0]
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((k, k), jnp.float32), vmap_method="sequential")(*operands)


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
    if not operands:
        raise ValueError("gram_f32: no operands")
    k = operands[0].shape[0] if operands[0].ndim else None
    for x in operands:
        if x.ndim != 2 or x.shape[0] != k or x.dtype != jnp.float32:
            got = [(str(o.dtype), o.shape) for o in operands]
            raise ValueError(f"gram_f32: operands must be float32 [K, n] with one K, got {got}")
    if not available():
        raise RuntimeError("gram_f32: the native Gram kernel is not available (see gram_kernel.available)")
    gram = _differentiable_gram(*operands)
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    varying -= jax.typeof(gram).manual_axis_type.varying  # an FFI call's result carries none
    return jax.lax.pcast(gram, tuple(sorted(varying)), to="varying") if varying else gram
