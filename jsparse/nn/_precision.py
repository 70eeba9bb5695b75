"""Mixed precision: the policy, and :func:`set_dtype` to apply it to a whole model.

jsparse follows Flax's convention, a layer's ``dtype`` (computation) apart from its
``param_dtype`` (storage). For ``bfloat16`` or ``float16``:

- **Parameters** stay in ``param_dtype`` (float32 by default): the optimizer updates float32
  weights, and each call casts them to the computation dtype.
- **Activations**: a layer with ``dtype=bfloat16`` casts its input features and weights to
  bfloat16 and returns bfloat16 features. A layer with ``dtype=None`` computes in the promoted
  dtype of its input and parameters (float32 for float32 parameters), so one float32 layer in a
  bfloat16 model gives float32 from there on.
- **Accumulation**: convolutions and pools take inputs in the computation dtype and accumulate
  in float32 (the FFI kernels and the reference path alike), then round once to the output
  dtype; ``sparse_add`` adds in the promoted dtype of its operands.
- **Normalization statistics**: ``BatchNorm``, ``LayerNorm`` and ``GroupNorm`` compute means and
  variances in float32 from the active rows, and ``BatchNorm`` keeps its running averages in
  ``param_dtype``; the normalized features come back in the computation dtype.
- **Losses** should be computed in float32 (``logits.astype(jnp.float32)``).

float16 has bfloat16's behaviour with more mantissa and far less range (largest value 65504):
use it for inference, or scale the loss when training. Padding rows stay zero in every dtype.
The models' tests state the agreement with float32 on real scans.
"""

from __future__ import annotations

from typing import Any

from flax import nnx


def set_dtype(module: nnx.Module, dtype: Any) -> nnx.Module:
  """Sets the computation ``dtype`` of every layer in ``module`` that has one (jsparse's
  convolutions and norms, Flax's ``Linear``, norms and convolutions), in place, and returns
  ``module``. Parameters keep their ``param_dtype``; ``None`` restores computing in the promoted
  dtype of inputs and parameters.

  >>> import jax.numpy as jnp, jsparse
  >>> from flax import nnx
  >>> net = set_dtype(jsparse.models.VoxelBackBone8x(4, rngs=nnx.Rngs(0)), jnp.bfloat16)
  >>> net.conv2.layers[0].layers[0].dtype, net.conv2.layers[0].layers[0].kernel.dtype
  (<class 'jax.numpy.bfloat16'>, dtype('float32'))
  """
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Module) and hasattr(node, "dtype") and hasattr(node, "param_dtype"):
      node.dtype = dtype
  return module
