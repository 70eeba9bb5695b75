"""Kernel maps: the FFI kernels' maps equal the reference path's bitwise for every map kind, ndim 1-4,
padding and capacity; bad and repeated rows under jit; stored transposes; the handlers' errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import jsparse
from jsparse import _ffi, ops
from sparse_data import both_backends, needs_ffi, platform_device, random_sites

MAX_EXTENT = {1: 16, 2: 8, 3: 6, 4: 4}


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


@pytest.mark.parametrize("platform", _ffi.PLATFORMS)
@given(map_cases())
def test_maps_are_identical(platform, case):
  device = platform_device(platform)
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
  ffi, reference = both_backends(lambda i: ops.build_map(i, spec, batch, capacity), indices, device=device)
  assert jax.tree.structure(ffi) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(ffi), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_rows_are_inactive_and_never_read(ffi_device):
  """Out-of-grid or out-of-batch rows (possible under jit) neither crash nor produce pairs or sites,
  on either backend: not even [0, 0, 5], whose packed key is that of site (1, 1), nor
  [0, -2**31 + 1, 1], whose transposed taps reach the grid once int32 arithmetic wraps."""
  idx = jnp.array(
    [[0, 1, 1], [5, 0, 0], [0, 9, 2], [0, -3, 1], [-7, 1, 1], [0, 0, 5], [0, -(2**31) + 1, 1], [0, 1, 2]],
    jnp.int32,
  )
  bad = [1, 2, 3, 4, 5, 6]
  for kind in ("subm", "conv", "transpose"):
    spec = ops.make_spec(kind, (4, 4), 3, 2 if kind == "transpose" else 1, 1)
    pairs = both_backends(lambda i, s=spec: ops.build_map(i, s, 1, 16), idx, device=ffi_device)
    for p in pairs:
      nbr = np.asarray(p.nbr)
      assert nbr.min() >= -1 and nbr.max() < idx.shape[0]
      assert not np.isin(nbr, bad).any()  # bad rows are never anyone's source
    np.testing.assert_array_equal(pairs[0].out_indices, pairs[1].out_indices)
    np.testing.assert_array_equal(pairs[0].nbr, pairs[1].nbr)
    if kind == "transpose":  # the two good rows reach 3 x 5 sites
      assert int(pairs[0].num_out) == int(pairs[1].num_out) == 15


def test_repeated_sites_under_jit_map_to_their_first_row(ffi_device):
  """Under jit (sites unchecked) a repeated site resolves to its first row on both backends, and
  the FFI map is the same on every run (its symmetric path then falls back to atomic minima)."""
  idx = jnp.array([[0, 1, 1], [0, 1, 2], [0, 2, 1], [0, 1, 1], [0, 1, 2]], jnp.int32)  # rows 3, 4 repeat
  for kind in ("subm", "conv"):
    spec = ops.make_spec(kind, (4, 4), 3, 1, 1)
    ffi, reference = both_backends(lambda i, s=spec: ops.build_map(i, s, 1, 8), idx, device=ffi_device)
    again, _ = both_backends(lambda i, s=spec: ops.build_map(i, s, 1, 8), idx, device=ffi_device)
    np.testing.assert_array_equal(ffi.nbr, again.nbr)
    first = np.asarray(ffi.out_indices[:, 0] >= 0)
    if kind == "subm":  # rows 0-2 are first copies: their maps agree
      np.testing.assert_array_equal(ffi.nbr[:3], reference.nbr[:3])
      assert set(np.asarray(ffi.nbr[:3]).ravel()) <= {-1, 0, 1, 2}
    else:
      np.testing.assert_array_equal(ffi.nbr[first], reference.nbr[first])
      assert set(np.asarray(ffi.nbr).ravel()) <= {-1, 0, 1, 2}


def test_submanifold_map_for_other_outputs_stores_its_transpose(backend):
  """With outputs other than the inputs, nbr_t is not nbr with reversed taps: it must be stored."""
  rng = np.random.default_rng(5)
  spec = ops.make_spec("subm", (6, 6, 6), 3)
  indices = jnp.asarray(random_sites(rng, 1, (6, 6, 6), 60))
  outputs = indices[::2]
  pairs = ops.map_for_outputs(indices, outputs, jnp.int32(outputs.shape[0]), spec, 1)
  nbr, nbr_t = np.asarray(pairs.nbr), np.asarray(pairs.transpose_nbr)
  assert nbr_t.shape == (indices.shape[0], 27) and (nbr >= 0).sum() == (nbr_t >= 0).sum() > 0
  for o, k in zip(*np.nonzero(nbr >= 0)):
    assert nbr_t[nbr[o, k], k] == o


@needs_ffi
def test_handlers_reject_bad_arguments():
  _ffi.targets("cpu")
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


# ---- large scenes ------------------------------------------------------------------------------------


def test_sizes_past_32_bit_numbers_are_refused_before_running(backend):
  """Rows are numbered with int32 and a created map's N_in x K candidate pairs with 32 bits: larger
  shapes raise at trace time, on either backend, naming the sizes (nothing is allocated here)."""
  spec = ops.make_spec("conv", (64, 64, 64), 3, 2, 1)  # K = 27
  many = jax.ShapeDtypeStruct((2**32 // 27 + 1, 4), jnp.int32)  # N x K just past 2**32
  with pytest.raises(ValueError, match=r"159072863 input rows x 27 kernel taps = 4294967301 candidate"):
    jax.eval_shape(lambda i: ops.build_map(i, spec, 1, 1024), many)
  with pytest.raises(ValueError, match="candidate pairs"):
    jax.eval_shape(lambda i: ops.output_sites(i, spec, 1, 1024), many)
  few = jax.ShapeDtypeStruct((1024, 4), jnp.int32)
  with pytest.raises(ValueError, match="2147483648 output rows"):
    jax.eval_shape(lambda i: ops.build_map(i, spec, 1, 2**31), few)
  rows = jax.ShapeDtypeStruct((2**31, 4), jnp.int32)
  with pytest.raises(ValueError, match="2147483648 input rows"):
    jax.eval_shape(lambda i: ops.build_map(i, ops.make_spec("subm", (64, 64, 64), 3), 1), rows)
  with pytest.raises(ValueError, match="coordinates are int32"):
    ops.make_spec("transpose", (2**29,), 3, stride=4)


def _equations(jaxpr):
  """The equations of ``jaxpr`` and of every jaxpr nested in it (jit, cond branches, loops)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype int64")  # jnp's slice starts, at this size
def test_reference_numbers_candidates_past_int32_in_uint32():
  """The reference path sorts a created map's N x K candidates. Past 2**31 of them int32 numbers
  would wrap without a word: in its traced program (running it would take tens of GB), every iota
  and cumsum that long, and the indices of every gather that long, are uint32."""
  spec = ops.make_spec("conv", (64, 64, 64), 3, 2, 1)
  indices = jax.ShapeDtypeStruct((2**31 // 27 + 1, 4), jnp.int32)  # N x K just past 2**31
  with jsparse.backend("reference"):
    jaxpr = jax.make_jaxpr(lambda i: ops.build_map(i, spec, 1, 1024))(indices)
  numbers = {}
  for eqn in _equations(jaxpr.jaxpr):
    if eqn.primitive.name in ("iota", "cumsum") and eqn.outvars[0].aval.size > 2**31 - 1:
      numbers.setdefault(eqn.primitive.name, []).append(eqn.outvars[0].aval.dtype)
    if eqn.primitive.name == "gather" and eqn.invars[1].aval.size > 2**31 - 1:
      numbers.setdefault("gather", []).append(eqn.invars[1].aval.dtype)
  assert numbers == {"iota": [jnp.uint32], "cumsum": [jnp.uint32], "gather": [jnp.uint32]}, numbers
