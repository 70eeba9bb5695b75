"""gather_rows and gather_rows_transposed against numpy indexing: values, -1 rows, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsparse import ops
from sparse_data import LARGE_CHANNELS, LARGE_ROWS, large_scene


def _numpy_gather(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """``x[rows]`` with zero rows where ``rows`` is -1."""
  out = np.zeros((len(rows), x.shape[1]), x.dtype)
  out[rows >= 0] = x[rows[rows >= 0]]
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_gather_rows_matches_numpy(dtype):
  rng = np.random.default_rng(0)
  x = rng.integers(-50, 50, (9, 3)).astype(np.float32)
  rows = rng.integers(-1, 9, 40).astype(np.int32)  # repeats and -1 rows
  rows[:3] = -1
  got = jax.jit(ops.gather_rows)(jnp.asarray(x, dtype), jnp.asarray(rows))
  assert got.dtype == dtype and got.shape == (40, 3)
  np.testing.assert_array_equal(np.asarray(got, np.float32), _numpy_gather(x, rows))


def test_gather_rows_from_no_rows_and_of_no_rows():
  assert not np.asarray(ops.gather_rows(jnp.zeros((0, 4)), jnp.array([-1, -1], jnp.int32))).any()
  assert ops.gather_rows(jnp.zeros((0, 4)), jnp.array([-1, -1], jnp.int32)).shape == (2, 4)
  assert ops.gather_rows(jnp.ones((3, 4)), jnp.zeros((0,), jnp.int32)).shape == (0, 4)


def test_gather_rows_gradient_scatter_adds():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
  rows = jnp.array([4, -1, 0, 4, 2, 4], jnp.int32)
  dy = rng.standard_normal((6, 2)).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(ops.gather_rows(x, rows) * dy))(x)
  expected = np.zeros((5, 2), np.float32)
  np.add.at(expected, np.asarray(rows)[np.asarray(rows) >= 0], dy[np.asarray(rows) >= 0])
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_gather_rows_under_vmap():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 6, 2)).astype(np.float32)
  rows = rng.integers(-1, 6, (3, 10)).astype(np.int32)
  got = jax.vmap(ops.gather_rows)(jnp.asarray(x), jnp.asarray(rows))
  for i in range(3):
    np.testing.assert_array_equal(got[i], _numpy_gather(x[i], rows[i]))


def test_gather_rows_transposed_gathers_its_gradient():
  """For a one-to-one map the transposed gather gives gather_rows's values and gradient, the
  gradient read through ``rows_t`` (rows of x that no output reads get zero)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
  rows = np.array([5, -1, 0, 3, -1], np.int32)  # rows 1, 2 and 4 of x are read by no output
  rows_t = np.full(6, -1, np.int32)
  rows_t[rows[rows >= 0]] = np.flatnonzero(rows >= 0)
  dy = rng.standard_normal((5, 3)).astype(np.float32)
  out = ops.gather_rows_transposed(x, jnp.asarray(rows), jnp.asarray(rows_t))
  np.testing.assert_array_equal(out, ops.gather_rows(x, jnp.asarray(rows)))

  def loss(gather):
    return lambda x: jnp.sum(gather(x) * dy)

  grad = jax.jit(
    jax.grad(loss(lambda x: ops.gather_rows_transposed(x, jnp.asarray(rows), jnp.asarray(rows_t))))
  )(x)
  np.testing.assert_array_equal(grad, _numpy_gather(dy, rows_t))
  np.testing.assert_allclose(grad, jax.grad(loss(lambda x: ops.gather_rows(x, jnp.asarray(rows))))(x), rtol=0)


def test_rows_past_int32_element_offsets(large_memory):
  """XLA's gather, the reference path's way to read rows, reaches rows that start past 2**31
  elements (bfloat16 [2**24 + 64, 128]): the same rows as numpy's indexing of the nonzero rows."""
  features, pairs, gathered, valid = large_scene(np.random.default_rng(2), out_rows=40, taps=4)
  got = jax.jit(ops.gather_rows)(features, pairs.nbr.reshape(-1))
  np.testing.assert_array_equal(np.asarray(got, np.float32), gathered.reshape(-1, LARGE_CHANNELS))
  assert valid.any() and (np.asarray(pairs.nbr) >= LARGE_ROWS - 16).any()  # rows past 2**31 elements
