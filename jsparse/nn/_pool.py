"""Pooling layers with spconv's names: max and average over a kernel window, and global pools."""

from __future__ import annotations

import jax

from jsparse import ops
from jsparse._porting import explains_spconv_arguments
from jsparse.nn._base import BuildsMap, IntOrSeq, SparseModule
from jsparse.tensor import SparseConvTensor


class _Pool(SparseModule, BuildsMap):
  """A window pool: the active set of a ``SparseConv`` with the same geometry, one map per layer."""

  _pool = staticmethod(ops.sparse_max_pool)

  @explains_spconv_arguments
  def __init__(
    self,
    kernel_size: IntOrSeq,
    stride: IntOrSeq | None = None,
    padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
    indice_key: str | None = None,
    subm: bool = False,
    *,
    num_spatial_dims: int | None = None,
    out_capacity: int | None = None,
    capacity_ratio: float | None = None,
  ):
    n = self._set_spatial_dims(num_spatial_dims)
    self.kernel_size = ops.ntuple(kernel_size, n, "kernel_size")
    self.subm = bool(subm)
    stride = 1 if subm else self.kernel_size if stride is None else stride
    self._set_window(stride, padding, dilation, indice_key, out_capacity, capacity_ratio)
    if self.subm:  # the geometry ops.make_spec("subm", ...) uses
      self.padding = tuple((k // 2) * d for k, d in zip(self.kernel_size, self.dilation))

  def _label(self) -> str:
    return f"{type(self).__name__}({self._window_label()})"

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    """Pools ``x``: features ``[capacity_in, C]`` -> ``[capacity_out, C]``."""
    self._check_input(x, self._label())
    spec, pairs, indice_dict, overflow = self._window_map(x, "subm" if self.subm else "pool", self._label())
    return x.replace(
      features=type(self)._pool(x.features, pairs),
      indices=pairs.out_indices,
      spatial_shape=spec.out_spatial_shape,
      indice_dict=indice_dict,
      overflow=overflow,
    )


_POOL_ARGS = """
  An output site is active iff the window reaches an active input, as for ``SparseConv`` with the
  same geometry; rows are sorted by (batch, coords). The map is stored under ``indice_key``, so a
  ``SparseInverseConv`` with that key maps back to the input sites. With ``subm=True`` the pool
  is submanifold: the outputs are the input sites, in their rows, each pooling the window centred
  on it (stride 1, padding ``(kernel_size // 2) * dilation``, as for ``SubMConv``). spconv takes
  the same argument, but its CPU path (2.3.8) ignores it and pools as a strided layer.

  Args:
    kernel_size: int or one int per axis.
    stride: int or per axis; ``None`` (the default) means ``kernel_size``.
    padding: int or per axis.
    dilation: int or per axis.
    indice_key: stores the map in the output's ``indice_dict`` under this key (or reuses it).
    subm: pool over the input sites (see above); ``stride`` and ``padding`` are then ignored.
    num_spatial_dims: the number of spatial axes; fixed by the 1d-4d classes
      (``SparseMaxPool3d``), required by the generic one.
    out_capacity: static output row count (see :func:`jsparse.check_capacity`); eagerly ``None``
      sizes the output to fit.
    capacity_ratio: when ``out_capacity`` is None, the output capacity under jit as a multiple
      of the input's (default: 2 for windows that overlap, else 1; see
      :func:`jsparse.ops.default_capacity`).
"""


class SparseMaxPool(_Pool):
  __doc__ = (
    """Max pooling: the true maximum over each window's active inputs (spconv clamps at 0).

  The gradient goes to one input per output and channel: the first kernel tap, in row-major
  kernel order, that holds the maximum.
"""
    + _POOL_ARGS
    + """
  >>> import numpy as np, jsparse
  >>> x = jsparse.SparseConvTensor(-np.ones((2, 3), np.float32),
  ...     np.array([[0, 0, 0], [0, 3, 3]], np.int32), (4, 4), 1)
  >>> y = jsparse.nn.SparseMaxPool2d(2)(x)
  >>> y.spatial_shape, y.to_numpy()[0].tolist()
  ((2, 2), [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
"""
  )
  _pool = staticmethod(ops.sparse_max_pool)


class SparseAvgPool(_Pool):
  __doc__ = (
    """Average pooling: the mean over each window's active inputs (not over the kernel volume).
"""
    + _POOL_ARGS
  )
  _pool = staticmethod(ops.sparse_avg_pool)


class SparseGlobalMaxPool(SparseModule):
  """Per-sample max over the active sites: ``[capacity, C]`` -> dense ``[batch_size, C]``.

  A sample without active sites gives 0. The gradient goes to the lowest active row that holds
  the maximum.
  """

  def __call__(self, x: SparseConvTensor) -> jax.Array:
    self._check_input(x, type(self).__name__)
    return ops.global_max_pool(x.features, x.indices, x.batch_size)


class SparseGlobalAvgPool(SparseModule):
  """Per-sample mean over the active sites: ``[capacity, C]`` -> dense ``[batch_size, C]`` (0 if empty)."""

  def __call__(self, x: SparseConvTensor) -> jax.Array:
    self._check_input(x, type(self).__name__)
    return ops.global_avg_pool(x.features, x.indices, x.batch_size)


class SparseMaxPool1d(SparseMaxPool):
  """1-D :class:`SparseMaxPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 1


class SparseMaxPool2d(SparseMaxPool):
  """2-D :class:`SparseMaxPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 2


class SparseMaxPool3d(SparseMaxPool):
  """3-D :class:`SparseMaxPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 3


class SparseMaxPool4d(SparseMaxPool):
  """4-D :class:`SparseMaxPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 4


class SparseAvgPool1d(SparseAvgPool):
  """1-D :class:`SparseAvgPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 1


class SparseAvgPool2d(SparseAvgPool):
  """2-D :class:`SparseAvgPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 2


class SparseAvgPool3d(SparseAvgPool):
  """3-D :class:`SparseAvgPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 3


class SparseAvgPool4d(SparseAvgPool):
  """4-D :class:`SparseAvgPool`: its arguments without ``num_spatial_dims``."""

  num_spatial_dims = 4
