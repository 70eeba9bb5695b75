"""Static capacities: the error raised when sites do not fit, the host-side check, buckets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class CapacityError(ValueError):
  """More active sites exist than a layer's static ``out_capacity`` holds."""


CapacityError.__module__ = "jsparse"  # tracebacks name it where users import it from


def is_concrete(*arrays: Any) -> bool:
  """True when no array is a tracer, i.e. the call runs eagerly (outside jit, grad, vmap)."""
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def overflow_entry(needed: jax.Array, capacity: int) -> jax.Array:
  """The record a layer leaves in ``SparseConvTensor.overflow``: int32 ``[needed, capacity]``."""
  return jnp.stack([jnp.asarray(needed, jnp.int32), jnp.int32(capacity)])


def check_capacity(x: Any) -> None:
  """Host-side check that nothing was dropped for lack of capacity.

  Under ``jit`` capacities are static: a layer that creates sites keeps the first of them that
  fit (in (batch, coords) order) and records ``[needed, capacity]`` in its output's ``overflow``
  dict; ``from_dense``, ``sparse_add`` (their ``capacity``) and ``PointToVoxel``
  (``max_num_voxels``, via its ``overflow`` method) record theirs the same way. Call this after a
  step (outside jit) on the output tensor, or on an ``overflow`` dict returned as an auxiliary
  output. (:func:`jsparse.nn.grow_on_overflow` does it for a train step and grows the layers.)

  Args:
    x: a ``SparseConvTensor`` or an ``overflow`` dict ``{label: int32 [needed, capacity]}``.

  Raises:
    CapacityError: naming every record whose capacity was too small.

  >>> import jax.numpy as jnp
  >>> check_capacity({"000 SparseConv3d": jnp.array([10, 16])})  # fits: returns None
  """
  records: Mapping[str, Any] = x if isinstance(x, Mapping) else x.overflow
  short = []
  for label, record in records.items():
    needed, capacity = (int(v) for v in np.asarray(record))
    if needed > capacity:
      short.append(
        f"{label}: needed {needed} rows but its capacity is {capacity}; set it (a layer's "
        f"out_capacity, the capacity of from_dense or sparse_add, PointToVoxel's max_num_voxels) "
        f">= {needed} (e.g. jsparse.round_capacity({needed}) = {round_capacity(needed)})"
      )
  if short:
    raise CapacityError("rows were dropped for lack of capacity:\n  " + "\n  ".join(short))


def round_capacity(n: int, minimum: int = 16) -> int:
  """Rounds a capacity up to the next bucket ``2**k`` or ``3 * 2**(k - 1)``.

  Every distinct capacity is a new jit compilation; scans vary in size, so rounding to these
  buckets bounds the number of compilations while wasting at most a third of the rows.

  >>> [round_capacity(n) for n in (1, 17, 25, 1000, 1025)]
  [16, 24, 32, 1024, 1536]
  """
  n = max(int(n), minimum)
  power = 1 << math.ceil(math.log2(n))
  three_halves = 3 * power // 4
  return three_halves if three_halves >= n else power
