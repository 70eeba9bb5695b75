"""Voxelization of real scans: jsparse's FFI kernel, its reference path and spconv, side by side.

Prints one table. Each row is one scan and setting measured in this run, as the median time of
``--repeats`` calls (after a compiling warm-up) of:

- "ref": a jitted ``PointToVoxel.generate_voxel_with_id`` on the reference path;
- "FFI": the same on the FFI kernel, with fresh outputs each call (XLA allocates them);
- "reuse": the FFI kernel refilling one buffer: each call donates the last call's voxels
  (``generate(pc, reuse=last.voxels)``), as spconv refills the buffers it allocated once;
- "spconv": spconv 2.3.8's CPU ``PointToVoxel.generate_voxel_with_id`` (single-threaded, its only
  correct setting) when torch + spconv are installed (``make test-spconv`` installs them);

and the ratios. FFI, reuse and spconv take turns in blocks of 10 timed calls, each turn starting
with 3 untimed ones, so load from other processes affects all. jsparse runs on XLA's CPU thread
pool (all cores this process may use); its outputs have ``max_num_voxels`` rows, like the buffers
spconv fills (spconv then returns views of the used rows). "faults" is the number of minor page
faults per call: a fresh output that the allocator maps anew faults on every page the kernel
writes, which costs as much as the voxelization itself; ``reuse=`` avoids it.

  python benchmarks/bench_voxelize.py [--repeats 50] [--no-spconv]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from jsparse.utils import PointToVoxel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _spconv  # noqa: E402
import _table  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"

# (label, scan, features used, vsize_xyz, coors_range_xyz, max_num_voxels, max_num_points_per_voxel).
# The nuScenes sweep has 5 columns (x, y, z, intensity, ring); 4 takes the first four.
CASES = (
  ("nuScenes CenterPoint 0.1x0.1x0.2, xyzi", "nuscenes_lidar_top.bin", 4,
   (0.1, 0.1, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), 60000, 10),
  ("nuScenes CenterPoint 0.1x0.1x0.2", "nuscenes_lidar_top.bin", 5,
   (0.1, 0.1, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), 60000, 10),
  ("nuScenes CenterPoint 0.1x0.1x0.2", "nuscenes_lidar_top.bin", 5,
   (0.1, 0.1, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), 16384, 10),
  ("nuScenes 0.1 m cubes", "nuscenes_lidar_top.bin", 5,
   (0.1, 0.1, 0.1), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0), 16384, 5),
  ("KITTI SECOND 0.05x0.05x0.1", "kitti_000008.bin", 4,
   (0.05, 0.05, 0.1), (0.0, -40.0, -3.0, 70.4, 40.0, 1.0), 16384, 5),
)  # fmt: skip


def median_times(
  fns: dict[str, Callable[[], Any]], repeats: int, block: int = 10, settle: int = 3
) -> dict[str, tuple[float, float]]:
  """``(seconds, page faults)`` per call of each function: the median time of ``repeats`` timed
  calls after one warm-up call, and the mean number of minor page faults of those calls (memory
  the allocator maps anew, which the kernel zeroes on first touch). The functions take turns in
  blocks of ``block`` calls, so a change in machine load hits all of them, while each block runs
  with its own data in cache (spconv's dense hash grid of ``prod(grid)`` int32 would otherwise
  evict the other's). Each turn starts with ``settle`` untimed calls: after another library's turn
  the first calls run slow while caches refill and idle cores wake, most for the threaded
  library."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  faults = dict.fromkeys(fns, 0)
  for start in range(0, repeats, block):
    for name, fn in fns.items():
      for _ in range(settle):
        jax.block_until_ready(fn())
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(min(block, repeats - start)):
        begin = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - begin)
      faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  return {name: (statistics.median(t), faults[name] / len(t)) for name, t in times.items()}


def jitted(backend: str, gen: PointToVoxel, points: jax.Array) -> Callable[[], Any]:
  # A fresh function per backend, traced here: jax.jit caches traces per function object, and
  # the backend is read when tracing.
  with jsparse.backend(backend):
    fn = jax.jit(lambda p: gen.generate_voxel_with_id(p))
    jax.block_until_ready(fn(points))
  return lambda: fn(points)


def reusing(gen: PointToVoxel, points: jax.Array) -> Callable[[], Any]:
  """The FFI kernel refilling one buffer, as spconv does: each call donates the last voxels."""
  with jsparse.backend("ffi"):
    fn = jax.jit(lambda p, old: gen.generate(p, reuse=old), donate_argnums=1)
    last = [jax.block_until_ready(fn(points, gen.generate(points).voxels)).voxels]

  def call():
    result = fn(points, last[0])
    last[0] = result.voxels
    return result

  return call


def spconv_call(points: np.ndarray, case: tuple) -> Callable[[], Any]:
  torch, _, _ = _spconv._load()
  from spconv.pytorch.utils import PointToVoxel as SpconvPointToVoxel

  _, _, features, vsize, coors_range, max_voxels, max_points = case
  gen = SpconvPointToVoxel(list(vsize), list(coors_range), features, max_voxels, max_points)
  pc = torch.from_numpy(points.copy())

  def call():
    with torch.no_grad():
      return gen.generate_voxel_with_id(pc)

  return call


COLUMNS = (
  ("case", 52), ("points", 8), ("voxels", 8), ("ref ms", 8), ("FFI ms", 8), ("faults", 7),
  ("reuse ms", 9), ("faults", 7), ("spconv ms", 10), ("spconv/FFI", 11), ("spconv/reuse", 13),
)  # fmt: skip


def row(*cells: Any) -> str:
  return _table.row(COLUMNS, *cells, digits=3)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--no-spconv", action="store_true", help="skip spconv even when installed")
  args = parser.parse_args()
  with_spconv = not args.no_spconv and _spconv.available()
  cores = len(os.sched_getaffinity(0))
  print(f"jax {jax.__version__} on {jax.default_backend()} ({cores} cores); medians of {args.repeats} calls")
  print(f"spconv 2.3.8 (CPU, 1 thread) side by side: {'yes' if with_spconv else 'not installed'}")
  print(_table.header(COLUMNS))
  for case in CASES:
    label, scan, features, vsize, coors_range, max_voxels, max_points = case
    columns = 5 if scan.startswith("nuscenes") else 4
    points = np.ascontiguousarray(np.fromfile(DATA / scan, np.float32).reshape(-1, columns)[:, :features])
    gen = PointToVoxel(vsize, coors_range, features, max_voxels, max_points)
    device_points = jnp.asarray(points)
    voxels = int(gen.generate(device_points).num_voxels)
    fns = {"ffi": jitted("ffi", gen, device_points), "reuse": reusing(gen, device_points)}
    if with_spconv:
      fns["spconv"] = spconv_call(points, case)
    times = median_times(fns, args.repeats)
    (ffi, ffi_faults), (reuse, reuse_faults) = times["ffi"], times["reuse"]
    theirs = times["spconv"][0] if with_spconv else None
    ref = median_times({"ref": jitted("reference", gen, device_points)}, max(3, args.repeats // 10))["ref"][0]
    print(
      row(
        f"{label} (V={max_voxels}, M={max_points})",
        len(points),
        voxels,
        1e3 * ref,
        1e3 * ffi,
        f"{ffi_faults:.0f}",
        1e3 * reuse,
        f"{reuse_faults:.0f}",
        None if theirs is None else 1e3 * theirs,
        None if theirs is None else f"{theirs / ffi:.1f}x",
        None if theirs is None else f"{theirs / reuse:.1f}x",
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
