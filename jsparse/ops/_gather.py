"""Gathering rows by index, with -1 for "no row": the building block of maps and their transposes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """``x[rows]`` with zeros where ``rows`` is -1.

  Args:
    x: ``[N, C]``.
    rows: int32 ``[M]``: row indices into ``x``, or -1.

  Returns:
    ``[M, C]`` in ``x.dtype``. Its gradient scatter-adds into ``x`` (see
    :func:`gather_rows_transposed` for a gather-only gradient).

  >>> import jax.numpy as jnp
  >>> gather_rows(jnp.array([[1.0], [2.0]]), jnp.array([1, -1, 0])).ravel().tolist()
  [2.0, 0.0, 1.0]
  """
  if x.shape[0] == 0:
    return jnp.zeros((rows.shape[0], x.shape[1]), x.dtype)
  picked = jnp.take(x, jnp.maximum(rows, 0), axis=0, mode="clip")
  return jnp.where((rows >= 0)[:, None], picked, jnp.zeros((), x.dtype))


@jax.custom_vjp
def gather_rows_transposed(x: jax.Array, rows: jax.Array, rows_t: jax.Array) -> jax.Array:
  """:func:`gather_rows` whose gradient gathers too, through the transposed index ``rows_t``.

  For a one-to-one map (every row of ``x`` read at most once) the gradient of ``x[rows]`` is
  ``dy[rows_t]``, where ``rows_t [N]`` names the output row that reads each row of ``x`` (or -1):
  one writer per row, no scatter-add, so the gradient is deterministic on every backend.

  Args:
    x: ``[N, C]``.
    rows: int32 ``[M]``: row indices into ``x``, or -1; no index repeated.
    rows_t: int32 ``[N]``: ``rows_t[rows[m]] = m`` for every ``rows[m] >= 0``, -1 elsewhere.

  Returns:
    ``[M, C]`` in ``x.dtype``.
  """
  return gather_rows(x, rows)


def _gather_rows_transposed_fwd(x, rows, rows_t):
  return gather_rows(x, rows), rows_t


def _gather_rows_transposed_bwd(rows_t, dy):
  return gather_rows(dy, rows_t), None, None


gather_rows_transposed.defvjp(_gather_rows_transposed_fwd, _gather_rows_transposed_bwd)
