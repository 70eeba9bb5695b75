"""Helpers shared by the test modules: random sparse tensors (unique sites, padding rows interleaved,
garbage in padding) and point clouds, a function run on both backends, and comparisons with spconv."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import _ffi

needs_ffi = pytest.mark.skipif(not _ffi.built("cpu"), reason="the C++ extension is not built")


def random_sites(rng: np.random.Generator, batch_size: int, spatial_shape, count: int) -> np.ndarray:
  """``[count, 1 + ndim]`` distinct sites (count is capped by the grid size)."""
  cells = batch_size * int(np.prod(spatial_shape))
  flat = rng.choice(cells, size=min(count, cells), replace=False)
  return np.stack(np.unravel_index(flat, (batch_size, *spatial_shape)), axis=1).astype(np.int32)


def random_tensor(
  rng: np.random.Generator,
  batch_size: int,
  spatial_shape,
  channels: int,
  count: int,
  padding_rows: int = 0,
  dtype=np.float32,
) -> jsparse.SparseConvTensor:
  """A tensor with ``count`` active sites and ``padding_rows`` padding rows shuffled among them.

  Padding rows hold nonzero features on purpose: they must never leak into a result.
  """
  sites = random_sites(rng, batch_size, spatial_shape, count)
  pad = np.full((padding_rows, sites.shape[1]), -1, np.int32)
  indices = np.concatenate([sites, pad])
  features = rng.standard_normal((indices.shape[0], channels)).astype(dtype)
  order = rng.permutation(indices.shape[0])
  x = jsparse.SparseConvTensor(features[order], indices[order], spatial_shape, batch_size)
  return x


# A large scene in bfloat16: [2**24 + 64, 128] holds 2**31 + 8192 elements (4.3 GB), so its last
# rows start past int32 element offsets (row * C >= 2**31). Only 48 rows are nonzero: 16 at the
# start, 16 around 2**23 and the last 16.
LARGE_ROWS, LARGE_CHANNELS = 2**24 + 64, 128
LARGE_ACTIVE = np.concatenate([np.arange(16), 2**23 + np.arange(16), LARGE_ROWS - 16 + np.arange(16)])


def large_scene(
  rng: np.random.Generator, out_rows: int, taps: int
) -> tuple[jax.Array, jsparse.ops.IndicePairs, np.ndarray, np.ndarray]:
  """``(features, pairs, gathered, valid)``: the large scene's bfloat16 features, a map of ``taps``
  taps whose ``out_rows`` outputs read its nonzero rows (no row in about a quarter of the cells),
  and, computed with numpy on the 48 nonzero rows alone, the float32 rows each cell reads
  ``gathered [out_rows, taps, C]`` (0 without a row) and bool ``valid [out_rows, taps]``."""
  values = np.asarray(jnp.asarray(rng.standard_normal((len(LARGE_ACTIVE), LARGE_CHANNELS)), jnp.bfloat16))
  # Zeros from calloc, 64-byte aligned so that jax takes the buffer without copying it: pages
  # that nothing writes are never allocated, and the scene costs what its users touch.
  size = LARGE_ROWS * LARGE_CHANNELS
  buffer = np.zeros(size + 32, np.uint16)
  start = (-buffer.ctypes.data % 64) // 2
  host = buffer[start : start + size].view(values.dtype).reshape(LARGE_ROWS, LARGE_CHANNELS)
  host[LARGE_ACTIVE] = values
  features = jax.device_put(host)
  picked = rng.integers(0, len(LARGE_ACTIVE), size=(out_rows, taps))
  valid = rng.random(picked.shape) >= 0.25
  nbr = np.where(valid, LARGE_ACTIVE[picked], -1).astype(np.int32)
  gathered = np.where(valid[..., None], values.astype(np.float32)[picked], 0.0)
  pairs = jsparse.ops.IndicePairs(
    jnp.asarray(nbr),
    None,
    jnp.zeros((LARGE_ROWS, 2), jnp.int32),
    jnp.zeros((out_rows, 2), jnp.int32),
    jnp.int32(out_rows),
    jsparse.ops.make_spec("conv", (taps,), taps),
    1,
  )
  return features, pairs, gathered, valid


def clustered_points(rng: np.random.Generator, n: int, ndim: int, extent: int, features: int) -> np.ndarray:
  """Points on a coarse lattice plus jitter, so that many share a voxel; coords first."""
  lattice = rng.integers(-1, extent + 1, size=(n, ndim)).astype(np.float32)
  coords = lattice * 0.5 + rng.uniform(0, 0.5, size=(n, ndim)).astype(np.float32)
  extra = rng.standard_normal((n, features - ndim)).astype(np.float32)
  return np.concatenate([coords, extra], axis=1)


def platform_device(platform: str) -> jax.Device:
  """A device of ``platform`` ("cpu" or "cuda") to run jsparse's FFI kernels on. Skips the test when
  that platform's jsparse extension is not built, and on CUDA when jax has no CUDA device: the CUDA
  kernels are tested on a GPU machine (``benchmarks/gpu_check.sh``)."""
  if not _ffi.built(platform):
    pytest.skip(f"jsparse's {platform} extension is not built")
  try:
    return jax.devices(platform)[0]
  except RuntimeError:
    pytest.skip(f"jax has no {platform} device here; benchmarks/gpu_check.sh runs these on a GPU machine")


def both_backends(fn: Callable[..., Any], *args: Any, device: jax.Device | None = None) -> list[Any]:
  """``[ffi, reference]``: ``fn(*args)`` jitted and run on each backend, on ``device`` (the args
  are put there; default: where they are). A fresh function per backend, since jit caches traces
  per function object and the backend is read when tracing."""
  if device is not None:
    args = jax.device_put(args, device)
  results = []
  for name in ("ffi", "reference"):
    with jsparse.backend(name):
      results.append(jax.block_until_ready(jax.jit(lambda *a: fn(*a))(*args)))
  return results


def spconv_tensors(
  torch: Any, spconv: Any, features: np.ndarray, indices: np.ndarray, spatial_shape, batch_size: int
) -> tuple[jsparse.SparseConvTensor, Any]:
  """The same tensor for jsparse and for spconv (``spconv`` is ``spconv.pytorch``)."""
  js = jsparse.SparseConvTensor(features, indices, spatial_shape, batch_size)
  sp = spconv.SparseConvTensor(
    torch.from_numpy(features), torch.from_numpy(indices), list(spatial_shape), batch_size
  )
  return js, sp


def _sorted_rows(indices: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  order = np.lexsort(indices.T[::-1])
  return indices[order], features[order]


def assert_same_as_spconv(
  js_out: jsparse.SparseConvTensor, sp_out: Any, atol: float, same_order: bool = False
) -> None:
  """Same grid, the same active sites (as sorted sets) and the same features at each site; with
  ``same_order``, the same rows in the same order too. spconv orders the output rows of strided and
  transposed layers its own way: both sides are sorted by (batch, coords) before comparing."""
  assert tuple(js_out.spatial_shape) == tuple(sp_out.spatial_shape)
  js_features, js_indices = js_out.to_numpy()
  sp_indices, sp_features = sp_out.indices.numpy(), sp_out.features.numpy()
  if same_order:
    np.testing.assert_array_equal(js_indices, sp_indices)
  js_indices, js_features = _sorted_rows(js_indices, js_features)
  sp_indices, sp_features = _sorted_rows(sp_indices, sp_features)
  np.testing.assert_array_equal(js_indices, sp_indices)
  np.testing.assert_allclose(js_features, sp_features, atol=atol, rtol=0)
