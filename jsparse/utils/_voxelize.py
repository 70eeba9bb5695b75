"""spconv's point-cloud utilities: ``PointToVoxel``, ``gather_features_by_pc_voxel_id``, and the
mean voxel feature encoder of SECOND and CenterPoint."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsparse._capacity import is_concrete, overflow_entry
from jsparse._porting import explains_spconv_arguments
from jsparse.ops import Voxels, grid_size, voxelize


class PointToVoxel:
  """Groups a point cloud into voxels, as ``spconv.pytorch.utils.PointToVoxel`` (spconv 2.3).

  Parameters are in xyz order, output coordinates in zyx order. Voxel rows follow the order in
  which points open them; each voxel stores its first ``max_num_points_per_voxel`` points; points
  that would open a voxel past ``max_num_voxels`` are dropped (``pc_voxel_id`` -1). See
  :func:`jsparse.ops.voxelize` for the exact rules.

  Shapes: eager calls return spconv's values, the ``V`` voxels that exist (at most
  ``max_num_voxels``). Under ``jit`` shapes are static: outputs have ``max_num_voxels`` rows, padding
  rows with coords -1 and zero counts. :meth:`generate` always returns the padded
  :class:`jsparse.ops.Voxels`, with ``num_voxels``.

  Overflow: spconv drops voxels silently. Here an eager call that drops voxels warns, and under
  jit :meth:`overflow` turns a :meth:`generate` result into a record for
  :func:`jsparse.check_capacity`.

  Args:
    vsize_xyz: voxel size, 2 to 4 floats (x, y[, z[, t]]).
    coors_range_xyz: the minima, then the maxima, ``2 * len(vsize_xyz)`` floats.
    num_point_features: ``F``, columns per point (coordinates first).
    max_num_voxels: the static number of voxel rows.
    max_num_points_per_voxel: the static number of point slots per voxel.

  Attributes:
    grid_size: the grid in zyx order, a list (spconv's attribute, spconv's order).
    spatial_shape: the same grid as a tuple, the ``spatial_shape`` of a ``SparseConvTensor``
      built from the coords.
    grid_size_xyz: the grid in xyz order.

  >>> import numpy as np
  >>> gen = PointToVoxel([0.5, 0.5, 0.5], [0, 0, 0, 4, 4, 2], 4, max_num_voxels=100,
  ...                    max_num_points_per_voxel=5)
  >>> gen.spatial_shape
  (4, 8, 8)
  >>> pc = np.random.default_rng(0).uniform(0, 2, size=(1000, 4)).astype(np.float32)
  >>> voxels, coords, num_points, pc_voxel_id = gen.generate_voxel_with_id(pc)
  >>> voxels.shape, coords.shape, num_points.shape, pc_voxel_id.shape
  ((64, 5, 4), (64, 3), (64,), (1000,))
  """

  @explains_spconv_arguments
  def __init__(
    self,
    vsize_xyz: Sequence[float],
    coors_range_xyz: Sequence[float],
    num_point_features: int,
    max_num_voxels: int,
    max_num_points_per_voxel: int,
  ) -> None:
    self.vsize_xyz = tuple(float(v) for v in vsize_xyz)
    self.coors_range_xyz = tuple(float(v) for v in coors_range_xyz)
    self.grid_size_xyz = grid_size(self.vsize_xyz, self.coors_range_xyz)
    self.ndim = len(self.vsize_xyz)
    if num_point_features < self.ndim:
      raise ValueError(
        f"num_point_features={num_point_features} must be >= {self.ndim}: points carry their "
        f"{self.ndim} coordinates in the first columns"
      )
    if max_num_voxels < 1 or max_num_points_per_voxel < 1:
      raise ValueError(
        f"max_num_voxels={max_num_voxels} and max_num_points_per_voxel={max_num_points_per_voxel} "
        "must be >= 1"
      )
    self.num_point_features = int(num_point_features)
    self.max_num_voxels = int(max_num_voxels)
    self.max_num_points_per_voxel = int(max_num_points_per_voxel)

  @property
  def spatial_shape(self) -> tuple[int, ...]:
    return self.grid_size_xyz[::-1]

  @property
  def grid_size(self) -> list[int]:
    return list(self.spatial_shape)

  def _check(self, pc: jax.Array) -> None:
    if np.ndim(pc) != 2 or np.shape(pc)[1] != self.num_point_features:
      raise ValueError(
        f"pc must be [P, num_point_features] = [P, {self.num_point_features}], got shape "
        f"{np.shape(pc)}; build the PointToVoxel with num_point_features={np.shape(pc)[-1]} "
        "or select the columns"
      )
    dtype = pc.dtype if hasattr(pc, "dtype") else np.asarray(pc).dtype  # before jax's x64 canonicalization
    if dtype != np.float32:
      raise ValueError(f"pc must be float32, got {dtype}; use pc.astype(np.float32)")

  def generate(
    self,
    pc: jax.Array,
    *,
    empty_mean: bool = False,
    num_points: jax.Array | int | None = None,
    reuse: jax.Array | None = None,
  ) -> Voxels:
    """The full, padded result (jittable).

    Args:
      pc: float32 ``[P, num_point_features]``.
      empty_mean: fill each voxel's empty slots with the mean of its stored points.
      num_points: int ``[]`` (may be traced): only rows ``[0, num_points)`` are points.
      reuse: the ``voxels`` of an earlier :meth:`generate` result that is no longer needed,
        donated to hold the new voxels (spconv's reuse of its buffers, see
        :func:`jsparse.ops.voxelize`): ``out = gen.generate(pc, reuse=out.voxels)``.

    Returns:
      :class:`jsparse.ops.Voxels`: voxels ``[max_num_voxels, M, F]``, coords int32
      ``[max_num_voxels, ndim]`` (zyx), num_points_per_voxel ``[max_num_voxels]``, pc_voxel_id
      ``[P]``, num_voxels ``[]`` (the voxels the points open, possibly more than fit).
    """
    self._check(pc)
    return voxelize(
      pc,
      num_points,
      voxel_size=self.vsize_xyz,
      coors_range=self.coors_range_xyz,
      max_num_voxels=self.max_num_voxels,
      max_num_points_per_voxel=self.max_num_points_per_voxel,
      empty_mean=empty_mean,
      reuse=reuse,
    )

  def overflow(self, result: Voxels) -> dict[str, jax.Array]:
    """``{label: int32 [needed, capacity]}`` for :func:`jsparse.check_capacity` (usable under jit:
    return it from the step and check it on the host)."""
    return {"PointToVoxel max_num_voxels": overflow_entry(result.num_voxels, self.max_num_voxels)}

  def generate_voxel_with_id(
    self, pc: jax.Array, *, empty_mean: bool = False, num_points: jax.Array | int | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(voxels [V, M, F], coords int32 [V, ndim] zyx, num_points_per_voxel [V], pc_voxel_id [P])``.

    ``V`` is the number of voxels (eager) or ``max_num_voxels`` (under jit). ``pc_voxel_id`` is
    -1 for points outside the range, with non-finite coordinates, past ``num_points``, or whose
    voxel did not fit. Arguments as :meth:`generate`.
    """
    return self._spconv_outputs(pc, empty_mean, num_points)

  def __call__(
    self, pc: jax.Array, *, empty_mean: bool = False, num_points: jax.Array | int | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(voxels, coords, num_points_per_voxel)``: :meth:`generate_voxel_with_id` without the ids.

    The options are keyword-only: spconv's second positional argument is ``clear_voxels``, which
    has no counterpart here (outputs are always fresh arrays).
    """
    return self._spconv_outputs(pc, empty_mean, num_points)[:3]

  def _spconv_outputs(self, pc, empty_mean, num_points):
    """spconv's four outputs; eager calls trim them to the voxels and warn when some were dropped."""
    voxels, coords, counts, ids, num_voxels = self.generate(pc, empty_mean=empty_mean, num_points=num_points)
    if is_concrete(num_voxels):
      needed = int(num_voxels)
      if needed > self.max_num_voxels:
        warnings.warn(
          f"PointToVoxel: the points open {needed} voxels but max_num_voxels={self.max_num_voxels}; "
          f"the points of the last {needed - self.max_num_voxels} have pc_voxel_id -1. Raise "
          f"max_num_voxels to >= {needed} to keep them.",
          UserWarning,
          stacklevel=3,  # the caller of __call__ or generate_voxel_with_id
        )
      used = min(needed, self.max_num_voxels)
      voxels, coords, counts = voxels[:used], coords[:used], counts[:used]
    return voxels, coords, counts, ids


def gather_features_by_pc_voxel_id(
  seg_features: jax.Array, pc_voxel_id: jax.Array, invalid_value: float | int = 0
) -> jax.Array:
  """Per-point features from per-voxel ones: row ``pc_voxel_id[i]`` of ``seg_features``, or
  ``invalid_value`` where the id is -1 (as spconv's function of that name).

  Args:
    seg_features: ``[V, ...]`` per-voxel results (e.g. segmentation logits).
    pc_voxel_id: int ``[P]`` from :meth:`PointToVoxel.generate_voxel_with_id`.
    invalid_value: the value of points without a voxel.

  Returns:
    ``[P, ...]`` with ``seg_features``'s dtype.

  >>> import jax.numpy as jnp
  >>> gather_features_by_pc_voxel_id(jnp.array([[1.0], [2.0]]), jnp.array([1, -1, 0])).tolist()
  [[2.0], [0.0], [1.0]]
  """
  valid = pc_voxel_id >= 0
  rows = jnp.take(seg_features, jnp.where(valid, pc_voxel_id, 0), axis=0, mode="clip")
  mask = valid.reshape(valid.shape + (1,) * (seg_features.ndim - 1))
  return jnp.where(mask, rows, jnp.asarray(invalid_value, seg_features.dtype))


def mean_voxel_features(voxels: jax.Array, num_points_per_voxel: jax.Array) -> jax.Array:
  """The mean of each voxel's stored points (SECOND / CenterPoint's ``MeanVFE``).

  Args:
    voxels: ``[V, M, F]`` from :class:`PointToVoxel` (empty slots are ignored, so either
      ``empty_mean`` setting works).
    num_points_per_voxel: int ``[V]``.

  Returns:
    ``[V, F]``: the sum of the stored points over their count; zero rows where the count is 0.

  >>> import jax.numpy as jnp
  >>> mean_voxel_features(jnp.array([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]),
  ...                     jnp.array([2, 0])).tolist()
  [[2.0, 3.0], [0.0, 0.0]]
  """
  slots = jnp.arange(voxels.shape[1])[None, :] < num_points_per_voxel[:, None]
  total = jnp.sum(jnp.where(slots[:, :, None], voxels, 0), axis=1)
  count = jnp.maximum(num_points_per_voxel, 1).astype(voxels.dtype)[:, None]
  return total / count


def bounding_range(points: np.ndarray, voxel_size: Sequence[float]) -> list[float]:
  """A ``coors_range_xyz`` for :class:`PointToVoxel` that holds every finite point of
  ``points [P, >= 3]``: the minima, then the minima plus whole voxels past the maxima (one spare,
  against rounding).

  >>> bounding_range(np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5]], np.float32), [1.0, 1.0, 1.0])
  [0.0, 0.0, 0.0, 3.0, 4.0, 2.0]
  """
  xyz = points[:, :3][np.all(np.isfinite(points[:, :3]), axis=1)]
  if len(xyz) == 0:
    raise ValueError("the point cloud has no point with finite x, y, z")
  size = np.asarray(voxel_size, np.float64)
  low = xyz.min(0).astype(np.float64)
  high = low + size * (np.floor((xyz.max(0) - low) / size) + 2)
  return [*low.tolist(), *high.tolist()]


def voxelize_mean(points: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  """Mean-pooled cubic voxels of ``points [P, F]`` (x, y, z first) over their bounding box, on the
  host (numpy): every point counts, however many share a voxel.

  Voxel ids come from :class:`PointToVoxel`; each voxel's features are the mean of all its
  points.

  Returns:
    ``(features [V, F] per-voxel means, coords int32 [V, 3] in zyx order sorted, spatial_shape zyx)``.

  >>> import numpy as np
  >>> pts = np.array([[0.1, 0.1, 0.1, 1.0], [0.2, 0.1, 0.1, 3.0], [1.5, 0.1, 0.1, 5.0]], np.float32)
  >>> features, coords, shape = voxelize_mean(pts, 1.0)
  >>> features[:, 3].tolist(), coords.tolist()
  ([2.0, 5.0], [[0, 0, 0], [0, 0, 1]])
  """
  points = np.asarray(points, np.float32)
  size = [float(voxel_size)] * 3
  gen = PointToVoxel(size, bounding_range(points, size), points.shape[1], len(points), 1)
  _, coords, _, ids = (np.asarray(a) for a in gen.generate_voxel_with_id(points))
  kept = ids >= 0
  sums = np.zeros((len(coords), points.shape[1]))
  np.add.at(sums, ids[kept], points[kept])
  counts = np.bincount(ids[kept], minlength=len(coords))
  order = np.lexsort(coords.T[::-1])
  return (sums / counts[:, None])[order].astype(np.float32), coords[order], gen.spatial_shape
