"""Whole networks on real scans: jsparse's jitted forward and train step beside spconv's forward.

Prints one row per network: the jitted forward in inference mode with every kernel map built
inside it ("fwd ms"), spconv 2.3.8's forward of the same layer list on the same voxels (CPU, one
thread, its only correct setting; under ``torch.no_grad``, BatchNorm in eval mode, convolutions
in train mode, as its CPU layers assert on a bias in eval mode) and their ratio, then a jitted
train step (forward, backward and an Adam update, maps included) and its time as a multiple of
the forward. Both are jitted pure functions of the split model state (``nnx.split``, as
``grow_on_overflow`` runs a step). Calls of the two libraries take turns; each time is the
median of ``--repeats`` calls after a compiling warm-up. The networks have random weights; both
libraries' outputs must have the same number of sites.

Cases (the scans in data/, voxel features the mean of each voxel's points):
- VoxelBackBone8x (SECOND) on the KITTI scan and the nuScenes sweep as a batch of 2, both at
  [0.05, 0.05, 0.1] m over KITTI's range (21,502 voxels);
- VoxelResBackBone8x (CenterPoint) on the nuScenes sweep and its mirror image (x -> -x) as a batch
  of 2, at 0.075 m over [-54, 54] m (35,018 voxels);
- MinkUNet-W32 (19 classes) on the KITTI scan at 0.05 m cubes, with the default capacities and
  again with ``jsparse.nn.plan_capacities`` run on the scan first: by default each k2 s2 stage
  keeps its input's capacity (the most sites it could have), so the deep 256-channel stages hold
  16,384 rows for 951 sites on this scan.

  python benchmarks/bench_models.py [--repeats 5] [--no-spconv]
"""

from __future__ import annotations

import argparse
import functools
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
from jsparse import models
from jsparse.utils import PointToVoxel, mean_voxel_features

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _spconv  # noqa: E402
import _spconv_models  # noqa: E402
import _table  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
KITTI_RANGE = (0.0, -40.0, -3.0, 70.4, 40.0, 1.0)


def scan(name: str) -> np.ndarray:
  columns = 5 if name.startswith("nuscenes") else 4
  return np.fromfile(DATA / name, np.float32).reshape(-1, columns)[:, :4].copy()


def voxel_batch(clouds: list[np.ndarray], voxel_size, coors_range) -> tuple[np.ndarray, np.ndarray, tuple]:
  """``(features [N, 4], indices int32 [N, 4], grid zyx)``: each cloud a sample, voxel means."""
  features, indices = [], []
  for b, points in enumerate(clouds):
    gen = PointToVoxel(voxel_size, coors_range, 4, 200_000, 10)
    voxels, coords, counts, _ = gen.generate_voxel_with_id(points)
    features.append(np.asarray(mean_voxel_features(voxels, counts)))
    indices.append(np.c_[np.full(len(coords), b, np.int32), np.asarray(coords)])
  return np.concatenate(features), np.concatenate(indices).astype(np.int32), gen.grid_size_xyz


def cases() -> list[dict[str, Any]]:
  kitti, nuscenes = scan("kitti_000008.bin"), scan("nuscenes_lidar_top.bin")
  mirrored = nuscenes * np.array([-1, 1, 1, 1], np.float32)
  out = []
  f, i, grid = voxel_batch([kitti, nuscenes], (0.05, 0.05, 0.1), KITTI_RANGE)
  out.append(dict(name="VoxelBackBone8x, KITTI + nuScenes 0.05 m", model="VoxelBackBone8x", features=f,
                  indices=i, shape=models.VoxelBackBone8x.sparse_shape(grid), batch=2))  # fmt: skip
  f, i, grid = voxel_batch([nuscenes, mirrored], (0.075, 0.075, 0.2), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))
  out.append(dict(name="VoxelResBackBone8x, nuScenes x2 0.075 m", model="VoxelResBackBone8x", features=f,
                  indices=i, shape=models.VoxelBackBone8x.sparse_shape(grid), batch=2))  # fmt: skip
  f, i, grid = voxel_batch([kitti], (0.05, 0.05, 0.05), KITTI_RANGE)
  out.append(dict(name="MinkUNet-W32, KITTI 0.05 m", model="MinkUNet", features=f, indices=i,
                  shape=tuple(grid[::-1]), batch=1))  # fmt: skip
  out.append(dict(out[-1], name="MinkUNet-W32, planned capacities", plan=True))
  return out


def jsparse_model(case: dict[str, Any]) -> nnx.Module:
  if case["model"] == "MinkUNet":
    return models.MinkUNet(4, 19, rngs=nnx.Rngs(0))
  return getattr(models, case["model"])(4, rngs=nnx.Rngs(0))


def jsparse_calls(case: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], Any], int]:
  """``(forward, train_step, output sites)`` as zero-argument calls that block until done."""
  x = jsparse.SparseConvTensor(
    case["features"],
    case["indices"],
    case["shape"],
    case["batch"],
    capacity=jsparse.round_capacity(len(case["indices"])),
  )
  model = jsparse_model(case)
  if case.get("plan"):
    jsparse.nn.plan_capacities(model, x)
  is_unet = case["model"] == "MinkUNet"

  def output(y):
    return y if is_unet else y[0]

  # Both calls are jitted pure functions of the split state, as Flax's guide advises for speed:
  # nnx.jit would walk every state leaf of the model on each call.
  eval_graph, eval_state = nnx.split(nnx.view(model, use_running_average=True))
  eval_state = jax.tree.map(jnp.copy, eval_state)  # the train step donates the model's buffers
  forward = jax.jit(lambda state, x: output(nnx.merge(eval_graph, state)(x)))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 19, x.capacity), jnp.int32)
  train_graph, train_state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, x):
    model, optimizer = nnx.merge(train_graph, state)

    def loss_fn(model):
      y = output(model(x))
      if is_unet:
        losses = optax.softmax_cross_entropy_with_integer_labels(y.features, labels)
      else:
        losses = jnp.sum(jnp.square(y.features), axis=1)
      return jnp.sum(jnp.where(y.mask, losses, 0)) / jnp.maximum(jnp.sum(y.mask), 1)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  def step():
    nonlocal train_state
    loss, train_state = train_step(train_state, x)
    return jax.block_until_ready(loss)

  y = jax.block_until_ready(forward(eval_state, x))
  jsparse.check_capacity(y)
  step()
  return (
    lambda: jax.block_until_ready(forward(eval_state, x).features),
    step,
    int(y.num_active),
  )


def spconv_call(case: dict[str, Any]) -> tuple[Callable[[], Any], int]:
  torch, spconv, _ = _spconv._load()
  net = _spconv_models.build(case["model"], 4, 19)
  net.train()  # spconv's CPU convolutions assert on their bias in eval mode; BatchNorm can evaluate
  for module in net.modules():
    if isinstance(module, torch.nn.BatchNorm1d):
      module.eval()
  features = torch.from_numpy(case["features"])
  indices = torch.from_numpy(case["indices"])

  def call():
    torch.set_num_threads(1)
    with torch.no_grad():
      return net(spconv.SparseConvTensor(features, indices, list(case["shape"]), case["batch"]))

  return call, int(call().indices.shape[0])


def median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      begin = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - begin)
  return {name: statistics.median(t) for name, t in times.items()}


COLUMNS = (
  ("case", 42), ("voxels", 8), ("out", 7), ("fwd ms", 9), ("spconv ms", 10), ("spconv/fwd", 11),
  ("step ms", 9), ("step/fwd", 9),
)  # fmt: skip


def row(*cells: Any) -> str:
  return _table.row(COLUMNS, *cells, digits=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-spconv", action="store_true", help="skip spconv even when installed")
  args = parser.parse_args()
  with_spconv = not args.no_spconv and _spconv.available()
  print(f"jax {jax.__version__} on {jax.default_backend()}; medians of {args.repeats} calls")
  print(f"spconv 2.3.8 (CPU, 1 thread) side by side: {'yes' if with_spconv else 'not installed'}")
  print(_table.header(COLUMNS), flush=True)
  for case in cases():
    forward, step, sites = jsparse_calls(case)
    fns = {"forward": forward, "step": step}
    if with_spconv:
      fns["spconv"], theirs = spconv_call(case)
      if theirs != sites:
        raise AssertionError(f"{case['name']}: spconv's output has {theirs} sites, jsparse's {sites}")
    times = median_times(fns, args.repeats)
    fwd, stp, sp = times["forward"], times["step"], times.get("spconv")
    print(
      row(
        case["name"], len(case["indices"]), sites, 1e3 * fwd, None if sp is None else 1e3 * sp,
        None if sp is None else f"{sp / fwd:.1f}x", 1e3 * stp, f"{stp / fwd:.1f}x",
      ),
      flush=True,
    )  # fmt: skip


if __name__ == "__main__":
  main()
