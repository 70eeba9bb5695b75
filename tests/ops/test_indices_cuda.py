"""The CUDA check_indices kernel against the reference path (needs an NVIDIA GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import _ffi, ops


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
