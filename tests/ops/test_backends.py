"""The FFI kernels against the reference path: identical kernel maps, matching convolutions.

The reference path is itself checked against dense convolution in test_conv.py; here every FFI
result must equal it (maps bitwise, convolutions to float32 rounding) for every map kind, ndim 1-4,
dtypes, groups and gradients. Skips when the CPU extension is not built.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import jsparse
from jsparse import _ffi, ops
from sparse_data import random_sites

pytestmark = pytest.mark.skipif(not _ffi.built("cpu"), reason="the C++ extension is not built")

MAX_EXTENT = {1: 16, 2: 8, 3: 6, 4: 4}


def _both_backends(fn, *args):
  """``fn(*args)`` jitted and run on each backend; a fresh function per backend, since jit caches
  traces per function object and the backend is read when tracing."""
  results = []
  for name in ("ffi", "reference"):
    with jsparse.backend(name):
      results.append(jax.block_until_ready(jax.jit(lambda *a: fn(*a))(*args)))
  return results


@st.composite
def map_cases(draw):
  kind = draw(st.sampled_from(["subm", "conv", "pool", "transpose"]))
  ndim = draw(st.integers(1, 4))
  per_axis = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(ndim))  # noqa: E731
  shape = per_axis(2, MAX_EXTENT[ndim])
  try:
    spec = ops.make_spec(
      kind, shape, per_axis(1, 4 if kind == "subm" else 3), per_axis(1, 3), per_axis(0, 2), per_axis(1, 2)
    )
  except ValueError:  # empty output grid
    assume(False)
  batch = draw(st.integers(1, 3))
  density = draw(st.floats(0.02, 0.7))
  flags = draw(st.booleans()), draw(st.booleans())
  return spec, batch, density, draw(st.integers(0, 4)), draw(st.integers(0, 2**16)), *flags


@given(map_cases())
def test_maps_are_identical(case):
  spec, batch, density, padding_rows, seed, tight, in_order = case
  rng = np.random.default_rng(seed)
  count = max(1, int(density * batch * math.prod(spec.in_spatial_shape)))
  sites = random_sites(rng, batch, spec.in_spatial_shape, count)
  indices = np.concatenate([sites, np.full((padding_rows, sites.shape[1]), -1, np.int32)])
  indices = indices[rng.permutation(len(indices))]
  if in_order:  # sites sorted by (batch, coords) between the padding rows (the CPU kernels' fast path)
    active = indices[:, 0] >= 0
    indices[active] = indices[active][np.lexsort(indices[active].T[::-1])]
  indices = jnp.asarray(indices)
  capacity = None
  if spec.kind != "subm":
    capacity = ops.default_capacity(spec, indices.shape[0])
    if tight:  # fewer rows than sites: both backends keep the first ones and count the rest
      capacity = max(1, capacity // 3)
  ffi, reference = _both_backends(lambda i: ops.build_map(i, spec, batch, capacity), indices)
  assert jax.tree.structure(ffi) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(ffi), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_rows_are_inactive_and_never_read():
  """Out-of-grid or out-of-batch rows (possible under jit) neither crash nor produce pairs."""
  idx = jnp.array([[0, 1, 1], [5, 0, 0], [0, 9, 2], [0, -3, 1], [-7, 1, 1], [0, 1, 2]], jnp.int32)
  for kind in ("subm", "conv"):
    spec = ops.make_spec(kind, (4, 4), 3, 1, 1)
    with jsparse.backend("ffi"):
      pairs = jax.jit(lambda i, s=spec: ops.build_map(i, s, 1, 8))(idx)
    nbr = np.asarray(pairs.nbr)
    assert nbr.min() >= -1 and nbr.max() < idx.shape[0]
    assert not np.isin(nbr, [1, 2, 3, 4]).any()  # bad rows are never anyone's source


def test_repeated_sites_under_jit_map_to_their_first_row():
  """Under jit (sites unchecked) a repeated site resolves to its first row on both backends, and
  the FFI map is the same on every run (its symmetric path then falls back to atomic minima)."""
  idx = jnp.array([[0, 1, 1], [0, 1, 2], [0, 2, 1], [0, 1, 1], [0, 1, 2]], jnp.int32)  # rows 3, 4 repeat
  for kind in ("subm", "conv"):
    spec = ops.make_spec(kind, (4, 4), 3, 1, 1)
    ffi, reference = _both_backends(lambda i, s=spec: ops.build_map(i, s, 1, 8), idx)
    again, _ = _both_backends(lambda i, s=spec: ops.build_map(i, s, 1, 8), idx)
    np.testing.assert_array_equal(ffi.nbr, again.nbr)
    first = np.asarray(ffi.out_indices[:, 0] >= 0)
    if kind == "subm":  # rows 0-2 are first copies: their maps agree
      np.testing.assert_array_equal(ffi.nbr[:3], reference.nbr[:3])
      assert set(np.asarray(ffi.nbr[:3]).ravel()) <= {-1, 0, 1, 2}
    else:
      np.testing.assert_array_equal(ffi.nbr[first], reference.nbr[first])
      assert set(np.asarray(ffi.nbr).ravel()) <= {-1, 0, 1, 2}


CONV_TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  "kind,groups", [("subm", 1), ("subm", 2), ("conv", 2), ("transpose", 1), ("subm", 5)]
)
def test_conv_and_gradients_match(dtype, kind, groups):
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

  ffi, reference = _both_backends(run, features, kernel)
  for a, b in zip(ffi, reference):
    assert a.dtype == b.dtype == dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=CONV_TOLERANCE[dtype], atol=CONV_TOLERANCE[dtype] * np.abs(b).max())


@pytest.mark.parametrize("c_in,c_out", [(8, 16), (5, 3)])
def test_weight_gradient_over_many_row_ranges(c_in, c_out):
  # The FFI kernel gradient sums per-range partials (ranges of at least 4096 rows) in a tree: 11
  # ranges here, the last ones all padding rows (no pairs at all), in the one-pass submanifold
  # backward (8, 16) and in the separate weight gradient's copying path (5, 3).
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

  ffi, reference = (np.asarray(g) for g in _both_backends(d_kernel, features, kernel))
  np.testing.assert_allclose(ffi, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_pools_and_gradients_are_identical(dtype, pool):
  rng = np.random.default_rng(11)
  shape, batch = (7, 6, 5), 2
  indices = np.concatenate([random_sites(rng, batch, shape, 120), np.full((5, 4), -1, np.int32)])
  spec = ops.make_spec("pool", shape, (3, 2, 3), 2, 1)
  # Coarse values make ties common, so the tie rule is exercised as well.
  features = jnp.asarray(rng.integers(-3, 4, (indices.shape[0], 6)), dtype)
  pairs = ops.build_map(jnp.asarray(indices), spec, batch, indices.shape[0])
  cotangent = jnp.asarray(rng.standard_normal((pairs.out_capacity, 6)), dtype)
  op = ops.sparse_max_pool if pool == "max" else ops.sparse_avg_pool

  def run(f):
    out, vjp = jax.vjp(lambda f: op(f, pairs), f)
    return out, *vjp(cotangent)

  for a, b in zip(*_both_backends(run, features)):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_empty_and_all_padding_inputs():
  spec = ops.make_spec("conv", (5, 5), 3, 2, 1)
  kernel = jnp.ones((3, 3, 3, 2))
  for indices in (jnp.zeros((0, 3), jnp.int32), jnp.full((6, 3), -1, jnp.int32)):
    pairs, reference = _both_backends(lambda i: ops.build_map(i, spec, 1, 4), indices)
    assert int(pairs.num_out) == 0
    np.testing.assert_array_equal(pairs.nbr, reference.nbr)
    features = jnp.ones((indices.shape[0], 3))
    with jsparse.backend("ffi"):
      out = ops.sparse_conv(features, kernel, pairs)
      grad = jax.grad(lambda f, p=pairs: jnp.sum(ops.sparse_conv(f, kernel, p)))(features)
    assert not np.asarray(out).any() and not np.asarray(grad).any()


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
  spec = ops.make_spec("subm", (4, 4), 3)
  attrs = ops._kmap._geometry_attrs(spec, 1)
  neighbors = jax.ffi.ffi_call(
    "jsparse_kmap_neighbors",
    (jax.ShapeDtypeStruct((4, 9), jnp.int32), jax.ShapeDtypeStruct((0, 9), jnp.int32)),
    vmap_method="sequential",
  )
  with pytest.raises(Exception, match=r"int32 \[N, 1 \+ ndim\]"):
    neighbors(jnp.zeros((4, 3), jnp.float32), jnp.zeros((4, 3), jnp.int32), symmetric=np.int64(0), **attrs)
  with pytest.raises(Exception, match="one entry per spatial dim"):
    bad = dict(attrs, stride=np.ones(3, np.int64))
    neighbors(jnp.zeros((4, 3), jnp.int32), jnp.zeros((4, 3), jnp.int32), symmetric=np.int64(0), **bad)
  down = ops.make_spec("conv", (4, 4), 3, 2, 1)
  build = jax.ffi.ffi_call(
    "jsparse_kmap_build",
    (
      jax.ShapeDtypeStruct((4, 3), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct((4, 8), jnp.int32),
      jax.ShapeDtypeStruct((4, 9), jnp.int32),
    ),
    vmap_method="sequential",
  )
  with pytest.raises(Exception, match=r"nbr \[capacity, K\] must be int32 with K = 9"):
    build(jnp.zeros((4, 3), jnp.int32), **ops._kmap._geometry_attrs(down, 1))
  pool_max = jax.ffi.ffi_call(
    "jsparse_pool_max",
    (jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((4, 3), jnp.int32)),
    vmap_method="sequential",
  )
  with pytest.raises(Exception, match=r"nbr must be an int32 kernel map"):
    pool_max(features, nbr.astype(jnp.float32))
  avg_grad = jax.ffi.ffi_call(
    "jsparse_pool_avg_grad", jax.ShapeDtypeStruct((4, 3), jnp.float32), vmap_method="sequential"
  )
  with pytest.raises(Exception, match=r"must be float32"):
    avg_grad(features.astype(jnp.bfloat16), nbr)

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
def test_backward_symmetric_equals_the_separate_kernels(dtype, c_in, c_out, groups, one_pass):
  """One target for both gradients of an odd submanifold map, whatever the dtype and channels:
  the kernel picks its path. The input gradient is the separate gather-GEMM's (reversed taps)
  bit for bit; so is the kernel gradient, except on the one-pass path, which sums its pairs in
  input-row order instead of output-row order (equal up to rounding)."""
  rng = np.random.default_rng(3)
  sites = random_sites(rng, 2, (9, 8, 7), 300)
  indices = jnp.asarray(np.concatenate([sites, np.full((7, 4), -1, np.int32)]))
  pairs = ops.build_map(indices, ops.make_spec("subm", (9, 8, 7), 3), 2)
  x = jnp.asarray(rng.standard_normal((indices.shape[0], c_in)), dtype)
  dy = jnp.asarray(rng.standard_normal((indices.shape[0], c_out)), dtype)
  kernel = jnp.asarray(rng.standard_normal((27, c_in // groups, c_out)), dtype)
  kernel_t = ops._conv._transpose_kernel(kernel, groups)
  with jsparse.backend("ffi"):
    one = jax.jit(ops._conv._backward_symmetric, static_argnums=(4, 5, 6))(
      x, dy, kernel_t, pairs.nbr, groups, None, kernel.shape
    )
    d_features = jax.jit(ops._conv._gather_gemm, static_argnums=(3, 4, 5))(
      dy, kernel_t, pairs.nbr, groups, None, True
    )
    weight_grad = jax.jit(ops._conv._weight_grad, static_argnums=(3, 4, 5))
    d_kernel = weight_grad(x, dy, pairs.nbr, groups, None, kernel.shape)
  np.testing.assert_array_equal(np.asarray(one[0], np.float32), np.asarray(d_features, np.float32))
  if one_pass:
    np.testing.assert_allclose(one[1], d_kernel, rtol=1e-5, atol=1e-4)
  else:
    np.testing.assert_array_equal(np.asarray(one[1], np.float32), np.asarray(d_kernel, np.float32))


ISA_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, jsparse
from jsparse import ops
rng = np.random.default_rng(0)
flat = rng.choice(2 * 9**3, 300, replace=False)
idx = jnp.asarray(np.stack(np.unravel_index(flat, (2, 9, 9, 9)), 1), jnp.int32)
pairs = ops.build_map(idx, ops.make_spec("subm", (9, 9, 9), 3), 2)
f = jnp.asarray(rng.standard_normal((300, 24)), jnp.float32)
out = {"ffi": [], "reference": []}
for c_out in (40, 48):  # 48: the one-pass submanifold backward; 40: the separate kernels, padded columns
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 24, c_out)) / 24, jnp.float32)
  for name in ("ffi", "reference"):
    with jsparse.backend(name):
      loss = lambda f, k: jnp.sum(jnp.sin(ops.sparse_conv(f, k, pairs)))
      run = jax.jit(lambda f, k: jax.value_and_grad(loss, argnums=(0, 1))(f, k))
      value, grads = run(f, k)
      out[name] += [np.asarray(a) for a in (value, *grads)]
for a, b in zip(out["ffi"], out["reference"]):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
print(jsparse.build_info()["cpu_isa"])
"""


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_fallback_instruction_sets(isa):
  """The portable and AVX2 micro-kernels (picked on CPUs without AVX-512) give the same results."""
  env = dict(os.environ, JSPARSE_CPU_ISA=isa)
  out = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] in (isa, "portable")  # avx2 needs a CPU that has it


def test_vmap_over_features_and_maps():
  rng = np.random.default_rng(11)
  spec = ops.make_spec("conv", (6, 6), 3, 2, 1)
  indices = jnp.stack([jnp.asarray(random_sites(rng, 1, (6, 6), 14)) for _ in range(3)])
  features = jnp.asarray(rng.standard_normal((3, 14, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)

  def one(i, f):
    pairs = ops.build_map(i, spec, 1, 16)
    return ops.sparse_conv(f, kernel, pairs), jax.grad(
      lambda f: jnp.sum(ops.sparse_conv(f, kernel, pairs) ** 2)
    )(f)

  batched = jax.vmap(one)
  ffi, reference = _both_backends(batched, indices, features)
  for a, b in zip(ffi, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for s in range(3):  # each vmapped slice equals the unbatched call
    with jsparse.backend("ffi"):
      single = one(indices[s], features[s])
    np.testing.assert_allclose(ffi[0][s], single[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["ffi", "reference"])
def test_submanifold_map_for_other_outputs_stores_its_transpose(backend):
  """With outputs other than the inputs, nbr_t is not nbr with reversed taps: it must be stored."""
  rng = np.random.default_rng(5)
  spec = ops.make_spec("subm", (6, 6, 6), 3)
  indices = jnp.asarray(random_sites(rng, 1, (6, 6, 6), 60))
  outputs = indices[::2]
  with jsparse.backend(backend):
    pairs = ops.map_for_outputs(indices, outputs, jnp.int32(outputs.shape[0]), spec, 1)
  nbr, nbr_t = np.asarray(pairs.nbr), np.asarray(pairs.transpose_nbr)
  assert nbr_t.shape == (indices.shape[0], 27) and (nbr >= 0).sum() == (nbr_t >= 0).sum() > 0
  for o, k in zip(*np.nonzero(nbr >= 0)):
    assert nbr_t[nbr[o, k], k] == o
