"""SparseSequential runs sparse layers on tensors and Flax layers on features, masking padding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsparse
from jsparse import nn as spnn
from sparse_data import random_tensor


def test_batchnorm_statistics_ignore_padding_rows():
  rng = np.random.default_rng(0)
  x = random_tensor(rng, 2, (6, 6), 3, 20, padding_rows=7)  # padding rows hold garbage features
  bn = nnx.BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
  y = spnn.SparseSequential(bn)(x)
  active = x.to_numpy()[0]
  expected = (active - active.mean(0)) / np.sqrt(active.var(0) + bn.epsilon)
  np.testing.assert_allclose(y.to_numpy()[0], expected, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], active.mean(0), atol=1e-6)  # momentum 0: the batch mean
  assert not np.any(np.asarray(y.features)[~np.asarray(x.mask)])


def test_feature_layers_keep_padding_zero_and_todense_ends_the_chain():
  rng = np.random.default_rng(1)
  x = random_tensor(rng, 1, (5, 5, 5), 4, 30, padding_rows=5)
  rngs = nnx.Rngs(0)
  net = spnn.SparseSequential(
    spnn.SubMConv3d(4, 8, 3, rngs=rngs),
    nnx.Linear(8, 8, rngs=rngs),  # adds a bias: must not reach padding rows
    nnx.relu,
    nnx.Dropout(0.5, rngs=rngs),
    spnn.ToDense(),
    lambda d: d * 2,
  )
  out = net(x)
  assert out.shape == (1, 5, 5, 5, 8)
  net.eval()
  y = spnn.SparseSequential(*list(net.layers)[:4])(x)
  assert not np.any(np.asarray(y.features)[~np.asarray(x.mask)])
  np.testing.assert_allclose(spnn.ToDense(channels_first=True)(y), jnp.moveaxis(y.dense(), -1, 1))


def test_non_callable_layer_is_rejected():
  with pytest.raises(TypeError, match="layer 1"):
    spnn.SparseSequential(nnx.relu, 3)


def test_nested_sequential_and_jit():
  rng = np.random.default_rng(2)
  x = random_tensor(rng, 2, (8, 8), 2, 25)
  rngs = nnx.Rngs(0)
  inner = spnn.SparseSequential(spnn.SubMConv2d(2, 4, 3, indice_key="a", rngs=rngs), nnx.relu)
  net = spnn.SparseSequential(inner, spnn.SparseConv2d(4, 4, 2, 2, indice_key="down", rngs=rngs))
  eager = net(x)
  jitted = nnx.jit(lambda net, x: net(x))(net, x)
  assert set(jitted.indice_dict) == {"a", "down"}
  jsparse.check_capacity(jitted)
  np.testing.assert_allclose(jitted.to_numpy()[0], eager.to_numpy()[0], atol=1e-6)
