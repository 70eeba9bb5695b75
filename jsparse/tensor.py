"""SparseConvTensor and what works on whole tensors.

- :class:`SparseConvTensor`: active sites of a batch of grids, with static capacity, as a pytree;
- :func:`kernel_map` and :func:`inverse_kernel_map`: the maps a layer finds or stores in the
  tensor's ``indice_dict`` under its ``indice_key`` (spconv's map cache), with the capacity
  records of layers that create sites;
- :func:`sparse_add`, :func:`sparse_cat` and ``x + y``: arithmetic on tensors.

This module sits between the array-level ops (``jsparse.ops``, which never see a tensor) and the
layers (``jsparse.nn``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse import ops
from jsparse._capacity import CapacityError, is_concrete, overflow_entry


@jax.tree_util.register_pytree_with_keys_class
class SparseConvTensor:
  """Features at the active sites of ``batch_size`` grids of shape ``spatial_shape``.

  Rows are sites: ``features [capacity, C]`` and int32 ``indices [capacity, 1 + ndim]``, column 0
  the batch index, columns 1.. the coordinates along ``spatial_shape`` (in the user's order,
  zyx or xyz). A row is active iff its batch index is >= 0; padding rows have indices -1 and
  features 0 and never influence an active output. The capacity (row count) is static, the
  number of active rows is traced, so the tensor can cross ``jax.jit`` boundaries.

  ``indice_dict`` carries the kernel maps that layers stored under their ``indice_key``;
  ``overflow`` records, for layers that ran under jit with a static capacity, how many output
  sites they needed (see :func:`jsparse.check_capacity`).

  Args:
    features: ``[N, C]`` array (numpy or jax).
    indices: integer ``[N, 1 + ndim]``, stored as int32 (int64, as spconv's, is accepted when its
      values fit; numpy, jax and CPU torch arrays are read).
    spatial_shape: the grid extent, ``ndim`` ints.
    batch_size: number of grids.
    indice_dict: kernel maps by key (usually left empty).
    capacity: pads to this many rows (>= N) when given.

  Raises:
    ValueError: when eagerly given wrong dtypes or ranks, mismatched lengths, sites outside the
      grid, batch indices out of range, or duplicate sites (naming the rows).

  >>> import numpy as np
  >>> x = SparseConvTensor(np.ones((2, 4), np.float32), np.array([[0, 1, 2], [0, 3, 3]], np.int32),
  ...                      (4, 4), batch_size=1, capacity=8)
  >>> x.features.shape, int(x.num_active), x.dense().shape
  ((8, 4), 2, (1, 4, 4, 4))
  """

  def __init__(
    self,
    features: Any,
    indices: Any,
    spatial_shape: Sequence[int],
    batch_size: int,
    indice_dict: Mapping[str, Any] | None = None,
    *,
    capacity: int | None = None,
  ):
    features, indices = jnp.asarray(features), _int32_indices(indices)
    spatial_shape = tuple(int(n) for n in spatial_shape)
    _check_structure(features, indices, spatial_shape, batch_size)
    if is_concrete(indices):
      _check_sites(indices, spatial_shape, batch_size)
    if capacity is not None:
      n = features.shape[0]
      if capacity < n:
        raise CapacityError(f"capacity={capacity} is smaller than the {n} rows given")
      features = jnp.pad(features, ((0, capacity - n), (0, 0)))
      indices = jnp.pad(indices, ((0, capacity - n), (0, 0)), constant_values=-1)
    self.features = features
    self.indices = indices
    self.spatial_shape = spatial_shape
    self.batch_size = int(batch_size)
    self.indice_dict = dict(indice_dict or {})
    self.overflow: dict[str, jax.Array] = {}

  # -- pytree ------------------------------------------------------------------------------
  def tree_flatten_with_keys(self):
    children = (
      (jax.tree_util.GetAttrKey("features"), self.features),
      (jax.tree_util.GetAttrKey("indices"), self.indices),
      (jax.tree_util.GetAttrKey("indice_dict"), self.indice_dict),
      (jax.tree_util.GetAttrKey("overflow"), self.overflow),
    )
    return children, (self.spatial_shape, self.batch_size)

  @classmethod
  def tree_unflatten(cls, aux, children):
    features, indices, indice_dict, overflow = children
    return cls._make(features, indices, *aux, indice_dict, overflow)

  @classmethod
  def _make(cls, features, indices, spatial_shape, batch_size, indice_dict, overflow):
    """Builds a tensor without validation (for library code and pytree unflattening)."""
    x = object.__new__(cls)
    x.features, x.indices = features, indices
    x.spatial_shape, x.batch_size = tuple(spatial_shape), batch_size
    x.indice_dict, x.overflow = indice_dict, overflow
    return x

  def replace(self, **changes: Any) -> SparseConvTensor:
    """A copy with fields replaced, unchecked (library use; see :meth:`replace_feature`)."""
    fields = dict(
      features=self.features,
      indices=self.indices,
      spatial_shape=self.spatial_shape,
      batch_size=self.batch_size,
      indice_dict=self.indice_dict,
      overflow=self.overflow,
    )
    fields.update(changes)
    return SparseConvTensor._make(**fields)

  # -- spconv's API ------------------------------------------------------------------------
  @property
  def capacity(self) -> int:
    """Static number of rows."""
    return self.indices.shape[0]

  @property
  def ndim(self) -> int:
    """Number of spatial dims."""
    return len(self.spatial_shape)

  @property
  def mask(self) -> jax.Array:
    """bool ``[capacity]``: the row is an active site."""
    return self.indices[:, 0] >= 0

  @property
  def num_active(self) -> jax.Array:
    """int32 ``[]``: number of active rows (traced)."""
    return jnp.sum(self.mask, dtype=jnp.int32)

  def replace_feature(self, features: jax.Array) -> SparseConvTensor:
    """Same sites, new ``features [capacity, C']``; padding rows are zeroed.

    Raises:
      ValueError: when ``features`` is not ``[capacity, C']``.
    """
    if features.ndim != 2 or features.shape[0] != self.capacity:
      raise ValueError(f"features must be [{self.capacity}, C], got {features.shape}")
    return self.replace(features=jnp.where(self.mask[:, None], features, jnp.zeros((), features.dtype)))

  def dense(self, channels_first: bool = False) -> jax.Array:
    """The dense grid, zeros at inactive sites.

    Returns:
      ``[batch_size, *spatial_shape, C]``, or spconv's ``[batch_size, C, *spatial_shape]`` with
      ``channels_first=True``.
    """
    batch = jnp.where(self.mask, self.indices[:, 0], self.batch_size)  # padding: dropped
    where = (batch, *(self.indices[:, 1 + j] for j in range(self.ndim)))
    shape = (self.batch_size, *self.spatial_shape, self.features.shape[1])
    out = jnp.zeros(shape, self.features.dtype).at[where].add(self.features, mode="drop")
    return jnp.moveaxis(out, -1, 1) if channels_first else out

  @classmethod
  def from_dense(cls, x: jax.Array, capacity: int | None = None) -> SparseConvTensor:
    """Sparse tensor of the sites of ``x`` where any channel is nonzero, sorted by (batch, coords).

    Args:
      x: channels-last ``[batch_size, *spatial_shape, C]``.
      capacity: static row count; required under jit. Eagerly ``None`` fits the sites, and a
        too-small capacity raises :class:`CapacityError`; under jit a shortfall is recorded in
        ``overflow`` and the first ``capacity`` sites are kept.
    """
    if x.ndim < 3:
      raise ValueError(f"from_dense expects [batch, *spatial, C] with >= 1 spatial dim, got {x.shape}")
    if math.prod(x.shape[:-1]) > np.iinfo(np.int32).max:  # jnp.nonzero's flat indices are int32
      raise ValueError(
        f"from_dense: the grid {x.shape[:-1]} has {math.prod(x.shape[:-1])} sites, more than int32 "
        "flat indices reach (2**31 - 1); convert fewer samples at a time"
      )
    active = jnp.any(x != 0, axis=-1)
    needed = jnp.sum(active, dtype=jnp.int32)
    overflow = {}
    if is_concrete(x):
      if capacity is not None and int(needed) > capacity:
        raise CapacityError(f"from_dense: {int(needed)} active sites do not fit capacity={capacity}")
      capacity = int(needed) if capacity is None else capacity
    elif capacity is None:
      raise ValueError("from_dense under jit needs a static capacity=")
    else:
      overflow["000 from_dense"] = overflow_entry(needed, capacity)
    where = jnp.nonzero(active, size=capacity, fill_value=-1)
    indices = jnp.stack(where, axis=1).astype(jnp.int32)
    valid = where[0] >= 0
    features = jnp.where(valid[:, None], x[where], jnp.zeros((), x.dtype))
    return cls._make(features, indices, x.shape[1:-1], x.shape[0], {}, overflow)

  @classmethod
  def from_samples(
    cls, features: Sequence[Any], coords: Sequence[Any], spatial_shape: Sequence[int]
  ) -> SparseConvTensor:
    """One tensor from per-sample voxels, as ``PointToVoxel`` returns them: sample ``b``'s rows
    get batch index ``b``, and its padding rows (coordinates -1) stay padding.

    Under jit a voxelizer's padding rows have coordinates -1; prepending a batch column by hand
    (``concatenate([zeros, coords])``) would give them batch index 0 and make them active sites.

    Args:
      features: per sample, ``[V_b, C]`` (padding rows are set to 0).
      coords: per sample, integer ``[V_b, ndim]``; a row with a negative coordinate is padding.
      spatial_shape: the grid, ``ndim`` ints.

    Returns:
      A tensor of ``batch_size = len(features)`` and capacity ``sum(V_b)``, the samples' rows in
      order; eagerly validated like the constructor.

    >>> import numpy as np
    >>> coords = np.array([[1, 2], [-1, -1]], np.int32)  # one voxel, one padding row
    >>> x = SparseConvTensor.from_samples([np.ones((2, 3))] * 2, [coords] * 2, (4, 4))
    >>> x.indices.tolist(), int(x.num_active)
    ([[0, 1, 2], [-1, -1, -1], [1, 1, 2], [-1, -1, -1]], 2)
    """
    if len(features) != len(coords) or not features:
      raise ValueError(
        f"from_samples needs one features and one coords array per sample, got {len(features)} and "
        f"{len(coords)}"
      )
    indices, rows = [], []
    for b, (f, c) in enumerate(zip(features, coords)):
      c = jnp.asarray(c)
      if c.ndim != 2 or c.shape[1] != len(spatial_shape) or jnp.shape(f)[:1] != c.shape[:1]:
        raise ValueError(
          f"from_samples: sample {b} has features {jnp.shape(f)} and coords {c.shape}; they need "
          f"[V, C] and [V, {len(spatial_shape)}]"
        )
      active = jnp.all(c >= 0, axis=1)
      batch = jnp.where(active, b, -1)[:, None]
      indices.append(jnp.where(active[:, None], jnp.concatenate([batch, c], axis=1), -1).astype(jnp.int32))
      rows.append(jnp.where(active[:, None], jnp.asarray(f), 0))
    return cls(jnp.concatenate(rows), jnp.concatenate(indices), spatial_shape, len(features))

  def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of the active rows: ``(features [n, C], indices int32 [n, 1 + ndim])``."""
    mask = np.asarray(self.mask)
    return np.asarray(self.features)[mask], np.asarray(self.indices)[mask]

  def __add__(self, other: SparseConvTensor) -> SparseConvTensor:
    """``x + y`` for tensors with identical sites (same indices row for row, checked eagerly):
    features added, kernel maps of both kept. :func:`sparse_add` handles different
    sites."""
    if not isinstance(other, SparseConvTensor):
      return NotImplemented
    _same_sites((self, other), "x + y")
    return self.replace(
      features=self.features + other.features,
      indice_dict=_merged_dicts((self, other)),
      overflow=_merged_overflow((self, other)),
    )

  def __repr__(self) -> str:
    return (
      f"SparseConvTensor(features={self.features.dtype}{list(self.features.shape)}, "
      f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
      f"indice_keys={list(self.indice_dict)})"
    )


def _int32_indices(indices: Any) -> jax.Array:
  """``indices`` as int32. Other integer dtypes (spconv's and PyTorch's int64, numpy's default)
  are narrowed after checking, when the values are known, that every value fits in int32."""
  if not isinstance(indices, jax.Array):
    indices = np.asarray(indices)  # also reads lists and CPU torch tensors
  if not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"indices must be integers (int32), got {indices.dtype}")
  if indices.dtype != np.int32 and is_concrete(indices) and indices.ndim == 2:
    values = np.asarray(indices)  # a host copy only for the values to check
    info = np.iinfo(np.int32)
    rows = np.flatnonzero(((values < info.min) | (values > info.max)).any(axis=1))
    if rows.size:
      shown = ", ".join(f"{r}: {values[r].tolist()}" for r in rows[:5])
      more = f" and {rows.size - 5} more" if rows.size > 5 else ""
      raise ValueError(
        f"{rows.size} rows of the {indices.dtype} indices do not fit in int32 ({shown}{more}); batch "
        "indices must be in [0, batch_size) (or -1 for padding) and coordinates in [0, spatial_shape)"
      )
  return jnp.asarray(indices, jnp.int32)


def _check_structure(features, indices, spatial_shape, batch_size) -> None:
  if indices.ndim != 2 or indices.shape[1] != 1 + len(spatial_shape):
    raise ValueError(
      f"indices must be [N, 1 + ndim] = [N, {1 + len(spatial_shape)}] for spatial_shape "
      f"{spatial_shape} (batch index first), got shape {indices.shape}"
    )
  if features.ndim != 2 or features.shape[0] != indices.shape[0]:
    raise ValueError(
      f"features must be [N, C] with N = {indices.shape[0]} rows like indices, got {features.shape}"
    )
  if not spatial_shape or any(n <= 0 for n in spatial_shape):
    raise ValueError(f"spatial_shape must be >= 1 positive ints, got {spatial_shape}")
  if int(batch_size) <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size}")


def _check_sites(indices, spatial_shape, batch_size) -> None:
  status = np.asarray(ops.check_indices(indices, spatial_shape=spatial_shape, batch_size=batch_size))
  problems = []
  for code in (ops.BAD_BATCH, ops.OUT_OF_GRID, ops.DUPLICATE):
    rows = np.flatnonzero(status == code)
    if rows.size:
      shown = ", ".join(f"{r}: {np.asarray(indices[r]).tolist()}" for r in rows[:5])
      more = f" and {rows.size - 5} more" if rows.size > 5 else ""
      problems.append(f"{rows.size} rows with {ops.STATUS_MEANINGS[code]} ({shown}{more})")
  if problems:
    raise ValueError(
      f"invalid indices for spatial_shape={spatial_shape}, batch_size={batch_size}: "
      + "; ".join(problems)
      + ". Batch indices must be in [0, batch_size) (or -1 for padding), coordinates in "
      "[0, spatial_shape), and each site may appear once."
    )


# ---- kernel maps by indice_key ------------------------------------------------------------


def _known_keys(indice_dict: Mapping[str, Any]) -> str:
  return ", ".join(repr(k) for k in indice_dict) or "none"


def kernel_map(
  x: SparseConvTensor,
  spec: ops.MapSpec,
  indice_key: str | None = None,
  out_capacity: int | None = None,
  label: str = "layer",
  *,
  capacity_ratio: float | None = None,
  record: str | None = None,
) -> tuple[ops.IndicePairs, dict[str, ops.IndicePairs], dict[str, jax.Array]]:
  """Finds or builds the map a layer needs, as spconv's ``indice_key`` cache does.

  A map stored under ``indice_key`` with the same spec is reused; one with a different spec is an
  error. A new map is stored under ``indice_key`` (when given). A map that creates sites
  records ``[needed, capacity]`` in ``overflow``: eagerly a ``None`` ``out_capacity`` sizes the
  output to fit and a too-small one raises :class:`CapacityError`; under jit the capacity is
  ``out_capacity``, else :func:`jsparse.ops.default_capacity` with ``capacity_ratio``, and the
  record says whether sites were dropped (:func:`jsparse.check_capacity`).

  Args:
    x: the input ``SparseConvTensor``.
    spec: the geometry the layer needs (``spec.in_spatial_shape`` must be ``x.spatial_shape``).
    indice_key: the key to reuse or store the map under.
    out_capacity: static output capacity for maps that create sites.
    label: names the layer in errors.
    capacity_ratio: the default capacity as a multiple of the input's (see
      :func:`jsparse.ops.default_capacity`), when ``out_capacity`` is None.
    record: the key of the overflow record (a layer's ``capacity_key``); by default a running
      number and ``label``.

  Returns:
    ``(pairs, indice_dict, overflow)``: the map and the dicts the output tensor carries.
  """
  indice_dict, overflow = dict(x.indice_dict), dict(x.overflow)
  if indice_key is not None and indice_key in indice_dict:
    pairs = indice_dict[indice_key]
    if pairs.spec != spec or pairs.batch_size != x.batch_size:
      stored = {**dataclasses.asdict(pairs.spec), "batch_size": pairs.batch_size}
      needed = {**dataclasses.asdict(spec), "batch_size": x.batch_size}
      differences = ", ".join(
        f"{k}={stored[k]!r} (needs {needed[k]!r})" for k in stored if stored[k] != needed[k]
      )
      raise ValueError(
        f"{label}: indice_key {indice_key!r} holds a map that differs from this layer's in "
        f"{differences}. Give layers with different geometry different keys. "
        f"Known keys: {_known_keys(indice_dict)}."
      )
    if pairs.in_indices.shape != x.indices.shape:
      raise ValueError(
        f"{label}: indice_key {indice_key!r} holds a map built on {pairs.in_indices.shape[0]} "
        f"input rows, but the input has capacity {x.capacity}; a key can only be reused by "
        "tensors with the sites the map was built on."
      )
    return pairs, indice_dict, overflow

  if spec.kind == "subm":
    pairs = ops.build_map(x.indices, spec, x.batch_size)
    if indice_key is not None:
      indice_dict[indice_key] = pairs
    return pairs, indice_dict, overflow
  if is_concrete(x.indices):
    sites, needed = ops.output_sites(x.indices, spec, x.batch_size, x.capacity * spec.kernel_volume)
    needed = int(needed)
    if out_capacity is not None and needed > out_capacity:
      raise CapacityError(
        f"{label}: the output has {needed} active sites but out_capacity={out_capacity}; pass "
        f"out_capacity >= {needed}, or leave it None to size the output to fit when eager."
      )
    capacity = needed if out_capacity is None else out_capacity
    sites = jnp.pad(sites[:capacity], ((0, max(0, capacity - sites.shape[0])), (0, 0)), constant_values=-1)
    pairs = ops.map_for_outputs(x.indices, sites, jnp.int32(needed), spec, x.batch_size)
  else:
    capacity = out_capacity
    if capacity is None:
      capacity = ops.default_capacity(spec, x.capacity, capacity_ratio)
    pairs = ops.build_map(x.indices, spec, x.batch_size, capacity)
  key = f"{len(overflow):03d} {label}" if record is None else record
  name, calls = key, 1
  while name in overflow:  # the same layer on this tensor's lineage again
    calls += 1
    name = f"{key} (call {calls})"
  overflow[name] = overflow_entry(pairs.num_out, pairs.out_capacity)
  if indice_key is not None:
    indice_dict[indice_key] = pairs
  return pairs, indice_dict, overflow


def inverse_kernel_map(
  x: SparseConvTensor, indice_key: str, kernel_size: tuple[int, ...], label: str = "layer"
) -> ops.IndicePairs:
  """The map of ``SparseInverseConv(indice_key=...)``: the stored map, inverted.

  Raises:
    ValueError: the key is unknown, its kernel size differs, or ``x`` is not that map's output.
  """
  if indice_key not in x.indice_dict:
    raise ValueError(
      f"{label}: unknown indice_key {indice_key!r}. An inverse convolution needs the map that an "
      f"earlier strided layer stored under this key (e.g. SparseConv3d(..., "
      f"indice_key={indice_key!r})). Known keys: {_known_keys(x.indice_dict)}."
    )
  pairs = x.indice_dict[indice_key]
  if pairs.spec.kernel_size != kernel_size:
    raise ValueError(
      f"{label}: indice_key {indice_key!r} holds a map with kernel_size="
      f"{pairs.spec.kernel_size}, but this layer has kernel_size={kernel_size}; an inverse "
      "convolution must use the kernel size of the layer it inverts."
    )
  if pairs.out_capacity != x.capacity or pairs.spec.out_spatial_shape != x.spatial_shape:
    raise ValueError(
      f"{label}: indice_key {indice_key!r} maps to {pairs.out_capacity} rows over "
      f"{pairs.spec.out_spatial_shape}, but the input has capacity {x.capacity} over "
      f"{x.spatial_shape}; the input must be the output of the layer that stored the key."
    )
  return ops.invert_map(pairs)


# ---- arithmetic on tensors ------------------------------------------------------------------


def _check_operands(tensors: tuple[Any, ...], op: str) -> None:
  if not tensors:
    raise ValueError(f"{op} needs at least one SparseConvTensor")
  for j, t in enumerate(tensors):
    if not isinstance(t, SparseConvTensor):
      raise TypeError(f"{op}: operand {j} is a {type(t).__name__}, not a SparseConvTensor")
  first = tensors[0]
  for j, t in enumerate(tensors[1:], 1):
    if t.spatial_shape != first.spatial_shape or t.batch_size != first.batch_size:
      raise ValueError(
        f"{op}: operand {j} has spatial_shape={t.spatial_shape}, batch_size={t.batch_size}, but "
        f"operand 0 has spatial_shape={first.spatial_shape}, batch_size={first.batch_size}"
      )


def _merged_overflow(tensors: tuple[SparseConvTensor, ...]) -> dict[str, jax.Array]:
  """The operands' overflow records in one dict; a clashing label gets the operand's number."""
  merged: dict[str, jax.Array] = {}
  for j, t in enumerate(tensors):
    for label, record in t.overflow.items():
      if label in merged and merged[label] is not record:
        label = f"{label} (operand {j})"
      merged[label] = record
  return merged


def _merged_dicts(tensors: tuple[SparseConvTensor, ...]) -> dict[str, Any]:
  """Every operand's kernel maps; the first operand that has a key wins."""
  merged: dict[str, Any] = {}
  for t in reversed(tensors):
    merged.update(t.indice_dict)
  return merged


def _same_sites(tensors: tuple[SparseConvTensor, ...], op: str) -> None:
  """Operands must share their rows: same capacity always, identical indices when eager."""
  _check_operands(tensors, op)
  first = tensors[0]
  for j, t in enumerate(tensors[1:], 1):
    same = t.capacity == first.capacity
    if same and is_concrete(t.indices, first.indices):
      same = bool(np.array_equal(np.asarray(t.indices), np.asarray(first.indices)))
    if not same:
      raise ValueError(
        f"{op}: operand {j} does not have operand 0's sites (the same indices row for row); "
        "use jsparse.sparse_add to combine tensors over different sites"
      )


def sparse_cat(*tensors: SparseConvTensor) -> SparseConvTensor:
  """Concatenates the features of tensors with identical sites along the channel axis.

  Args:
    *tensors: ``SparseConvTensor`` s with the same indices (row for row; checked eagerly) and
      features ``[capacity, C_j]``.

  Returns:
    A tensor over those sites with features ``[capacity, sum C_j]`` (dtypes promoted) and every
    operand's kernel maps.

  >>> import numpy as np, jsparse
  >>> idx = np.array([[0, 1], [0, 3]], np.int32)
  >>> a = jsparse.SparseConvTensor(np.ones((2, 2), np.float32), idx, (4,), 1)
  >>> b = jsparse.SparseConvTensor(np.zeros((2, 3), np.float32), idx, (4,), 1)
  >>> jsparse.sparse_cat(a, b).features.shape
  (2, 5)
  """
  _same_sites(tensors, "sparse_cat")
  return tensors[0].replace(
    features=jnp.concatenate([t.features for t in tensors], axis=1),
    indice_dict=_merged_dicts(tensors),
    overflow=_merged_overflow(tensors),
  )


def _sum_into(tensors, out_indices: jax.Array, num_out: jax.Array) -> jax.Array:
  """The operands' features summed into the rows of ``out_indices`` (in argument order).

  Each operand reaches the output rows through its own 1-tap map: one writer per output row and
  operand, and the gradient gathers through the transposed map, so both directions are
  deterministic.
  """
  spec = ops.make_spec("conv", tensors[0].spatial_shape, 1)
  dtype = jnp.result_type(*(t.features.dtype for t in tensors))
  total = None
  for t in tensors:
    pairs = ops.map_for_outputs(t.indices, out_indices, num_out, spec, t.batch_size)
    term = ops.gather_rows_transposed(t.features.astype(dtype), pairs.nbr[:, 0], pairs.nbr_t[:, 0])
    total = term if total is None else total + term
  return total


def sparse_add(*tensors: SparseConvTensor, capacity: int | None = None) -> SparseConvTensor:
  """Sum of sparse tensors over the union of their sites; sites in several operands are added.

  The result's rows are the union sorted by (batch, coords). As in spconv, the result keeps the
  ``indice_dict`` of an operand whose site set equals the union; jsparse then keeps that
  operand's rows (order and capacity) too, so its stored maps stay valid. This needs concrete
  sites, so it applies to eager calls; under jit the result has the sorted union and no kernel
  maps (use ``x + y`` for identical sites, which keeps them).

  Args:
    *tensors: ``SparseConvTensor`` s with one spatial shape, batch size and channel count.
    capacity: static row count of the result. Eagerly ``None`` fits the union and a too-small
      capacity raises :class:`jsparse.CapacityError`; under jit ``None`` means the sum of the
      operands' capacities (the union always fits) and a shortfall is recorded in ``overflow``.

  Returns:
    A ``SparseConvTensor`` with features ``[capacity, C]`` (dtypes promoted).

  >>> import numpy as np, jsparse
  >>> a = jsparse.SparseConvTensor(np.ones((2, 1), np.float32), np.array([[0, 3], [0, 1]], np.int32), (4,), 1)
  >>> b = jsparse.SparseConvTensor(np.ones((1, 1), np.float32), np.array([[0, 1]], np.int32), (4,), 1)
  >>> c = jsparse.sparse_add(a, b)
  >>> c.indices.tolist(), c.features.ravel().tolist()
  ([[0, 3], [0, 1]], [1.0, 2.0])
  """
  _check_operands(tensors, "sparse_add")
  channels = {t.features.shape[1] for t in tensors}
  if len(channels) != 1:
    raise ValueError(f"sparse_add: operands must have one channel count, got {sorted(channels)}")
  first = tensors[0]
  overflow = _merged_overflow(tensors)
  indices = jnp.concatenate([t.indices for t in tensors])
  upper = sum(t.capacity for t in tensors)
  if is_concrete(indices):
    union, needed = ops.unique_sites(indices, first.spatial_shape, first.batch_size, upper)
    needed = int(needed)
    if capacity is not None and needed > capacity:
      raise CapacityError(
        f"sparse_add: the union has {needed} sites but capacity={capacity}; pass capacity >= "
        f"{needed}, or leave it None to fit the union when eager"
      )
    for t in tensors:  # spconv keeps the maps of an operand that holds every site
      if int(t.num_active) == needed and (capacity is None or capacity == t.capacity):
        return t.replace(features=_sum_into(tensors, t.indices, jnp.int32(needed)), overflow=overflow)
    capacity = needed if capacity is None else capacity
    union = jnp.pad(union[:capacity], ((0, max(0, capacity - union.shape[0])), (0, 0)), constant_values=-1)
    num_out = jnp.int32(needed)
  else:
    capacity = upper if capacity is None else capacity
    union, num_out = ops.unique_sites(indices, first.spatial_shape, first.batch_size, capacity)
    overflow[f"{len(overflow):03d} sparse_add"] = overflow_entry(num_out, capacity)
  features = _sum_into(tensors, union, num_out)
  return SparseConvTensor._make(features, union, first.spatial_shape, first.batch_size, {}, overflow)
