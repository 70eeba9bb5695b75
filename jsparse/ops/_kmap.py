"""Kernel maps ("indice pairs"): which input row feeds each output row through each kernel tap.

Two backends (:func:`jsparse.backend`): the FFI kernels (``xla_ffi/cpu/kmap.cc``: hash tables and
radix sorts of packed 64-bit site keys, threaded; ``xla_ffi/cuda/kmap.cu``: the same on the GPU
with cub's radix sort) and a jnp reference, in which sites are packed
into int32 key words (``_keys``), sorted, and found by binary search. Both are jittable with
static capacities and give identical maps. Every map is output-stationary: ``nbr[o, k]`` is
the input row that output row ``o`` reads through tap ``k`` (row-major over the kernel), so each
output has one writer. Its transpose ``nbr_t[i, k]`` is the output row that input ``i`` feeds
through tap ``k``; the input gradient and inverse convolution read it.

Geometry, per axis, for output coordinate ``q``, input coordinate ``p``, tap index ``k``:

- ``subm``: ``p = q - pad + k * d`` with ``pad = (ksize // 2) * d``; output sites = input sites.
- ``conv`` and ``pool``: ``p = q * s - pad + k * d`` (cross-correlation, as ``lax.conv``).
- ``transpose``: ``q = p * s - pad + k * d`` (the scatter form of a transposed convolution).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsparse import _ffi
from jsparse.ops import _backend, _keys

KINDS = ("subm", "conv", "transpose", "pool")


@dataclasses.dataclass(frozen=True)
class MapSpec:
  """The static geometry of a kernel map; two layers can share a map iff their specs are equal."""

  kind: str
  kernel_size: tuple[int, ...]
  stride: tuple[int, ...]
  padding: tuple[int, ...]
  dilation: tuple[int, ...]
  in_spatial_shape: tuple[int, ...]

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
    ndim = len(self.in_spatial_shape)
    for name in ("kernel_size", "stride", "padding", "dilation"):
      value = getattr(self, name)
      if len(value) != ndim:
        raise ValueError(f"{name}={value} must have one entry per spatial dim ({ndim})")
    for name, low in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
      if any(v < low for v in getattr(self, name)):
        raise ValueError(f"{name}={getattr(self, name)} must be >= {low} on every axis")
    if self.kind == "subm" and any(s != 1 for s in self.stride):
      raise ValueError("a submanifold map has stride 1; build it with make_spec('subm', ...)")
    if any(n <= 0 for n in self.out_spatial_shape):
      raise ValueError(
        f"the output of a {self.kind} map with kernel_size={self.kernel_size}, "
        f"stride={self.stride}, padding={self.padding}, dilation={self.dilation} over "
        f"spatial_shape={self.in_spatial_shape} would be empty ({self.out_spatial_shape})"
      )
    axes = zip(self.in_spatial_shape, self.out_spatial_shape, self.kernel_size, self.stride, self.padding)
    for axis, (n, m, k, s, p) in enumerate(axes):
      reach = max(n, m) * s + p + self.dilation[axis] * (k - 1)  # bounds every coordinate computed
      if reach > _keys.INT32_MAX:
        raise ValueError(
          f"axis {axis} of a {self.kind} map over spatial_shape={self.in_spatial_shape} (output "
          f"{self.out_spatial_shape}): coordinates are int32, so max(in, out) * stride + padding + "
          f"dilation * (kernel_size - 1) = {reach} must stay below 2**31; use a coarser grid"
        )

  @property
  def kernel_volume(self) -> int:
    return math.prod(self.kernel_size)

  @property
  def out_spatial_shape(self) -> tuple[int, ...]:
    if self.kind == "subm":
      return self.in_spatial_shape
    rows = zip(self.in_spatial_shape, self.kernel_size, self.stride, self.padding, self.dilation)
    if self.kind == "transpose":
      return tuple((n - 1) * s - 2 * p + d * (k - 1) + 1 for n, k, s, p, d in rows)
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in rows)

  @property
  def offsets(self) -> np.ndarray:
    """int32 ``[K, ndim]``: tap indices, row-major over the kernel (the kernel's own layout)."""
    grid = np.indices(self.kernel_size, dtype=np.int32)
    return grid.reshape(len(self.kernel_size), -1).T


def ntuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
  """``value`` as ``ndim`` ints (an int is repeated); ``name`` is used in the error."""
  if isinstance(value, (int, np.integer)):
    return (int(value),) * ndim
  value = tuple(int(v) for v in value)
  if len(value) != ndim:
    raise ValueError(f"{name}={value} must be an int or have {ndim} entries (one per spatial dim)")
  return value


def make_spec(
  kind: str,
  in_spatial_shape: Sequence[int],
  kernel_size: int | Sequence[int],
  stride: int | Sequence[int] = 1,
  padding: int | Sequence[int] = 0,
  dilation: int | Sequence[int] = 1,
) -> MapSpec:
  """Normalizes int-or-tuple arguments into a :class:`MapSpec`.

  For ``kind="subm"`` stride and padding are ignored (as in spconv): stride is 1 and the padding
  is ``(kernel_size // 2) * dilation``, which keeps odd kernels centred; an even kernel of size
  ``2m`` then reaches ``m`` taps back and ``m - 1`` forward.

  >>> make_spec("conv", (8, 8), 3, stride=2, padding=1).out_spatial_shape
  (4, 4)
  """
  shape = tuple(int(n) for n in in_spatial_shape)
  ndim = len(shape)
  kernel_size = ntuple(kernel_size, ndim, "kernel_size")
  dilation = ntuple(dilation, ndim, "dilation")
  if kind == "subm":
    stride = (1,) * ndim
    padding = tuple((k // 2) * d for k, d in zip(kernel_size, dilation))
  return MapSpec(
    kind,
    kernel_size,
    ntuple(stride, ndim, "stride"),
    ntuple(padding, ndim, "padding"),
    dilation,
    shape,
  )


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("nbr", "nbr_t", "in_indices", "out_indices", "num_out"),
  meta_fields=("spec", "batch_size"),
)
@dataclasses.dataclass(frozen=True)
class IndicePairs:
  """A kernel map (a pytree).

  Attributes:
    nbr: int32 ``[capacity_out, K]``: input row read by output row ``o`` through tap ``k``, or -1.
    nbr_t: int32 ``[capacity_in, K]``: output row fed by input row ``i`` through tap ``k``, or -1.
      ``None`` for submanifold maps with odd kernels, where it is ``nbr`` with taps reversed.
    in_indices: int32 ``[capacity_in, 1 + ndim]``: the input sites the map was built on.
    out_indices: int32 ``[capacity_out, 1 + ndim]``: the output sites, -1 rows are padding.
    num_out: int32 ``[]``: how many output sites exist; more than ``capacity_out`` means some
      were dropped (see :func:`jsparse.check_capacity`).
    spec: the static geometry.
    batch_size: static batch size.
  """

  nbr: jax.Array
  nbr_t: jax.Array | None
  in_indices: jax.Array
  out_indices: jax.Array
  num_out: jax.Array
  spec: MapSpec
  batch_size: int

  @property
  def transpose_nbr(self) -> jax.Array:
    """int32 ``[capacity_in, K]``: the transposed map, derived when it is not stored."""
    return self.nbr[:, ::-1] if self.nbr_t is None else self.nbr_t

  @property
  def out_capacity(self) -> int:
    return self.nbr.shape[0]


def _tap_sources(spec: MapSpec, out_coords: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Input coordinates ``[N, K, ndim]`` read by each output through each tap, and validity (none
  from an output outside the grid, whose arithmetic could wrap int32 into it)."""
  q = out_coords[:, None, :]
  k = jnp.asarray(spec.offsets)[None]
  stride, pad, dil = (
    jnp.asarray(v, jnp.int32)[None, None] for v in (spec.stride, spec.padding, spec.dilation)
  )
  if spec.kind == "transpose":
    numerator = q + pad - k * dil
    p = numerator // stride
    valid = jnp.all(numerator % stride == 0, axis=-1)
  else:
    p = q * stride - pad + k * dil
    valid = jnp.ones(p.shape[:-1], bool)
  return p, valid & _keys.in_grid(q, spec.out_spatial_shape) & _keys.in_grid(p, spec.in_spatial_shape)


def _tap_targets(spec: MapSpec, in_coords: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Output coordinates ``[N, K, ndim]`` that each input reaches through each tap, and validity
  (none from an input outside the grid, whose arithmetic could wrap int32 into it)."""
  p = in_coords[:, None, :]
  k = jnp.asarray(spec.offsets)[None]
  stride, pad, dil = (
    jnp.asarray(v, jnp.int32)[None, None] for v in (spec.stride, spec.padding, spec.dilation)
  )
  if spec.kind == "transpose":
    q = p * stride - pad + k * dil
    valid = jnp.ones(q.shape[:-1], bool)
  else:
    numerator = p + pad - k * dil
    q = numerator // stride
    valid = jnp.all(numerator % stride == 0, axis=-1)
  return q, valid & _keys.in_grid(p, spec.in_spatial_shape) & _keys.in_grid(q, spec.out_spatial_shape)


def _neighbors(spec: MapSpec, batch_size: int, in_indices, out_indices) -> jax.Array:
  """``nbr [capacity_out, K]`` by looking every tap's source site up among the inputs."""
  radices = _keys.key_radices(batch_size, spec.in_spatial_shape)
  table = _keys.sort_keys(_keys.pack_indices(in_indices, radices))
  p, valid = _tap_sources(spec, out_indices[:, 1:])
  batch = jnp.broadcast_to(out_indices[:, :1], valid.shape)
  return _keys.lookup(table, _keys.pack(batch, p, valid & (batch >= 0), radices))


def _transpose(nbr: jax.Array, in_capacity: int) -> jax.Array:
  """``nbr_t [in_capacity, K]`` from ``nbr``; every (input, tap) has at most one output."""
  out_rows = jnp.broadcast_to(jnp.arange(nbr.shape[0], dtype=jnp.int32)[:, None], nbr.shape)
  taps = jnp.broadcast_to(jnp.arange(nbr.shape[1], dtype=jnp.int32)[None, :], nbr.shape)
  rows = jnp.where(nbr >= 0, nbr, in_capacity)  # out of bounds: dropped
  nbr_t = jnp.full((in_capacity, nbr.shape[1]), -1, jnp.int32)
  return nbr_t.at[rows, taps].set(out_rows, mode="drop")


def _check_sizes(op: str, spec: MapSpec, in_rows: int, out_rows: int, candidates: bool) -> None:
  """Trace-time limits of the map builders, raised before anything runs on either backend: rows
  are numbered with int32 (``nbr`` holds input rows, ``nbr_t`` output rows), and a map that creates
  sites numbers its ``in_rows x K`` candidate (input row, tap) pairs with 32 bits."""
  for what, rows in (("input", in_rows), ("output", out_rows)):
    if rows > _keys.INT32_MAX:
      raise ValueError(
        f"{op}: {rows} {what} rows; kernel maps number rows with int32 (at most 2**31 - 1): "
        "use a smaller capacity or batch"
      )
  if candidates and in_rows * spec.kernel_volume >= 2**32:
    raise ValueError(
      f"{op}: {in_rows} input rows x {spec.kernel_volume} kernel taps = "
      f"{in_rows * spec.kernel_volume} candidate pairs; a {spec.kind} map numbers them with 32 bits "
      "(fewer than 2**32): use a smaller input capacity or batch, or split the scene"
    )


def _geometry_attrs(spec: MapSpec, batch_size: int) -> dict[str, Any]:
  """The FFI attributes that describe ``spec`` (see ``xla_ffi/common/kmap.h``)."""
  as_array = lambda v: np.asarray(v, np.int64)  # noqa: E731
  return dict(
    kernel_size=as_array(spec.kernel_size),
    stride=as_array(spec.stride),
    padding=as_array(spec.padding),
    dilation=as_array(spec.dilation),
    in_spatial_shape=as_array(spec.in_spatial_shape),
    out_spatial_shape=as_array(spec.out_spatial_shape),
    transpose=np.int64(spec.kind == "transpose"),
    batch_size=np.int64(batch_size),
  )


def _output_sites_reference(indices, spec, batch_size, capacity):
  q, valid = _tap_targets(spec, indices[:, 1:])
  batch = jnp.broadcast_to(indices[:, :1], valid.shape)
  valid = valid & (batch >= 0)
  radices = _keys.key_radices(batch_size, spec.out_spatial_shape)
  words = tuple(w.reshape(-1) for w in _keys.pack(batch, q, valid, radices))
  # The N x K < 2**32 candidates are numbered, ranked and gathered in uint32: int32 would wrap
  # past 2**31 of them (and jnp indexing would narrow the numbers to int32: lax.gather does not).
  *sorted_words, order = lax.sort((*words, lax.iota(jnp.uint32, batch.size)), num_keys=len(words))
  first = _keys.first_of_runs(tuple(sorted_words))
  rank = jnp.cumsum(first, dtype=jnp.uint32)  # distinct sites so far
  slot = jnp.where(first & (rank <= capacity), rank - 1, capacity).astype(jnp.int32)  # capacity: dropped
  candidates = jnp.concatenate([batch[..., None], q], axis=-1).reshape(batch.size, 1 + q.shape[-1])
  rows = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))
  sites = lax.gather(candidates, order[:, None], rows, (1, candidates.shape[1]), mode="promise_in_bounds")
  out = jnp.full((capacity, candidates.shape[1]), -1, jnp.int32)
  out = out.at[slot].set(sites, mode="drop")
  num_out = jnp.minimum(jnp.sum(first, dtype=jnp.uint32), _keys.INT32_MAX)  # as the FFI kernels clamp
  return out, num_out.astype(jnp.int32)


def _output_sites(
  indices: jax.Array, spec: MapSpec, batch_size: int, capacity: int
) -> tuple[jax.Array, jax.Array]:
  """The output sites of a ``conv``, ``pool`` or ``transpose`` map, sorted by (batch, coords).

  Args:
    indices: int32 ``[N, 1 + ndim]`` input sites.
    spec: the map's geometry.
    batch_size: static batch size.
    capacity: static number of output rows.

  Returns:
    ``(out_indices int32 [capacity, 1 + ndim], num_out int32 [])``: the first ``capacity`` sites
    (padding rows -1) and the number of sites that exist.
  """
  _check_sizes("output_sites", spec, indices.shape[0], capacity, candidates=True)
  outputs = (
    jax.ShapeDtypeStruct((capacity, indices.shape[1]), jnp.int32),
    jax.ShapeDtypeStruct((), jnp.int32),
  )
  target = "jsparse_kmap_output_sites"
  return _backend.dispatch(
    target,
    lambda i: _ffi.call(target, outputs, i, **_geometry_attrs(spec, batch_size)),
    lambda i: _output_sites_reference(i, spec, batch_size, capacity),
    indices,
  )


output_sites = _backend.jit(_output_sites, static_argnames=("spec", "batch_size", "capacity"))


def _map_arrays(spec, batch_size, indices, out_indices, with_transpose, symmetric):
  """``(nbr, nbr_t)``; ``nbr_t`` is ``[0, K]`` unless ``with_transpose``. ``symmetric``: an odd
  submanifold map whose outputs are its inputs; the FFI kernel then looks up half of the taps."""
  k = spec.kernel_volume
  t_rows = indices.shape[0] if with_transpose else 0

  def reference(i, o):
    nbr = _neighbors(spec, batch_size, i, o)
    return nbr, _transpose(nbr, t_rows) if with_transpose else jnp.zeros((0, k), jnp.int32)

  outputs = (
    jax.ShapeDtypeStruct((out_indices.shape[0], k), jnp.int32),
    jax.ShapeDtypeStruct((t_rows, k), jnp.int32),
  )
  target = "jsparse_kmap_neighbors"
  return _backend.dispatch(
    target,
    lambda i, o: _ffi.call(
      target, outputs, i, o, symmetric=np.int64(symmetric), **_geometry_attrs(spec, batch_size)
    ),
    reference,
    indices,
    out_indices,
  )


def _map_for_outputs(
  indices: jax.Array, out_indices: jax.Array, num_out: jax.Array, spec: MapSpec, batch_size: int
) -> IndicePairs:
  """The kernel map from input sites ``indices [N, 1 + ndim]`` to given output sites.

  ``nbr_t`` is always stored: with arbitrary outputs, even an odd submanifold map is not ``nbr``
  with its taps reversed (only :func:`build_map`'s submanifold maps, whose outputs are the inputs,
  can drop it).
  """
  _check_sizes("map_for_outputs", spec, indices.shape[0], out_indices.shape[0], candidates=False)
  nbr, nbr_t = _map_arrays(spec, batch_size, indices, out_indices, True, False)
  return IndicePairs(nbr, nbr_t, indices, out_indices, num_out, spec, batch_size)


def _subm_map(indices: jax.Array, spec: MapSpec, batch_size: int) -> IndicePairs:
  """The submanifold map of ``spec`` over ``indices``: outputs are the input rows."""
  _check_sizes("build_map", spec, indices.shape[0], indices.shape[0], candidates=False)
  odd = all(k % 2 == 1 for k in spec.kernel_size)
  nbr, nbr_t = _map_arrays(spec, batch_size, indices, indices, not odd, odd)
  num_out = jnp.sum(indices[:, 0] >= 0, dtype=jnp.int32)
  return IndicePairs(nbr, None if odd else nbr_t, indices, indices, num_out, spec, batch_size)


def _created_map(indices: jax.Array, spec: MapSpec, batch_size: int, capacity: int) -> IndicePairs:
  """The map of a ``conv``, ``pool`` or ``transpose`` spec, its output sites included.

  Equals :func:`output_sites` followed by :func:`map_for_outputs`; the FFI kernel builds all of
  it in one pass (sorting candidate pairs instead of hashing the outputs a second time).
  """
  _check_sizes("build_map", spec, indices.shape[0], capacity, candidates=True)
  k, ndim = spec.kernel_volume, len(spec.in_spatial_shape)

  def reference(i):
    out_indices, num_out = _output_sites_reference(i, spec, batch_size, capacity)
    nbr = _neighbors(spec, batch_size, i, out_indices)
    return out_indices, num_out, nbr, _transpose(nbr, i.shape[0])

  outputs = (
    jax.ShapeDtypeStruct((capacity, 1 + ndim), jnp.int32),
    jax.ShapeDtypeStruct((), jnp.int32),
    jax.ShapeDtypeStruct((capacity, k), jnp.int32),
    jax.ShapeDtypeStruct((indices.shape[0], k), jnp.int32),
  )
  target = "jsparse_kmap_build"
  out_indices, num_out, nbr, nbr_t = _backend.dispatch(
    target, lambda i: _ffi.call(target, outputs, i, **_geometry_attrs(spec, batch_size)), reference, indices
  )
  return IndicePairs(nbr, nbr_t, indices, out_indices, num_out, spec, batch_size)


map_for_outputs = _backend.jit(_map_for_outputs, static_argnames=("spec", "batch_size"))
subm_map = _backend.jit(_subm_map, static_argnames=("spec", "batch_size"))
created_map = _backend.jit(_created_map, static_argnames=("spec", "batch_size", "capacity"))


def build_map(
  indices: jax.Array, spec: MapSpec, batch_size: int, out_capacity: int | None = None
) -> IndicePairs:
  """Builds the kernel map of ``spec`` over the input sites ``indices [N, 1 + ndim]``.

  ``out_capacity`` is ignored for ``subm`` maps (outputs are the input rows) and required for the
  others. Jittable; use :func:`kernel_map` for spconv's eager size-to-fit behaviour. Rows are
  numbered with int32, and the other kinds number ``N x K`` candidate pairs with 32 bits: ``N``
  and ``out_capacity`` above ``2**31 - 1``, or ``N x K >= 2**32``, raise ValueError when traced.
  """
  if spec.kind == "subm":
    return subm_map(indices, spec, batch_size)
  if out_capacity is None:
    raise ValueError(f"a {spec.kind} map creates sites: pass a static out_capacity")
  return created_map(indices, spec, batch_size, out_capacity)


def invert_map(pairs: IndicePairs) -> IndicePairs:
  """The map of the inverse convolution: outputs are ``pairs``' inputs, in their row order.

  The result reads ``pairs.transpose_nbr``; its ``spec`` stays that of the map it inverts.
  """
  return IndicePairs(
    pairs.transpose_nbr,
    pairs.nbr,
    pairs.out_indices,
    pairs.in_indices,
    jnp.sum(pairs.in_indices[:, 0] >= 0, dtype=jnp.int32),
    pairs.spec,
    pairs.batch_size,
  )


def default_capacity(spec: MapSpec, in_capacity: int, ratio: float | None = None) -> int:
  """The static output capacity of a map that creates sites, as a multiple of its input's.

  Args:
    spec: a ``conv``, ``pool`` or ``transpose`` map.
    in_capacity: the input's capacity.
    ratio: output rows per input row. ``None`` takes ``prod(stride)`` for a transposed map;
      2 for windows that overlap (a kernel longer than its stride on some axis, as k3 s2, which
      takes real LiDAR scans to 1.5-1.75x their sites); and 1 for windows that do not (as k2
      s2, whose output never has more sites than its input).

  Returns:
    ``ceil(ratio * in_capacity)`` rounded up to a multiple of 8 (at least 8).

  >>> default_capacity(make_spec("conv", (64, 64, 64), 3, 2, 1), 1000)
  2000
  >>> default_capacity(make_spec("conv", (64, 64, 64), 2, 2), 1000, ratio=0.5)
  504
  """
  if ratio is None:
    if spec.kind == "transpose":
      ratio = math.prod(spec.stride)
    else:
      ratio = 2.0 if any(k > s for k, s in zip(spec.kernel_size, spec.stride)) else 1.0
  if not ratio > 0:
    raise ValueError(f"a capacity ratio must be positive, got {ratio}")
  return max(8, -(-math.ceil(ratio * in_capacity) // 8) * 8)


def unique_sites(indices: jax.Array, spatial_shape: Sequence[int], batch_size: int, capacity: int):
  """The distinct active sites of ``indices``, sorted by (batch, coords).

  Args:
    indices: int32 ``[N, 1 + ndim]``; padding rows (batch -1) are skipped, repeated sites kept once.
    spatial_shape: the grid.
    batch_size: static batch size.
    capacity: static number of output rows.

  Returns:
    ``(sites int32 [capacity, 1 + ndim], num_sites int32 [])``: the first ``capacity`` sites
    (padding rows -1) and how many exist.

  >>> import jax.numpy as jnp
  >>> idx = jnp.array([[0, 3], [-1, -1], [0, 1], [0, 3]], jnp.int32)
  >>> sites, n = unique_sites(idx, (4,), 1, 3)
  >>> sites.tolist(), int(n)
  ([[0, 1], [0, 3], [-1, -1]], 2)
  """
  # A 1x1 "conv" map's output sites are its input sites, deduplicated and sorted.
  return output_sites(indices, make_spec("conv", spatial_shape, 1), batch_size, capacity)
