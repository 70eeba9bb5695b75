"""Capacities under jit: the defaults, plan_capacities and grow_on_overflow."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsparse
from jsparse import nn as spnn
from sparse_data import random_sites

SHAPE = (16, 16, 16)


def _batch(rng, count: int, capacity: int, channels: int = 4) -> jsparse.SparseConvTensor:
  sites = random_sites(rng, 2, SHAPE, count)
  features = rng.standard_normal((len(sites), channels)).astype(np.float32)
  return jsparse.SparseConvTensor(features, sites, SHAPE, 2, capacity=capacity)


class Net(nnx.Module):
  """Two strided stages (overlapping k3 s2 windows, then k2 s2), a norm, and the way back up."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.stem = spnn.SubMConv3d(4, 8, 3, indice_key="s0", rngs=rngs)
    self.down1 = spnn.SparseConv3d(8, 8, 3, 2, 1, indice_key="d1", rngs=rngs)
    self.norm = spnn.BatchNorm(8, rngs=rngs)
    self.down2 = spnn.SparseConv3d(8, 8, 2, 2, indice_key="d2", rngs=rngs)
    self.up2 = spnn.SparseInverseConv3d(8, 8, 2, indice_key="d2", rngs=rngs)
    self.up1 = spnn.SparseInverseConv3d(8, 3, 3, indice_key="d1", rngs=rngs)

  def __call__(self, x):
    y = self.down2(self.norm(self.down1(self.stem(x))))
    return self.up1(self.up2(y))


def test_default_capacities_follow_the_window():
  rng = np.random.default_rng(0)
  x = _batch(rng, 100, 128)
  overlapping = spnn.SparseConv3d(4, 4, 3, 2, 1, rngs=nnx.Rngs(0))
  disjoint = spnn.SparseConv3d(4, 4, 2, 2, rngs=nnx.Rngs(0))
  ratio = spnn.SparseConv3d(4, 4, 3, 2, 1, capacity_ratio=1.5, rngs=nnx.Rngs(0))
  given = spnn.SparseConv3d(4, 4, 3, 2, 1, out_capacity=300, rngs=nnx.Rngs(0))
  run = nnx.jit(lambda layer, x: layer(x))
  assert run(overlapping, x).capacity == 256  # 2 x 128: k3 s2 windows overlap
  assert run(disjoint, x).capacity == 128  # k2 s2: never more sites than the input
  assert run(ratio, x).capacity == 192
  assert run(given, x).capacity == 300
  with pytest.raises(ValueError, match="out_capacity must be a positive int"):
    spnn.SparseConv3d(4, 4, 3, 2, 1, out_capacity=1.5, rngs=nnx.Rngs(0))


def test_plan_sizes_every_layer_from_examples_and_leaves_the_model_alone():
  rng = np.random.default_rng(1)
  examples = [_batch(rng, n, 512) for n in (300, 500)]
  model = Net(rngs=nnx.Rngs(0))
  model.down1.out_capacity = 8  # a plan ignores what was set
  before = nnx.state(model)
  needed = {"down1": 0, "down2": 0}
  for x in examples:  # what each layer needs, eagerly
    y = spnn.SparseConv3d(4, 8, 3, 2, 1, rngs=nnx.Rngs(0))(x)
    needed["down1"] = max(needed["down1"], int(y.num_active))
    needed["down2"] = max(needed["down2"], int(spnn.SparseConv3d(8, 8, 2, 2, rngs=nnx.Rngs(0))(y).num_active))
  planned = spnn.plan_capacities(model, *examples, margin=1.25)
  assert planned == {name: jsparse.round_capacity(int(np.ceil(1.25 * n))) for name, n in needed.items()}
  assert model.down1.out_capacity == planned["down1"] and model.down2.out_capacity == planned["down2"]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # batch statistics untouched
  for x in examples:
    y = nnx.jit(lambda m, x: m(x))(model, x)
    jsparse.check_capacity(y)  # nothing dropped


def _train_step(counter: list[int]):
  def step(model, optimizer, x, target):
    counter.append(1)  # runs once per trace

    def loss_fn(model):
      y = model(x)
      return jnp.mean(jnp.where(y.mask[:, None], (y.features - target) ** 2, 0)), y

    (loss, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, y

  return step


def test_grow_on_overflow_reruns_the_step_from_the_same_state(caplog):
  rng = np.random.default_rng(2)
  x = _batch(rng, 400, 512)
  target = jnp.asarray(rng.standard_normal((512, 3)), jnp.float32)
  model = Net(rngs=nnx.Rngs(0))
  model.down1.out_capacity = 64  # far too small for the 400 sites
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  reference_model, reference_optimizer = nnx.clone((model, optimizer))

  traces: list[int] = []
  step = spnn.grow_on_overflow(_train_step(traces))
  with caplog.at_level(logging.WARNING, logger="jsparse"):
    loss = step(model, optimizer, x, target)
  grown = [r.getMessage() for r in caplog.records]
  assert len(grown) >= 1 and all("runs again from the same state" in m for m in grown)
  assert "down1" in grown[0] and "had 64 rows" in grown[0]
  needed = int(spnn.SparseConv3d(4, 8, 3, 2, 1, rngs=nnx.Rngs(0))(x).num_active)
  assert model.down1.out_capacity == jsparse.round_capacity(int(np.ceil(1.25 * needed)))

  # The same step, once, from the same initial state with the grown capacities: the same result.
  reference_model.down1.out_capacity = model.down1.out_capacity
  reference_model.down2.out_capacity = model.down2.out_capacity
  reference_loss, reference_y = nnx.jit(_train_step([]))(reference_model, reference_optimizer, x, target)
  jsparse.check_capacity(reference_y)
  np.testing.assert_array_equal(loss, reference_loss)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(reference_model))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(optimizer), nnx.state(reference_optimizer))

  caplog.clear()
  traced = len(traces)
  with caplog.at_level(logging.WARNING, logger="jsparse"):
    step(model, optimizer, x, target)
  assert not caplog.records and len(traces) == traced  # it fits now: no growth, no new compilation


def test_grow_on_overflow_cannot_grow_what_no_layer_owns():
  x = jsparse.SparseConvTensor.from_dense(jnp.ones((1, 4, 4, 4, 1)))

  def step(x):
    y = jsparse.SparseConvTensor.from_dense(x.dense(), capacity=8)  # 64 sites into 8 rows
    return jnp.sum(y.features), y

  with pytest.raises(jsparse.CapacityError, match="not a layer of this step's modules"):
    spnn.grow_on_overflow(step)(x)


def test_grow_on_overflow_sees_any_call_of_a_layer_that_overflowed():
  """One layer, two calls in a step: the first drops sites (its input's capacity, times the ratio,
  is small), the second has room to spare. The step is still grown and run again."""
  rng = np.random.default_rng(3)
  crowded, roomy = _batch(rng, 400, 416), _batch(rng, 20, 4096)
  layer = spnn.SparseConv3d(4, 4, 3, 2, 1, capacity_ratio=0.25, rngs=nnx.Rngs(0))

  def step(layer, a, b):
    ya, yb = layer(a), layer(b)
    return jnp.sum(ya.features) + jnp.sum(yb.features), [ya, yb]

  spnn.grow_on_overflow(margin=1.5)(step)(layer, crowded, roomy)
  needed = int(spnn.SparseConv3d(4, 4, 3, 2, 1, rngs=nnx.Rngs(0))(crowded).num_active)
  assert layer.out_capacity == jsparse.round_capacity(int(np.ceil(1.5 * needed)))
  jsparse.check_capacity(nnx.jit(lambda layer, x: layer(x))(layer, crowded))
