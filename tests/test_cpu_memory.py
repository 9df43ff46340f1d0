"""marble_jax.cpu_memory: a freed large XLA buffer is reused, not faulted in again."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Three calls of a jitted 64 MiB fill after three warm-up calls; prints the minor page faults of each.
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
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill(c).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults), min(faults))
"""


def _faults(mode: str) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    high, low = map(int, out.stdout.split()[-2:])
    return high, low


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt thresholds")
def test_a_freed_large_buffer_is_reused_without_page_faults():
    # Without: each 64 MiB result is a fresh mapping, so at least one fault per page it spans (2 MiB huge pages
    # at best: 32). With: the heap's freed memory is reused and no page is faulted in again; a few faults are left
    # for Python's and XLA's small allocations.
    assert _faults("default")[1] >= 32
    assert _faults("keep")[0] <= 8
