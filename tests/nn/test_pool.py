"""Pool layers against lax.reduce_window on the densified tensor: values, gradients, tie rule; max
pooling against spconv 2.3.8's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import dense_oracle
import jsparse
from jsparse import nn as spnn
from sparse_data import assert_same_as_spconv, random_sites, random_tensor, spconv_tensors

SHAPES = {1: (11,), 2: (7, 6), 3: (5, 6, 4), 4: (4, 3, 4, 3)}


def _window(x, op, layer):
  """``reduce_window`` of channels-last ``x [B, *S, C]`` with the layer's geometry."""
  init = -jnp.inf if op is lax.max else 0.0
  return lax.reduce_window(
    x,
    jnp.asarray(init, x.dtype),
    op,
    (1, *layer.kernel_size, 1),
    (1, *layer.stride, 1),
    [(0, 0), *((p, p) for p in layer.padding), (0, 0)],
    window_dilation=(1, *layer.dilation, 1),
  )


def _dense_pool(layer, x: jsparse.SparseConvTensor, features, out_sites):
  """The layer's output at ``out_sites``, computed densely from ``features`` at ``x``'s sites."""
  xx = x.replace(features=features)
  dense = xx.dense()
  occupied = x.replace(features=jnp.ones((x.capacity, 1), features.dtype)).dense() > 0
  if isinstance(layer, spnn.SparseMaxPool):
    out = _window(jnp.where(occupied, dense, -jnp.inf), lax.max, layer)
  else:
    out = _window(dense, lax.add, layer) / _window(occupied.astype(dense.dtype), lax.add, layer)
  return dense_oracle.sample(out, out_sites)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["SparseMaxPool", "SparseAvgPool"])
def test_pool_matches_reduce_window_with_gradients(kind, ndim):
  rng = np.random.default_rng(10 + ndim)
  x = random_tensor(rng, 2, SHAPES[ndim], 3, 25, padding_rows=3)
  cls = getattr(spnn, f"{kind}{ndim}d")
  assert issubclass(cls, getattr(spnn, kind)) and cls.__name__ == f"{kind}{ndim}d"
  kernel_size = (3, 2, 3, 2)[:ndim]
  layer = cls(kernel_size, stride=2, padding=1)
  y = layer(x)
  _, sites = y.to_numpy()
  reached = dense_oracle.reached_sites(
    x.replace(features=jnp.ones((x.capacity, 1))).dense()[..., 0] > 0,
    layer.kernel_size, layer.stride, layer.padding, layer.dilation,
  )  # fmt: skip
  np.testing.assert_array_equal(sites, reached)
  expected = _dense_pool(layer, x, x.features, sites)
  np.testing.assert_allclose(y.to_numpy()[0], expected, rtol=1e-6, atol=1e-6)

  weights = jnp.asarray(rng.standard_normal(y.features.shape), jnp.float32)
  mask = y.mask[:, None]
  sparse_loss = lambda f: jnp.sum(jnp.where(mask, layer(x.replace(features=f)).features * weights, 0))
  active_weights = weights[np.flatnonzero(np.asarray(y.mask))]
  dense_loss = lambda f: jnp.sum(_dense_pool(layer, x, f, sites) * active_weights)
  grad = jax.grad(sparse_loss)(x.features)
  np.testing.assert_allclose(grad, jax.grad(dense_loss)(x.features), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(grad)[~np.asarray(x.mask)] == 0)


@pytest.mark.parametrize("kind", ["SparseMaxPool3d", "SparseAvgPool3d"])
def test_submanifold_pool_pools_the_window_centred_on_each_input_site(kind):
  x = random_tensor(np.random.default_rng(5), 2, SHAPES[3], 3, 40, padding_rows=4)
  layer = getattr(spnn, kind)(3, subm=True, indice_key="subm_pool")
  assert (layer.stride, layer.padding) == ((1, 1, 1), (1, 1, 1))
  y = layer(x)
  np.testing.assert_array_equal(np.asarray(y.indices), np.asarray(x.indices))  # the input's rows
  _, sites = y.to_numpy()
  np.testing.assert_allclose(y.to_numpy()[0], _dense_pool(layer, x, x.features, sites), rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(y.features)[~np.asarray(x.mask)] == 0)
  assert "subm_pool" in y.indice_dict


def test_max_pool_keeps_negative_maxima_and_routes_ties_to_the_first_tap():
  # Four inputs in one 2x2 window, all equal: the gradient goes to tap 0 (row-major first).
  sites = np.array([[0, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]], np.int32)
  x = jsparse.SparseConvTensor(np.full((4, 2), -3.0, np.float32), sites, (2, 2), 1)
  layer = spnn.SparseMaxPool2d(2)
  y = layer(x)
  np.testing.assert_array_equal(y.to_numpy()[0], [[-3.0, -3.0]])
  grad = jax.grad(lambda f: jnp.sum(layer(x.replace(features=f)).features))(x.features)
  expected = np.zeros((4, 2), np.float32)
  expected[1] = 1.0  # the site (0, 0) is tap 0
  np.testing.assert_array_equal(grad, expected)


def test_stride_defaults_to_kernel_size_and_pool_map_inverts():
  rng = np.random.default_rng(3)
  x = random_tensor(rng, 2, (8, 8, 8), 4, 60, padding_rows=4)
  pool = spnn.SparseMaxPool3d(2, indice_key="pool0")
  assert pool.stride == (2, 2, 2)
  y = pool(x)
  assert y.spatial_shape == (4, 4, 4) and "pool0" in y.indice_dict
  up = spnn.SparseInverseConv3d(4, 5, 2, indice_key="pool0", rngs=nnx.Rngs(0))
  z = up(y)
  np.testing.assert_array_equal(np.asarray(z.indices), np.asarray(x.indices))
  assert z.spatial_shape == x.spatial_shape


def test_pool_under_jit_records_overflow_and_errors_are_clear():
  rng = np.random.default_rng(4)
  x = random_tensor(rng, 1, (8, 8), 2, 30)
  layer = spnn.SparseAvgPool2d(2, out_capacity=4)
  with pytest.raises(jsparse.CapacityError, match="out_capacity=4"):
    layer(x)
  y = jax.jit(lambda x: layer(x))(x)
  with pytest.raises(jsparse.CapacityError, match="SparseAvgPool2d"):
    jsparse.check_capacity(y)
  with pytest.raises(ValueError, match="expects 3 spatial dims"):
    spnn.SparseMaxPool3d(2)(x)
  with pytest.raises(TypeError, match="expects a SparseConvTensor"):
    spnn.SparseGlobalMaxPool()(x.features)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_global_pools_per_sample_with_empty_sample(kind):
  rng = np.random.default_rng(6)
  x = random_tensor(rng, 3, (6, 6), 4, 20, padding_rows=3)
  # Sample 2's rows become padding (features left nonzero): it has no active rows, must give 0.
  idx = np.asarray(x.indices).copy()
  idx[idx[:, 0] == 2] = -1
  x = jsparse.SparseConvTensor(np.asarray(x.features), idx, (6, 6), 3)
  layer = spnn.SparseGlobalMaxPool() if kind == "max" else spnn.SparseGlobalAvgPool()
  out = layer(x)
  features, sites = x.to_numpy()
  assert out.shape == (3, 4)
  for b in range(3):
    rows = features[sites[:, 0] == b]
    expected = np.zeros(4) if len(rows) == 0 else (rows.max(0) if kind == "max" else rows.mean(0))
    np.testing.assert_allclose(out[b], expected, rtol=1e-6)
  grad = jax.grad(lambda f: jnp.sum(layer(x.replace(features=f)) * jnp.arange(1.0, 5.0)[None, :]))(x.features)
  grad = np.asarray(grad)
  assert np.all(grad[~np.asarray(x.mask)] == 0)
  for b in range(2):
    rows = np.flatnonzero(np.asarray(x.indices)[:, 0] == b)
    if kind == "avg":
      expected = np.tile(np.arange(1.0, 5.0) / len(rows), (len(rows), 1))
      np.testing.assert_allclose(grad[rows], expected, rtol=1e-6)
    else:
      for c in range(4):
        winner = rows[np.argmax(np.asarray(x.features)[rows, c])]
        np.testing.assert_array_equal(grad[rows, c], np.where(rows == winner, c + 1.0, 0.0))


def test_global_max_ties_go_to_the_lowest_row():
  idx = np.array([[-1, -1], [0, 1], [0, 2], [0, 0]], np.int32)
  x = jsparse.SparseConvTensor(np.array([[9.0], [2.0], [2.0], [1.0]], np.float32), idx, (3,), 1)
  grad = jax.grad(lambda f: jnp.sum(spnn.SparseGlobalMaxPool()(x.replace(features=f))))(x.features)
  np.testing.assert_array_equal(np.asarray(grad).ravel(), [0.0, 1.0, 0.0, 0.0])


def test_pools_run_in_sparse_sequential_with_flax_layers():
  rng = np.random.default_rng(8)
  x = random_tensor(rng, 2, (8, 8, 8), 4, 50, padding_rows=2)
  rngs = nnx.Rngs(0)
  net = spnn.SparseSequential(
    spnn.SubMConv3d(4, 8, 3, indice_key="s0", rngs=rngs),
    nnx.relu,
    spnn.SparseMaxPool3d(2, indice_key="p0"),
    spnn.SparseAvgPool3d(3, stride=1, padding=1),
    spnn.SparseGlobalAvgPool(),
    nnx.Linear(8, 3, rngs=rngs),
  )
  logits = nnx.jit(lambda net, x: net(x))(net, x)
  assert logits.shape == (2, 3) and np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.spconv
@pytest.mark.parametrize(
  "geometry", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)], ids=["k2", "k3-s2-p1"]
)
def test_max_pool_matches_spconv_on_positive_features(spconv, geometry):
  # spconv clamps the maximum at 0 (its issue 754); on positive features the two agree. spconv's CPU
  # build runs single-threaded (the spconv fixture sees to it).
  torch, sp = spconv
  rng = np.random.default_rng(4)
  shape, batch = (9, 10, 11), 2
  indices = random_sites(rng, batch, shape, 300)
  features = rng.standard_normal((len(indices), 8)).astype(np.float32)
  js_x, sp_x = spconv_tensors(torch, sp, np.abs(features) + 0.5, indices, shape, batch)
  js_out = spnn.SparseMaxPool3d(**geometry)(js_x)

  assert_same_as_spconv(js_out, sp.SparseMaxPool3d(**geometry)(sp_x), atol=1e-4)
