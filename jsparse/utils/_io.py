"""Point-cloud files: ``read_points`` and ``write_points`` for .bin, .npy, .npz, .ply, .pcd, .las, .laz.

Every reader returns float32 ``[P, F]`` (the dtype the voxelizer and the layers take). Only numpy is
imported here: plyfile (.ply) and laspy (.las, .laz) are imported when such a file is read.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from collections.abc import Sequence

import numpy as np

READ_SUFFIXES = (".bin", ".npy", ".npz", ".ply", ".pcd", ".las", ".laz")
WRITE_SUFFIXES = (".bin", ".npy", ".npz", ".ply", ".pcd")
NAMED_SUFFIXES = (".ply", ".pcd", ".las", ".laz")  # formats whose columns have names (``fields``)

# Column counts of the raw .bin scans that peers use. The file size cannot tell them apart (a nuScenes
# sweep whose point count is a multiple of 4, like the demo sweep, also reads as rows of 4), hence no
# default for ``num_features``.
BIN_LAYOUTS = "4 for KITTI (x, y, z, intensity), 5 for nuScenes sweeps (x, y, z, intensity, ring)"

PCD_TYPES = {("F", 2), ("F", 4), ("F", 8), ("I", 1), ("I", 2), ("I", 4), ("I", 8)}
PCD_TYPES |= {("U", 1), ("U", 2), ("U", 4), ("U", 8)}
PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
PCD_ENCODINGS = ("ascii", "binary", "binary_compressed")


def read_points(
  path: str | os.PathLike,
  num_features: int | None = None,
  *,
  key: str | None = None,
  fields: Sequence[str] | None = None,
) -> np.ndarray:
  """Reads a point cloud file into a float32 ``[P, F]`` array, by its suffix.

  - ``.bin``: raw little-endian float32 (KITTI, nuScenes), ``num_features`` columns.
  - ``.npy``, ``.npz``: a 2-D numeric array; in an ``.npz``, ``key``, else ``"points"``, else the only
    array.
  - ``.ply`` (needs ``plyfile``): the ``vertex`` element's scalar properties, x, y, z first, then the
    others in file order.
  - ``.pcd`` (PCL; DATA ascii, binary or binary_compressed): the FIELDS in file order, a field with
    COUNT c giving c columns; padding fields named ``_`` are left out. Organized clouds
    (HEIGHT > 1) are flattened row by row; NaN points are kept (the voxelizer drops them) and
    VIEWPOINT is not applied. A packed ``rgb`` float keeps its bits: ``points[:, i].view(np.uint32)``.
  - ``.las``, ``.laz`` (need ``laspy``; .laz also ``lazrs``): scaled x, y, z and intensity. Georeferenced
    coordinates (say 5e6 m) keep only about 0.5 m in float32: subtract an offset before
    voxelizing, or read with laspy directly.

  Args:
    path: the file.
    num_features: for ``.bin``, the number of float32 columns (required: the file does not say);
      for the other formats, the expected number of columns, checked when given.
    key: the array to read from an ``.npz``.
    fields: the named columns to return, in this order, from ``.ply``, ``.pcd``, ``.las``, ``.laz``
      (e.g. ``["x", "y", "z", "intensity"]``).

  Returns:
    float32 ``[P, F]``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: an unknown suffix, a file that is truncated or not of its format, a size or column
      count that does not match ``num_features``, a missing ``key`` or field.
    ImportError: plyfile or laspy is needed and not installed.

  >>> import pathlib, tempfile
  >>> points = np.arange(12, dtype=np.float32).reshape(3, 4)
  >>> with tempfile.TemporaryDirectory() as tmp:
  ...   write_points(pathlib.Path(tmp) / "scan.pcd", points, fields=["x", "y", "z", "intensity"])
  ...   read_points(pathlib.Path(tmp) / "scan.pcd", fields=["z", "intensity"])
  array([[ 2.,  3.],
         [ 6.,  7.],
         [10., 11.]], dtype=float32)
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix not in READ_SUFFIXES:
    raise ValueError(
      f"{path}: unknown point-cloud suffix {suffix!r}; read_points reads {', '.join(READ_SUFFIXES)}"
    )
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (relative paths start at {pathlib.Path.cwd()})")
  if key is not None and suffix != ".npz":
    raise ValueError(f"{path}: key={key!r} applies to .npz files only")
  if fields is not None and suffix not in NAMED_SUFFIXES:
    raise ValueError(
      f"{path}: {suffix} columns have no names, so fields={list(fields)} cannot select them; "
      f"index the result instead (fields works for {', '.join(NAMED_SUFFIXES)})"
    )
  if suffix == ".bin":
    return _read_bin(path, num_features)
  if suffix in (".npy", ".npz"):
    points = _read_numpy(path, key)
  elif suffix == ".ply":
    points = _read_ply(path, fields)
  elif suffix == ".pcd":
    points = _read_pcd(path, fields)
  else:
    points = _read_las(path, fields)
  if num_features is not None and points.shape[1] != num_features:
    raise ValueError(f"{path}: has {points.shape[1]} columns, num_features={num_features} was expected")
  return points


def write_points(
  path: str | os.PathLike,
  points: np.ndarray,
  *,
  fields: Sequence[str] | None = None,
  binary: bool = True,
) -> None:
  """Writes ``points [P, F]`` as float32 to a .bin, .npy, .npz (key ``"points"``), .ply or .pcd file.

  Args:
    path: the file to create (overwritten when it exists).
    points: ``[P, F]``, any real dtype; written as float32.
    fields: the column names for ``.ply`` and ``.pcd`` (default ``x, y, z, f3, f4, ...``).
    binary: ``.ply`` and ``.pcd`` only: binary little-endian (default) or ascii.

  Raises:
    ValueError: an unsupported suffix, ``points`` not 2-D real, ``fields`` of the wrong length or not
      usable as names, ``fields`` or ``binary=False`` for a format without them.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix not in WRITE_SUFFIXES:
    raise ValueError(f"{path}: write_points writes {', '.join(WRITE_SUFFIXES)}, not {suffix!r}")
  points = _as_points(np.asarray(points), f"{path}: points")
  if suffix not in (".ply", ".pcd"):
    if fields is not None or not binary:
      raise ValueError(f"{path}: fields and binary=False apply to .ply and .pcd only")
    # Through a file object: np.save and np.savez would append ".npy" / ".npz" to a ".NPY" name.
    with open(path, "wb") as f:
      if suffix == ".bin":
        f.write(points.astype("<f4").tobytes())
      elif suffix == ".npy":
        np.save(f, points)
      else:
        np.savez(f, points=points)
    return
  fields = _field_names(path, points.shape[1], fields)
  if suffix == ".ply":
    _write_ply(path, points, fields, binary)
  else:
    _write_pcd(path, points, fields, binary)


def _as_points(array: np.ndarray, what: str) -> np.ndarray:
  """float32 ``[P, F]`` from a 2-D real array, or a ValueError naming ``what``."""
  if array.ndim != 2 or array.dtype.kind not in "biuf":
    raise ValueError(f"{what} must be a 2-D real array [P, F], got {array.dtype} {array.shape}")
  return np.ascontiguousarray(array, dtype=np.float32)


def _field_names(path: pathlib.Path, num_columns: int, fields: Sequence[str] | None) -> list[str]:
  if fields is None:
    return ["x", "y", "z", *(f"f{i}" for i in range(3, num_columns))][:num_columns]
  fields = list(fields)
  if len(fields) != num_columns:
    raise ValueError(f"{path}: {len(fields)} fields {fields} for {num_columns} columns")
  # PLY and PCD headers are split on whitespace.
  if any(
    not isinstance(f, str) or not f or not f.isprintable() or any(c.isspace() for c in f) for f in fields
  ):
    raise ValueError(f"{path}: fields must be non-empty names without spaces, got {fields}")
  if len(set(fields)) != len(fields):
    raise ValueError(f"{path}: fields {fields} has duplicates")
  return fields


def _select(path: pathlib.Path, columns: dict[str, np.ndarray], fields: Sequence[str] | None) -> np.ndarray:
  """Stacks named columns (each ``[P]`` or ``[P, c]``) into float32 ``[P, F]``, all or ``fields``."""
  names = list(columns) if fields is None else list(fields)
  missing = [name for name in names if name not in columns]
  if missing:
    raise ValueError(f"{path}: no field {', '.join(map(repr, missing))}; it has {', '.join(columns)}")
  if not names:
    raise ValueError(f"{path}: no columns selected (fields={fields!r})")
  parts = [np.asarray(columns[name]) for name in names]
  parts = [part if part.ndim == 2 else part[:, None] for part in parts]
  return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _read_bin(path: pathlib.Path, num_features: int | None) -> np.ndarray:
  if num_features is None:
    raise ValueError(
      f"{path}: a raw .bin file does not record its column count: pass num_features ({BIN_LAYOUTS})"
    )
  if not isinstance(num_features, int | np.integer) or num_features < 1:
    raise ValueError(f"{path}: num_features must be a positive int, got {num_features!r}")
  size = path.stat().st_size
  if size % (4 * num_features):
    fits = [f for f in range(3, 9) if size % (4 * f) == 0]
    raise ValueError(
      f"{path}: {size} bytes is not a whole number of points of num_features={num_features} float32 "
      f"columns ({4 * num_features} bytes each); counts that fit: {fits or 'none (truncated file?)'}. "
      f"KITTI scans have num_features=4, nuScenes sweeps num_features=5"
    )
  return np.fromfile(path, "<f4").astype(np.float32, copy=False).reshape(-1, num_features)


def _read_numpy(path: pathlib.Path, key: str | None) -> np.ndarray:
  try:
    loaded = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # a truncated or non-numpy file
    raise ValueError(f"{path}: not a readable {path.suffix} file ({e})") from e
  if isinstance(loaded, np.ndarray):
    return _as_points(loaded, str(path))
  with loaded:
    keys = list(loaded.keys())
    if key is None:
      if "points" in keys or len(keys) != 1:
        key = "points"
      else:
        (key,) = keys
    if key not in keys:
      raise ValueError(f"{path}: no array {key!r}; pass key= one of {keys}")
    try:
      array = loaded[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # a damaged member, or pickled
      raise ValueError(f"{path}: array {key!r} is unreadable ({e})") from e
  return _as_points(array, f"{path}[{key!r}]")


def _read_ply(path: pathlib.Path, fields: Sequence[str] | None) -> np.ndarray:
  try:
    import plyfile
  except ImportError as e:
    raise ImportError(f"reading {path} needs plyfile: pip install plyfile (or 'jsparse[io]')") from e
  try:
    ply = plyfile.PlyData.read(str(path), mmap=False)
  except (plyfile.PlyParseError, ValueError, EOFError) as e:
    raise ValueError(f"{path}: not a readable PLY file ({e})") from e
  if "vertex" not in ply:
    raise ValueError(f"{path}: no 'vertex' element; it has {[el.name for el in ply.elements]}")
  vertex = ply["vertex"]
  # List properties (e.g. a face's vertex_indices) have no single column.
  names = [p.name for p in vertex.properties if not isinstance(p, plyfile.PlyListProperty)]
  names = [n for n in ("x", "y", "z") if n in names] + [n for n in names if n not in ("x", "y", "z")]
  return _select(path, {name: vertex[name] for name in names}, fields)


def _write_ply(path: pathlib.Path, points: np.ndarray, fields: list[str], binary: bool) -> None:
  try:
    import plyfile
  except ImportError as e:
    raise ImportError(f"writing {path} needs plyfile: pip install plyfile (or 'jsparse[io]')") from e
  vertex = np.empty(len(points), dtype=[(name, "<f4") for name in fields])
  for i, name in enumerate(fields):
    vertex[name] = points[:, i]
  element = plyfile.PlyElement.describe(vertex, "vertex")
  plyfile.PlyData([element], text=not binary, byte_order="<").write(str(path))


def _read_las(path: pathlib.Path, fields: Sequence[str] | None) -> np.ndarray:
  try:
    import laspy
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs laspy: pip install 'laspy[lazrs]' (or 'jsparse[io]'); .laz also needs lazrs"
    ) from e
  try:
    las = laspy.read(path)
  except (laspy.errors.LaspyException, ValueError, EOFError) as e:
    hint = "; .laz needs a decompressor: pip install lazrs" if path.suffix.lower() == ".laz" else ""
    raise ValueError(f"{path}: not a readable LAS file ({e}){hint}") from e
  # Lower-case names are the scaled coordinates (x) where upper-case ones are the stored integers (X).
  names = ["x", "y", "z", "intensity"] if fields is None else list(fields)
  available = ["x", "y", "z", *las.point_format.dimension_names]
  missing = [name for name in names if name not in available]
  if missing:
    raise ValueError(f"{path}: no field {', '.join(map(repr, missing))}; it has {', '.join(available)}")
  return _select(path, {name: np.asarray(las[name]) for name in names}, names)


def _parse_pcd_header(path: pathlib.Path, data: bytes) -> tuple[dict[str, list[str]], int]:
  """The header's ``{KEY: values}`` and the offset where the points start."""
  header: dict[str, list[str]] = {}
  start = 0
  while "DATA" not in header:
    end = data.find(b"\n", start)
    end = len(data) if end < 0 else end
    if start >= len(data):
      raise ValueError(f"{path}: the PCD header ends without a DATA line (truncated, or not a PCD file)")
    try:
      line = data[start:end].decode("ascii").strip()
    except UnicodeDecodeError:
      raise ValueError(f"{path}: not a PCD file (binary bytes before the DATA line)") from None
    start = end + 1
    if not line or line.startswith("#"):
      continue
    name, *values = line.split()
    if name not in PCD_KEYS:
      raise ValueError(f"{path}: not a PCD header line: {line[:80]!r} (keys are {', '.join(PCD_KEYS)})")
    header[name] = values
  return header, min(start, len(data))


def _pcd_ints(path: pathlib.Path, header: dict[str, list[str]], key: str) -> list[int]:
  try:
    values = [int(v) for v in header[key]]
  except KeyError:
    raise ValueError(f"{path}: the PCD header has no {key} line") from None
  except ValueError:
    raise ValueError(f"{path}: PCD {key} must be integers, got {' '.join(header[key])}") from None
  if any(v < 0 for v in values):
    raise ValueError(f"{path}: PCD {key} must not be negative, got {' '.join(header[key])}")
  return values


def _read_pcd(path: pathlib.Path, fields: Sequence[str] | None) -> np.ndarray:
  data = path.read_bytes()
  header, offset = _parse_pcd_header(path, data)
  names = header.get("FIELDS", [])
  sizes = _pcd_ints(path, header, "SIZE")
  types = header.get("TYPE", [])
  counts = _pcd_ints(path, header, "COUNT") if "COUNT" in header else [1] * len(names)
  if not names or not (len(names) == len(sizes) == len(types) == len(counts)):
    raise ValueError(
      f"{path}: PCD FIELDS, SIZE, TYPE and COUNT need one entry per field, got "
      f"{len(names)}, {len(sizes)}, {len(types)}, {len(counts)}"
    )
  repeated = sorted({name for name in names if name != "_" and names.count(name) > 1})
  if repeated:
    raise ValueError(f"{path}: PCD FIELDS repeats {', '.join(repeated)} (only padding '_' may repeat)")
  for name, t, size in zip(names, types, sizes):
    if (t, size) not in PCD_TYPES:
      raise ValueError(
        f"{path}: PCD field {name!r} has TYPE {t} SIZE {size}; F takes 2, 4, 8, I and U 1, 2, 4, 8"
      )
  width = _pcd_ints(path, header, "WIDTH")[0] if header.get("WIDTH") else None
  height = _pcd_ints(path, header, "HEIGHT")[0] if header.get("HEIGHT") else 1
  if header.get("POINTS"):
    num_points = _pcd_ints(path, header, "POINTS")[0]
  elif width is not None:
    num_points = width * height
  else:
    raise ValueError(f"{path}: the PCD header has neither POINTS nor WIDTH")
  if width is not None and num_points != width * height:
    raise ValueError(f"{path}: PCD POINTS {num_points} is not WIDTH {width} x HEIGHT {height}")
  encoding = header["DATA"][0].lower() if header["DATA"] else ""
  if encoding not in PCD_ENCODINGS:
    raise ValueError(f"{path}: PCD DATA {encoding!r} is not one of {', '.join(PCD_ENCODINGS)}")

  # Padding fields may repeat the name "_", so the record dtype uses positional names.
  dtypes = [np.dtype(f"<{t.lower()}{size}") for t, size in zip(types, sizes)]
  if encoding == "ascii":
    values = _pcd_ascii(path, data[offset:], num_points * sum(counts))
    parts = np.split(values.reshape(num_points, sum(counts)), np.cumsum(counts)[:-1], axis=1)
  elif encoding == "binary":
    record = np.dtype([(f"c{i}", dt, (c,)) for i, (dt, c) in enumerate(zip(dtypes, counts))])
    if len(data) - offset < num_points * record.itemsize:
      raise ValueError(
        f"{path}: PCD binary data is {len(data) - offset} bytes, {num_points} points x "
        f"{record.itemsize} bytes = {num_points * record.itemsize} expected (truncated file?)"
      )
    rows = np.frombuffer(data, record, num_points, offset)
    parts = [rows[f"c{i}"] for i in range(len(names))]
  else:
    raw = _pcd_decompress(path, data[offset:]) if num_points else b""
    # Compressed PCD stores each field for all points, then the next field (structure of arrays),
    # and PCL leaves the padding fields "_" out of it.
    stored = [(dt, c) for name, dt, c in zip(names, dtypes, counts) if name != "_"]
    expected = num_points * sum(dt.itemsize * c for dt, c in stored)
    if len(raw) != expected:
      raise ValueError(
        f"{path}: PCD binary_compressed data holds {len(raw)} bytes, {num_points} points need {expected}"
      )
    parts, start = [], 0
    for dt, c in stored:
      parts.append(np.frombuffer(raw, dt, num_points * c, start).reshape(num_points, c))
      start += num_points * c * dt.itemsize
    names = [name for name in names if name != "_"]
  columns = {name: part for name, part in zip(names, parts) if name != "_"}
  return _select(path, columns, fields)


def _pcd_ascii(path: pathlib.Path, text: bytes, expected: int) -> np.ndarray:
  """The whitespace-separated numbers of an ascii PCD body, float64 ``[expected]``."""
  try:
    values = np.array(text.split(), dtype=np.float64)
  except ValueError as e:
    raise ValueError(f"{path}: PCD ascii data holds a value that is not a number ({e})") from e
  if len(values) != expected:
    raise ValueError(
      f"{path}: PCD ascii data holds {len(values)} values, POINTS x columns = {expected} expected "
      "(truncated file, or FIELDS/COUNT do not match the data)"
    )
  return values


def _pcd_decompress(path: pathlib.Path, body: bytes) -> bytes:
  """The bytes of a binary_compressed PCD body: uint32 compressed and raw sizes, then LZF."""
  if len(body) < 8:
    raise ValueError(f"{path}: PCD binary_compressed data ends before its 8-byte size header")
  compressed, size = (int(v) for v in np.frombuffer(body, "<u4", 2))
  if len(body) - 8 < compressed:
    raise ValueError(
      f"{path}: PCD binary_compressed data is {len(body) - 8} bytes, "
      f"its header says {compressed} (truncated?)"
    )
  try:
    return _lzf_decompress(body[8 : 8 + compressed], size)
  except ValueError as e:
    raise ValueError(f"{path}: PCD binary_compressed data is corrupt ({e})") from e


def _lzf_decompress(data: bytes, size: int) -> bytes:
  """Decodes an LZF stream (liblzf's format, as PCL writes it) of ``size`` bytes.

  Each token starts with a byte ``ctrl``: below 32, ``ctrl + 1`` literal bytes follow; otherwise it
  copies ``(ctrl >> 5) + 2`` bytes (a 7 extends the length by the next byte) from
  ``((ctrl & 31) << 8 | next byte) + 1`` bytes back in the output.

  >>> _lzf_decompress(bytes([2]) + b"abc" + bytes([0x40, 2]), 7)  # "abc", then 4 bytes from 3 back
  b'abcabca'
  """
  out = bytearray()
  i, n = 0, len(data)
  while i < n:
    at, ctrl = i, data[i]
    i += 1
    if ctrl < 32:
      if i + ctrl + 1 > n:
        raise ValueError(f"the literal run of {ctrl + 1} bytes at byte {at} passes the end of the input")
      out += data[i : i + ctrl + 1]
      i += ctrl + 1
      continue
    length = ctrl >> 5
    if length == 7:
      length += data[i] if i < n else 0
      i += 1
    if i >= n:
      raise ValueError("the input ends inside a back reference")
    start = len(out) - ((ctrl & 31) << 8 | data[i]) - 1
    i += 1
    length += 2
    if start < 0:
      raise ValueError(f"the back reference at byte {at} points before the start of the output")
    if start + length <= len(out):
      out += out[start : start + length]
    else:  # overlapping: the copy repeats its own output (runs)
      for j in range(length):
        out.append(out[start + j])
    if len(out) > size:
      break
  if len(out) != size:
    raise ValueError(f"it decodes to {len(out)} bytes, its header says {size}")
  return bytes(out)


def _write_pcd(path: pathlib.Path, points: np.ndarray, fields: list[str], binary: bool) -> None:
  num_points, num_fields = points.shape
  header = "\n".join(
    [
      "# .PCD v0.7 - Point Cloud Data file format",
      "VERSION 0.7",
      "FIELDS " + " ".join(fields),
      "SIZE" + " 4" * num_fields,
      "TYPE" + " F" * num_fields,
      "COUNT" + " 1" * num_fields,
      f"WIDTH {num_points}",
      "HEIGHT 1",
      "VIEWPOINT 0 0 0 1 0 0 0",
      f"POINTS {num_points}",
      f"DATA {'binary' if binary else 'ascii'}",
      "",
    ]
  )
  with open(path, "wb") as f:
    f.write(header.encode("ascii"))
    if binary:
      f.write(points.astype("<f4").tobytes())
    else:
      np.savetxt(f, points, fmt="%.9g")  # 9 significant digits read back the same float32
