"""SparseConvTensor (validation, padding, dense round trips, pytree behaviour) and the tensor-level
functions: kernel maps by indice_key, sparse_add, x + y and sparse_cat against dense arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import nn as spnn
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


def test_int64_indices_in_range_are_accepted_as_int32():
  indices = np.array([[0, 1, 2], [1, 3, 0]], np.int64)
  x = jsparse.SparseConvTensor(np.ones((2, 3), np.float32), indices, (4, 4), 2, capacity=4)
  assert x.indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(x.indices), [[0, 1, 2], [1, 3, 0], [-1, -1, -1], [-1, -1, -1]])
  from_list = jsparse.SparseConvTensor(np.ones((2, 3), np.float32), indices.tolist(), (4, 4), 2)
  assert from_list.indices.dtype == jnp.int32


def test_int64_indices_out_of_range_name_the_rows():
  indices = np.array([[0, 1, 2], [0, 2**31, 0], [1, 0, -(2**40)], [1, 3, 3]], np.int64)
  with pytest.raises(
    ValueError, match=r"2 rows of the int64 indices do not fit in int32 \(1: \[0, 2147483648, 0\], 2:"
  ):
    jsparse.SparseConvTensor(np.ones((4, 3), np.float32), indices, (4, 4), 2)
  with pytest.raises(ValueError, match=r"coordinate outside spatial_shape \(0: \[0, 9, 0\]\)"):
    jsparse.SparseConvTensor(np.ones((1, 3), np.float32), np.array([[0, 9, 0]], np.int64), (4, 4), 1)


def test_bad_structure_is_explained():
  with pytest.raises(ValueError, match=r"integers \(int32\), got float32"):
    jsparse.SparseConvTensor(np.ones((1, 2)), np.zeros((1, 3), np.float32), (4, 4), 1)
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
  # jnp.nonzero numbers a grid's sites with int32: a larger grid is refused at trace time.
  huge = jax.ShapeDtypeStruct((2, 2**15, 2**15, 1), jnp.float32)
  with pytest.raises(ValueError, match=r"2147483648 sites, more than int32 flat indices reach"):
    jax.eval_shape(lambda d: jsparse.SparseConvTensor.from_dense(d, capacity=8), huge)


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


# ---- sparse_add, x + y, sparse_cat ----------------------------------------------------------

SHAPE = (6, 5, 4)


def _overlapping(rng, count=3, padding_rows=2):
  """Tensors whose sites overlap in part: each keeps a random half of a shared site pool."""
  pool = random_tensor(rng, 2, SHAPE, 3, 80)
  _, sites = pool.to_numpy()
  tensors = []
  for _ in range(count):
    keep = sites[rng.random(len(sites)) < 0.5]
    rows = np.concatenate([keep, np.full((padding_rows, 4), -1, np.int32)])
    rows = rows[rng.permutation(len(rows))]
    features = rng.standard_normal((len(rows), 3)).astype(np.float32)  # padding rows nonzero
    tensors.append(jsparse.SparseConvTensor(features, rows, SHAPE, 2))
  return tensors


def _dense_sum(tensors):
  return sum(np.asarray(t.dense()) for t in tensors)


def test_sparse_add_equals_dense_addition_with_gradients(backend):
  rng = np.random.default_rng(0)
  tensors = _overlapping(rng)
  out = jsparse.sparse_add(*tensors)
  np.testing.assert_allclose(out.dense(), _dense_sum(tensors), rtol=1e-6, atol=1e-6)
  _, sites = out.to_numpy()
  union = np.unique(np.concatenate([t.to_numpy()[1] for t in tensors]), axis=0)
  np.testing.assert_array_equal(sites, union)  # sorted by (batch, coords), no padding: fits
  assert out.capacity == len(union) and not out.indice_dict

  weights = jnp.asarray(rng.standard_normal((2, *SHAPE, 3)), jnp.float32)
  loss = lambda *fs: jnp.sum(
    jsparse.sparse_add(*(t.replace(features=f) for t, f in zip(tensors, fs))).dense() * weights
  )
  grads = jax.grad(loss, argnums=(0, 1, 2))(*(t.features for t in tensors))
  for t, g in zip(tensors, grads):
    expected = np.where(np.asarray(t.mask)[:, None], np.asarray(weights)[tuple(np.asarray(t.indices).T)], 0)
    np.testing.assert_allclose(g, expected, rtol=1e-6)


def test_sparse_add_backends_agree_bitwise_under_jit():
  tensors = _overlapping(np.random.default_rng(1))
  results = []
  for name in ("ffi", "reference"):
    with jsparse.backend(name):
      results.append(jax.jit(lambda *ts: jsparse.sparse_add(*ts))(*tensors))
  ffi, reference = results
  np.testing.assert_array_equal(ffi.indices, reference.indices)
  np.testing.assert_array_equal(ffi.features, reference.features)
  eager = jsparse.sparse_add(*tensors)
  np.testing.assert_array_equal(ffi.to_numpy()[1], eager.to_numpy()[1])
  np.testing.assert_array_equal(ffi.to_numpy()[0], eager.to_numpy()[0])
  assert ffi.capacity == sum(t.capacity for t in tensors)  # the union always fits by default
  jsparse.check_capacity(ffi)


def test_sparse_add_capacity_is_never_silently_short():
  tensors = _overlapping(np.random.default_rng(2))
  needed = jsparse.sparse_add(*tensors).capacity
  with pytest.raises(jsparse.CapacityError, match=f"capacity >= {needed}"):
    jsparse.sparse_add(*tensors, capacity=needed - 1)
  short = jax.jit(lambda *ts: jsparse.sparse_add(*ts, capacity=needed - 1))(*tensors)
  with pytest.raises(jsparse.CapacityError, match="sparse_add"):
    jsparse.check_capacity(short)
  roomy = jsparse.sparse_add(*tensors, capacity=needed + 5)
  assert roomy.capacity == needed + 5 and int(roomy.num_active) == needed


def test_sparse_add_keeps_the_maps_and_rows_of_an_operand_that_holds_every_site():
  rng = np.random.default_rng(3)
  x = random_tensor(rng, 2, SHAPE, 3, 40, padding_rows=3)
  conv = spnn.SubMConv3d(3, 3, 3, indice_key="s0", rngs=nnx.Rngs(0))
  y = conv(x)
  features, sites = x.to_numpy()
  part = jsparse.SparseConvTensor(features[::3] * 2, sites[::3], SHAPE, 2)
  out = jsparse.sparse_add(part, y)
  assert "s0" in out.indice_dict
  np.testing.assert_array_equal(out.indices, y.indices)  # y's rows, order and capacity
  np.testing.assert_allclose(out.dense(), _dense_sum([part, y]), rtol=1e-6, atol=1e-6)
  again = conv(out)  # reuses the stored map, which must still describe out's rows
  fresh = spnn.SubMConv3d(3, 3, 3, rngs=nnx.Rngs(0))(out)
  np.testing.assert_allclose(again.features, fresh.features, rtol=1e-6, atol=1e-6)


def test_plus_needs_identical_sites_and_keeps_both_maps():
  rng = np.random.default_rng(4)
  x = random_tensor(rng, 2, SHAPE, 3, 30, padding_rows=2)
  y = spnn.SubMConv3d(3, 3, 3, indice_key="a", rngs=nnx.Rngs(0))(x)
  z = spnn.SubMConv3d(3, 3, 3, indice_key="b", rngs=nnx.Rngs(1))(x)
  s = y + z
  np.testing.assert_array_equal(s.features, y.features + z.features)
  assert set(s.indice_dict) == {"a", "b"}
  grad = jax.grad(lambda f: jnp.sum((x.replace(features=f) + x).features))(x.features)
  np.testing.assert_array_equal(grad, np.ones_like(grad))
  other = random_tensor(rng, 2, SHAPE, 3, 30, padding_rows=2)
  with pytest.raises(ValueError, match="use jsparse.sparse_add"):
    x + other
  with pytest.raises(ValueError, match="use jsparse.sparse_add"):
    x + random_tensor(rng, 2, SHAPE, 3, 31)


def test_sparse_cat_concatenates_channels_with_gradients():
  rng = np.random.default_rng(5)
  x = random_tensor(rng, 2, SHAPE, 3, 30, padding_rows=2)
  y = x.replace(features=jnp.asarray(rng.standard_normal((x.capacity, 2)), jnp.bfloat16))
  out = jsparse.sparse_cat(x, y)
  assert out.features.shape == (x.capacity, 5) and out.features.dtype == jnp.float32
  np.testing.assert_array_equal(out.features[:, :3], x.features)
  np.testing.assert_array_equal(out.features[:, 3:], y.features.astype(jnp.float32))
  weights = jnp.arange(5.0)[None, :]
  cat = lambda a, b: jsparse.sparse_cat(x.replace(features=a), y.replace(features=b)).features
  gx, gy = jax.grad(lambda a, b: jnp.sum(cat(a, b) * weights), argnums=(0, 1))(x.features, y.features)
  np.testing.assert_array_equal(gx, np.tile([0.0, 1.0, 2.0], (x.capacity, 1)))
  np.testing.assert_array_equal(np.asarray(gy, np.float32), np.tile([3.0, 4.0], (x.capacity, 1)))
  with pytest.raises(ValueError, match="operand 1 does not have operand 0's sites"):
    jsparse.sparse_cat(x, random_tensor(rng, 2, SHAPE, 3, 30, padding_rows=2))


def test_operand_errors_name_the_problem():
  rng = np.random.default_rng(6)
  x = random_tensor(rng, 2, SHAPE, 3, 10)
  with pytest.raises(ValueError, match="at least one"):
    jsparse.sparse_add()
  with pytest.raises(TypeError, match="operand 1 is a ndarray"):
    jsparse.sparse_add(x, np.ones(3))
  with pytest.raises(ValueError, match="spatial_shape=\\(6, 5, 5\\)"):
    jsparse.sparse_add(x, random_tensor(rng, 2, (6, 5, 5), 3, 10))
  with pytest.raises(ValueError, match="one channel count"):
    jsparse.sparse_add(x, random_tensor(rng, 2, SHAPE, 4, 10))


def test_a_key_reused_with_another_geometry_names_the_differences():
  x = _tensor([[0, 1, 1], [1, 2, 3]])
  y = spnn.SparseConv2d(3, 3, 3, 2, 1, indice_key="down", rngs=nnx.Rngs(0))(x)
  other = spnn.SparseConv2d(3, 3, 2, 2, 0, indice_key="down", rngs=nnx.Rngs(0))
  message = (
    r"indice_key 'down' holds a map that differs from this layer's in kernel_size=\(3, 3\) \(needs "
    r"\(2, 2\)\), padding=\(1, 1\) \(needs \(0, 0\)\)\. Give layers"
  )
  with pytest.raises(ValueError, match=message):
    other(x.replace(indice_dict=y.indice_dict))


def test_capacity_error_is_public():
  assert jsparse.CapacityError.__module__ == "jsparse"


@pytest.mark.parametrize("capacity", [3, 8])
def test_from_samples_keeps_voxelizer_padding_as_padding_under_jit(capacity):
  rng = np.random.default_rng(0)
  coords = [np.array([[1, 2], [3, 0], [0, 0]]), np.array([[2, 2], [0, 1], [3, 3]])]
  coords = [np.concatenate([c, np.full((capacity - 3, 2), -1)]).astype(np.int32) for c in coords]
  coords[1][2] = -1  # sample 1 has two voxels
  features = [rng.standard_normal((capacity, 3)).astype(np.float32) for _ in coords]
  x = jax.jit(lambda f, c: jsparse.SparseConvTensor.from_samples(f, c, (4, 4)))(features, coords)
  assert (x.capacity, x.batch_size, int(x.num_active)) == (2 * capacity, 2, 5)
  expected = [[0, 1, 2], [0, 3, 0], [0, 0, 0], [1, 2, 2], [1, 0, 1]]
  np.testing.assert_array_equal(x.to_numpy()[1], expected)
  np.testing.assert_array_equal(x.to_numpy()[0], np.concatenate([features[0][:3], features[1][:2]]))
  padding = ~np.asarray(x.mask)
  assert np.all(np.asarray(x.indices)[padding] == -1) and np.all(np.asarray(x.features)[padding] == 0)


def test_from_samples_explains_mismatched_samples():
  with pytest.raises(ValueError, match=r"sample 0 has features \(2, 3\) and coords \(2, 3\); they need"):
    jsparse.SparseConvTensor.from_samples([np.ones((2, 3))], [np.zeros((2, 3), np.int32)], (4, 4))
