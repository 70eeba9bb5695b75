"""Loop carries inside ``jax.shard_map``: a carry must vary over the same mesh axes before and
after each iteration, so one created from shapes alone is cast to vary like the data it meets."""

from __future__ import annotations

import jax
from jax import lax


def _varying(a: jax.Array) -> frozenset:
  """The manual (shard_map) mesh axes ``a`` varies over; empty outside shard_map."""
  return jax.typeof(a).manual_axis_type.varying


def vary_like(x: jax.Array, *others: jax.Array) -> jax.Array:
  """``x``, made to vary over every shard_map axis that one of ``others`` varies over (``x``
  itself outside shard_map): an initial loop carry built from shapes alone (zeros, bounds) that
  the loop fills from per-shard data.

  >>> import jax.numpy as jnp
  >>> vary_like(jnp.zeros(3), jnp.ones(2)).tolist()  # outside shard_map: unchanged
  [0.0, 0.0, 0.0]
  """
  axes = frozenset().union(*map(_varying, others)) - _varying(x)
  return lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x
