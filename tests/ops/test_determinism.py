"""Maps, conv and pool outputs and gradients are bitwise identical across runs and across CPU thread settings,
on the FFI kernels (threaded on the XLA pool) and on the reference path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from jsparse import _ffi

# Runs as a script in a subprocess and in-process: prints a digest of outputs and gradients.
SCRIPT = """
import hashlib, jax, jax.numpy as jnp, numpy as np
from jsparse import ops
rng = np.random.default_rng(0)
flat = rng.choice(2 * 24**3, size=3000, replace=False)
idx = jnp.asarray(np.stack(np.unravel_index(flat, (2, 24, 24, 24)), 1).astype(np.int32))
features = jnp.asarray(rng.standard_normal((3000, 32)), jnp.float32)
digest = hashlib.sha256()
specs = [(ops.make_spec("subm", (24,) * 3, 3), None), (ops.make_spec("conv", (24,) * 3, 3, 2, 1), 8000),
         (ops.make_spec("transpose", (24,) * 3, 2, 2), 24000)]
for spec, capacity in specs:
  for dtype in (jnp.float32, jnp.bfloat16):
    kernel = jnp.asarray(rng.standard_normal((*spec.kernel_size, 32, 16)), dtype)
    def loss(f, k):
      pairs = ops.build_map(idx, spec, 2, capacity)
      out = ops.sparse_conv(f, k, pairs)
      return jnp.sum(out * jnp.cos(out)).astype(jnp.float32), (out, pairs.nbr, pairs.transpose_nbr)
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      features.astype(dtype), kernel)
    for a in (*aux, *grads):
      digest.update(np.asarray(a).tobytes())
pool_pairs = ops.build_map(idx, ops.make_spec("pool", (24,) * 3, 3, 2, 1), 2, 8000)
for pool in (ops.sparse_max_pool, ops.sparse_avg_pool):
  out, grad = jax.jit(jax.value_and_grad(lambda f: jnp.sum(jnp.sin(pool(f, pool_pairs)))))(features)
  digest.update(np.asarray(out).tobytes() + np.asarray(grad).tobytes())
print(digest.hexdigest())
"""


def _digest(backend: str, xla_flags: str = "", one_cpu: bool = False) -> str:
  env = dict(os.environ, XLA_FLAGS=xla_flags, JSPARSE_BACKEND=backend)
  command = [sys.executable, "-c", SCRIPT]
  if one_cpu:  # XLA sizes its thread pools from the CPU affinity mask
    command = ["taskset", "-c", "0", *command]
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
  return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ffi", "reference"])
def test_bitwise_identical_across_runs_and_thread_settings(backend):
  if backend == "ffi" and not _ffi.built("cpu"):
    pytest.skip("the C++ extension is not built")
  threaded = _digest(backend)
  assert len(threaded) == 64
  assert _digest(backend) == threaded
  assert _digest(backend, "--xla_cpu_multi_thread_eigen=false") == threaded
  if shutil.which("taskset"):  # one CPU: XLA's pool gets one thread, tasks run in order
    assert _digest(backend, one_cpu=True) == threaded
