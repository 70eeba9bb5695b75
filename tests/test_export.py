"""jax.export of jitted functions that take and return SparseConvTensor: export, serialize,
deserialize (in this process and in a fresh one), call, and compare with the jitted function."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import nn as spnn
from sparse_data import random_tensor


def _model_fn():
  """A jitted network (maps built inside) as a function of its input tensor only."""
  model = spnn.SparseSequential(
    spnn.SubMConv3d(4, 8, 3, indice_key="subm1", rngs=nnx.Rngs(0)),
    spnn.BatchNorm(8, rngs=nnx.Rngs(0)),
    nnx.relu,
    spnn.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="down1", rngs=nnx.Rngs(1)),
    spnn.SparseInverseConv3d(16, 8, 3, indice_key="down1", rngs=nnx.Rngs(2)),
  )
  graphdef, state = nnx.split(nnx.view(model, use_running_average=True))
  return jax.jit(lambda x: nnx.merge(graphdef, state)(x))


def _input(capacity: int) -> jsparse.SparseConvTensor:
  x = random_tensor(np.random.default_rng(0), 2, (12, 12, 12), 4, 150)
  return jsparse.SparseConvTensor(x.features, x.indices, x.spatial_shape, x.batch_size, capacity=capacity)


def _assert_identical(y, expected):
  assert isinstance(y, jsparse.SparseConvTensor)
  assert (y.spatial_shape, y.batch_size) == (expected.spatial_shape, expected.batch_size)
  assert jax.tree.structure(y) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("capacity", [160, 256])
def test_round_trip_gives_identical_outputs(capacity):
  fn, x = _model_fn(), _input(capacity)
  exported = jax.export.export(fn, disabled_checks=jsparse.export.disabled_checks())(x)
  restored = jsparse.export.deserialize(exported.serialize())
  y = restored.call(x)
  _assert_identical(y, fn(x))
  assert set(y.indice_dict) == {"subm1", "down1"}  # the maps come back as IndicePairs
  assert isinstance(y.indice_dict["down1"], jsparse.IndicePairs)
  np.testing.assert_array_equal(np.asarray(y.features)[np.asarray(y.indices)[:, 0] < 0], 0)


def test_export_without_the_disabled_checks_names_the_target():
  with jsparse.backend("ffi"):
    fn = _model_fn()
    with pytest.raises(ValueError, match="jsparse_"):
      jax.export.export(fn)(_input(160))


def test_reference_path_needs_no_disabled_checks():
  with jsparse.backend("reference"):
    fn = _model_fn()
    exported = jax.export.export(fn)(_input(160))
  _assert_identical(jax.export.deserialize(exported.serialize()).call(_input(160)), fn(_input(160)))


def test_voxels_and_hash_table_serialize():
  points = np.random.default_rng(0).uniform(0, 4, (100, 4)).astype(np.float32)
  voxelize = jsparse.utils.PointToVoxel([1, 1, 1], [0, 0, 0, 4, 4, 4], 4, 64, 5)

  def fn(points):
    table = jsparse.ops.HashTable.create(64, jax.numpy.int32)
    return voxelize(points), table

  exported = jax.export.export(jax.jit(fn), disabled_checks=jsparse.export.disabled_checks())(points)
  out = jsparse.export.deserialize(exported.serialize()).call(points)
  expected = jax.jit(fn)(points)
  assert type(out[0]) is type(expected[0]) and type(out[1]) is type(expected[1])
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not jsparse.build_info()["cpu_ffi"], reason="the CPU extension is not built")
def test_a_fresh_process_runs_the_serialized_kernels(tmp_path: pathlib.Path):
  with jsparse.backend("ffi"):
    fn, x = _model_fn(), _input(160)
    exported = jax.export.export(fn, disabled_checks=jsparse.export.disabled_checks())(x)
  (tmp_path / "model.bin").write_bytes(exported.serialize())
  expected = fn(x)
  np.savez(tmp_path / "x.npz", features=x.features, indices=x.indices)
  script = f"""
import numpy as np, jsparse
blob = open({str(tmp_path / "model.bin")!r}, "rb").read()
data = np.load({str(tmp_path / "x.npz")!r})
x = jsparse.SparseConvTensor(data["features"], data["indices"], (12, 12, 12), 2)
y = jsparse.export.deserialize(blob).call(x)
np.save({str(tmp_path / "y.npy")!r}, np.asarray(y.features))
"""
  subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(expected.features))
