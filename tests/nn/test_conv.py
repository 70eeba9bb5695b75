"""Convolution layers: dense equivalence per alias, indice_key reuse and errors, capacity, spconv's
examples; and the same active sites and values as spconv 2.3.8's layers for the same weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dense_oracle
import jsparse
from jsparse import nn as spnn
from jsparse.utils import voxelize_mean
from sparse_data import assert_same_as_spconv, random_sites, random_tensor, spconv_tensors

ATOL = 1e-4
SHAPES = {1: (11,), 2: (7, 6), 3: (5, 6, 4), 4: (4, 3, 4, 3)}


def _dense_expected(layer, x, y):
  """The layer's output computed densely from its own parameters, sampled at ``y``'s sites."""
  kernel, bias = layer.kernel[...], layer.bias[...]
  dense = x.dense()
  if isinstance(layer, spnn.SubMConv):
    out = dense_oracle.subm_conv(dense, kernel, layer.dilation, layer.groups)
  elif isinstance(layer, spnn.SparseConvTranspose):
    out = dense_oracle.conv_transpose(
      dense, kernel, layer.stride, layer.padding, layer.dilation, layer.groups
    )
  else:
    out = dense_oracle.conv(dense, kernel, layer.stride, layer.padding, layer.dilation, layer.groups)
  return dense_oracle.sample(out, y.to_numpy()[1]) + bias[None, :]


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["SparseConv", "SubMConv", "SparseConvTranspose"])
def test_layer_aliases_match_dense_eager_and_jit(kind, ndim):
  rng = np.random.default_rng(ndim)
  x = random_tensor(rng, 2, SHAPES[ndim], 4, 25, padding_rows=2)
  cls = getattr(spnn, f"{kind}{ndim}d")
  assert cls.__name__ == f"{kind}{ndim}d" and issubclass(cls, getattr(spnn, kind))
  kernel_size = (3, 2, 3, 2)[:ndim]  # anisotropic, with even sizes
  layer = cls(4, 6, kernel_size, stride=2, padding=1, groups=2, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (*kernel_size, 2, 6) and layer.bias.shape == (6,)
  y = layer(x)
  np.testing.assert_allclose(y.to_numpy()[0], _dense_expected(layer, x, y), atol=ATOL, rtol=0)

  layer.out_capacity = jsparse.round_capacity(y.capacity)
  y_jit = nnx.jit(lambda layer, x: layer(x))(layer, x)
  jsparse.check_capacity(y_jit)
  assert y_jit.capacity == (x.capacity if kind == "SubMConv" else layer.out_capacity)
  np.testing.assert_array_equal(y_jit.to_numpy()[1], y.to_numpy()[1])
  np.testing.assert_allclose(y_jit.to_numpy()[0], y.to_numpy()[0], atol=1e-6)


def test_inverse_conv_restores_sites_and_matches_dense():
  rng = np.random.default_rng(5)
  x = random_tensor(rng, 2, (9, 8, 7), 3, 60, padding_rows=4)
  down = spnn.SparseConv3d(3, 5, 3, 2, indice_key="cp0", rngs=nnx.Rngs(0))
  up = spnn.SparseInverseConv3d(5, 4, 3, indice_key="cp0", rngs=nnx.Rngs(1))
  y = down(x)
  z = up(y)
  np.testing.assert_array_equal(z.indices, x.indices)  # same rows, same order, padding included
  assert z.spatial_shape == x.spatial_shape
  dense = dense_oracle.conv_transpose(
    y.dense(), up.kernel[...], (2,) * 3, (0,) * 3, (1,) * 3, out_shape=x.spatial_shape
  )
  expected = dense_oracle.sample(dense, x.to_numpy()[1]) + up.bias[...][None, :]
  np.testing.assert_allclose(z.to_numpy()[0], expected, atol=ATOL, rtol=0)


def test_submanifold_layers_share_a_map_by_key():
  x = random_tensor(np.random.default_rng(6), 1, (6, 6, 6), 4, 40)
  a = spnn.SubMConv3d(4, 4, 3, indice_key="subm0", rngs=nnx.Rngs(0))
  b = spnn.SubMConv3d(4, 4, 3, indice_key="subm0", rngs=nnx.Rngs(1))
  y = a(x)
  z = b(y)
  assert z.indice_dict["subm0"] is y.indice_dict["subm0"]  # reused, not rebuilt
  np.testing.assert_array_equal(z.indices, x.indices)


def test_mismatched_reuse_and_unknown_keys_are_errors():
  x = random_tensor(np.random.default_rng(7), 1, (6, 6, 6), 4, 40)
  y = spnn.SubMConv3d(4, 4, 3, indice_key="subm0", rngs=nnx.Rngs(0))(x)
  wrong = spnn.SubMConv3d(4, 4, 5, indice_key="subm0", rngs=nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"'subm0' holds a map that differs .*kernel_size=\(3, 3, 3\) \(needs \(5, 5, 5\)\).*Known keys",
  ):
    wrong(y)
  with pytest.raises(ValueError, match=r"unknown indice_key 'cp9'.*Known keys: 'subm0'"):
    spnn.SparseInverseConv3d(4, 4, 3, indice_key="cp9", rngs=nnx.Rngs(0))(y)
  z = spnn.SparseConv3d(4, 4, 3, 2, indice_key="cp0", rngs=nnx.Rngs(0))(y)
  with pytest.raises(ValueError, match=r"kernel_size=\(3, 3, 3\).*kernel_size=\(2, 2, 2\)"):
    spnn.SparseInverseConv3d(4, 4, 2, indice_key="cp0", rngs=nnx.Rngs(0))(z)
  with pytest.raises(ValueError, match="expects 3 spatial dims and 4 channels"):
    spnn.SubMConv3d(4, 4, 3, rngs=nnx.Rngs(0))(z.replace_feature(jnp.zeros((z.capacity, 2))))
  with pytest.raises(ValueError, match="divisible by groups=3"):
    spnn.SparseConv3d(4, 6, 3, groups=3, rngs=nnx.Rngs(0))


def test_capacity_eager_sizes_to_fit_or_raises_and_jit_records_overflow():
  x = random_tensor(np.random.default_rng(8), 2, (8, 8, 8), 2, 100, padding_rows=10)
  layer = spnn.SparseConv3d(2, 2, 3, 1, 1, rngs=nnx.Rngs(0))  # stride 1: the active set grows
  needed = int(layer(x).num_active)
  assert layer(x).capacity == needed > x.capacity
  layer.out_capacity = needed - 1
  with pytest.raises(jsparse.CapacityError, match=f"{needed} active sites but out_capacity={needed - 1}"):
    layer(x)
  y = nnx.jit(lambda layer, x: layer(x))(layer, x)
  with pytest.raises(jsparse.CapacityError, match=f"needed {needed} rows but its capacity is {needed - 1}"):
    jsparse.check_capacity(y)
  assert int(y.num_active) == needed - 1  # the first sites in (batch, coords) order are kept
  layer.out_capacity = jsparse.round_capacity(needed)
  jsparse.check_capacity(nnx.jit(lambda layer, x: layer(x))(layer, x))


def test_empty_and_all_padding_tensors():
  for capacity in (0, 5):
    x = jsparse.SparseConvTensor(
      np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), (6, 6), 2, capacity=capacity
    )
    for layer in (
      spnn.SubMConv2d(3, 4, 3, rngs=nnx.Rngs(0)),
      spnn.SparseConv2d(3, 4, 3, 2, rngs=nnx.Rngs(0)),
      spnn.SparseConvTranspose2d(3, 4, 3, 2, rngs=nnx.Rngs(0)),
    ):
      y = layer(x)
      assert int(y.num_active) == 0 and y.features.shape[1] == 4
      assert not np.any(np.asarray(y.dense()))
      y_jit = nnx.jit(lambda layer, x: layer(x))(layer, x)
      assert int(y_jit.num_active) == 0 and not np.any(np.asarray(y_jit.features))


def test_batch_with_an_empty_sample():
  rng = np.random.default_rng(9)
  x = random_tensor(rng, 1, (6, 6), 3, 12)
  x = jsparse.SparseConvTensor(x.features, x.indices, (6, 6), batch_size=3)  # samples 1, 2 empty
  layer = spnn.SparseConv2d(3, 4, 3, 2, 1, rngs=nnx.Rngs(0))
  y = layer(x)
  dense = y.dense()
  assert not np.any(np.asarray(dense[1:]))
  np.testing.assert_allclose(y.to_numpy()[0], _dense_expected(layer, x, y), atol=ATOL, rtol=0)


def _spconv_readme_net(rngs):
  """spconv's README example: SubM + BatchNorm + ReLU sharing indice_key, then down and up."""
  return spnn.SparseSequential(
    spnn.SubMConv3d(32, 32, 3, indice_key="subm0", rngs=rngs),
    nnx.BatchNorm(32, rngs=rngs),
    nnx.relu,
    spnn.SubMConv3d(32, 32, 3, indice_key="subm0", rngs=rngs),
    nnx.BatchNorm(32, rngs=rngs),
    nnx.relu,
    spnn.SparseConv3d(32, 64, 3, 2, indice_key="cp0", rngs=rngs),
    nnx.BatchNorm(64, rngs=rngs),
    nnx.relu,
    spnn.SparseInverseConv3d(64, 32, 3, indice_key="cp0", rngs=rngs),
  )


def test_spconv_examples_run_eagerly_under_jit_and_train():
  rng = np.random.default_rng(10)
  x = random_tensor(rng, 2, (10, 10, 10), 32, 150, padding_rows=10)
  target = jnp.asarray(rng.standard_normal((x.capacity, 32)), jnp.float32) * x.mask[:, None]
  net = _spconv_readme_net(nnx.Rngs(0))
  y = net(x)  # eager
  np.testing.assert_array_equal(y.indices, x.indices)
  assert set(y.indice_dict) == {"subm0", "cp0"}

  optimizer = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(net, optimizer, x, target):
    def loss_fn(net):
      y = net(x)
      return jnp.sum((y.features - target) ** 2) / jnp.sum(x.mask), y.overflow

    (loss, overflow), grads = nnx.value_and_grad(loss_fn, has_aux=True)(net)
    optimizer.update(net, grads)
    return loss, overflow

  losses = []
  for _ in range(6):
    loss, overflow = step(net, optimizer, x, target)
    jsparse.check_capacity(overflow)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  net.eval()
  y_eval = nnx.jit(lambda net, x: net(x))(net, x)
  assert not np.any(np.asarray(y_eval.features)[~np.asarray(x.mask)])  # padding stays zero


# ---- against spconv 2.3.8 ------------------------------------------------------------------------
# Skipped where spconv is not installed (``pip install torch==2.13.0 spconv==2.3.8``; ``make test-spconv``
# installs it and fails instead of skipping). spconv's CPU build is only correct single-threaded
# (``OMP_NUM_THREADS=1`` before its OpenMP runtime loads, and ``torch.set_num_threads(1)``: the
# ``spconv`` fixture sees to both) and has no conv backward, so only forward passes are compared. It
# orders the output rows of strided and transposed layers its own way: both sides are sorted by (batch,
# coords) before comparing. Its layers are left in training mode: in eval mode its CPU path asserts on a
# bias ("cpu don't support act and bias").

SP_SHAPE = (9, 10, 11)
SP_BATCH = 2
SP_CHANNELS = 8

JSPARSE_LAYERS = {"subm": spnn.SubMConv3d, "conv": spnn.SparseConv3d, "transpose": spnn.SparseConvTranspose3d}
SPCONV_LAYERS = {"subm": "SubMConv3d", "conv": "SparseConv3d", "transpose": "SparseConvTranspose3d"}


def _inputs(seed: int = 0, count: int = 300) -> tuple[np.ndarray, np.ndarray]:
  """``(features [count, SP_CHANNELS], indices int32 [count, 4])``: distinct random sites."""
  rng = np.random.default_rng(seed)
  indices = random_sites(rng, SP_BATCH, SP_SHAPE, count)
  return rng.standard_normal((len(indices), SP_CHANNELS)).astype(np.float32), indices


def _copy_parameters(torch: Any, js_layer: Any, sp_layer: Any) -> None:
  """jsparse ``kernel [*k, C_in, C_out]`` -> spconv's KRSC ``weight [C_out, *k, C_in]``; and the bias."""
  kernel = np.asarray(js_layer.kernel[...])
  assert tuple(sp_layer.weight.shape) == (kernel.shape[-1], *kernel.shape[:-2], kernel.shape[-2])
  sp_layer.weight.copy_(torch.from_numpy(np.moveaxis(kernel, -1, 0).copy()))
  if js_layer.bias is not None:
    sp_layer.bias.copy_(torch.from_numpy(np.array(js_layer.bias[...])))


def _numpy_init(seed: int, scale: float) -> nnx.Initializer:
  """A host-side normal initializer: no per-shape jax.random compilation in eager tests."""
  rng = np.random.default_rng(seed)
  return lambda key, shape, dtype: jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _layers(spconv: Any, kind: str, bias: bool = False, seed: int = 0, **geometry: Any) -> tuple[Any, Any]:
  """A jsparse layer (random kernel, and bias) and the spconv layer with the same parameters."""
  torch, sp = spconv
  init = dict(kernel_init=_numpy_init(seed, 0.1), bias_init=_numpy_init(seed + 1, 1.0), rngs=nnx.Rngs(0))
  js_layer = JSPARSE_LAYERS[kind](SP_CHANNELS, SP_CHANNELS, bias=bias, **init, **geometry)
  sp_layer = getattr(sp, SPCONV_LAYERS[kind])(SP_CHANNELS, SP_CHANNELS, bias=bias, **geometry)
  _copy_parameters(torch, js_layer, sp_layer)
  return js_layer, sp_layer


def _case_id(value: Any) -> str:
  """``conv``, ``kernel_size=3, stride=2`` -> ``conv``, ``k3-s2``."""
  if isinstance(value, str):
    return value
  return "-".join(f"{name[0]}{size}".replace(" ", "") for name, size in value.items())


def _tensors(spconv: Any, features: np.ndarray, indices: np.ndarray, shape=SP_SHAPE) -> tuple[Any, Any]:
  return spconv_tensors(*spconv, features, indices, shape, SP_BATCH)


@pytest.mark.spconv
@pytest.mark.parametrize(
  "kind, geometry",
  [
    ("subm", dict(kernel_size=3)),
    ("subm", dict(kernel_size=3, dilation=2)),
    ("subm", dict(kernel_size=(3, 1, 5))),
    ("conv", dict(kernel_size=3, stride=2, padding=1)),
    ("conv", dict(kernel_size=2, stride=2)),
    ("conv", dict(kernel_size=3, padding=1, dilation=2)),
    ("conv", dict(kernel_size=(3, 2, 1), stride=(2, 1, 2), padding=(1, 0, 0))),
    # Dilation 1 only: spconv's transposed output grid omits the dilation term.
    ("transpose", dict(kernel_size=3, stride=2)),
    ("transpose", dict(kernel_size=(3, 2, 3), stride=2, padding=(1, 0, 1))),
  ],
  ids=_case_id,
)
def test_layer_matches_spconv(spconv, kind, geometry):
  js_x, sp_x = _tensors(spconv, *_inputs())
  js_layer, sp_layer = _layers(spconv, kind, **geometry)
  assert_same_as_spconv(js_layer(js_x), sp_layer(sp_x), ATOL, same_order=kind == "subm")


@pytest.mark.spconv
@pytest.mark.parametrize(
  "kind, geometry",
  [("subm", dict(kernel_size=3)), ("conv", dict(kernel_size=3, stride=2, padding=1))],
  ids=_case_id,
)
def test_bias_matches_spconv(spconv, kind, geometry):
  js_x, sp_x = _tensors(spconv, *_inputs(seed=1))
  js_layer, sp_layer = _layers(spconv, kind, bias=True, seed=1, **geometry)
  assert_same_as_spconv(js_layer(js_x), sp_layer(sp_x), ATOL, same_order=kind == "subm")


@pytest.mark.spconv
@pytest.mark.parametrize(
  "geometry", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, stride=2)], ids=_case_id
)
def test_inverse_conv_matches_spconv(spconv, geometry):
  torch, sp = spconv
  js_x, sp_x = _tensors(spconv, *_inputs(seed=2))
  js_down, sp_down = _layers(spconv, "conv", indice_key="down", **geometry)
  js_y, sp_y = js_down(js_x), sp_down(sp_x)
  assert_same_as_spconv(js_y, sp_y, ATOL)
  k = geometry["kernel_size"]
  init = dict(kernel_init=_numpy_init(3, 0.1), bias_init=_numpy_init(4, 1.0), rngs=nnx.Rngs(0))
  js_up = spnn.SparseInverseConv3d(SP_CHANNELS, SP_CHANNELS, k, "down", bias=True, **init)
  sp_up = sp.SparseInverseConv3d(SP_CHANNELS, SP_CHANNELS, k, "down", bias=True)
  _copy_parameters(torch, js_up, sp_up)
  # Both return the strided layer's input rows, in that layer's input order.
  assert_same_as_spconv(js_up(js_y), sp_up(sp_y), ATOL, same_order=True)


@pytest.mark.spconv
def test_scan_crops_match_spconv(spconv, scans):
  """SubM, strided conv and its inverse on two crops of a KITTI sweep (0.2 m voxels) as a batch."""
  torch, sp = spconv
  points = np.fromfile(scans / "kitti_000008.bin", np.float32).reshape(-1, 4)
  samples, shapes = [], []
  for b, (x0, y0) in enumerate([(10.0, -4.0), (5.0, -6.0)]):
    inside = (points[:, 0] >= x0) & (points[:, 0] < x0 + 8) & (points[:, 1] >= y0) & (points[:, 1] < y0 + 8)
    means, coords, shape = voxelize_mean(points[inside], 0.2)
    samples.append((means, np.c_[np.full(len(coords), b, np.int32), coords]))
    shapes.append(shape)
  features = np.concatenate([m for m, _ in samples])  # x, y, z, intensity: centred, twice
  features = np.tile(features - features.mean(0), (1, SP_CHANNELS // features.shape[1])).astype(np.float32)
  indices = np.concatenate([i for _, i in samples]).astype(np.int32)
  js_x, sp_x = _tensors(spconv, features, indices, tuple(int(n) for n in np.max(shapes, axis=0)))
  assert len(indices) > 1000
  for kind, geometry in [
    ("subm", dict(kernel_size=3, indice_key="subm")),
    ("conv", dict(kernel_size=3, stride=2, padding=1, indice_key="down")),
  ]:
    js_layer, sp_layer = _layers(spconv, kind, bias=True, **geometry)
    js_x, sp_x = js_layer(js_x), sp_layer(sp_x)
    assert_same_as_spconv(js_x, sp_x, ATOL, same_order=kind == "subm")
  init = dict(kernel_init=_numpy_init(5, 0.1), rngs=nnx.Rngs(0))
  js_up = spnn.SparseInverseConv3d(SP_CHANNELS, SP_CHANNELS, 3, "down", bias=False, **init)
  sp_up = sp.SparseInverseConv3d(SP_CHANNELS, SP_CHANNELS, 3, "down", bias=False)
  _copy_parameters(torch, js_up, sp_up)
  js_out, sp_out = js_up(js_x), sp_up(sp_x)
  assert_same_as_spconv(js_out, sp_out, ATOL, same_order=True)
  np.testing.assert_array_equal(js_out.to_numpy()[1], indices)


def test_default_kernel_init_is_lecun_normal_with_few_compilations():
  from jsparse.nn._conv import _truncated_normal_draw, lecun_normal

  w = np.asarray(lecun_normal(jax.random.key(0), (3, 3, 3, 32, 64)))
  scale = np.sqrt(27 * 32)  # variance 1 / fan_in, fan_in = prod(kernel_size) * C_in
  assert w.shape == (3, 3, 3, 32, 64) and abs(w.std() * scale - 1) < 0.02 and abs(w.mean() * scale) < 0.02
  assert np.abs(w).max() * scale <= 2 / 0.87962566103423978 + 1e-5  # truncated at two deviations
  np.testing.assert_array_equal(w, lecun_normal(jax.random.key(0), (3, 3, 3, 32, 64)))
  assert not np.array_equal(w, lecun_normal(jax.random.key(1), (3, 3, 3, 32, 64)))
  before = _truncated_normal_draw._cache_size()
  for shape in ((27, 3, 3), (3, 3, 3, 2, 4), (2, 2, 2, 5, 4), (150,)):  # 129 to 256 values: one draw size
    lecun_normal(jax.random.key(2), shape)
  assert _truncated_normal_draw._cache_size() - before <= 1
