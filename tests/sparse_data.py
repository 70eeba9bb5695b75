"""Random sparse tensors for tests: unique sites, padding rows interleaved, garbage in padding."""

from __future__ import annotations

import numpy as np

import jsparse


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
