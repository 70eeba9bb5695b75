"""Data parallelism with JAX's own machinery: a shard_map train step over 4 host devices gives
the loss, gradients and BatchNorm statistics of one device on the whole batch.

The step runs in a subprocess (XLA's host device count is fixed when jax starts). Each device
gets one sample and builds its own kernel maps; BatchNorm adds its statistics over the mesh
axis; the loss is summed over the axis (``psum``), so its gradient with respect to the
replicated parameters is the whole batch's.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
  """
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import sys
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from flax import nnx
  import jsparse
  from jsparse import nn as spnn

  class Net(nnx.Module):
    def __init__(self, axis_name, rngs):
      self.stem = spnn.SubMConv3d(4, 8, 3, indice_key="s", rngs=rngs)
      self.norm = spnn.BatchNorm(8, axis_name=axis_name, rngs=rngs)
      self.down = spnn.SparseConv3d(8, 8, 3, 2, 1, indice_key="d", rngs=rngs)
      self.pool = spnn.SparseMaxPool3d(2)
      self.up = spnn.SparseInverseConv3d(8, 3, 3, indice_key="d", rngs=rngs)

    def __call__(self, x):
      h = self.norm(self.stem(x))
      h = self.down(h.replace_feature(nnx.relu(h.features)))
      pooled = self.pool(h)
      return self.up(h), jnp.sum(pooled.features)

  rng = np.random.default_rng(0)
  samples = []
  for n in (90, 140, 60, 200):  # each device's sample has its own number of sites
    sites = np.unique(rng.integers(0, 16, (n, 3)), axis=0)
    samples.append((rng.standard_normal((len(sites), 4)).astype(np.float32), sites))

  def loss_of(model, x):
    y, pooled = model(x)
    return jnp.sum(jnp.where(y.mask[:, None], y.features ** 2, 0)) / 100.0 + pooled / 100.0, y

  # One device, the whole batch: batch_size 4.
  indices = np.concatenate([np.c_[np.full(len(s), b), s] for b, (_, s) in enumerate(samples)])
  features = np.concatenate([f for f, _ in samples])
  whole = jsparse.SparseConvTensor(features, indices.astype(np.int32), (16, 16, 16), 4, capacity=1024)
  single = Net(None, nnx.Rngs(0))
  (loss_1, _), grads_1 = nnx.value_and_grad(loss_of, has_aux=True)(single, whole)

  # Four devices, a sample each, stacked on a leading axis that the mesh splits.
  mesh = jax.make_mesh((4,), ("data",))
  shards = [
    jsparse.SparseConvTensor(f, np.c_[np.zeros(len(s)), s].astype(np.int32), (16, 16, 16), 1, capacity=256)
    for f, s in samples
  ]
  x = jax.device_put(jax.tree.map(lambda *a: jnp.stack(a), *shards), NamedSharding(mesh, P("data")))
  model = Net("data", nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  graph, state = nnx.split((model, optimizer))
  state = jax.device_put(state, NamedSharding(mesh, P()))

  def per_device(state, x):
    model, optimizer = nnx.merge(graph, state)
    x = jax.tree.map(lambda a: a[0], x)

    def loss_fn(model):
      local, y = loss_of(model, x)
      return jax.lax.psum(local, "data"), y

    (loss, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    overflow = jax.tree.map(lambda r: jax.lax.pmax(r, "data"), y.overflow)
    return loss, grads, overflow, nnx.state((model, optimizer))

  step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))
  loss_4, grads_4, overflow, state = step(state, x)
  jsparse.check_capacity(overflow)
  nnx.update((model, optimizer), state)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_4, grads_1)
  np.testing.assert_allclose(model.norm.mean[...], single.norm.mean[...], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(model.norm.var[...], single.norm.var[...], rtol=1e-5, atol=1e-7)
  print("same", float(loss_4), float(loss_1))
  """
)


def test_shard_map_step_on_four_devices_equals_one_device():
  result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("same")
