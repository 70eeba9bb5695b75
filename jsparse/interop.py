"""Weights from spconv (PyTorch) models: :func:`load_spconv_state_dict`.

A PyTorch ``state_dict`` names each tensor by its module path (``conv2.0.1.running_mean``: the
``running_mean`` of layer 1 of layer 0 of ``conv2``). jsparse's models and layers keep the
reference implementations' attribute names and layer positions (OpenPCDet's backbones,
mmdet3d's MinkUNet, ``SparseSequential`` by position), so each parameter of a jsparse model has
one PyTorch key: its path with ``SparseSequential``'s ``layers`` left out and the leaf renamed:

=====================================  =============================  ==============================
jsparse                                PyTorch                        conversion
=====================================  =============================  ==============================
conv ``kernel [*k, in, out]``          ``weight [out, *k, in]``       ``np.moveaxis(w, 0, -1)`` (*)
conv, norm, linear ``bias``            ``bias``                       none
norm ``scale``                         ``weight``                     none
BatchNorm ``mean``, ``var``            ``running_mean``, ``running_var``  none
``nnx.Linear`` ``kernel [in, out]``    ``weight [out, in]``           transpose
=====================================  =============================  ==============================

PyTorch's ``num_batches_tracked`` has no counterpart (Flax's momentum is fixed) and is skipped.

(*) One exception, to give the outputs spconv gives: spconv 2.3.8 computes a convolution with a
single tap and stride 1 (a 1x1x1 ``SubMConv3d``, say) as ``features @ weight.view(in, out)``, the
memory of its ``[out, 1, 1, 1, in]`` weight read as ``[in, out]``, not as the transpose its
shape suggests; such weights are reshaped, not moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsparse.nn import SparseSequential, SubMConv
from jsparse.nn._conv import _Conv

__all__ = ["load_spconv_state_dict", "spconv_key"]

_SKIPPED = ("num_batches_tracked",)
_NAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var", "bias": "bias"}


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy copy of a numpy array or a torch tensor (on any device; torch is never imported)."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16: go through float32
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _parameters(model: nnx.Module) -> dict[str, tuple[nnx.Module, str, nnx.Variable]]:
  """PyTorch key -> (owning layer, jsparse leaf name, variable) for every Param and BatchStat."""
  nodes = dict(nnx.iter_graph(model))
  out = {}
  for path, node in nodes.items():
    if not isinstance(node, (nnx.Param, nnx.BatchStat)):
      continue
    owner = nodes[path[:-1]]
    parts = [
      str(part)
      for i, part in enumerate(path[:-1])
      if not (part == "layers" and isinstance(nodes[path[:i]], SparseSequential))
    ]
    leaf = path[-1]
    if leaf not in _NAMES:
      raise ValueError(f"{'.'.join(map(str, path))}: no PyTorch name for the parameter {leaf!r}")
    out[".".join([*parts, _NAMES[leaf]])] = (owner, leaf, node)
  return out


def spconv_key(model: nnx.Module) -> dict[str, str]:
  """The PyTorch key of each parameter of ``model``, by its jsparse path (``"conv2/layers/0/..."``).

  >>> from flax import nnx
  >>> import jsparse
  >>> keys = spconv_key(jsparse.models.VoxelBackBone8x(4, rngs=nnx.Rngs(0)))
  >>> keys["conv2/layers/0/layers/1/mean"]
  'conv2.0.1.running_mean'
  """
  nodes = dict(nnx.iter_graph(model))
  by_variable = {id(v): key for key, (_, _, v) in _parameters(model).items()}
  return {
    "/".join(map(str, path)): by_variable[id(node)]
    for path, node in nodes.items()
    if isinstance(node, (nnx.Param, nnx.BatchStat))
  }


def _convert(owner: nnx.Module, leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and isinstance(owner, _Conv):
    strides = (1,) if isinstance(owner, SubMConv) else getattr(owner, "stride", (1,))  # SubM ignores it
    if np.prod(owner.kernel_size) == 1 and all(s == 1 for s in strides):
      # spconv multiplies by weight.view(in, out) here: the memory of [out, 1.., in] read as [in, out]
      return value.reshape(*owner.kernel_size, owner.in_channels, owner.out_channels)
    return np.moveaxis(value, 0, -1)  # [out, *k, in] -> [*k, in, out]
  if leaf == "kernel" and isinstance(owner, nnx.Linear):
    return value.T  # [out, in] -> [in, out]
  return value


def load_spconv_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> None:
  """Fills ``model``'s parameters and BatchNorm statistics, in place, from a PyTorch ``state_dict``.

  Args:
    model: a jsparse model (``jsparse.models``), a ``SparseSequential``, or any NNX module built
      from jsparse's layers, Flax's ``Linear`` and norms, whose attribute names and layer positions
      are those of the PyTorch model that saved ``state_dict``.
    state_dict: PyTorch key -> numpy array or torch tensor (``model.state_dict()``, or a
      checkpoint's ``["model_state"]``), with spconv's weight layout ``[out, *k, in]``.

  Raises:
    ValueError: naming every key of ``state_dict`` that matches no parameter, every parameter it
      lacks, and every value whose shape does not fit; nothing is loaded then.

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> net = jsparse.nn.SparseSequential(jsparse.nn.SubMConv3d(4, 8, 3, bias=False, rngs=nnx.Rngs(0)))
  >>> load_spconv_state_dict(net, {"0.weight": np.ones((8, 3, 3, 3, 4), np.float32)})
  >>> net.layers[0].kernel.shape
  (3, 3, 3, 4, 8)
  """
  parameters = _parameters(model)
  given = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in _SKIPPED}
  problems = []
  unmatched = sorted(set(given) - set(parameters))
  missing = sorted(set(parameters) - set(given))
  if unmatched:
    problems.append(f"{len(unmatched)} keys match no parameter of the model: {', '.join(unmatched)}")
  if missing:
    problems.append(f"{len(missing)} parameters have no key: {', '.join(missing)}")
  updates = []
  for key in sorted(set(given) & set(parameters)):
    owner, leaf, variable = parameters[key]
    value = _convert(owner, leaf, _to_numpy(given[key]))
    if value.shape != variable.get_value().shape:
      torch_shape = tuple(np.shape(_to_numpy(given[key])))
      problems.append(
        f"{key}: shape {torch_shape} gives {value.shape} in jsparse's layout, the model's "
        f"{type(owner).__name__}.{leaf} is {tuple(variable.get_value().shape)}"
      )
      continue
    updates.append((variable, value))
  if problems:
    raise ValueError(
      f"the state_dict does not fit {type(model).__name__}: "
      + "; ".join(problems)
      + ". Keys are the PyTorch module paths (jsparse.interop.spconv_key(model) lists the model's)."
    )
  for variable, value in updates:
    variable.set_value(jnp.asarray(value, variable.get_value().dtype))
