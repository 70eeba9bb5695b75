"""Combining sparse tensors: the sum over the union of their sites, and channel concatenation.

``sparse_add`` finds the union of the operands' sites with the kernel-map machinery (a 1x1
"conv" map over the concatenated sites yields them deduplicated and sorted by (batch, coords)),
then gathers each operand's rows into the union through its own 1-tap map. Every output row has
one writer per operand and the operands are added in argument order; the gradient gathers
through the transposed maps, so both directions are deterministic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse._capacity import CapacityError, is_concrete, overflow_entry
from jsparse.ops import _backend, _kmap
from jsparse.ops._conv import gather_rows
from jsparse.tensor import SparseConvTensor


@jax.custom_vjp
def _gather(x: jax.Array, rows: jax.Array, rows_t: jax.Array) -> jax.Array:
  """``x[rows]`` (0 where -1); ``rows_t`` is its transpose, which the gradient gathers through."""
  return gather_rows(x, rows)


def _gather_fwd(x, rows, rows_t):
  return gather_rows(x, rows), rows_t


def _gather_bwd(rows_t, dy):
  return gather_rows(dy, rows_t), None, None


_gather.defvjp(_gather_fwd, _gather_bwd)


def _check_operands(tensors: tuple[Any, ...], op: str) -> None:
  if not tensors:
    raise ValueError(f"{op} needs at least one SparseConvTensor")
  for j, t in enumerate(tensors):
    if not isinstance(t, SparseConvTensor):
      raise TypeError(f"{op}: operand {j} is a {type(t).__name__}, not a SparseConvTensor")
  first = tensors[0]
  for j, t in enumerate(tensors[1:], 1):
    if t.spatial_shape != first.spatial_shape or t.batch_size != first.batch_size:
      raise ValueError(
        f"{op}: operand {j} has spatial_shape={t.spatial_shape}, batch_size={t.batch_size}, but "
        f"operand 0 has spatial_shape={first.spatial_shape}, batch_size={first.batch_size}"
      )


def _merged_overflow(tensors: tuple[SparseConvTensor, ...]) -> dict[str, jax.Array]:
  """The operands' overflow records in one dict; a clashing label gets the operand's number."""
  merged: dict[str, jax.Array] = {}
  for j, t in enumerate(tensors):
    for label, record in t.overflow.items():
      if label in merged and merged[label] is not record:
        label = f"{label} (operand {j})"
      merged[label] = record
  return merged


def _merged_dicts(tensors: tuple[SparseConvTensor, ...]) -> dict[str, Any]:
  """Every operand's kernel maps; the first operand that has a key wins."""
  merged: dict[str, Any] = {}
  for t in reversed(tensors):
    merged.update(t.indice_dict)
  return merged


def _same_sites(tensors: tuple[SparseConvTensor, ...], op: str) -> None:
  """Operands must share their rows: same capacity always, identical indices when eager."""
  _check_operands(tensors, op)
  first = tensors[0]
  for j, t in enumerate(tensors[1:], 1):
    same = t.capacity == first.capacity
    if same and is_concrete(t.indices, first.indices):
      same = bool(np.array_equal(np.asarray(t.indices), np.asarray(first.indices)))
    if not same:
      raise ValueError(
        f"{op}: operand {j} does not have operand 0's sites (the same indices row for row); "
        "use jsparse.ops.sparse_add to combine tensors over different sites"
      )


def add_same_sites(x: SparseConvTensor, y: SparseConvTensor) -> SparseConvTensor:
  """``x + y`` for tensors with identical sites: features added, kernel maps of both kept."""
  _same_sites((x, y), "x + y")
  return x.replace(
    features=x.features + y.features,
    indice_dict=_merged_dicts((x, y)),
    overflow=_merged_overflow((x, y)),
  )


def sparse_cat(*tensors: SparseConvTensor) -> SparseConvTensor:
  """Concatenates the features of tensors with identical sites along the channel axis.

  Args:
    *tensors: ``SparseConvTensor`` s with the same indices (row for row; checked eagerly) and
      features ``[capacity, C_j]``.

  Returns:
    A tensor over those sites with features ``[capacity, sum C_j]`` (dtypes promoted) and every
    operand's kernel maps.

  >>> import numpy as np, jsparse
  >>> idx = np.array([[0, 1], [0, 3]], np.int32)
  >>> a = jsparse.SparseConvTensor(np.ones((2, 2), np.float32), idx, (4,), 1)
  >>> b = jsparse.SparseConvTensor(np.zeros((2, 3), np.float32), idx, (4,), 1)
  >>> jsparse.ops.sparse_cat(a, b).features.shape
  (2, 5)
  """
  _same_sites(tensors, "sparse_cat")
  return tensors[0].replace(
    features=jnp.concatenate([t.features for t in tensors], axis=1),
    indice_dict=_merged_dicts(tensors),
    overflow=_merged_overflow(tensors),
  )


def _one_tap_spec(x: SparseConvTensor) -> _kmap.MapSpec:
  """A 1x1 map: its output sites are its input sites, deduplicated and sorted."""
  return _kmap.make_spec("conv", x.spatial_shape, 1)


def _union_impl(indices: tuple[jax.Array, ...], spec, batch_size: int, capacity: int):
  return _kmap.output_sites(jnp.concatenate(indices), spec, batch_size, capacity)


_union = _backend.jit(_union_impl, static_argnames=("spec", "batch_size", "capacity"))


def _sum_into(tensors, out_indices: jax.Array, num_out: jax.Array, spec) -> jax.Array:
  """The operands' features summed into the rows of ``out_indices`` (in argument order)."""
  dtype = jnp.result_type(*(t.features.dtype for t in tensors))
  total = None
  for t in tensors:
    pairs = _kmap.map_for_outputs(t.indices, out_indices, num_out, spec, t.batch_size)
    term = _gather(t.features.astype(dtype), pairs.nbr[:, 0], pairs.nbr_t[:, 0])
    total = term if total is None else total + term
  return total


def sparse_add(*tensors: SparseConvTensor, capacity: int | None = None) -> SparseConvTensor:
  """Sum of sparse tensors over the union of their sites; sites in several operands are added.

  The result's rows are the union sorted by (batch, coords). As in spconv, the result keeps the
  ``indice_dict`` of an operand whose site set equals the union; jsparse then keeps that
  operand's rows (order and capacity) too, so its stored maps stay valid. This needs concrete
  sites, so it applies to eager calls; under jit the result has the sorted union and no kernel
  maps (use ``x + y`` for identical sites, which keeps them).

  Args:
    *tensors: ``SparseConvTensor`` s with one spatial shape, batch size and channel count.
    capacity: static row count of the result. Eagerly ``None`` fits the union and a too-small
      capacity raises :class:`jsparse.CapacityError`; under jit ``None`` means the sum of the
      operands' capacities (the union always fits) and a shortfall is recorded in ``overflow``.

  Returns:
    A ``SparseConvTensor`` with features ``[capacity, C]`` (dtypes promoted).

  >>> import numpy as np, jsparse
  >>> a = jsparse.SparseConvTensor(np.ones((2, 1), np.float32), np.array([[0, 3], [0, 1]], np.int32), (4,), 1)
  >>> b = jsparse.SparseConvTensor(np.ones((1, 1), np.float32), np.array([[0, 1]], np.int32), (4,), 1)
  >>> c = jsparse.ops.sparse_add(a, b)
  >>> c.indices.tolist(), c.features.ravel().tolist()
  ([[0, 3], [0, 1]], [1.0, 2.0])
  """
  _check_operands(tensors, "sparse_add")
  channels = {t.features.shape[1] for t in tensors}
  if len(channels) != 1:
    raise ValueError(f"sparse_add: operands must have one channel count, got {sorted(channels)}")
  first = tensors[0]
  spec = _one_tap_spec(first)
  overflow = _merged_overflow(tensors)
  indices = tuple(t.indices for t in tensors)
  upper = sum(t.capacity for t in tensors)
  if is_concrete(*indices):
    union, needed = _union(indices, spec, first.batch_size, upper)
    needed = int(needed)
    if capacity is not None and needed > capacity:
      raise CapacityError(
        f"sparse_add: the union has {needed} sites but capacity={capacity}; pass capacity >= "
        f"{needed}, or leave it None to fit the union when eager"
      )
    for t in tensors:  # spconv keeps the maps of an operand that holds every site
      if int(t.num_active) == needed and (capacity is None or capacity == t.capacity):
        features = _sum_into(tensors, t.indices, jnp.int32(needed), spec)
        return t.replace(features=features, overflow=overflow)
    capacity = needed if capacity is None else capacity
    union = jnp.pad(union[:capacity], ((0, max(0, capacity - union.shape[0])), (0, 0)), constant_values=-1)
    num_out = jnp.int32(needed)
  else:
    capacity = upper if capacity is None else capacity
    union, num_out = _union(indices, spec, first.batch_size, capacity)
    overflow[f"{len(overflow):03d} sparse_add"] = overflow_entry(num_out, capacity)
  features = _sum_into(tensors, union, num_out, spec)
  return SparseConvTensor._make(features, union, first.spatial_shape, first.batch_size, {}, overflow)
