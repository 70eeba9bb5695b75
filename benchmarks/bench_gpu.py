"""jsparse's CUDA kernels beside the reference path, a dense matmul and the copy bandwidth, in one run.

Run by ``benchmarks/gpu_check.sh`` on a machine with an NVIDIA GPU (it also runs on CPU, where it
measures the CPU kernels: ``--quick`` checks the script there). Every figure is the median of
``--repeats`` calls after a compiling warm-up, FFI kernels ("ffi") and the pure-jnp reference path
("ref") taking turns. Prints:

- the device's copy bandwidth (``x + 1`` over 1 GiB, bytes read and written) and a dense
  8192^3 matmul (bfloat16, and float32 at full precision);
- kernel maps (submanifold 3x3x3, and SparseConv3d k3 s2 with its output sites) over 100k+ voxels:
  a batch of rotated copies of the nuScenes sweep at 0.05 m;
- SubM 3x3x3 and SparseConv3d k3 s2 over those voxels, C in {32, 64, 128}, float32 and bfloat16,
  forward and forward + backward (maps built beforehand); the SubM forward also as a multiple of its
  memory-bandwidth bound (features read and written, the map and the weights read, at the copy
  bandwidth);
- CenterPoint's VoxelResBackBone8x on rotated nuScenes sweeps at 0.075 m (about 80k voxels):
  the jitted forward with every map built inside it, float32 and bfloat16 (parameters and inputs
  cast), and a train step (forward, backward, Adam) in float32.

The reference path runs at ``precision="highest"`` (float32 products in full float32, as the CUDA
kernels compute them).

  python benchmarks/bench_gpu.py [--repeats 10] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jsparse
from jsparse import models, ops
from jsparse.utils import PointToVoxel, mean_voxel_features

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _table  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
BACKENDS = ("ffi", "reference")


def median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median milliseconds of each zero-argument call (which must block), after one warm-up each."""
  for fn in fns.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      begin = time.perf_counter()
      fn()
      times[name].append(1e3 * (time.perf_counter() - begin))
  return {name: statistics.median(t) for name, t in times.items()}


def blocking(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
  return lambda: jax.block_until_ready(fn(*args))


def per_backend(make: Callable[[], Callable[..., Any]], *args: Any) -> dict[str, Callable[[], Any]]:
  """A blocking zero-argument call per backend: ``make()`` gives a function, jitted under it."""
  calls = {}
  for name in BACKENDS:
    with jsparse.backend(name):
      fn = jax.jit(make())
      jax.block_until_ready(fn(*args))  # traced and compiled under this backend
    calls[name] = blocking(fn, *args)
  return calls


def rotated_sweeps(voxel_size: float, target: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], int]:
  """Rotated copies of the nuScenes sweep, one batch entry each, until ``target`` voxels:
  ``(features [N, 4], indices [N, 4], grid zyx, batch)``."""
  points = np.fromfile(DATA / "nuscenes_lidar_top.bin", np.float32).reshape(-1, 5)[:, :4]
  size = (voxel_size, voxel_size, 0.2 if voxel_size > 0.06 else 0.1)
  gen = PointToVoxel(size, (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0), 4, 200_000, 10)
  features, indices = [], []
  while sum(len(i) for i in indices) < target:
    angle = 2 * math.pi * len(indices) / 7  # not a multiple of 90 degrees: new voxels each time
    c, s = math.cos(angle), math.sin(angle)
    rotated = points.copy()
    rotated[:, 0], rotated[:, 1] = c * points[:, 0] - s * points[:, 1], s * points[:, 0] + c * points[:, 1]
    voxels, coords, counts, _ = gen.generate_voxel_with_id(rotated)
    features.append(np.asarray(mean_voxel_features(voxels, counts)))
    indices.append(np.c_[np.full(len(coords), len(indices), np.int32), np.asarray(coords)])
  return (
    np.concatenate(features),
    np.concatenate(indices).astype(np.int32),
    tuple(int(n) for n in gen.grid_size_xyz[::-1]),
    len(indices),
  )


def device_figures(repeats: int, quick: bool) -> tuple[float, str]:
  """Prints and returns the copy bandwidth (bytes/s); also the dense matmuls."""
  n = (1 << 24) if quick else (1 << 28)  # float32 items: 64 MiB or 1 GiB
  x = jnp.ones((n,), jnp.float32)
  copy_ms = median_ms({"copy": blocking(jax.jit(lambda v: v + 1), x)}, repeats)["copy"]
  bandwidth = 2 * x.nbytes / (copy_ms / 1e3)
  print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (x + 1 over {x.nbytes >> 20} MiB, read + write)")
  m = 2048 if quick else 8192
  for dtype, precision in ((jnp.bfloat16, None), (jnp.float32, "highest")):
    a = jnp.ones((m, m), dtype)
    product = jax.jit(functools.partial(jnp.matmul, precision=precision))
    ms = median_ms({"mm": blocking(product, a, a)}, repeats)["mm"]
    name = jnp.dtype(dtype).name + (f" ({precision})" if precision else "")
    print(f"dense matmul {m}^3 {name}: {ms:.2f} ms, {2 * m**3 / (ms / 1e3) / 1e12:.1f} TFLOP/s")
  return bandwidth, jax.devices()[0].device_kind


def map_figures(indices: jax.Array, shape, batch: int, repeats: int) -> dict[str, Any]:
  """Prints map-building times; returns the two maps (built on the FFI kernels)."""
  subm = ops.make_spec("subm", shape, 3)
  down = ops.make_spec("conv", shape, 3, 2, 1)
  capacity = ops.default_capacity(down, indices.shape[0])
  columns = (("map", 30), ("voxels", 8), ("ffi ms", 9), ("ref ms", 10), ("ref/ffi", 8), ("ffi ms/100k", 12))
  print(_table.header(columns))
  maps = {}
  for name, spec, cap in (("SubM 3x3x3", subm, None), ("SparseConv3d k3 s2", down, capacity)):
    calls = per_backend(lambda spec=spec, cap=cap: lambda i: ops.build_map(i, spec, batch, cap), indices)
    t = median_ms(calls, repeats)
    per_100k = t["ffi"] * 1e5 / indices.shape[0]
    print(_table.row(columns, name, indices.shape[0], t["ffi"], t["reference"],
                     f"{t['reference'] / t['ffi']:.1f}x", per_100k, digits=2))  # fmt: skip
    with jsparse.backend("ffi"):
      maps[name] = jax.block_until_ready(ops.build_map(indices, spec, batch, cap))
  return maps


def conv_forward() -> Callable[..., Any]:
  return lambda f, k, pairs: ops.sparse_conv(f, k, pairs, precision="highest")


def conv_gradients() -> Callable[..., Any]:
  def loss(f, k, pairs):
    return jnp.sum(ops.sparse_conv(f, k, pairs, precision="highest").astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1))


def layer_figures(maps: dict[str, Any], n: int, bandwidth: float, repeats: int, quick: bool) -> None:
  columns = (
    ("layer", 20), ("C", 4), ("dtype", 9), ("pass", 8), ("ffi ms", 9), ("ref ms", 10), ("ref/ffi", 8),
    ("ffi/bound", 10),
  )  # fmt: skip
  print(_table.header(columns))
  rng = np.random.default_rng(0)
  for name, pairs in maps.items():
    for c in (32,) if quick else (32, 64, 128):
      for dtype in (jnp.float32, jnp.bfloat16):
        features = jnp.asarray(rng.standard_normal((n, c)), dtype)
        kernel = jnp.asarray(rng.standard_normal((27, c, c)) / math.sqrt(27 * c), dtype)

        for label, make in (("fwd", conv_forward), ("fwd+bwd", conv_gradients)):
          t = median_ms(per_backend(make, features, kernel, pairs), repeats)
          bound = ""
          if name.startswith("SubM") and label == "fwd":
            item = jnp.dtype(dtype).itemsize
            moved = 2 * n * c * item + pairs.nbr.size * 4 + kernel.size * item
            bound = f"{t['ffi'] / (1e3 * moved / bandwidth):.1f}x"
          print(_table.row(columns, name, c, jnp.dtype(dtype).name, label, t["ffi"], t["reference"],
                           f"{t['reference'] / t['ffi']:.1f}x", bound, digits=2))  # fmt: skip


def cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def backbone_figures(repeats: int, quick: bool) -> None:
  features, indices, grid, batch = rotated_sweeps(0.075, 20_000 if quick else 80_000)
  shape = models.VoxelResBackBone8x.sparse_shape(grid[::-1])
  columns = (("VoxelResBackBone8x", 34), ("voxels", 8), ("ffi ms", 9), ("ref ms", 10), ("ref/ffi", 8))
  print(_table.header(columns))
  capacity = jsparse.round_capacity(len(indices))
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.VoxelResBackBone8x(4, rngs=nnx.Rngs(0))
    graph, state = nnx.split(nnx.view(model, use_running_average=True))
    state = cast_floats(state, dtype)
    x = jsparse.SparseConvTensor(features.astype(dtype), indices, shape, batch, capacity=capacity)

    def make(graph=graph):
      return lambda values, inputs: nnx.merge(graph, values)(inputs)[0].features

    t = median_ms(per_backend(make, state, x), repeats)
    print(_table.row(columns, f"forward, maps included, {jnp.dtype(dtype).name}", len(indices), t["ffi"],
                     t["reference"], f"{t['reference'] / t['ffi']:.1f}x", digits=2))  # fmt: skip

  model = models.VoxelResBackBone8x(4, rngs=nnx.Rngs(0))
  x = jsparse.SparseConvTensor(features, indices, shape, batch, capacity=capacity)
  calls = {}
  for name in BACKENDS:
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    with jsparse.backend(name):

      @nnx.jit
      def step(model, optimizer, x):
        def loss_fn(model):
          y = model(x)[0]
          return jnp.sum(jnp.where(y.mask[:, None], jnp.square(y.features), 0)) / jnp.maximum(y.num_active, 1)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

      jax.block_until_ready(step(model, optimizer, x))
    calls[name] = lambda step=step, optimizer=optimizer: jax.block_until_ready(step(model, optimizer, x))
  t = median_ms(calls, repeats)
  print(_table.row(columns, "train step (Adam), float32", len(indices), t["ffi"], t["reference"],
                   f"{t['reference'] / t['ffi']:.1f}x", digits=2))  # fmt: skip


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--quick", action="store_true", help="small sizes: checks the script (on CPU)")
  args = parser.parse_args()
  info = jsparse.build_info()
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"cuda_ffi={info['cuda_ffi']}; medians of {args.repeats} calls")  # fmt: skip
  platform = jax.default_backend()
  if not info["cpu_ffi" if platform == "cpu" else "cuda_ffi"]:
    raise SystemExit(f"jsparse's {platform} kernels are not built: nothing to measure")
  bandwidth, _ = device_figures(args.repeats, args.quick)
  features, indices, shape, batch = rotated_sweeps(0.05, 20_000 if args.quick else 100_000)
  del features
  indices = jnp.asarray(indices)
  maps = map_figures(indices, shape, batch, args.repeats)
  layer_figures(maps, indices.shape[0], bandwidth, args.repeats, args.quick)
  backbone_figures(args.repeats, args.quick)


if __name__ == "__main__":
  main()
