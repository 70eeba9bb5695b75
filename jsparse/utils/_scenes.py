"""Labelled LiDAR scans of procedural streets: training data for segmentation without a dataset.

``simulate_scan(seed)`` builds a street from the seed and ray-casts a spinning multi-beam sensor against
it. The street runs roughly along x (a random yaw of up to about 14 degrees): a road with lane markings,
raised sidewalks behind a curb on both sides, building facades with gaps, sometimes a cross street,
parked and driving cars, pedestrians, poles (some with a lamp arm), trees and bushes, all analytic
primitives (planes, boxes, vertical cylinders, ellipsoids). The sensor has the vertical angles of a
Velodyne HDL-32E or HDL-64E; returns get Gaussian range noise, random dropout (more on dark glass) and
an intensity from the material and the incidence angle.

Scans are in KITTI's sensor frame (x forward, y left, z up; the sensor at the origin, 1.68 to 1.78 m
above the road, tilted by a few tenths of a degree), so that a network trained on them can be run on a
KITTI scan such as ``data/kitti_000008.bin``. Every returned point hits something and carries a label
from ``CLASSES``; rays that hit nothing within ``max_range``, and dropped returns, are left out (there
is no "unlabelled" class). The classes differ in local geometry (flat low road; sidewalk a curb higher;
tall vertical facades; car-sized boxes; thin people; thin tall poles; rough, noisy foliage) and in
intensity (bright lane markings, dark car glass).

numpy only: the rays of a scan are cast together, in a loop over the scene's primitives (a few hundred),
each against the block of rays whose azimuth and elevation can reach its bounding sphere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CLASSES = ("road", "sidewalk", "building", "car", "pedestrian", "pole", "vegetation")
ROAD, SIDEWALK, BUILDING, CAR, PEDESTRIAN, POLE, VEGETATION = range(len(CLASSES))
# Cityscapes' colours for the same classes, uint8 RGB [len(CLASSES), 3], for plots.
CLASS_COLORS = np.array(
  [[128, 64, 128], [244, 35, 232], [70, 70, 70], [0, 0, 142], [220, 20, 60], [153, 153, 153], [107, 142, 35]],
  dtype=np.uint8,
)

_EPS = 1e-3  # hits nearer than this (m) are ignored: a ray does not hit the surface it starts on
_CURB_STEPS = 14  # bisection steps locating the curb face: the ray crosses it within a few m, so ~1 mm
# The sensor's car, in the sensor frame: a footprint of 4.8 x 1.8 m around the sensor, kept clear by 0.3 m.
_EGO_HALF = (2.7, 1.2)


def beam_elevations(beams: int) -> np.ndarray:
  """The vertical angles of a Velodyne sensor's beams, in degrees, highest first.

  Args:
    beams: 32 (HDL-32E: -30.67 to +10.67 degrees in equal steps of 1.33) or 64 (HDL-64E as on KITTI's
      car: an upper block of 32 beams from +2 to -8.33 degrees, a lower block from -8.83 to -24.8).

  Returns:
    float64 ``[beams]``.

  Raises:
    ValueError: ``beams`` is neither 32 nor 64.

  >>> beam_elevations(32)[[0, -1]]
  array([ 10.67, -30.67])
  """
  if beams == 32:
    return np.linspace(10.67, -30.67, 32)
  if beams == 64:
    return np.concatenate([np.linspace(2.0, -8.33, 32), np.linspace(-8.83, -24.8, 32)])
  raise ValueError(f"beams={beams}: the simulated sensors are the HDL-32E (beams=32) and HDL-64E (beams=64)")


@dataclass
class _Street:
  """A street in its own frame: the sensor at the origin, the road surface at z = -height."""

  height: float  # sensor above the road (m)
  yaw: float  # the sensor's heading in the street (rad); the sensor's car is aligned with it
  curb: float  # sidewalk above the road (m)
  road: tuple[float, float]  # y range of the road along x
  cross: tuple[float, float] | None  # x range of a cross street, or None
  lane_lines: list[float]  # y of the dashed lines between lanes
  road_reflectance: float
  sidewalk_reflectance: float
  boxes: list[tuple] = field(default_factory=list)  # (center [3], half sizes [3], yaw, label, reflectance)
  cylinders: list[tuple] = field(default_factory=list)  # (x, y, z0, z1, radius, label, reflectance)
  ellipsoids: list[tuple] = field(default_factory=list)  # (center [3], radii [3], label, reflectance)

  def in_road(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inside = (y >= self.road[0]) & (y <= self.road[1])
    if self.cross is not None:
      inside |= (x >= self.cross[0]) & (x <= self.cross[1])
    return inside

  def clear_of_ego(self, x: float, y: float, half_x: float, half_y: float, yaw: float) -> bool:
    """Whether a footprint (a rectangle turned by ``yaw``) misses the sensor's car: a separating-axis test."""

    def extent(axis: float, half: tuple[float, float], turn: float) -> float:  # half-width along ``axis``
      return half[0] * abs(np.cos(axis - turn)) + half[1] * abs(np.sin(axis - turn))

    for axis in (yaw, yaw + np.pi / 2, self.yaw, self.yaw + np.pi / 2):
      gap = abs(np.cos(axis) * x + np.sin(axis) * y)
      if gap > extent(axis, (half_x, half_y), yaw) + extent(axis, _EGO_HALF, self.yaw):
        return True
    return False

  def add_car(self, rng: np.random.Generator, x: float, y: float, yaw: float) -> bool:
    """Adds a car unless it would overlap the sensor's car; returns whether it did."""
    length, width, height = rng.uniform(3.8, 4.8), rng.uniform(1.65, 1.9), rng.uniform(1.4, 1.6)
    if not self.clear_of_ego(x, y, length / 2, width / 2, yaw):
      return False
    ground, belt = -self.height, rng.uniform(0.85, 1.0)
    c, s = np.cos(yaw), np.sin(yaw)
    paint = rng.uniform(0.1, 0.7)
    # Underbody and wheels, body up to the belt line, then a shorter, narrower glass cabin.
    self.boxes.append(([x, y, ground + 0.17], [0.38 * length, 0.44 * width, 0.15], yaw, CAR, 0.1))
    body = ([x, y, ground + (0.3 + belt) / 2], [length / 2, width / 2, (belt - 0.3) / 2], yaw, CAR, paint)
    self.boxes.append(body)
    shift = -0.08 * length
    cabin_center = [x + c * shift, y + s * shift, ground + (belt + height) / 2]
    self.boxes.append((cabin_center, [0.28 * length, 0.45 * width, (height - belt) / 2], yaw, CAR, 0.05))
    return True

  def add_pedestrian(self, rng: np.random.Generator, x: float, y: float, ground: float) -> bool:
    """Adds a person unless they would stand in the sensor's car; returns whether it did."""
    height, radius = rng.uniform(1.5, 1.9), rng.uniform(0.18, 0.27)
    if not self.clear_of_ego(x, y, radius, radius, 0.0):
      return False
    reflectance = rng.uniform(0.15, 0.45)
    self.cylinders.append((x, y, ground, ground + height - 0.22, radius, PEDESTRIAN, reflectance))
    self.ellipsoids.append(([x, y, ground + height - 0.11], [0.1, 0.1, 0.12], PEDESTRIAN, reflectance))
    return True

  def add_tree(self, rng: np.random.Generator, x: float, y: float, ground: float) -> None:
    trunk, radius = rng.uniform(2.2, 3.5), rng.uniform(0.12, 0.25)
    crown = rng.uniform(1.2, 2.8)
    crown_z = rng.uniform(1.0, 2.2)
    center = [x, y, ground + trunk + crown_z]
    self.cylinders.append((x, y, ground, ground + trunk + crown_z / 2, radius, VEGETATION, 0.3))
    self.ellipsoids.append((center, [crown, crown * rng.uniform(0.8, 1.2), crown_z], VEGETATION, 0.45))


def _street(rng: np.random.Generator, max_range: float) -> _Street:
  """A random street, reaching 10 m beyond ``max_range`` along x."""
  height, curb = rng.uniform(1.68, 1.78), rng.uniform(0.1, 0.2)
  width = rng.uniform(6.5, 14.0)
  left = rng.uniform(1.8, width - 1.8)  # the road's +y edge; the sensor drives in a lane
  right = left - width
  lanes = max(2, round(width / 3.5))
  cross = None
  if rng.random() < 0.4:
    xc, wc = rng.choice([-1, 1]) * rng.uniform(10, 35), rng.uniform(7, 12)
    cross = (xc - wc / 2, xc + wc / 2)
  street = _Street(
    height=height,
    yaw=rng.uniform(-0.25, 0.25),
    curb=curb,
    road=(right, left),
    cross=cross,
    lane_lines=[right + k * width / lanes for k in range(1, lanes)],
    road_reflectance=rng.uniform(0.2, 0.3),
    sidewalk_reflectance=rng.uniform(0.25, 0.4),
  )
  reach = max_range + 10
  walk = -height + curb

  def clear_of_cross(x0: float, x1: float, margin: float) -> bool:
    return cross is None or x1 < cross[0] - margin or x0 > cross[1] + margin

  built_sides = [s for s in (1, -1) if rng.random() < 0.85] or [int(rng.choice([-1, 1]))]
  shaded_side = int(rng.choice([-1, 1]))  # gets a tree within 20 m: every scan has some vegetation
  for side in (1, -1):
    edge = left if side == 1 else right
    sidewalk = rng.uniform(1.8, 5.0)
    # Building facades behind the sidewalk, with gaps; bushes or trees in some gaps.
    x = -reach - rng.uniform(0, 20)
    while x < reach:
      length = rng.uniform(6, 30)
      if side in built_sides and clear_of_cross(x, x + length, sidewalk):
        setback, depth, tall = rng.uniform(0, 2), rng.uniform(8, 15), rng.uniform(4, 20)
        facade = edge + side * (sidewalk + setback)
        center = [x + length / 2, facade + side * depth / 2, -height + tall / 2 - 0.5]
        street.boxes.append(
          (center, [length / 2, depth / 2, tall / 2 + 0.5], 0.0, BUILDING, rng.uniform(0.15, 0.55))
        )
      elif clear_of_cross(x, x + length, 1):
        for _ in range(rng.integers(1, 4)):
          xv, yv = x + rng.uniform(0, length), edge + side * (sidewalk + rng.uniform(1, 6))
          if rng.random() < 0.5:
            street.add_tree(rng, xv, yv, walk)
          else:
            radii = [rng.uniform(1, 4), rng.uniform(0.4, 1.0), rng.uniform(0.4, 0.9)]
            street.ellipsoids.append(([xv, yv, walk + 0.7 * radii[2]], radii, VEGETATION, 0.45))
      x += length + (rng.uniform(3, 12) if rng.random() < 0.35 else 0.0)
    # A tree within 20 m on one side, then a row of trees or a hedge along the sidewalk.
    if side == shaded_side:
      x = rng.uniform(-20, 20)
      if not clear_of_cross(x, x, 2):
        x = cross[0] - 3 if abs(cross[0] - 3) < abs(cross[1] + 3) else cross[1] + 3
      street.add_tree(rng, x, edge + side * rng.uniform(0.9, max(1.0, sidewalk - 0.6)), walk)
    if rng.random() < 0.7:
      x = -reach + rng.uniform(0, 10)
      while x < reach:
        if clear_of_cross(x, x, 2):
          street.add_tree(rng, x, edge + side * rng.uniform(0.9, max(1.0, sidewalk - 0.6)), walk)
        x += rng.uniform(5, 12)
    elif rng.random() < 0.7:
      x = -reach + rng.uniform(0, 30)
      while x < reach:
        length = rng.uniform(3, 15)
        if clear_of_cross(x, x + length, 1):
          radii = [length / 2, rng.uniform(0.3, 0.6), rng.uniform(0.4, 0.8)]
          center = [x + length / 2, edge + side * (sidewalk - radii[1]), walk + 0.8 * radii[2]]
          street.ellipsoids.append((center, radii, VEGETATION, 0.45))
        x += length + rng.uniform(2, 20)
    # Poles near the curb, one within 15 m; some with a lamp arm over the road.
    x = rng.uniform(-15, 0) if side == 1 else rng.uniform(0, 15)
    xs = np.concatenate(
      [np.arange(x, reach, rng.uniform(12, 30)), np.arange(x, -reach, -rng.uniform(12, 30))[1:]]
    )
    for xp in xs:
      if not clear_of_cross(xp, xp, 0.5):
        continue
      yp, top, radius = edge + side * rng.uniform(0.3, 0.7), walk + rng.uniform(4, 9), rng.uniform(0.06, 0.14)
      street.cylinders.append((xp, yp, walk, top, radius, POLE, rng.uniform(0.3, 0.6)))
      if rng.random() < 0.4:
        arm = rng.uniform(0.6, 1.5)
        center = [xp, yp - side * arm / 2, top - 0.2]
        street.boxes.append((center, [0.06, arm / 2, 0.06], 0.0, POLE, 0.5))
    # Parked cars along the curb.
    cars = []
    if width >= 7 and rng.random() < 0.75:
      x = -reach + rng.uniform(0, 10)
      while x < reach:
        if clear_of_cross(x - 3, x + 3, 0.5):
          cars.append((x, edge - side * rng.uniform(1.0, 1.2), rng.normal(0, 0.05)))
        x += rng.uniform(5.5, 8) + (rng.uniform(5, 20) if rng.random() < 0.3 else 0.0)
    for car in cars:
      street.add_car(rng, *car)
    # Pedestrians on the sidewalk (or, where it meets the cross street, on the road).
    for _ in range(rng.integers(2, 7)):
      xp = rng.uniform(-30, 30)
      ground = walk if clear_of_cross(xp, xp, 0) else -height
      street.add_pedestrian(rng, xp, edge + side * rng.uniform(0.5, sidewalk - 0.3), ground)

  # Driving cars in the lanes, clear of each other, the parked ones and the sensor.
  lane_centers = [right + (k + 0.5) * width / lanes for k in range(lanes)]
  placed = [(b[0][0], b[0][1]) for b in street.boxes if b[3] == CAR]
  for _ in range(rng.poisson(3)):
    x, y = rng.uniform(-reach, reach), lane_centers[rng.integers(lanes)] + rng.normal(0, 0.2)
    if any(abs(x - px) < 6 and abs(y - py) < 2.2 for px, py in placed):
      continue
    if street.add_car(rng, x, y, rng.normal(0, 0.03)):
      placed.append((x, y))
  # A car and a pedestrian crossing the road, both within 20 m: every scan has some of each.
  for _ in range(20):
    x, y = rng.choice([-1, 1]) * rng.uniform(7, 18), lane_centers[rng.integers(lanes)]
    if not any(abs(x - px) < 6 and abs(y - py) < 2.2 for px, py in placed):
      if street.add_car(rng, x, y, rng.normal(0, 0.03)):
        placed.append((x, y))
        break
  for _ in range(20):
    x, y = rng.choice([-1, 1]) * rng.uniform(5, 15), rng.uniform(right + 0.5, left - 0.5)
    if not any(abs(x - px) < 3.5 and abs(y - py) < 1.8 for px, py in placed):
      if street.add_pedestrian(rng, x, y, -height):
        break
  return street


def _hit_ground(street: _Street, d: np.ndarray) -> tuple[np.ndarray, ...]:
  """Rays from the origin along ``d`` [..., 3] against the road, the curb and the sidewalk.

  Returns the distance (inf: a miss), the label, the reflectance and the cosine of the incidence angle.
  """
  shape = d.shape[:-1]
  t = np.full(shape, np.inf)
  label = np.full(shape, -1, np.int32)
  reflectance = np.zeros(shape)
  cosine = np.abs(d[..., 2])
  down = d[..., 2] < -1e-6
  dd = d[down]
  t_walk = (street.curb - street.height) / dd[:, 2]
  t_road = -street.height / dd[:, 2]
  walk_in_road = street.in_road(t_walk * dd[:, 0], t_walk * dd[:, 1])
  road_in_road = street.in_road(t_road * dd[:, 0], t_road * dd[:, 1])
  hit_t = np.where(walk_in_road, t_road, t_walk)
  hit_label = np.where(walk_in_road, ROAD, SIDEWALK)
  hit_refl = np.where(walk_in_road, street.road_reflectance, street.sidewalk_reflectance)
  hit_cos = cosine[down]
  # Above the road at the sidewalk's height, beside it at the road's: the ray meets the curb face.
  curb = walk_in_road & ~road_in_road
  lo, hi, dc = t_walk[curb], t_road[curb], dd[curb]
  for _ in range(_CURB_STEPS):
    mid = (lo + hi) / 2
    inside = street.in_road(mid * dc[:, 0], mid * dc[:, 1])
    lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
  hit_t[curb], hit_label[curb], hit_refl[curb] = hi, SIDEWALK, street.sidewalk_reflectance + 0.05
  hit_cos[curb] = np.hypot(dc[:, 0], dc[:, 1])
  # Lane markings: dashed lines between lanes, solid lines 0.3 m inside the road's edges.
  road = hit_label == ROAD
  x, y = hit_t[road] * dd[road, 0], hit_t[road] * dd[road, 1]
  lines = (np.abs(y - street.road[0] - 0.3) < 0.07) | (np.abs(y - street.road[1] + 0.3) < 0.07)
  for yl in street.lane_lines:
    lines |= (np.abs(y - yl) < 0.07) & (np.mod(x, 9.0) < 3.0)
  if street.cross is not None:
    lines &= (x < street.cross[0]) | (x > street.cross[1])
  hit_refl[np.flatnonzero(road)[lines]] = 0.8
  t[down], label[down], reflectance[down], cosine[down] = hit_t, hit_label, hit_refl, hit_cos
  return t, label, reflectance, cosine


def _hit_box(d: np.ndarray, center, half, yaw: float) -> tuple[np.ndarray, np.ndarray]:
  """Slab test of rays from the origin against a box turned by ``yaw`` about z: distance, cosine."""
  c, s = np.cos(yaw), np.sin(yaw)
  rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # street frame -> box frame
  origin = rot @ -np.asarray(center, np.float64)
  dl = d @ rot.T
  safe = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
  t1, t2 = (-np.asarray(half) - origin) / safe, (np.asarray(half) - origin) / safe
  near = np.minimum(t1, t2)
  t_near, t_far = near.max(-1), np.maximum(t1, t2).min(-1)
  hit = (t_near <= t_far) & (t_near > _EPS)
  cosine = np.abs(np.take_along_axis(dl, near.argmax(-1)[..., None], -1)[..., 0])
  return np.where(hit, t_near, np.inf), cosine


def _hit_cylinder(d: np.ndarray, x: float, y: float, z0: float, z1: float, radius: float):
  """Rays from the origin against a vertical cylinder with a top cap: distance, cosine."""
  a = d[..., 0] ** 2 + d[..., 1] ** 2
  b = -2 * (x * d[..., 0] + y * d[..., 1])
  c = x * x + y * y - radius * radius
  disc = b * b - 4 * a * c
  with np.errstate(invalid="ignore", divide="ignore"):
    t = (-b - np.sqrt(disc)) / (2 * a)
    z = t * d[..., 2]
    side = (disc >= 0) & (t > _EPS) & (z >= z0) & (z <= z1)
    t_side = np.where(side, t, np.inf)
    cos_side = np.abs((t * d[..., 0] - x) * d[..., 0] + (t * d[..., 1] - y) * d[..., 1]) / radius
    t_cap = z1 / d[..., 2]
    cap = (
      (z1 < 0) & (d[..., 2] < 0) & ((t_cap * d[..., 0] - x) ** 2 + (t_cap * d[..., 1] - y) ** 2 <= radius**2)
    )
  t_cap = np.where(cap, t_cap, np.inf)
  return np.minimum(t_side, t_cap), np.where(t_cap < t_side, np.abs(d[..., 2]), cos_side)


def _hit_ellipsoid(d: np.ndarray, center, radii):
  """Rays from the origin against an axis-aligned ellipsoid: distance, cosine."""
  center, radii = np.asarray(center, np.float64), np.asarray(radii, np.float64)
  origin, dl = -center / radii, d / radii
  a = (dl * dl).sum(-1)
  b = 2 * (dl @ origin)
  c = origin @ origin - 1
  disc = b * b - 4 * a * c
  with np.errstate(invalid="ignore"):
    t = (-b - np.sqrt(disc)) / (2 * a)
  hit = (disc >= 0) & (t > _EPS)
  normal = (t[..., None] * d - center) / radii**2
  cosine = np.abs((normal * d).sum(-1)) / np.maximum(np.linalg.norm(normal, axis=-1), 1e-12)
  return np.where(hit, t, np.inf), cosine


def simulate_scan(
  seed: int,
  *,
  beams: int = 32,
  points_per_ring: int = 960,
  max_range: float = 50.0,
  range_noise: float = 0.02,
  dropout: float = 0.03,
) -> tuple[np.ndarray, np.ndarray]:
  """One labelled scan of a procedural street, in KITTI's sensor frame.

  The street and the noise come from ``np.random.default_rng(seed)``: the same seed and arguments
  give the same arrays. With the defaults a 32-beam scan has about 22k to 29k points, a 64-beam scan
  about 50k to 60k. Points come ring by ring, from the highest beam down, each ring in azimuth order.

  Args:
    seed: picks the street, the sensor's pose in it and the noise.
    beams: 32 (HDL-32E) or 64 (HDL-64E); see ``beam_elevations``.
    points_per_ring: azimuth steps per revolution.
    max_range: returns farther than this (m) are left out.
    range_noise: standard deviation of the Gaussian range noise (m); foliage adds a random depth.
    dropout: the chance that a return is lost (dark glass and grazing hits lose more).

  Returns:
    ``(points, labels)``: float32 ``[P, 4]`` (x, y, z, intensity in [0, 1]) and int32 ``[P]``, ids into
    ``CLASSES``.

  Raises:
    ValueError: ``beams`` is neither 32 nor 64, or ``points_per_ring`` or ``max_range`` is not positive.

  >>> points, labels = simulate_scan(0)
  >>> points.shape[1], points.dtype, labels.dtype
  (4, dtype('float32'), dtype('int32'))
  >>> [CLASSES[i] for i in np.unique(labels)]
  ['road', 'sidewalk', 'building', 'car', 'pedestrian', 'pole', 'vegetation']
  """
  if points_per_ring < 1 or not max_range > 0:
    raise ValueError(
      f"points_per_ring={points_per_ring}, max_range={max_range}: both must be positive "
      "(e.g. points_per_ring=960, max_range=50.0)"
    )
  elevation = np.deg2rad(beam_elevations(beams))
  rng = np.random.default_rng(seed)
  street = _street(rng, max_range)
  azimuth = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(points_per_ring) / points_per_ring
  d_sensor = np.stack(
    [
      np.cos(elevation)[:, None] * np.cos(azimuth),
      np.cos(elevation)[:, None] * np.sin(azimuth),
      np.broadcast_to(np.sin(elevation)[:, None], (beams, points_per_ring)),
    ],
    axis=-1,
  )  # [beams, points_per_ring, 3]
  # The sensor's pose in the street frame: the street's yaw, a slight pitch and roll.
  yaw, (pitch, roll) = street.yaw, np.clip(rng.normal(0, 0.004, 2), -0.01, 0.01)
  cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
  pose = np.array(
    [
      [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
      [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
      [-sp, cp * sr, cp * cr],
    ]
  )  # sensor frame -> street frame
  d = d_sensor @ pose.T

  t, label, reflectance, cosine = _hit_ground(street, d)
  primitives = [("box", p) for p in street.boxes]
  primitives += [("cylinder", p) for p in street.cylinders]
  primitives += [("ellipsoid", p) for p in street.ellipsoids]
  step = 2 * np.pi / points_per_ring
  for kind, primitive in primitives:
    if kind == "box":
      center, half = np.asarray(primitive[0], np.float64), np.asarray(primitive[1], np.float64)
      radius = float(np.linalg.norm(half))
    elif kind == "cylinder":
      x, y, z0, z1, r = primitive[:5]
      center, radius = np.array([x, y, (z0 + z1) / 2]), float(np.hypot(r, (z1 - z0) / 2))
    else:
      center, radius = np.asarray(primitive[0], np.float64), float(np.max(primitive[1]))
    # The block of rays that can reach the bounding sphere (in the sensor frame).
    local = pose.T @ center
    flat, dist = float(np.hypot(local[0], local[1])), float(np.linalg.norm(local))
    if dist - radius > max_range:
      continue
    if flat <= radius:
      cols = np.arange(points_per_ring)
    else:
      spread = np.arcsin(radius / flat)
      middle = np.arctan2(local[1], local[0]) - azimuth[0]
      first, last = int(np.ceil((middle - spread) / step)), int(np.floor((middle + spread) / step))
      cols = np.arange(first, last + 1)[:points_per_ring] % points_per_ring
    if dist <= radius:
      rows = np.arange(beams)
    else:
      lift, spread = np.arctan2(local[2], flat), np.arcsin(radius / dist)
      rows = np.flatnonzero(np.abs(elevation - lift) <= spread)
    if cols.size == 0 or rows.size == 0:
      continue
    block = np.ix_(rows, cols)
    db = d[block]
    if kind == "box":
      tb, cb = _hit_box(db, primitive[0], primitive[1], primitive[2])
    elif kind == "cylinder":
      tb, cb = _hit_cylinder(db, *primitive[:5])
    else:
      tb, cb = _hit_ellipsoid(db, primitive[0], primitive[1])
    nearer = tb < t[block]
    t[block] = np.where(nearer, tb, t[block])
    label[block] = np.where(nearer, primitive[-2], label[block])
    reflectance[block] = np.where(nearer, primitive[-1], reflectance[block])
    cosine[block] = np.where(nearer, cb, cosine[block])

  # Noise, dropout and intensity, for every ray (misses are dropped at the end).
  shape = t.shape
  foliage = label == VEGETATION
  measured = t + rng.normal(0, range_noise, shape) + np.where(foliage, rng.exponential(0.12, shape), 0.0)
  lost = rng.random(shape) < dropout + 0.4 * (reflectance < 0.08) + 0.3 * (cosine < 0.05)
  keep = np.isfinite(t) & ~lost & (measured > 0) & (measured <= max_range)
  noise = rng.normal(0, 1, shape) * np.where(foliage, 0.1, 0.03)
  intensity = np.clip(reflectance * (0.6 + 0.4 * cosine) + noise, 0, 1)
  points = np.concatenate([measured[keep][:, None] * d_sensor[keep], intensity[keep][:, None]], axis=1)
  return points.astype(np.float32), label[keep].astype(np.int32)
