"""The demo (``jsparse demo``): LiDAR semantic segmentation, trained end to end on generated scenes.

1. :func:`generate_scenes`: labelled scans of procedural streets from a simulated 32-beam sensor
   (:func:`jsparse.utils.simulate_scan`), in KITTI's sensor frame.
2. :class:`InputStep`: a jitted step that augments the scans (rotation about z, mirror, scale),
   voxelizes them with :class:`~jsparse.utils.PointToVoxel`, takes each voxel's label by majority
   vote of its points and batches the voxels into a :class:`~jsparse.SparseConvTensor`.
3. :func:`train`: a small :class:`~jsparse.models.MinkUNet` with optax under jit; the train step is
   wrapped in :func:`jsparse.nn.grow_on_overflow`, so no site is ever dropped.
4. :func:`evaluate`: per-class IoU over the points of held-out scenes (voxel predictions mapped
   back to points with :func:`~jsparse.utils.gather_features_by_pc_voxel_id`).
5. :func:`predict_points`: the trained network on any scan, e.g. the repository's KITTI scan.
6. :func:`run`: all of the above, writing ``metrics.json``, ``segmentation.png`` and an orbax
   ``checkpoint/`` to an output folder.

The pieces are small and public so that ``notebooks/02_lidar_segmentation.ipynb`` can use them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jsparse
from jsparse import models
from jsparse import nn as spnn
from jsparse.utils import (
  CLASS_COLORS,
  CLASSES,
  PointToVoxel,
  gather_features_by_pc_voxel_id,
  mean_voxel_features,
  read_points,
  simulate_scan,
)

KITTI_SCAN = pathlib.Path(__file__).resolve().parents[1] / "data" / "kitti_000008.bin"
RANGE_XYZ = (-48.0, -48.0, -4.0, 48.0, 48.0, 4.0)  # the sensor at the origin, 1.73 m above the road
MAX_POINTS = 32768  # points per scan, padded (a generated scan holds 23k-29k; more are cut)
POINTS_PER_VOXEL = 8
FEATURES = ("z", "intensity", "range / 50")  # per voxel, from the mean of its points


@dataclasses.dataclass(frozen=True)
class Config:
  """The demo's settings; the defaults train in under two minutes on 2 CPU cores. :func:`train`
  reads ``steps``, ``batch_size``, ``seed`` and ``devices`` (and :func:`make_model` /
  :func:`make_optimizer` ``width``, ``seed``, ``learning_rate``); :func:`run` also the rest.

  Attributes:
    steps: optimizer steps.
    batch_size: scans per step (a multiple of ``devices``).
    voxel_size: cube edge in metres.
    width: MinkUNet's width multiplier (0.25: channels 8 to 64).
    learning_rate: Adam's peak rate (cosine decay after a short warm-up).
    train_scenes: generated training scans (seeds ``seed`` onwards).
    val_scenes: held-out scans (the seeds after the training ones).
    seed: the first scan's seed; also seeds the weights and the augmentation.
    devices: data-parallel devices (each takes ``batch_size / devices`` scans per step).
  """

  steps: int = 160
  batch_size: int = 2
  voxel_size: float = 0.2
  width: float = 0.25
  learning_rate: float = 4e-3
  train_scenes: int = 48
  val_scenes: int = 4
  seed: int = 0
  devices: int = 1


@dataclasses.dataclass(frozen=True)
class Scenes:
  """Scans padded to :data:`MAX_POINTS` points.

  Attributes:
    points: float32 ``[S, MAX_POINTS, 4]`` x, y, z, intensity (zeros past ``counts``).
    labels: int32 ``[S, MAX_POINTS]`` class ids (-1 past ``counts``).
    counts: int32 ``[S]`` points per scan.
  """

  points: np.ndarray
  labels: np.ndarray
  counts: np.ndarray

  def __len__(self) -> int:
    return len(self.counts)

  def take(self, rows: Sequence[int]) -> Scenes:
    rows = np.asarray(rows)
    return Scenes(self.points[rows], self.labels[rows], self.counts[rows])


def pad_scan(points: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
  """``(points [MAX_POINTS, 4], labels [MAX_POINTS], count)``: the first :data:`MAX_POINTS` points."""
  count = min(len(points), MAX_POINTS)
  padded = np.zeros((MAX_POINTS, 4), np.float32)
  padded[:count] = points[:count, :4]
  ids = np.full(MAX_POINTS, -1, np.int32)
  if labels is not None:
    ids[:count] = labels[:count]
  return padded, ids, count


def generate_scenes(seeds: Sequence[int]) -> Scenes:
  """One generated 32-beam scan per seed (:func:`jsparse.utils.simulate_scan`)."""
  scans = [pad_scan(*simulate_scan(int(s))) for s in seeds]
  return Scenes(*(np.stack(column) for column in zip(*scans)))


class InputStep:
  """Voxelizes a batch of scans into the network's input, jitted (one compilation per batch size
  and capacity).

  Each scan gets ``capacity`` rows of the batch tensor (batch ``b`` in rows ``b * capacity`` on);
  :meth:`__call__` grows ``capacity`` and says so when a scan has more voxels. The default
  capacity holds the voxels of ``scenes`` (see :meth:`fitting`).
  """

  def __init__(self, voxel_size: float, capacity: int = 16384):
    self.voxel_size = voxel_size
    self.voxelizer = PointToVoxel([voxel_size] * 3, RANGE_XYZ, 4, MAX_POINTS, POINTS_PER_VOXEL)
    self.capacity = capacity
    self._step = jax.jit(self._voxelize, static_argnames=("capacity",))

  @classmethod
  def fitting(cls, voxel_size: float, scenes: Scenes) -> InputStep:
    """An input step whose capacity holds the voxels of every scan of ``scenes``, with a margin of
    10% for augmented copies."""
    low, high = np.array(RANGE_XYZ[:3], np.float32), np.array(RANGE_XYZ[3:], np.float32)
    most = 0
    for points, count in zip(scenes.points, scenes.counts):
      xyz = points[:count, :3]
      cells = np.floor((xyz[np.all((xyz >= low) & (xyz < high), axis=1)] - low) / voxel_size).astype(np.int64)
      most = max(most, len(np.unique(cells, axis=0)))
    return cls(voxel_size, jsparse.round_capacity(int(most * 1.1)))

  @property
  def spatial_shape(self) -> tuple[int, ...]:
    return self.voxelizer.spatial_shape

  def __call__(
    self, scenes: Scenes, keys: jax.Array | None = None
  ) -> tuple[jsparse.SparseConvTensor, jax.Array, jax.Array]:
    """``(x, voxel_labels [B * capacity], pc_voxel_id [B, MAX_POINTS])``; each scan augmented by
    its own key when ``keys [B]`` are given (so that a scan's input does not depend on the batch
    it is in). ``pc_voxel_id`` indexes the batch tensor's rows (-1: the point has no voxel)."""
    augment = keys is not None
    if augment and jnp.shape(keys) != (len(scenes),):
      raise ValueError(
        f"keys must hold one key per scan, shape ({len(scenes)},); got shape {jnp.shape(keys)}: "
        f"pass jax.random.split(key, {len(scenes)})"
      )
    keys = keys if augment else jax.random.split(jax.random.key(0), len(scenes))
    while True:
      out = self._step(scenes.points, scenes.counts, scenes.labels, keys, augment, self.capacity)
      needed = int(jnp.max(out[-1]))
      if needed <= self.capacity:
        return out[:3]
      grown = jsparse.round_capacity(needed)
      print(f"jsparse demo: a scan has {needed} voxels: voxel capacity {self.capacity} -> {grown}")
      self.capacity = grown

  def _voxelize(self, points, counts, labels, keys, augment, capacity):
    batch = points.shape[0]
    points = jnp.where(augment, _augment(points, keys), points)  # one compilation for both
    features, coords, voxel_labels, ids, needed = [], [], [], [], []
    for b in range(batch):  # static: one voxelizer call per scan
      result = self.voxelizer.generate(points[b], num_points=counts[b])
      mean = mean_voxel_features(result.voxels[:capacity], result.num_points_per_voxel[:capacity])
      radius = jnp.sqrt(mean[:, 0] ** 2 + mean[:, 1] ** 2)
      features.append(jnp.stack([mean[:, 2], mean[:, 3], radius / 50.0], axis=1))
      coords.append(result.coords[:capacity])  # rows past the voxels are -1: padding
      point_ids = jnp.where(result.pc_voxel_id < capacity, result.pc_voxel_id, -1)
      voxel_labels.append(_majority(labels[b], point_ids, capacity, len(CLASSES)))
      ids.append(jnp.where(point_ids >= 0, point_ids + b * capacity, -1))
      needed.append(result.num_voxels)
    x = jsparse.SparseConvTensor.from_samples(features, coords, self.spatial_shape)
    return x, jnp.concatenate(voxel_labels), jnp.stack(ids), jnp.stack(needed)


@jax.vmap
def _augment(points: jax.Array, key: jax.Array) -> jax.Array:
  """Each scan ``[P, 4]`` by its own key: a rotation about z, a mirror image (y -> -y) half the
  time, a scale in [0.95, 1.05]."""
  angle, flip, scale = jax.random.split(key, 3)
  theta = jax.random.uniform(angle, maxval=2 * math.pi)
  mirror = jnp.where(jax.random.bernoulli(flip), -1.0, 1.0)
  s = jax.random.uniform(scale, minval=0.95, maxval=1.05)
  c, n = jnp.cos(theta), jnp.sin(theta)
  x, y = points[:, 0], mirror * points[:, 1]
  xyz = jnp.stack([c * x - n * y, n * x + c * y, points[:, 2]], axis=-1) * s
  return jnp.concatenate([xyz, points[:, 3:]], axis=-1)


def _majority(labels: jax.Array, point_ids: jax.Array, capacity: int, classes: int) -> jax.Array:
  """int32 ``[capacity]``: the most common label of each voxel's points (-1 for empty rows)."""
  valid = (point_ids >= 0) & (labels >= 0)
  votes = jax.ops.segment_sum(
    jax.nn.one_hot(jnp.where(valid, labels, 0), classes, dtype=jnp.int32) * valid[:, None],
    jnp.where(valid, point_ids, capacity),
    num_segments=capacity + 1,
  )[:capacity]
  return jnp.where(jnp.sum(votes, axis=1) > 0, jnp.argmax(votes, axis=1), -1).astype(jnp.int32)


def class_weights(labels: np.ndarray) -> np.ndarray:
  """float32 ``[classes]``: ``1 / sqrt(frequency)`` of each class among ``labels`` (>= 0), mean 1."""
  counts = np.bincount(labels[labels >= 0], minlength=len(CLASSES)).astype(np.float64)
  weights = 1.0 / np.sqrt(np.maximum(counts / counts.sum(), 1e-4))
  return (weights / weights.mean()).astype(np.float32)


def make_model(config: Config) -> models.MinkUNet:
  return models.MinkUNet(len(FEATURES), len(CLASSES), width=config.width, rngs=nnx.Rngs(config.seed))


def make_optimizer(model: nnx.Module, config: Config) -> nnx.Optimizer:
  import optax

  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.learning_rate,
    min(20, config.steps // 10 + 1),
    max(config.steps, 2),
    end_value=config.learning_rate / 20,
  )
  return nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)


def _weighted_loss_terms(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """``[2]``: the class-weighted cross-entropy summed over rows with a label (>= 0), and the sum
  of their weights; their ratio is the loss (summed over devices first when data-parallel)."""
  classes = jnp.maximum(labels, 0)
  w = jnp.where(labels >= 0, weights[classes], 0.0)
  return jnp.stack([jnp.sum(optax_cross_entropy(logits, classes) * w), jnp.sum(w)])


def _loss(model, x, labels, weights):
  out = model(x)
  total = _weighted_loss_terms(out.features, labels, weights)
  return total[0] / jnp.maximum(total[1], 1e-6), out


def _train_step(model, optimizer, x, labels, weights):
  (loss, out), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, labels, weights)
  optimizer.update(model, grads)
  return loss, out


class DataParallelStep:
  """The train step over ``devices`` devices with JAX's own machinery: ``jax.shard_map`` over a
  mesh axis "data", each device a slice of the batch (its own tensor and kernel maps), BatchNorm
  statistics summed over the axis, the loss and so the gradients averaged over every voxel of the
  batch. ``model`` and ``optimizer`` are updated in place after each call."""

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, devices: int):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    available = len(jax.devices())
    if devices > available:
      raise ValueError(
        f"--devices {devices} but jax sees {available} device(s); on CPU the command line asks for host "
        "devices (XLA_FLAGS=--xla_force_host_platform_device_count) before jax starts"
      )
    self.mesh = jax.make_mesh((devices,), ("data",))
    for _, module in model.iter_modules():
      if isinstance(module, spnn.BatchNorm):
        module.axis_name = "data"  # statistics over every device's voxels
    self.model, self.optimizer = model, optimizer
    self.graph, state = nnx.split((model, optimizer))
    self.replicated, self.split = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("data"))
    self.state = jax.device_put(state, self.replicated)
    self.step = jax.jit(
      jax.shard_map(
        self._per_device, mesh=self.mesh, in_specs=(P(), P("data"), P("data"), P()), out_specs=P()
      )
    )

  def _per_device(self, state, x, labels, weights):
    model, optimizer = nnx.merge(self.graph, state)
    x, labels = jax.tree.map(lambda a: a[0], (x, labels))

    def loss_fn(model):
      out = model(x)
      total = jax.lax.psum(_weighted_loss_terms(out.features, labels, weights), "data")
      return total[0] / jnp.maximum(total[1], 1e-6), out

    (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    overflow = jax.tree.map(lambda r: jax.lax.pmax(r, "data"), out.overflow)
    return loss, overflow, nnx.state((model, optimizer))

  def __call__(self, xs: Sequence[jsparse.SparseConvTensor], labels: Sequence[jax.Array], weights) -> float:
    """One step on one tensor (and its voxel labels) per device; returns the batch's loss."""
    x = jax.device_put(jax.tree.map(lambda *a: jnp.stack(a), *xs), self.split)
    y = jax.device_put(jnp.stack(labels), self.split)
    loss, overflow, self.state = self.step(self.state, x, y, weights)
    jsparse.check_capacity(overflow)  # MinkUNet's layers keep their input's sites: never fires
    nnx.update((self.model, self.optimizer), self.state)
    return float(loss)


def optax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class Progress:
  """One line on stderr: step, loss, steps per second and time left (a line per 10% when stderr
  is not a terminal)."""

  def __init__(self, total: int, first: int = 0):
    self.total, self.first, self.start = total, first, None
    self.tty = sys.stderr.isatty()

  def update(self, step: int, loss: float) -> None:
    done = step + 1 - self.first
    if self.start is None:  # the first step compiles: rates start after it
      self.start, self.started_at = time.perf_counter(), done
    rate = (done - self.started_at) / max(time.perf_counter() - self.start, 1e-9)
    left = (self.total - step - 1) / rate if rate > 0 else float("nan")
    bar = "#" * int(20 * (step + 1) / self.total)
    line = (
      f"step {step + 1:4d}/{self.total} [{bar:20s}] loss {loss:.3f}  {rate:.2f} steps/s  {left:.0f} s left"
    )
    if self.tty:
      print("\r" + line, end="\n" if step + 1 == self.total else "", file=sys.stderr, flush=True)
    elif (step + 1) % max(1, self.total // 10) == 0 or step + 1 == self.total:
      print(line, file=sys.stderr, flush=True)


def train(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  inputs: InputStep,
  scenes: Scenes,
  config: Config,
  first_step: int = 0,
  progress: bool = True,
) -> list[float]:
  """Trains for ``config.steps - first_step`` steps on random batches of ``scenes``; returns the
  losses. ``progress``: a progress line on stderr."""
  weights = jnp.asarray(class_weights(scenes.labels))
  rng = np.random.default_rng(config.seed + first_step)
  key = jax.random.key(config.seed)
  bar = Progress(config.steps, first_step) if progress else None
  parallel = DataParallelStep(model, optimizer, config.devices) if config.devices > 1 else None
  step_fn = spnn.grow_on_overflow(_train_step)
  losses = []
  for step in range(first_step, config.steps):
    batch = scenes.take(rng.choice(len(scenes), config.batch_size, replace=False))
    keys = jax.random.split(jax.random.fold_in(key, step), config.batch_size)  # one per scan
    if parallel is None:
      x, labels, _ = inputs(batch, keys)
      loss = float(step_fn(model, optimizer, x, labels, weights))
    else:  # each device voxelizes its own slice of the batch into its own tensor
      per_device = config.batch_size // config.devices
      slices = [
        inputs(
          batch.take(range(d * per_device, (d + 1) * per_device)), keys[d * per_device : (d + 1) * per_device]
        )
        for d in range(config.devices)
      ]
      loss = parallel([x for x, _, _ in slices], [y for _, y, _ in slices], weights)
    losses.append(loss)
    if bar is not None:
      bar.update(step, loss)
  return losses


def predict_voxels(model: nnx.Module, x: jsparse.SparseConvTensor) -> jax.Array:
  """int32 ``[capacity]``: each row's class (padding rows: -1), the model in eval mode."""
  logits = _predict(nnx.view(model, use_running_average=True), x)
  return jnp.where(x.mask, jnp.argmax(logits, axis=-1), -1).astype(jnp.int32)


@nnx.jit
def _predict(model, x):
  return model(x).features


def _padded_batches(scenes: Scenes, batch_size: int):
  """``(batch, real)``: ``scenes`` in batches of ``batch_size`` (the last one filled up with empty
  scans, so every batch reuses one compilation), and how many scans of each batch are real."""
  for first in range(0, len(scenes), batch_size):
    rows = list(range(first, min(first + batch_size, len(scenes))))
    real = len(rows)
    batch = scenes.take(rows)
    if real < batch_size:
      empty = batch_size - real
      batch = Scenes(
        np.concatenate([batch.points, np.zeros((empty, MAX_POINTS, 4), np.float32)]),
        np.concatenate([batch.labels, np.full((empty, MAX_POINTS), -1, np.int32)]),
        np.concatenate([batch.counts, np.zeros(empty, np.int32)]),
      )
    yield batch, real


def predict_scenes(model: nnx.Module, inputs: InputStep, scenes: Scenes, batch_size: int = 1) -> np.ndarray:
  """int32 ``[S, MAX_POINTS]``: each point's class, ``batch_size`` scans at a time (-1 where a point
  has no voxel: outside the range, or padding)."""
  predictions = []
  for batch, real in _padded_batches(scenes, batch_size):
    x, _, ids = inputs(batch)
    rows = predict_voxels(model, x)
    predictions.extend(
      np.asarray(gather_features_by_pc_voxel_id(rows, ids[b], invalid_value=-1)) for b in range(real)
    )
  return np.stack(predictions)


def predict_points(
  model: nnx.Module, inputs: InputStep, points: np.ndarray, batch_size: int = 1
) -> np.ndarray:
  """int32 ``[P]``: the class of each point of one scan ``[P, >= 4]`` (-1 outside the voxel range,
  or past :data:`MAX_POINTS`); ``batch_size`` as the model was compiled for (the other scans empty)."""
  padded, labels, count = pad_scan(points)
  scene = Scenes(padded[None], labels[None], np.array([count], np.int32))
  out = np.full(len(points), -1, np.int32)
  out[:count] = predict_scenes(model, inputs, scene, batch_size)[0, :count]
  return out


def evaluate(model: nnx.Module, inputs: InputStep, scenes: Scenes, batch_size: int = 1) -> dict[str, Any]:
  """Per-class IoU and their mean over the points of ``scenes`` that have a voxel.

  Returns:
    ``{"iou": {class: IoU}, "miou": mean IoU, "accuracy": point accuracy, "points": count,
    "predictions": int32 [S, MAX_POINTS]}`` (predictions -1 where a point has no voxel).
  """
  classes = len(CLASSES)
  predictions = predict_scenes(model, inputs, scenes, batch_size)
  scored = (scenes.labels >= 0) & (predictions >= 0)
  pairs = classes * scenes.labels[scored] + predictions[scored]
  confusion = np.bincount(pairs, minlength=classes**2).reshape(classes, classes)
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
  return {
    "iou": {name: float(v) for name, v in zip(CLASSES, iou)},
    "miou": float(np.nanmean(iou)),
    "accuracy": float(tp.sum() / max(confusion.sum(), 1)),
    "points": int(confusion.sum()),
    "predictions": predictions,
  }


def plot_segmentation(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], path: pathlib.Path | None = None):
  """Bird's-eye views, one per ``(title, points [P, >= 2], labels [P])``, coloured by class, with
  a legend (labels -1 in grey). Saves to ``path`` when given; returns the matplotlib figure."""
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  if path is None:  # shown where pyplot shows figures (a notebook); saved figures bypass pyplot
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6 * len(panels), 6.4))
  else:
    fig = Figure(figsize=(6 * len(panels), 6.4))
  axes = fig.subplots(1, len(panels), squeeze=False)
  colors = np.concatenate([CLASS_COLORS / 255.0, [[0.85, 0.85, 0.85]]])  # label -1: light grey
  for ax, (title, points, labels) in zip(axes[0], panels):
    ax.scatter(points[:, 0], points[:, 1], c=colors[np.where(labels >= 0, labels, -1)], s=1.0, linewidths=0)
    ax.set_title(title)
    ax.set_aspect("equal")
    low, high = np.percentile(points[:, :2], [1, 99], axis=0)  # the scan's extent, stray points aside
    middle, half = (low + high) / 2, max(high - low) / 2 + 2
    ax.set_xlim(middle[0] - half, middle[0] + half)
    ax.set_ylim(middle[1] - half, middle[1] + half)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
  handles = [Patch(color=colors[i], label=name) for i, name in enumerate(CLASSES)]
  fig.legend(handles=handles, loc="lower center", ncol=len(CLASSES), frameon=False)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  if path is not None:
    fig.savefig(path, dpi=110)
  return fig


def _checkpointer():
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer()


def save_checkpoint(
  folder: pathlib.Path, model: nnx.Module, optimizer: nnx.Optimizer, step: int, config: Config
):
  """Writes the model and optimizer state (orbax) and ``meta.json`` (step, config) to ``folder``."""
  folder = folder.resolve()
  checkpointer = _checkpointer()
  checkpointer.save(folder / "state", nnx.state((model, optimizer)), force=True)
  checkpointer.wait_until_finished()
  (folder / "meta.json").write_text(
    json.dumps({"step": step, "config": dataclasses.asdict(config)}, indent=2)
  )


def restore_checkpoint(folder: pathlib.Path, model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
  """Loads what :func:`save_checkpoint` wrote into ``model`` and ``optimizer``; returns ``meta.json``."""
  folder = folder.resolve()
  meta_path = folder / "meta.json"
  if not meta_path.is_file():
    raise FileNotFoundError(
      f"{folder} holds no jsparse demo checkpoint (no meta.json); run without --resume first"
    )
  abstract = jax.tree.map(jnp.zeros_like, nnx.state((model, optimizer)))
  nnx.update((model, optimizer), _checkpointer().restore(folder / "state", abstract))
  return json.loads(meta_path.read_text())


def run(
  config: Config = Config(),
  out: pathlib.Path = pathlib.Path("demo_output"),
  resume: bool = False,
  points_file: pathlib.Path | None = None,
  num_features: int | None = None,
) -> dict[str, Any]:
  """The whole demo; returns what it writes to ``out/metrics.json``."""
  start = time.perf_counter()
  out.mkdir(parents=True, exist_ok=True)
  print(
    f"jsparse demo: semantic segmentation ({len(CLASSES)} classes) on generated LiDAR scenes "
    f"(32-beam sensor, procedural streets): {config.train_scenes} training and {config.val_scenes} "
    f"validation scans, MinkUNet width {config.width}, {config.voxel_size} m voxels, "
    f"{config.steps} steps of {config.batch_size} scans, on {jax.default_backend()}",
    flush=True,
  )
  train_scenes = generate_scenes(range(config.seed, config.seed + config.train_scenes))
  val_seeds = range(config.seed + config.train_scenes, config.seed + config.train_scenes + config.val_scenes)
  val_scenes = generate_scenes(val_seeds)
  inputs = InputStep.fitting(config.voxel_size, train_scenes)
  model = make_model(config)
  optimizer = make_optimizer(model, config)
  first = 0
  if resume:
    meta = restore_checkpoint(out / "checkpoint", model, optimizer)
    first = min(int(meta["step"]), config.steps)
    print(f"jsparse demo: resumed from {out / 'checkpoint'} at step {first}", flush=True)
  train_start = time.perf_counter()
  losses = train(model, optimizer, inputs, train_scenes, config, first)
  train_seconds = time.perf_counter() - train_start
  save_checkpoint(out / "checkpoint", model, optimizer, config.steps, config)
  metrics = evaluate(model, inputs, val_scenes, config.batch_size)
  print(
    f"validation mIoU {metrics['miou']:.3f}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["iou"].items())
  )

  scan_path = points_file if points_file is not None else KITTI_SCAN
  if num_features is None and scan_path.suffix == ".bin":
    num_features = 4  # KITTI's layout; a nuScenes sweep needs 5
  scan = read_points(scan_path, num_features)
  if scan.shape[1] < 4:
    raise ValueError(
      f"{scan_path}: the network reads x, y, z and intensity; the file has {scan.shape[1]} columns"
    )
  if len(scan) > MAX_POINTS:
    print(f"jsparse demo: {scan_path.name} has {len(scan)} points; the first {MAX_POINTS} are segmented")
  scan_labels = predict_points(model, inputs, scan, config.batch_size)
  panels = [
    (f"generated scan {val_seeds[0]}: truth", val_scenes.points[0, : val_scenes.counts[0]],
     val_scenes.labels[0, : val_scenes.counts[0]]),
    (f"generated scan {val_seeds[0]}: prediction (mIoU {metrics['miou']:.2f})",
     val_scenes.points[0, : val_scenes.counts[0]], metrics["predictions"][0, : val_scenes.counts[0]]),
    (f"{scan_path.name}: prediction", scan, scan_labels),
  ]  # fmt: skip
  plot_segmentation(panels, out / "segmentation.png")
  summary = {
    "miou": metrics["miou"],
    "iou": metrics["iou"],
    "accuracy": metrics["accuracy"],
    "validation_points": metrics["points"],
    "steps": config.steps,
    "steps_run": config.steps - first,
    "final_loss": losses[-1] if losses else None,
    "train_seconds": train_seconds,
    "seconds": time.perf_counter() - start,
    "scan": str(scan_path),
    "scan_class_fractions": {name: float(np.mean(scan_labels == i)) for i, name in enumerate(CLASSES)},
    "backend": jsparse.ops.current_backend(),
    "platform": jax.default_backend(),
    "devices": config.devices,
    "config": dataclasses.asdict(config),
  }
  (out / "metrics.json").write_text(json.dumps(summary, indent=2))
  print(f"jsparse demo: wrote {out / 'metrics.json'}, {out / 'segmentation.png'}, {out / 'checkpoint'} "
        f"in {summary['seconds']:.0f} s")  # fmt: skip
  return summary
