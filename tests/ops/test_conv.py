"""sparse_conv over every map kind equals dense lax convolution, forward and both gradients; the FFI
kernels equal the reference path (to float32 rounding) for dtypes, groups, gradients and empty maps;
the handlers' errors."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from jax.test_util import check_grads

import dense_oracle
import jsparse
from jsparse import _ffi, ops
from jsparse.tensor import kernel_map
from sparse_data import LARGE_CHANNELS, both_backends, large_scene, needs_ffi, random_sites, random_tensor

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


# ---- the FFI kernels against the reference path ---------------------------------------------------

CONV_TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  "kind,groups", [("subm", 1), ("subm", 2), ("conv", 2), ("transpose", 1), ("subm", 5)]
)
def test_conv_and_gradients_match(ffi_device, dtype, kind, groups):
  rng = np.random.default_rng(7)
  shape, batch = (7, 6, 5), 2
  indices = jnp.asarray(random_sites(rng, batch, shape, 120))
  spec = ops.make_spec(kind, shape, (3, 2, 3) if kind != "subm" else 3, 2 if kind != "subm" else 1, 1)
  # Channels per group that fill whole micro-kernel blocks (8 in, 16 out) take, in float32, the
  # one-pass backward of odd submanifold maps (subm, groups 1 and 2) or the weight gradient's
  # in-place path (conv); 5 per group and the other dtypes take the separate, copying kernels.
  c_in, c_out = {1: (24, 48), 2: (32, 32), 5: (25, 25)}[groups]
  features = jnp.asarray(rng.standard_normal((indices.shape[0], c_in)), dtype)
  kernel = jnp.asarray(rng.standard_normal((*spec.kernel_size, c_in // groups, c_out)) / c_in, dtype)
  pairs = ops.build_map(indices, spec, batch, ops.default_capacity(spec, indices.shape[0]))
  cotangent = jnp.asarray(rng.standard_normal((pairs.out_capacity, c_out)), dtype)

  def run(f, k):
    out, vjp = jax.vjp(lambda f, k: ops.sparse_conv(f, k, pairs, groups=groups, precision="highest"), f, k)
    return out, *vjp(cotangent)

  ffi, reference = both_backends(run, features, kernel, device=ffi_device)
  again, _ = both_backends(run, features, kernel, device=ffi_device)
  for a, b, c in zip(ffi, reference, again):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))  # deterministic
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=CONV_TOLERANCE[dtype], atol=CONV_TOLERANCE[dtype] * np.abs(b).max())


@pytest.mark.parametrize("c_in,c_out", [(8, 16), (5, 3)])
def test_weight_gradient_over_many_row_ranges(ffi_device, c_in, c_out):
  # The FFI kernel gradient sums per-range partials (ranges of at least 4096 rows) in a tree: 11
  # ranges here, the last ones all padding rows (no pairs at all), in the one-pass submanifold
  # backward (8, 16) and in the separate weight gradient's copying path (5, 3). The CUDA kernel
  # sums up to 32 chunks of rows, here 32 of 1408 rows.
  rng = np.random.default_rng(3)
  shape = (40, 40, 40)
  sites = random_sites(rng, 1, shape, 30000)
  sites = sites[np.lexsort(sites.T[::-1])]  # sorted, so that ranges differ in their taps' pairs
  indices = jnp.asarray(np.concatenate([sites, np.full((45000 - len(sites), 4), -1, np.int32)]))
  pairs = ops.build_map(indices, ops.make_spec("subm", shape, 3), 1)
  features = jnp.asarray(rng.standard_normal((indices.shape[0], c_in)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, c_in, c_out)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((indices.shape[0], c_out)), jnp.float32)

  def d_kernel(f, k):
    return jax.vjp(lambda k: ops.sparse_conv(f, k, pairs, precision="highest"), k)[1](cotangent)[0]

  ffi, reference = (np.asarray(g) for g in both_backends(d_kernel, features, kernel, device=ffi_device))
  np.testing.assert_allclose(ffi, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_empty_and_all_padding_inputs(ffi_device):
  spec = ops.make_spec("conv", (5, 5), 3, 2, 1)
  kernel = jax.device_put(jnp.ones((3, 3, 3, 2)), ffi_device)
  for indices in (jnp.zeros((0, 3), jnp.int32), jnp.full((6, 3), -1, jnp.int32)):
    pairs, reference = both_backends(lambda i: ops.build_map(i, spec, 1, 4), indices, device=ffi_device)
    assert int(pairs.num_out) == 0
    np.testing.assert_array_equal(pairs.nbr, reference.nbr)
    features = jax.device_put(jnp.ones((indices.shape[0], 3)), ffi_device)
    with jsparse.backend("ffi"):
      out = ops.sparse_conv(features, kernel, pairs)
      grad = jax.grad(lambda f, p=pairs: jnp.sum(ops.sparse_conv(f, kernel, p)))(features)
    assert not np.asarray(out).any() and not np.asarray(grad).any()


@needs_ffi
def test_handlers_reject_bad_arguments():
  _ffi.targets("cpu")
  features = jnp.ones((4, 3), jnp.float32)
  nbr = jnp.zeros((4, 9), jnp.int32)
  call = lambda shape, dtype, *args, **attrs: jax.ffi.ffi_call(  # noqa: E731
    "jsparse_conv_gather_gemm", jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential"
  )(*args, reverse_taps=np.int64(0), **attrs)
  with pytest.raises(Exception, match="same dtype"):
    call((4, 2), jnp.float32, features, jnp.ones((9, 3, 2), jnp.bfloat16), nbr, groups=np.int64(1))
  with pytest.raises(Exception, match="divisible by groups"):
    call((4, 2), jnp.float32, features, jnp.ones((9, 3, 2)), nbr, groups=np.int64(2))
  with pytest.raises(Exception, match="nbr must be int32"):
    call((4, 2), jnp.float32, features, jnp.ones((9, 3, 2)), nbr[:, :5], groups=np.int64(1))
  with pytest.raises(Exception, match="float32, bfloat16 or float16"):
    call(
      (4, 2), jnp.int32, features.astype(jnp.int32), jnp.ones((9, 3, 2), jnp.int32), nbr, groups=np.int64(1)
    )

  def backward(x, dy, kernel_t, rows, dtype=jnp.float32):  # d_kernel shaped [9, C_in, C_out]
    out = (jax.ShapeDtypeStruct(x.shape, dtype), jax.ShapeDtypeStruct((9, x.shape[1], dy.shape[1]), dtype))
    fn = jax.ffi.ffi_call("jsparse_conv_backward_symmetric", out, vmap_method="sequential")
    return jax.block_until_ready(fn(x, dy, kernel_t, rows, groups=np.int64(1)))

  x, dy, kernel_t = jnp.ones((4, 8)), jnp.ones((4, 16)), jnp.ones((9, 16, 8))
  backward(x, dy, kernel_t, nbr)  # well formed
  with pytest.raises(Exception, match="must have the features' dtype"):
    backward(x, dy.astype(jnp.bfloat16), kernel_t, nbr)
  with pytest.raises(Exception, match="expects a submanifold map"):
    backward(x, dy[:3], kernel_t, nbr[:3])


@needs_ffi
@pytest.mark.parametrize(
  ("dtype", "c_in", "c_out", "groups", "one_pass"),
  [
    (jnp.float32, 16, 32, 1, True),  # channel blocks that fill the micro-kernel's: one pass
    (jnp.float32, 16, 32, 2, True),
    (jnp.float32, 6, 10, 1, False),
    (jnp.bfloat16, 16, 32, 1, False),
    (jnp.float16, 8, 16, 1, False),
  ],
)
def test_backward_symmetric_equals_the_separate_kernels(ffi_device, dtype, c_in, c_out, groups, one_pass):
  """One target for both gradients of an odd submanifold map, whatever the dtype and channels:
  the kernel picks its path. The input gradient is the separate gather-GEMM's (reversed taps)
  bit for bit; so is the kernel gradient, except on the one-pass path, which sums its pairs in
  input-row order instead of output-row order (equal up to rounding). CUDA has no one-pass path."""
  rng = np.random.default_rng(3)
  sites = random_sites(rng, 2, (9, 8, 7), 300)
  indices = jnp.asarray(np.concatenate([sites, np.full((7, 4), -1, np.int32)]))
  pairs = ops.build_map(indices, ops.make_spec("subm", (9, 8, 7), 3), 2)
  x = jnp.asarray(rng.standard_normal((indices.shape[0], c_in)), dtype)
  dy = jnp.asarray(rng.standard_normal((indices.shape[0], c_out)), dtype)
  kernel = jnp.asarray(rng.standard_normal((27, c_in // groups, c_out)), dtype)
  kernel_t = ops._conv._transpose_kernel(kernel, groups)
  x, dy, kernel_t, nbr = jax.device_put((x, dy, kernel_t, pairs.nbr), ffi_device)
  one_pass = one_pass and ffi_device.platform == "cpu"
  with jsparse.backend("ffi"):
    one = jax.jit(ops._conv._backward_symmetric, static_argnums=(4, 5, 6))(
      x, dy, kernel_t, nbr, groups, None, kernel.shape
    )
    d_features = jax.jit(ops._conv._gather_gemm, static_argnums=(3, 4, 5))(
      dy, kernel_t, nbr, groups, None, True
    )
    weight_grad = jax.jit(ops._conv._weight_grad, static_argnums=(3, 4, 5))
    d_kernel = weight_grad(x, dy, nbr, groups, None, kernel.shape)
  np.testing.assert_array_equal(np.asarray(one[0], np.float32), np.asarray(d_features, np.float32))
  if one_pass:
    np.testing.assert_allclose(one[1], d_kernel, rtol=1e-5, atol=1e-4)
  else:
    np.testing.assert_array_equal(np.asarray(one[1], np.float32), np.asarray(d_kernel, np.float32))


# ---- large scenes ------------------------------------------------------------------------------------


def test_rows_past_int32_element_offsets(ffi_device, large_memory):
  """Rows that start past 2**31 elements (bfloat16 features [2**24 + 64, 128]): the FFI forward and
  kernel gradient equal numpy on the 48 rows the map reads. (The reference path gathers rows with
  XLA, see test_gather.py; its scan over taps copies the whole features, too much here. The input
  gradient would be another 4.3 GB: the kernel gradient's target is called directly.)"""
  rng = np.random.default_rng(5)
  features, pairs, gathered, _ = large_scene(rng, out_rows=40, taps=4)
  kernel = jnp.asarray(rng.standard_normal((4, LARGE_CHANNELS, 16)) / 16, jnp.bfloat16)
  d_out = jnp.asarray(rng.standard_normal((40, 16)), jnp.bfloat16)
  features, pairs, kernel, d_out = jax.device_put((features, pairs, kernel, d_out), ffi_device)
  weight_grad = functools.partial(ops._conv._weight_grad, groups=1, precision=None, kernel_shape=kernel.shape)
  with jsparse.backend("ffi"):
    out = ops.sparse_conv(features, kernel, pairs)
    d_kernel = jax.jit(weight_grad)(features, d_out, pairs.nbr)
  expected = np.einsum("okc,kcd->od", gathered, np.asarray(kernel, np.float32))
  expected_d_kernel = np.einsum("okc,od->kcd", gathered, np.asarray(d_out, np.float32))
  for got, want in ((out, expected), (d_kernel, expected_d_kernel)):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
