"""Point-cloud files: ``read_points`` and ``write_points`` for .bin, .npy, .npz, .ply, .pcd, .las, .laz.

Every reader returns float32 ``[P, F]`` (the dtype the voxelizer and the layers take). Only numpy is
imported here: plyfile (.ply) and laspy (.las, .laz) are imported when such a file is read.

Files are untrusted input: each reader checks what a header claims (a point count, an array shape, a
decompressed size) against the size of the file before it allocates for it, and a truncated, corrupt or
hostile file raises a ValueError that names it, never another error, a hang or a huge allocation.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import struct
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np

READ_SUFFIXES = (".bin", ".npy", ".npz", ".ply", ".pcd", ".las", ".laz")
WRITE_SUFFIXES = (".bin", ".npy", ".npz", ".ply", ".pcd")
NAMED_SUFFIXES = (".ply", ".pcd", ".las", ".laz")  # formats whose columns have names (``fields``)

# Column counts of the raw .bin scans that peers use. The file size cannot tell them apart (a nuScenes
# sweep whose point count is a multiple of 4, like the demo sweep, also reads as rows of 4), hence no
# default for ``num_features``.
BIN_LAYOUTS = "4 for KITTI (x, y, z, intensity), 5 for nuScenes sweeps (x, y, z, intensity, ring)"
# A .bin read with a plausible num_features has few coordinates beyond this (metres) or non-finite ones.
ABSURD_COORDINATE = 1e4

PCD_TYPES = {("F", 2), ("F", 4), ("F", 8), ("I", 1), ("I", 2), ("I", 4), ("I", 8)}
PCD_TYPES |= {("U", 1), ("U", 2), ("U", 4), ("U", 8)}
PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
PCD_ENCODINGS = ("ascii", "binary", "binary_compressed")

# PLY property types (plyfile also takes numpy's codes) as numpy codes.
PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2"}
PLY_TYPES |= {"ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4"}
PLY_TYPES |= {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "b1": "u1"}
PLY_TYPES |= {code: code for code in ("i1", "u1", "i2", "u2", "i4", "u4", "f4", "f8")}
PLY_FORMATS = {"ascii": "=", "binary_little_endian": "<", "binary_big_endian": ">"}
PLY_STRUCT = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "f4": "f", "f8": "d"}
PLY_MAX_HEADER = 1 << 20  # bytes

# Bounds on what a compressed file may claim to expand to. np.savez_compressed (deflate) stores float
# points 1-3x smaller and deflate cannot exceed ~1,032x; LAZ stores identical points ~2,800x smaller.
NPZ_MAX_RATIO = 100
NPZ_UNCHECKED_BYTES = 1 << 26  # .npz members up to 64 MiB decompressed skip the ratio check
LAZ_MAX_RATIO = 10_000
LAS_CHUNK_POINTS = 1 << 20  # .las / .laz points decoded at a time
LAS_VLR_HEADER = 54  # bytes
LASZIP_VLR = (b"laszip encoded", 22204)  # the user id and record id of the VLR that describes a .laz's items
# LASzip items by type code: the bytes of the item in a point record, and for the layered ones (item
# version 3, LAS 1.4 point formats 6-10) the number of layers of a chunk. Byte (0) and Byte14 (14), the
# extra bytes, take their size from the VLR and have a layer per byte. From the laz crate 0.12 that lazrs
# 0.8 builds on (src/laszip/vlr.rs, and read_layers_sizes in src/las/{point6,rgb,nir,extra_bytes,
# wavepacket}.rs): Point10 6, GpsTime 7, RGB12 8, WavePacket13 9; Point14 10 (9 layers: channel, returns
# and xy; z; classification; flags; intensity; scan angle; user data; point source; gps time), RGB14 11,
# RGBNIR14 12 (an RGB and a NIR layer), WavePacket14 13.
LAZ_ITEM_SIZES = {6: 20, 7: 8, 8: 6, 9: 29, 10: 30, 11: 6, 12: 8, 13: 29}
LAZ_ITEM_LAYERS = {10: 9, 11: 1, 12: 2, 13: 1}
LAZ_VARIABLE_CHUNKS = (0, 2**32 - 1)  # VLR chunk sizes meaning that the chunk table gives each chunk's count


def read_points(
  path: str | os.PathLike,
  num_features: int | None = None,
  *,
  key: str | None = None,
  fields: Sequence[str] | None = None,
) -> np.ndarray:
  """Reads a point cloud file into a float32 ``[P, F]`` array, by its suffix.

  - ``.bin``: raw little-endian float32 (KITTI, nuScenes), ``num_features`` columns.
  - ``.npy``, ``.npz``: a 2-D numeric array of at least 3 columns (x, y, z first); in an ``.npz``,
    ``key``, else ``"points"``, else the only array. Pickled (object) arrays are refused.
  - ``.ply`` (needs ``plyfile``): the ``vertex`` element's scalar properties, x, y, z first, then the
    others in file order. Binary files are read with numpy once the header's counts are checked (the
    elements after ``vertex``, such as faces, are not read); ascii files with plyfile.
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
    ValueError: an unknown suffix; a file that is truncated, corrupt or not of its format, or whose
      header claims more points than the file holds; a size or column count that does not match
      ``num_features``; a missing ``key`` or field. The message names the file.
    ImportError: plyfile or laspy is needed and not installed.

  Warns:
    UserWarning: a ``.bin`` whose values look misread with ``num_features`` columns: many non-finite
      or absurd (beyond 1e4 m) coordinates, or values in scan order that line up with another column
      count (a nuScenes sweep read with 4 columns). A file in no particular order, or read with a
      multiple of its column count (8 for KITTI), cannot be told from a right one.

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
    points = _read_bin(path, num_features)
    doubt = _bin_doubt(path, points)
    if doubt is not None:
      warnings.warn(doubt, UserWarning, stacklevel=2)
    return points
  if suffix == ".npy":
    points = _read_npy(path)
  elif suffix == ".npz":
    points = _read_npz(path, key)
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
  with np.errstate(over="ignore"):  # beyond float32's range: inf
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
  with np.errstate(over="ignore"):  # beyond float32's range: inf
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


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


def _is_parser_error(e: BaseException) -> bool:
  """Whether ``e`` is a parser's failure: an Exception, or pyo3's PanicException (a panic in lazrs),
  which derives from BaseException; not a KeyboardInterrupt or SystemExit."""
  return isinstance(e, Exception) or type(e).__name__ == "PanicException"


@contextlib.contextmanager
def _reading(name: object, what: str, hint: str = "") -> Iterator[None]:
  """Turns an error of a parser that is not ours (numpy's .npy header, zipfile, plyfile, laspy, lazrs)
  into a ValueError naming the file. On corrupt input they raise anything from EOFError and KeyError
  to zlib.error and struct.error; the size checks made before each call rule out a MemoryError, so one
  is not a file's fault and passes through."""
  try:
    yield
  except MemoryError:
    raise
  except BaseException as e:
    if not _is_parser_error(e):
      raise
    detail = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    raise ValueError(f"{name}: not a readable {what} ({detail}){hint}") from e


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
  values = np.fromfile(path, "<f4")
  if values.size * 4 != size:  # the file changed since stat
    raise ValueError(f"{path}: read {values.size * 4} bytes of {size} (was the file being written?)")
  return values.astype(np.float32, copy=False).reshape(-1, num_features)


def _bin_doubt(path: pathlib.Path, points: np.ndarray) -> str | None:
  """Why ``points`` (a raw .bin read with ``points.shape[1]`` columns) look misread, or None.

  Two signs. Many non-finite or absurd coordinates: not float32 data, or a wrong column count. And a
  wrong stride: scans store points in scan order, so a value is close to the same column's value one
  point later; read with a wrong column count, that holds at another stride, not at ours.
  """
  num_points, num_features = points.shape
  if num_points == 0:
    return None
  xyz = points[:, :3]
  bad = ~np.isfinite(xyz).all(axis=1) | (np.abs(np.nan_to_num(xyz)) > ABSURD_COORDINATE).any(axis=1)
  if bad.mean() > 0.1:
    return (
      f"{path}: {bad.mean():.0%} of the points read with num_features={num_features} have a non-finite "
      f"coordinate or one beyond {ABSURD_COORDINATE:g} m: is num_features={num_features} right "
      f"({BIN_LAYOUTS}), and does the file hold float32 values?"
    )
  values = points.reshape(-1)[: 1 << 16].astype(np.float64)

  def change(stride: int) -> float:
    """The median relative change between values ``stride`` apart (0: equal, 1: unrelated)."""
    a, b = values[:-stride], values[stride:]
    with np.errstate(invalid="ignore", over="ignore"):
      total = np.abs(a) + np.abs(b)
      relative = np.abs(b - a) / np.where(total > 0, total, 1.0)
    relative = relative[np.isfinite(relative)]
    return float(np.median(relative)) if relative.size else 0.0

  if len(values) < 64 or change(num_features) < 0.5:
    return None
  for stride in range(3, 17):
    if stride != num_features and points.size % stride == 0 and change(stride) < 0.15:
      return (
        f"{path}: read with num_features={num_features}, its values line up at a stride of {stride} "
        f"floats instead (in scan order, each value is close to the one {stride} floats later, not "
        f"{num_features}): the file likely holds {stride} columns; pass num_features={stride} ({BIN_LAYOUTS})"
      )
  return None


def _read_npy(path: pathlib.Path) -> np.ndarray:
  with open(path, "rb") as f:
    return _npy_points(path, f, path.stat().st_size, ".npy file")


def _read_npz(path: pathlib.Path, key: str | None) -> np.ndarray:
  size = path.stat().st_size
  with _reading(path, ".npz file"):
    archive = zipfile.ZipFile(path)
  with archive:
    # np.savez names each array's member "<key>.npy"; np.load lists the keys without the suffix.
    members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    keys = list(members)
    if key is None:
      if "points" in keys or len(keys) != 1:
        key = "points"
      else:
        (key,) = keys
    if key not in members:
      raise ValueError(f"{path}: no array {key!r}; pass key= one of {keys}")
    info, name = members[key], f"{path}[{key!r}]"
    if not info.filename.endswith(".npy"):
      raise ValueError(f"{name}: the member {info.filename!r} is not an .npy array")
    if info.compress_size > size:
      raise ValueError(
        f"{name}: its zip entry claims {info.compress_size} compressed bytes, the file has {size} "
        "(truncated file?)"
      )
    if info.file_size > max(NPZ_UNCHECKED_BYTES, NPZ_MAX_RATIO * info.compress_size):
      raise ValueError(
        f"{name}: its zip entry expands {info.compress_size} compressed bytes to {info.file_size}, over "
        f"{NPZ_MAX_RATIO}x (a zip bomb?); if you trust the file, read it with numpy.load"
      )
    with _reading(name, ".npy array"):
      member = archive.open(info)
    with member:
      return _npy_points(name, member, info.file_size, ".npy array")


def _npy_points(name: object, f: BinaryIO, size: int, what: str) -> np.ndarray:
  """float32 ``[P, F]`` from the .npy stream ``f`` of ``size`` bytes; its header is checked (2-D,
  numeric, no pickles, at least 3 columns, no more bytes than ``f`` holds) before the data is read."""
  with _reading(name, what):
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):  # 3.0 is for structured dtypes with non-latin-1 names
      raise ValueError(f"format version {version[0]}.{version[1]}; numeric arrays are 1.0 or 2.0")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else None
    shape, fortran_order, dtype = (read_header or np.lib.format.read_array_header_2_0)(f)
    start = f.tell()
  if len(shape) != 2 or min(shape) < 0 or dtype.kind not in "biuf":  # no objects, records, strings
    raise ValueError(f"{name} must be a 2-D real array [P, F], got {dtype} {shape}")
  if shape[1] < 3:
    raise ValueError(f"{name}: shape {shape} has {shape[1]} columns; points need x, y, z (at least 3)")
  count = math.prod(shape)
  if count * dtype.itemsize > size - start:
    raise ValueError(
      f"{name}: its header says {dtype} {shape}, {count * dtype.itemsize} bytes, and "
      f"{size - start} bytes follow the header (truncated file, or a corrupt header)"
    )
  with _reading(name, what):
    data = f.read(count * dtype.itemsize)
  if len(data) != count * dtype.itemsize:
    raise ValueError(f"{name}: {len(data)} of {count * dtype.itemsize} bytes of data (truncated file?)")
  array = np.frombuffer(data, dtype, count)
  array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
  return _as_points(array, str(name))


def _read_ply(path: pathlib.Path, fields: Sequence[str] | None) -> np.ndarray:
  try:
    import plyfile
  except ImportError as e:
    raise ImportError(f"reading {path} needs plyfile: pip install plyfile (or 'jsparse[io]')") from e
  data = path.read_bytes()
  encoding, elements, start = _ply_header(path, data)
  if "vertex" not in [element[0] for element in elements]:
    raise ValueError(f"{path}: no 'vertex' element; it has {[element[0] for element in elements]}")
  if encoding == "ascii":
    with _reading(path, "PLY file"):
      ply = plyfile.PlyData.read(str(path), mmap=False)
    vertex = ply["vertex"]
    # List properties (e.g. a face's vertex_indices) have no single column.
    names = [p.name for p in vertex.properties if not isinstance(p, plyfile.PlyListProperty)]
    columns = {name: vertex[name] for name in names}
  else:
    columns = _ply_binary_vertex(path, data, PLY_FORMATS[encoding], elements, start)
  if not columns:
    raise ValueError(f"{path}: the PLY 'vertex' element has no scalar properties")
  names = [n for n in ("x", "y", "z") if n in columns] + [n for n in columns if n not in ("x", "y", "z")]
  return _select(path, {name: columns[name] for name in names}, fields)


def _ply_header(path: pathlib.Path, data: bytes) -> tuple[str, list, int]:
  """A PLY header's format, elements ``[(name, count, [(property, type, list length type or None)])]``
  and the offset of the data, the counts checked against the bytes that follow."""

  def fail(reason: str) -> ValueError:
    return ValueError(f"{path}: not a readable PLY file ({reason})")

  # plyfile's rules: "ply" and a line end (LF, CR or CRLF) that all header lines share.
  newline = next((nl for nl in (b"\r\n", b"\n", b"\r") if data.startswith(b"ply" + nl)), None)
  if newline is None:
    raise fail("it does not start with a 'ply' line")
  end = data.find(newline + b"end_header" + newline, 0, PLY_MAX_HEADER)
  if end < 0:
    raise fail(f"no end_header line in its first {PLY_MAX_HEADER} bytes (truncated, or not PLY)")
  try:
    lines = data[: end + len(newline)].decode("ascii").split(newline.decode())[1:]
  except UnicodeDecodeError:
    raise fail("its header holds bytes that are not ASCII") from None
  start = end + len(newline) + len(b"end_header") + len(newline)
  encoding, elements = None, []
  for line in lines:
    words = line.split()
    if not words or words[0] in ("comment", "obj_info"):
      continue
    if words[0] == "format" and encoding is None and not elements:
      if len(words) != 3 or words[1] not in PLY_FORMATS or words[2] != "1.0":
        raise fail(f"the format line {line[:80]!r} is not one of {', '.join(PLY_FORMATS)} 1.0")
      encoding = words[1]
    elif words[0] == "element" and encoding is not None:
      if len(words) != 3 or not words[2].isdigit():
        raise fail(f"the element line {line[:80]!r} is not 'element <name> <count>'")
      elements.append((words[1], int(words[2]), []))
    elif words[0] == "property" and elements:
      if words[1:2] == ["list"] and len(words) == 5 and words[2] in PLY_TYPES and words[3] in PLY_TYPES:
        elements[-1][2].append((words[4], PLY_TYPES[words[3]], PLY_TYPES[words[2]]))
      elif len(words) == 3 and words[1] in PLY_TYPES:
        elements[-1][2].append((words[2], PLY_TYPES[words[1]], None))
      else:
        raise fail(f"the property line {line[:80]!r} is not 'property <type> <name>' or a list of types")
    else:
      raise fail(f"unexpected header line {line[:80]!r}")
  if encoding is None:
    raise fail("no format line")
  # Each row takes at least a byte (a line end in ascii): no count can loop or allocate beyond the file.
  available, needed = len(data) - start, 0
  for name, count, properties in elements:
    if encoding == "ascii":  # a value and a separator per property
      row = max(1, 2 * len(properties))
    else:  # the scalars and the list lengths
      row = max(1, sum(np.dtype(t if length is None else length).itemsize for _, t, length in properties))
    needed += count * row
    if needed > available + (encoding == "ascii"):  # the last line end may be missing
      raise fail(
        f"its header claims {count} {name!r} rows of at least {row} bytes, and {available} bytes follow "
        "the header: truncated file, or a corrupt count"
      )
  return encoding, elements, start


def _ply_binary_vertex(
  path: pathlib.Path, data: bytes, order: str, elements: list, start: int
) -> dict[str, np.ndarray]:
  """The scalar columns of a binary PLY's vertex element. The elements before it are stepped over (row
  by row where they hold lists) and the ones after it are not read."""
  offset = start
  for name, count, properties in elements:
    scalars = [(p, t) for p, t, length in properties if length is None]
    if len({p for p, _ in scalars}) != len(scalars):
      raise ValueError(f"{path}: not a readable PLY file (element {name!r} repeats a property name)")
    if all(length is None for _, _, length in properties):  # fixed-size rows
      rows_dtype = np.dtype([(p, order + t) for p, t, _ in properties])
      if offset + count * rows_dtype.itemsize > len(data):  # the lists before took more than their least
        raise ValueError(f"{path}: not a readable PLY file (element {name!r} ends early: truncated?)")
      if name == "vertex":
        rows = np.frombuffer(data, rows_dtype, count, offset)
        return {p: rows[p] for p, _ in scalars}
      offset += count * rows_dtype.itemsize
      continue
    # Rows with lists: walk them. The header check bounds count by the file's size.
    values: dict[str, list] = {p: [] for p, _ in scalars}
    codes = [
      (p, struct.Struct(order + PLY_STRUCT[length or t]), length and np.dtype(t).itemsize)
      for p, t, length in properties
    ]
    for _ in range(count):
      for p, code, item_size in codes:
        if offset + code.size > len(data):
          raise ValueError(f"{path}: not a readable PLY file (element {name!r} ends early: truncated?)")
        (value,) = code.unpack_from(data, offset)
        offset += code.size
        if not item_size:  # a scalar
          if name == "vertex":
            values[p].append(value)
        elif 0 <= value <= len(data) and value == int(value):  # a list's length
          offset += int(value) * item_size
        else:
          raise ValueError(f"{path}: not a readable PLY file (element {name!r} has a list of length {value})")
    if offset > len(data):
      raise ValueError(f"{path}: not a readable PLY file (element {name!r} ends early: truncated?)")
    if name == "vertex":
      return {p: np.asarray(values[p], order + t) for p, t in scalars}
  raise AssertionError("unreachable: the caller checked that there is a vertex element")


def _read_las(path: pathlib.Path, fields: Sequence[str] | None) -> np.ndarray:
  try:
    import laspy
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs laspy: pip install 'laspy[lazrs]' (or 'jsparse[io]'); .laz also needs lazrs"
    ) from e
  missing_lazrs = path.suffix.lower() == ".laz" and not laspy.LazBackend.detect_available()
  hint = "; .laz needs a decompressor: pip install lazrs" if missing_lazrs else ""
  size = path.stat().st_size
  _check_las_header(path, size)
  # lazrs's parallel decoder allocates what a chunk table entry claims, aborting the process when it
  # cannot (73 GB from a flipped byte); its sequential one is as fast on 2 cores and does not.
  sequential = laspy.LazBackend.Lazrs
  backend = sequential if sequential.is_available() else None
  with _reading(path, "LAS file", hint):
    reader = laspy.open(path, read_evlrs=False, laz_backend=backend)
  with reader:
    header = reader.header
    # Lower-case names are the scaled coordinates (x) where upper-case ones are the stored integers (X).
    names = ["x", "y", "z", "intensity"] if fields is None else list(fields)
    available = ["x", "y", "z", *header.point_format.dimension_names]
    missing = [name for name in names if name not in available]
    if missing:
      raise ValueError(f"{path}: no field {', '.join(map(repr, missing))}; it has {', '.join(available)}")
    count, record = header.point_count, header.point_format.size
    stored = size - header.offset_to_point_data
    ratio = LAZ_MAX_RATIO if header.are_points_compressed else 1
    if count * record > ratio * stored:
      raise ValueError(
        f"{path}: not a readable LAS file (its header claims {count} points of {record} bytes, and "
        f"{stored} bytes{' of compressed points' if ratio > 1 else ''} follow the header: truncated "
        "file, or a corrupt point count)"
      )
    # By chunks: memory grows with the points decoded, not with the count the header claims.
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    read = 0
    with _reading(path, "LAS file", hint):
      for chunk in reader.chunk_iterator(max(1, min(count, LAS_CHUNK_POINTS))):
        read += len(chunk)
        for name in names:
          with np.errstate(over="ignore"):  # beyond float32's range: inf
            parts[name].append(np.asarray(chunk[name]).astype(np.float32))
  if read != count:
    raise ValueError(f"{path}: not a readable LAS file (its header says {count} points, {read} were read)")
  columns = {name: np.concatenate(p) if p else np.zeros(0, np.float32) for name, p in parts.items()}
  return _select(path, columns, names)


def _check_las_header(path: pathlib.Path, size: int) -> None:
  """Checks the counts in a LAS header that laspy and lazrs trust: laspy loops over the VLR count
  without looking for the end of the data; for a .laz, ``_check_laz`` checks what lazrs allocates for."""
  with open(path, "rb") as f:
    head = f.read(375)  # a LAS 1.4 header
    if len(head) < 227 or head[:4] != b"LASF":
      return  # laspy says what is wrong
    header_size, offset, num_vlrs, point_format = struct.unpack_from("<HIIB", head, 94)
    if offset > size:
      raise ValueError(
        f"{path}: not a readable LAS file (its header puts the points at byte {offset}, past the end "
        f"of the file at {size}: truncated?)"
      )
    if num_vlrs * LAS_VLR_HEADER > max(0, offset - header_size):
      raise ValueError(
        f"{path}: not a readable LAS file (its header claims {num_vlrs} VLRs of at least "
        f"{LAS_VLR_HEADER} bytes between the {header_size}-byte header and the points at byte {offset})"
      )
    if point_format & 0xC0:  # compressed
      _check_laz(path, f, size, head)


def _laszip_vlr(f: BinaryIO, header_size: int, num_vlrs: int) -> bytes | None:
  """The data of the first LASzip VLR, as laspy finds it (walking the VLRs from the end of the header),
  or None. ``num_vlrs`` has been checked against the bytes before the points."""
  at = header_size
  for _ in range(num_vlrs):
    f.seek(at)
    vlr = f.read(LAS_VLR_HEADER)
    if len(vlr) < LAS_VLR_HEADER:
      return None
    record_id, length = struct.unpack_from("<HH", vlr, 18)
    if (vlr[2:18].split(b"\0")[0], record_id) == LASZIP_VLR:
      return f.read(length)
    at += LAS_VLR_HEADER + length
  return None


def _check_laz(path: pathlib.Path, f: BinaryIO, size: int, head: bytes) -> None:
  """Checks what lazrs allocates for as a .laz claims it, before laspy and lazrs read it.

  - The LASzip VLR's items: lazrs keeps 2-10 kB of models per extra byte, so their sizes must add up to
    the header's point record length (at most 65,535 bytes), as LASzip writes them.
  - The chunk table: lazrs looks for it where the 8 bytes at the start of the points say, or, when those
    do not point past them (-1 from a streaming writer), where the last 8 bytes of the file say; it must
    lie in the file. lazrs allocates 16 bytes per chunk of its count, lazrs.read_chunk_table here a
    Python tuple: every chunk but an empty last one must have room for its head.
  - The chunks of layered compression (LAS 1.4 point formats 6-10). lazrs reads them one after the
    other, each as the LASzip specification lays it out: the first point raw (each item's bytes), a u32
    count of the chunk's points, a u32 byte size per layer (the items' layers in item order), then the
    layers' bytes in that order; it allocates each layer's size before reading it (up to 4 GB). This
    walks the chunks that the header's point count takes, with a seek and a read of the count and sizes
    per chunk, and requires the layers to end before the chunk table (or the end of the file), the
    chunk to take the bytes its chunk table entry says, and the count to be 1 to the VLR's chunk size
    (for variable-size chunks: the count of the chunk table entry). The point-wise chunks of formats 0-5
    hold no sizes; the check of the header's point count against the file's size bounds them.
  """
  header_size, offset, num_vlrs, _, record = struct.unpack_from("<HIIBH", head, 94)
  if head[25] >= 4 and len(head) < 255:
    return  # a LAS 1.4 header cut short: laspy says so
  count = struct.unpack_from("<Q", head, 247)[0] if head[25] >= 4 else struct.unpack_from("<I", head, 107)[0]
  vlr = _laszip_vlr(f, header_size, num_vlrs)
  if vlr is None or len(vlr) < 34:
    return  # laspy or lazrs says what is wrong
  compressor, chunk_size, num_items = struct.unpack_from("<H10xI16xH", vlr)
  items = [struct.unpack_from("<HHH", vlr, 34 + 6 * i) for i in range(min(num_items, (len(vlr) - 34) // 6))]
  if len(items) < num_items or compressor not in (1, 2, 3):
    return  # lazrs refuses the VLR (0: not compressed)
  if any(kind not in LAZ_ITEM_SIZES and kind not in (0, 14) for kind, _, _ in items):
    return  # an unknown item: lazrs refuses the VLR
  point_bytes = sum(LAZ_ITEM_SIZES.get(kind, item_size) for kind, item_size, _ in items)
  if point_bytes != record:
    raise ValueError(
      f"{path}: not a readable LAZ file (its LASzip VLR describes points of {point_bytes} bytes, its "
      f"header points of {record} bytes)"
    )
  # lazrs decodes layered chunks when the first item is of version 3 or 4, and refuses then any item but
  # a version 3 one of LAS 1.4's types (src/laszip/details.rs, src/record.rs), after reading the table.
  layered = bool(items) and items[0][2] in (3, 4)
  valid = all(version == 3 and kind in (10, 11, 12, 13, 14) for kind, _, version in items)
  layers = sum(LAZ_ITEM_LAYERS.get(kind, item_size) for kind, item_size, _ in items) if layered else 0
  # A chunk starts with its first point raw; a layered one then has the point count and layer sizes.
  chunk_head = max(1, point_bytes + (4 + 4 * layers if layered else 0))

  table = None
  if compressor != 1 and offset + 8 <= size:  # compressor 1: one chunk of all the points, no table
    f.seek(offset)
    (table,) = struct.unpack("<q", f.read(8))
    if table <= offset:
      f.seek(size - 8)
      (table,) = struct.unpack("<q", f.read(8))
      table = table if table > offset else None  # no table: lazrs fails to read the points
    # Past the end, the table cannot be read, and where the seek to it fails (past the largest file the
    # file system allows), lazrs's BufReader keeps its buffer and lazrs reads the chunks 8 bytes late.
    if table is not None and table > size - 8:
      raise ValueError(
        f"{path}: not a readable LAZ file (its chunk table offset {table} is past the end of the file "
        f"at {size})"
      )
  if table is not None:
    f.seek(table)
    _, num_chunks = struct.unpack("<II", f.read(8))
    # Each chunk holds a point, but an empty last one (lazrs writes one when the points fill the chunks).
    if num_chunks > max(0, table - offset - 8) // chunk_head + 1:
      raise ValueError(
        f"{path}: not a readable LAZ file (its chunk table claims {num_chunks} chunks of at least "
        f"{chunk_head} bytes in the {table - offset - 8} bytes before it)"
      )
  if not layered or not valid or count == 0:
    return

  entries = None  # [(points, bytes)] per chunk; for fixed-size chunks, the points are the chunk size
  if table is not None:
    try:
      import lazrs

      f.seek(offset)
      entries = lazrs.read_chunk_table(f, lazrs.LazVlr(vlr))
    except BaseException as e:  # no lazrs, a LazrsError or a panic: lazrs will fail alike when reading
      if not _is_parser_error(e):
        raise
      table = None
  variable = chunk_size in LAZ_VARIABLE_CHUNKS
  at = offset if compressor == 1 else offset + 8  # after the chunk table's offset
  end, where = (table, "the chunk table") if table is not None else (size, "the end of the file")
  remaining, i = count, 0
  while remaining > 0:  # each pass moves `at` on by at least chunk_head bytes, up to `end`
    if entries is not None and i >= len(entries):
      raise ValueError(
        f"{path}: not a readable LAZ file (its chunk table lists {len(entries)} chunks, its header's "
        f"{count} points need more)"
      )
    if at + chunk_head > end:
      raise ValueError(
        f"{path}: not a readable LAZ file (chunk {i} at byte {at} runs past {where} at byte {end})"
      )
    f.seek(at + point_bytes)
    points, *sizes = struct.unpack(f"<{1 + layers}I", f.read(4 + 4 * layers))
    # The points lazrs decodes from the chunk (it reads the chunk's own count only for variable-size
    # chunks without a table), and the counts that fit.
    if compressor == 1:
      takes, fit = remaining, f"1 to the {remaining} points"
    elif not variable:
      takes, fit = chunk_size, f"1 to the chunk size {chunk_size}"
    elif entries is not None:
      takes, fit = entries[i][0], f"the chunk table's {entries[i][0]}"
    else:
      takes, fit = points, "1 or more"
    if not 1 <= points <= takes or (variable and compressor != 1 and points != takes):
      raise ValueError(
        f"{path}: not a readable LAZ file (chunk {i} at byte {at} claims {points} points; {fit} fit)"
      )
    chunk = chunk_head + sum(sizes)
    if at + chunk > end:
      raise ValueError(
        f"{path}: not a readable LAZ file (the layers of chunk {i} at byte {at} claim {sum(sizes)} "
        f"bytes, {end - at - chunk_head} are left before {where} at byte {end})"
      )
    if entries is not None and chunk != entries[i][1]:
      raise ValueError(
        f"{path}: not a readable LAZ file (chunk {i} at byte {at} takes {chunk} bytes, its chunk table "
        f"entry says {entries[i][1]})"
      )
    at += chunk
    remaining -= takes
    i += 1


def _parse_pcd_header(path: pathlib.Path, data: bytes) -> tuple[dict[str, list[str]], int]:
  """The header's ``{KEY: values}`` and the offset where the points start."""
  header: dict[str, list[str]] = {}
  start = 0
  while "DATA" not in header:  # each pass consumes a line: bounded by the file's size
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
  except ValueError:  # also a number of over 4300 digits
    raise ValueError(f"{path}: PCD {key} must be integers, got {' '.join(header[key])[:80]}") from None
  if any(v < 0 for v in values):
    raise ValueError(f"{path}: PCD {key} must not be negative, got {' '.join(header[key])[:80]}")
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
  if 0 in counts:
    raise ValueError(f"{path}: PCD COUNT must be positive, got {' '.join(header['COUNT'])[:80]}")
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

  # Sizes from the header's integers: no array is made before they are checked against the file.
  body = len(data) - offset
  if encoding == "ascii":
    values = _pcd_ascii(path, data[offset:], num_points * sum(counts))
    parts = np.split(values.reshape(num_points, sum(counts)), np.cumsum(counts)[:-1], axis=1)
  elif encoding == "binary":
    row = sum(size * count for size, count in zip(sizes, counts))
    if body < num_points * row:
      raise ValueError(
        f"{path}: PCD binary data is {body} bytes, {num_points} points x {row} bytes = "
        f"{num_points * row} expected (truncated file?)"
      )
    # Padding fields may repeat the name "_", so the record dtype uses positional names.
    record = np.dtype(
      [(f"c{i}", f"<{t.lower()}{size}", (c,)) for i, (t, size, c) in enumerate(zip(types, sizes, counts))]
    )
    rows = np.frombuffer(data, record, num_points, offset)
    parts = [rows[f"c{i}"] for i in range(len(names))]
  else:
    # Compressed PCD stores each field for all points, then the next field (structure of arrays),
    # and PCL leaves the padding fields "_" out of it.
    stored = [
      (np.dtype(f"<{t.lower()}{size}"), c)
      for name, t, size, c in zip(names, types, sizes, counts)
      if name != "_"
    ]
    expected = num_points * sum(dt.itemsize * c for dt, c in stored)
    raw = _pcd_decompress(path, data[offset:], num_points, expected) if num_points else b""
    parts, start = [], 0
    for dt, c in stored:
      parts.append(np.frombuffer(raw, dt, num_points * c, start).reshape(num_points, c))
      start += num_points * c * dt.itemsize
    names = [name for name in names if name != "_"]
  columns = {name: part for name, part in zip(names, parts) if name != "_"}
  return _select(path, columns, fields)


def _pcd_ascii(path: pathlib.Path, text: bytes, expected: int) -> np.ndarray:
  """The whitespace-separated numbers of an ascii PCD body, float64 ``[expected]``."""
  if expected > len(text):  # each value takes at least a byte: a corrupt count fails before the parse
    raise ValueError(
      f"{path}: PCD ascii data is {len(text)} bytes, too few for POINTS x columns = {expected} values "
      "(truncated file, or a corrupt POINTS, WIDTH or COUNT)"
    )
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


def _pcd_decompress(path: pathlib.Path, body: bytes, num_points: int, expected: int) -> bytes:
  """The ``expected`` bytes of a binary_compressed PCD body: uint32 compressed and raw sizes, then LZF."""
  if len(body) < 8:
    raise ValueError(f"{path}: PCD binary_compressed data ends before its 8-byte size header")
  compressed, size = struct.unpack_from("<II", body)
  if size != expected:
    raise ValueError(
      f"{path}: PCD binary_compressed data holds {size} bytes, {num_points} points need {expected}"
    )
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
  ``((ctrl & 31) << 8 | next byte) + 1`` bytes back in the output. The output never grows past
  ``size`` and each token consumes input, so corrupt input costs at most ``len(data)`` steps.

  >>> _lzf_decompress(bytes([2]) + b"abc" + bytes([0x40, 2]), 7)  # "abc", then 4 bytes from 3 back
  b'abcabca'
  """
  out = bytearray()
  i, n = 0, len(data)
  while i < n:
    at, ctrl = i, data[i]
    i += 1
    if ctrl < 32:
      length = ctrl + 1
      if i + length > n:
        raise ValueError(f"the literal run of {length} bytes at byte {at} passes the end of the input")
      if len(out) + length > size:
        raise ValueError(f"it decodes to more than the {size} bytes its header says")
      out += data[i : i + length]
      i += length
      continue
    length = ctrl >> 5
    if length == 7:
      length += data[i] if i < n else 0
      i += 1
    if i >= n:
      raise ValueError("the input ends inside a back reference")
    distance = ((ctrl & 31) << 8 | data[i]) + 1
    i += 1
    length += 2
    if distance > len(out):
      raise ValueError(f"the back reference at byte {at} points before the start of the output")
    if len(out) + length > size:
      raise ValueError(f"it decodes to more than the {size} bytes its header says")
    start = len(out) - distance
    if length <= distance:
      out += out[start : start + length]
    else:  # overlapping: the copy repeats the last `distance` bytes (runs)
      out += (out[start:] * (length // distance + 1))[:length]
  if len(out) != size:
    raise ValueError(f"it decodes to {len(out)} bytes, its header says {size}")
  return bytes(out)
