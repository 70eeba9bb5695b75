"""What every sparse layer shares: the rank from ``num_spatial_dims`` (required by the generic classes,
fixed by the 1d-4d ones) and the input checks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jsparse import nn as spnn
from sparse_data import random_tensor

CONVS = ["SparseConv", "SubMConv", "SparseConvTranspose"]
POOLS = ["SparseMaxPool", "SparseAvgPool"]


def _make(name: str, rank_suffix: str = "", **kwargs):
  cls = getattr(spnn, name + rank_suffix)
  if name in POOLS:
    return cls(2, **kwargs)
  if name == "SparseInverseConv":
    return cls(4, 8, 3, "down", rngs=nnx.Rngs(0), **kwargs)
  return cls(4, 8, 3, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("name", [*CONVS, "SparseInverseConv", *POOLS])
def test_generic_classes_need_num_spatial_dims(name):
  with pytest.raises(TypeError, match=f"{name} needs num_spatial_dims=.*{name}1d to {name}4d"):
    _make(name)
  for bad in (0, -1, 2.0, "3"):
    with pytest.raises(TypeError, match="num_spatial_dims"):
      _make(name, num_spatial_dims=bad)
  for ndim in (1, 3, 5):  # any positive rank, beyond the fixed-rank classes too
    layer = _make(name, num_spatial_dims=ndim)
    assert layer.num_spatial_dims == ndim and layer.kernel_size == (3 if name not in POOLS else 2,) * ndim


@pytest.mark.parametrize("name", [*CONVS, "SparseInverseConv", *POOLS])
def test_fixed_rank_classes_reject_another_rank(name):
  with pytest.raises(ValueError, match=f"{name}3d is 3-D; num_spatial_dims=2 contradicts it"):
    _make(name, "3d", num_spatial_dims=2)
  assert _make(name, "3d", num_spatial_dims=3).num_spatial_dims == 3  # agreeing: accepted
  assert _make(name, "2d").num_spatial_dims == 2


def test_generic_layer_runs_on_its_rank_only():
  x = random_tensor(np.random.default_rng(0), 1, (5, 5), 4, 10)
  layer = spnn.SubMConv(4, 8, 3, num_spatial_dims=2, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (3, 3, 4, 8) and layer(x).features.shape == (x.capacity, 8)
  with pytest.raises(ValueError, match=r"expects 3 spatial dims, got a tensor over \(5, 5\)"):
    spnn.SparseMaxPool(2, num_spatial_dims=3)(x)
  with pytest.raises(TypeError, match="SparseGlobalAvgPool expects a SparseConvTensor, got ArrayImpl"):
    spnn.SparseGlobalAvgPool()(jnp.zeros((3, 4)))
  # The global pools take any rank.
  assert spnn.SparseGlobalMaxPool()(x).shape == (1, 4)
