"""Checking site indices: range, padding and duplicate rows, as status codes per row."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsparse import _ffi
from jsparse.ops import _backend, _keys

# Per-row status codes of check_indices (the C++ and CUDA kernels use the same numbers).
ACTIVE = 0
PADDING = 1
BAD_BATCH = 2
OUT_OF_GRID = 3
DUPLICATE = 4

STATUS_MEANINGS = {
  ACTIVE: "active",
  PADDING: "padding (batch index -1)",
  BAD_BATCH: "batch index out of range",
  OUT_OF_GRID: "coordinate outside spatial_shape",
  DUPLICATE: "duplicate of an earlier row's site",
}


def _range_status_reference(indices, spatial_shape, batch_size):
  batch = indices[:, 0]
  batch_ok = (batch >= 0) & (batch < batch_size)
  status = jnp.where(batch_ok, ACTIVE, BAD_BATCH)
  status = jnp.where(batch_ok & ~_keys.in_grid(indices[:, 1:], spatial_shape), OUT_OF_GRID, status)
  return jnp.where(batch == -1, PADDING, status).astype(jnp.int32)


def _range_status_ffi(indices, spatial_shape, batch_size):
  return _ffi.call(
    "jsparse_check_indices",
    jax.ShapeDtypeStruct(indices.shape[:1], jnp.int32),
    indices,
    spatial_shape=np.asarray(spatial_shape, np.int64),
    batch_size=np.int64(batch_size),
  )


def check_indices(indices: jax.Array, spatial_shape: Sequence[int], batch_size: int) -> jax.Array:
  """Classifies each row of ``indices``; jittable.

  Args:
    indices: int32 ``[N, 1 + ndim]``, column 0 the batch index.
    spatial_shape: the grid, ``ndim`` positive ints.
    batch_size: positive int.

  Returns:
    int32 ``[N]``: ``ACTIVE`` (0), ``PADDING`` (1: batch index -1), ``BAD_BATCH`` (2: batch index
    < -1 or >= batch_size), ``OUT_OF_GRID`` (3: a coordinate outside ``[0, spatial_shape)``) or
    ``DUPLICATE`` (4: the same site as an earlier active row).

  >>> import jax.numpy as jnp
  >>> idx = jnp.array([[0, 1, 1], [-1, -1, -1], [2, 0, 0], [0, 9, 0], [0, 1, 1]], jnp.int32)
  >>> check_indices(idx, (4, 4), batch_size=2).tolist()
  [0, 1, 2, 3, 4]
  """
  spatial_shape = tuple(int(n) for n in spatial_shape)
  if indices.dtype != jnp.int32 or indices.ndim != 2 or indices.shape[1] != 1 + len(spatial_shape):
    raise ValueError(
      f"indices must be int32 [N, 1 + ndim] = [N, {1 + len(spatial_shape)}] for spatial_shape "
      f"{spatial_shape}, got {indices.dtype} {indices.shape}"
    )
  _keys.key_radices(batch_size, spatial_shape)  # validates the extents
  return _check_indices(indices, spatial_shape, batch_size)


def _check_indices_impl(indices: jax.Array, spatial_shape: tuple[int, ...], batch_size: int) -> jax.Array:
  radices = _keys.key_radices(batch_size, spatial_shape)
  status = _backend.dispatch(
    "jsparse_check_indices",
    lambda i: _range_status_ffi(i, spatial_shape, batch_size),
    lambda i: _range_status_reference(i, spatial_shape, batch_size),
    indices,
  )
  table = _keys.sort_keys(_keys.pack(indices[:, 0], indices[:, 1:], status == ACTIVE, radices))
  repeated = ~_keys.first_of_runs(table.words) & (table.words[0] != _keys.INT32_MAX)
  duplicate = jnp.zeros(status.shape, bool).at[table.order].set(repeated)
  return jnp.where(duplicate, DUPLICATE, status)


_check_indices = _backend.jit(_check_indices_impl, static_argnames=("spatial_shape", "batch_size"))
