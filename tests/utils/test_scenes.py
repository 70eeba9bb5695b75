"""simulate_scan: procedural street scans checked against the sensor and the street they describe.

Expected values come from the Velodyne data sheets (HDL-32E: 32 beams, -30.67 to +10.67 degrees in
steps of 1.33; HDL-64E: +2 to -24.8 degrees) and from the sizes of the street's parts (road 1.68 to
1.78 m below the sensor, a curb of 0.1 to 0.2 m, poles at most 0.14 m in radius, cars at most 1.6 m
tall, people at most 1.9 m, the sensor at least 1.6 m from the road's edge and 1.8 m more from the
facades), never from the simulator's own output.
"""

from __future__ import annotations

import numpy as np
import pytest

from jsparse.utils import CLASS_COLORS, CLASSES, beam_elevations, simulate_scan

SEEDS = range(5)
ID = {name: i for i, name in enumerate(CLASSES)}


def _height_above_road(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Each point's height above the least-squares plane through the road points, and the plane's residuals."""
  road = points[labels == ID["road"], :3].astype(np.float64)
  design = np.c_[road[:, :2], np.ones(len(road))]
  coef, *_ = np.linalg.lstsq(design, road[:, 2], rcond=None)
  return points[:, 2] - (points[:, :2] @ coef[:2] + coef[2]), coef


def test_same_seed_same_scan():
  points, labels = simulate_scan(3)
  again_points, again_labels = simulate_scan(3)
  np.testing.assert_array_equal(points, again_points)
  np.testing.assert_array_equal(labels, again_labels)
  other_points, other_labels = simulate_scan(4)
  assert points.shape != other_points.shape or not np.array_equal(points, other_points)
  assert not np.array_equal(np.bincount(labels, minlength=7), np.bincount(other_labels, minlength=7))


@pytest.mark.parametrize("beams", [32, 64])
def test_shapes_and_dtypes(beams):
  points, labels = simulate_scan(0, beams=beams)
  assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 4
  assert labels.dtype == np.int32 and labels.shape == (len(points),)
  assert np.all(np.isfinite(points))
  assert labels.min() >= 0 and labels.max() < len(CLASSES)
  assert CLASS_COLORS.shape == (len(CLASSES), 3) and CLASS_COLORS.dtype == np.uint8


@pytest.mark.parametrize("seed", SEEDS)
def test_point_counts(seed):
  points32, _ = simulate_scan(seed, beams=32)
  points64, _ = simulate_scan(seed, beams=64)
  assert 20_000 <= len(points32) <= 30_000
  assert len(points64) > 1.6 * len(points32)
  fewer, _ = simulate_scan(seed, points_per_ring=480)
  assert 0.4 * len(points32) < len(fewer) < 0.6 * len(points32)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("max_range", [50.0, 20.0])
def test_ranges_and_intensity(seed, max_range):
  points, _ = simulate_scan(seed, max_range=max_range)
  distance = np.linalg.norm(points[:, :3].astype(np.float64), axis=1)
  assert distance.min() > 0.0
  # Nothing inside the sensor's own car (4.8 x 1.8 m around the sensor, below its roof): the lowest beam
  # (-30.67 deg) meets the road 2.9 m out, and the street keeps other cars and people clear of it.
  ego = (np.abs(points[:, 0]) < 2.4) & (np.abs(points[:, 1]) < 0.9) & (points[:, 2] < 0.3)
  assert not ego.any(), points[ego][:5]
  assert distance.max() <= max_range + 1e-4
  if max_range == 50.0:
    assert distance.max() > 45.0  # facades and the road reach out to the limit
  assert points[:, 3].min() >= 0.0 and points[:, 3].max() <= 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_every_class_present(seed):
  _, labels = simulate_scan(seed)
  counts = np.bincount(labels, minlength=len(CLASSES))
  assert np.all(counts >= 20), dict(zip(CLASSES, counts))
  assert counts[ID["road"]] > 0.15 * len(labels)  # the road is the largest or second-largest class


@pytest.mark.parametrize("seed", SEEDS)
def test_ground_heights(seed):
  points, labels = simulate_scan(seed)
  height, coef = _height_above_road(points, labels)
  assert -1.80 <= coef[2] <= -1.66  # the road 1.68 to 1.78 m below the sensor, about level
  assert np.all(np.abs(coef[:2]) < 0.02)
  road = np.abs(height[labels == ID["road"]])
  assert np.quantile(road, 0.99) < 0.05
  # Sidewalk: on the curb's top (0.1 to 0.2 m up) or on its face (between the road and the top).
  sidewalk = height[labels == ID["sidewalk"]]
  assert np.quantile(sidewalk, 0.01) > -0.05 and np.quantile(sidewalk, 0.99) < 0.25
  assert 0.08 < np.median(sidewalk) < 0.22


@pytest.mark.parametrize("seed", SEEDS)
def test_objects_where_they_belong(seed):
  points, labels = simulate_scan(seed)
  height, _ = _height_above_road(points, labels)
  flat = np.hypot(points[:, 0], points[:, 1])
  building = labels == ID["building"]
  assert flat[building].min() > 3.0  # facades stand behind the sidewalk, off the sensor's lane
  assert np.quantile(height[building], 0.99) < 20.5
  car = labels == ID["car"]
  assert height[car].min() > -0.05 and height[car].max() < 1.7
  person = labels == ID["pedestrian"]
  assert height[person].min() > -0.05 and height[person].max() < 2.1
  assert np.median(points[labels == ID["vegetation"], 2]) > np.median(points[labels == ID["road"], 2])


@pytest.mark.parametrize("seed", SEEDS)
def test_poles_are_thin(seed):
  points, labels = simulate_scan(seed)
  height, _ = _height_above_road(points, labels)
  # Below the lamp arms (at least 3.7 m up), each pole's points lie within its radius (<= 0.14 m)
  # plus range noise of its neighbours in xy; poles stand at least 6 m apart.
  xy = points[(labels == ID["pole"]) & (height > 0.3) & (height < 3.5), :2].astype(np.float64)
  assert len(xy) >= 5
  poles = 0
  while len(xy):
    near = np.linalg.norm(xy - xy[0], axis=1) < 2.0
    cluster = xy[near]
    spread = np.linalg.norm(cluster - np.median(cluster, axis=0), axis=1).max()
    assert spread < 0.3, (cluster.mean(0), spread)
    xy, poles = xy[~near], poles + 1
  assert poles >= 1


@pytest.mark.parametrize("beams", [32, 64])
def test_beam_pattern(beams):
  points_per_ring = 960
  points, _ = simulate_scan(2, beams=beams, points_per_ring=points_per_ring)
  xyz = points[:, :3].astype(np.float64)
  elevation = np.degrees(np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1])))
  if beams == 32:
    expected = np.linspace(-30.67, 10.67, 32)  # HDL-32E data sheet
  else:
    expected = beam_elevations(64)
    assert expected.max() == pytest.approx(2.0) and expected.min() == pytest.approx(-24.8)
    assert len(np.unique(expected)) == 64
  np.testing.assert_allclose(np.sort(beam_elevations(beams)), np.sort(expected))
  # Every point lies on one of the beams' cones (noise moves a return along its ray only).
  offset = np.abs(elevation[:, None] - expected[None, :])
  ring = offset.argmin(axis=1)
  assert offset.min(axis=1).max() < 0.01
  # All the beams below -3 degrees meet the road within 50 m, in nearly every direction.
  down = np.flatnonzero(expected < -3.0)
  counts = np.bincount(ring, minlength=beams)
  assert np.all(counts[down] > 0.85 * points_per_ring)
  assert np.all(counts <= points_per_ring)
  # And in azimuth, on a grid of points_per_ring steps per turn, the same grid for every ring.
  step = 2 * np.pi / points_per_ring
  phase = np.mod(np.arctan2(xyz[:, 1], xyz[:, 0]), step)
  phase = np.mod(phase - phase[0] + step / 2, step) - step / 2
  assert np.abs(phase).max() < 0.01 * step


def test_dropout():
  lowest = np.deg2rad(-30.67)
  for dropout, low, high in [(0.0, 0.99, 1.0), (0.1, 0.85, 0.95)]:
    points, _ = simulate_scan(0, dropout=dropout)
    xyz = points[:, :3].astype(np.float64)
    elevation = np.arctan2(xyz[:, 2], np.hypot(xyz[:, 0], xyz[:, 1]))
    share = np.sum(np.abs(elevation - lowest) < 1e-4) / 960
    assert low <= share <= high, (dropout, share)


def test_range_noise():
  points, labels = simulate_scan(0, range_noise=0.0)
  noisy_points, noisy_labels = simulate_scan(0, range_noise=0.05)
  height, _ = _height_above_road(points, labels)
  noisy_height, _ = _height_above_road(noisy_points, noisy_labels)
  assert np.abs(height[labels == ID["road"]]).max() < 1e-3  # exactly on the plane without noise
  assert np.std(noisy_height[noisy_labels == ID["road"]]) > 5e-3


def test_intensity_by_material():
  points, labels = simulate_scan(0)
  road = points[labels == ID["road"], 3]
  assert 0.1 < np.median(road) < 0.35  # asphalt, as on KITTI (median intensity about 0.3)
  assert np.mean(road > 0.6) > 0.002  # lane markings
  assert np.std(points[labels == ID["vegetation"], 3]) > 0.08  # foliage is noisy


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"beams": 16}, "beams=16"),
    ({"points_per_ring": 0}, "points_per_ring=0"),
    ({"max_range": -1.0}, "max_range"),
  ],
)
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    simulate_scan(0, **kwargs)
