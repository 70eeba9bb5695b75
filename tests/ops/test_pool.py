"""sparse_max_pool and sparse_avg_pool: on every platform with FFI kernels (CPU, CUDA), the kernels
equal the reference path bitwise, values and gradients, ties included, and two runs give the same
bits; the handlers' errors. (tests/nn/test_pool.py checks the pool layers against
lax.reduce_window.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import _ffi, ops
from sparse_data import both_backends, large_scene, random_sites


def _pool_problem(dtype, pool: str, sites: int = 120, channels: int = 6, seed: int = 11):
  """``(run, args)``: ``run(features, pairs, cotangent)`` gives a pool's output and its input
  gradient. Coarse feature values make ties common, so the first-tap rule of max pooling is
  exercised; padding rows (inputs with no taps, outputs with no inputs) are included."""
  rng = np.random.default_rng(seed)
  shape, batch = (7, 6, 5), 2
  indices = np.concatenate([random_sites(rng, batch, shape, sites), np.full((5, 4), -1, np.int32)])
  spec = ops.make_spec("pool", shape, (3, 2, 3), 2, 1)
  features = jnp.asarray(rng.integers(-3, 4, (indices.shape[0], channels)), dtype)
  pairs = ops.build_map(jnp.asarray(indices), spec, batch, indices.shape[0])
  cotangent = jnp.asarray(rng.standard_normal((pairs.out_capacity, channels)), dtype)
  op = ops.sparse_max_pool if pool == "max" else ops.sparse_avg_pool

  def run(f, pairs, cotangent):
    out, vjp = jax.vjp(lambda f: op(f, pairs), f)
    return out, *vjp(cotangent)

  return run, (features, pairs, cotangent)


def _assert_pool_targets_on(device: jax.Device) -> None:
  # backend("ffi") calls the FFI targets on any platform, so a missing handler fails the test
  # rather than falling back to the reference path; this names the cause.
  for target in ("jsparse_pool_max", "jsparse_pool_max_grad", "jsparse_pool_avg", "jsparse_pool_avg_grad"):
    assert device.platform in _ffi.platforms_with(target), f"{target} is not built for {device.platform}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_pools_and_gradients_are_identical(ffi_device, dtype, pool):
  _assert_pool_targets_on(ffi_device)
  run, args = _pool_problem(dtype, pool)
  ffi_results, reference_results = both_backends(run, *args, device=ffi_device)
  for a, b in zip(ffi_results, reference_results):
    assert a.dtype == b.dtype == dtype
    assert a.devices() == b.devices() == {ffi_device}
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_pools_and_gradients_are_deterministic(ffi_device, dtype, pool):
  # Two runs of the FFI kernels, on enough rows and channels to fill many thread blocks on a GPU,
  # give the same bits: no atomics, no order that depends on scheduling.
  _assert_pool_targets_on(ffi_device)
  run, args = _pool_problem(dtype, pool, sites=400, channels=40, seed=5)
  args = jax.device_put(args, ffi_device)
  with jsparse.backend("ffi"):
    first = jax.block_until_ready(jax.jit(run)(*args))
    second = jax.block_until_ready(jax.jit(lambda *a: run(*a))(*args))  # a second compilation too
  for a, b in zip(first, second):
    assert a.devices() == {ffi_device}
    assert np.any(np.asarray(a, np.float32) != 0)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_handlers_reject_bad_arguments(ffi_device):
  # The messages come from xla_ffi/common/pool_args.h, so they are the same on every device.
  _ffi.targets(ffi_device.platform)
  features = jax.device_put(jnp.ones((4, 3), jnp.float32), ffi_device)
  nbr = jax.device_put(jnp.zeros((4, 9), jnp.int32), ffi_device)
  pool_max = jax.ffi.ffi_call(
    "jsparse_pool_max",
    (jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((4, 3), jnp.int32)),
    vmap_method="sequential",
  )
  with pytest.raises(Exception, match=r"jsparse_pool_max: nbr must be an int32 kernel map"):
    jax.block_until_ready(pool_max(features, nbr.astype(jnp.float32)))
  avg_grad = jax.ffi.ffi_call(
    "jsparse_pool_avg_grad", jax.ShapeDtypeStruct((4, 3), jnp.float32), vmap_method="sequential"
  )
  message = r"jsparse_pool_avg_grad: scaled d_out \(d_out / counts\) must be float32"
  with pytest.raises(Exception, match=message):
    jax.block_until_ready(avg_grad(features.astype(jnp.bfloat16), nbr))


def test_rows_past_int32_element_offsets(ffi_device, large_memory):
  """Rows that start past 2**31 elements (bfloat16 features [2**24 + 64, 128]): the FFI max and
  average pools equal numpy on the 48 rows the map reads. (The reference path gathers rows with
  XLA, see test_gather.py; its scan over taps copies the whole features, too much here.)"""
  features, pairs, gathered, valid = large_scene(np.random.default_rng(4), out_rows=40, taps=4)
  features, pairs = jax.device_put((features, pairs), ffi_device)
  with jsparse.backend("ffi"):
    max_out, avg_out = ops.sparse_max_pool(features, pairs), ops.sparse_avg_pool(features, pairs)
  best = np.where(valid[..., None], gathered, -np.inf).max(axis=1)
  np.testing.assert_array_equal(
    np.asarray(max_out, np.float32), np.where(valid.any(axis=1)[:, None], best, 0)
  )
  mean = gathered.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)[:, None]
  np.testing.assert_allclose(np.asarray(avg_out, np.float32), mean, rtol=1e-2, atol=1e-2)


def test_global_pools_refuse_rows_past_int32_before_running():
  """The global max pool numbers rows with int32 (its gradient goes to the first maximum): more
  than 2**31 - 1 rows raise at trace time (nothing is allocated here)."""
  features = jax.ShapeDtypeStruct((2**31, 1), jnp.bfloat16)
  indices = jax.ShapeDtypeStruct((2**31, 2), jnp.int32)
  for pool in (ops.global_max_pool, ops.global_avg_pool):
    with pytest.raises(ValueError, match=r"2147483648 rows, but rows are numbered with int32"):
      jax.eval_shape(lambda f, i, pool=pool: pool(f, i, 2), features, indices)
