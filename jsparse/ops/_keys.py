"""Site keys: (batch, coords) rows packed into int32 words, sorted, and looked up.

The reference path has no 64-bit integers (jax's x64 mode is off by default), so a site's
mixed-radix number over ``(batch_size, *spatial_shape)`` is split into as few int32 words as
keep each word below ``2**31 - 1``. Comparing the words lexicographically orders sites by
(batch, coords). Inactive rows get the sentinel ``INT32_MAX`` in every word, which sorts last
and never matches a valid query.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsparse.ops._varying import vary_like

INT32_MAX = int(np.iinfo(np.int32).max)

Words = tuple[jax.Array, ...]


def key_radices(batch_size: int, spatial_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
  """Groups the radices ``(batch_size, *spatial_shape)`` into int32 words.

  >>> key_radices(2, (4, 5))
  ((2, 4, 5),)
  >>> key_radices(4, (2048, 2048, 160))
  ((4, 2048, 2048), (160,))
  """
  groups: list[tuple[int, ...]] = []
  group: tuple[int, ...] = ()
  for radix in (batch_size, *spatial_shape):
    if not 0 < radix < INT32_MAX:
      raise ValueError(f"grid extent {radix} must be in [1, {INT32_MAX - 1}]")
    if group and np.prod(group + (radix,), dtype=np.float64) >= INT32_MAX:
      groups.append(group)
      group = ()
    group += (radix,)
  groups.append(group)
  return tuple(groups)


def in_grid(coords: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """``bool [...]``: every coordinate of ``coords [..., ndim]`` lies in ``[0, spatial_shape)``."""
  upper = jnp.asarray(spatial_shape, coords.dtype).reshape((1,) * (coords.ndim - 1) + (-1,))
  return jnp.all((coords >= 0) & (coords < upper), axis=-1)


def pack(
  batch: jax.Array, coords: jax.Array, valid: jax.Array, radices: tuple[tuple[int, ...], ...]
) -> Words:
  """Packs sites into key words.

  Args:
    batch: int32 ``[...]`` batch indices.
    coords: int32 ``[..., ndim]`` coordinates.
    valid: bool ``[...]``; invalid sites get the sentinel key, and so do sites with a batch index
      or coordinate outside ``[0, radix)`` (which would alias another site's key).
    radices: from :func:`key_radices`.

  Returns:
    A tuple of int32 ``[...]`` words, most significant first.
  """
  columns = [batch] + [coords[..., j] for j in range(coords.shape[-1])]
  words, col = [], 0
  for group in radices:
    word = jnp.zeros_like(batch)
    for radix in group:
      valid = valid & (columns[col] >= 0) & (columns[col] < radix)
      word = word * radix + columns[col]
      col += 1
    words.append(word)
  return tuple(jnp.where(valid, word, INT32_MAX) for word in words)


def pack_indices(indices: jax.Array, radices: tuple[tuple[int, ...], ...]) -> Words:
  """Packs the rows of ``indices [N, 1 + ndim]``; rows with batch index < 0 are inactive."""
  return pack(indices[:, 0], indices[:, 1:], indices[:, 0] >= 0, radices)


class SortedKeys(NamedTuple):
  """Keys sorted by (batch, coords); ``order[i]`` is the row that holds the i-th key."""

  words: Words
  order: jax.Array


def sort_keys(words: Words) -> SortedKeys:
  """Stable sort of ``[N]`` key words (``N < 2**31``: int32 row numbers); equal keys keep their
  row order."""
  n = words[0].shape[0]
  if n > INT32_MAX:
    raise ValueError(f"sort_keys: {n} keys, but rows are numbered with int32 (at most 2**31 - 1)")
  iota = lax.iota(jnp.int32, n)
  *sorted_words, order = lax.sort((*words, iota), num_keys=len(words), is_stable=True)
  return SortedKeys(tuple(sorted_words), order)


def _lex_less(a: Words, b: Words) -> jax.Array:
  less = jnp.zeros(a[0].shape, bool)
  equal = jnp.ones(a[0].shape, bool)
  for x, y in zip(a, b):
    less = less | (equal & (x < y))
    equal = equal & (x == y)
  return less


def lookup(table: SortedKeys, query: Words) -> jax.Array:
  """Finds each query key in the table.

  Args:
    table: the sorted keys of ``N`` rows.
    query: int32 ``[...]`` words of the keys to find.

  Returns:
    int32 ``[...]``: the row that holds the key (the first such row), or -1.
  """
  n = table.words[0].shape[0]
  if n == 0:
    return jnp.full(query[0].shape, -1, jnp.int32)
  lo = vary_like(jnp.zeros(query[0].shape, jnp.int32), *table.words, *query)
  hi = vary_like(jnp.full(query[0].shape, n, jnp.int32), *table.words, *query)

  def bisect(_, bounds):  # lower bound: first position whose key is not less than the query
    lo, hi = bounds
    mid = lo + (hi - lo) // 2  # (lo + hi) // 2 would wrap int32 beyond 2**30 rows
    go_right = _lex_less(tuple(w[mid] for w in table.words), query) & (lo < hi)
    return jnp.where(go_right, mid + 1, lo), jnp.where(go_right | (lo >= hi), hi, mid)

  lo, _ = lax.fori_loop(0, int(n).bit_length(), bisect, (lo, hi))
  pos = jnp.minimum(lo, n - 1)
  found = query[0] != INT32_MAX
  for w, q in zip(table.words, query):
    found = found & (w[pos] == q)
  return jnp.where(found, table.order[pos], -1)


def first_of_runs(sorted_words: Words) -> jax.Array:
  """``bool [N]``: the position holds a valid key that differs from the previous one."""
  first = jnp.ones(sorted_words[0].shape, bool)
  if sorted_words[0].shape[0] > 0:
    same = jnp.ones(sorted_words[0].shape[0] - 1, bool)
    for w in sorted_words:
      same = same & (w[1:] == w[:-1])
    first = first.at[1:].set(~same)
  return first & (sorted_words[0] != INT32_MAX)
