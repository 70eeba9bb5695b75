"""Sparse convolution over a kernel map: gather, multiply by each tap's weights, accumulate.

Output-stationary: output row ``o`` sums ``features[nbr[o, k]] @ kernel[k]`` over taps ``k``,
accumulating in float32. The VJP reads the transposed map for the input gradient (again one
writer per row, no scatter-add) and reduces the kernel gradient tap by tap, so results do not
depend on scheduling. Each direction has FFI kernels (``xla_ffi/cpu/conv.cc``: fused
gather-GEMM-scatter, threaded; ``xla_ffi/cuda/conv.cu``: tiled gather-GEMM, chunked kernel
gradient) and a jnp reference, chosen by :func:`jsparse.backend`; on CPU, float32 submanifold
layers get both gradients from one pass over the map.
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


def _grouped_matmul(x: jax.Array, w: jax.Array, groups: int, precision) -> jax.Array:
  """``[N, G * a] x [a, G * b] -> float32 [N, G * b]``, group ``g`` using its own a and b slices."""
  n = x.shape[0]
  a, gb = w.shape
  xg = x.reshape(n, groups, a)
  wg = w.reshape(a, groups, gb // groups)
  out = jnp.einsum("nga,agb->ngb", xg, wg, precision=precision, preferred_element_type=jnp.float32)
  return out.reshape(n, gb)


def _transpose_kernel(kernel: jax.Array, groups: int) -> jax.Array:
  """``[K, a, G * b] -> [K, b, G * a]``: the per-group transposed weights."""
  k, a, gb = kernel.shape
  b = gb // groups
  return kernel.reshape(k, a, groups, b).transpose(0, 3, 2, 1).reshape(k, b, groups * a)


def _gather_matmul(features, kernel, nbr, groups, precision) -> jax.Array:
  """float32 ``[M, C_out]``: sum over taps of ``features[nbr[:, k]] @ kernel[k]``."""

  def tap(acc, tap_args):
    rows, w = tap_args
    return acc + _grouped_matmul(gather_rows(features, rows), w, groups, precision), None

  acc = vary_like(jnp.zeros((nbr.shape[0], kernel.shape[2]), jnp.float32), features, kernel, nbr)
  acc, _ = lax.scan(tap, acc, (nbr.T, kernel))
  return acc


def _weight_grad_reference(features, d_out, nbr, groups, precision) -> jax.Array:
  """``[K, a, G * b]``: per tap, ``features[nbr[:, k]]^T @ d_out`` per group, reduced in order."""
  n, c_out = d_out.shape
  a = features.shape[1] // groups
  d_out_groups = d_out.reshape(n, groups, c_out // groups)

  def tap_grad(_, rows):
    xg = gather_rows(features, rows).reshape(n, groups, a)
    dw = jnp.einsum("nga,ngb->agb", xg, d_out_groups, precision=precision, preferred_element_type=jnp.float32)
    return None, dw.reshape(a, c_out).astype(features.dtype)

  return lax.scan(tap_grad, None, nbr.T)[1]


def _gather_gemm(features, kernel, nbr, groups, precision, reverse_taps=False) -> jax.Array:
  """``[M, C_out]`` in ``features.dtype``: sum over taps of ``features[nbr[:, k]] @ kernel[k]``,
  reading ``nbr[:, K - 1 - k]`` instead when ``reverse_taps`` (the transpose of an odd
  submanifold map, without materializing it).

  The FFI kernel always multiplies in full float32 (``precision`` only affects the reference).
  """
  out = jax.ShapeDtypeStruct((nbr.shape[0], kernel.shape[2]), features.dtype)
  target = "jsparse_conv_gather_gemm"
  return _backend.dispatch(
    target,
    lambda x, w, rows: _ffi.call(
      target, out, x, w, rows, groups=np.int64(groups), reverse_taps=np.int64(reverse_taps)
    ),
    lambda x, w, rows: _gather_matmul(
      x, w, rows[:, ::-1] if reverse_taps else rows, groups, precision
    ).astype(x.dtype),
    features,
    kernel,
    nbr,
  )


def _weight_grad(features, d_out, nbr, groups, precision, kernel_shape) -> jax.Array:
  """The kernel gradient ``[K, a, G * b]`` in ``features.dtype``."""
  out = jax.ShapeDtypeStruct(kernel_shape, features.dtype)
  target = "jsparse_conv_weight_grad"
  return _backend.dispatch(
    target,
    lambda x, dy, rows: _ffi.call(target, out, x, dy, rows, groups=np.int64(groups)),
    lambda x, dy, rows: _weight_grad_reference(x, dy, rows, groups, precision),
    features,
    d_out,
    nbr,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _conv(features, kernel, nbr, nbr_t, groups, precision):
  return _gather_gemm(features, kernel, nbr, groups, precision)


def _conv_fwd(features, kernel, nbr, nbr_t, groups, precision):
  return _conv(features, kernel, nbr, nbr_t, groups, precision), (features, kernel, nbr, nbr_t)


def _backward_symmetric(features, d_out, kernel_t, nbr, groups, precision, kernel_shape):
  """``(d_features, d_kernel)`` over an odd submanifold map, whose transpose is ``nbr`` with its
  taps reversed: one FFI call for both gradients (the kernel may share the pairs and the gathered
  ``d_out`` rows between them), or the reference path's two separate computations."""

  def reference(x, dy, w_t, rows):
    d_features = _gather_gemm(dy, w_t, rows, groups, precision, reverse_taps=True)
    return d_features, _weight_grad(x, dy, rows, groups, precision, kernel_shape)

  out = (
    jax.ShapeDtypeStruct(features.shape, features.dtype),
    jax.ShapeDtypeStruct(kernel_shape, features.dtype),
  )
  target = "jsparse_conv_backward_symmetric"
  return _backend.dispatch(
    target,
    lambda x, dy, w_t, rows: tuple(_ffi.call(target, out, x, dy, w_t, rows, groups=np.int64(groups))),
    reference,
    features,
    d_out,
    kernel_t,
    nbr,
  )


def _conv_bwd(groups, precision, residuals, d_out):
  features, kernel, nbr, nbr_t = residuals
  d_kernel_t = _transpose_kernel(kernel, groups)
  if nbr_t is None:  # odd submanifold map: the transpose is nbr with its taps reversed
    d_features, d_kernel = _backward_symmetric(
      features, d_out, d_kernel_t, nbr, groups, precision, kernel.shape
    )
  else:
    d_features = _gather_gemm(d_out, d_kernel_t, nbr_t, groups, precision)
    d_kernel = _weight_grad(features, d_out, nbr, groups, precision, kernel.shape)
  return d_features, d_kernel, None, None


_conv.defvjp(_conv_fwd, _conv_bwd)


def sparse_conv(
  features: jax.Array,
  kernel: jax.Array,
  pairs: IndicePairs,
  bias: jax.Array | None = None,
  *,
  groups: int = 1,
  precision: lax.PrecisionLike = None,
) -> jax.Array:
  """Sparse convolution of ``features`` over the kernel map ``pairs``.

  Args:
    features: ``[capacity_in, C_in]``; rows must match ``pairs.in_indices``.
    kernel: ``[*kernel_size, C_in // groups, C_out]`` (Flax's layout) or ``[K, C_in // groups,
      C_out]``, the same dtype as ``features``.
    pairs: the kernel map.
    bias: optional ``[C_out]``, added at active output rows only.
    groups: number of channel groups (``C_in`` and ``C_out`` divisible by it).
    precision: matmul precision of the reference path, as for ``lax.conv`` (``None``: the
      platform default, which is TF32 for float32 on recent NVIDIA GPUs; ``lax.Precision.HIGHEST``
      for full float32). The CPU FFI kernels always multiply and accumulate in full float32.

  Returns:
    ``[capacity_out, C_out]`` in ``features.dtype`` (float32 accumulation); padding rows are 0.

  >>> import jax.numpy as jnp
  >>> from jsparse import ops
  >>> idx = jnp.array([[0, 0, 0], [0, 1, 1]], jnp.int32)
  >>> pairs = ops.build_map(idx, ops.make_spec("subm", (4, 4), 3), 1)
  >>> ops.sparse_conv(jnp.ones((2, 8)), jnp.ones((3, 3, 8, 16)), pairs).shape
  (2, 16)
  """
  k_volume = pairs.spec.kernel_volume
  if features.ndim != 2 or features.shape[0] != pairs.in_indices.shape[0]:
    raise ValueError(
      f"features must be [capacity_in, C_in] = [{pairs.in_indices.shape[0]}, C_in] to match the "
      f"kernel map, got shape {features.shape}"
    )
  if kernel.shape[:-2] not in (pairs.spec.kernel_size, (k_volume,)):
    raise ValueError(
      f"kernel shape {kernel.shape} does not match the map's kernel_size "
      f"{pairs.spec.kernel_size}; expected {(*pairs.spec.kernel_size, 'C_in // groups', 'C_out')}"
    )
  c_in, c_out = features.shape[1], kernel.shape[-1]
  if c_in % groups or c_out % groups or kernel.shape[-2] * groups != c_in:
    raise ValueError(
      f"with groups={groups}, C_in={c_in} and C_out={c_out} must be divisible by groups and the "
      f"kernel's input axis must be C_in // groups = {c_in // groups}, got {kernel.shape[-2]}"
    )
  if kernel.dtype != features.dtype:
    raise ValueError(
      f"features ({features.dtype}) and kernel ({kernel.dtype}) must have one dtype; cast one "
      "of them (the nn layers do this with their dtype argument)"
    )
  return _sparse_conv(features, kernel, pairs, bias, groups, precision)


def _sparse_conv_impl(features, kernel, pairs, bias, groups, precision):
  kernel_flat = kernel.reshape(pairs.spec.kernel_volume, *kernel.shape[-2:])
  # Padding rows of a map have no pairs, so both backends already return 0 there: no masking
  # pass over the (often tens of MiB) output, and XLA writes the kernel's result in place.
  # Inside shard_map the kernel (replicated) meets per-shard features: it enters the custom VJP
  # varying like them, so that its gradient there has its type (JAX sums it over the shards).
  kernel_flat = vary_like(kernel_flat, features, pairs.nbr)
  out = _conv(features, kernel_flat, pairs.nbr, pairs.nbr_t, groups, precision)
  if bias is None:
    return out
  active = (pairs.out_indices[:, 0] >= 0)[:, None]
  return out + jnp.where(active, bias.astype(out.dtype)[None, :], jnp.zeros((), out.dtype))


_sparse_conv = _backend.jit(_sparse_conv_impl, static_argnames=("groups", "precision"))
