"""The fast paths of mgda.gram_matrix / mgda.combine against float64 numpy.

Paths: the CPU chunk loop of a long leaf (chunked products, float32 partial sums added in order), with and without a
ragged tail; small leaves concatenated per dtype; the explicit sum of ``combine`` (K <= 16) and its ``tensordot``
beyond.

Tolerances. A float32 sum of D terms ``a_i b_i``, in any order (one product, chunk sums added in order, the concatenated
small leaves), is off by at most ``gamma_D * sum_i |a_i b_i|``, ``gamma_D = D u / (1 - D u)`` with the unit roundoff
``u = 2^-24`` (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1): asserted per entry
(``worst_case``). That bound is loose (rounding errors mostly cancel), so the tests also assert the statistical size
``sqrt(D) u sum_i |a_i b_i|`` times a margin of 8 (``typical``): a random-walk sum of D errors of size <= u. Products
of bfloat16 / float16 inputs are exact in float32 (8 + 8 and 11 + 11 significant bits fit in 24), so the same bounds
hold there against the float64 Gram matrix of the rounded inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marble_jax import mgda

U32 = 2.0**-24


def abs_gram(leaves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """float64 Gram matrix, ``sum_i |a_i b_i|`` per entry, and D, of the leaves' [K, D] rows."""
    flat = np.concatenate([np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)
    return flat @ flat.T, np.abs(flat) @ np.abs(flat).T, flat.shape[1]


def assert_gram_close(got, leaves: list[np.ndarray]):
    ref, scale, d = abs_gram(leaves)
    err = np.abs(np.asarray(got, np.float64) - ref)
    worst_case = d * U32 / (1 - d * U32) * scale
    typical = 8 * np.sqrt(d) * U32 * scale
    assert np.all(err <= worst_case), (err / scale).max()
    assert np.all(err <= typical), (err / scale).max() / (np.sqrt(d) * U32)


@pytest.mark.parametrize(
    "k,d,chunk,loops",
    [
        (5, 40 * 8192 + 17, None, True),  # 6.6 MB: the default loop at K = 5 (chunk 8192), with a tail
        (16, 3 * 32768 + 5, None, True),  # 6.3 MB: the default loop at K = 16 (chunk 32768), with a tail
        (5, 3 * 8192, None, False),  # 0.5 MB: one product by default
        (3, 1200, 100, True),  # a given chunk loops whatever the size; no tail
        (1, 999, 7, True),
    ],
)
def test_chunked_leaf(k, d, chunk, loops, monkeypatch):
    """A leaf of >= 2 chunks: the CPU loop when >= 6 MiB or the chunk is given, else one product (XLA's path: the
    native kernel, tested in test_gram_kernel.py, is turned off)."""
    monkeypatch.setenv("MARBLE_JAX_NATIVE_KERNELS", "0")
    x = np.random.default_rng(d).standard_normal((k, d)).astype(np.float32)
    x[0] *= 1e3  # rows of different scales: errors are relative to sum |a_i b_i| per entry
    fn = jax.jit(lambda a: mgda.gram_matrix(a, chunk=chunk))
    assert_gram_close(fn(jnp.asarray(x)), [x])
    assert_gram_close(mgda.gram_matrix(jnp.asarray(x), chunk=chunk), [x])  # eager
    if jax.default_backend() == "cpu":
        assert ("while" in fn.lower(jnp.asarray(x)).compile().as_text()) == loops  # the path that ran


def test_chunked_matches_one_product():
    """The chunk loop and one product agree within the float32 bound of each (they sum in different orders)."""
    x = np.random.default_rng(1).standard_normal((4, 20000)).astype(np.float32)
    loop = mgda.gram_matrix(jnp.asarray(x), chunk=1000)
    one = mgda.gram_matrix(jnp.asarray(x), chunk=10**6)  # fewer than 2 chunks: one product
    assert_gram_close(loop, [x])
    assert_gram_close(one, [x])


def test_small_leaves_grouped_per_dtype():
    """A LoRA-like tree: many small leaves of a few shapes (concatenated per dtype), a large leaf, mixed dtypes."""
    rng = np.random.default_rng(2)
    k = 5
    leaves = {}
    for i in range(60):
        shape = [(4, 16), (16, 4), (2, 100), (300,)][i % 4]
        leaves[f"s{i}"] = rng.standard_normal((k, *shape)).astype(np.float32)
    leaves["big"] = rng.standard_normal((k, 64, 700)).astype(np.float32)
    tree = {name: jnp.asarray(v) for name, v in leaves.items()}
    tree["half"] = jnp.asarray(rng.standard_normal((k, 30)), jnp.float16)
    tree["brain"] = [jnp.asarray(rng.standard_normal((k, 3, 7)), jnp.bfloat16) for _ in range(5)]
    rounded = [np.asarray(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(tree)]  # the inputs as stored
    assert_gram_close(jax.jit(mgda.gram_matrix)(tree), rounded)
    assert_gram_close(jax.jit(lambda t: mgda.gram_matrix(t, chunk=512))(tree), rounded)  # the big leaf chunked too


def test_bfloat16_leaf_chunked():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 5000)), jnp.bfloat16)
    assert_gram_close(mgda.gram_matrix(x, chunk=1024), [np.asarray(x.astype(jnp.float32))])


def test_gram_chunk_validated():
    with pytest.raises(ValueError, match="chunk"):
        mgda.gram_matrix(jnp.ones((2, 3)), chunk=0)


@pytest.mark.parametrize("k", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_combine(k, dtype):
    """``sum_k c_k g_k``: explicit sum (K <= 16) or tensordot (K > 16). float32 error <= gamma_K sum_k |c_k g_k|
    (any order of the K-term sum), plus rounding the result to the leaf dtype (the unit roundoff, relative: 2^-24 for float32,
    2^-8 for bfloat16's 8 significant bits)."""
    rng = np.random.default_rng(k)
    grads = {"a": jnp.asarray(rng.standard_normal((k, 33, 7)), dtype), "b": jnp.asarray(rng.standard_normal((k, 5)), dtype)}
    c = jnp.asarray(rng.uniform(-2, 2, size=k), jnp.float32)
    out = jax.jit(mgda.combine)(grads, c)
    half_ulp = 2.0**-24 if dtype == jnp.float32 else 2.0**-8
    for name, leaf in grads.items():
        g = np.asarray(leaf.astype(jnp.float32), np.float64)
        cc = np.asarray(c, np.float64)
        ref = np.tensordot(cc, g, axes=1)
        scale = np.tensordot(np.abs(cc), np.abs(g), axes=1)
        assert out[name].dtype == leaf.dtype and out[name].shape == leaf.shape[1:]
        err = np.abs(np.asarray(out[name].astype(jnp.float32), np.float64) - ref)
        assert np.all(err <= k * U32 / (1 - k * U32) * scale * (1 + half_ulp) + half_ulp * np.abs(ref))
