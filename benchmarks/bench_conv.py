"""Kernel maps and sparse convolution on a real nuScenes sweep: FFI kernels, reference path, spconv.

Prints one table. Each row is one case measured side by side in this run: the FFI time, the
reference-path time and their ratio; useful GFLOP/s (2 x active pairs x C_in x C_out / time) and
that rate as a fraction of a dense float32 matmul ``[sites, C] @ [C, C]`` measured in the same run;
and, when torch + spconv 2.3.8 are installed, spconv's CPU time (single-threaded, its only correct
setting) and spconv time / FFI time. Times are the best of ``--repeats`` calls after a compiling
warm-up (the slow reference path gets one timed call); the FFI kernel and spconv take turns call
by call, so a slow spell of the machine hits both. Peak memory (max RSS) is printed last.

The submanifold conv rows reuse a prebuilt map: the forward; the forward + backward of the layer
(its output and the VJP of a cotangent handed down, as inside a network); and the gradient of the
loss sum(y^2), which adds the loss's own elementwise pass over the output. Both backward rows
give their time as a multiple of the forward's (the calls take turns).

  python benchmarks/bench_conv.py [--voxel 0.1 0.05] [--batch 1 4] [--channels 16 32 64 128]
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsparse
from jsparse import ops
from jsparse.utils import voxelize_mean

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _spconv  # noqa: E402

SCAN = pathlib.Path(__file__).resolve().parents[1] / "data" / "nuscenes_lidar_top.bin"


def best_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Seconds per call of each function: the best of ``repeats`` timed calls after a warm-up (which
  compiles), the functions taking turns call by call."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


def best_time(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
  """Seconds per call of ``fn(*args)``: the best of ``repeats`` timed calls after a warm-up."""
  return best_times({"fn": lambda: fn(*args)}, repeats)["fn"]


def dense_matmul_gflops(rows: int, channels: int, repeats: int) -> float:
  a = jnp.ones((rows, channels), jnp.float32)
  b = jnp.ones((channels, channels), jnp.float32)
  seconds = best_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return 2 * rows * channels * channels / seconds / 1e9


def load_batch(voxel: float, batch: int) -> jsparse.SparseConvTensor:
  """The sweep voxelized at ``voxel`` metres over its bounding box, repeated ``batch`` times."""
  points = np.fromfile(SCAN, np.float32).reshape(-1, 5)
  _, coords, shape = voxelize_mean(points, voxel)
  indices = np.concatenate([np.c_[np.full(len(coords), b, np.int32), coords] for b in range(batch)])
  features = np.ones((len(indices), 1), np.float32)
  return jsparse.SparseConvTensor(
    features, indices, shape, batch, capacity=jsparse.round_capacity(len(indices))
  )


class Table:
  COLUMNS = (
    ("case", 50), ("sites", 8), ("pairs", 9), ("FFI ms", 9), ("ref ms", 10), ("ref/FFI", 8),
    ("GFLOP/s", 8), ("of dense", 9), ("spconv ms", 10), ("spconv/FFI", 11),
  )  # fmt: skip

  def __init__(self) -> None:
    self.rows: list[str] = []

  def add(self, case, sites, pairs=None, ffi=None, ref=None, flops=None, dense=None, spconv=None) -> None:
    rate = flops / ffi / 1e9 if flops and ffi else None
    cells = (
      case,
      sites,
      pairs,
      None if ffi is None else 1e3 * ffi,
      None if ref is None else 1e3 * ref,
      None if ref is None or ffi is None else f"{ref / ffi:.1f}x",
      rate,
      None if rate is None or dense is None else f"{rate / dense:.0%}",
      None if spconv is None else 1e3 * spconv,
      None if spconv is None or ffi is None else f"{spconv / ffi:.1f}x",
    )
    text = []
    for (name, width), cell in zip(self.COLUMNS, cells):
      if cell is None:
        cell = ""
      elif isinstance(cell, float):
        cell = f"{cell:.1f}"
      text.append(f"{cell:<{width}}" if name == "case" else f"{cell:>{width}}")
    self.rows.append("".join(text))
    print(self.rows[-1], flush=True)

  def header(self) -> str:
    return "".join(f"{n:<{w}}" if n == "case" else f"{n:>{w}}" for n, w in self.COLUMNS)


def jitted(backend: str, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
  """``fn(*args)`` jitted on ``backend`` (traced and compiled here), as a zero-argument call."""
  # A fresh function per backend: jax.jit caches traces per function object, and the backend is
  # read when tracing.
  with jsparse.backend(backend):
    compiled = jax.jit(lambda *a: fn(*a))
    jax.block_until_ready(compiled(*args))
  return lambda: compiled(*args)


def timed(
  fn: Callable[..., Any], *args: Any, repeats: int, spconv: Callable[[], Any] | None = None
) -> tuple[float, float, float | None]:
  """``(FFI, reference, spconv)`` seconds per call of ``fn(*args)`` (spconv: None without a call);
  the FFI kernel and spconv take turns, the reference path gets one timed call."""
  fns = {"ffi": jitted("ffi", fn, *args)}
  if spconv is not None:
    fns["spconv"] = spconv
  times = best_times(fns, repeats)
  ref = best_times({"ref": jitted("reference", fn, *args)}, 1)["ref"]
  return times["ffi"], ref, times.get("spconv")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--voxel", type=float, nargs="+", default=[0.1, 0.05])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-spconv", action="store_true", help="skip spconv even when installed")
  args = parser.parse_args()
  with_spconv = not args.no_spconv and _spconv.available()
  info = jsparse.build_info()
  targets = ", ".join(info["ffi_targets"]["cpu"])
  print(f"jax {jax.__version__} on {jax.default_backend()}; CPU kernels ({info['cpu_isa']}): {targets}")
  print(f"spconv 2.3.8 (CPU, 1 thread) side by side: {'yes' if with_spconv else 'not installed'}")
  table = Table()
  print(table.header())
  for voxel in args.voxel:
    for batch in args.batch:
      x = load_batch(voxel, batch)
      name = f"{voxel} m x{batch}"
      sites = int(x.num_active)
      subm = ops.make_spec("subm", x.spatial_shape, 3)
      down = ops.make_spec("conv", x.spatial_shape, 3, 2, 1)
      # A k3 s2 p1 conv of a sparse scan creates more sites than it reads (each input reaches up
      # to 8 outputs): size its output to fit, as spconv does, so that no site is dropped.
      with jsparse.backend("ffi"):
        needed = ops.output_sites(x.indices, down, batch, 8 * x.capacity)[1]
      down_capacity = jsparse.round_capacity(int(needed))
      build_subm = lambda i, s=subm, b=batch: ops.build_map(i, s, b)  # noqa: E731
      build_down = lambda i, s=down, b=batch, c=down_capacity: ops.build_map(i, s, b, c)  # noqa: E731
      with jsparse.backend("ffi"):
        pairs = jax.jit(build_subm)(x.indices)
        down_pairs = jax.jit(build_down)(x.indices)
      jsparse.check_capacity({"conv k3 s2 p1": jnp.stack([down_pairs.num_out, down_capacity])})
      active_pairs = int(jnp.sum(pairs.nbr >= 0))
      active_down_pairs = int(jnp.sum(down_pairs.nbr >= 0))
      active = np.array(x.indices)[:sites]
      theirs = lambda c, a=active, x=x, b=batch: (
        _spconv.calls(a, x.spatial_shape, b, c) if with_spconv else {}
      )  # noqa: E731
      any_c = theirs(args.channels[0])
      for label, build, map_pairs, spconv_call in (
        ("subm 3x3x3 map", build_subm, active_pairs, any_c.get("subm_map")),
        (
          f"conv k3 s2 p1 map ({int(down_pairs.num_out)} out)",
          build_down,
          active_down_pairs,
          any_c.get("conv_map"),
        ),
      ):
        ffi, ref, spconv_time = timed(build, x.indices, repeats=args.repeats, spconv=spconv_call)
        table.add(f"{name}: {label}", sites, map_pairs, ffi, ref, spconv=spconv_time)
      rng = np.random.default_rng(0)
      for c in args.channels:
        features = jnp.asarray(rng.standard_normal((x.capacity, c)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, 3, c, c)) / c, jnp.float32)
        cotangent = jnp.asarray(rng.standard_normal((x.capacity, c)), jnp.float32)
        forward = lambda f, k, p: ops.sparse_conv(f, k, p)  # noqa: E731

        # A layer's forward and backward: its output and the VJP of a cotangent handed down from
        # the layers above (as in a network), without a loss's own elementwise passes.
        def both(f, k, p, dy=cotangent):
          out, vjp = jax.vjp(lambda f, k: ops.sparse_conv(f, k, p), f, k)
          return out, vjp(dy)

        # A whole training step of the loss sum(y^2): also the loss's 2y pass over the output.
        loss_grad = jax.grad(lambda f, k, p: jnp.sum(ops.sparse_conv(f, k, p) ** 2), argnums=(0, 1))
        flops = 2 * active_pairs * c * c
        dense = dense_matmul_gflops(sites, c, args.repeats)
        spconv = any_c if c == args.channels[0] else theirs(c)
        # Forward, forward + backward and spconv's forward take turns, so their ratios hold.
        calls = {
          "forward": jitted("ffi", forward, features, kernel, pairs),
          "fwd+bwd": jitted("ffi", both, features, kernel, pairs),
          "grad of sum(y^2)": jitted("ffi", loss_grad, features, kernel, pairs),
        }
        if "subm_forward" in spconv:
          calls["spconv"] = spconv["subm_forward"]
        times = best_times(calls, args.repeats)
        for label, fn, work in (
          ("forward", forward, flops),
          ("fwd+bwd", both, 3 * flops),
          ("grad of sum(y^2)", loss_grad, 3 * flops),
        ):
          ref = best_times({"ref": jitted("reference", fn, features, kernel, pairs)}, 1)["ref"]
          theirs_time = times.get("spconv") if label == "forward" else None  # spconv's CPU build: no backward
          relative = "" if label == "forward" else f", {times[label] / times['forward']:.2f}x fwd"
          table.add(
            f"{name}: subm C={c} {label}{relative}", sites, active_pairs, times[label], ref, work, dense,
            theirs_time,
          )  # fmt: skip
        if c == 64 or c == args.channels[-1] and 64 not in args.channels:

          def strided(f, k, i, s=down, b=batch, cap=down_capacity):
            return ops.sparse_conv(f, k, ops.build_map(i, s, b, cap))

          ffi, ref, spconv_time = timed(
            strided, features, kernel, x.indices, repeats=args.repeats, spconv=spconv.get("conv_forward")
          )
          table.add(
            f"{name}: conv k3 s2 p1 C={c} fwd incl. map", sites, active_down_pairs, ffi, ref,
            2 * active_down_pairs * c * c, dense, spconv_time,
          )  # fmt: skip
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak memory (max RSS of this process): {peak:.0f} MiB")


if __name__ == "__main__":
  main()
