"""The ``jsparse`` command: ``jsparse demo`` trains a small sparse U-Net on a LiDAR scan."""

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

DEFAULT_SCAN = pathlib.Path("..") / "shared" / "data" / "kitti_000008.bin"


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


def voxelize_mean(points: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  """Mean-pooled voxels of ``points [P, F]`` (x, y, z first) over their bounding box.

  A minimal host-side voxelizer for the demo and the benchmarks.

  Returns:
    ``(features [V, F] per-voxel means, coords int32 [V, 3] in zyx order sorted, spatial_shape zyx)``.
  """
  low = points[:, :3].min(0)
  cells = np.floor((points[:, :3] - low) / voxel_size).astype(np.int64)
  shape_xyz = cells.max(0) + 1
  keys = np.ravel_multi_index(cells.T[::-1], shape_xyz[::-1])  # zyx order
  unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
  sums = np.zeros((len(unique), points.shape[1]))
  np.add.at(sums, inverse, points)
  coords = np.stack(np.unravel_index(unique, shape_xyz[::-1]), axis=1).astype(np.int32)
  return (sums / counts[:, None]).astype(np.float32), coords, tuple(int(n) for n in shape_xyz[::-1])


class SegNet(nnx.Module):
  """A two-level sparse U-Net: SubM blocks, a strided conv down, the inverse conv back up."""

  def __init__(self, in_channels: int, classes: int, width: int, *, rngs: nnx.Rngs):
    def block(c_in, c_out, key):
      return [
        spnn.SubMConv3d(c_in, c_out, 3, indice_key=key, rngs=rngs),
        nnx.BatchNorm(c_out, rngs=rngs),
        nnx.relu,
      ]

    self.encoder = spnn.SparseSequential(*block(in_channels, width, "subm1"), *block(width, width, "subm1"))
    self.down = spnn.SparseSequential(
      spnn.SparseConv3d(width, 2 * width, 3, 2, 1, indice_key="down1", rngs=rngs),
      nnx.BatchNorm(2 * width, rngs=rngs),
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
  commands.add_parser("info", help="print build_info() as JSON")
  args = parser.parse_args(argv)
  if args.command == "demo" and args.steps < 2:
    parser.error("--steps must be at least 2 (the first step compiles; the rest are timed)")
  if args.command == "demo":
    summary = demo(args.scan, args.steps, args.voxel_size)
    print(json.dumps(summary, indent=2))
  else:
    print(json.dumps(jsparse.build_info(), indent=2))


if __name__ == "__main__":
  main()
