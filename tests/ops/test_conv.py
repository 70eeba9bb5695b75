"""sparse_conv over every map kind equals dense lax convolution, forward and both gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from jax.test_util import check_grads

import dense_oracle
from jsparse import ops
from jsparse.tensor import kernel_map
from sparse_data import random_tensor

ATOL = 1e-4
MAX_EXTENT = {1: 12, 2: 7, 3: 5, 4: 4}


@st.composite
def geometries(draw, kind):
  ndim = draw(st.integers(1, 4))
  per_axis = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(ndim))  # noqa: E731
  g = dict(
    ndim=ndim,
    shape=per_axis(2, MAX_EXTENT[ndim]),
    ksize=per_axis(1, 3),
    stride=per_axis(1, 3) if kind != "subm" else (1,) * ndim,
    padding=per_axis(0, 2) if kind != "subm" else (0,) * ndim,
    dilation=per_axis(1, 2),
    groups=draw(st.sampled_from([1, 2])),
    batch=draw(st.integers(1, 2)),
    density=draw(st.floats(0.05, 0.6)),
    padding_rows=draw(st.integers(0, 3)),
    seed=draw(st.integers(0, 2**16)),
  )
  g["c_in"] = g["groups"] * draw(st.integers(1, 3))
  g["c_out"] = g["groups"] * draw(st.integers(1, 3))
  spec = dict(kernel_size=g["ksize"], stride=g["stride"], padding=g["padding"], dilation=g["dilation"])
  try:
    g["spec"] = ops.make_spec(kind, g["shape"], **spec)
  except ValueError:  # empty output grid
    assume(False)
  return g


def _setup(g):
  rng = np.random.default_rng(g["seed"])
  count = max(1, int(g["density"] * g["batch"] * math.prod(g["shape"])))
  x = random_tensor(rng, g["batch"], g["shape"], g["c_in"], count, g["padding_rows"])
  kernel = jnp.asarray(rng.standard_normal((*g["ksize"], g["c_in"] // g["groups"], g["c_out"])), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(g["c_out"]), jnp.float32)
  return rng, x, kernel, bias


def _dense_layer(kind, g, kernel, dense):
  if kind == "subm":
    return dense_oracle.subm_conv(dense, kernel, g["dilation"], g["groups"])
  if kind == "transpose":
    return dense_oracle.conv_transpose(dense, kernel, g["stride"], g["padding"], g["dilation"], g["groups"])
  return dense_oracle.conv(dense, kernel, g["stride"], g["padding"], g["dilation"], g["groups"])


def _run_sparse(x, pairs_fn, kernel, bias, groups, rng):
  """Jitted sparse forward and gradients of ``<out, cotangent>``; map capacity static."""

  def run(features, kernel, bias, cotangent):
    pairs = pairs_fn(x.indices)
    loss = lambda f, k: jnp.sum(ops.sparse_conv(f, k, pairs, groups=groups) * cotangent)  # noqa: E731
    out = ops.sparse_conv(features, kernel, pairs, bias, groups=groups)
    return out, pairs.out_indices, jax.grad(loss, argnums=(0, 1))(features, kernel)

  out_shape = jax.eval_shape(lambda: pairs_fn(x.indices)).nbr.shape[0], kernel.shape[-1]
  cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
  return jax.jit(run)(x.features, kernel, bias, cotangent), cotangent


def _assert_matches_dense(x, pairs_fn, kernel, bias, groups, rng, dense_fn):
  """Checks outputs, padding rows and both gradients against ``dense_fn(kernel, dense)``."""
  (out, out_indices, grads), cotangent = _run_sparse(x, pairs_fn, kernel, bias, groups, rng)
  active = np.asarray(out_indices[:, 0] >= 0)
  out_sites = np.asarray(out_indices)[active]
  np.testing.assert_array_equal(np.asarray(out)[~active], 0)

  @jax.jit
  def dense_run(features, kernel):
    def loss(features, kernel):
      dense_out = dense_oracle.sample(dense_fn(kernel, x.replace(features=features).dense()), out_sites)
      return jnp.sum(dense_out * cotangent[active]), dense_out

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(features, kernel)

  want_grads, dense_out = dense_run(x.features, kernel)
  np.testing.assert_allclose(np.asarray(out)[active], dense_out + bias[None, :], atol=ATOL, rtol=0)
  for name, a, b in zip(("d_features", "d_kernel"), grads, want_grads):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=name)
  return out_sites


@pytest.mark.parametrize("kind", ["subm", "conv", "transpose"])
@given(data=st.data())
def test_conv_matches_dense(kind, data):
  g = data.draw(geometries(kind))
  rng, x, kernel, bias = _setup(g)
  spec = g["spec"]
  capacity = x.capacity * spec.kernel_volume  # static upper bound: padding rows at the end
  pairs_fn = lambda indices: ops.build_map(indices, spec, g["batch"], capacity)  # noqa: E731
  dense_fn = lambda k, d: _dense_layer(kind, g, k, d)  # noqa: E731
  out_sites = _assert_matches_dense(x, pairs_fn, kernel, bias, g["groups"], rng, dense_fn)
  if kind == "subm":
    np.testing.assert_array_equal(out_sites, x.to_numpy()[1])  # same rows, same order
  else:
    occupancy = jnp.zeros((g["batch"], *g["shape"])).at[tuple(x.to_numpy()[1].T)].set(1)
    reached = dense_oracle.reached_sites(
      occupancy, spec.kernel_size, spec.stride, spec.padding, spec.dilation, kind == "transpose"
    )
    np.testing.assert_array_equal(out_sites, reached)  # the exact active set, sorted


@given(data=st.data())
def test_inverse_conv_matches_dense_transpose(data):
  g = data.draw(geometries("conv"))
  rng, x, kernel, bias = _setup(g)
  spec = g["spec"]
  conv_pairs, _, _ = kernel_map(x, spec)  # eager: sized to fit
  features = jnp.asarray(rng.standard_normal((conv_pairs.out_capacity, g["c_in"])), jnp.float32)
  y = x.replace(features=features, indices=conv_pairs.out_indices, spatial_shape=spec.out_spatial_shape)
  pairs_fn = lambda indices: ops.invert_map(conv_pairs)  # noqa: E731

  def dense_fn(k, d):
    return dense_oracle.conv_transpose(
      d, k, g["stride"], g["padding"], g["dilation"], g["groups"], g["shape"]
    )

  out_sites = _assert_matches_dense(y, pairs_fn, kernel, bias, g["groups"], rng, dense_fn)
  np.testing.assert_array_equal(out_sites, x.to_numpy()[1])  # the conv's input rows, in order


def test_check_grads_numerically():
  rng = np.random.default_rng(0)
  x = random_tensor(rng, 2, (5, 6), 4, 20, padding_rows=3)
  pairs, _, _ = kernel_map(x, ops.make_spec("conv", x.spatial_shape, (3, 2), 2, 1))
  kernel = jnp.asarray(rng.standard_normal((3, 2, 2, 4)), jnp.float32)
  f = lambda features, kernel: ops.sparse_conv(features, kernel, pairs, groups=2)  # noqa: E731
  check_grads(f, (x.features, kernel), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
  rng = np.random.default_rng(1)
  x = random_tensor(rng, 1, (6, 6, 6), 16, 80)
  pairs, _, _ = kernel_map(x, ops.make_spec("subm", x.spatial_shape, 3))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 8)) / 8, jnp.float32)
  want = ops.sparse_conv(
    x.features.astype(dtype).astype(jnp.float32), kernel.astype(dtype).astype(jnp.float32), pairs
  )
  got = ops.sparse_conv(x.features.astype(dtype), kernel.astype(dtype), pairs)
  assert got.dtype == dtype
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(
    got.astype(jnp.float32), want, atol=4 * eps * float(jnp.max(jnp.abs(want))), rtol=0
  )
  grads = jax.grad(lambda f, k: jnp.sum(ops.sparse_conv(f, k, pairs).astype(jnp.float32)), argnums=(0, 1))(
    x.features.astype(dtype), kernel.astype(dtype)
  )
  assert [g.dtype for g in grads] == [dtype, dtype]


def test_jit_vmap_and_grad_compose():
  rng = np.random.default_rng(2)
  x = random_tensor(rng, 2, (8, 8), 3, 30, padding_rows=2)
  spec = ops.make_spec("conv", x.spatial_shape, 3, 2, 1)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
  eager_pairs, _, _ = kernel_map(x, spec)

  @jax.jit
  def run(indices, features, kernel):
    pairs = ops.build_map(indices, spec, 2, out_capacity=eager_pairs.out_capacity)
    return ops.sparse_conv(features, kernel, pairs), pairs.out_indices

  out, out_indices = run(x.indices, x.features, kernel)
  np.testing.assert_array_equal(out_indices, eager_pairs.out_indices)
  np.testing.assert_allclose(out, ops.sparse_conv(x.features, kernel, eager_pairs), atol=1e-6)

  stacked = jnp.stack([x.features, 2 * x.features])
  batched = jax.vmap(lambda f: ops.sparse_conv(f, kernel, eager_pairs))(stacked)
  np.testing.assert_allclose(batched[1], 2 * batched[0], atol=1e-5)
  grad = jax.jit(jax.grad(lambda k: jnp.sum(run(x.indices, x.features, k)[0] ** 2)))(kernel)
  assert grad.shape == kernel.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_bad_arguments_are_explained():
  rng = np.random.default_rng(3)
  x = random_tensor(rng, 1, (4, 4), 4, 5)
  pairs, _, _ = kernel_map(x, ops.make_spec("subm", x.spatial_shape, 3))
  with pytest.raises(ValueError, match="kernel_size"):
    ops.sparse_conv(x.features, jnp.ones((2, 2, 4, 4)), pairs)
  with pytest.raises(ValueError, match="groups"):
    ops.sparse_conv(x.features, jnp.ones((3, 3, 4, 3)), pairs, groups=2)
  with pytest.raises(ValueError, match="one dtype"):
    ops.sparse_conv(x.features, jnp.ones((3, 3, 4, 4), jnp.bfloat16), pairs)
  with pytest.raises(ValueError, match="capacity_in"):
    ops.sparse_conv(x.features[:3], jnp.ones((3, 3, 4, 4)), pairs)
  with pytest.raises(ValueError, match="empty"):
    ops.make_spec("conv", (2, 2), 5)
  with pytest.raises(ValueError, match="kernel_size"):
    ops.make_spec("conv", (4, 4), (3, 3, 3))


@ops.backend("reference")  # the FFI kernels always multiply in full float32
def test_precision_is_passed_to_the_matmuls():
  rng = np.random.default_rng(4)
  x = random_tensor(rng, 1, (6, 6), 8, 20)
  pairs, _, _ = kernel_map(x, ops.make_spec("subm", x.spatial_shape, 3))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
  lowered = jax.jit(lambda f, k: ops.sparse_conv(f, k, pairs, precision="highest")).lower(x.features, kernel)
  assert "HIGHEST" in lowered.as_text().upper()
  with jax.default_matmul_precision("default"):
    plain = jax.jit(lambda f, k: ops.sparse_conv(f, k, pairs)).lower(x.features, kernel)
  assert "HIGHEST" not in plain.as_text().upper()
