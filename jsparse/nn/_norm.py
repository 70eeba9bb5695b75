"""Normalization that knows which rows are sites: BatchNorm, LayerNorm and GroupNorm on tensors.

A ``SparseConvTensor`` of capacity N holds its active sites and padding rows (batch index -1,
features 0). Flax's norms applied to ``x.features`` see every row: ``nnx.BatchNorm`` then
counts the padding rows as samples of value 0, which pulls the batch mean towards 0 and the
variance off, by as much as the capacity exceeds the active rows; the running statistics learn
the wrong values without any error (spconv's idiom ``x.replace_feature(bn(x.features))`` is
right only because spconv tensors have no padding). These layers take the tensor and compute
their statistics over the active rows alone; padding rows stay zero. They keep Flax's arguments
and parameter names (``scale``, ``bias``, ``mean``, ``var``), so ``model.train()``,
``model.eval()`` and ``nnx.view`` work as for Flax's layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jsparse._porting import explains_spconv_arguments
from jsparse.nn._base import SparseModule
from jsparse.tensor import SparseConvTensor


def _check(layer: nnx.Module, x: Any, num_features: int) -> None:
  name = type(layer).__name__
  if not isinstance(x, SparseConvTensor):
    raise TypeError(
      f"{name} takes a SparseConvTensor, got {type(x).__name__}; for dense arrays use flax.nnx.{name}"
    )
  if x.features.shape[1] != num_features:
    raise ValueError(f"{name}({num_features}) got a tensor with {x.features.shape[1]} channels")


def _mean_var(s1: jax.Array, s2: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance from the sum ``s1``, the sum of squares ``s2`` and the count ``n``
  (0 and 0 where ``n`` is 0)."""
  safe = jnp.maximum(n, 1.0)
  mean = s1 / safe
  return mean, jnp.maximum(0.0, s2 / safe - jnp.square(mean))


@functools.partial(jax.checkpoint, static_argnums=5)
def _normalize(
  features: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  epsilon: float,
) -> jax.Array:
  """``(features - mean) / sqrt(var + epsilon) * scale + bias``: features ``[capacity, C]``,
  the others ``[C]`` (``scale`` and ``bias`` may be None).

  Rematerialized: a gradient keeps only the inputs and recomputes the centred features, fused
  into the backward pass, instead of keeping them as one more ``[capacity, C]`` array per layer
  (the arrays a train step keeps are fresh memory on every call).
  """
  multiplier = lax.rsqrt(var + epsilon)
  if scale is not None:
    multiplier = multiplier * scale
  y = (features - mean[None]) * multiplier[None]
  return y if bias is None else y + bias[None]


class BatchNorm(nnx.BatchNorm, SparseModule):
  """Batch normalization over the active rows of a :class:`SparseConvTensor`.

  Flax's ``nnx.BatchNorm`` with its arguments, parameters and batch statistics, taking and
  returning a tensor: ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per channel, where
  in training the mean and (biased) variance are those of the active rows only, across the
  devices of ``axis_name`` when given (counts and sums are added over devices, so devices with
  different numbers of sites weigh by their sites). The running averages follow Flax's
  convention, ``ra = momentum * ra + (1 - momentum) * batch`` (PyTorch's momentum 0.01 is
  Flax's 0.99), and are left alone by a batch without active rows. Padding rows stay zero.

  Do not apply ``nnx.BatchNorm`` to ``x.features``: it would count the padding rows, whose
  number depends on the capacity, as samples of value 0.

  Args:
    num_features: ``C``, the channels of the input.
    use_running_average, momentum, epsilon, dtype, param_dtype, use_bias, use_scale, bias_init,
      scale_init, axis_name, axis_index_groups, use_fast_variance, promote_dtype, rngs: as for
      ``flax.nnx.BatchNorm`` (``axis`` must stay -1: the channels).

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> x = jsparse.SparseConvTensor(np.array([[1.0], [3.0]], np.float32),
  ...     np.array([[0, 0], [0, 2]], np.int32), (4,), 1, capacity=8)
  >>> bn = jsparse.nn.BatchNorm(1, momentum=0.0, rngs=nnx.Rngs(0))
  >>> y = bn(x)
  >>> [round(float(v), 3) for v in y.features[:3, 0]], float(bn.mean[0]), float(bn.var[0])
  ([-1.0, 1.0, 0.0], 2.0, 1.0)
  """

  __init__ = explains_spconv_arguments(nnx.BatchNorm.__init__)

  def __call__(self, x: SparseConvTensor, use_running_average: bool | None = None) -> SparseConvTensor:
    """Normalizes ``x``: features ``[capacity, C]`` -> ``[capacity, C]``, padding rows 0."""
    _check(self, x, self.num_features)
    if self.axis not in (-1, 1):
      raise ValueError(f"BatchNorm normalizes a tensor's channels (axis=-1), got axis={self.axis}")
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
        "BatchNorm needs use_running_average: pass it to the constructor or the call, or use "
        "model.train() / model.eval()"
      )
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    features, mean, var, scale, bias = self.promote_dtype(
      (x.features, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    if not use_running_average:
      batch_mean, batch_var, count = self._batch_moments(x)
      seen, m = count > 0, self.momentum
      stored_mean, stored_var = (lax.stop_gradient(v) for v in (batch_mean, batch_var))
      self.mean[...] = jnp.where(seen, m * self.mean[...] + (1 - m) * stored_mean, self.mean[...])
      self.var[...] = jnp.where(seen, m * self.var[...] + (1 - m) * stored_var, self.var[...])
      mean, var = batch_mean.astype(features.dtype), batch_var.astype(features.dtype)
    return x.replace_feature(_normalize(features, mean, var, scale, bias, self.epsilon))

  def _batch_moments(self, x: SparseConvTensor) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 ``(mean [C], var [C], count [])`` of the active rows (over ``axis_name`` too)."""
    values = x.features.astype(jnp.promote_types(x.features.dtype, jnp.float32))
    active = x.mask[:, None]
    values = jnp.where(active, values, 0)
    count = jnp.sum(x.mask, dtype=values.dtype)
    reduce = (lambda v: v) if self.axis_name is None else (
      lambda v: lax.psum(v, self.axis_name, axis_index_groups=self.axis_index_groups)
    )  # fmt: skip
    if self.use_fast_variance:
      sums = reduce(jnp.concatenate([jnp.sum(values, 0), jnp.sum(jnp.square(values), 0), count[None]]))
      c = values.shape[1]
      mean, var = _mean_var(sums[:c], sums[c : 2 * c], sums[2 * c])
      return mean, var, sums[2 * c]
    sums = reduce(jnp.concatenate([jnp.sum(values, 0), count[None]]))
    count = sums[-1]
    mean = sums[:-1] / jnp.maximum(count, 1.0)
    squares = reduce(jnp.sum(jnp.where(active, jnp.square(values - mean[None]), 0), 0))
    return mean, squares / jnp.maximum(count, 1.0), count


class LayerNorm(nnx.LayerNorm, SparseModule):
  """Layer normalization of each active row of a :class:`SparseConvTensor` over its channels.

  Flax's ``nnx.LayerNorm`` (same arguments and parameters) applied to the features; its
  statistics are per row, so padding rows never enter them, and they stay zero (Flax's layer
  alone would give them ``bias``).

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> x = jsparse.SparseConvTensor(np.array([[1.0, 3.0]], np.float32), np.array([[0, 1]], np.int32),
  ...     (4,), 1, capacity=2)
  >>> jsparse.nn.LayerNorm(2, rngs=nnx.Rngs(0))(x).features.round(3).tolist()
  [[-1.0, 1.0], [0.0, 0.0]]
  """

  __init__ = explains_spconv_arguments(nnx.LayerNorm.__init__)

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    """Normalizes each row of ``x``: features ``[capacity, C]`` -> ``[capacity, C]``."""
    _check(self, x, self.num_features)
    return x.replace_feature(super().__call__(x.features))


class GroupNorm(nnx.GroupNorm, SparseModule):
  """Group normalization over each sample's active rows of a :class:`SparseConvTensor`.

  Flax's ``nnx.GroupNorm`` (same arguments and parameters): the channels form ``num_groups``
  groups, and each group is normalized with the mean and variance over the active rows of one
  batch sample and the group's channels (as Flax normalizes over all non-batch axes of a dense
  ``[batch, ..., C]`` input). Padding rows take no part and stay zero; a sample without active
  rows has nothing to normalize.

  Args:
    num_features, num_groups, group_size, epsilon, dtype, param_dtype, use_bias, use_scale,
      bias_init, scale_init, use_fast_variance, promote_dtype, rngs: as for
      ``flax.nnx.GroupNorm``. ``axis_name`` is not supported: a sample's rows live on one device.

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> x = jsparse.SparseConvTensor(np.array([[1.0, 5.0], [3.0, 7.0]], np.float32),
  ...     np.array([[0, 0], [0, 2]], np.int32), (4,), 1, capacity=3)
  >>> y = jsparse.nn.GroupNorm(2, num_groups=2, epsilon=0.0, rngs=nnx.Rngs(0))(x)
  >>> y.features.tolist()
  [[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]
  """

  __init__ = explains_spconv_arguments(nnx.GroupNorm.__init__)

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    """Normalizes ``x``: features ``[capacity, C]`` -> ``[capacity, C]``, padding rows 0."""
    _check(self, x, self.num_groups * self.group_size)
    if self.axis_name is not None:
      raise ValueError(
        "GroupNorm's statistics are per sample, and a sample's rows live on one device: "
        "axis_name is not supported"
      )
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    features, scale, bias = self.promote_dtype((x.features, scale, bias), dtype=self.dtype)
    n, c = features.shape
    groups = self.num_groups
    values = features.astype(jnp.promote_types(features.dtype, jnp.float32)).reshape(n, groups, c // groups)
    samples = jnp.where(x.mask, x.indices[:, 0], x.batch_size)  # padding: a dropped segment
    values = jnp.where(x.mask[:, None, None], values, 0)

    def per_sample(v):  # [N, G] -> [batch_size + 1, G]
      return jax.ops.segment_sum(v, samples, x.batch_size + 1)

    count = per_sample(jnp.broadcast_to(x.mask[:, None], (n, groups)).astype(values.dtype)) * (c // groups)
    if self.use_fast_variance:
      mean, var = _mean_var(per_sample(values.sum(-1)), per_sample(jnp.square(values).sum(-1)), count)
    else:
      mean = per_sample(values.sum(-1)) / jnp.maximum(count, 1.0)
      centred = jnp.where(x.mask[:, None, None], values - mean[samples][:, :, None], 0)
      var = per_sample(jnp.square(centred).sum(-1)) / jnp.maximum(count, 1.0)
    mean, var = mean[samples][:, :, None], var[samples][:, :, None]  # back to rows: [N, G, 1]
    y = ((values - mean) * lax.rsqrt(var + self.epsilon)).reshape(n, c).astype(features.dtype)
    if scale is not None:
      y = y * scale[None]
    if bias is not None:
      y = y + bias[None]
    return x.replace_feature(y)
