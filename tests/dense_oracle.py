"""Dense oracles: every sparse layer equals a jax.lax dense computation sampled at its sites."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_SPATIAL = "XYZW"


def _dimension_numbers(ndim: int) -> tuple[str, str, str]:
  s = _SPATIAL[:ndim]
  return f"N{s}C", f"{s}IO", f"N{s}C"


def conv(dense, kernel, stride, padding, dilation, groups=1):
  """Cross-correlation of channels-last ``dense [B, *S, C]`` with ``kernel [*k, C/g, O]``."""
  ndim = dense.ndim - 2
  return lax.conv_general_dilated(
    dense,
    kernel,
    window_strides=stride,
    padding=[(p, p) for p in padding],
    rhs_dilation=dilation,
    dimension_numbers=_dimension_numbers(ndim),
    feature_group_count=groups,
    precision=lax.Precision.HIGHEST,
  )


def subm_conv(dense, kernel, dilation, groups=1):
  """Same-size convolution with spconv's submanifold padding ``(k // 2) * d`` before each axis."""
  ksize = kernel.shape[:-2]
  pads = [((k // 2) * d, (k - 1) * d - (k // 2) * d) for k, d in zip(ksize, dilation)]
  return lax.conv_general_dilated(
    dense,
    kernel,
    window_strides=(1,) * len(ksize),
    padding=pads,
    rhs_dilation=dilation,
    dimension_numbers=_dimension_numbers(len(ksize)),
    feature_group_count=groups,
    precision=lax.Precision.HIGHEST,
  )


def conv_transpose(dense, kernel, stride, padding, dilation, groups=1, out_shape=None):
  """``out[p * s - pad + k * d] += in[p] @ W[k]``.

  The output has ``(n - 1)s - 2p + d(k - 1) + 1`` cells per axis, or ``out_shape`` (extra cells
  at the high end, as PyTorch's ``output_padding``; the inverse of a strided conv needs them).
  """
  ksize = kernel.shape[:-2]
  flipped = kernel[tuple(slice(None, None, -1) for _ in ksize)]
  pads = [((k - 1) * d - p,) * 2 for k, d, p in zip(ksize, dilation, padding)]
  if out_shape is not None:
    nominal = [
      (n - 1) * s - 2 * p + d * (k - 1) + 1
      for n, s, p, d, k in zip(dense.shape[1:-1], stride, padding, dilation, ksize)
    ]
    pads = [(lo, hi + m - n) for (lo, hi), m, n in zip(pads, out_shape, nominal)]
  # Negative padding crops; do it as a slice of a non-negatively padded result.
  out = lax.conv_general_dilated(
    dense,
    flipped,
    window_strides=(1,) * len(ksize),
    padding=[(max(lo, 0), max(hi, 0)) for lo, hi in pads],
    lhs_dilation=stride,
    rhs_dilation=dilation,
    dimension_numbers=_dimension_numbers(len(ksize)),
    feature_group_count=groups,
    precision=lax.Precision.HIGHEST,
  )
  crop = [slice(max(-lo, 0), n - max(-hi, 0)) for (lo, hi), n in zip(pads, out.shape[1:-1])]
  return out[(slice(None), *crop)]


def sample(dense, indices):
  """Rows of channels-last ``dense`` at ``indices [n, 1 + ndim]`` (all active)."""
  return dense[tuple(jnp.asarray(indices).T)]


def reached_sites(occupancy, ksize, stride, padding, dilation, transposed=False):
  """Sorted int32 sites ``[n, 1 + ndim]`` where a tap reaches an occupied cell of ``occupancy [B, *S]``."""
  x = jnp.asarray(occupancy, jnp.float32)[..., None]
  ones = jnp.ones((*ksize, 1, 1), jnp.float32)
  if transposed:
    hits = conv_transpose(x, ones, stride, padding, dilation)
  else:
    hits = conv(x, ones, stride, padding, dilation)
  return np.argwhere(np.asarray(hits[..., 0]) > 0).astype(np.int32)
