"""SparseConvTensor: active sites of a batch of grids, with static capacity, as a pytree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    indices: int32 ``[N, 1 + ndim]``.
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
    if getattr(indices, "dtype", np.int32) != np.int32:  # before jnp.asarray narrows int64
      raise ValueError(f"indices must be int32, got {indices.dtype}; convert with .astype(np.int32)")
    features, indices = jnp.asarray(features), jnp.asarray(indices)
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

  def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of the active rows: ``(features [n, C], indices int32 [n, 1 + ndim])``."""
    mask = np.asarray(self.mask)
    return np.asarray(self.features)[mask], np.asarray(self.indices)[mask]

  def __add__(self, other: SparseConvTensor) -> SparseConvTensor:
    """``x + y`` for tensors with identical sites (same indices row for row, checked eagerly):
    features added, kernel maps of both kept. :func:`jsparse.ops.sparse_add` handles different
    sites."""
    if not isinstance(other, SparseConvTensor):
      return NotImplemented
    from jsparse.ops import _combine  # the ops package imports this module

    return _combine.add_same_sites(self, other)

  def __repr__(self) -> str:
    return (
      f"SparseConvTensor(features={self.features.dtype}{list(self.features.shape)}, "
      f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
      f"indice_keys={list(self.indice_dict)})"
    )


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
  from jsparse.ops import _indices  # the ops package imports this module

  status = np.asarray(_indices.check_indices_jit(indices, spatial_shape=spatial_shape, batch_size=batch_size))
  problems = []
  for code in (_indices.BAD_BATCH, _indices.OUT_OF_GRID, _indices.DUPLICATE):
    rows = np.flatnonzero(status == code)
    if rows.size:
      shown = ", ".join(f"{r}: {np.asarray(indices[r]).tolist()}" for r in rows[:5])
      more = f" and {rows.size - 5} more" if rows.size > 5 else ""
      problems.append(f"{rows.size} rows with {_indices.STATUS_MEANINGS[code]} ({shown}{more})")
  if problems:
    raise ValueError(
      f"invalid indices for spatial_shape={spatial_shape}, batch_size={batch_size}: "
      + "; ".join(problems)
      + ". Batch indices must be in [0, batch_size) (or -1 for padding), coordinates in "
      "[0, spatial_shape), and each site may appear once."
    )
