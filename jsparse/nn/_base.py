"""What every sparse layer shares: the SparseModule base, the rank of a layer, window geometry."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from typing import Any

from flax import nnx

from jsparse import ops
from jsparse.tensor import SparseConvTensor, kernel_map

IntOrSeq = int | Sequence[int]

_capacity_keys = itertools.count()


class SparseModule(nnx.Module):
  """A layer that takes a :class:`SparseConvTensor` whole (not only its features).

  :class:`SparseSequential` passes such layers the whole tensor and any other callable only the
  features. Layers with a spatial rank read it from ``num_spatial_dims``: a class attribute of
  the 1d-4d classes (``SparseConv3d``: 3), an argument of the generic ones (``SparseConv``).
  """

  num_spatial_dims: int | None = None

  def _set_spatial_dims(self, num_spatial_dims: int | None) -> int:
    """Stores and returns the layer's rank: the class's, or ``num_spatial_dims`` if it has none."""
    fixed = type(self).num_spatial_dims
    name = type(self).__name__
    if fixed is None:
      if not isinstance(num_spatial_dims, int) or num_spatial_dims < 1:
        raise TypeError(
          f"{name} needs num_spatial_dims= (a positive int), got {num_spatial_dims!r}; or use its "
          f"fixed-rank classes ({name}1d to {name}4d)"
        )
      fixed = num_spatial_dims
    elif num_spatial_dims not in (None, fixed):
      raise ValueError(f"{name} is {fixed}-D; num_spatial_dims={num_spatial_dims} contradicts it")
    self.num_spatial_dims = fixed
    return fixed

  def _check_input(self, x: Any, label: str) -> None:
    """``x`` must be a tensor of this layer's rank."""
    if not isinstance(x, SparseConvTensor):
      raise TypeError(f"{label} expects a SparseConvTensor, got {type(x).__name__}")
    if self.num_spatial_dims is not None and x.ndim != self.num_spatial_dims:
      raise ValueError(
        f"{label} expects {self.num_spatial_dims} spatial dims, got a tensor over {x.spatial_shape}"
      )


class BuildsMap:
  """The window geometry of a layer that finds or builds its own kernel map (convs and pools).

  A layer whose map creates sites has a static output capacity under jit: ``out_capacity``
  rows, or ``capacity_ratio`` times its input's capacity (see
  :func:`jsparse.ops.default_capacity`). It records ``[needed, capacity]`` in its output's
  ``overflow`` under its ``capacity_key``, a name unique to the layer object, by which
  :func:`plan_capacities` and :func:`grow_on_overflow` find it.
  """

  num_spatial_dims: int
  kernel_size: tuple[int, ...]

  def _set_window(self, stride, padding, dilation, indice_key, out_capacity, capacity_ratio) -> None:
    n = self.num_spatial_dims
    self.stride = ops.ntuple(stride, n, "stride")
    self.padding = ops.ntuple(padding, n, "padding")
    self.dilation = ops.ntuple(dilation, n, "dilation")
    self.indice_key = indice_key
    if out_capacity is not None and (not isinstance(out_capacity, numbers.Integral) or out_capacity < 1):
      raise ValueError(f"out_capacity must be a positive int (rows), got {out_capacity!r}")
    if capacity_ratio is not None and not capacity_ratio > 0:
      raise ValueError(f"capacity_ratio must be positive, got {capacity_ratio!r}")
    self.out_capacity = None if out_capacity is None else int(out_capacity)
    self.capacity_ratio = capacity_ratio
    self.capacity_key = f"{type(self).__name__}#{next(_capacity_keys)}"

  def _window_label(self) -> str:
    key = "" if self.indice_key is None else f", indice_key={self.indice_key!r}"
    return f"k={self.kernel_size}, s={self.stride}, p={self.padding}, d={self.dilation}{key}"

  def _window_map(self, x: SparseConvTensor, kind: str, label: str):
    """``(spec, pairs, indice_dict, overflow)``: the map of this window over ``x`` (see
    :func:`jsparse.tensor.kernel_map`)."""
    spec = ops.make_spec(kind, x.spatial_shape, self.kernel_size, self.stride, self.padding, self.dilation)
    maps = kernel_map(
      x,
      spec,
      self.indice_key,
      self.out_capacity,
      label,
      capacity_ratio=self.capacity_ratio,
      record=self.capacity_key,
    )
    return spec, *maps
