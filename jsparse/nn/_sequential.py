"""SparseSequential and ToDense: running sparse layers and ordinary Flax layers in one chain."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jsparse.nn._base import SparseModule
from jsparse.tensor import SparseConvTensor


def _accepts_mask(layer: Callable[..., Any]) -> bool:
  try:
    parameters = inspect.signature(layer).parameters
  except (TypeError, ValueError):  # builtins without a signature
    return False
  return "mask" in parameters


def apply_to_features(layer: Callable[..., Any], x: SparseConvTensor) -> SparseConvTensor:
  """Applies a feature-wise layer to ``x.features``; padding rows stay zero.

  Layers that take a ``mask`` keyword (``nnx.BatchNorm``, ``nnx.LayerNorm`` ...) get
  ``mask=x.mask[:, None]``, so padding rows never enter their statistics (jsparse's own norms,
  :class:`BatchNorm` and friends, take the tensor and need no mask).
  """
  if _accepts_mask(layer):
    features = layer(x.features, mask=x.mask[:, None])
  else:
    features = layer(x.features)
  return x.replace_feature(features)


class SparseSequential(SparseModule):
  """Applies layers in order, as spconv's ``SparseSequential``.

  Sparse layers (:class:`SparseModule`) get the tensor; any other callable (``nnx.BatchNorm``,
  ``nnx.relu``, ``nnx.Dropout``, ``nnx.Linear``) is applied to the features of the tensor, with
  ``mask=`` where it accepts one. After a :class:`ToDense`, later layers get the dense array.

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> rngs = nnx.Rngs(0)
  >>> net = jsparse.nn.SparseSequential(
  ...     jsparse.nn.SubMConv3d(4, 8, 3, indice_key="subm0", rngs=rngs),
  ...     jsparse.nn.BatchNorm(8, rngs=rngs), nnx.relu,
  ...     jsparse.nn.SubMConv3d(8, 8, 3, indice_key="subm0", rngs=rngs))
  >>> x = jsparse.SparseConvTensor(np.ones((2, 4), np.float32),
  ...     np.array([[0, 0, 0, 0], [0, 0, 0, 1]], np.int32), (4, 4, 4), 1)
  >>> net(x).features.shape
  (2, 8)
  """

  def __init__(self, *layers: Callable[..., Any]):
    for i, layer in enumerate(layers):
      if not callable(layer):
        raise TypeError(f"SparseSequential: layer {i} ({layer!r}) is not callable")
    self.layers = nnx.List(layers)

  def __call__(self, x: Any) -> Any:
    for layer in self.layers:
      if isinstance(layer, SparseModule) or not isinstance(x, SparseConvTensor):
        x = layer(x)
      else:
        x = apply_to_features(layer, x)
    return x


class ToDense(SparseModule):
  """Densifies: ``[batch, *spatial, C]`` (or spconv's ``[batch, C, *spatial]`` if channels_first)."""

  def __init__(self, channels_first: bool = False):
    self.channels_first = channels_first

  def __call__(self, x: SparseConvTensor) -> jax.Array:
    return x.dense(channels_first=self.channels_first)
