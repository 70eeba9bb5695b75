"""Choosing the backend (context, environment), the FFI extension's build, and what holds across
backends and CPU kernels: the fallback instruction sets, vmap, bitwise determinism across runs and
thread settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import _ffi, ops
from jsparse.ops import _backend
from sparse_data import both_backends, needs_ffi, random_sites


def test_the_cpu_extension_is_built_and_registered():
  info = jsparse.build_info()
  assert info["cpu_ffi"] is True, "make test builds the C++ extension; it must load"
  assert "jsparse_check_indices" in info["ffi_targets"]["cpu"]
  assert info["jax_version"] == jax.__version__


@needs_ffi
def test_auto_runs_the_kernels_of_verified_platforms_only(monkeypatch):
  """ "auto" takes a platform's kernels only where they are verified (``_ffi.AUTO_PLATFORMS``);
  "ffi" takes them wherever they are built."""

  def chosen():  # a fresh jit each time: the choice is made when tracing
    kernels, reference = (lambda x: x + 1), (lambda x: x - 1)
    run = jax.jit(lambda x: _backend.dispatch("jsparse_check_indices", kernels, reference, x))
    return "kernels" if int(run(jnp.int32(0))) == 1 else "reference"

  with jsparse.backend("auto"):
    assert chosen() == "kernels"
    monkeypatch.setattr(_ffi, "AUTO_PLATFORMS", ())
    assert chosen() == "reference"
  with jsparse.backend("ffi"):
    assert chosen() == "kernels"


def test_backend_context_and_environment():
  assert ops.current_backend() in ops.BACKENDS
  with jsparse.backend("reference"):
    assert ops.current_backend() == "reference"
    with jsparse.backend("ffi"):
      assert ops.current_backend() == "ffi"
    assert ops.current_backend() == "reference"
  with pytest.raises(ValueError, match="one of"):
    with jsparse.backend("cuda"):
      pass
  code = "import jsparse; print(jsparse.ops.current_backend())"
  env = dict(os.environ, JSPARSE_BACKEND="reference")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "reference"


ISA_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, jsparse
from jsparse import ops
rng = np.random.default_rng(0)
flat = rng.choice(2 * 9**3, 300, replace=False)
idx = jnp.asarray(np.stack(np.unravel_index(flat, (2, 9, 9, 9)), 1), jnp.int32)
pairs = ops.build_map(idx, ops.make_spec("subm", (9, 9, 9), 3), 2)
f = jnp.asarray(rng.standard_normal((300, 24)), jnp.float32)
out = {"ffi": [], "reference": []}
for c_out in (40, 48):  # 48: the one-pass submanifold backward; 40: the separate kernels, padded columns
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 24, c_out)) / 24, jnp.float32)
  for name in ("ffi", "reference"):
    with jsparse.backend(name):
      loss = lambda f, k: jnp.sum(jnp.sin(ops.sparse_conv(f, k, pairs)))
      run = jax.jit(lambda f, k: jax.value_and_grad(loss, argnums=(0, 1))(f, k))
      value, grads = run(f, k)
      out[name] += [np.asarray(a) for a in (value, *grads)]
for a, b in zip(out["ffi"], out["reference"]):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
print(jsparse.build_info()["cpu_isa"])
"""


@needs_ffi
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_fallback_instruction_sets(isa):
  """The portable and AVX2 micro-kernels (picked on CPUs without AVX-512) give the same results."""
  env = dict(os.environ, JSPARSE_CPU_ISA=isa)
  out = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] in (isa, "portable")  # avx2 needs a CPU that has it


@needs_ffi
def test_vmap_over_features_and_maps():
  rng = np.random.default_rng(11)
  spec = ops.make_spec("conv", (6, 6), 3, 2, 1)
  indices = jnp.stack([jnp.asarray(random_sites(rng, 1, (6, 6), 14)) for _ in range(3)])
  features = jnp.asarray(rng.standard_normal((3, 14, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)

  def one(i, f):
    pairs = ops.build_map(i, spec, 1, 16)
    return ops.sparse_conv(f, kernel, pairs), jax.grad(
      lambda f: jnp.sum(ops.sparse_conv(f, kernel, pairs) ** 2)
    )(f)

  batched = jax.vmap(one)
  ffi, reference = both_backends(batched, indices, features)
  for a, b in zip(ffi, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for s in range(3):  # each vmapped slice equals the unbatched call
    with jsparse.backend("ffi"):
      single = one(indices[s], features[s])
    np.testing.assert_allclose(ffi[0][s], single[0], rtol=1e-6, atol=1e-6)


# ---- determinism ------------------------------------------------------------------------------
# Maps, conv and pool outputs and gradients are bitwise identical across runs and across CPU thread
# settings, on the FFI kernels (threaded on the XLA pool) and on the reference path.

# Runs as a script in a subprocess: prints a digest of outputs and gradients.
DETERMINISM_SCRIPT = """
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
  command = [sys.executable, "-c", DETERMINISM_SCRIPT]
  if one_cpu:  # XLA sizes its thread pools from the CPU affinity mask
    command = ["taskset", "-c", "0", *command]
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
  return out.stdout.strip()


@pytest.mark.slow
def test_bitwise_identical_across_runs_and_thread_settings(backend):
  threaded = _digest(backend)
  assert len(threaded) == 64
  assert _digest(backend) == threaded
  assert _digest(backend, "--xla_cpu_multi_thread_eigen=false") == threaded
  if shutil.which("taskset"):  # one CPU: XLA's pool gets one thread, tasks run in order
    assert _digest(backend, one_cpu=True) == threaded
