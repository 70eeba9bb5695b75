"""Mask-aware norms against Flax's own norms applied to the active rows alone.

Each case fills the padding rows with garbage (a tensor built with ``replace``, which does not
zero them), so a norm that read them would differ from the oracle; the oracle is Flax's layer
(``nnx.BatchNorm`` / ``LayerNorm`` / ``GroupNorm``) on the active rows only, with the same
parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import nn as spnn
from sparse_data import random_sites

SHAPE = (6, 5, 4)
C = 6


def _tensor(rng, active: int, capacity: int, batch_size: int = 2, scale: float = 3.0):
  """A tensor of ``active`` sites (features mean 2, std ``scale``) with garbage in its padding rows."""
  sites = random_sites(rng, batch_size, SHAPE, active)
  features = (2.0 + scale * rng.standard_normal((len(sites), C))).astype(np.float32)
  x = jsparse.SparseConvTensor(features, sites, SHAPE, batch_size, capacity=capacity)
  garbage = jnp.where(
    x.mask[:, None], x.features, 1e3 * jnp.asarray(rng.standard_normal((capacity, C)), jnp.float32)
  )
  return x.replace(features=garbage), features


def _assert_padding_zero(y):
  np.testing.assert_array_equal(np.asarray(y.features)[~np.asarray(y.mask)], 0)


def _stats(layer):
  return np.asarray(layer.mean[...]), np.asarray(layer.var[...])


@pytest.mark.parametrize("capacity", [40, 41, 64, 256])
@pytest.mark.parametrize("fast", [True, False])
def test_batch_norm_learns_from_active_rows_only(capacity, fast):
  rng = np.random.default_rng(capacity)
  kw = dict(momentum=0.9, epsilon=1e-3, use_fast_variance=fast)
  ours = spnn.BatchNorm(C, **kw, rngs=nnx.Rngs(0))
  oracle = nnx.BatchNorm(C, **kw, rngs=nnx.Rngs(0))
  _set_affine(ours, oracle)
  step = nnx.jit(lambda layer, x: layer(x))
  for call in (lambda layer, x: layer(x), step):  # eager, then under jit
    x, active = _tensor(rng, 40, capacity)
    y = call(ours, x)
    want = oracle(jnp.asarray(active))
    np.testing.assert_allclose(y.to_numpy()[0], want, rtol=1e-5, atol=1e-5)
    _assert_padding_zero(y)
    for got, expected in zip(_stats(ours), _stats(oracle)):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

  ours.eval()
  oracle.eval()
  x, active = _tensor(rng, 40, capacity)
  before = _stats(ours)
  for call in (lambda layer, x: layer(x), step):
    y = call(ours, x)
    np.testing.assert_allclose(y.to_numpy()[0], oracle(jnp.asarray(active)), rtol=1e-5, atol=1e-5)
    _assert_padding_zero(y)
  np.testing.assert_array_equal(_stats(ours)[0], before[0])  # eval mode leaves the statistics


def _set_affine(*layers):
  for layer in layers:  # non-trivial scale and bias
    layer.scale[...] = jnp.linspace(0.5, 2.0, C)
    layer.bias[...] = jnp.linspace(-1.0, 1.0, C)


def _affine_grads(grads):
  return np.asarray(grads["scale"][...]), np.asarray(grads["bias"][...])


@pytest.mark.parametrize("capacity", [30, 31, 48, 256])
@pytest.mark.parametrize("fast", [True, False])
def test_batch_norm_gradients_match_and_skip_padding(capacity, fast):
  """Gradients of the features, scale and bias against autodiff of Flax's layer on the active
  rows."""
  rng = np.random.default_rng(capacity)
  x, active = _tensor(rng, 30, capacity)
  weights = jnp.asarray(rng.standard_normal((capacity, C)), jnp.float32)
  kw = dict(epsilon=1e-3, use_fast_variance=fast)
  ours, oracle = spnn.BatchNorm(C, **kw, rngs=nnx.Rngs(0)), nnx.BatchNorm(C, **kw, rngs=nnx.Rngs(0))
  _set_affine(ours, oracle)
  mask = np.asarray(x.mask)

  def loss(layer, features):
    return jnp.sum(layer(x.replace(features=features)).features * weights)

  want_layer, want_features = nnx.grad(lambda layer, f: jnp.sum(layer(f) * weights[mask]), argnums=(0, 1))(
    oracle, jnp.asarray(active)
  )
  for grad_fn in (nnx.grad(loss, argnums=(0, 1)), nnx.jit(nnx.grad(loss, argnums=(0, 1)))):
    d_layer, d_features = grad_fn(ours, x.features)
    np.testing.assert_allclose(np.asarray(d_features)[mask], want_features, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(d_features)[~mask], 0)
    for got, want in zip(_affine_grads(d_layer), _affine_grads(want_layer)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fast", [True, False])
def test_batch_norm_gradient_needs_one_array_of_temporaries(fast):
  """A jitted gradient through BatchNorm and ReLU needs one ``[capacity, C]`` array of
  temporaries: the backward pass recomputes the centred features from the layer's input instead
  of keeping them (a second array, per layer of a network, and fresh memory on every call)."""
  capacity, channels = 4096, 64
  rng = np.random.default_rng(0)
  sites = random_sites(rng, 2, (64, 64, 64), 3000)
  features = rng.standard_normal((len(sites), channels)).astype(np.float32)
  x = jsparse.SparseConvTensor(features, sites, (64, 64, 64), 2, capacity=capacity)
  weights = jnp.asarray(rng.standard_normal((capacity, channels)), jnp.float32)
  graph, state = nnx.split(spnn.BatchNorm(channels, use_fast_variance=fast, rngs=nnx.Rngs(0)))

  def loss(state, features):
    y = nnx.merge(graph, state)(x.replace(features=features))
    return jnp.sum(nnx.relu(y.features) * weights)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x.features).compile()
  arrays = compiled.memory_analysis().temp_size_in_bytes / (capacity * channels * 4)
  assert arrays < 1.5, f"{arrays:.2f} arrays of [capacity, C] float32"


def test_batch_norm_gradients_across_devices():
  """With ``axis_name`` (``jax.vmap`` standing in for devices), the gradients of every member's
  features and of the shared scale and bias are those of one layer over all active rows."""
  rng = np.random.default_rng(3)
  parts = [_tensor(rng, n, 64) for n in (10, 50, 0, 33)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(x for x, _ in parts))
  weights = jnp.asarray(rng.standard_normal((len(parts), 64, C)), jnp.float32)
  layer = spnn.BatchNorm(C, axis_name="devices", rngs=nnx.Rngs(0))
  oracle = nnx.BatchNorm(C, rngs=nnx.Rngs(0))
  _set_affine(layer, oracle)
  graph, state = nnx.split(layer)

  def loss(params, features):
    def member(params, x, w):
      return jnp.sum(nnx.merge(graph, params)(x).features * w)

    xs = stacked.replace(features=features)
    return jnp.sum(jax.vmap(member, in_axes=(None, 0, 0), axis_name="devices")(params, xs, weights))

  d_params, d_features = jax.grad(loss, argnums=(0, 1))(state, stacked.features)
  masks = [np.asarray(x.mask) for x, _ in parts]
  everything = jnp.asarray(np.concatenate([active for _, active in parts]))
  all_weights = jnp.concatenate([weights[i][m] for i, m in enumerate(masks)])
  want_layer, want_features = nnx.grad(lambda layer, f: jnp.sum(layer(f) * all_weights), argnums=(0, 1))(
    oracle, everything
  )
  for got, want in zip(_affine_grads(d_params), _affine_grads(want_layer)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  start = 0
  for mask, got in zip(masks, np.asarray(d_features)):
    np.testing.assert_allclose(got[mask], want_features[start : start + mask.sum()], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[~mask], 0)
    start += mask.sum()


def test_batch_norm_across_devices_weighs_rows_not_devices():
  """With ``axis_name``, statistics come from the active rows of every member of the axis
  (``jax.vmap`` stands in for devices here): a member with more sites weighs more."""
  rng = np.random.default_rng(2)
  parts = [_tensor(rng, n, 64) for n in (10, 50, 0, 33)]  # one member without active rows
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(x for x, _ in parts))
  layer = spnn.BatchNorm(C, momentum=0.0, axis_name="devices", rngs=nnx.Rngs(0))
  graph, state = nnx.split(layer)

  def member(state, x):
    layer = nnx.merge(graph, state)
    y = layer(x)
    return y.features, nnx.state(layer, nnx.BatchStat)

  features, stats = jax.vmap(member, in_axes=(None, 0), axis_name="devices")(state, stacked)
  everything = np.concatenate([active for _, active in parts])
  oracle = nnx.BatchNorm(C, momentum=0.0, rngs=nnx.Rngs(0))
  want = np.asarray(oracle(jnp.asarray(everything)))
  np.testing.assert_allclose(stats["mean"][...][0], oracle.mean[...], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"][...][0], oracle.var[...], rtol=1e-5, atol=1e-6)
  start = 0
  for (x, active), f in zip(parts, np.asarray(features)):
    np.testing.assert_allclose(f[np.asarray(x.mask)], want[start : start + len(active)], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(f[~np.asarray(x.mask)], 0)
    start += len(active)


def test_batch_norm_without_active_rows_keeps_its_statistics():
  layer = spnn.BatchNorm(C, rngs=nnx.Rngs(0))
  layer.mean[...] = jnp.full((C,), 3.0)
  empty = jsparse.SparseConvTensor(
    np.zeros((0, C), np.float32), np.zeros((0, 4), np.int32), SHAPE, 2, capacity=8
  )
  y = nnx.jit(lambda layer, x: layer(x))(layer, empty)
  np.testing.assert_array_equal(layer.mean[...], 3.0)
  np.testing.assert_array_equal(layer.var[...], 1.0)
  np.testing.assert_array_equal(y.features, 0)


def test_batch_norm_follows_train_eval_and_view():
  model = spnn.SparseSequential(
    spnn.SubMConv3d(C, C, 3, rngs=nnx.Rngs(0)), spnn.BatchNorm(C, rngs=nnx.Rngs(0))
  )
  model.eval()
  assert model.layers[1].use_running_average is True
  model.train()
  assert model.layers[1].use_running_average is False
  assert nnx.view(model, use_running_average=True).layers[1].use_running_average is True


def test_layer_norm_per_active_row():
  rng = np.random.default_rng(3)
  for capacity in (20, 21, 64):
    x, active = _tensor(rng, 20, capacity)
    ours, oracle = spnn.LayerNorm(C, rngs=nnx.Rngs(0)), nnx.LayerNorm(C, rngs=nnx.Rngs(0))
    for layer in (ours, oracle):
      layer.bias[...] = jnp.linspace(-1.0, 1.0, C)  # Flax's layer alone would give padding rows this
    y = nnx.jit(lambda layer, x: layer(x))(ours, x)
    np.testing.assert_allclose(y.to_numpy()[0], oracle(jnp.asarray(active)), rtol=1e-5, atol=1e-5)
    _assert_padding_zero(y)


@pytest.mark.parametrize("capacity", [30, 31, 100])
def test_group_norm_per_sample_over_its_active_rows(capacity):
  rng = np.random.default_rng(capacity)
  x, _ = _tensor(rng, 30, capacity, batch_size=3)
  ours = spnn.GroupNorm(C, num_groups=3, rngs=nnx.Rngs(0))
  oracle = nnx.GroupNorm(C, num_groups=3, rngs=nnx.Rngs(0))
  for layer in (ours, oracle):
    layer.scale[...] = jnp.linspace(0.5, 2.0, C)
    layer.bias[...] = jnp.linspace(-1.0, 1.0, C)
  y = nnx.jit(lambda layer, x: layer(x))(ours, x)
  _assert_padding_zero(y)
  features, indices = (np.asarray(a) for a in (y.features, x.indices))
  rows = np.asarray(x.features)
  for b in range(3):
    sample = indices[:, 0] == b
    if sample.any():  # Flax normalizes a dense [1, n, C] over n and the group's channels
      want = oracle(jnp.asarray(rows[sample])[None])[0]
      np.testing.assert_allclose(features[sample], want, rtol=1e-4, atol=1e-5)


def test_norms_name_what_is_wrong():
  rng = np.random.default_rng(4)
  x, _ = _tensor(rng, 5, 8)
  with pytest.raises(TypeError, match="flax.nnx.BatchNorm"):
    spnn.BatchNorm(C, rngs=nnx.Rngs(0))(x.features)
  with pytest.raises(ValueError, match=r"BatchNorm\(4\) got a tensor with 6 channels"):
    spnn.BatchNorm(4, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match="axis_name is not supported"):
    spnn.GroupNorm(C, num_groups=2, axis_name="d", rngs=nnx.Rngs(0))(x)
