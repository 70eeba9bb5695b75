"""MinkUNet: mmdet3d's layer list, jit against eager on a real scan, padding, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsparse
from jsparse import models
from jsparse.utils import voxelize_mean


def _parameters(model) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _residual(a: int, b: int) -> int:
  """TorchSparseBasicBlock(a, b): two 3x3x3 convolutions and BatchNorms, a 1x1x1 shortcut with
  BatchNorm where the channels change."""
  return 27 * a * b + 27 * b * b + 4 * b + (a * b + 2 * b if a != b else 0)


def test_minkunet_w32_has_mmdet3ds_parameters():
  """mmdet3d's MinkUNetBackbone (base 32, encoder 32-64-128-256, decoder 256-128-96-96) and
  MinkUNetHead's linear classifier."""
  c_in, classes = 4, 19
  encoder, decoder = [32, 32, 64, 128, 256], [256, 256, 128, 96, 96]
  total = 27 * c_in * 32 + 27 * 32 * 32 + 2 * (2 * 32)  # stem
  for i in range(4):
    total += 8 * encoder[i] * encoder[i] + 2 * encoder[i]  # k2 s2 down, BatchNorm
    total += _residual(encoder[i], encoder[i + 1]) + _residual(encoder[i + 1], encoder[i + 1])
  for i in range(4):
    total += 8 * decoder[i] * decoder[i + 1] + 2 * decoder[i + 1]  # transposed k2 s2 up, BatchNorm
    c = decoder[i + 1]
    total += _residual(c + encoder[-2 - i], c) + _residual(c, c)
  total += 96 * classes + classes
  assert _parameters(models.MinkUNet(c_in, classes, rngs=nnx.Rngs(0))) == total
  half = models.MinkUNet(c_in, classes, width=0.5, rngs=nnx.Rngs(0))
  assert half.widths == (16, 16, 32, 64, 128, 128, 64, 48, 48)


def _kitti(scans, capacity):
  points = np.fromfile(scans / "kitti_000008.bin", np.float32).reshape(-1, 4)
  features, coords, shape = voxelize_mean(points, 0.05)
  indices = np.c_[np.zeros(len(coords), np.int32), coords].astype(np.int32)
  return jsparse.SparseConvTensor(features, indices, shape, 1, capacity=capacity)


@pytest.mark.slow
def test_jit_equals_eager_and_padding_changes_nothing(scans):
  """The KITTI scan at 0.05 m: eagerly and under jit (default capacities, three input
  capacities), eval mode, the same scores at the input's sites; padding rows stay zero."""
  model = models.MinkUNet(4, 5, width=0.5, rngs=nnx.Rngs(0))
  model.eval()
  n = len(_kitti(scans, None).to_numpy()[1])
  want_scores, want_sites = model(_kitti(scans, n)).to_numpy()
  run = nnx.jit(lambda m, x: m(x))
  for capacity in (n + 3, 2 * n):
    y = run(model, _kitti(scans, capacity))
    jsparse.check_capacity(y)
    scores, sites = y.to_numpy()
    np.testing.assert_array_equal(sites, want_sites)
    np.testing.assert_allclose(scores, want_scores, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(y.features)[~np.asarray(y.mask)], 0)


def test_small_minkunet_trains():
  """A few jitted steps on random sites lower the loss of a per-voxel classification."""
  rng = np.random.default_rng(0)
  sites = np.unique(rng.integers(0, 24, size=(600, 3)), axis=0)
  labels = (sites[:, 0] > 12).astype(np.int32)  # the half of the grid each voxel lies in
  x = jsparse.SparseConvTensor(
    rng.standard_normal((len(sites), 4)).astype(np.float32) + labels[:, None],
    np.c_[np.zeros(len(sites), np.int32), sites].astype(np.int32),
    (24, 24, 24),
    1,
    capacity=768,
  )
  target = jnp.pad(jnp.asarray(labels), (0, 768 - len(labels)))
  model = models.MinkUNet(4, 2, width=0.25, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      y = model(x)
      losses = optax.softmax_cross_entropy_with_integer_labels(y.features, target)
      return jnp.sum(jnp.where(y.mask, losses, 0)) / jnp.sum(y.mask)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(8)]
  assert losses[-1] < 0.7 * losses[0], losses
