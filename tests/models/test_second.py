"""SECOND's and CenterPoint's backbones: OpenPCDet's layer list, jit against eager, capacities on
real scans, padding."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import models
from jsparse.utils import PointToVoxel, mean_voxel_features


def _parameters(model) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _bn(c):  # scale and bias
  return 2 * c


def test_voxel_backbone_8x_has_openpcdets_parameters():
  """OpenPCDet's VoxelBackBone8x: SubM 3x3x3 convolutions without bias (conv_input, conv1, two
  per stage), a SparseConv3d k3 s2 opening each of conv2-conv4, SparseConv3d (3, 1, 1) to 128."""
  c = 4
  convs = 27 * (c * 16 + 16 * 16 + 16 * 32 + 2 * 32 * 32 + 32 * 64 + 2 * 64 * 64 + 64 * 64 + 2 * 64 * 64)
  convs += 3 * 64 * 128
  norms = _bn(16) * 2 + _bn(32) * 3 + _bn(64) * 6 + _bn(128)
  assert _parameters(models.VoxelBackBone8x(c, rngs=nnx.Rngs(0))) == convs + norms


def test_voxel_res_backbone_8x_has_openpcdets_parameters():
  """OpenPCDet's VoxelResBackBone8x: SparseBasicBlock pairs (two SubM convolutions with bias and
  two BatchNorms each) instead of SubM pairs, 128 channels in conv4."""
  c = 5

  def basic(ch):
    return 2 * (27 * ch * ch + ch) + 2 * _bn(ch)

  total = 27 * c * 16 + _bn(16) + 2 * basic(16)
  total += 27 * 16 * 32 + _bn(32) + 2 * basic(32)
  total += 27 * 32 * 64 + _bn(64) + 2 * basic(64)
  total += 27 * 64 * 128 + _bn(128) + 2 * basic(128)
  total += 3 * 128 * 128 + _bn(128)
  assert _parameters(models.VoxelResBackBone8x(c, rngs=nnx.Rngs(0))) == total


def _voxels(scan: str, columns: int, voxel_size, coors_range, batch: int, capacity: int | None = None):
  points = np.fromfile(f"{scan}", np.float32).reshape(-1, columns)
  gen = PointToVoxel(voxel_size, coors_range, columns, 100_000, 10)
  voxels, coords, counts, _ = gen.generate_voxel_with_id(points)
  features = np.tile(np.asarray(mean_voxel_features(voxels, counts)), (batch, 1))
  indices = np.concatenate([np.c_[np.full(len(coords), b, np.int32), coords] for b in range(batch)])
  capacity = jsparse.round_capacity(len(indices)) if capacity is None else capacity
  shape = models.VoxelBackBone8x.sparse_shape(gen.grid_size_xyz)
  return jsparse.SparseConvTensor(features, indices.astype(np.int32), shape, batch, capacity=capacity)


KITTI = ("kitti_000008.bin", 4, (0.05, 0.05, 0.1), (0.0, -40.0, -3.0, 70.4, 40.0, 1.0))
NUSCENES_01 = ("nuscenes_lidar_top.bin", 5, (0.1, 0.1, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))
NUSCENES_0075 = ("nuscenes_lidar_top.bin", 5, (0.075, 0.075, 0.2), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
  ("cls", "scan"),
  [
    (models.VoxelBackBone8x, KITTI),
    (models.VoxelBackBone8x, NUSCENES_01),
    (models.VoxelResBackBone8x, NUSCENES_0075),
  ],
  ids=["second-kitti", "second-nuscenes-0.1", "centerpoint-nuscenes-0.075"],
)
def test_default_capacities_hold_on_real_scans(scans, cls, scan, batch):
  """No out_capacity anywhere: under jit, every strided stage keeps all its sites."""
  name, columns, voxel_size, coors_range = scan
  x = _voxels(scans / name, columns, voxel_size, coors_range, batch)
  model = cls(columns, rngs=nnx.Rngs(0))
  encoded, multi_scale = nnx.jit(lambda m, x: m(x))(model, x)
  jsparse.check_capacity(encoded)
  assert set(multi_scale) == {"x_conv1", "x_conv2", "x_conv3", "x_conv4"}
  assert encoded.spatial_shape[0] == 2 and encoded.features.shape[1] == 128
  bev = model.bev(encoded)
  assert bev.shape == (batch, *encoded.spatial_shape[1:], 256)


@pytest.mark.slow
def test_jit_equals_eager_and_padding_changes_nothing(scans):
  """The KITTI scan: eagerly (outputs sized to fit) and under jit with three input capacities,
  eval mode, the same sites and features at every stage; padding rows stay zero."""
  model = models.VoxelResBackBone8x(4, rngs=nnx.Rngs(0))
  model.eval()
  x = _voxels(scans / KITTI[0], *KITTI[1:], batch=1, capacity=13092)
  eager, eager_scales = model(x)
  run = nnx.jit(lambda m, x: m(x))
  for capacity in (13092 + 5, 16384, 3 * 13092):
    padded = _voxels(scans / KITTI[0], *KITTI[1:], batch=1, capacity=capacity)
    encoded, scales = run(model, padded)
    jsparse.check_capacity(encoded)
    for name, want, got in [("encoded", eager, encoded), *((k, eager_scales[k], scales[k]) for k in scales)]:
      want_features, want_sites = want.to_numpy()
      got_features, got_sites = got.to_numpy()
      np.testing.assert_array_equal(got_sites, want_sites, err_msg=name)
      np.testing.assert_allclose(got_features, want_features, rtol=2e-4, atol=2e-4, err_msg=name)
      np.testing.assert_array_equal(np.asarray(got.features)[~np.asarray(got.mask)], 0, err_msg=name)
