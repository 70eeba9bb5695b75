"""check_indices: the C++ FFI kernel and the CUDA kernel (on an NVIDIA GPU) against the reference
path and a plain-numpy statement of the status codes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import _ffi, ops


def _random_rows(rng, n, shape, batch_size):
  batch = rng.integers(-3, batch_size + 2, size=(n, 1))
  coords = rng.integers(-2, np.asarray(shape) + 2, size=(n, len(shape)))
  rows = np.concatenate([batch, coords], axis=1).astype(np.int32)
  rows[rng.random(n) < 0.2] = -1  # padding
  rows[-5:] = rows[:5]  # some duplicates
  return rows


def _expected(rows, shape, batch_size):
  """A plain-numpy statement of the status codes."""
  status = []
  seen = set()
  for row in rows.tolist():
    b, coords = row[0], row[1:]
    if b == -1:
      status.append(ops._indices.PADDING)
    elif not 0 <= b < batch_size:
      status.append(ops._indices.BAD_BATCH)
    elif not all(0 <= c < n for c, n in zip(coords, shape)):
      status.append(ops._indices.OUT_OF_GRID)
    elif tuple(row) in seen:
      status.append(ops._indices.DUPLICATE)
    else:
      seen.add(tuple(row))
      status.append(ops._indices.ACTIVE)
  return status


@pytest.mark.parametrize("shape", [(7,), (5, 4), (4, 3, 5), (3, 2, 3, 4)])
def test_status_codes_match_numpy(backend, shape):
  rng = np.random.default_rng(len(shape))
  rows = _random_rows(rng, 200, shape, 3)
  got = jax.jit(ops.check_indices, static_argnums=(1, 2))(jnp.asarray(rows), shape, 3)
  np.testing.assert_array_equal(got, _expected(rows, shape, 3))


def test_ffi_under_vmap_matches_reference():
  rng = np.random.default_rng(0)
  rows = jnp.asarray(np.stack([_random_rows(rng, 50, (6, 6), 2) for _ in range(3)]))
  results = []
  for backend in ("ffi", "reference"):
    with jsparse.backend(backend):
      results.append(jax.vmap(lambda r: ops.check_indices(r, (6, 6), 2))(rows))
  np.testing.assert_array_equal(results[0], results[1])


def test_ffi_rejects_bad_arguments_with_actionable_errors():
  from jsparse.ops._indices import _range_status_ffi

  ops.check_indices(jnp.zeros((1, 3), jnp.int32), (2, 2), 1)  # registers the targets
  with pytest.raises(Exception, match="expected 1 \\+ 3 = 4 columns"):
    jax.block_until_ready(_range_status_ffi(jnp.zeros((2, 3), jnp.int32), (4, 4, 4), 1))
  with pytest.raises(Exception, match="batch_size"):
    jax.block_until_ready(_range_status_ffi(jnp.zeros((2, 3), jnp.int32), (4, 4), 0))
  with pytest.raises(Exception, match="indices must be int32; cast with"):
    jax.block_until_ready(_range_status_ffi(jnp.zeros((2, 3), jnp.float32), (4, 4), 1))
  with pytest.raises(ValueError, match="int32"):
    ops.check_indices(jnp.zeros((2, 3), jnp.float32), (4, 4), 1)


@pytest.fixture(scope="module")
def gpu():
  try:
    device = jax.devices("cuda")[0]
  except RuntimeError:
    pytest.skip("no CUDA device (jax has no CUDA backend here)")
  if not _ffi.built("cuda"):
    pytest.fail("a CUDA device is present but the CUDA extension was not built (is nvcc on PATH?)")
  return device


def test_cuda_status_codes_match_reference(gpu):
  rng = np.random.default_rng(0)
  rows = np.concatenate([rng.integers(-3, 5, size=(4096, 1)), rng.integers(-2, 34, size=(4096, 3))], axis=1)
  rows = jax.device_put(jnp.asarray(rows, jnp.int32), gpu)
  with jsparse.backend("ffi"):
    got = jax.jit(ops.check_indices, static_argnums=(1, 2))(rows, (32, 32, 32), 3)
  with jsparse.backend("reference"):
    want = jax.jit(ops.check_indices, static_argnums=(1, 2))(rows, (32, 32, 32), 3)
  assert got.devices() == {gpu}
  np.testing.assert_array_equal(got, want)
