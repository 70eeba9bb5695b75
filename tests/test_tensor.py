"""SparseConvTensor: validation, padding, dense round trips, pytree behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from sparse_data import random_tensor


def _tensor(indices, features=None, shape=(4, 4), batch_size=2, **kw):
  indices = np.asarray(indices, np.int32)
  if features is None:
    features = np.ones((indices.shape[0], 3), np.float32)
  return jsparse.SparseConvTensor(features, indices, shape, batch_size, **kw)


@pytest.mark.parametrize(
  "indices, message",
  [
    ([[0, 1, 1], [2, 0, 0]], r"1 rows with batch index out of range \(1: \[2, 0, 0\]\)"),
    ([[0, 1, 1], [-3, 0, 0]], r"batch index out of range \(1: \[-3, 0, 0\]\)"),
    (
      [[0, 4, 1], [1, 0, -1]],
      r"2 rows with coordinate outside spatial_shape \(0: \[0, 4, 1\], 1: \[1, 0, -1\]\)",
    ),
    ([[0, 1, 1], [1, 1, 1], [0, 1, 1]], r"1 rows with duplicate of an earlier row's site \(2: \[0, 1, 1\]\)"),
  ],
)
def test_bad_sites_are_named(indices, message):
  with pytest.raises(ValueError, match=message):
    _tensor(indices)


def test_bad_structure_is_explained():
  with pytest.raises(ValueError, match="int32, got int64"):
    jsparse.SparseConvTensor(np.ones((1, 2)), np.zeros((1, 3), np.int64), (4, 4), 1)
  with pytest.raises(ValueError, match=r"\[N, 1 \+ ndim\] = \[N, 3\]"):
    _tensor([[0, 1, 1, 1]])
  with pytest.raises(ValueError, match="features must be"):
    _tensor([[0, 1, 1]], features=np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match="batch_size"):
    _tensor([[0, 1, 1]], batch_size=0)
  with pytest.raises(ValueError, match="spatial_shape"):
    _tensor([[0, 1, 1]], shape=(4, 0))
  with pytest.raises(jsparse.CapacityError, match="capacity=1"):
    _tensor([[0, 1, 1], [0, 2, 2]], capacity=1)


def test_padding_rows_capacity_and_accessors():
  x = _tensor([[0, 1, 1], [-1, -1, -1], [1, 3, 0]], capacity=6)
  assert x.capacity == 6 and int(x.num_active) == 2 and x.ndim == 2
  np.testing.assert_array_equal(x.mask, [True, False, True, False, False, False])
  features, indices = x.to_numpy()
  np.testing.assert_array_equal(indices, [[0, 1, 1], [1, 3, 0]])
  assert features.shape == (2, 3)
  y = x.replace_feature(jnp.full((6, 5), 7.0))
  np.testing.assert_array_equal(np.asarray(y.features)[:, 0], [7, 0, 7, 0, 0, 0])
  with pytest.raises(ValueError, match=r"\[6, C\]"):
    x.replace_feature(jnp.ones((5, 5)))


def test_dense_matches_a_numpy_scatter_and_from_dense_inverts_it():
  rng = np.random.default_rng(0)
  x = random_tensor(rng, 2, (5, 4, 3), 2, 30, padding_rows=4)
  features, indices = x.to_numpy()
  expected = np.zeros((2, 5, 4, 3, 2), np.float32)
  expected[tuple(indices.T)] = features
  np.testing.assert_array_equal(x.dense(), expected)
  np.testing.assert_array_equal(x.dense(channels_first=True), np.moveaxis(expected, -1, 1))

  back = jsparse.SparseConvTensor.from_dense(jnp.asarray(expected))
  order = np.lexsort(indices.T[::-1])
  np.testing.assert_array_equal(back.indices, indices[order])  # sorted by (batch, coords)
  np.testing.assert_array_equal(back.features, features[order])
  assert back.spatial_shape == (5, 4, 3) and back.batch_size == 2
  with pytest.raises(jsparse.CapacityError):
    jsparse.SparseConvTensor.from_dense(jnp.asarray(expected), capacity=3)

  jitted = jax.jit(lambda d: jsparse.SparseConvTensor.from_dense(d, capacity=10))(jnp.asarray(expected))
  with pytest.raises(jsparse.CapacityError, match="from_dense: needed 30"):
    jsparse.check_capacity(jitted)
  np.testing.assert_array_equal(jitted.indices, indices[order][:10])
  with pytest.raises(ValueError, match="capacity="):
    jax.jit(jsparse.SparseConvTensor.from_dense)(jnp.asarray(expected))


def test_pytree_round_trip_through_jit():
  x = random_tensor(np.random.default_rng(1), 1, (6, 6), 3, 10, padding_rows=2)
  leaves, treedef = jax.tree_util.tree_flatten(x)
  assert len(leaves) == 2  # features, indices: empty dicts add no leaves
  y = jax.jit(lambda t: t.replace_feature(t.features * 2))(x)
  assert isinstance(y, jsparse.SparseConvTensor) and y.spatial_shape == (6, 6)
  np.testing.assert_array_equal(y.features, 2 * np.asarray(x.features) * np.asarray(x.mask)[:, None])
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(x)[0]]
  assert paths == [".features", ".indices"]


def test_construction_under_jit_skips_host_validation():
  def make(features, indices):
    return jsparse.SparseConvTensor(features, indices, (4, 4), 1).num_active

  assert int(jax.jit(make)(jnp.ones((2, 1)), jnp.array([[0, 1, 1], [-1, -1, -1]], jnp.int32))) == 1
