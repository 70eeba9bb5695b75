"""The ``jsparse`` command: ``demo`` trains a small sparse U-Net on a LiDAR scan, ``voxelize``
turns a point-cloud file into voxels, ``info`` prints the build."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jsparse
from jsparse import nn as spnn
from jsparse.ops import points_in_range
from jsparse.utils import PointToVoxel, bounding_range, read_points, voxelize_mean

DEFAULT_SCAN = pathlib.Path(__file__).resolve().parents[1] / "data" / "kitti_000008.bin"


def _load_points(path: pathlib.Path | None) -> tuple[np.ndarray, str]:
  """``[P, 4]`` float32 x, y, z, intensity: a KITTI scan, or a synthetic street when absent."""
  if path is not None and path.is_file():
    return np.fromfile(path, np.float32).reshape(-1, 4), str(path)
  rng = np.random.default_rng(0)
  ground = np.c_[rng.uniform(0, 40, 12000), rng.uniform(-10, 10, 12000), rng.normal(-1.7, 0.03, 12000)]
  boxes = [np.c_[rng.uniform(x, x + 4, 1500), rng.uniform(y, y + 2, 1500), rng.uniform(-1.7, 0, 1500)]
           for x, y in ((8, -6), (15, 3), (25, -2), (32, 5))]  # fmt: skip
  xyz = np.concatenate([ground, *boxes]).astype(np.float32)
  return np.c_[xyz, rng.uniform(0, 1, len(xyz)).astype(np.float32)], "synthetic street (no scan found)"


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
  saves its outputs (voxels, coords zyx, num_points_per_voxel, pc_voxel_id) to ``out`` (.npz)."""
  points = read_points(path, num_features)
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
  }


class SegNet(nnx.Module):
  """A two-level sparse U-Net: SubM blocks, a strided conv down, the inverse conv back up."""

  def __init__(self, in_channels: int, classes: int, width: int, *, rngs: nnx.Rngs):
    def block(c_in, c_out, key):
      return [
        spnn.SubMConv3d(c_in, c_out, 3, indice_key=key, rngs=rngs),
        spnn.BatchNorm(c_out, rngs=rngs),
        nnx.relu,
      ]

    self.encoder = spnn.SparseSequential(*block(in_channels, width, "subm1"), *block(width, width, "subm1"))
    self.down = spnn.SparseSequential(
      spnn.SparseConv3d(width, 2 * width, 3, 2, 1, indice_key="down1", rngs=rngs),
      spnn.BatchNorm(2 * width, rngs=rngs),
      nnx.relu,
      *block(2 * width, 2 * width, "subm2"),
    )
    self.up = spnn.SparseInverseConv3d(2 * width, width, 3, indice_key="down1", rngs=rngs)
    self.head = spnn.SparseSequential(
      *block(2 * width, width, "subm1"), nnx.Linear(width, classes, rngs=rngs)
    )

  def __call__(self, x: jsparse.SparseConvTensor) -> jsparse.SparseConvTensor:
    skip = self.encoder(x)
    up = self.up(self.down(skip))
    return self.head(up.replace_feature(jnp.concatenate([skip.features, up.features], axis=1)))


def demo(scan: pathlib.Path | None, steps: int, voxel_size: float) -> dict:
  """Trains SegNet to tell ground from objects (label: height above the lowest 5%) on one scan."""
  import optax

  points, source = _load_points(scan)
  features, coords, shape = voxelize_mean(points, voxel_size)
  ground_level = np.percentile(features[:, 2], 5)
  labels = (features[:, 2] > ground_level + 0.3).astype(np.int32)
  inputs = np.c_[features[:, 3:4], np.ones_like(features[:, :1])]  # intensity and 1: no height given
  capacity = jsparse.round_capacity(len(coords))
  indices = np.c_[np.zeros(len(coords), np.int32), coords]
  x = jsparse.SparseConvTensor(inputs, indices, shape, batch_size=1, capacity=capacity)
  y = jnp.pad(jnp.asarray(labels), (0, capacity - len(labels)))

  model = SegNet(2, 2, 16, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      out = model(x)
      losses = optax.softmax_cross_entropy_with_integer_labels(out.features, y)
      loss = jnp.sum(jnp.where(x.mask, losses, 0.0)) / x.num_active
      correct = jnp.sum((jnp.argmax(out.features, -1) == y) & x.mask) / x.num_active
      return loss, (correct, out.overflow)

    (loss, (accuracy, overflow)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy, overflow

  history = []
  for step in range(steps):
    loss, accuracy, overflow = train_step(model, optimizer, x, y)
    jsparse.check_capacity(overflow)  # the one-line host-side check: no site was dropped
    history.append((float(loss), float(accuracy)))
    if step == 0:
      compiled = time.perf_counter()
    print(f"step {step:3d}  loss {history[-1][0]:.4f}  accuracy {history[-1][1]:.3f}", flush=True)
  elapsed = time.perf_counter() - compiled if steps > 1 else float("nan")
  return {
    "source": source,
    "points": int(len(points)),
    "voxels": int(len(coords)),
    "capacity": capacity,
    "spatial_shape": list(shape),
    "first_loss": history[0][0],
    "last_loss": history[-1][0],
    "last_accuracy": history[-1][1],
    "seconds_per_step": elapsed / max(steps - 1, 1),
    "backend": jsparse.build_info()["backend"],
    "jax_platform": jax.default_backend(),
  }


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="jsparse", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("demo", help="train a small sparse U-Net on a LiDAR scan")
  scan = pathlib.Path(os.environ.get("JSPARSE_DEMO_SCAN", DEFAULT_SCAN))
  run.add_argument("--scan", type=pathlib.Path, default=scan, help="KITTI .bin scan; synthetic if absent")
  run.add_argument("--steps", type=int, default=40)
  run.add_argument("--voxel-size", type=float, default=0.2)
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
  if args.command == "demo" and args.steps < 2:
    parser.error("--steps must be at least 2 (the first step compiles; the rest are timed)")
  if args.command == "demo":
    summary = demo(args.scan, args.steps, args.voxel_size)
    print(json.dumps(summary, indent=2))
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
