"""Constructor arguments of spconv (and PyTorch) that jsparse does not take, with what to write
instead: a ported call fails with that advice rather than Python's bare "unexpected keyword"."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_ACTIVATION = "apply the activation after the layer instead, e.g. SparseSequential(conv, nnx.relu)"
_KERNELS = "jsparse picks its kernels itself (jsparse.backend selects the FFI kernels or the reference path)"

# argument -> what to write instead
SPCONV_ONLY: dict[str, str] = {
  "algo": f"delete it, {_KERNELS}",
  "large_kernel_fast_algo": f"delete it, {_KERNELS}",
  "fp32_accum": (
    "delete it, jsparse always accumulates float16 and bfloat16 products in float32 "
    "(the README's mixed-precision policy)"
  ),
  "record_voxel_count": "delete it, an output's number of active sites is y.num_active",
  "name": "delete it, Flax names a layer by its attribute path in the model",
  "act_type": f"delete it and {_ACTIVATION}",
  "act_alpha": f"delete it and {_ACTIVATION}",
  "act_beta": f"delete it and {_ACTIVATION}",
  "device": "delete it, jsparse computes where its inputs are (jax.device_put(points, device) places them)",
  "eps": "write epsilon= (Flax's name)",
  "affine": "write use_scale= and use_bias= (Flax's names)",
  "track_running_stats": (
    "delete it, use_running_average=True (or model.eval()) evaluates with the running averages"
  ),
}

P = ParamSpec("P")
R = TypeVar("R")


def explains_spconv_arguments(init: Callable[P, R]) -> Callable[P, R]:
  """Wraps a constructor so that spconv-only keyword arguments raise a ``TypeError`` that says
  what to write instead; the signature (``inspect.signature``, type checkers) is unchanged."""
  accepted = set(inspect.signature(init).parameters)

  @functools.wraps(init)
  def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
    ported = [name for name in kwargs if name in SPCONV_ONLY and name not in accepted]
    if ported:
      owner = type(args[0]).__name__ if args else init.__qualname__
      advice = "; ".join(f"{name}=: {SPCONV_ONLY[name]}" for name in ported)
      raise TypeError(f"{owner} does not take these arguments of spconv (or PyTorch): {advice}")
    return init(*args, **kwargs)

  return wrapper
