"""jsparse.utils.PointToVoxel against spconv 2.3.8's PointToVoxel (CPU) on the four real scans.

Skipped where spconv is not installed (``pip install torch==2.13.0 spconv==2.3.8``; ``make test-spconv``
installs it and fails instead of skipping). KITTI and nuScenes are in data/; ScanNet and SUN RGB-D are
read from $JSPARSE_EXTRA_DATA and skipped without it (see data/README.md). Voxels, coords, counts and
point ids must be identical (bitwise) for the voxels spconv returns; jsparse's extra padding rows are not
compared. ``empty_mean`` is not compared: spconv's CPU version accumulates the mean across voxels (spconv
issue 477); test_voxelize.py checks ours.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jsparse
from jsparse import _ffi
from jsparse.utils import PointToVoxel
from spconv_import import import_spconv

torch, spconv_utils = import_spconv("spconv.pytorch.utils")

pytestmark = pytest.mark.spconv

SCANS = {"kitti_000008.bin": 4, "nuscenes_lidar_top.bin": 5}  # data/
EXTRA_SCANS = {"scannet_scene0000_00.bin": 6, "sunrgbd_000017.bin": 6}  # $JSPARSE_EXTRA_DATA
# (vsize_xyz, coors_range_xyz, max_num_voxels, max_num_points_per_voxel)
SETTINGS = {
  "centerpoint": ((0.1, 0.1, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), 40000, 10),
  "second-kitti": ((0.05, 0.05, 0.1), (0.0, -40.0, -3.0, 70.4, 40.0, 1.0), 40000, 5),
  "odd-sizes": ((0.07, 0.13, 0.11), (-50.3, -40.1, -4.9, 60.7, 45.3, 3.1), 60000, 3),
  "indoor": ((0.05, 0.05, 0.05), (-2.0, -3.0, -1.0, 9.0, 9.0, 4.0), 80000, 5),
  "pillars-2d": ((0.2, 0.3), (-30.0, -30.0, 30.0, 30.0), 5000, 7),
  "too-few-voxels": ((0.1, 0.1, 0.1), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), 3000, 2),
}
BACKENDS = ("ffi", "reference") if _ffi.built("cpu") else ("reference",)


@pytest.fixture(autouse=True)
def _single_threaded_torch():
  previous = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.parametrize("scan", sorted(SCANS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_identical_to_spconv(scans, scan, setting):
  _check_identical(scans / scan, SCANS[scan], setting)


@pytest.mark.slow
@pytest.mark.parametrize("scan", sorted(EXTRA_SCANS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_identical_to_spconv_extra_scans(extra_scans, scan, setting):
  _check_identical(extra_scans / scan, EXTRA_SCANS[scan], setting)


def _check_identical(path, features, setting):
  points = np.fromfile(path, np.float32).reshape(-1, features)
  vsize, coors_range, max_voxels, max_points = SETTINGS[setting]
  theirs = spconv_utils.PointToVoxel(list(vsize), list(coors_range), features, max_voxels, max_points)
  with torch.no_grad():
    expected = [t.numpy() for t in theirs.generate_voxel_with_id(torch.from_numpy(points.copy()))]
  ours = PointToVoxel(vsize, coors_range, features, max_voxels, max_points)
  assert ours.grid_size == list(theirs.grid_size)
  used = expected[0].shape[0]
  for backend in BACKENDS:
    with jsparse.backend(backend):
      result = jax.tree.map(np.asarray, jax.jit(lambda p: ours.generate(p))(points))
    got = (result.voxels[:used], result.coords[:used], result.num_points_per_voxel[:used], result.pc_voxel_id)
    for name, want, have in zip(("voxels", "coords", "counts", "ids"), expected, got):
      np.testing.assert_array_equal(have, want, err_msg=f"{name} on the {backend} backend")
    assert int(result.num_voxels) >= used
    assert (int(result.num_voxels) > used) == (used == max_voxels and int(result.num_voxels) != max_voxels)
    assert np.all(result.coords[used:] == -1) and np.all(result.num_points_per_voxel[used:] == 0)


@pytest.mark.parametrize("ndim", [2, 3, 4])
def test_small_cloud_matches_spconv(ndim):
  """Fast (not slow-marked) check on a synthetic cloud with many shared voxels, 2-D to 4-D."""
  rng = np.random.default_rng(ndim)
  points = (rng.integers(-30, 30, size=(3000, ndim + 1)) * np.float32(0.1)).astype(np.float32)
  vsize = (0.3, 0.2, 0.5, 1.0)[:ndim]
  coors_range = (-2.0, -2.5, -1.5, -2.0)[:ndim] + (2.0, 2.5, 1.5, 2.0)[:ndim]
  theirs = spconv_utils.PointToVoxel(list(vsize), list(coors_range), ndim + 1, 2000, 4)
  with torch.no_grad():
    expected = [t.numpy() for t in theirs.generate_voxel_with_id(torch.from_numpy(points.copy()))]
  ours = PointToVoxel(vsize, coors_range, ndim + 1, 2000, 4)
  assert ours.grid_size == list(theirs.grid_size)
  got = ours.generate_voxel_with_id(points)
  for name, want, have in zip(("voxels", "coords", "counts", "ids"), expected, got):
    np.testing.assert_array_equal(np.asarray(have), want, err_msg=name)
