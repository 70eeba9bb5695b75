"""Mixed precision through whole models (the policy in jsparse/nn/_precision.py): bfloat16 and
float16 against float32 on a real scan, in eval and train mode, outputs and gradients, with the
stated tolerances; parameters stay float32 and padding rows stay zero."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA_DIR
from flax import nnx

import jsparse
from jsparse import models
from jsparse import nn as spnn
from jsparse.utils import PointToVoxel, mean_voxel_features

# |out - out_f32| over max |out_f32|: the largest, and the mean over the mean |out_f32|; and the
# cosine of the parameter gradient with float32's. Measured on this scan (2026-12-06): bfloat16 at
# most 0.025, 0.020 and cosines from 0.982; float16 0.0035, 0.0027.
TOLERANCES = {jnp.bfloat16: (0.05, 0.03, 0.97), jnp.float16: (0.01, 0.005, 0.995)}


@functools.cache
def _kitti(voxel: float) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  points = np.fromfile(DATA_DIR / "kitti_000008.bin", np.float32).reshape(-1, 4)
  gen = PointToVoxel([voxel] * 3, [0, -20, -3, 35.2, 20, 1], 4, 60_000, 10)  # the nearer half
  voxels, coords, counts, _ = gen.generate_voxel_with_id(points)
  features = np.asarray(mean_voxel_features(voxels, counts))
  indices = np.c_[np.zeros(len(coords), np.int32), np.asarray(coords)].astype(np.int32)
  return features, indices, tuple(gen.grid_size_xyz)


def _case(name: str) -> tuple[nnx.Module, jsparse.SparseConvTensor]:
  if name == "MinkUNet":
    features, indices, grid = _kitti(0.2)
    model, shape = models.MinkUNet(4, 19, width=0.5, rngs=nnx.Rngs(0)), grid[::-1]
  else:
    features, indices, grid = _kitti(0.1)
    model, shape = getattr(models, name)(4, rngs=nnx.Rngs(0)), models.VoxelBackBone8x.sparse_shape(grid)
  capacity = jsparse.round_capacity(len(indices))
  return model, jsparse.SparseConvTensor(features, indices, shape, 1, capacity=capacity)


@functools.cache
def _outputs(name: str, dtype) -> dict[str, np.ndarray]:
  """Eval and train outputs (float32 copies), the mask, and the gradient of a train loss."""
  model, x = _case(name)
  spnn.set_dtype(model, dtype)
  x = x.replace(features=x.features.astype(dtype or jnp.float32))

  def output(m, x):
    y = m(x)
    return y if name == "MinkUNet" else y[0]

  @nnx.jit
  def run(m, x):
    y = output(m, x)
    return y.features.astype(jnp.float32), y.mask

  @nnx.jit
  def train_step(m, x):  # the train-mode output and the gradient of a loss, in one compilation
    def loss(m):
      y = output(m, x)
      features = y.features.astype(jnp.float32)  # the loss in float32
      return jnp.mean(jnp.square(features)), (features, y.mask)

    return nnx.grad(loss, has_aux=True)(m)

  grads, (train, mask) = train_step(model, x)
  kinds = {str(p.dtype) for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
  model.eval()
  evaluated, _ = run(model, x)
  flat = jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in jax.tree.leaves(grads)])
  return dict(eval=np.asarray(evaluated), train=np.asarray(train), mask=np.asarray(mask),
              grad=np.asarray(flat), param_dtypes=kinds)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["VoxelBackBone8x", "VoxelResBackBone8x", "MinkUNet"])
def test_models_in_low_precision_agree_with_float32(name, dtype):
  ref, low = _outputs(name, None), _outputs(name, dtype)
  largest, mean, min_cosine = TOLERANCES[dtype]
  for mode in ("eval", "train"):
    err = np.abs(low[mode] - ref[mode])
    assert np.all(np.isfinite(low[mode])), mode
    assert err.max() <= largest * np.abs(ref[mode]).max(), (mode, err.max())
    assert err.mean() <= mean * np.abs(ref[mode]).mean(), (mode, err.mean())
    assert np.all(low[mode][~low["mask"]] == 0), mode  # padding rows stay zero
  cosine = low["grad"] @ ref["grad"] / (np.linalg.norm(low["grad"]) * np.linalg.norm(ref["grad"]))
  assert cosine >= min_cosine, cosine
  assert low["param_dtypes"] == {"float32"}  # parameters keep param_dtype


def test_set_dtype_sets_computation_not_storage():
  net = spnn.SparseSequential(
    spnn.SubMConv3d(4, 8, 3, rngs=nnx.Rngs(0)), spnn.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.relu,
    nnx.Linear(8, 2, rngs=nnx.Rngs(0)),
  )  # fmt: skip
  assert spnn.set_dtype(net, jnp.bfloat16) is net
  conv, bn, _, linear = net.layers
  assert conv.dtype == bn.dtype == linear.dtype == jnp.bfloat16
  assert conv.kernel.get_value().dtype == bn.mean.get_value().dtype == jnp.float32
  x = jsparse.SparseConvTensor(
    np.ones((3, 4), np.float32), np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]], np.int32), (4, 4, 4), 1,
    capacity=8,
  )  # fmt: skip
  y = net(x)
  assert y.features.dtype == jnp.bfloat16
  assert np.all(np.asarray(y.features, np.float32)[3:] == 0)
  assert spnn.set_dtype(net, None).layers[0].dtype is None
