"""Sparse pooling over a kernel map, and global pooling of each batch sample.

Max pooling returns the true maximum over the active inputs of each output site (spconv clamps
at 0, its issue 754; jsparse does not). Its gradient goes to one input per (output, channel):
the first kernel tap, in row-major kernel order, that holds the maximum. Average pooling divides
by the number of active inputs, not by the kernel volume. Both are output-stationary in both
directions (the gradients read the transposed map), with FFI kernels (``xla_ffi/cpu/pool.cc``,
``xla_ffi/cuda/pool.cu``)
and a jnp reference that performs the same float32 operations in the same order, so the two
backends agree bitwise.

Global pools reduce each sample's active rows to a dense ``[batch_size, C]``; a sample without
active rows gives 0. The global max sends its gradient to the lowest active row holding the
maximum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsparse import _ffi
from jsparse.ops import _backend
from jsparse.ops._gather import gather_rows
from jsparse.ops._kmap import IndicePairs
from jsparse.ops._varying import vary_like


def _check(features: jax.Array, pairs: IndicePairs, op: str) -> None:
  if features.ndim != 2 or features.shape[0] != pairs.in_indices.shape[0]:
    raise ValueError(
      f"{op}: features must be [capacity_in, C] = [{pairs.in_indices.shape[0]}, C] to match the "
      f"kernel map, got shape {features.shape}"
    )
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f"{op}: features must be floating point, got {features.dtype}")


def _scan_taps(step, init, nbr: jax.Array, data: jax.Array):
  """Folds ``step(carry, (rows, k))`` over the taps of ``nbr [N, K]`` in kernel order; the
  carry ``init`` varies like ``data``, the values the steps gather."""
  taps = jnp.arange(nbr.shape[1], dtype=jnp.int32)
  init = jax.tree.map(lambda a: vary_like(a, nbr, data), init)
  return lax.scan(lambda carry, xs: (step(carry, xs), None), init, (nbr.T, taps))[0]


# ---- max pooling ----


def _max_reference(x, nbr):
  n, c = nbr.shape[0], x.shape[1]

  def step(carry, tap):
    best, arg = carry
    rows, k = tap
    v = gather_rows(x, rows).astype(jnp.float32)
    take = (rows >= 0)[:, None] & ((arg < 0) | (v > best))  # strictly greater: first maximum wins
    return jnp.where(take, v, best), jnp.where(take, k, arg)

  init = (jnp.zeros((n, c), jnp.float32), jnp.full((n, c), -1, jnp.int32))
  best, arg = _scan_taps(step, init, nbr, x)
  return jnp.where(arg >= 0, best, 0).astype(x.dtype), arg


def _max_grad_reference(dy, arg, nbr_t):
  def step(acc, tap):
    rows, k = tap
    hit = gather_rows(arg, rows) == k  # gather_rows gives 0 for rows == -1: mask those too
    hit = hit & (rows >= 0)[:, None]
    return acc + jnp.where(hit, gather_rows(dy, rows).astype(jnp.float32), 0.0)

  acc = jnp.zeros((nbr_t.shape[0], dy.shape[1]), jnp.float32)
  return _scan_taps(step, acc, nbr_t, dy).astype(dy.dtype)


def _max_pool_with_arg(x, nbr):
  outputs = (
    jax.ShapeDtypeStruct((nbr.shape[0], x.shape[1]), x.dtype),
    jax.ShapeDtypeStruct((nbr.shape[0], x.shape[1]), jnp.int32),
  )
  target = "jsparse_pool_max"
  return _backend.dispatch(target, lambda *a: _ffi.call(target, outputs, *a), _max_reference, x, nbr)


def _max_pool_grad(dy, arg, nbr_t):
  out = jax.ShapeDtypeStruct((nbr_t.shape[0], dy.shape[1]), dy.dtype)
  target = "jsparse_pool_max_grad"
  return _backend.dispatch(target, lambda *a: _ffi.call(target, out, *a), _max_grad_reference, dy, arg, nbr_t)


@jax.custom_vjp
def _max_pool(x, nbr, nbr_t):
  return _max_pool_with_arg(x, nbr)[0]


def _max_pool_fwd(x, nbr, nbr_t):
  out, arg = _max_pool_with_arg(x, nbr)
  return out, (arg, nbr_t)


def _max_pool_bwd(residuals, dy):
  arg, nbr_t = residuals
  return _max_pool_grad(dy, arg, nbr_t), None, None


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _sparse_max_pool(features: jax.Array, pairs: IndicePairs) -> jax.Array:
  return _max_pool(features, pairs.nbr, pairs.transpose_nbr)


_sparse_max_pool_jit = _backend.jit(_sparse_max_pool)


def sparse_max_pool(features: jax.Array, pairs: IndicePairs) -> jax.Array:
  """Max over the active inputs that each output row reads through the kernel map ``pairs``.

  Args:
    features: ``[capacity_in, C]`` floating point; rows match ``pairs.in_indices``.
    pairs: a kernel map, usually of kind ``"pool"`` (see :func:`jsparse.ops.build_map`).

  Returns:
    ``[capacity_out, C]`` in ``features.dtype``: the true maximum (negative values stay
    negative); 0 at rows without active inputs (padding rows). The gradient goes to the first
    kernel tap, in row-major kernel order, that holds the maximum.

  >>> import jax.numpy as jnp
  >>> from jsparse import ops
  >>> idx = jnp.array([[0, 0], [0, 1], [0, 3]], jnp.int32)
  >>> pairs = ops.build_map(idx, ops.make_spec("pool", (4,), 2, 2), 1, out_capacity=2)
  >>> ops.sparse_max_pool(jnp.array([[-1.0], [-2.0], [-3.0]]), pairs).ravel().tolist()
  [-1.0, -3.0]
  """
  _check(features, pairs, "sparse_max_pool")
  return _sparse_max_pool_jit(features, pairs)


# ---- average pooling ----


def _reciprocal(counts):
  """float32 ``1 / counts`` (at least 1): means multiply by it, in both backends, so they round alike."""
  return 1.0 / jnp.maximum(counts, 1).astype(jnp.float32)


def _avg_reference(x, nbr, counts):
  acc = jnp.zeros((nbr.shape[0], x.shape[1]), jnp.float32)
  acc = _scan_taps(lambda acc, tap: acc + gather_rows(x, tap[0]).astype(jnp.float32), acc, nbr, x)
  return (acc * _reciprocal(counts)[:, None]).astype(x.dtype)


def _gather_sum_reference(scaled, nbr_t, dtype):
  acc = jnp.zeros((nbr_t.shape[0], scaled.shape[1]), jnp.float32)
  return _scan_taps(lambda acc, tap: acc + gather_rows(scaled, tap[0]), acc, nbr_t, scaled).astype(dtype)


def _avg_pool_forward(x, nbr, counts):
  out = jax.ShapeDtypeStruct((nbr.shape[0], x.shape[1]), x.dtype)
  target = "jsparse_pool_avg"
  return _backend.dispatch(target, lambda *a: _ffi.call(target, out, *a), _avg_reference, x, nbr, counts)


def _avg_pool_grad(dy, counts, nbr_t):
  # The scaling is one XLA op shared by both backends; the kernels only gather and sum.
  scaled = dy.astype(jnp.float32) * _reciprocal(counts)[:, None]
  out = jax.ShapeDtypeStruct((nbr_t.shape[0], dy.shape[1]), dy.dtype)
  target = "jsparse_pool_avg_grad"
  reference = lambda s, n: _gather_sum_reference(s, n, dy.dtype)  # noqa: E731
  return _backend.dispatch(target, lambda *a: _ffi.call(target, out, *a), reference, scaled, nbr_t)


@jax.custom_vjp
def _avg_pool(x, nbr, nbr_t, counts):
  return _avg_pool_forward(x, nbr, counts)


def _avg_pool_fwd(x, nbr, nbr_t, counts):
  return _avg_pool_forward(x, nbr, counts), (counts, nbr_t)


def _avg_pool_bwd(residuals, dy):
  counts, nbr_t = residuals
  return _avg_pool_grad(dy, counts, nbr_t), None, None, None


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def _sparse_avg_pool(features: jax.Array, pairs: IndicePairs) -> jax.Array:
  counts = jnp.sum(pairs.nbr >= 0, axis=1, dtype=jnp.int32)
  return _avg_pool(features, pairs.nbr, pairs.transpose_nbr, counts)


_sparse_avg_pool_jit = _backend.jit(_sparse_avg_pool)


def sparse_avg_pool(features: jax.Array, pairs: IndicePairs) -> jax.Array:
  """Mean over the active inputs that each output row reads through the kernel map ``pairs``.

  Args:
    features: ``[capacity_in, C]`` floating point; rows match ``pairs.in_indices``.
    pairs: a kernel map, usually of kind ``"pool"``.

  Returns:
    ``[capacity_out, C]`` in ``features.dtype`` (float32 accumulation): the sum over active
    inputs divided by their number (not by the kernel volume); 0 at padding rows.
  """
  _check(features, pairs, "sparse_avg_pool")
  return _sparse_avg_pool_jit(features, pairs)


# ---- global pooling ----


def _segments(indices: jax.Array, batch_size: int) -> jax.Array:
  """The sample of each row, ``batch_size`` for padding rows (a segment that is dropped)."""
  batch = indices[:, 0]
  return jnp.where((batch >= 0) & (batch < batch_size), batch, batch_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _global_max(features, segments, batch_size):
  return _global_max_fwd(features, segments, batch_size)[0]


def _global_max_fwd(features, segments, batch_size):
  x = features.astype(jnp.float32)
  best = jax.ops.segment_max(x, segments, batch_size + 1)
  rows = jnp.arange(features.shape[0], dtype=jnp.int32)[:, None]
  is_max = (x == best[segments]) & (segments < batch_size)[:, None]
  first = jax.ops.segment_min(jnp.where(is_max, rows, features.shape[0]), segments, batch_size + 1)
  out = jnp.where(first[:batch_size] < features.shape[0], best[:batch_size], 0)
  return out.astype(features.dtype), (segments, first)


def _global_max_bwd(batch_size, residuals, dy):
  segments, first = residuals
  rows = jnp.arange(segments.shape[0], dtype=jnp.int32)[:, None]
  dy = jnp.concatenate([dy, jnp.zeros((1, dy.shape[1]), dy.dtype)])  # the padding segment
  return jnp.where(rows == first[segments], dy[segments], 0).astype(dy.dtype), None


_global_max.defvjp(_global_max_fwd, _global_max_bwd)


def _check_global(features: jax.Array, indices: jax.Array, op: str) -> None:
  if features.ndim != 2 or indices.ndim != 2 or features.shape[0] != indices.shape[0]:
    raise ValueError(
      f"{op}: features [N, C] and indices [N, 1 + ndim] must have the same number of rows, got "
      f"shapes {features.shape} and {indices.shape}"
    )
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f"{op}: features must be floating point, got {features.dtype}")
  if features.shape[0] > np.iinfo(np.int32).max:
    raise ValueError(f"{op}: {features.shape[0]} rows, but rows are numbered with int32 (at most 2**31 - 1)")


def global_max_pool(features: jax.Array, indices: jax.Array, batch_size: int) -> jax.Array:
  """Per-sample maximum over the active rows.

  Args:
    features: ``[N, C]`` floating point.
    indices: int32 ``[N, 1 + ndim]``; column 0 is the sample, -1 for padding rows.
    batch_size: static number of samples.

  Returns:
    ``[batch_size, C]`` in ``features.dtype``; 0 for samples without active rows. The gradient
    goes to the lowest active row that holds the maximum.

  >>> import jax.numpy as jnp
  >>> idx = jnp.array([[0, 1], [1, 2], [0, 3], [-1, -1]], jnp.int32)
  >>> global_max_pool(jnp.array([[-1.0], [2.0], [-3.0], [9.0]]), idx, 3).ravel().tolist()
  [-1.0, 2.0, 0.0]
  """
  _check_global(features, indices, "global_max_pool")
  return _global_max(features, _segments(indices, batch_size), batch_size)


def global_avg_pool(features: jax.Array, indices: jax.Array, batch_size: int) -> jax.Array:
  """Per-sample mean over the active rows: ``[N, C]`` -> ``[batch_size, C]`` (0 when empty).

  Args:
    features: ``[N, C]`` floating point.
    indices: int32 ``[N, 1 + ndim]``; column 0 is the sample, -1 for padding rows.
    batch_size: static number of samples.
  """
  _check_global(features, indices, "global_avg_pool")
  segments = _segments(indices, batch_size)
  sums = jax.ops.segment_sum(features.astype(jnp.float32), segments, batch_size + 1)[:batch_size]
  counts = jax.ops.segment_sum(jnp.ones_like(segments), segments, batch_size + 1)[:batch_size]
  return (sums / jnp.maximum(counts, 1).astype(jnp.float32)[:, None]).astype(features.dtype)
