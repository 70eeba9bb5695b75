"""The command line: ``jsparse voxelize`` and the demo's voxelizer, against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest

from jsparse import cli
from jsparse.utils import write_points


def _cloud(rng: np.random.Generator, count: int = 600) -> np.ndarray:
  xyz = rng.uniform(-2.0, 2.0, (count, 3)).astype(np.float32)
  return np.c_[xyz, rng.uniform(0, 1, (count, 1)).astype(np.float32)]


def test_voxelize_command_writes_spconv_outputs_and_prints_counts(tmp_path, capsys):
  rng = np.random.default_rng(0)
  points = _cloud(rng)
  points[:5, 0] = np.nan  # never voxelized
  points[5:20, 0] += 10.0  # out of range
  source = tmp_path / "scan.pcd"
  write_points(source, points, fields=["x", "y", "z", "intensity"])
  out = tmp_path / "voxels.npz"
  cli.main(["voxelize", str(source), "--voxel-size", "0.5", "--range", "-2", "-2", "-2", "2", "2", "2",
            "--max-points", "3", "--out", str(out)])  # fmt: skip
  printed = capsys.readouterr().out

  cells = np.floor((points[:, :3] + 2.0) / 0.5)
  in_range = np.all(np.isfinite(cells) & (cells >= 0) & (cells < 8), axis=1)
  unique, counts = np.unique(cells[in_range].astype(np.int32), axis=0, return_counts=True)
  stored = np.minimum(counts, 3).sum()
  saved = np.load(out)
  assert saved["voxels"].shape == (len(unique), 3, 4)
  np.testing.assert_array_equal(np.sort(saved["num_points_per_voxel"]), np.sort(np.minimum(counts, 3)))
  np.testing.assert_array_equal(  # coords are zyx
    np.unique(saved["coords"][:, ::-1], axis=0), unique
  )
  ids = saved["pc_voxel_id"]
  assert np.all(ids[~in_range] == -1) and np.all(ids[in_range] >= 0)
  np.testing.assert_array_equal(saved["coords"][ids[in_range]][:, ::-1], cells[in_range].astype(np.int32))
  assert list(saved["spatial_shape"]) == [8, 8, 8]
  assert f"{len(points)} points read, {in_range.sum()} in range, {len(unique)} voxels" in printed
  assert f"{in_range.sum() - stored} points dropped (0 voxels over --max-voxels" in printed


def test_voxelize_command_reports_voxel_overflow_and_bad_input(tmp_path, capsys):
  rng = np.random.default_rng(1)
  source = tmp_path / "scan.bin"
  write_points(source, _cloud(rng))
  out = tmp_path / "v.npz"
  cli.main(["voxelize", str(source), "--num-features", "4", "--voxel-size", "1", "--max-voxels", "10",
            "--max-points", "1000", "--out", str(out)])  # fmt: skip
  printed = capsys.readouterr().out
  assert "10 voxels" in printed and "voxels over --max-voxels" in printed
  assert np.load(out)["voxels"].shape[0] == 10
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["voxelize", str(source), "--voxel-size", "1", "--out", str(out)])
  assert exit_info.value.code == 2
  assert "num_features" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["voxelize", str(source), "--num-features", "4", "--voxel-size", "1", "2", "--out", str(out)])
  assert "--voxel-size takes 1 (cubic) or 3 values" in capsys.readouterr().err


def test_voxelize_command_warns_when_num_features_looks_wrong(scans, tmp_path, capsys):
  # Issue 18: the 5-column nuScenes sweep with --num-features 4 reads as 43,360 rows of 4 values of
  # mixed columns. read_points warns (its values line up at a stride of 5); the command prints the
  # warning and still voxelizes.
  sweep = scans / "nuscenes_lidar_top.bin"
  args = ["voxelize", str(sweep), "--voxel-size", "1", "--out", str(tmp_path / "v.npz"), "--num-features"]
  cli.main([*args, "4"])
  captured = capsys.readouterr()
  assert f"jsparse voxelize: warning: {sweep}: read with --num-features 4, its values line up" in captured.err
  assert "pass --num-features 5 (4 for KITTI" in captured.err
  assert f"{sweep}: 43360 points read" in captured.out
  cli.main([*args, "5"])
  captured = capsys.readouterr()
  assert captured.err == "" and f"{sweep}: 34688 points read" in captured.out
