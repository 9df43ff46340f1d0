"""The module boundary: an NNX module becomes a pure ``apply_fn(params, ...)`` and a params pytree.

Also the two ways every model gets its parameters before a checkpoint is read: an abstract build
(shapes and dtypes only, :func:`abstract_module`) and a random draw over that shape
(:func:`random_params`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PyTree = Any
M = TypeVar("M", bound=nnx.Module)


def functionalize(module: nnx.Module, method: str = "__call__") -> tuple[Callable[..., Any], PyTree]:
    """Splits ``module`` into ``(apply_fn, params)``.

    ``params`` is a plain nested dict of arrays (``nnx.Param`` values only); ``apply_fn(params,
    *args, **kwargs)`` rebuilds the module from its graph definition and calls ``method``. It is
    pure, so it can be jitted, differentiated, vmapped and sharded like any JAX function.
    """
    graphdef, state = nnx.split(module, nnx.Param)
    params = nnx.to_pure_dict(state)

    def apply_fn(p: PyTree, *args, **kwargs):
        s = nnx.State(state)  # a fresh structure to fill; the original arrays are not modified
        nnx.replace_by_pure_dict(s, p)
        return getattr(nnx.merge(graphdef, s), method)(*args, **kwargs)

    return apply_fn, params


def path_leaves(tree: PyTree) -> list[tuple[tuple, Any]]:
    """``[(path, leaf)]`` with each path a plain tuple of dict keys / sequence indices, e.g. ``("blocks", 0, "kernel")``."""
    return [
        (tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


class _ConstantKey:
    """Stands in for ``nnx.Rngs`` in an abstract build: every stream (``rngs.params()``...) gives one key."""

    def __getattr__(self, stream: str) -> _ConstantKey:
        return self

    def __call__(self) -> jax.Array:
        return jax.random.key(0)


def abstract_module(build: Callable[[nnx.Rngs], M]) -> M:
    """``build(rngs)`` with ``ShapeDtypeStruct`` parameters: traced, nothing is initialised or allocated.

    The build sees a constant key rather than an ``nnx.Rngs``: with flax 0.12 the Rngs counter
    makes a traced build quadratic in the number of parameters (minutes for SD3.5-Large instead
    of about a second). Works under an outer ``jax.jit`` / ``jax.eval_shape`` trace as well.
    """
    return nnx.eval_shape(lambda: build(_ConstantKey()))


def random_params(abstract: PyTree, key: jax.Array, *, per_leaf: bool = False) -> PyTree:
    """Random parameters shaped like ``abstract`` (a pure dict of ``ShapeDtypeStruct`` or arrays).

    By leaf name: ``kernel`` ``N(0, 1 / fan_in)`` (fan-in = all axes but the last), ``embedding``
    ``[N, D]`` ``N(0, 1 / D)``, ``bias`` 0, ``scale`` 1. One normal draw for all random leaves,
    sliced on the host (or traced, under ``jax.jit`` / ``jax.eval_shape``): per-leaf draws, or one
    XLA program with an output per leaf, take seconds to tens of seconds to compile on CPU.

    ``per_leaf=True`` (called eagerly) draws each random leaf on the default device from
    ``fold_in(key, leaf index)``, compiled once per distinct shape: the way on an accelerator, where
    the single jitted draw of SD3.5-M (2.2B values sliced into 908 leaves) had not compiled after
    9 minutes on an H200, and the host path moves every value across twice. Other values than the
    single draw's, from the same distributions.

    Raises:
      ValueError: for a leaf with another name.
    """
    leaves = path_leaves(abstract)
    names = [path[-1] for path, _ in leaves]
    unknown = sorted({str(n) for n in names} - {"kernel", "embedding", "bias", "scale"})
    if unknown:
        raise ValueError(f"random_params: no initialiser for parameters named {unknown}")
    sizes = [int(np.prod(leaf.shape)) if n in ("kernel", "embedding") else 0 for n, (_, leaf) in zip(names, leaves, strict=True)]
    fans = [
        leaf.shape[-1] if n == "embedding" else size // max(leaf.shape[-1], 1)
        for n, size, (_, leaf) in zip(names, sizes, leaves, strict=True)
    ]
    if per_leaf:
        values = [
            (jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32) / math.sqrt(fan)).astype(leaf.dtype)
            if size
            else (jnp.ones if name == "scale" else jnp.zeros)(leaf.shape, leaf.dtype)
            for i, (name, size, fan, (_, leaf)) in enumerate(zip(names, sizes, fans, leaves, strict=True))
        ]
        return jax.tree.unflatten(jax.tree.structure(abstract), values)
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    xp = jnp if isinstance(noise, jax.core.Tracer) else np
    noise = xp.asarray(noise)
    values, offset = [], 0
    for name, size, fan, (_, leaf) in zip(names, sizes, fans, leaves, strict=True):
        if size:
            values.append((noise[offset : offset + size].reshape(leaf.shape) / math.sqrt(fan)).astype(leaf.dtype))
            offset += size
        else:
            values.append((xp.ones if name == "scale" else xp.zeros)(leaf.shape, leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(abstract), [jnp.asarray(v) for v in values])
