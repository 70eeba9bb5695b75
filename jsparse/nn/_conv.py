"""Sparse convolution layers with spconv's names and arguments, as Flax NNX modules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax import lax

from jsparse import ops
from jsparse._porting import explains_spconv_arguments
from jsparse.nn._base import BuildsMap, IntOrSeq, SparseModule
from jsparse.tensor import SparseConvTensor, inverse_kernel_map


def _truncated_normal_draw(key: jax.Array, size: int) -> jax.Array:
  """float32 ``[size]`` standard normals truncated to [-2, 2]."""
  return jax.random.truncated_normal(key, -2.0, 2.0, (size,), jnp.float32)


_truncated_normal_draw = jax.jit(_truncated_normal_draw, static_argnums=1)


def lecun_normal(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """The default kernel initializer: Flax's ``lecun_normal`` (a normal truncated at two standard
  deviations, variance ``1 / fan_in`` with ``fan_in = prod(shape[:-1])``), drawn as the first
  ``prod(shape)`` of a draw whose size is a power of two. Kernels of many shapes then share a few
  compiled samplers: a model such as MinkUNet builds in seconds instead of compiling a sampler for
  each of its kernel shapes (about half a second each on a small CPU). The values differ from
  ``nnx.initializers.lecun_normal()``'s for the same key; pass that as ``kernel_init`` for those."""
  size = math.prod(shape)
  draw = _truncated_normal_draw(key, 1 << max(size - 1, 0).bit_length())[:size]
  fan_in = max(1, math.prod(shape[:-1]))
  stddev = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # the truncated normal's own deviation
  return (draw * stddev).reshape(tuple(shape)).astype(dtype)


default_kernel_init = lecun_normal
default_bias_init = nnx.initializers.zeros_init()


class _Conv(SparseModule):
  """Parameters and the feature computation shared by every convolution layer."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrSeq,
    groups: int,
    bias: bool,
    *,
    num_spatial_dims: int | None,
    dtype: Any,
    param_dtype: Any,
    precision: lax.PrecisionLike,
    kernel_init: nnx.Initializer,
    bias_init: nnx.Initializer,
    rngs: nnx.Rngs,
  ):
    if in_channels % groups or out_channels % groups:
      raise ValueError(
        f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}"
      )
    n = self._set_spatial_dims(num_spatial_dims)
    self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
    self.kernel_size = ops.ntuple(kernel_size, n, "kernel_size")
    self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
    shape = (*self.kernel_size, in_channels // groups, out_channels)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
    if bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,), param_dtype))
    else:
      self.bias = nnx.data(None)

  def _check_conv_input(self, x: Any) -> None:
    self._check_input(x, self._label())
    if x.features.shape[1] != self.in_channels:
      raise ValueError(
        f"{self._label()} expects {self.num_spatial_dims} spatial dims and {self.in_channels} "
        f"channels, got a tensor over {x.spatial_shape} with {x.features.shape[1]} channels"
      )

  def _label(self) -> str:
    return f"{type(self).__name__}({self.in_channels}->{self.out_channels}, k={self.kernel_size})"

  def _convolve(
    self, x: SparseConvTensor, pairs: ops.IndicePairs, spatial_shape, indice_dict, overflow
  ) -> SparseConvTensor:
    bias = None if self.bias is None else self.bias[...]
    features, kernel, bias = dtypes.promote_dtype((x.features, self.kernel[...], bias), dtype=self.dtype)
    out = ops.sparse_conv(features, kernel, pairs, bias, groups=self.groups, precision=self.precision)
    return x.replace(
      features=out,
      indices=pairs.out_indices,
      spatial_shape=spatial_shape,
      indice_dict=indice_dict,
      overflow=overflow,
    )


class _MapBuildingConv(_Conv, BuildsMap):
  """A convolution that finds or builds its kernel map from its own geometry."""

  _kind = ""

  @explains_spconv_arguments
  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    bias: bool = True,
    indice_key: str | None = None,
    *,
    num_spatial_dims: int | None = None,
    out_capacity: int | None = None,
    capacity_ratio: float | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: lax.PrecisionLike = None,
    kernel_init: nnx.Initializer = default_kernel_init,
    bias_init: nnx.Initializer = default_bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_channels, out_channels, kernel_size, groups, bias, num_spatial_dims=num_spatial_dims,
      dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
      bias_init=bias_init, rngs=rngs,
    )  # fmt: skip
    self._set_window(stride, padding, dilation, indice_key, out_capacity, capacity_ratio)

  def _label(self) -> str:
    return f"{type(self).__name__}({self.in_channels}->{self.out_channels}, {self._window_label()})"

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    """Convolves ``x``: features ``[capacity_in, C_in]`` -> ``[capacity_out, C_out]``."""
    self._check_conv_input(x)
    spec, pairs, indice_dict, overflow = self._window_map(x, self._kind, self._label())
    return self._convolve(x, pairs, spec.out_spatial_shape, indice_dict, overflow)


_ARGS_DOC = """
  Args:
    in_channels: ``C_in``.
    out_channels: ``C_out``.
    kernel_size: int or one int per axis.
    stride: int or per axis.
    padding: int or per axis (zeros beyond the grid).
    dilation: int or per axis.
    groups: channel groups; ``C_in`` and ``C_out`` must be divisible by it.
    bias: whether to add a bias (at active output sites only).
    indice_key: stores the kernel map in the output's ``indice_dict`` under this key, or reuses
      the map already stored there (the geometry must match).
    num_spatial_dims: the number of spatial axes; fixed by the 1d-4d classes (``SparseConv3d``),
      required by the generic one.
    out_capacity: static output row count under jit, for layers that create sites (see
      :func:`jsparse.check_capacity`); eagerly ``None`` sizes the output to fit.
    capacity_ratio: when ``out_capacity`` is None, the output capacity under jit as a multiple
      of the input's (default: 2 for windows that overlap, 1 for windows that do not,
      ``prod(stride)`` for transposed layers; see :func:`jsparse.ops.default_capacity`).
    dtype: computation dtype (default: promoted from inputs and parameters).
    param_dtype: parameter dtype.
    precision: matmul precision, as for ``lax.conv`` (``None``: the platform default).
    kernel_init: initializer of ``kernel [*kernel_size, C_in // groups, C_out]``.
    bias_init: initializer of ``bias [C_out]``.
    rngs: random state for the initializers.
"""


class SparseConv(_MapBuildingConv):
  __doc__ = (
    """Sparse convolution: dense ``lax.conv_general_dilated`` sampled at the active outputs.

  An output site is active iff some kernel tap reaches an active input; the output grid has
  ``(n + 2p - d(k - 1) - 1) // s + 1`` cells per axis and its rows are sorted by (batch, coords).
  Eagerly the output is sized to fit; under jit its capacity is ``out_capacity`` (default: twice
  the input's capacity where the windows overlap, as for k3 s2, else the input's; see
  ``capacity_ratio``).
"""
    + _ARGS_DOC
    + """
  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> x = jsparse.SparseConvTensor(np.ones((3, 4), np.float32),
  ...     np.array([[0, 0, 0, 0], [0, 1, 2, 3], [0, 4, 4, 4]], np.int32), (5, 5, 5), 1)
  >>> y = jsparse.nn.SparseConv3d(4, 8, 3, stride=2, padding=1, rngs=nnx.Rngs(0))(x)
  >>> y.spatial_shape, y.features.shape
  ((3, 3, 3), (6, 8))
"""
  )
  _kind = "conv"


class SubMConv(_MapBuildingConv):
  __doc__ = (
    """Submanifold convolution: outputs at exactly the input sites, same rows and order.

  Stride and padding are ignored (as in spconv); the padding is ``(k // 2) * d`` per axis, so an
  odd kernel is centred and an even kernel ``2m`` reaches ``m`` taps back and ``m - 1`` forward.
  Layers with the same ``indice_key`` share one map.
"""
    + _ARGS_DOC
  )
  _kind = "subm"


class SparseConvTranspose(_MapBuildingConv):
  __doc__ = (
    """Transposed sparse convolution: input ``p`` feeds output ``p * s - pad + k * d``.

  Equals the dense transposed convolution sampled at the reached sites. The output grid has
  ``(n - 1)s - 2p + d(k - 1) + 1`` cells per axis (spconv omits the dilation term and drops
  sites; jsparse does not). Under jit the default ``out_capacity`` is the input capacity times
  ``prod(stride)``.
"""
    + _ARGS_DOC
  )
  _kind = "transpose"


class SparseInverseConv(_Conv):
  """Inverse of the strided layer that stored ``indice_key``: back to that layer's input sites.

  The output rows are that layer's input rows (same order), over its input grid; the value is the
  transposed convolution of ``x`` through the stored map. ``kernel_size`` must equal the stored
  layer's.

  Args:
    in_channels: ``C_in`` (the stored layer's output side).
    out_channels: ``C_out``.
    kernel_size: the stored layer's kernel size.
    indice_key: the key the strided layer stored its map under.
    bias: whether to add a bias at every output site.
    num_spatial_dims, dtype, param_dtype, precision, kernel_init, bias_init, rngs: as
      :class:`SparseConv`.
  """

  @explains_spconv_arguments
  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrSeq,
    indice_key: str,
    bias: bool = True,
    *,
    num_spatial_dims: int | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    precision: lax.PrecisionLike = None,
    kernel_init: nnx.Initializer = default_kernel_init,
    bias_init: nnx.Initializer = default_bias_init,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      in_channels, out_channels, kernel_size, 1, bias, num_spatial_dims=num_spatial_dims,
      dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
      bias_init=bias_init, rngs=rngs,
    )  # fmt: skip
    self.indice_key = indice_key

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    """Maps ``x`` (the stored layer's output sites) back to that layer's input sites."""
    self._check_conv_input(x)
    pairs = inverse_kernel_map(x, self.indice_key, self.kernel_size, self._label())
    return self._convolve(x, pairs, pairs.spec.in_spatial_shape, x.indice_dict, x.overflow)


class SparseConv1d(SparseConv):
  """1-D :class:`SparseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 1


class SparseConv2d(SparseConv):
  """2-D :class:`SparseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 2


class SparseConv3d(SparseConv):
  """3-D :class:`SparseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 3


class SparseConv4d(SparseConv):
  """4-D :class:`SparseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 4


class SubMConv1d(SubMConv):
  """1-D :class:`SubMConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 1


class SubMConv2d(SubMConv):
  """2-D :class:`SubMConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 2


class SubMConv3d(SubMConv):
  """3-D :class:`SubMConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 3


class SubMConv4d(SubMConv):
  """4-D :class:`SubMConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 4


class SparseConvTranspose1d(SparseConvTranspose):
  """1-D :class:`SparseConvTranspose`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 1


class SparseConvTranspose2d(SparseConvTranspose):
  """2-D :class:`SparseConvTranspose`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 2


class SparseConvTranspose3d(SparseConvTranspose):
  """3-D :class:`SparseConvTranspose`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 3


class SparseConvTranspose4d(SparseConvTranspose):
  """4-D :class:`SparseConvTranspose`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 4


class SparseInverseConv1d(SparseInverseConv):
  """1-D :class:`SparseInverseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 1


class SparseInverseConv2d(SparseInverseConv):
  """2-D :class:`SparseInverseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 2


class SparseInverseConv3d(SparseInverseConv):
  """3-D :class:`SparseInverseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 3


class SparseInverseConv4d(SparseInverseConv):
  """4-D :class:`SparseInverseConv`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 4
