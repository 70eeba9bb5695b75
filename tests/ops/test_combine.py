"""sparse_add, x + y and sparse_cat against dense arithmetic, with gradients, maps and capacity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import nn as spnn
from jsparse import ops
from sparse_data import random_tensor

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


@pytest.mark.parametrize("backend", ["ffi", "reference"])
def test_sparse_add_equals_dense_addition_with_gradients(backend):
  rng = np.random.default_rng(0)
  tensors = _overlapping(rng)
  with jsparse.backend(backend):
    out = ops.sparse_add(*tensors)
    np.testing.assert_allclose(out.dense(), _dense_sum(tensors), rtol=1e-6, atol=1e-6)
    _, sites = out.to_numpy()
    union = np.unique(np.concatenate([t.to_numpy()[1] for t in tensors]), axis=0)
    np.testing.assert_array_equal(sites, union)  # sorted by (batch, coords), no padding: fits
    assert out.capacity == len(union) and not out.indice_dict

    weights = jnp.asarray(rng.standard_normal((2, *SHAPE, 3)), jnp.float32)
    loss = lambda *fs: jnp.sum(
      ops.sparse_add(*(t.replace(features=f) for t, f in zip(tensors, fs))).dense() * weights
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
      results.append(jax.jit(lambda *ts: ops.sparse_add(*ts))(*tensors))
  ffi, reference = results
  np.testing.assert_array_equal(ffi.indices, reference.indices)
  np.testing.assert_array_equal(ffi.features, reference.features)
  eager = ops.sparse_add(*tensors)
  np.testing.assert_array_equal(ffi.to_numpy()[1], eager.to_numpy()[1])
  np.testing.assert_array_equal(ffi.to_numpy()[0], eager.to_numpy()[0])
  assert ffi.capacity == sum(t.capacity for t in tensors)  # the union always fits by default
  jsparse.check_capacity(ffi)


def test_sparse_add_capacity_is_never_silently_short():
  tensors = _overlapping(np.random.default_rng(2))
  needed = ops.sparse_add(*tensors).capacity
  with pytest.raises(jsparse.CapacityError, match=f"capacity >= {needed}"):
    ops.sparse_add(*tensors, capacity=needed - 1)
  short = jax.jit(lambda *ts: ops.sparse_add(*ts, capacity=needed - 1))(*tensors)
  with pytest.raises(jsparse.CapacityError, match="sparse_add"):
    jsparse.check_capacity(short)
  roomy = ops.sparse_add(*tensors, capacity=needed + 5)
  assert roomy.capacity == needed + 5 and int(roomy.num_active) == needed


def test_sparse_add_keeps_the_maps_and_rows_of_an_operand_that_holds_every_site():
  rng = np.random.default_rng(3)
  x = random_tensor(rng, 2, SHAPE, 3, 40, padding_rows=3)
  conv = spnn.SubMConv3d(3, 3, 3, indice_key="s0", rngs=nnx.Rngs(0))
  y = conv(x)
  features, sites = x.to_numpy()
  part = jsparse.SparseConvTensor(features[::3] * 2, sites[::3], SHAPE, 2)
  out = ops.sparse_add(part, y)
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
  with pytest.raises(ValueError, match="use jsparse.ops.sparse_add"):
    x + other
  with pytest.raises(ValueError, match="use jsparse.ops.sparse_add"):
    x + random_tensor(rng, 2, SHAPE, 3, 31)


def test_sparse_cat_concatenates_channels_with_gradients():
  rng = np.random.default_rng(5)
  x = random_tensor(rng, 2, SHAPE, 3, 30, padding_rows=2)
  y = x.replace(features=jnp.asarray(rng.standard_normal((x.capacity, 2)), jnp.bfloat16))
  out = ops.sparse_cat(x, y)
  assert out.features.shape == (x.capacity, 5) and out.features.dtype == jnp.float32
  np.testing.assert_array_equal(out.features[:, :3], x.features)
  np.testing.assert_array_equal(out.features[:, 3:], y.features.astype(jnp.float32))
  weights = jnp.arange(5.0)[None, :]
  cat = lambda a, b: ops.sparse_cat(x.replace(features=a), y.replace(features=b)).features
  gx, gy = jax.grad(lambda a, b: jnp.sum(cat(a, b) * weights), argnums=(0, 1))(x.features, y.features)
  np.testing.assert_array_equal(gx, np.tile([0.0, 1.0, 2.0], (x.capacity, 1)))
  np.testing.assert_array_equal(np.asarray(gy, np.float32), np.tile([3.0, 4.0], (x.capacity, 1)))
  with pytest.raises(ValueError, match="operand 1 does not have operand 0's sites"):
    ops.sparse_cat(x, random_tensor(rng, 2, SHAPE, 3, 30, padding_rows=2))


def test_operand_errors_name_the_problem():
  rng = np.random.default_rng(6)
  x = random_tensor(rng, 2, SHAPE, 3, 10)
  with pytest.raises(ValueError, match="at least one"):
    ops.sparse_add()
  with pytest.raises(TypeError, match="operand 1 is a ndarray"):
    ops.sparse_add(x, np.ones(3))
  with pytest.raises(ValueError, match="spatial_shape=\\(6, 5, 5\\)"):
    ops.sparse_add(x, random_tensor(rng, 2, (6, 5, 5), 3, 10))
  with pytest.raises(ValueError, match="one channel count"):
    ops.sparse_add(x, random_tensor(rng, 2, SHAPE, 4, 10))
