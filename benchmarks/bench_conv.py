"""Kernel-map building and sparse convolution on a real nuScenes sweep, measured side by side.

Prints one table: per case the time of each backend, useful GFLOP/s (2 x active pairs x C_in x
C_out / time) and that rate as a fraction of a dense float32 matmul measured in the same run.
Until the FFI conv kernels land, the reference path is the only conv backend.

  python benchmarks/bench_conv.py [--voxel 0.1] [--batch 1 4] [--channels 16 32 64 128]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from jsparse import ops
from jsparse.cli import voxelize_mean

SCAN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "nuscenes_lidar_top.bin"


def best_time(fn, *args, repeats: int) -> float:
  """Seconds per call: the best of ``repeats`` timed calls after a compiling warm-up."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def dense_matmul_gflops(rows: int, channels: int, repeats: int) -> float:
  a = jnp.ones((rows, channels), jnp.float32)
  b = jnp.ones((channels, channels), jnp.float32)
  seconds = best_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return 2 * rows * channels * channels / seconds / 1e9


def load_batch(voxel: float, batch: int) -> jsparse.SparseConvTensor:
  points = np.fromfile(SCAN, np.float32).reshape(-1, 5)
  _, coords, shape = voxelize_mean(points, voxel)
  indices = np.concatenate([np.c_[np.full(len(coords), b, np.int32), coords] for b in range(batch)])
  features = np.ones((len(indices), 1), np.float32)
  return jsparse.SparseConvTensor(
    features, indices, shape, batch, capacity=jsparse.round_capacity(len(indices))
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--voxel", type=float, nargs="+", default=[0.1])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--channels", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  targets = jsparse.build_info()["ffi_targets"]
  print(f"jax {jax.__version__} on {jax.default_backend()}; FFI targets {targets}")
  header = f"{'case':<40}{'sites':>8}{'pairs':>9}{'reference ms':>14}{'GFLOP/s':>9}{'of dense':>10}"
  rows = []
  for voxel in args.voxel:
    for batch in args.batch:
      x = load_batch(voxel, batch)
      name = f"{voxel} m, batch {batch}"
      subm = ops.make_spec("subm", x.spatial_shape, 3)
      down = ops.make_spec("conv", x.spatial_shape, 3, 2, 1)
      with jsparse.backend("reference"):
        build_subm = jax.jit(lambda i, s=subm, b=batch: ops.build_map(i, s, b))
        build_down = jax.jit(lambda i, s=down, b=batch, c=x.capacity: ops.build_map(i, s, b, c))
        t_subm = best_time(build_subm, x.indices, repeats=args.repeats)
        t_down = best_time(build_down, x.indices, repeats=args.repeats)
      pairs = build_subm(x.indices)
      active_pairs = int(jnp.sum(pairs.nbr >= 0))
      sites = int(x.num_active)
      rows.append((f"{name}: subm 3x3x3 map", sites, active_pairs, t_subm, None, None))
      rows.append((f"{name}: conv k3 s2 p1 map", sites, None, t_down, None, None))
      for c in args.channels:
        features = jnp.asarray(np.random.default_rng(0).standard_normal((x.capacity, c)), jnp.float32)
        kernel = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, c, c)) / c, jnp.float32)
        forward = jax.jit(lambda f, k, p=pairs: ops.sparse_conv(f, k, p))
        both = jax.jit(jax.grad(lambda f, k, p=pairs: jnp.sum(ops.sparse_conv(f, k, p) ** 2), argnums=(0, 1)))
        flops = 2 * active_pairs * c * c
        dense = dense_matmul_gflops(sites, c, args.repeats)
        for label, fn, work in (("forward", forward, flops), ("forward+backward", both, 3 * flops)):
          t = best_time(fn, features, kernel, repeats=args.repeats)
          rate = work / t / 1e9
          rows.append((f"{name}: subm C={c} {label}", sites, active_pairs, t, rate, rate / dense))
  print(header)
  for case, sites, pairs_, t, rate, fraction in rows:
    pairs_text = "" if pairs_ is None else f"{pairs_:>9}"
    rate_text = "" if rate is None else f"{rate:>9.1f}{fraction:>10.1%}"
    print(f"{case:<40}{sites:>8}{pairs_text:>9}{1e3 * t:>14.1f}{rate_text}")


if __name__ == "__main__":
  main()
