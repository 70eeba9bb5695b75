"""Point-cloud voxelization: spconv 2.3's ``PointToVoxel`` as a jittable function.

Semantics (``voxel_size`` and ``coors_range`` in xyz, outputs in zyx), per axis ``a``:

- ``grid[a] = round((max[a] - min[a]) / voxel_size[a])`` (float32 arithmetic, halves away from 0);
- a point's cell is ``c[a] = floor((p[a] - min[a]) / voxel_size[a])`` in float32, and the point is
  valid iff ``0 <= c[a] < grid[a]`` on every axis (non-finite coordinates never are);
- voxel ids follow the order in which points open voxels (rows ``0 .. V - 1``); a voxel stores
  its first ``max_num_points_per_voxel`` points in point order, later points keep its id;
- points that would open a voxel past ``max_num_voxels`` get id -1, and ``num_voxels`` counts
  every voxel the points open, so an overflow is visible (:func:`jsparse.check_capacity`);
- ``empty_mean=True`` fills a voxel's empty slots with the mean of its stored points (per voxel;
  spconv's CPU version accumulates across voxels, issue 477).

Two backends (:func:`jsparse.backend`) with bitwise identical results: the FFI kernel
(``xla_ffi/cpu/voxelize.cc``: cell keys in parallel, first-come ids from one thread's walk
through a hash table of them, then the voxel rows in parallel, padding rows while the ids are
being assigned; ``xla_ffi/cuda/voxelize.cu``: first points by atomic minimum, ids by a scan) and
a jnp reference that sorts points by cell. Under ``vmap`` each cloud is
voxelized on its own (the FFI kernel runs once per cloud).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsparse import _ffi
from jsparse.ops import _backend

_TARGET = "jsparse_voxelize"
# Cells are compared in float before any integer conversion: q < 2**31 keeps it defined.
_CELL_LIMIT = np.float32(2**31)


class Voxels(NamedTuple):
  """The result of :func:`voxelize` (``V = max_num_voxels``, ``M = max_num_points_per_voxel``).

  Attributes:
    voxels: float32 ``[V, M, F]``: each voxel's stored points; empty slots 0 (or the voxel's mean
      with ``empty_mean``), padding rows 0.
    coords: int32 ``[V, ndim]``: voxel cells in zyx order; padding rows -1.
    num_points_per_voxel: int32 ``[V]``: stored points per voxel (at most ``M``); padding rows 0.
    pc_voxel_id: int32 ``[P]``: each point's voxel row, or -1 (outside the range, non-finite,
      past ``num_points``, or its voxel did not fit).
    num_voxels: int32 ``[]``: how many voxels the points open; more than ``V`` means some were
      dropped. Rows ``[0, min(num_voxels, V))`` are voxels.
  """

  voxels: jax.Array
  coords: jax.Array
  num_points_per_voxel: jax.Array
  pc_voxel_id: jax.Array
  num_voxels: jax.Array


def grid_size(voxel_size: Sequence[float], coors_range: Sequence[float]) -> tuple[int, ...]:
  """The grid in xyz order, as spconv computes it: ``round((max - min) / voxel_size)`` in float32.

  Raises ValueError for inconsistent or empty geometry.

  >>> grid_size((0.1, 0.1, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))
  (1024, 1024, 40)
  """
  ndim = len(voxel_size)
  if not 2 <= ndim <= 4:
    raise ValueError(f"voxel_size={tuple(voxel_size)} must have 2 to 4 entries (x, y[, z[, t]])")
  if len(coors_range) != 2 * ndim:
    raise ValueError(
      f"coors_range={tuple(coors_range)} must have {2 * ndim} entries (the {ndim} minima, then the "
      f"{ndim} maxima) for voxel_size={tuple(voxel_size)}"
    )
  vsize = np.asarray(voxel_size, np.float32)
  low = np.asarray(coors_range[:ndim], np.float32)
  high = np.asarray(coors_range[ndim:], np.float32)
  if not (np.all(np.isfinite(vsize)) and np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
    raise ValueError(f"voxel_size={tuple(voxel_size)} and coors_range={tuple(coors_range)} must be finite")
  if np.any(vsize <= 0):
    raise ValueError(f"voxel_size={tuple(voxel_size)} must be positive on every axis")
  with np.errstate(over="ignore"):
    extent = (high - low) / vsize  # float32, as spconv's std::array<float>
  # std::round: halves away from zero (numpy rounds them to even); exact in float64.
  grid = tuple(int(math.copysign(math.floor(abs(float(e)) + 0.5), float(e))) for e in extent)
  if any(not 1 <= n < 2**31 for n in grid):
    raise ValueError(
      f"coors_range={tuple(coors_range)} with voxel_size={tuple(voxel_size)} gives the grid {grid} "
      "(xyz); every axis needs max > min and between 1 and 2**31 - 1 voxels"
    )
  if math.prod(grid) >= 2**62:
    raise ValueError(f"the grid {grid} has too many cells (at most 2**62); use larger voxels")
  return grid


def _exact_divisor(divisor: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``divisor`` broadcast to ``shape`` behind an optimization barrier: XLA rewrites a division
  by a broadcast into a multiplication by its reciprocal, which can change the last bit (the FFI
  kernel and spconv divide)."""
  return lax.optimization_barrier(jnp.broadcast_to(divisor, shape))


def _cells(points, vsize, low, grid, num_points):
  """int32 cells ``[P, ndim]`` in xyz order (0 where invalid) and validity ``[P]``."""
  p, ndim = points.shape[0], len(grid)
  q = (points[:, :ndim] - jnp.asarray(low)[None]) / _exact_divisor(jnp.asarray(vsize)[None], (p, ndim))
  inside = (q >= 0) & (q < _CELL_LIMIT)  # False for NaN
  cells = jnp.where(inside, q, 0).astype(jnp.int32)  # q >= 0: truncation is floor
  valid = jnp.all(inside & (cells < jnp.asarray(grid, jnp.int32)[None]), axis=1)
  valid &= jnp.arange(points.shape[0]) < num_points
  return jnp.where(valid[:, None], cells, 0), valid


def _geometry(voxel_size, coors_range) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]:
  """``(vsize, low, grid)``: voxel size and range minima rounded to float32, and the grid (xyz)."""
  grid = grid_size(voxel_size, coors_range)
  vsize = tuple(float(np.float32(v)) for v in voxel_size)
  low = tuple(float(np.float32(v)) for v in coors_range[: len(grid)])
  return vsize, low, grid


def points_in_range(
  points: jax.Array, voxel_size: Sequence[float], coors_range: Sequence[float]
) -> jax.Array:
  """bool ``[P]``: the points of float32 ``[P, F]`` whose cell lies in the grid (the rule
  :func:`voxelize` applies before any capacity limit).

  >>> import jax.numpy as jnp
  >>> pts = jnp.array([[0.5, 0.5], [4.5, 0.5], [jnp.nan, 0.0]])
  >>> points_in_range(pts, (1.0, 1.0), (0.0, 0.0, 4.0, 4.0)).tolist()
  [True, False, False]
  """
  return _cells(jnp.asarray(points, jnp.float32), *_geometry(voxel_size, coors_range), points.shape[0])[1]


def _voxelize_reference(points, num_points, vsize, low, grid, max_voxels, max_points, empty_mean):
  p, features = points.shape
  ndim = len(grid)
  cells, valid = _cells(points, vsize, low, grid, num_points)
  zyx = cells[:, ::-1]
  row = jnp.arange(p, dtype=jnp.int32)
  # Stable sort by (invalid, z, y, x): each voxel's points form a run, in point order.
  keys = [(~valid).astype(jnp.int32)] + [zyx[:, a] for a in range(ndim)]
  *sorted_keys, order = lax.sort((*keys, row), num_keys=ndim + 1, is_stable=True)
  sorted_valid = sorted_keys[0] == 0
  changed = jnp.any(jnp.stack([k[1:] != k[:-1] for k in sorted_keys[1:]]), axis=0)
  first = sorted_valid & jnp.concatenate([jnp.ones(1, bool), changed])
  start = lax.cummax(jnp.where(first, row, 0))  # sorted position where each run begins
  rank = row - start  # position of the point among its voxel's points
  head = order[start]  # the point that opens the voxel
  # Voxel ids in first-come order: the number of opening points before the voxel's own.
  opens = jnp.zeros(p, jnp.int32).at[order].set(first.astype(jnp.int32))
  opened_before = jnp.cumsum(opens) - opens
  voxel = opened_before[head]
  kept = sorted_valid & (voxel < max_voxels)
  ids = jnp.full(p, -1, jnp.int32).at[order].set(jnp.where(kept, voxel, -1))
  stored = kept & (rank < max_points)
  slot = jnp.where(stored, voxel * max_points + rank, max_voxels * max_points)  # out of bounds: dropped
  voxels = jnp.zeros((max_voxels * max_points, points.shape[1]), jnp.float32)
  voxels = voxels.at[slot].set(points[order], mode="drop").reshape(max_voxels, max_points, -1)
  counts = jnp.zeros(max_voxels, jnp.int32).at[jnp.where(stored, voxel, max_voxels)].add(1, mode="drop")
  opener = jnp.where(kept & (rank == 0), voxel, max_voxels)
  coords = jnp.full((max_voxels, ndim), -1, jnp.int32).at[opener].set(zyx[order], mode="drop")
  if empty_mean:
    voxels = _fill_empty_with_mean(voxels, counts)
  return Voxels(voxels, coords, counts, ids, jnp.sum(first, dtype=jnp.int32))


def _fill_empty_with_mean(voxels: jax.Array, counts: jax.Array) -> jax.Array:
  """Empty slots of non-empty rows get the mean of the stored points, summed in slot order from
  +0.0 (the FFI kernel's order, so the bits agree)."""
  total = jnp.zeros((voxels.shape[0], voxels.shape[2]), jnp.float32)
  for j in range(voxels.shape[1]):
    total = total + jnp.where((j < counts)[:, None], voxels[:, j], 0.0)
  mean = total / _exact_divisor(jnp.maximum(counts, 1).astype(jnp.float32)[:, None], total.shape)
  empty = (jnp.arange(voxels.shape[1])[None] >= counts[:, None]) & (counts > 0)[:, None]
  return jnp.where(empty[:, :, None], mean[:, None, :], voxels)


def _results(num_points, features, ndim, max_voxels, max_points):
  """The shapes of the FFI results, in :class:`Voxels` order."""

  def int32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)

  voxels = jax.ShapeDtypeStruct((max_voxels, max_points, features), jnp.float32)
  return (voxels, int32(max_voxels, ndim), int32(max_voxels), int32(num_points), int32())


def _geometry_attributes(vsize, low, grid):
  """The handlers' geometry attributes, from :func:`_geometry`'s values."""
  return dict(
    voxel_size=np.asarray(vsize, np.float32),
    range_min=np.asarray(low, np.float32),
    grid_size=np.asarray(grid, np.int64),
  )


def _voxelize_ffi(points, num_points, vsize, low, grid, max_voxels, max_points, empty_mean, reuse=None):
  # With reuse, the donated old voxels (never read) are aliased to the voxels result.
  results = _results(points.shape[0], points.shape[1], len(grid), max_voxels, max_points)
  outputs = _ffi.call(
    _TARGET,
    results,
    points,
    num_points,
    jnp.zeros(0, jnp.float32) if reuse is None else reuse,
    input_output_aliases=None if reuse is None else {2: 0},
    **_geometry_attributes(vsize, low, grid),
    empty_mean=np.int64(empty_mean),
  )
  return Voxels(*outputs)


def _voxelize(
  points: jax.Array,
  num_points: jax.Array | int | None = None,
  *,
  voxel_size: tuple[float, ...],
  coors_range: tuple[float, ...],
  max_num_voxels: int,
  max_num_points_per_voxel: int,
  empty_mean: bool = False,
  reuse: jax.Array | None = None,
) -> Voxels:
  """Groups points into voxels, spconv 2.3 ``PointToVoxel`` semantics (see the module docstring).

  Args:
    points: float32 ``[P, F]``, coordinates (x, y[, z[, t]]) in the first ``ndim`` columns.
    num_points: int ``[]`` (may be traced): only rows ``[0, num_points)`` are points, the rest
      padding; ``None`` means all ``P`` rows.
    voxel_size: ``ndim`` (2 to 4) floats, xyz order.
    coors_range: ``2 * ndim`` floats: the minima, then the maxima, xyz order.
    max_num_voxels: ``V``, static number of voxel rows.
    max_num_points_per_voxel: ``M``, static number of point slots per voxel.
    empty_mean: fill empty slots with the voxel's mean instead of zeros.
    reuse: optional float32 ``[V, M, F]``, the ``voxels`` of an earlier result that is no longer
      needed. It is donated (treat it as consumed): the FFI kernel writes the new voxels into its
      memory, as spconv refills its buffers, so a stream of clouds does not allocate a fresh
      ``V * M * F`` array each call.
      Inside your own ``jax.jit``, donate it there (``donate_argnums``), or XLA copies it.

  Returns:
    :class:`Voxels` (voxels ``[V, M, F]``, coords int32 ``[V, ndim]`` zyx, num_points_per_voxel
    ``[V]``, pc_voxel_id ``[P]``, num_voxels ``[]``).

  >>> import jax.numpy as jnp
  >>> pts = jnp.array([[0.5, 0.5, 2.0], [0.7, 0.2, 3.0], [1.5, 0.5, 4.0], [9.0, 0.0, 0.0]])
  >>> out = voxelize(pts, voxel_size=(1.0, 1.0), coors_range=(0.0, 0.0, 4.0, 4.0),
  ...                max_num_voxels=4, max_num_points_per_voxel=2)
  >>> out.coords.tolist(), out.pc_voxel_id.tolist(), int(out.num_voxels)
  ([[0, 0], [0, 1], [-1, -1], [-1, -1]], [0, 0, 1, -1], 2)
  """
  if points.ndim != 2 or points.dtype != jnp.float32:
    raise ValueError(
      f"points must be float32 [P, F], got {points.dtype} {points.shape}; use points.astype(jnp.float32)"
    )
  grid = grid_size(voxel_size, coors_range)
  ndim = len(grid)
  if points.shape[1] < ndim:
    raise ValueError(f"points [P, F] = {points.shape} need F >= {ndim} columns for a {ndim}-D voxel_size")
  if max_num_voxels < 1 or max_num_points_per_voxel < 1:
    raise ValueError(
      f"max_num_voxels={max_num_voxels} and max_num_points_per_voxel={max_num_points_per_voxel} must be >= 1"
    )
  if points.shape[0] >= 2**31:
    raise ValueError(f"{points.shape[0]} points are more than int32 ids reach; split the cloud")
  if max_num_voxels * max_num_points_per_voxel >= 2**31:
    raise ValueError(
      f"max_num_voxels={max_num_voxels} x max_num_points_per_voxel={max_num_points_per_voxel} = "
      f"{max_num_voxels * max_num_points_per_voxel} point slots; they are numbered with int32 (fewer "
      "than 2**31): lower either (points past max_num_points_per_voxel still get their voxel id)"
    )
  if num_points is None:
    num_points = points.shape[0]
  num_points = jnp.asarray(num_points, jnp.int32)
  if num_points.ndim != 0:
    raise ValueError(f"num_points must be a scalar, got shape {num_points.shape}")
  if reuse is not None:
    want = (max_num_voxels, max_num_points_per_voxel, points.shape[1])
    if reuse.shape != want or reuse.dtype != jnp.float32:
      raise ValueError(
        f"reuse must be the float32 voxels {want} of an earlier result with the same sizes, got "
        f"{reuse.dtype} {reuse.shape}"
      )
  static = (
    *_geometry(voxel_size, coors_range),
    int(max_num_voxels),
    int(max_num_points_per_voxel),
    bool(empty_mean),
  )
  # The reference path ignores `reuse` (jit then drops the unused argument instead of consuming it).
  return _backend.dispatch(
    _TARGET,
    lambda pts, n, *buffer: _voxelize_ffi(pts, n, *static, *buffer),
    lambda pts, n, *buffer: _voxelize_reference(pts, n, *static),
    points,
    num_points,
    *(() if reuse is None else (reuse,)),
  )


voxelize = _backend.jit(
  _voxelize,
  static_argnames=("voxel_size", "coors_range", "max_num_voxels", "max_num_points_per_voxel", "empty_mean"),
  donate_argnames=("reuse",),
)
