"""The ``jsparse`` command: ``demo`` trains a LiDAR segmentation network (:mod:`jsparse.demo`),
``voxelize`` turns a point-cloud file into voxels, ``info`` prints the build."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence

import jax
import numpy as np

import jsparse
from jsparse import demo
from jsparse.ops import points_in_range
from jsparse.utils import PointToVoxel, bounding_range, read_points


def voxelize_file(
  path: pathlib.Path,
  voxel_size: Sequence[float],
  coors_range: Sequence[float] | None,
  out: pathlib.Path,
  num_features: int | None = None,
  max_voxels: int | None = None,
  max_points: int = 5,
) -> dict:
  """``jsparse voxelize``: reads a point cloud, runs ``PointToVoxel.generate_voxel_with_id`` and
  saves its outputs (voxels, coords zyx, num_points_per_voxel, pc_voxel_id) to ``out`` (.npz).

  What ``read_points`` warns about (a raw .bin whose values look misread with ``num_features``
  columns) goes to stderr as ``jsparse voxelize: warning: ...`` lines and into the summary's
  ``"warnings"``; the voxels are still written."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", UserWarning)
    points = read_points(path, num_features)
  notes = [str(w.message).replace("num_features=", "--num-features ") for w in caught]
  for note in notes:
    print(f"jsparse voxelize: warning: {note}", file=sys.stderr, flush=True)
  if points.shape[1] < 3:
    raise ValueError(f"{path}: points need x, y, z columns, got {points.shape[1]} columns")
  size = [float(v) for v in voxel_size] * (3 if len(voxel_size) == 1 else 1)
  if len(size) != 3:
    raise ValueError(f"--voxel-size takes 1 (cubic) or 3 values (x y z), got {len(voxel_size)}")
  coors_range = bounding_range(points, size) if coors_range is None else [float(v) for v in coors_range]
  gen = PointToVoxel(size, coors_range, points.shape[1], max_voxels or len(points), max_points)
  run = jax.jit(lambda p: gen.generate(p))
  start = time.perf_counter()
  jax.block_until_ready(run(points))  # compiles
  compiled = time.perf_counter()
  result = jax.block_until_ready(run(points))
  seconds = time.perf_counter() - compiled
  voxels, coords, counts, ids, num_voxels = (np.asarray(a) for a in result)
  stored = min(int(num_voxels), gen.max_num_voxels)
  in_range = np.asarray(points_in_range(points, size, coors_range))
  outputs = dict(voxels=voxels, coords=coords, num_points_per_voxel=counts)
  np.savez(
    out,
    **{name: array[:stored] for name, array in outputs.items()},
    pc_voxel_id=ids,
    voxel_size=np.float32(size),
    coors_range=np.float32(coors_range),
    spatial_shape=np.int32(gen.spatial_shape),
  )
  return {
    "file": str(path),
    "points_read": int(len(points)),
    "points_in_range": int(in_range.sum()),
    "voxels": stored,
    "voxels_dropped": int(num_voxels) - stored,
    "points_dropped": int(in_range.sum()) - int(counts[:stored].sum()),
    "spatial_shape_zyx": list(gen.spatial_shape),
    "coors_range_xyz": coors_range,
    "seconds": seconds,
    "compile_seconds": compiled - start,
    "out": str(out),
    "warnings": notes,
  }


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="jsparse", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser(
    "demo",
    help="train a LiDAR segmentation network on generated scenes; write metrics, a picture, a checkpoint",
  )
  defaults = demo.Config()
  run.add_argument(
    "--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})"
  )
  run.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_output"), help="output folder")
  run.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
  run.add_argument("--points", type=pathlib.Path, help="a scan to segment (default: data/kitti_000008.bin)")
  run.add_argument(
    "--num-features", type=int, help="columns of a raw .bin --points (4 for KITTI, 5 for nuScenes)"
  )
  run.add_argument("--devices", type=int, default=1, help="data-parallel devices (CPU: host devices)")
  run.add_argument("--batch-size", type=int, default=defaults.batch_size, help="scans per step")
  vox = commands.add_parser(
    "voxelize", help="voxelize a point-cloud file (.bin .npy .npz .ply .pcd .las .laz) into an .npz"
  )
  vox.add_argument("file", type=pathlib.Path)
  vox.add_argument("--voxel-size", type=float, nargs="+", required=True, help="1 (cubic) or 3 values, x y z")
  vox.add_argument(
    "--range", type=float, nargs=6, metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
    help="coors_range_xyz (default: the bounding box of the points)",
  )  # fmt: skip
  vox.add_argument("--out", type=pathlib.Path, required=True, help="the .npz to write")
  vox.add_argument("--num-features", type=int, help="columns of a raw .bin (4 for KITTI, 5 for nuScenes)")
  vox.add_argument("--max-voxels", type=int, help="max_num_voxels (default: the number of points)")
  vox.add_argument("--max-points", type=int, default=5, help="max_num_points_per_voxel (default 5)")
  commands.add_parser("info", help="print build_info() as JSON")
  args = parser.parse_args(argv)
  if args.command == "demo":
    if args.devices > 1:  # host devices for the data-parallel step on CPU (read when jax starts)
      flag = f"--xla_force_host_platform_device_count={args.devices}"
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    if args.steps < 1 or args.batch_size < 1 or args.devices < 1 or args.batch_size % args.devices:
      parser.error(
        "--steps, --batch-size and --devices must be positive, --batch-size a multiple of --devices"
      )
    config = dataclasses.replace(defaults, steps=args.steps, batch_size=args.batch_size, devices=args.devices)
    try:
      demo.run(config, args.out, resume=args.resume, points_file=args.points, num_features=args.num_features)
    except (FileNotFoundError, ValueError) as error:  # no checkpoint to resume, an unreadable --points
      parser.exit(2, f"jsparse demo: error: {error}\n")
  elif args.command == "voxelize":
    try:
      s = voxelize_file(
        args.file, args.voxel_size, args.range, args.out, args.num_features, args.max_voxels, args.max_points
      )
    except (OSError, ValueError, ImportError) as error:
      parser.exit(2, f"jsparse voxelize: error: {error}\n")
    print(
      f"{s['file']}: {s['points_read']} points read, {s['points_in_range']} in range, {s['voxels']} voxels "
      f"(grid zyx {s['spatial_shape_zyx']}), {s['points_dropped']} points dropped "
      f"({s['voxels_dropped']} voxels over --max-voxels, the rest over --max-points), "
      f"{1e3 * s['seconds']:.2f} ms (compile {s['compile_seconds']:.2f} s) -> {s['out']}"
    )
  else:
    print(json.dumps(jsparse.build_info(), indent=2))


if __name__ == "__main__":
  main()
