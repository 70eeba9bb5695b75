"""Porting spconv code: spconv's constructor calls either work unchanged (positional arguments in
spconv's order) or fail with a TypeError that says what to write instead."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import nn as spnn
from jsparse._porting import SPCONV_ONLY

CONVS = [f"{kind}{n}d" for kind in ("SparseConv", "SubMConv", "SparseConvTranspose") for n in (1, 2, 3, 4)]
POOLS = [f"{kind}{n}d" for kind in ("SparseMaxPool", "SparseAvgPool") for n in (1, 2, 3, 4)]


@pytest.mark.parametrize("name", CONVS)
def test_spconv_positional_conv_calls_work_unchanged(name):
  # spconv: (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, indice_key)
  layer = getattr(spnn, name)(4, 8, 3, 2, 1, 1, 1, False, "key", rngs=nnx.Rngs(0))
  assert (layer.in_channels, layer.kernel_size[0], layer.indice_key, layer.bias) == (4, 3, "key", None)


@pytest.mark.parametrize("name", POOLS)
def test_spconv_positional_pool_calls_work_unchanged(name):
  # spconv: (kernel_size, stride, padding, dilation, indice_key, subm)
  layer = getattr(spnn, name)(3, 2, 1, 1, "pool", False)
  assert (layer.kernel_size[0], layer.stride[0], layer.padding[0], layer.indice_key) == (3, 2, 1, "pool")


@pytest.mark.parametrize(
  "argument", ["algo", "fp32_accum", "record_voxel_count", "large_kernel_fast_algo", "name"]
)
@pytest.mark.parametrize("name", [*CONVS, "SparseInverseConv3d"])
def test_spconv_only_conv_arguments_say_what_to_write(name, argument):
  cls = getattr(spnn, name)
  args = (4, 8, 3, "key") if "Inverse" in name else (4, 8, 3)
  with pytest.raises(TypeError, match=rf"^{name} does not take .*{argument}=: {SPCONV_ONLY[argument][:20]}"):
    cls(*args, **{argument: None}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", POOLS)
def test_spconv_only_pool_arguments_say_what_to_write(name):
  with pytest.raises(
    TypeError, match=r"algo=: delete it, jsparse picks its kernels itself.*record_voxel_count="
  ):
    getattr(spnn, name)(3, algo=None, record_voxel_count=False)


def test_fused_activation_says_to_apply_it_after_the_layer():
  with pytest.raises(TypeError, match=r"act_type=: delete it and apply the activation after the layer"):
    spnn.SubMConv3d(4, 8, 3, act_type="relu", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm"])
def test_pytorch_norm_arguments_name_flax_arguments(name):
  with pytest.raises(TypeError, match=rf"^{name} does not take .*eps=: write epsilon="):
    getattr(spnn, name)(8, eps=1e-3, rngs=nnx.Rngs(0))
  groups = {"num_groups": 2} if name == "GroupNorm" else {}
  assert getattr(spnn, name)(8, epsilon=1e-3, **groups, rngs=nnx.Rngs(0)).epsilon == 1e-3


def test_point_to_voxel_device_says_to_place_the_points():
  args = ([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 4, 100, 5)
  with pytest.raises(TypeError, match=r"device=: delete it, jsparse computes where its inputs are"):
    jsparse.utils.PointToVoxel(*args, device="cuda:0")
  assert jsparse.utils.PointToVoxel(*args).max_num_voxels == 100


def test_other_unknown_arguments_keep_pythons_error():
  with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
    spnn.SparseConv3d(4, 8, 3, colour=1, rngs=nnx.Rngs(0))


def test_signatures_stay_visible_to_tools():
  parameters = inspect.signature(spnn.SubMConv3d.__init__).parameters
  assert list(parameters)[1:4] == ["in_channels", "out_channels", "kernel_size"] and "rngs" in parameters
  assert "subm" in inspect.signature(spnn.SparseMaxPool3d.__init__).parameters
  assert "epsilon" in inspect.signature(spnn.BatchNorm.__init__).parameters


def test_int64_indices_as_spconv_makes_them():
  indices = np.array([[0, 0, 1, 2], [0, 3, 3, 3]], np.int64)  # torch.long in spconv code
  x = jsparse.SparseConvTensor(np.ones((2, 4), np.float32), indices, (4, 4, 4), 1)
  assert x.indices.dtype == np.int32 and int(x.num_active) == 2
