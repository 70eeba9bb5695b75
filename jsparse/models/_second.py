"""SECOND's and CenterPoint's sparse voxel backbones, layer for layer as OpenPCDet builds them
(``pcdet/models/backbones_3d/spconv_backbone.py``: ``VoxelBackBone8x``, ``VoxelResBackBone8x``).

Every convolution has OpenPCDet's kernel size, stride, padding, bias flag and ``indice_key``;
every BatchNorm has eps 1e-3 and PyTorch's momentum 0.01 (Flax's 0.99). Under jit the strided
stages' capacities follow the backbone's input capacity (``capacity_ratio``): measured on KITTI
at [0.05, 0.05, 0.1] m and on nuScenes at 0.075 m and 0.1 m, the four strided stages produce at
most 1.73, 1.23, 0.64 and 0.53 times the input's sites, and get 2, 1.5, 0.9 and 0.9 times its
capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jsparse import nn as spnn
from jsparse.tensor import SparseConvTensor

# Output capacity of each strided stage as a multiple of its input's: 2, then 1.5 / 2 = 0.75,
# 0.9 / 1.5 = 0.6 and 1 (times the backbone's input capacity: 2, 1.5, 0.9, 0.9).
_RATIOS = {"spconv2": 2.0, "spconv3": 0.75, "spconv4": 0.6, "spconv_down2": 1.0}  # by indice_key
STRIDES = {"x_conv1": 1, "x_conv2": 2, "x_conv3": 4, "x_conv4": 8}


def _norm(channels: int, rngs: nnx.Rngs) -> spnn.BatchNorm:
  """OpenPCDet's ``BatchNorm1d(eps=1e-3, momentum=0.01)``, in Flax's momentum convention."""
  return spnn.BatchNorm(channels, epsilon=1e-3, momentum=0.99, rngs=rngs)


def _post_act(conv: spnn.SparseModule, channels: int, rngs: nnx.Rngs) -> spnn.SparseSequential:
  """OpenPCDet's ``post_act_block``: a convolution (no bias), BatchNorm, ReLU."""
  return spnn.SparseSequential(conv, _norm(channels, rngs), nnx.relu)


def _subm_block(c_in: int, c_out: int, key: str, rngs: nnx.Rngs) -> spnn.SparseSequential:
  return _post_act(spnn.SubMConv3d(c_in, c_out, 3, bias=False, indice_key=key, rngs=rngs), c_out, rngs)


def _down_block(c_in: int, c_out: int, padding: Any, key: str, rngs: nnx.Rngs) -> spnn.SparseSequential:
  conv = spnn.SparseConv3d(
    c_in, c_out, 3, 2, padding, bias=False, indice_key=key, capacity_ratio=_RATIOS[key], rngs=rngs
  )
  return _post_act(conv, c_out, rngs)


class SparseBasicBlock(spnn.SparseModule):
  """OpenPCDet's residual block: two SubM 3x3x3 convolutions (with bias) and BatchNorms, the input
  added before the last ReLU.

  Args:
    channels: input and output channels.
    indice_key: the key both convolutions share their map under.
    rngs: random state.
  """

  def __init__(self, channels: int, indice_key: str, *, rngs: nnx.Rngs):
    self.conv1 = spnn.SubMConv3d(channels, channels, 3, bias=True, indice_key=indice_key, rngs=rngs)
    self.bn1 = _norm(channels, rngs)
    self.conv2 = spnn.SubMConv3d(channels, channels, 3, bias=True, indice_key=indice_key, rngs=rngs)
    self.bn2 = _norm(channels, rngs)

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    out = self.bn1(self.conv1(x))
    out = self.bn2(self.conv2(out.replace_feature(nnx.relu(out.features))))
    out = out + x  # SubM layers keep the input's rows
    return out.replace_feature(nnx.relu(out.features))


class _VoxelBackBone(nnx.Module):
  """The stages shared by both backbones; subclasses build ``conv1`` to ``conv4``."""

  strides = STRIDES

  @staticmethod
  def sparse_shape(grid_size_xyz: Sequence[int]) -> tuple[int, ...]:
    """The input's ``spatial_shape`` for a voxel grid (``PointToVoxel.grid_size_xyz``): zyx with
    one more cell along z, as OpenPCDet's ``sparse_shape``; the stride-8 output then has 2 cells
    along z (KITTI's 40 + 1 -> 21 -> 11 -> 5 -> 2).

    >>> VoxelBackBone8x.sparse_shape((1408, 1600, 40))
    (41, 1600, 1408)
    """
    x, y, z = (int(n) for n in grid_size_xyz)
    return (z + 1, y, x)

  def __call__(self, x: SparseConvTensor) -> tuple[SparseConvTensor, dict[str, SparseConvTensor]]:
    """Encodes voxels ``x`` (features ``[N, in_channels]``, indices ``[N, 4]`` zyx).

    Returns:
      ``(encoded, multi_scale)``: the stride-8 tensor after ``conv_out`` (128 channels), and the
      outputs of ``conv1`` to ``conv4`` by OpenPCDet's names ``x_conv1`` ... ``x_conv4`` (strides
      in ``strides``).
    """
    if not isinstance(x, SparseConvTensor) or x.ndim != 3:
      raise TypeError(f"{type(self).__name__} takes a 3-D SparseConvTensor of voxels, got {x!r}")
    x_conv1 = self.conv1(self.conv_input(x))
    x_conv2 = self.conv2(x_conv1)
    x_conv3 = self.conv3(x_conv2)
    x_conv4 = self.conv4(x_conv3)
    features = {"x_conv1": x_conv1, "x_conv2": x_conv2, "x_conv3": x_conv3, "x_conv4": x_conv4}
    return self.conv_out(x_conv4), features

  @staticmethod
  def bev(encoded: SparseConvTensor) -> jax.Array:
    """The dense bird's-eye view of ``encoded`` (OpenPCDet's ``HeightCompression``).

    Returns:
      ``[batch, H, W, C * D]`` channels-last, channel ``c * D + d`` holding channel ``c`` at
      height ``d`` (OpenPCDet's ``[batch, C * D, H, W]`` order, moved last).
    """
    dense = encoded.dense()  # [B, D, H, W, C]
    b, d, h, w, c = dense.shape
    return jnp.transpose(dense, (0, 2, 3, 4, 1)).reshape(b, h, w, c * d)


class VoxelBackBone8x(_VoxelBackBone):
  """SECOND's (and PV-RCNN's) sparse backbone: stride 8, 128 output channels.

  ``conv_input`` and ``conv1`` (SubM, 16 channels), then three stages that each halve the grid
  with a SparseConv3d k3 s2 and refine it with two SubM convolutions (32, 64, 64 channels), and
  ``conv_out``, a SparseConv3d (3, 1, 1) s (2, 1, 1) to 128 channels that halves the height.

  Args:
    in_channels: the voxel features' channels (4 for x, y, z, intensity means).
    rngs: random state.

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> net = jsparse.models.VoxelBackBone8x(4, rngs=nnx.Rngs(0))
  >>> sites = np.array([[0, z, 20, 20] for z in range(10)], np.int32)
  >>> x = jsparse.SparseConvTensor(np.ones((10, 4), np.float32), sites, (41, 64, 64), 1)
  >>> encoded, multi_scale = net(x)
  >>> encoded.spatial_shape, encoded.features.shape[1], net.bev(encoded).shape
  ((2, 8, 8), 128, (1, 8, 8, 256))
  """

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.conv_input = _subm_block(in_channels, 16, "subm1", rngs)
    self.conv1 = spnn.SparseSequential(_subm_block(16, 16, "subm1", rngs))
    self.conv2 = spnn.SparseSequential(
      _down_block(16, 32, 1, "spconv2", rngs),
      _subm_block(32, 32, "subm2", rngs),
      _subm_block(32, 32, "subm2", rngs),
    )
    self.conv3 = spnn.SparseSequential(
      _down_block(32, 64, 1, "spconv3", rngs),
      _subm_block(64, 64, "subm3", rngs),
      _subm_block(64, 64, "subm3", rngs),
    )
    self.conv4 = spnn.SparseSequential(
      _down_block(64, 64, (0, 1, 1), "spconv4", rngs),
      _subm_block(64, 64, "subm4", rngs),
      _subm_block(64, 64, "subm4", rngs),
    )
    self.conv_out = _conv_out(64, rngs)


class VoxelResBackBone8x(_VoxelBackBone):
  """CenterPoint's sparse backbone: :class:`VoxelBackBone8x` with :class:`SparseBasicBlock` pairs
  in place of the SubM pairs, and 128 channels in the last stage.

  Args:
    in_channels: the voxel features' channels (5 for nuScenes' x, y, z, intensity, time means).
    rngs: random state.
  """

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.conv_input = _subm_block(in_channels, 16, "subm1", rngs)
    self.conv1 = spnn.SparseSequential(
      SparseBasicBlock(16, "res1", rngs=rngs), SparseBasicBlock(16, "res1", rngs=rngs)
    )
    self.conv2 = spnn.SparseSequential(
      _down_block(16, 32, 1, "spconv2", rngs),
      SparseBasicBlock(32, "res2", rngs=rngs),
      SparseBasicBlock(32, "res2", rngs=rngs),
    )
    self.conv3 = spnn.SparseSequential(
      _down_block(32, 64, 1, "spconv3", rngs),
      SparseBasicBlock(64, "res3", rngs=rngs),
      SparseBasicBlock(64, "res3", rngs=rngs),
    )
    self.conv4 = spnn.SparseSequential(
      _down_block(64, 128, (0, 1, 1), "spconv4", rngs),
      SparseBasicBlock(128, "res4", rngs=rngs),
      SparseBasicBlock(128, "res4", rngs=rngs),
    )
    self.conv_out = _conv_out(128, rngs)


def _conv_out(c_in: int, rngs: nnx.Rngs) -> spnn.SparseSequential:
  """SparseConv3d (3, 1, 1) s (2, 1, 1), no padding (OpenPCDet's ``last_pad`` 0), to 128 channels."""
  ratio = _RATIOS["spconv_down2"]
  conv = spnn.SparseConv3d(
    c_in, 128, (3, 1, 1), (2, 1, 1), 0, bias=False, indice_key="spconv_down2", capacity_ratio=ratio, rngs=rngs
  )
  return _post_act(conv, 128, rngs)
