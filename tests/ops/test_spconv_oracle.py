"""jsparse against spconv 2.3.8 (CPU build): the same active sites and values for the same weights.

Skipped where spconv is not installed (``pip install torch==2.13.0 spconv==2.3.8``; ``make test-spconv``
installs it and fails instead of skipping). spconv's CPU build is only correct single-threaded
(``OMP_NUM_THREADS=1`` before its OpenMP runtime loads, and ``torch.set_num_threads(1)``) and has no
conv backward, so only forward passes are compared. It orders the output rows of strided and transposed
layers its own way: both sides are sorted by (batch, coords) before comparing. Its layers are left in
training mode: in eval mode its CPU path asserts on a bias ("cpu don't support act and bias").
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse.utils import voxelize_mean
from sparse_data import random_sites
from spconv_import import import_spconv

torch, spconv = import_spconv("spconv.pytorch")

pytestmark = pytest.mark.spconv

ATOL = 1e-4
SHAPE = (9, 10, 11)
BATCH = 2
CHANNELS = 8

JSPARSE = {
  "subm": jsparse.nn.SubMConv3d,
  "conv": jsparse.nn.SparseConv3d,
  "transpose": jsparse.nn.SparseConvTranspose3d,
}
SPCONV = {"subm": spconv.SubMConv3d, "conv": spconv.SparseConv3d, "transpose": spconv.SparseConvTranspose3d}


@pytest.fixture(autouse=True)
def _single_threaded_torch():
  previous = torch.get_num_threads()
  torch.set_num_threads(1)
  with torch.no_grad():
    yield
  torch.set_num_threads(previous)


def _inputs(seed: int = 0, count: int = 300) -> tuple[np.ndarray, np.ndarray]:
  """``(features [count, CHANNELS], indices int32 [count, 4])``: distinct random sites."""
  rng = np.random.default_rng(seed)
  indices = random_sites(rng, BATCH, SHAPE, count)
  return rng.standard_normal((len(indices), CHANNELS)).astype(np.float32), indices


def _copy_parameters(js_layer: Any, sp_layer: Any) -> None:
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


def _layers(kind: str, bias: bool = False, seed: int = 0, **geometry: Any) -> tuple[Any, Any]:
  """A jsparse layer (random kernel, and bias) and the spconv layer with the same parameters."""
  init = dict(kernel_init=_numpy_init(seed, 0.1), bias_init=_numpy_init(seed + 1, 1.0), rngs=nnx.Rngs(0))
  js_layer = JSPARSE[kind](CHANNELS, CHANNELS, bias=bias, **init, **geometry)
  sp_layer = SPCONV[kind](CHANNELS, CHANNELS, bias=bias, **geometry)
  _copy_parameters(js_layer, sp_layer)
  return js_layer, sp_layer


def _sorted_rows(indices: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  order = np.lexsort(indices.T[::-1])
  return indices[order], features[order]


def _assert_same(js_out: jsparse.SparseConvTensor, sp_out: Any, same_order: bool = False) -> None:
  """Same grid, the same active sites (as sorted sets) and the same features at each site."""
  assert tuple(js_out.spatial_shape) == tuple(sp_out.spatial_shape)
  js_features, js_indices = js_out.to_numpy()
  sp_indices, sp_features = sp_out.indices.numpy(), sp_out.features.numpy()
  if same_order:
    np.testing.assert_array_equal(js_indices, sp_indices)
  js_indices, js_features = _sorted_rows(js_indices, js_features)
  sp_indices, sp_features = _sorted_rows(sp_indices, sp_features)
  np.testing.assert_array_equal(js_indices, sp_indices)
  np.testing.assert_allclose(js_features, sp_features, atol=ATOL, rtol=0)


def _case_id(value: Any) -> str:
  """``conv``, ``kernel_size=3, stride=2`` -> ``conv``, ``k3-s2``."""
  if isinstance(value, str):
    return value
  return "-".join(f"{name[0]}{size}".replace(" ", "") for name, size in value.items())


def _tensors(features: np.ndarray, indices: np.ndarray, shape=SHAPE) -> tuple[Any, Any]:
  js = jsparse.SparseConvTensor(features, indices, shape, BATCH)
  sp = spconv.SparseConvTensor(torch.from_numpy(features), torch.from_numpy(indices), list(shape), BATCH)
  return js, sp


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
def test_layer_matches_spconv(kind, geometry):
  js_x, sp_x = _tensors(*_inputs())
  js_layer, sp_layer = _layers(kind, **geometry)
  _assert_same(js_layer(js_x), sp_layer(sp_x), same_order=kind == "subm")


@pytest.mark.parametrize(
  "kind, geometry",
  [("subm", dict(kernel_size=3)), ("conv", dict(kernel_size=3, stride=2, padding=1))],
  ids=_case_id,
)
def test_bias_matches_spconv(kind, geometry):
  js_x, sp_x = _tensors(*_inputs(seed=1))
  js_layer, sp_layer = _layers(kind, bias=True, seed=1, **geometry)
  _assert_same(js_layer(js_x), sp_layer(sp_x), same_order=kind == "subm")


@pytest.mark.parametrize(
  "geometry", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, stride=2)], ids=_case_id
)
def test_inverse_conv_matches_spconv(geometry):
  js_x, sp_x = _tensors(*_inputs(seed=2))
  js_down, sp_down = _layers("conv", indice_key="down", **geometry)
  js_y, sp_y = js_down(js_x), sp_down(sp_x)
  _assert_same(js_y, sp_y)
  k = geometry["kernel_size"]
  init = dict(kernel_init=_numpy_init(3, 0.1), bias_init=_numpy_init(4, 1.0), rngs=nnx.Rngs(0))
  js_up = jsparse.nn.SparseInverseConv3d(CHANNELS, CHANNELS, k, "down", bias=True, **init)
  sp_up = spconv.SparseInverseConv3d(CHANNELS, CHANNELS, k, "down", bias=True)
  _copy_parameters(js_up, sp_up)
  # Both return the strided layer's input rows, in that layer's input order.
  _assert_same(js_up(js_y), sp_up(sp_y), same_order=True)


def test_scan_crops_match_spconv(scans):
  """SubM, strided conv and its inverse on two crops of a KITTI sweep (0.2 m voxels) as a batch."""
  points = np.fromfile(scans / "kitti_000008.bin", np.float32).reshape(-1, 4)
  samples, shapes = [], []
  for b, (x0, y0) in enumerate([(10.0, -4.0), (5.0, -6.0)]):
    inside = (points[:, 0] >= x0) & (points[:, 0] < x0 + 8) & (points[:, 1] >= y0) & (points[:, 1] < y0 + 8)
    means, coords, shape = voxelize_mean(points[inside], 0.2)
    samples.append((means, np.c_[np.full(len(coords), b, np.int32), coords]))
    shapes.append(shape)
  features = np.concatenate([m for m, _ in samples])  # x, y, z, intensity: centred, twice
  features = np.tile(features - features.mean(0), (1, CHANNELS // features.shape[1])).astype(np.float32)
  indices = np.concatenate([i for _, i in samples]).astype(np.int32)
  js_x, sp_x = _tensors(features, indices, tuple(int(n) for n in np.max(shapes, axis=0)))
  assert len(indices) > 1000
  for kind, geometry in [
    ("subm", dict(kernel_size=3, indice_key="subm")),
    ("conv", dict(kernel_size=3, stride=2, padding=1, indice_key="down")),
  ]:
    js_layer, sp_layer = _layers(kind, bias=True, **geometry)
    js_x, sp_x = js_layer(js_x), sp_layer(sp_x)
    _assert_same(js_x, sp_x, same_order=kind == "subm")
  init = dict(kernel_init=_numpy_init(5, 0.1), rngs=nnx.Rngs(0))
  js_up = jsparse.nn.SparseInverseConv3d(CHANNELS, CHANNELS, 3, "down", bias=False, **init)
  sp_up = spconv.SparseInverseConv3d(CHANNELS, CHANNELS, 3, "down", bias=False)
  _copy_parameters(js_up, sp_up)
  js_out, sp_out = js_up(js_x), sp_up(sp_x)
  _assert_same(js_out, sp_out, same_order=True)
  np.testing.assert_array_equal(js_out.to_numpy()[1], indices)


@pytest.mark.parametrize(
  "geometry", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)], ids=_case_id
)
def test_max_pool_matches_spconv_on_positive_features(geometry):
  # spconv clamps the maximum at 0 (its issue 754); on positive features the two agree.
  features, indices = _inputs(seed=4)
  js_x, sp_x = _tensors(np.abs(features) + 0.5, indices)
  js_out = jsparse.nn.SparseMaxPool3d(**geometry)(js_x)
  _assert_same(js_out, spconv.SparseMaxPool3d(**geometry)(sp_x))
