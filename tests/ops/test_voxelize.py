"""jsparse.ops.voxelize and its FFI handler against a plain-numpy loop over the points.

The oracle below is the specification (spconv 2.3's PointToVoxel, DESIGN.md section 3) written
point by point, independently of both backends; every case runs on the FFI kernel and on the
reference path (the ``backend`` fixture), each under jit on the CPU and on a CUDA device (the
``ffi_device`` fixture: CUDA cases skip without a GPU), and all must equal it exactly; these
skip where the CPU extension is not built. The FFI kernels must also be deterministic, and give
the CPU kernel's bits on every device. tests/utils/test_voxelize.py checks
jsparse.utils.PointToVoxel and the other point-cloud utilities.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jsparse
from jsparse import _ffi, ops
from sparse_data import clustered_points, needs_ffi


def oracle(points, voxel_size, coors_range, max_voxels, max_points, empty_mean=False, num_points=None):
  """The specification, one point at a time: returns the five outputs of ``ops.voxelize``."""
  points = np.asarray(points, np.float32)
  ndim = len(voxel_size)
  vsize = np.asarray(voxel_size, np.float32)
  low = np.asarray(coors_range[:ndim], np.float32)
  high = np.asarray(coors_range[ndim:], np.float32)
  grid = [math.floor(float((high[a] - low[a]) / vsize[a]) + 0.5) for a in range(ndim)]  # round half up
  features = points.shape[1]
  voxels = np.zeros((max_voxels, max_points, features), np.float32)
  coords = np.full((max_voxels, ndim), -1, np.int32)
  counts = np.zeros(max_voxels, np.int32)
  ids = np.full(len(points), -1, np.int32)
  voxel_of_cell: dict[tuple[int, ...], int] = {}
  for i, point in enumerate(points):
    if num_points is not None and i >= num_points:
      continue
    cell = []
    for a in range(ndim):
      with np.errstate(invalid="ignore", over="ignore"):
        q = (point[a] - low[a]) / vsize[a]  # float32 scalars: float32 arithmetic
      if not np.isfinite(q) or not 0 <= math.floor(q) < grid[a]:
        break
      cell.append(math.floor(q))
    else:
      key = tuple(reversed(cell))  # zyx
      if key not in voxel_of_cell:
        voxel_of_cell[key] = len(voxel_of_cell)
      v = voxel_of_cell[key]
      if v >= max_voxels:
        continue
      ids[i] = v
      coords[v] = key
      if counts[v] < max_points:
        voxels[v, counts[v]] = point
        counts[v] += 1
  if empty_mean:
    for v in range(min(len(voxel_of_cell), max_voxels)):
      total = np.zeros(features, np.float32)
      for j in range(counts[v]):
        total = total + voxels[v, j]
      voxels[v, counts[v] :] = total / np.float32(counts[v])
  return voxels, coords, counts, ids, len(voxel_of_cell)


def run(points, num_points=None, device=None, **kwargs):
  """``ops.voxelize`` under a fresh jit on the backend in force (jit caches traces per function
  object, and the backend is read when tracing), with the inputs on ``device`` (default: the
  default device); checks that it ran there."""
  fn = jax.jit(lambda p, n: ops.voxelize(p, n, **kwargs))
  points = jnp.asarray(points, jnp.float32)
  if device is not None:
    points = jax.device_put(points, device)
    if num_points is not None:
      num_points = jax.device_put(jnp.int32(num_points), device)
  out = fn(points, num_points)
  if device is not None:
    assert all(a.devices() == {device} for a in out), f"ran on {out.voxels.devices()}, not {device}"
  return jax.tree.map(np.asarray, out)


def assert_matches_oracle(points, num_points=None, empty_mean=False, device=None, **kwargs):
  expected = oracle(
    points,
    kwargs["voxel_size"],
    kwargs["coors_range"],
    kwargs["max_num_voxels"],
    kwargs["max_num_points_per_voxel"],
    empty_mean,
    num_points,
  )
  got = run(points, num_points, device, empty_mean=empty_mean, **kwargs)
  where = f"on the {ops.current_backend()} backend on {device}"
  for name, want, have in zip(got._fields, expected, got):
    np.testing.assert_array_equal(have, want, err_msg=f"{name} {where}")


GEOMETRY = {
  2: dict(voxel_size=(0.5, 0.5), coors_range=(0.0, 0.0, 3.0, 2.5)),
  3: dict(voxel_size=(0.5, 0.5, 0.5), coors_range=(0.0, 0.0, 0.0, 3.0, 2.5, 2.0)),
  4: dict(voxel_size=(0.5, 0.5, 0.5, 1.0), coors_range=(0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.5, 2.0)),
}


@pytest.mark.parametrize("ndim", [2, 3, 4])
@pytest.mark.parametrize("empty_mean", [False, True])
@pytest.mark.parametrize(("max_voxels", "max_points"), [(64, 8), (64, 2), (5, 3), (1, 1)])
def test_matches_oracle(backend, ffi_device, ndim, empty_mean, max_voxels, max_points):
  """Both overflow rules: (64, 2) drops points from full voxels, (5, 3) and (1, 1) drop voxels."""
  points = clustered_points(np.random.default_rng(ndim), 120, ndim, 6, ndim + 2)
  kwargs = dict(GEOMETRY[ndim], max_num_voxels=max_voxels, max_num_points_per_voxel=max_points)
  assert_matches_oracle(points, empty_mean=empty_mean, device=ffi_device, **kwargs)


def test_voxel_overflow_is_counted(backend, ffi_device):
  points = clustered_points(np.random.default_rng(0), 200, 3, 6, 4)
  out = run(points, device=ffi_device, **GEOMETRY[3], max_num_voxels=4, max_num_points_per_voxel=3)
  assert out.num_voxels > 4
  assert set(np.unique(out.pc_voxel_id)) == {-1, 0, 1, 2, 3}
  assert np.all(out.num_points_per_voxel >= 1)


def test_non_finite_points_are_dropped(backend, ffi_device):
  points = np.array(
    [[0.1, 0.1, 0.1], [np.nan, 0.1, 0.1], [0.1, np.inf, 0.1], [0.1, 0.1, -np.inf], [0.2, 0.2, np.nan],
     [1e30, 0.1, 0.1], [-1e30, 0.1, 0.1], [0.3, 0.3, 0.3]],
    np.float32,
  )  # fmt: skip
  kwargs = dict(GEOMETRY[3], max_num_voxels=4, max_num_points_per_voxel=4)
  assert_matches_oracle(points, device=ffi_device, **kwargs)
  assert run(points, device=ffi_device, **kwargs).pc_voxel_id.tolist() == [0, -1, -1, -1, -1, -1, -1, 0]


def test_non_finite_features_are_kept(backend, ffi_device):
  """Only the coordinates decide validity; a NaN feature is stored (and spreads into the mean)."""
  points = np.array([[0.1, 0.1, np.nan], [0.2, 0.2, 1.0]], np.float32)
  kwargs = dict(voxel_size=(1.0, 1.0), coors_range=(0.0, 0.0, 1.0, 1.0), max_num_voxels=2, device=ffi_device)
  assert_matches_oracle(points, empty_mean=True, max_num_points_per_voxel=3, **kwargs)
  out = run(points, empty_mean=True, max_num_points_per_voxel=3, **kwargs)
  assert out.pc_voxel_id.tolist() == [0, 0] and np.isnan(out.voxels[0, 2, 2])


@pytest.mark.parametrize("num_points", [0, 1, 37, 120, 500, -3])
def test_num_points_marks_padding_rows(backend, ffi_device, num_points):
  points = clustered_points(np.random.default_rng(1), 120, 3, 6, 4)
  points[60:] = 0.25  # padding rows that would be valid points if counted
  kwargs = dict(GEOMETRY[3], max_num_voxels=32, max_num_points_per_voxel=4)
  assert_matches_oracle(points, num_points=num_points, device=ffi_device, **kwargs)


def test_num_points_is_traced(ffi_device):
  points = jax.device_put(jnp.asarray(clustered_points(np.random.default_rng(2), 50, 3, 6, 3)), ffi_device)
  fn = jax.jit(lambda p, n: ops.voxelize(p, n, **GEOMETRY[3], max_num_voxels=16, max_num_points_per_voxel=2))
  for n in (10, 30):  # one compilation, different counts (on the device: the kernel reads it there)
    ids = np.asarray(fn(points, jax.device_put(jnp.int32(n), ffi_device)).pc_voxel_id)
    assert np.all(ids[n:] == -1) and np.any(ids[:n] >= 0)


def test_range_boundaries(backend, ffi_device):
  """The minimum is inside (cell 0), the maximum outside (cell == grid), just below it inside."""
  below = np.nextafter(np.float32(2.0), np.float32(0))
  points = np.array(
    [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [below, below, below], [-1e-7, 0.0, 0.0],
     [1.0, 1.0, 1.0], [0.1, 0.2, 2.0]],
    np.float32,
  )  # fmt: skip
  kwargs = dict(voxel_size=(0.5, 0.5, 0.5), coors_range=(0.0, 0.0, 0.0, 2.0, 2.0, 2.0))
  kwargs.update(max_num_voxels=8, max_num_points_per_voxel=2, device=ffi_device)
  assert_matches_oracle(points, **kwargs)
  out = run(points, **kwargs)
  assert out.pc_voxel_id.tolist() == [0, -1, -1, 1, -1, 2, -1]
  assert out.coords[:3].tolist() == [[0, 0, 0], [3, 3, 3], [2, 2, 2]]


@pytest.mark.parametrize("num", [13, 1027])
def test_one_cell_across_key_blocks(backend, ffi_device, num):
  """The FFI kernel computes cell keys 8 (AVX2) or 4 points at a time in vector lanes and the rest
  of a 1024-point chunk one by one; both must send a cell to the same table slot, or the cell
  would open two voxels. 13 points split inside a chunk for either lane count, 1027 across two."""
  points = np.tile(np.array([[0.3, 0.7, 1.1]], np.float32), (num, 1))
  points[::3, 0] = 1.4  # a second cell, interleaved
  kwargs = dict(GEOMETRY[3], max_num_voxels=4, max_num_points_per_voxel=num, device=ffi_device)
  assert_matches_oracle(points, **kwargs)
  assert sorted(set(run(points, **kwargs).pc_voxel_id.tolist())) == [0, 1]


@pytest.mark.parametrize("garbage", [np.nan, -0.0, 0.0])
def test_reuse_donates_an_old_result(backend, ffi_device, garbage):
  """``reuse`` takes an earlier result's voxels (here filled with ``garbage``) and gives a fresh
  call's bits; on the FFI path the result lives in the donated memory and the old array is
  deleted. The kernel skips writing blocks that are zero already: -0.0 is not (its sign bit is
  set) and must come out +0.0."""
  points = clustered_points(np.random.default_rng(8), 300, 3, 6, 4)
  kwargs = dict(GEOMETRY[3], max_num_voxels=50, max_num_points_per_voxel=3)
  want = run(points, device=ffi_device, **kwargs)
  old = jax.device_put(jnp.full((50, 3, 4), garbage, jnp.float32), ffi_device)
  address = old.unsafe_buffer_pointer()
  got = ops.voxelize(jax.device_put(jnp.asarray(points), ffi_device), **kwargs, reuse=old)
  assert got.voxels.devices() == {ffi_device}
  for name, expected, have in zip(got._fields, want, got):
    np.testing.assert_array_equal(np.asarray(have).view(np.int32), expected.view(np.int32), err_msg=name)
  if backend == "ffi":
    assert old.is_deleted() and got.voxels.unsafe_buffer_pointer() == address
  with pytest.raises(ValueError, match=r"reuse must be the float32 voxels \(50, 3, 4\)"):
    ops.voxelize(jnp.asarray(points), **kwargs, reuse=jnp.zeros((50, 2, 4), jnp.float32))


def test_empty_cloud(backend, ffi_device):
  kwargs = dict(GEOMETRY[2], max_num_voxels=3, max_num_points_per_voxel=2, device=ffi_device)
  assert_matches_oracle(np.zeros((0, 3), np.float32), **kwargs)


def test_grid_beyond_32_bit_keys(backend, ffi_device):
  """More than 2**32 cells: the CPU kernel switches to 16-byte table slots."""
  points = clustered_points(np.random.default_rng(7), 200, 3, 6, 4)
  kwargs = dict(voxel_size=(1e-3, 1e-3, 1e-3), coors_range=(-1.0, -1.0, -1.0, 3.0, 3.0, 3.0))
  assert math.prod(ops._voxelize.grid_size(**kwargs)) > 2**32
  assert_matches_oracle(points, max_num_voxels=150, max_num_points_per_voxel=2, device=ffi_device, **kwargs)


def test_vmap_voxelizes_each_cloud(backend, ffi_device):
  clouds = np.stack([clustered_points(np.random.default_rng(s), 50, 2, 4, 3) for s in range(3)])
  kwargs = dict(GEOMETRY[2], max_num_voxels=20, max_num_points_per_voxel=3)
  batched = jax.jit(jax.vmap(lambda p, n: ops.voxelize(p, n, **kwargs)))(
    *jax.device_put((jnp.asarray(clouds), jnp.array([50, 20, 0], jnp.int32)), ffi_device)
  )
  assert batched.voxels.devices() == {ffi_device}
  for i, n in enumerate((50, 20, 0)):
    for have, want in zip(
      batched, oracle(clouds[i], kwargs["voxel_size"], kwargs["coors_range"], 20, 3, num_points=n)
    ):
      np.testing.assert_array_equal(np.asarray(have[i]), want)


def test_float32_cell_arithmetic(backend, ffi_device):
  """Cells come from float32 (p - min) / vsize: 0.3 - (-0.1) rounds so that a float64 formula
  would give another cell for some of these points; the oracle uses float32 like spconv."""
  rng = np.random.default_rng(3)
  points = (rng.integers(-20, 20, size=(400, 3)) * np.float32(0.1)).astype(np.float32)
  kwargs = dict(voxel_size=(0.1, 0.1, 0.2), coors_range=(-1.0, -1.0, -1.0, 1.0, 1.0, 1.0))
  assert_matches_oracle(points, max_num_voxels=300, max_num_points_per_voxel=3, device=ffi_device, **kwargs)


def test_grid_rounds_like_spconv():
  # 0.25 / 0.1 = 2.5 in float32 (2.4999998...); 0.35 / 0.1 = 3.4999998; halves round away from zero.
  from jsparse.ops._voxelize import grid_size

  assert grid_size((0.1, 0.1, 0.2), (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)) == (1024, 1024, 40)
  assert grid_size((0.5, 0.5), (0.0, 0.0, 1.25, 0.75)) == (3, 2)  # 2.5 -> 3, 1.5 -> 2
  assert grid_size((0.2, 0.2), (0.0, 0.0, 0.5, 0.3)) == (3, 2)


@st.composite
def clouds(draw):
  ndim = draw(st.integers(2, 4))
  n = draw(st.integers(0, 60))
  features = draw(st.integers(ndim, ndim + 2))
  seed = draw(st.integers(0, 2**16))
  points = clustered_points(np.random.default_rng(seed), n, ndim, draw(st.integers(1, 5)), features)
  vsize = tuple(draw(st.sampled_from([0.25, 0.3, 0.5, 0.7])) for _ in range(ndim))
  low = tuple(draw(st.sampled_from([-0.5, 0.0, 0.1])) for _ in range(ndim))
  high = tuple(lo + draw(st.sampled_from([0.7, 1.5, 2.9])) for lo in low)
  return points, dict(
    voxel_size=vsize,
    coors_range=low + high,
    max_num_voxels=draw(st.integers(1, 40)),
    max_num_points_per_voxel=draw(st.integers(1, 5)),
    empty_mean=draw(st.booleans()),
    num_points=draw(st.one_of(st.none(), st.integers(0, n))),
  )


# The device is the same for every example, so the function-scoped fixture is safe to share.
@pytest.mark.usefixtures("backend")
@settings(
  suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
)
@given(case=clouds())
def test_property_matches_oracle(ffi_device, case):
  points, kwargs = case
  assert_matches_oracle(points, device=ffi_device, **kwargs)


def test_validation_errors():
  points = jnp.zeros((4, 3), jnp.float32)
  good = dict(voxel_size=(1.0, 1.0, 1.0), coors_range=(0.0,) * 3 + (2.0,) * 3)
  sizes = dict(max_num_voxels=4, max_num_points_per_voxel=2)
  with pytest.raises(ValueError, match="2 to 4 entries"):
    ops.voxelize(points, voxel_size=(1.0,), coors_range=(0.0, 1.0), **sizes)
  with pytest.raises(ValueError, match="must have 6 entries"):
    ops.voxelize(points, voxel_size=(1.0, 1.0, 1.0), coors_range=(0.0, 1.0), **sizes)
  with pytest.raises(ValueError, match="positive"):
    ops.voxelize(points, voxel_size=(1.0, 0.0, 1.0), coors_range=good["coors_range"], **sizes)
  with pytest.raises(ValueError, match="max > min"):
    ops.voxelize(points, voxel_size=good["voxel_size"], coors_range=(0.0,) * 6, **sizes)
  with pytest.raises(ValueError, match="float32"):
    ops.voxelize(jnp.zeros((4, 3), jnp.int32), **good, **sizes)
  with pytest.raises(ValueError, match="F >= 3"):
    ops.voxelize(jnp.zeros((4, 2), jnp.float32), **good, **sizes)
  with pytest.raises(ValueError, match=">= 1"):
    ops.voxelize(points, **good, max_num_voxels=0, max_num_points_per_voxel=2)
  # Point slots are numbered with int32: refused at trace time, before any [V, M, F] is allocated.
  with pytest.raises(
    ValueError, match=r"max_num_voxels=2097152 x max_num_points_per_voxel=1024 = 2147483648"
  ):
    jax.eval_shape(
      lambda p: ops.voxelize(p, **good, max_num_voxels=2**21, max_num_points_per_voxel=2**10), points
    )


def _handler(max_voxels, max_points, features, num_points, ndim, reuse=False):
  """The voxelizer's FFI target, called as ``ops.voxelize`` calls it (on the device of its operands)."""
  for platform in _ffi.PLATFORMS:
    _ffi.targets(platform)
  results = ops._voxelize._results(num_points, features, ndim, max_voxels, max_points)
  aliases = {2: 0} if reuse else None
  return lambda *args, **attributes: _ffi.call(
    "jsparse_voxelize", results, *args, input_output_aliases=aliases, **attributes
  )


def test_ffi_rejects_bad_attributes(ffi_device):
  """The handler validates on its own (for callers that bypass the Python checks)."""
  good = dict(
    range_min=np.zeros(3, np.float32), grid_size=np.array([2, 2, 2], np.int64), empty_mean=np.int64(0)
  )
  unused = jax.device_put(jnp.zeros(0, jnp.float32), ffi_device)  # the reused-voxels argument

  def call(points, features=3, voxel_size=(1.0, 1.0, 1.0)):
    handler = _handler(4, 2, features, len(points), 3)
    vsize = np.asarray(voxel_size, np.float32)
    operands = jax.device_put((jnp.asarray(points), jnp.int32(5)), ffi_device)
    return jax.block_until_ready(handler(*operands, unused, voxel_size=vsize, **good))

  with pytest.raises(Exception, match="voxel_size must be positive"):
    call(np.zeros((5, 3), np.float32), voxel_size=(1.0, -1.0, 1.0))
  with pytest.raises(Exception, match=r"points must be float32 \[P, F\] with F >= 3"):
    call(np.zeros((5, 2), np.float32), features=2)
  with pytest.raises(Exception, match=r"voxels must be float32 \[max_num_voxels, max_points_per_voxel, F\]"):
    call(np.zeros((5, 4), np.float32))


@pytest.mark.parametrize("empty_mean", [False, True])
def test_every_row_of_a_reused_buffer_is_overwritten(ffi_device, empty_mean):
  """A donated buffer arrives with anything in it (NaN here): the handler writes every row, rows
  in use and padding, across the edges of its row tasks (8192 rows of 2 x 4 floats), and gives the
  specification's result. 12,000 points in distinct-enough cells open over 8192 voxels; 20,000
  rows leave padding both below and past the number of points (rows that need not wait for the
  ids)."""
  rng = np.random.default_rng(11)
  points = np.concatenate(
    [rng.uniform(0, 40, size=(12000, 3)), rng.standard_normal((12000, 1))], axis=1
  ).astype(np.float32)
  geometry = dict(voxel_size=(0.5, 0.5, 0.5), coors_range=(0.0, 0.0, 0.0, 40.0, 40.0, 40.0))
  max_voxels, max_points = 20000, 2
  want = oracle(points, **geometry, max_voxels=max_voxels, max_points=max_points, empty_mean=empty_mean)
  assert 8192 < want[4] < 12000
  handler = _handler(max_voxels, max_points, 4, len(points), 3, reuse=True)
  attributes = ops._voxelize._geometry_attributes(*ops._voxelize._geometry(**geometry))
  operands = jax.device_put(
    (
      jnp.asarray(points),
      jnp.int32(len(points)),
      jnp.full((max_voxels, max_points, 4), jnp.nan, jnp.float32),
    ),
    ffi_device,
  )
  got = handler(*operands, **attributes, empty_mean=np.int64(empty_mean))
  assert got[0].devices() == {ffi_device}
  for name, expected, have in zip(("voxels", "coords", "counts", "ids", "num_voxels"), want, got):
    np.testing.assert_array_equal(np.asarray(have), expected, err_msg=name)


# ---- determinism -------------------------------------------------------------------------------


def _contended_cloud(rng: np.random.Generator) -> np.ndarray:
  """40,000 points in 12**3 = 1728 cells, so that many points race for each voxel (its first
  point, its slots) and both capacities overflow; every 7th point repeats one position."""
  cells = rng.integers(0, 12, size=(40000, 3)).astype(np.float32) * 0.5
  points = np.concatenate([cells + rng.uniform(0, 0.5, size=cells.shape).astype(np.float32),
                           rng.standard_normal((40000, 1)).astype(np.float32)], axis=1)  # fmt: skip
  points[::7, :3] = points[3, :3]
  return points


@pytest.mark.parametrize("empty_mean", [False, True])
def test_ffi_is_deterministic_and_matches_cpu_bitwise(ffi_device, empty_mean):
  """Two calls on the device give the same bits, and the CPU kernel's (CUDA threads race for
  every voxel here: first-come order must not depend on who wins). 1728 voxels for 39,000
  points: 1000 voxel rows drop some voxels, 8 slots drop points from nearly every voxel."""
  points = _contended_cloud(np.random.default_rng(12))
  kwargs = dict(
    voxel_size=(0.5, 0.5, 0.5), coors_range=(0.0, 0.0, 0.0, 6.0, 6.0, 6.0), max_num_voxels=1000,
    max_num_points_per_voxel=8, empty_mean=empty_mean,
  )  # fmt: skip
  with jsparse.backend("ffi"):
    first = run(points, 39000, ffi_device, **kwargs)
    second = run(points, 39000, ffi_device, **kwargs)
    on_cpu = run(points, 39000, jax.devices("cpu")[0], **kwargs)
  assert first.num_voxels > 1000 and np.mean(first.num_points_per_voxel == 8) > 0.9
  for name, a, b, c in zip(first._fields, first, second, on_cpu):
    np.testing.assert_array_equal(
      a.view(np.int32), b.view(np.int32), err_msg=f"{name}: two runs on {ffi_device}"
    )
    np.testing.assert_array_equal(
      a.view(np.int32), c.view(np.int32), err_msg=f"{name}: {ffi_device} and the CPU"
    )


SCRIPT = """
import hashlib, jax.numpy as jnp, numpy as np
from jsparse import ops
rng = np.random.default_rng(0)
points = rng.uniform(-10, 10, size=(60000, 4)).astype(np.float32)
points[:, :3] = np.round(points[:, :3] * 4) / 4
digest = hashlib.sha256()
for mean in (False, True):
  out = ops.voxelize(jnp.asarray(points), voxel_size=(0.5, 0.5, 0.5), coors_range=(-8.0,) * 3 + (8.0,) * 3,
                     max_num_voxels=30000, max_num_points_per_voxel=4, empty_mean=mean)
  for a in out:
    digest.update(np.asarray(a).tobytes())
print(digest.hexdigest())
"""


def _digest(xla_flags: str = "", one_cpu: bool = False) -> str:
  env = dict(os.environ, XLA_FLAGS=xla_flags, JSPARSE_BACKEND="ffi")
  command = [sys.executable, "-c", SCRIPT]
  if one_cpu:  # XLA sizes its thread pools from the CPU affinity mask
    command = ["taskset", "-c", "0", *command]
  return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@needs_ffi
def test_bitwise_identical_across_thread_settings():
  threaded = _digest()
  assert len(threaded) == 64
  assert _digest() == threaded
  assert _digest("--xla_cpu_multi_thread_eigen=false") == threaded
  if shutil.which("taskset"):
    assert _digest(one_cpu=True) == threaded
