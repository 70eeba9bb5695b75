"""The demo's pieces (jsparse.demo): the jitted input step against plain numpy, the metrics, and a
short run of ``jsparse demo`` that writes its three outputs and resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jsparse import demo
from jsparse.cli import main


def test_input_step_voxelizes_and_labels_by_majority():
  scenes = demo.generate_scenes([3, 4])
  inputs = demo.InputStep(0.2, capacity=1024)  # too small: the step grows it and says so
  x, labels, ids = inputs(scenes)
  assert inputs.capacity > 1024 and x.capacity == 2 * inputs.capacity
  indices, labels, ids = np.asarray(x.indices), np.asarray(labels), np.asarray(ids)
  low = np.array(demo.RANGE_XYZ[:3], np.float32)
  for b in range(2):
    count = scenes.counts[b]
    points, truth, rows = scenes.points[b, :count], scenes.labels[b, :count], ids[b, :count]
    inside = np.all((points[:, :3] >= low) & (points[:, :3] < np.array(demo.RANGE_XYZ[3:])), axis=1)
    np.testing.assert_array_equal(rows >= 0, inside)  # every point in range has its voxel
    assert np.all(indices[rows[inside], 0] == b)
    cells = np.floor((points[inside, :3] - low) / 0.2).astype(np.int32)[:, ::-1]  # zyx
    np.testing.assert_array_equal(indices[rows[inside], 1:], cells)
    for row in np.unique(rows[inside])[:200]:  # majority label, ties to the smaller class id
      assert labels[row] == np.argmax(np.bincount(truth[rows == row], minlength=len(demo.CLASSES)))
  assert np.all(labels[indices[:, 0] < 0] == -1) and np.all(indices[indices[:, 0] < 0] == -1)


def test_augmentation_keeps_labels_and_moves_points():
  scenes = demo.generate_scenes([5])
  inputs = demo.InputStep(0.2)
  plain = inputs(scenes)
  moved = inputs(scenes, jax.random.split(jax.random.key(1), 1))
  assert not np.array_equal(np.asarray(plain[0].indices), np.asarray(moved[0].indices))
  # The same points, so (nearly) the same class histogram of voxels.
  a, b = (np.bincount(np.asarray(y)[np.asarray(y) >= 0], minlength=7) for y in (plain[1], moved[1]))
  np.testing.assert_allclose(a / a.sum(), b / b.sum(), atol=0.03)


def test_class_weights_favour_rare_classes():
  labels = np.array([0] * 900 + [1] * 99 + [2] * 1 + [-1] * 50)
  weights = demo.class_weights(labels)
  assert weights.shape == (len(demo.CLASSES),) and np.isclose(weights.mean(), 1.0)
  assert weights[0] < weights[1] < weights[2]


@pytest.mark.slow
def test_demo_writes_metrics_picture_and_checkpoint_and_resumes(tmp_path: pathlib.Path, capsys):
  out = tmp_path / "demo"
  main(["demo", "--steps", "2", "--out", str(out)])
  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics["iou"]) == set(demo.CLASSES) and 0.0 <= metrics["miou"] <= 1.0
  assert metrics["steps"] == 2 and metrics["steps_run"] == 2 and metrics["platform"] == jax.default_backend()
  assert (out / "segmentation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (out / "checkpoint" / "meta.json").is_file()
  printed = capsys.readouterr().out
  assert f"validation mIoU {metrics['miou']:.3f}" in printed

  sweep = pathlib.Path(demo.__file__).resolve().parents[1] / "data" / "nuscenes_lidar_top.bin"
  main(["demo", "--steps", "3", "--out", str(out), "--resume", "--points", str(sweep), "--num-features", "5"])
  resumed = json.loads((out / "metrics.json").read_text())
  assert resumed["steps"] == 3 and resumed["steps_run"] == 1
  # Points out of range or past MAX_POINTS have no class: the fractions sum to less than 1.
  assert resumed["scan"] == str(sweep) and 0.5 < sum(resumed["scan_class_fractions"].values()) < 1.0
  printed = capsys.readouterr().out
  assert "resumed from" in printed and "has 34688 points; the first 32768 are segmented" in printed


def test_resume_without_a_checkpoint_says_so(tmp_path: pathlib.Path):
  model = demo.make_model(demo.Config())
  with pytest.raises(FileNotFoundError, match="holds no jsparse demo checkpoint"):
    demo.restore_checkpoint(tmp_path, model, demo.make_optimizer(model, demo.Config()))


@pytest.mark.slow
def test_data_parallel_training_equals_one_device():
  """``--devices 2``: each device voxelizes and runs half of the batch, BatchNorm statistics and the
  loss are summed over both, so the losses and the trained weights equal one device's."""
  script = textwrap.dedent(
    """
    import jax, numpy as np
    from flax import nnx
    from jsparse import demo
    scenes = demo.generate_scenes(range(4))
    runs = []
    for devices in (1, 2):
      config = demo.Config(steps=3, train_scenes=4, devices=devices)
      inputs = demo.InputStep.fitting(config.voxel_size, scenes)
      model = demo.make_model(config)
      losses = demo.train(model, demo.make_optimizer(model, config), inputs, scenes, config)
      flat = lambda kind: np.concatenate([np.ravel(v) for v in jax.tree.leaves(nnx.state(model, kind))])
      runs.append((losses, flat(nnx.Param), flat(nnx.BatchStat)))
    (losses_1, weights_1, stats_1), (losses_2, weights_2, stats_2) = runs
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)  # the third after two Adam updates
    # Adam divides each gradient by its own running scale: a weight whose gradient is nearly 0
    # steps by up to the learning rate (4e-3) either way on rounding, and BatchNorm's statistics of
    # the next step follow. (With a learning rate of 1e-9 they agree to 2e-7.)
    assert np.abs(weights_2 - weights_1).max() < 2 * config.learning_rate
    np.testing.assert_allclose(stats_2, stats_1, rtol=2e-2, atol=1e-3)
    print("same")
    """
  )
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0 and "same" in run.stdout, run.stdout + run.stderr[-4000:]
