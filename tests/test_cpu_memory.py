"""marble_jax.cpu_memory: a freed large XLA buffer is reused, not faulted in again."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Six calls of a jitted 64 MiB fill after three warm-up calls; prints the minor page faults of each.
SCRIPT = """
import resource, sys
import jax, jax.numpy as jnp
from marble_jax import cpu_memory
if sys.argv[1] == "keep":
    assert cpu_memory.keep_freed_memory() and cpu_memory.keep_freed_memory()  # idempotent
fill = jax.jit(lambda c: jnp.zeros((1 << 24,), jnp.float32) + c)
c = jnp.float32(1)
for _ in range(3):
    fill(c).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill(c).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(mode: str) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(f) for f in out.stdout.split()[-6:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt thresholds")
def test_a_freed_large_buffer_is_reused_without_page_faults():
    # Without: each 64 MiB result is a fresh mapping, so every call faults at least once per page it spans (2 MiB
    # huge pages at best: 32). With: the heap's freed memory is reused and no page is faulted in again, a few faults
    # left for Python's and XLA's small allocations. Not every call: now and then one faults its whole size in (seen
    # in 2 calls of 15; the heap grows when no freed chunk is free yet), so 4 of the 6 calls must be clean.
    fresh, kept = _faults("default"), _faults("keep")
    assert min(fresh) >= 32, fresh
    assert sum(f <= 8 for f in kept) >= 4, kept
