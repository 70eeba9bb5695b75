"""read_points / write_points: files written here by hand (numpy bytes, plyfile, laspy) and read back.

Expected values are the arrays the tests wrote, cast to float32, never the reader's own output.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
import struct
import sys
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jsparse.utils import _io, read_points, write_points


def _points(num_points=50, num_features=4, seed=0):
  rng = np.random.default_rng(seed)
  points = rng.normal(0, 30, (num_points, num_features)).astype(np.float32)
  points[3, :3] = np.nan  # a dropped return: kept as NaN, the voxelizer drops it
  return points


def _pcd_header(fields, sizes, types, counts, num_points, data):
  return (
    "# .PCD v0.7 - Point Cloud Data file format\n"
    "VERSION 0.7\n"
    f"FIELDS {' '.join(fields)}\nSIZE {' '.join(map(str, sizes))}\nTYPE {' '.join(types)}\n"
    f"COUNT {' '.join(map(str, counts))}\nWIDTH {num_points}\nHEIGHT 1\n"
    f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {num_points}\nDATA {data}\n"
  ).encode()


def _lzf_compress(data: bytes) -> bytes:
  """A greedy LZF compressor (liblzf's stream format): literal runs and back references."""
  out, literal, table, i = bytearray(), bytearray(), {}, 0

  def flush():
    for start in range(0, len(literal), 32):
      chunk = literal[start : start + 32]
      out.append(len(chunk) - 1)
      out.extend(chunk)
    literal.clear()

  while i < len(data):
    ref = table.get(data[i : i + 3]) if i + 3 <= len(data) else None
    if i + 3 <= len(data):
      table[data[i : i + 3]] = i
    if ref is not None and i - ref - 1 < 8192:
      length = 3
      while length < 264 and i + length < len(data) and data[ref + length] == data[i + length]:
        length += 1
      flush()
      offset, code = i - ref - 1, length - 2
      if code < 7:
        out.append(code << 5 | offset >> 8)
      else:
        out += bytes([7 << 5 | offset >> 8, code - 7])
      out.append(offset & 255)
      i += length
    else:
      literal.append(data[i])
      i += 1
  flush()
  return bytes(out)


# A mixed-type PCD record: every TYPE/SIZE family, a COUNT 3 field and a padding field "_".
MIXED = [("x", "<f4", 1), ("y", "<f4", 1), ("z", "<f8", 1), ("intensity", "<u1", 1), ("ring", "<u2", 1)]
MIXED += [("label", "<i4", 1), ("normal", "<f4", 3), ("_", "<i1", 1), ("stamp", "<u8", 1), ("dz", "<f2", 1)]
MIXED += [("id", "<i8", 1), ("flag", "<i2", 1), ("code", "<u4", 1)]


def _mixed_record(num_points, seed=0):
  """Structured PCD rows and the float32 ``[P, F]`` they should read as (padding left out)."""
  rng = np.random.default_rng(seed)
  dtype = np.dtype([(f"c{i}", t, (c,)) for i, (_, t, c) in enumerate(MIXED)])
  rows = np.zeros(num_points, dtype)
  for i, (_, t, _c) in enumerate(MIXED):
    info = np.iinfo(t) if np.dtype(t).kind in "iu" else None
    low, high = (max(info.min, -1000), min(info.max, 1000)) if info else (-100, 100)
    rows[f"c{i}"] = rng.uniform(low, high, rows[f"c{i}"].shape).astype(t)
  expected = np.concatenate(
    [rows[f"c{i}"].astype(np.float32) for i, (name, _, _) in enumerate(MIXED) if name != "_"], axis=1
  )
  names = [name for name, _, c in MIXED if name != "_" for _ in range(c)]
  return rows, expected, names


def _mixed_header(num_points, data):
  dts = [np.dtype(t) for _, t, _ in MIXED]
  return _pcd_header(
    [n for n, _, _ in MIXED], [dt.itemsize for dt in dts], [dt.kind.upper() for dt in dts],
    [c for _, _, c in MIXED], num_points, data,
  )  # fmt: skip


# Round trips through write_points.


@pytest.mark.parametrize(
  ("suffix", "binary"),
  [
    (".bin", True),
    (".npy", True),
    (".npz", True),
    (".pcd", True),
    (".pcd", False),
    (".ply", True),
    (".ply", False),
  ],
)
def test_round_trip(tmp_path, suffix, binary):
  if suffix == ".ply":
    pytest.importorskip("plyfile")
  points = _points(num_features=5)
  write_points(tmp_path / f"scan{suffix}", points, binary=binary)
  np.testing.assert_array_equal(read_points(tmp_path / f"scan{suffix}", 5), points)


@pytest.mark.parametrize("suffix", [".bin", ".npy", ".npz", ".pcd"])
def test_round_trip_empty(tmp_path, suffix):
  write_points(tmp_path / f"empty{suffix}", np.zeros((0, 4), np.float32))
  assert read_points(tmp_path / f"empty{suffix}", 4).shape == (0, 4)


def test_write_casts_to_float32(tmp_path):
  points = np.arange(12, dtype=np.float64).reshape(4, 3) / 3
  write_points(tmp_path / "scan.npy", points)
  loaded = np.load(tmp_path / "scan.npy")
  assert loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, points.astype(np.float32))


@pytest.mark.parametrize("binary", [True, False])
def test_write_pcd_header_and_fields(tmp_path, binary):
  points = _points(num_features=4)
  path = tmp_path / "scan.pcd"
  write_points(path, points, fields=["x", "y", "z", "intensity"], binary=binary)
  assert b"FIELDS x y z intensity\n" in path.read_bytes()
  assert f"POINTS {len(points)}\nDATA {'binary' if binary else 'ascii'}\n".encode() in path.read_bytes()
  np.testing.assert_array_equal(read_points(path, fields=["intensity", "x"]), points[:, [3, 0]])


# .bin, .npy, .npz written with numpy.


def test_bin_matches_numpy(tmp_path):
  points = _points(num_features=5)
  points.astype("<f4").tofile(tmp_path / "sweep.bin")
  out = read_points(tmp_path / "sweep.bin", 5)
  assert out.dtype == np.float32 and out.shape == (50, 5)
  np.testing.assert_array_equal(out, points)


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.uint8, np.float16])
def test_npy_casts(tmp_path, dtype):
  array = (np.arange(24).reshape(8, 3) % 7).astype(dtype)
  np.save(tmp_path / "a.npy", array)
  out = read_points(tmp_path / "a.npy")
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, array.astype(np.float32))


def test_npz_keys(tmp_path):
  a, b = _points(seed=1), _points(num_features=3, seed=2)
  np.savez(tmp_path / "one.npz", cloud=a)
  np.savez(tmp_path / "named.npz", points=a, labels=np.arange(50))
  np.savez(tmp_path / "two.npz", a=a, b=b)
  np.testing.assert_array_equal(read_points(tmp_path / "one.npz"), a)  # the only array
  np.testing.assert_array_equal(read_points(tmp_path / "named.npz"), a)  # "points"
  np.testing.assert_array_equal(read_points(tmp_path / "two.npz", key="b"), b)
  with pytest.raises(ValueError, match=r"two.npz: no array 'points'; pass key= one of \['a', 'b'\]"):
    read_points(tmp_path / "two.npz")
  with pytest.raises(ValueError, match=r"no array 'c'; pass key= one of \['a', 'b'\]"):
    read_points(tmp_path / "two.npz", key="c")
  with pytest.raises(
    ValueError, match=r"named.npz\['labels'\] must be a 2-D real array \[P, F\], got int64 \(50,\)"
  ):
    read_points(tmp_path / "named.npz", key="labels")


# .pcd files built byte by byte.


def test_pcd_binary_mixed_types(tmp_path):
  rows, expected, _ = _mixed_record(40)
  (tmp_path / "mixed.pcd").write_bytes(_mixed_header(40, "binary") + rows.tobytes())
  out = read_points(tmp_path / "mixed.pcd")
  assert out.shape == (40, 14) and out.dtype == np.float32
  np.testing.assert_array_equal(out, expected)


def test_pcd_ascii_mixed_types(tmp_path):
  rows, expected, _ = _mixed_record(40, seed=1)
  lines = [
    " ".join(repr(v) for v in row)
    for row in np.concatenate([rows[n].astype(object) for n in rows.dtype.names], 1)
  ]
  (tmp_path / "mixed.pcd").write_bytes(_mixed_header(40, "ascii") + ("\n".join(lines) + "\n").encode())
  np.testing.assert_array_equal(read_points(tmp_path / "mixed.pcd"), expected)


def test_pcd_binary_compressed(tmp_path):
  rows, expected, _ = _mixed_record(300, seed=2)
  rows["c0"][100:200] = 0  # runs, so the stream has overlapping back references
  expected[100:200, 0] = 0
  # Structure of arrays: each field for all points, then the next field; PCL's writer (and reader,
  # pcd_io.cpp "Unpack the xxyyzz to xyz") leaves the padding field "_" out.
  stored = [f"c{i}" for i, (name, _, _) in enumerate(MIXED) if name != "_"]
  raw = b"".join(np.ascontiguousarray(rows[name]).tobytes() for name in stored)
  body = _lzf_compress(raw)
  assert len(body) < len(raw) - 1000  # back references were used
  size = np.array([len(body), len(raw)], "<u4").tobytes()
  (tmp_path / "c.pcd").write_bytes(_mixed_header(300, "binary_compressed") + size + body)
  np.testing.assert_array_equal(read_points(tmp_path / "c.pcd"), expected)


@pytest.mark.parametrize(
  "body",
  [
    b"\x01aa\x80\x00\x01aa",  # liblzf's lzf_compress (python-lzf 0.2.6) of 10 x "a"
    b"\x00a\xe0\x00\x00",  # the literal "a", then 9 bytes from 1 back (length byte 9 - 2 - 7 = 0)
  ],
  ids=["liblzf", "extended-length"],
)
def test_pcd_binary_compressed_known_stream(tmp_path, body):
  # Both streams decode to 10 x "a" with liblzf's lzf_decompress; here one uint8 field of 10 points.
  header = _pcd_header(["v"], [1], ["U"], [1], 10, "binary_compressed")
  (tmp_path / "a.pcd").write_bytes(header + np.array([len(body), 10], "<u4").tobytes() + body)
  np.testing.assert_array_equal(read_points(tmp_path / "a.pcd"), np.full((10, 1), ord("a"), np.float32))


def test_pcd_fields_select_and_count(tmp_path):
  rows, expected, names = _mixed_record(10)
  (tmp_path / "mixed.pcd").write_bytes(_mixed_header(10, "binary") + rows.tobytes())
  out = read_points(tmp_path / "mixed.pcd", fields=["x", "y", "z", "intensity"])
  np.testing.assert_array_equal(out, expected[:, :4])
  normal = [i for i, name in enumerate(names) if name == "normal"]
  assert len(normal) == 3  # COUNT 3: three columns
  np.testing.assert_array_equal(read_points(tmp_path / "mixed.pcd", fields=["normal"]), expected[:, normal])


def test_pcd_organized_crlf_no_count(tmp_path):
  # An organized 3 x 2 cloud with NaN points, CRLF line ends and no COUNT line (COUNT defaults to 1).
  points = np.array([[1, 2, 3], [np.nan] * 3, [4, 5, 6], [7, 8, 9], [np.nan] * 3, [0, -1, 1.5]], np.float32)
  header = [
    "VERSION .7",
    "FIELDS x y z",
    "SIZE 4 4 4",
    "TYPE F F F",
    "WIDTH 3",
    "HEIGHT 2",
    "POINTS 6",
    "DATA binary",
  ]
  (tmp_path / "o.pcd").write_bytes("".join(line + "\r\n" for line in header).encode() + points.tobytes())
  np.testing.assert_array_equal(read_points(tmp_path / "o.pcd"), points)


# .ply via plyfile.


@pytest.mark.parametrize("text", [False, True])
def test_ply_mixed_properties(tmp_path, text):
  plyfile = pytest.importorskip("plyfile")
  rng = np.random.default_rng(3)
  # x, y, z are not first in the file: the reader puts them first, then the others in file order.
  vertex = np.zeros(
    20, [("red", "u1"), ("x", "f8"), ("y", "f4"), ("z", "f4"), ("intensity", "u2"), ("t", "i4")]
  )
  for name in vertex.dtype.names:
    vertex[name] = rng.uniform(0, 200, 20)
  face = np.array([([0, 1, 2],)], [("vertex_indices", "i4", (3,))])
  plyfile.PlyData(
    [plyfile.PlyElement.describe(vertex, "vertex"), plyfile.PlyElement.describe(face, "face")], text=text
  ).write(str(tmp_path / "m.ply"))
  order = ["x", "y", "z", "red", "intensity", "t"]
  expected = np.stack([vertex[name].astype(np.float32) for name in order], axis=1)
  np.testing.assert_array_equal(read_points(tmp_path / "m.ply"), expected)
  np.testing.assert_array_equal(read_points(tmp_path / "m.ply", fields=["t", "x"]), expected[:, [5, 0]])
  with pytest.raises(ValueError, match=r"m.ply: no field 'nx'; it has x, y, z, red, intensity, t"):
    read_points(tmp_path / "m.ply", fields=["x", "nx"])


def test_ply_write_fields(tmp_path):
  plyfile = pytest.importorskip("plyfile")
  points = _points(num_features=4)
  write_points(tmp_path / "w.ply", points, fields=["x", "y", "z", "intensity"], binary=False)
  vertex = plyfile.PlyData.read(str(tmp_path / "w.ply"))["vertex"]
  assert [p.name for p in vertex.properties] == ["x", "y", "z", "intensity"]
  np.testing.assert_array_equal(vertex["intensity"], points[:, 3])


def test_ply_truncated(tmp_path):
  pytest.importorskip("plyfile")
  write_points(tmp_path / "t.ply", _points())
  data = (tmp_path / "t.ply").read_bytes()
  (tmp_path / "t.ply").write_bytes(data[:-10])
  with pytest.raises(ValueError, match=r"t.ply: not a readable PLY file"):
    read_points(tmp_path / "t.ply")
  write_points(tmp_path / "x.pcd", _points())
  (tmp_path / "x.ply").write_bytes((tmp_path / "x.pcd").read_bytes())
  with pytest.raises(ValueError, match=r"x.ply: not a readable PLY file"):
    read_points(tmp_path / "x.ply")


def test_ply_without_vertex(tmp_path):
  plyfile = pytest.importorskip("plyfile")
  element = plyfile.PlyElement.describe(np.zeros(2, [("a", "f4")]), "camera")
  plyfile.PlyData([element]).write(str(tmp_path / "c.ply"))
  with pytest.raises(ValueError, match=r"c.ply: no 'vertex' element; it has \['camera'\]"):
    read_points(tmp_path / "c.ply")


@pytest.mark.parametrize(
  ("suffix", "module", "hint"),
  [(".ply", "plyfile", "pip install plyfile"), (".las", "laspy", "pip install 'laspy")],
)
def test_missing_optional_dependency(tmp_path, monkeypatch, suffix, module, hint):
  (tmp_path / f"a{suffix}").write_bytes(b"ply\n")
  monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
  with pytest.raises(ImportError, match=f"a{suffix} needs {module}: {hint}"):
    read_points(tmp_path / f"a{suffix}")


# .las / .laz via laspy.


@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_las(tmp_path, suffix):
  laspy = pytest.importorskip("laspy")
  if suffix == ".laz":
    pytest.importorskip("lazrs")
  rng = np.random.default_rng(4)
  header = laspy.LasHeader(point_format=3, version="1.2")
  header.scales, header.offsets = np.array([0.01, 0.01, 0.001]), np.array([100.0, -50.0, 0.0])
  las = laspy.LasData(header)
  xyz = np.round(rng.uniform(-20, 20, (30, 3)), 2)
  las.x, las.y, las.z = xyz[:, 0] + 100, xyz[:, 1] - 50, xyz[:, 2]
  las.intensity = rng.integers(0, 65535, 30).astype(np.uint16)
  las.classification = rng.integers(0, 20, 30).astype(np.uint8)
  las.write(str(tmp_path / f"a{suffix}"))
  expected = np.c_[xyz + [100, -50, 0], las.intensity].astype(np.float32)
  np.testing.assert_allclose(read_points(tmp_path / f"a{suffix}"), expected, rtol=0, atol=1e-4)
  out = read_points(tmp_path / f"a{suffix}", fields=["classification", "z"])
  np.testing.assert_allclose(out, np.c_[las.classification, xyz[:, 2]].astype(np.float32), atol=1e-4)
  with pytest.raises(ValueError, match=r"no field 'nir'; it has "):
    read_points(tmp_path / f"a{suffix}", fields=["x", "nir"])


def test_las_corrupt(tmp_path):
  pytest.importorskip("laspy")
  (tmp_path / "bad.las").write_bytes(b"LASF" + bytes(20))
  with pytest.raises(ValueError, match=r"bad.las: not a readable LAS file"):
    read_points(tmp_path / "bad.las")
  (tmp_path / "bad.las").write_bytes(b"not a las file at all" * 20)
  with pytest.raises(ValueError, match=r"bad.las: not a readable LAS file"):
    read_points(tmp_path / "bad.las")


# Real scans: data/ (KITTI, nuScenes) and $JSPARSE_EXTRA_DATA (ScanNet, SUN RGB-D, not redistributed; see
# data/README.md). Shapes and value ranges from data/README.md's table.

SCANS = {
  "kitti_000008.bin": (17238, 4, {0: (2.9, 76.8), 1: (-26.4, 10.3), 2: (-3.6, 2.9), 3: (0, 1)}),
  "nuscenes_lidar_top.bin": (34688, 5, {0: (-58, 97), 1: (-96, 99), 2: (-3.4, 19), 3: (0, 255)}),
}
EXTRA_SCANS = {
  "scannet_scene0000_00.bin": (40684, 6, {3: (0, 255), 4: (0, 255), 5: (0, 255)}),
  "sunrgbd_000017.bin": (50000, 6, {3: (0, 1), 4: (0, 1), 5: (0, 1)}),
}
EXTENTS = {"scannet_scene0000_00.bin": (8.4, 8.7, 3.0), "sunrgbd_000017.bin": (6.6, 7.1, 3.1)}


def _check_scan(path, num_points, num_features, ranges, tmp_path):
  name = path.name
  points = read_points(path, num_features)
  assert points.shape == (num_points, num_features) and points.dtype == np.float32
  assert np.isfinite(points).all()
  for column, (low, high) in ranges.items():
    # The README rounds to 0.1 (or to the nearest metre for nuScenes): allow half a unit.
    slack = 0.5 if name.startswith("nuscenes") and column < 3 else 0.05
    assert low - slack <= points[:, column].min() and points[:, column].max() <= high + slack, column
  if name in EXTENTS:
    np.testing.assert_allclose(np.ptp(points[:, :3], axis=0), EXTENTS[name], atol=0.05)
  if name.startswith("nuscenes"):
    assert set(np.unique(points[:, 4])) <= set(range(32))  # ring: 32 beams
  # The same points through every writable format.
  expected = np.fromfile(path, np.float32).reshape(-1, num_features)
  for suffix in (".pcd", ".npz"):
    write_points(tmp_path / f"scan{suffix}", points)
    np.testing.assert_array_equal(read_points(tmp_path / f"scan{suffix}"), expected)


@pytest.mark.parametrize("name", list(SCANS))
def test_real_scans(scans, name, tmp_path):
  _check_scan(scans / name, *SCANS[name], tmp_path)


@pytest.mark.parametrize("name", list(EXTRA_SCANS))
def test_real_extra_scans(extra_scans, name, tmp_path):
  _check_scan(extra_scans / name, *EXTRA_SCANS[name], tmp_path)


def test_kitti_wrong_num_features(scans):
  with pytest.raises(ValueError, match=r"275808 bytes .* num_features=5 .* counts that fit: \[3, 4, 6, 8\]"):
    read_points(scans / "kitti_000008.bin", 5)


# Error paths.


def test_unknown_suffix_and_missing_file(tmp_path):
  (tmp_path / "scan.xyz").write_text("1 2 3\n")
  with pytest.raises(
    ValueError, match=r"scan.xyz: unknown point-cloud suffix '.xyz'; read_points reads .bin, .npy"
  ):
    read_points(tmp_path / "scan.xyz")
  with pytest.raises(FileNotFoundError, match=r"nope.pcd: no such file"):
    read_points(tmp_path / "nope.pcd")
  with pytest.raises(FileNotFoundError, match=r"dir.bin: no such file"):
    (tmp_path / "dir.bin").mkdir()
    read_points(tmp_path / "dir.bin", 4)


def test_bin_errors(tmp_path):
  np.arange(10, dtype=np.float32).tofile(tmp_path / "s.bin")
  message = (
    r"s.bin: 40 bytes is not a whole number of points of num_features=4 float32 columns \(16 bytes each\); "
    r"counts that fit: \[5\]\. KITTI scans have num_features=4, nuScenes sweeps num_features=5"
  )
  with pytest.raises(ValueError, match=message):
    read_points(tmp_path / "s.bin", 4)
  with pytest.raises(
    ValueError,
    match=r"s.bin: a raw .bin file does not record its column count: pass num_features \(4 for KITTI",
  ):
    read_points(tmp_path / "s.bin")
  with pytest.raises(ValueError, match=r"num_features must be a positive int, got 0"):
    read_points(tmp_path / "s.bin", 0)
  with pytest.raises(ValueError, match=r"num_features must be a positive int, got 4.0"):
    read_points(tmp_path / "s.bin", 4.0)
  np.arange(11, dtype=np.float32).tofile(tmp_path / "p.bin")  # 44 bytes: no count in 3..8 fits
  with pytest.raises(ValueError, match=r"44 bytes .* counts that fit: none \(truncated file\?\)"):
    read_points(tmp_path / "p.bin", 4)


def test_argument_errors(tmp_path):
  points = _points()
  write_points(tmp_path / "s.npy", points)
  write_points(tmp_path / "s.pcd", points)
  with pytest.raises(ValueError, match=r"s.npy: has 4 columns, num_features=5 was expected"):
    read_points(tmp_path / "s.npy", 5)
  with pytest.raises(
    ValueError, match=r"s.npy: .npy columns have no names, so fields=\['x'\] cannot select them"
  ):
    read_points(tmp_path / "s.npy", fields=["x"])
  with pytest.raises(ValueError, match=r"s.pcd: key='points' applies to .npz files only"):
    read_points(tmp_path / "s.pcd", key="points")
  with pytest.raises(ValueError, match=r"s.pcd: no field 'intensity'; it has x, y, z, f3"):
    read_points(tmp_path / "s.pcd", fields=["intensity"])
  np.save(tmp_path / "flat.npy", np.arange(5.0))
  with pytest.raises(ValueError, match=r"flat.npy must be a 2-D real array \[P, F\], got float64 \(5,\)"):
    read_points(tmp_path / "flat.npy")
  (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
  with pytest.raises(ValueError, match=r"junk.npy: not a readable .npy file"):
    read_points(tmp_path / "junk.npy")
  write_points(tmp_path / "cut.npz", points)
  (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:100])
  with pytest.raises(ValueError, match=r"cut.npz: not a readable .npz file"):
    read_points(tmp_path / "cut.npz")


def test_write_errors(tmp_path):
  points = _points()
  with pytest.raises(
    ValueError, match=r"s.txt: write_points writes .bin, .npy, .npz, .ply, .pcd, not '.txt'"
  ):
    write_points(tmp_path / "s.txt", points)
  with pytest.raises(ValueError, match=r"s.pcd: 3 fields \['x', 'y', 'z'\] for 4 columns"):
    write_points(tmp_path / "s.pcd", points, fields=["x", "y", "z"])
  with pytest.raises(ValueError, match=r"fields must be non-empty names without spaces"):
    write_points(tmp_path / "s.pcd", points, fields=["x", "y", "z", "in tensity"])
  with pytest.raises(ValueError, match=r"fields \['x', 'y', 'x', 'i'\] has duplicates"):
    write_points(tmp_path / "s.pcd", points, fields=["x", "y", "x", "i"])
  with pytest.raises(ValueError, match=r"s.npy: fields and binary=False apply to .ply and .pcd only"):
    write_points(tmp_path / "s.npy", points, binary=False)
  with pytest.raises(
    ValueError, match=r"s.bin: points must be a 2-D real array \[P, F\], got float32 \(4,\)"
  ):
    write_points(tmp_path / "s.bin", points[0])
  assert not list(tmp_path.iterdir())  # no partial files


def _good_header(**changes):
  lines = {"FIELDS": "x y z", "SIZE": "4 4 4", "TYPE": "F F F", "COUNT": "1 1 1", "WIDTH": "2"}
  lines |= {"HEIGHT": "1", "VIEWPOINT": "0 0 0 1 0 0 0", "POINTS": "2", "DATA": "ascii"}
  lines |= changes
  return "".join(f"{k} {v}\n" for k, v in lines.items() if v is not None).encode()


@pytest.mark.parametrize(
  ("header", "message"),
  [
    (b"\x89\xfe\x00binary\n", r"not a PCD file \(binary bytes before the DATA line\)"),
    (b"ply\nformat ascii 1.0\n", r"not a PCD header line: 'ply' \(keys are VERSION, FIELDS"),
    (_good_header(DATA=None), r"the PCD header ends without a DATA line"),
    (_good_header(SIZE=None), r"the PCD header has no SIZE line"),
    (_good_header(SIZE="4 4 four"), r"PCD SIZE must be integers, got 4 4 four"),
    (_good_header(WIDTH="-2"), r"PCD WIDTH must not be negative, got -2"),
    (_good_header(TYPE="F F"), r"PCD FIELDS, SIZE, TYPE and COUNT need one entry per field, got 3, 3, 2, 3"),
    (_good_header(TYPE="F F D"), r"PCD field 'z' has TYPE D SIZE 4; F takes 2, 4, 8, I and U 1, 2, 4, 8"),
    (_good_header(SIZE="4 4 3"), r"PCD field 'z' has TYPE F SIZE 3"),
    (_good_header(POINTS="3"), r"PCD POINTS 3 is not WIDTH 2 x HEIGHT 1"),
    (_good_header(FIELDS="x y x"), r"PCD FIELDS repeats x \(only padding '_' may repeat\)"),
    (_good_header(POINTS=None, WIDTH=None), r"the PCD header has neither POINTS nor WIDTH"),
    (
      _good_header(DATA="binary_lz4"),
      r"PCD DATA 'binary_lz4' is not one of ascii, binary, binary_compressed",
    ),
  ],
  ids=["binary", "ply", "no-DATA", "no-SIZE", "SIZE-text", "WIDTH-negative", "TYPE-short", "TYPE-D"]
  + ["SIZE-3", "POINTS-mismatch", "FIELDS-repeat", "no-POINTS-WIDTH", "DATA-unknown"],
)
def test_pcd_corrupt_header(tmp_path, header, message):
  (tmp_path / "bad.pcd").write_bytes(header + (b"1 2 3\n4 5 6\n" if b"DATA" in header else b""))
  with pytest.raises(ValueError, match=r"bad.pcd: " + message):
    read_points(tmp_path / "bad.pcd")


def test_pcd_good_header_reads(tmp_path):
  # The base of the corrupt-header cases is itself valid.
  (tmp_path / "good.pcd").write_bytes(_good_header() + b"1 2 3\n4 5 6\n")
  np.testing.assert_array_equal(read_points(tmp_path / "good.pcd"), [[1, 2, 3], [4, 5, 6]])


def test_pcd_truncated(tmp_path):
  points = _points()
  write_points(tmp_path / "b.pcd", points)
  data = (tmp_path / "b.pcd").read_bytes()
  (tmp_path / "b.pcd").write_bytes(data[:-5])
  with pytest.raises(
    ValueError, match=r"b.pcd: PCD binary data is 795 bytes, 50 points x 16 bytes = 800 expected"
  ):
    read_points(tmp_path / "b.pcd")
  (tmp_path / "a.pcd").write_bytes(_good_header() + b"1 2 3\n4 5\n")
  with pytest.raises(
    ValueError, match=r"a.pcd: PCD ascii data holds 5 values, POINTS x columns = 6 expected"
  ):
    read_points(tmp_path / "a.pcd")
  (tmp_path / "n.pcd").write_bytes(_good_header() + b"1 2 3\n4 5 six\n")
  with pytest.raises(ValueError, match=r"n.pcd: PCD ascii data holds a value that is not a number"):
    read_points(tmp_path / "n.pcd")


def _compressed_pcd(path, sizes, body):
  header = _pcd_header(["v"], [1], ["U"], [1], 10, "binary_compressed")
  path.write_bytes(header + np.array(sizes, "<u4").tobytes() + body)


@pytest.mark.parametrize(
  ("sizes", "body", "message"),
  [
    (None, b"", r"ends before its 8-byte size header"),
    ([9, 10], b"\x00a\xe0\x00\x00", r"is 5 bytes, its header says 9 \(truncated\?\)"),
    (
      [5, 10],
      b"\x00a\xe0\x00\x01",
      r"is corrupt \(the back reference at byte 2 points before the start of the output\)",
    ),
    ([4, 10], b"\x00a\xe0\x00", r"is corrupt \(the input ends inside a back reference\)"),
    ([3, 10], b"\x05abc", r"is corrupt \(the literal run of 6 bytes at byte 0 passes the end of the input\)"),
    ([2, 10], b"\x00a", r"is corrupt \(it decodes to 1 bytes, its header says 10\)"),
    # A run of 264 bytes where the header says 10: the output never grows past the header's size.
    ([5, 10], b"\x00a\xe0\xff\x00", r"is corrupt \(it decodes to more than the 10 bytes its header says\)"),
    ([13, 10], b"\x0ba" + bytes(11), r"is corrupt \(it decodes to more than the 10 bytes its header says\)"),
    # Sizes that do not match POINTS fail before any decoding.
    ([5, 11], b"\x00a\xe0\x00\x00", r"holds 11 bytes, 10 points need 10"),
    ([2, 1], b"\x00a", r"holds 1 bytes, 10 points need 10"),
    ([2, 4_000_000_000], b"\x00a", r"holds 4000000000 bytes, 10 points need 10"),
  ],
  ids=["no-sizes", "truncated", "bad-offset", "cut-reference", "cut-literal", "short-output", "long-run"]
  + ["long-literal", "size-11", "size-1", "size-4e9"],
)
def test_pcd_compressed_corrupt(tmp_path, sizes, body, message):
  if sizes is None:
    (tmp_path / "c.pcd").write_bytes(_pcd_header(["v"], [1], ["U"], [1], 10, "binary_compressed") + b"\x01")
  else:
    _compressed_pcd(tmp_path / "c.pcd", sizes, body)
  with pytest.raises(ValueError, match=r"c.pcd: PCD binary_compressed data " + message):
    read_points(tmp_path / "c.pcd")


def test_upper_case_suffix(tmp_path):
  points = _points()
  for suffix in (".NPY", ".NPZ", ".BIN", ".PCD"):
    write_points(tmp_path / f"s{suffix}", points)
    np.testing.assert_array_equal(read_points(tmp_path / f"s{suffix}", 4), points)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s.BIN", "s.NPY", "s.NPZ", "s.PCD"]


def test_pathlike_and_str(tmp_path):
  points = _points()
  write_points(str(tmp_path / "s.npz"), points)
  np.testing.assert_array_equal(read_points(str(tmp_path / "s.npz")), points)
  np.testing.assert_array_equal(read_points(pathlib.PurePath(tmp_path / "s.npz")), points)


# Hostile files: truncated, corrupt, or with a header that claims more than the file holds. Each must
# raise a ValueError naming the file, at once and without a large allocation: tracemalloc sees numpy's
# and Python's allocations (a 12 TB np.empty that the OS would overcommit included).

HUGE = 10**12
MAX_PEAK = 64 << 20  # bytes a read of a small hostile file may allocate


def _raises_bounded(path, message, num_features=None):
  """read_points(path) raises a ValueError "<path><message>", allocating under MAX_PEAK bytes."""
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
      read_points(path, num_features)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < MAX_PEAK, f"{path.name}: {peak} bytes allocated"


def _npy_bytes(shape, descr="<f4", data=b"", fortran_order=False):
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
    header, {"descr": descr, "fortran_order": fortran_order, "shape": shape}
  )
  return header.getvalue() + data


def _zip_bytes(members, compression=zipfile.ZIP_STORED):
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", compression) as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  return out.getvalue()


def _ply_bytes(encoding, elements, body):
  """A PLY file from ``[(element, count, ["float x", "list uchar int vertex_indices", ...])]``."""
  lines = ["ply", f"format {encoding} 1.0"]
  for name, count, properties in elements:
    lines += [f"element {name} {count}", *(f"property {p}" for p in properties)]
  return ("\n".join([*lines, "end_header"]) + "\n").encode() + body


XYZ = ["float x", "float y", "float z"]
HUGE_HEADERS = {
  "binary.pcd": (
    _pcd_header(["x", "y", "z"], [4] * 3, ["F"] * 3, [1] * 3, HUGE, "binary") + bytes(120),
    r": PCD binary data is 120 bytes, 1000000000000 points x 12 bytes = 12000000000000 expected",
  ),
  "ascii.pcd": (
    _pcd_header(["x", "y", "z"], [4] * 3, ["F"] * 3, [1] * 3, HUGE, "ascii") + b"1 2 3\n" * 10,
    r": PCD ascii data is 60 bytes, too few for POINTS x columns = 3000000000000 values",
  ),
  "compressed.pcd": (
    _pcd_header(["x", "y", "z"], [4] * 3, ["F"] * 3, [1] * 3, HUGE, "binary_compressed")
    + np.array([2, 12], "<u4").tobytes()
    + b"\x00a",
    r": PCD binary_compressed data holds 12 bytes, 1000000000000 points need 12000000000000",
  ),
  "count.pcd": (  # a field of 10^12 values per point
    _pcd_header(["x"], [4], ["F"], [HUGE], 1, "binary") + bytes(16),
    r": PCD binary data is 16 bytes, 1 points x 4000000000000 bytes",
  ),
  "binary.ply": (
    _ply_bytes("binary_little_endian", [("vertex", HUGE, XYZ)], bytes(120)),
    r": not a readable PLY file \(its header claims 1000000000000 'vertex' rows of at least 12 bytes, "
    r"and 120 bytes follow the header",
  ),
  "ascii.ply": (
    _ply_bytes("ascii", [("vertex", HUGE, XYZ)], b"1 2 3\n" * 10),
    r": not a readable PLY file \(its header claims 1000000000000 'vertex' rows of at least 6 bytes",
  ),
  "no-properties.ply": (  # plyfile loops over such rows without reading a byte: a hang, not an error
    _ply_bytes("binary_little_endian", [("vertex", 1, XYZ), ("junk", HUGE, [])], bytes(12)),
    r": not a readable PLY file \(its header claims 1000000000000 'junk' rows of at least 1 bytes",
  ),
  "list.ply": (  # a face whose list claims 2^32 - 1 indices
    _ply_bytes(
      "binary_little_endian",
      [("face", 1, ["list uint int vertex_indices"]), ("vertex", 1, XYZ)],
      struct.pack("<I", 2**32 - 1) + bytes(16),
    ),
    r": not a readable PLY file \(element 'face' has a list of length 4294967295\)",
  ),  # fmt: skip
  "array.npy": (
    _npy_bytes((HUGE, 4), data=bytes(64)),
    r": its header says float32 \(1000000000000, 4\), 16000000000000 bytes, and 64 bytes follow",
  ),
  "array.npz": (
    _zip_bytes({"points.npy": _npy_bytes((HUGE, 4), data=bytes(64))}),
    r"\['points'\]: its header says float32 \(1000000000000, 4\), 16000000000000 bytes",
  ),
}


@pytest.mark.parametrize("name", list(HUGE_HEADERS))
def test_header_claiming_huge_counts(tmp_path, name):
  if name.endswith(".ply"):
    pytest.importorskip("plyfile")
  data, message = HUGE_HEADERS[name]
  (tmp_path / name).write_bytes(data)
  _raises_bounded(tmp_path / name, message)


def _las_bytes(tmp_path, version="1.2", suffix=".las", num_points=30):
  laspy = pytest.importorskip("laspy")
  if suffix == ".laz":
    pytest.importorskip("lazrs")
  las = laspy.LasData(laspy.LasHeader(point_format=3, version=version))
  rng = np.random.default_rng(5)
  las.x, las.y, las.z = rng.uniform(-20, 20, (3, num_points))
  las.write(str(tmp_path / f"seed{suffix}"))
  return bytearray((tmp_path / f"seed{suffix}").read_bytes())


def _patch(data, offset, fmt, value):
  struct.pack_into(fmt, data, offset, value)
  return data


def _laz_chunk_table(data):
  """The offset of a LAZ file's chunk table (its first 8 bytes: version, number of chunks)."""
  return struct.unpack_from("<q", data, struct.unpack_from("<I", data, 96)[0])[0]


LAS_HEADERS = {
  # Header fields by byte offset (LAS 1.2 / 1.4 specification, table 3).
  "count-1.4": (
    "1.4", ".las", lambda d: _patch(d, 247, "<Q", HUGE),
    r": not a readable LAS file \(its header claims 1000000000000 points of 34 bytes, and 1020 bytes",
  ),
  "count-1.2": (
    "1.2", ".las", lambda d: _patch(d, 107, "<I", 4_000_000_000),
    r": not a readable LAS file \(its header claims 4000000000 points of 34 bytes",
  ),
  "truncated": (
    "1.2", ".las", lambda d: d[:-10],
    r": not a readable LAS file \(its header claims 30 points of 34 bytes, and 1010 bytes follow",
  ),
  "vlrs": (  # laspy loops over the VLR count without checking for the end of the data
    "1.2", ".las", lambda d: _patch(d, 100, "<I", 2**32 - 1),
    r": not a readable LAS file \(its header claims 4294967295 VLRs of at least 54 bytes",
  ),
  "offset": (
    "1.2", ".las", lambda d: _patch(d, 96, "<I", 2**32 - 16),
    r": not a readable LAS file \(its header puts the points at byte 4294967280, past the end",
  ),
  "count-laz": (
    "1.2", ".laz", lambda d: _patch(d, 107, "<I", 4_000_000_000),
    r": not a readable LAS file \(its header claims 4000000000 points of 34 bytes, and \d+ bytes of "
    r"compressed points follow",
  ),
  "chunks-laz": (  # lazrs allocates 16 bytes a chunk and aborts the process when it cannot
    "1.2", ".laz", lambda d: _patch(d, _laz_chunk_table(d) + 4, "<I", 2**32 - 1),
    r": not a readable LAZ file \(its chunk table claims 4294967295 chunks",
  ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LAS_HEADERS))
def test_las_hostile_headers(tmp_path, case):
  version, suffix, patch, message = LAS_HEADERS[case]
  path = tmp_path / f"{case}{suffix}"
  path.write_bytes(patch(_las_bytes(tmp_path, version, suffix)))
  _raises_bounded(path, message)


# LAS 1.4 .laz (point formats 6-10): layered chunks. A chunk holds its first point raw, a u32 point count,
# a u32 byte size per layer (Point14 has 9 layers, RGB14 1, RGBNIR14 2, Byte14 one per extra byte), then
# the layers; the arithmetic-coded chunk table after the chunks gives each chunk's bytes.

LAZ14_POINTS = 120_000  # three chunks of lazrs's fixed chunk size, 50,000 (laspy sets no other)


def _las14_files(folder, point_format, num_points=LAZ14_POINTS):
  """A LAS 1.4 cloud of ``point_format`` (7 and 8 with RGB, 8 with NIR, 7 with 5 extra bytes) that laspy
  writes as ``p.las`` and ``p.laz``: their paths and the names of the fields to compare."""
  laspy = pytest.importorskip("laspy")
  pytest.importorskip("lazrs")
  header = laspy.LasHeader(point_format=point_format, version="1.4")
  fields = ["x", "y", "z", "intensity", "classification", "gps_time"]
  if point_format == 7:
    header.add_extra_dims([laspy.ExtraBytesParams("label", "u1"), laspy.ExtraBytesParams("range", "f4")])
    fields += ["label", "range"]
  header.scales = np.array([0.001, 0.001, 0.001])
  las = laspy.LasData(header)
  rng = np.random.default_rng(point_format)
  las.x, las.y, las.z = np.cumsum(rng.normal(0, 0.05, (3, num_points)), axis=1)  # scan-like: smooth
  las.intensity = rng.integers(0, 4000, num_points)
  las.classification = rng.integers(0, 20, num_points)
  las.gps_time = np.arange(num_points) * 1e-5
  if point_format in (7, 8):
    las.red, las.green, las.blue = rng.integers(0, 65536, (3, num_points))
    fields += ["red", "green", "blue"]
  if point_format == 8:
    las.nir = rng.integers(0, 65536, num_points)
    fields += ["nir"]
  if point_format == 7:
    las.label, las.range = rng.integers(0, 256, num_points), rng.uniform(0, 100, num_points)
  for suffix in (".las", ".laz"):
    las.write(str(folder / f"p{suffix}"))
  return folder / "p.las", folder / "p.laz", fields


def _laz_vlr(data):
  """The lazrs.LazVlr of a .laz's LASzip VLR (its header: the data length at byte 20, the data at 54)."""
  lazrs = pytest.importorskip("lazrs")
  at = data.index(b"laszip encoded") - 2
  return lazrs.LazVlr(bytes(data[at + 54 : at + 54 + struct.unpack_from("<H", data, at + 20)[0]]))


def _laz_entries(data):
  """A .laz's chunk table, ``[(points, bytes)]`` per chunk, as lazrs reads it."""
  lazrs = pytest.importorskip("lazrs")
  source = io.BytesIO(bytes(data))
  source.seek(struct.unpack_from("<I", data, 96)[0])
  return lazrs.read_chunk_table(source, _laz_vlr(data))


def _chunk_start(data, index):
  """Where chunk ``index`` of a .laz starts: after the table's 8-byte offset and the chunks before."""
  return struct.unpack_from("<I", data, 96)[0] + 8 + sum(size for _, size in _laz_entries(data)[:index])


def _with_entries(data, edit):
  """``data`` with its chunk table replaced by ``edit(entries)``, encoded again in the same place."""
  lazrs = pytest.importorskip("lazrs")
  out = io.BytesIO()
  out.write(bytes(data[: _laz_chunk_table(data)]))
  lazrs.write_chunk_table(out, edit(list(_laz_entries(data))), _laz_vlr(data))
  return bytearray(out.getvalue())


def _laz_variable_chunks(las_path, laz_path, chunks):
  """Rewrites ``laz_path`` in variable-size chunks of ``chunks`` points each: the LASzip VLR's chunk size
  set to 2**32 - 1 (variable), and the points of ``las_path`` compressed by lazrs chunk by chunk."""
  lazrs = pytest.importorskip("lazrs")
  data = bytearray(laz_path.read_bytes())
  struct.pack_into("<I", data, data.index(b"laszip encoded") - 2 + 54 + 12, 2**32 - 1)
  las = las_path.read_bytes()
  record = struct.unpack_from("<H", las, 105)[0]
  assert sum(chunks) * record == len(las) - struct.unpack_from("<I", las, 96)[0]
  bounds = struct.unpack_from("<I", las, 96)[0] + np.cumsum([0, *chunks]) * record
  out = io.BytesIO()
  out.write(bytes(data[: struct.unpack_from("<I", data, 96)[0]]))
  compressor = lazrs.LasZipCompressor(out, _laz_vlr(data))
  compressor.compress_chunks([las[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
  compressor.done()
  laz_path.write_bytes(out.getvalue())


VARIABLE_CHUNKS = (1, 69_999, 50_000)  # points: a chunk of one point (empty layers), one over 50,000
POINT14 = 30 + 4  # a format 6 chunk's first point (a Point14 item), then its count: the layer sizes follow

LAYERED = {
  # case: (point format, variable chunks, patch, message)
  "layer-size": (
    6, None, lambda d: _patch(d, _chunk_start(d, 0) + POINT14, "<I", 2**32 - 1),
    r"the layers of chunk 0 at byte \d+ claim 429\d+ bytes, \d+ are left before the chunk table at byte",
  ),
  "last-layer-size": (  # the gps time layer, the last of Point14's 9, of the last chunk
    6, None, lambda d: _patch(d, _chunk_start(d, 2) + POINT14 + 4 * 8, "<I", 2**32 - 1),
    r"the layers of chunk 2 at byte \d+ claim 429\d+ bytes, \d+ are left before the chunk table",
  ),
  "chunk-bytes": (  # a chunk table entry running a billion bytes past the table
    6, None, lambda d: _with_entries(d, lambda e: [e[0], (e[1][0], e[1][1] + 10**9), *e[2:]]),
    r"chunk 1 at byte \d+ takes \d+ bytes, its chunk table entry says 1000\d+\)",
  ),
  "truncated": (
    6, None, lambda d: d[: _chunk_start(d, 1) + 1000],
    r"its chunk table offset \d+ is past the end of the file at \d+\)",
  ),
  "chunk-points": (
    6, None, lambda d: _patch(d, _chunk_start(d, 1) + 30, "<I", 50_001),
    r"chunk 1 at byte \d+ claims 50001 points; 1 to the chunk size 50000 fit\)",
  ),
  "no-points": (
    6, None, lambda d: _patch(d, _chunk_start(d, 0) + 30, "<I", 0),
    r"chunk 0 at byte \d+ claims 0 points; 1 to the chunk size 50000 fit\)",
  ),
  "chunks": (
    6, None, lambda d: _patch(d, _laz_chunk_table(d) + 4, "<I", 2**32 - 1),
    r"its chunk table claims 4294967295 chunks of at least 70 bytes in the \d+ bytes before it\)",
  ),
  "bad-item-chunks": (  # lazrs reads the chunk table before it refuses an item of version 0
    6, None,
    lambda d: _patch(_patch(d, d.index(b"laszip encoded") + 52 + 34 + 4, "<H", 0), _laz_chunk_table(d) + 4,
                     "<I", 2**31),
    r"its chunk table claims 2147483648 chunks of at least 30 bytes",
  ),
  "table-offset": (  # where the seek there fails, lazrs reads the chunks 8 bytes late (a fuzzed seed: 2.5 GB)
    6, None, lambda d: _patch(d, struct.unpack_from("<I", d, 96)[0] + 6, "<B", 0x80),
    r"its chunk table offset 3602879\d+ is past the end of the file at \d+\)",
  ),
  "header-count": (
    6, None, lambda d: _patch(d, 247, "<Q", 200_000),
    r"its chunk table lists 3 chunks, its header's 200000 points need more\)",
  ),
  "extra-bytes": (  # Byte14's size: lazrs would build ~9 kB of models per byte, 600 MB for these
    7, None, lambda d: _patch(d, d.index(b"laszip encoded") - 2 + 54 + 34 + 2 * 6 + 2, "<H", 65_000),
    r"its LASzip VLR describes points of 65036 bytes, its header points of 41 bytes\)",
  ),
  "variable-points": (
    6, VARIABLE_CHUNKS, lambda d: _with_entries(d, lambda e: [e[0], (69_998, e[1][1]), *e[2:]]),
    r"chunk 1 at byte \d+ claims 69999 points; the chunk table's 69998 fit\)",
  ),
  "variable-layer-size": (
    8, VARIABLE_CHUNKS, lambda d: _patch(d, _chunk_start(d, 1) + 38 + 4 + 4 * 10, "<I", 2**32 - 1),  # NIR
    r"the layers of chunk 1 at byte \d+ claim 429\d+ bytes",
  ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LAYERED))
def test_laz_layered_hostile(tmp_path, case):
  point_format, chunks, patch, message = LAYERED[case]
  las_path, laz_path, _ = _las14_files(tmp_path, point_format)
  if chunks:
    _laz_variable_chunks(las_path, laz_path, chunks)
  np.testing.assert_array_equal(read_points(laz_path), read_points(las_path))  # before the patch
  path = tmp_path / f"{case}.laz"
  path.write_bytes(patch(bytearray(laz_path.read_bytes())))
  _raises_bounded(path, r": not a readable LAZ file \(" + message)


@pytest.mark.parametrize("point_format", [6, 7, 8])
@pytest.mark.parametrize("chunks", [None, VARIABLE_CHUNKS], ids=["fixed", "variable"])
def test_laz14_reads_as_las(tmp_path, point_format, chunks):
  las_path, laz_path, fields = _las14_files(tmp_path, point_format)
  if chunks:
    _laz_variable_chunks(las_path, laz_path, chunks)
  entries = _laz_entries(laz_path.read_bytes())
  if chunks:  # lazrs ends with an empty chunk after the last one written
    assert entries == [(n, entries[i][1]) for i, n in enumerate(chunks)] + [(0, 0)]
  else:
    assert [n for n, _ in entries] == [50_000] * 3
  for names in (None, fields):
    out = read_points(laz_path, fields=names)
    assert out.shape == (LAZ14_POINTS, len(names or "xyzi"))
    np.testing.assert_array_equal(out, read_points(las_path, fields=names))


class _Touch:
  """Unpickling it creates a file: the proof that a reader unpickled."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (str(self.path), "w"))


def test_npy_npz_refuse_pickles(tmp_path):
  marker = tmp_path / "unpickled"
  payload = pickle.dumps(_Touch(marker))
  (tmp_path / "o.npy").write_bytes(_npy_bytes((1, 3), "|O", payload))
  _raises_bounded(tmp_path / "o.npy", r" must be a 2-D real array \[P, F\], got object \(1, 3\)")
  (tmp_path / "o.npz").write_bytes(_zip_bytes({"points.npy": _npy_bytes((1, 3), "|O", payload)}))
  _raises_bounded(tmp_path / "o.npz", r"\['points'\] must be a 2-D real array \[P, F\], got object")
  assert not marker.exists()


@pytest.mark.parametrize(
  ("data", "message"),
  [
    (_npy_bytes((10, 2), data=bytes(80)), r": shape \(10, 2\) has 2 columns; points need x, y, z"),
    (_npy_bytes((2, 3, 4), data=bytes(96)), r" must be a 2-D real array \[P, F\], got float32 \(2, 3, 4\)"),
    (_npy_bytes((-1, 4), data=bytes(16)), r" must be a 2-D real array \[P, F\], got float32 \(-1, 4\)"),
    (_npy_bytes((2, 3), "<c8", bytes(48)), r" must be a 2-D real array \[P, F\], got complex64 \(2, 3\)"),
    (_npy_bytes((2, 3), "<U4", bytes(96)), r" must be a 2-D real array \[P, F\], got <U4 \(2, 3\)"),
    (_npy_bytes((2, 3), [("x", "<f4"), ("y", "<f4")], bytes(48)), r" must be a 2-D real array"),
    (_npy_bytes((10, 4), data=bytes(150)), r": its header says float32 \(10, 4\), 160 bytes, and 150"),
    (b"\x93NUMPY\x03\x00" + bytes(8), r": not a readable .npy file \(format version 3.0; numeric"),
    (b"\x93NUMPY\x01\x00\xff\x7f{'descr'", r": not a readable .npy file \("),
    (_npy_bytes((10, 4))[:40], r": not a readable .npy file \("),
  ],
  ids=["columns", "3-D", "negative", "complex", "strings", "records", "truncated", "version-3"]
  + ["header-length", "cut-header"],
)
def test_npy_header_checks(tmp_path, data, message):
  (tmp_path / "a.npy").write_bytes(data)
  _raises_bounded(tmp_path / "a.npy", message)


def test_npy_layouts(tmp_path):
  # Fortran order, big-endian float64, format 2.0: the reader reshapes and casts as numpy.load does.
  array = np.asfortranarray(np.arange(30, dtype=">f8").reshape(10, 3) / 7)
  with open(tmp_path / "f.npy", "wb") as f:
    np.lib.format.write_array(f, array, version=(2, 0))
  np.testing.assert_array_equal(read_points(tmp_path / "f.npy"), array.astype(np.float32))
  np.testing.assert_array_equal(
    read_points(tmp_path / "f.npy"), np.load(tmp_path / "f.npy").astype(np.float32)
  )


def test_npz_size_checks(tmp_path, monkeypatch):
  points = np.zeros((1000, 4), np.float32)
  np.savez_compressed(tmp_path / "z.npz", points=points)  # 16 kB of zeros deflate to ~50 bytes
  np.testing.assert_array_equal(read_points(tmp_path / "z.npz"), points)  # small: not ratio-checked
  monkeypatch.setattr(_io, "NPZ_UNCHECKED_BYTES", 0)
  _raises_bounded(
    tmp_path / "z.npz", r"\['points'\]: its zip entry expands \d+ compressed bytes to 16128, over 100x"
  )
  monkeypatch.undo()
  # Zip entries whose central directory record claims 4 GB, or more compressed bytes than the file has.
  data = _zip_bytes({"points.npy": _npy_bytes((1, 3), data=bytes(12))}, zipfile.ZIP_DEFLATED)
  record = data.index(b"PK\x01\x02")  # sizes at 20 (compressed) and 24 (uncompressed)
  (tmp_path / "bomb.npz").write_bytes(_patch(bytearray(data), record + 24, "<I", 2**32 - 2))
  _raises_bounded(
    tmp_path / "bomb.npz", r"\['points'\]: its zip entry expands \d+ compressed bytes to 4294967294"
  )
  (tmp_path / "big.npz").write_bytes(_patch(bytearray(data), record + 20, "<I", 2**32 - 2))
  _raises_bounded(tmp_path / "big.npz", r"\['points'\]: its zip entry claims 4294967294 compressed bytes")
  (tmp_path / "text.npz").write_bytes(_zip_bytes({"points.txt": b"1 2 3"}))
  _raises_bounded(tmp_path / "text.npz", r"\['points.txt'\]: the member 'points.txt' is not an .npy array")


def _mesh_ply(encoding, vertex, faces):
  """A PLY mesh: faces, then the vertices (with a list property "normals"), then the faces again as
  edges. By hand, as plyfile 1.1.5 writes a big-endian element with lists in little-endian."""
  lines = [f"element face {len(faces)}", "property list uchar int vertex_indices", "property ushort group"]
  lines += [f"element vertex {len(vertex)}", "property float x", "property double y", "property short z"]
  lines += ["property list uint float normals", "property uchar label"]
  lines += [f"element edge {len(faces)}", "property list short int vertex_indices", "property ushort group"]
  order = "<" if encoding == "binary_little_endian" else ">"

  def row(values, codes):  # a struct code per value; (length, item) codes for a list
    if encoding == "ascii":
      return (
        " ".join(" ".join(map(str, [len(v), *v] if isinstance(v, list) else [v])) for v in values) + "\n"
      ).encode()
    return b"".join(
      struct.pack(f"{order}{c[0]}{len(v)}{c[1]}", len(v), *v)
      if isinstance(v, list)
      else struct.pack(order + c, v)
      for v, c in zip(values, codes)
    )

  body = [row(f, [("B", "i"), "H"]) for f in faces] + [
    row(v, ["f", "d", "h", ("I", "f"), "B"]) for v in vertex
  ]
  body += [row(f, [("h", "i"), "H"]) for f in faces]
  return ("\n".join(["ply", f"format {encoding} 1.0", *lines, "end_header"]) + "\n").encode() + b"".join(body)


@pytest.mark.filterwarnings("ignore:loadtxt. input contained no data")  # plyfile reading an empty list
@pytest.mark.parametrize("encoding", ["binary_little_endian", "binary_big_endian", "ascii"])
def test_ply_mesh(tmp_path, encoding):
  # Elements with lists before and after the vertex element: the binary reader steps over the first and
  # leaves the second unread; the list property of the vertex element is left out.
  pytest.importorskip("plyfile")
  rng = np.random.default_rng(6)
  vertex = [
    (
      float(np.float32(rng.uniform(-9, 9))),
      rng.uniform(-9, 9),
      int(rng.integers(-300, 300)),
      [0.5] * (i % 3),
      i,
    )
    for i in range(7)
  ]
  faces = [([0, 1, 2], 1), ([3, 4, 5, 6], 2), (list(range(250)), 3)]
  (tmp_path / "m.ply").write_bytes(_mesh_ply(encoding, vertex, faces))
  expected = np.array([(x, y, z, label) for x, y, z, _, label in vertex], np.float32)
  np.testing.assert_array_equal(read_points(tmp_path / "m.ply"), expected)


@pytest.mark.parametrize(
  ("data", "message"),
  [
    (b"ply\nelement vertex 1\nend_header\n", r"no format line|unexpected header line 'element vertex 1'"),
    (_ply_bytes("binary_little_endian", [("vertex", 1, ["float128 x"])], b""), r"the property line"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 1e3\nend_header\n", r"the element line"),
    (b"ply\nformat binary_little_endian 2.0\nend_header\n", r"the format line 'format binary_little_endian"),
    (b"ply\nformat ascii 1.0\n" + b"comment " * 200_000, r"no end_header line in its first 1048576 bytes"),
    (b"ply\nformat ascii 1.0\ncomment \xff\nend_header\n", r"its header holds bytes that are not ASCII"),
    (
      _ply_bytes(
        "binary_little_endian", [("face", 1, ["list uchar int i"]), ("vertex", 1, XYZ)], b"\x05" + bytes(12)
      ),
      r"element 'face' ends early",
    ),
    (
      _ply_bytes("binary_little_endian", [("vertex", 1, [*XYZ, "float x"])], bytes(16)),
      r"repeats a property",
    ),
  ],
  ids=[
    "no-format",
    "bad-type",
    "bad-count",
    "version",
    "endless-header",
    "not-ascii",
    "list-overrun",
    "repeat",
  ],
)
def test_ply_corrupt_header(tmp_path, data, message):
  pytest.importorskip("plyfile")
  (tmp_path / "bad.ply").write_bytes(data)
  _raises_bounded(tmp_path / "bad.ply", r": not a readable PLY file \(.*(" + message + ")")


def _lzf_reference(data, size):
  """A byte-at-a-time LZF decoder (liblzf's lzf_d.c, without its checks): the oracle of runs."""
  out, i = bytearray(), 0
  while i < len(data):
    ctrl = data[i]
    i += 1
    if ctrl < 32:
      out += data[i : i + ctrl + 1]
      i += ctrl + 1
      continue
    length = ctrl >> 5
    if length == 7:
      length, i = length + data[i], i + 1
    start, i = len(out) - ((ctrl & 31) << 8 | data[i]) - 1, i + 1
    for j in range(length + 2):
      out.append(out[start + j])
  return bytes(out[:size])


def test_lzf_runs():
  # Back references that overlap their own output (distance < length), of every distance up to 9, and
  # a 4 MB run of zeros (264 bytes per 3-byte token).
  stream = bytes([7]) + b"abcdefgh"
  for distance in range(1, 10):
    stream += bytes([7 << 5 | (distance - 1) >> 8, 255 - 7 - distance, (distance - 1) & 255])
  size = len(_lzf_reference(stream, 1 << 20))
  assert _io._lzf_decompress(stream, size) == _lzf_reference(stream, size)
  zeros = b"\x00\x00" + bytes([0xE0, 0xFF, 0x00]) * 16_000
  assert _io._lzf_decompress(zeros, 1 + 264 * 16_000) == bytes(1 + 264 * 16_000)


# The .bin plausibility warning: the file does not say its column count.


def test_bin_warns_when_num_features_looks_wrong(scans):
  sweep, kitti = scans / "nuscenes_lidar_top.bin", scans / "kitti_000008.bin"
  with pytest.warns(
    UserWarning,
    match=re.escape(str(sweep)) + r": read with num_features=4, its values line up at a stride of 5",
  ):
    assert read_points(sweep, 4).shape == (43360, 4)  # the issue: 34,688 points of 5 read as 43,360 of 4
  with pytest.warns(
    UserWarning,
    match=r"kitti_000008.bin: read with num_features=3, .* holds 4 columns; pass num_features=4 ",
  ):
    read_points(kitti, 3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    read_points(sweep, 5)
    read_points(kitti, 4)
    read_points(kitti, 8)  # pairs of points: a multiple of the column count cannot be told from it


def test_bin_warns_on_absurd_values(tmp_path):
  points = _points(num_points=200)
  points.astype(np.float64).tofile(tmp_path / "doubles.bin")  # float64 read as float32
  with pytest.warns(
    UserWarning, match=r"doubles.bin: \d+% of the points read with num_features=4 have a non-finite"
  ):
    read_points(tmp_path / "doubles.bin", 4)
  points.tofile(tmp_path / "floats.bin")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # one NaN point of 200 and random values: no warning
    np.testing.assert_array_equal(read_points(tmp_path / "floats.bin", 4), points)


# The fuzz test: valid files of every format, mutated (bytes replaced, inserted or cut, the file
# truncated, a count or offset of a header replaced by a huge number). read_points returns float32
# [P, 4] or raises a ValueError naming the file, allocating under MAX_PEAK bytes; anything else fails.


def _fuzz_points():
  points = np.round(np.random.default_rng(8).normal(0, 10, (12, 4)), 2).astype(np.float32)
  points[:, 3] = np.arange(12)
  return points


def _seed_written(suffix, binary=True):
  def build(folder):
    write_points(folder / f"seed{suffix}", _fuzz_points(), binary=binary)
    return (folder / f"seed{suffix}").read_bytes()

  return build


def _seed_npz_deflate(folder):
  np.savez_compressed(folder / "seed.npz", points=_fuzz_points(), labels=np.arange(12))
  return (folder / "seed.npz").read_bytes()


def _seed_pcd_compressed(folder):
  points = _fuzz_points()
  raw = b"".join(np.ascontiguousarray(points[:, i]).tobytes() for i in range(4))
  body = _lzf_compress(raw)
  header = _pcd_header(["x", "y", "z", "i"], [4] * 4, ["F"] * 4, [1] * 4, 12, "binary_compressed")
  (folder / "seed.pcd").write_bytes(header + np.array([len(body), len(raw)], "<u4").tobytes() + body)
  return (folder / "seed.pcd").read_bytes()


def _seed_mesh(text):
  def build(folder):
    plyfile = pytest.importorskip("plyfile")
    points = _fuzz_points()
    vertex = np.zeros(12, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<u2")])
    for i, name in enumerate(vertex.dtype.names):
      vertex[name] = points[:, i]
    faces = np.zeros(2, [("vertex_indices", "O")])
    faces["vertex_indices"] = [np.array([0, 1, 2], "i4"), np.array([2, 3, 4, 5], "i4")]
    elements = [
      plyfile.PlyElement.describe(faces, "face", len_types={"vertex_indices": "u1"}),
      plyfile.PlyElement.describe(vertex, "vertex"),
      plyfile.PlyElement.describe(faces, "edge", len_types={"vertex_indices": "u4"}),
    ]
    plyfile.PlyData(elements, text=text, byte_order="<").write(str(folder / "seed.ply"))
    return (folder / "seed.ply").read_bytes()

  return build


def _seed_las(version, suffix, point_format=3):
  def build(folder):
    laspy = pytest.importorskip("laspy")
    if suffix == ".laz":
      pytest.importorskip("lazrs")
    points = _fuzz_points()
    header = laspy.LasHeader(point_format=point_format, version=version)
    if point_format == 7:  # RGB and 5 extra bytes: LASzip's RGB14 and Byte14 items (a layer per byte)
      header.add_extra_dims([laspy.ExtraBytesParams("label", "u1"), laspy.ExtraBytesParams("range", "f4")])
    header.scales = np.array([0.01, 0.01, 0.01])
    las = laspy.LasData(header)
    las.x, las.y, las.z = points[:, 0], points[:, 1], points[:, 2]
    las.intensity = points[:, 3].astype(np.uint16)
    if point_format == 7:
      las.red, las.label, las.range = np.arange(12) * 5000, np.arange(12), points[:, 0]
    las.write(str(folder / f"seed{suffix}"))
    return (folder / f"seed{suffix}").read_bytes()

  return build


# The .laz of LAS 1.4 point formats (6, 7) have layered chunks: lazrs allocates each layer's size as the
# chunk claims, which _io._check_laz bounds first.
FUZZ_SEEDS = {
  "scan.bin": _seed_written(".bin"),
  "scan.npy": _seed_written(".npy"),
  "scan.npz": _seed_written(".npz"),
  "deflate.npz": _seed_npz_deflate,
  "binary.pcd": _seed_written(".pcd"),
  "ascii.pcd": _seed_written(".pcd", binary=False),
  "compressed.pcd": _seed_pcd_compressed,
  "binary.ply": _seed_written(".ply"),
  "ascii.ply": _seed_written(".ply", binary=False),
  "mesh.ply": _seed_mesh(text=False),
  "mesh-ascii.ply": _seed_mesh(text=True),
  "v12.las": _seed_las("1.2", ".las"),
  "v14.las": _seed_las("1.4", ".las"),
  "v12.laz": _seed_las("1.2", ".laz"),
  "v14-format6.laz": _seed_las("1.4", ".laz", point_format=6),
  "v14-format7.laz": _seed_las("1.4", ".laz", point_format=7),
}
HUGE_NUMBERS = [b"1000000000000", b"4294967295", b"4294967296", b"-1", b"0", b"9" * 30]


@st.composite
def _mutations(draw, seed):
  data = bytearray(seed)
  header = min(len(data), 400)  # where the headers (and their counts) are
  kind = draw(
    st.sampled_from(["truncate", "replace", "replace-header", "number", "integer", "insert", "cut"])
  )
  numbers = list(re.finditer(rb"\d+", seed[:600]))
  if kind == "truncate":
    return seed[: draw(st.integers(0, len(seed) - 1))]
  if kind in ("replace", "replace-header") or (kind == "number" and not numbers):
    end = header if kind == "replace-header" else len(data)
    for at, value in draw(
      st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)), min_size=1, max_size=4)
    ):
      data[at] = value
    return bytes(data)
  if kind == "number":  # a count, size or shape in a text header
    number = draw(st.sampled_from(numbers))
    return seed[: number.start()] + draw(st.sampled_from(HUGE_NUMBERS)) + seed[number.end() :]
  if kind == "integer":  # a count, size or offset in a binary header
    width = draw(st.sampled_from([2, 4, 8]))
    at = draw(st.integers(0, header - width))
    value = draw(st.sampled_from([2 ** (8 * width) - 1, 2 ** (8 * width - 1), HUGE % 2 ** (8 * width)]))
    data[at : at + width] = value.to_bytes(width, "little")
    return bytes(data)
  at = draw(st.integers(0, len(seed)))
  if kind == "insert":
    return seed[:at] + draw(st.binary(min_size=1, max_size=8)) + seed[at:]
  return seed[:at] + seed[at + draw(st.integers(1, 8)) :]


@pytest.mark.filterwarnings("ignore::UserWarning")  # mutated .bin values may well look misread
@pytest.mark.parametrize("name", list(FUZZ_SEEDS))
def test_fuzz_read_points(tmp_path, name):
  seed = FUZZ_SEEDS[name](tmp_path)
  np.testing.assert_allclose(
    read_points(tmp_path / f"seed{pathlib.Path(name).suffix}", 4), _fuzz_points(), atol=0.01
  )
  path = tmp_path / f"fuzzed{pathlib.Path(name).suffix}"

  @settings(max_examples=4 * settings().max_examples)
  @given(data=st.data())
  def check(data):
    path.write_bytes(data.draw(_mutations(seed)))
    tracemalloc.start()
    try:
      try:
        points = read_points(path, 4)
      except ValueError as error:
        assert str(path) in str(error), error
      else:
        assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 4, points.shape
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert peak < MAX_PEAK, f"{peak} bytes allocated"

  check()
