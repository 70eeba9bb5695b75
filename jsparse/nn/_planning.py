"""Capacities that size themselves: planned from example inputs, grown when a step overflows.

Every layer that creates sites (strided and transposed convolutions, pools) has a static output
capacity under jit and records ``[needed, capacity]`` in its output's ``overflow`` under its
``capacity_key``. :func:`plan_capacities` runs a model eagerly and sizes each such layer from
what it needed; :func:`grow_on_overflow` wraps a jitted step and, when a layer dropped sites,
grows it and runs the same step again from the same state.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jsparse._capacity import CapacityError, round_capacity
from jsparse.nn._base import BuildsMap
from jsparse.tensor import SparseConvTensor

logger = logging.getLogger("jsparse")


def _site_layers(*nodes: Any) -> dict[str, tuple[str, BuildsMap]]:
  """``capacity_key -> (path, layer)`` for every layer of the graph nodes that builds its map."""
  found: dict[str, tuple[str, BuildsMap]] = {}
  for node in nodes:
    for path, module in nnx.iter_graph(node):
      if isinstance(module, BuildsMap):
        name = ".".join(str(p) for p in path) or type(module).__name__
        found.setdefault(module.capacity_key, (name, module))
  return found


def _records(overflow: Any) -> dict[str, list[tuple[int, int]]]:
  """``key -> [(needed, capacity), ...]`` on the host, one pair per call, from a tensor, an overflow
  dict, or a sequence of those. A layer called twice on one lineage records ``"<key> (call 2)"``;
  a record that ``shard_map`` returned per device (``[devices, 2]``) gives a pair per device."""
  if isinstance(overflow, SparseConvTensor):
    overflow = overflow.overflow
  if isinstance(overflow, (list, tuple)):
    merged: dict[str, list[tuple[int, int]]] = {}
    for part in overflow:
      for key, pairs in _records(part).items():
        merged.setdefault(key, []).extend(pairs)
    return merged
  if not isinstance(overflow, Mapping):
    raise TypeError(
      "expected the overflow records: a SparseConvTensor, its .overflow dict, or a list of those; "
      f"got {type(overflow).__name__}"
    )
  records: dict[str, list[tuple[int, int]]] = {}
  for label, record in overflow.items():
    key = label.split(" (call ")[0]
    records.setdefault(key, []).extend((int(n), int(c)) for n, c in np.asarray(record).reshape(-1, 2))
  return records


# Head-room over a layer's largest need, for plan_capacities and grow_on_overflow alike: a quarter
# more, so that inputs a little larger than the ones seen keep their compilation.
MARGIN = 1.25


def _capacity_with_margin(needed: int, margin: float) -> int:
  return round_capacity(math.ceil(margin * max(needed, 1)))


def _check_margin(margin: float) -> None:
  if not margin >= 1:
    raise ValueError(f"margin must be >= 1, got {margin}")


def plan_capacities(
  model: nnx.Module,
  *examples: Any,
  margin: float = MARGIN,
  apply: Callable[[nnx.Module, Any], Any] | None = None,
) -> dict[str, int]:
  """Sizes every site-creating layer of ``model`` from example inputs.

  Runs a copy of ``model`` eagerly on each example (the model's own state, batch statistics
  included, is left alone); eagerly every layer sizes its output to fit and records what it
  needed. Each layer's ``out_capacity`` is then set to :func:`jsparse.round_capacity` of
  ``margin`` times the most sites it needed, so that jitted calls on inputs like the examples
  keep every site and compile once per bucket.

  Args:
    model: an NNX module.
    *examples: inputs for ``apply(model, example)``.
    margin: head-room over the largest need (1.25: a quarter more).
    apply: how to run the model on an example; by default ``model(example)``. Its result must
      hold the ``SparseConvTensor`` outputs (any pytree of them), whose ``overflow`` records the
      layers' needs.

  Returns:
    ``{layer path: out_capacity}`` for the layers it set.

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> net = jsparse.nn.SparseConv3d(1, 1, 3, 2, 1, rngs=nnx.Rngs(0))
  >>> x = jsparse.SparseConvTensor(np.ones((3, 1), np.float32),
  ...     np.array([[0, 1, 1, 1], [0, 2, 2, 2], [0, 7, 7, 7]], np.int32), (8, 8, 8), 1)
  >>> jsparse.nn.plan_capacities(net, x)  # 9 sites needed, 1.25 x 9 rounds up to the bucket 16
  {'SparseConv3d': 16}
  """
  if not examples:
    raise ValueError("plan_capacities needs at least one example input")
  _check_margin(margin)
  apply = apply or (lambda m, example: m(example))
  copy = nnx.clone(model)
  for _, layer in _site_layers(copy).values():
    layer.out_capacity = None  # eagerly: sized to fit, whatever the plan was
  needed: dict[str, int] = {}
  for example in examples:
    outputs = apply(copy, example)
    tensors = [t for t in jax.tree.leaves(outputs, is_leaf=lambda t: isinstance(t, SparseConvTensor))
               if isinstance(t, SparseConvTensor)]  # fmt: skip
    if not tensors:
      raise ValueError("the model's outputs hold no SparseConvTensor, whose overflow records the needs")
    for key, pairs in _records(tensors).items():
      needed[key] = max(needed.get(key, 0), *(n for n, _ in pairs))
  planned = {}
  for key, (path, layer) in _site_layers(model).items():
    if key in needed:
      layer.out_capacity = _capacity_with_margin(needed[key], margin)
      planned[path] = layer.out_capacity
  return planned


def grow_on_overflow(
  step: Callable[..., tuple[Any, Any]] | None = None, *, margin: float = MARGIN
) -> Callable[..., Any]:
  """Jits ``step`` and re-runs it, with larger capacities, whenever a layer dropped sites.

  ``step(*args)`` returns ``(result, overflow)``: ``overflow`` is the step's output tensor (or
  its ``.overflow`` dict, or a list of those), whose records say what each site-creating layer
  needed. The wrapper runs the step under ``jax.jit`` as a pure function of the state of the NNX
  objects among the arguments (the model, the optimizer: ``nnx.split`` before, ``nnx.merge``
  inside), and writes their new state back only when no layer dropped sites. When a layer of
  those objects needed more rows than it had, nothing of the step is kept: the wrapper raises
  that layer's ``out_capacity`` to the bucket that holds ``margin`` times what it needed
  (:func:`jsparse.round_capacity`, as :func:`plan_capacities` sizes), logs a warning on the
  ``jsparse`` logger, and runs the same step again from the same state; each new capacity is one
  new compilation. It returns ``result``. Use it as ``grow_on_overflow(step)`` or
  ``@grow_on_overflow(margin=1.5)``.

  Raises:
    CapacityError: a record that no layer of the arguments owns overflowed (``from_dense``,
      ``sparse_add``, ``PointToVoxel``: give those a larger capacity yourself).

  >>> import jax.numpy as jnp, numpy as np, jsparse
  >>> from flax import nnx
  >>> net = jsparse.nn.SparseConv3d(1, 1, 3, 2, 1, out_capacity=8, rngs=nnx.Rngs(0))
  >>> x = jsparse.SparseConvTensor(np.ones((3, 1), np.float32),
  ...     np.array([[0, 1, 1, 1], [0, 2, 2, 2], [0, 7, 7, 7]], np.int32), (8, 8, 8), 1)
  >>> def step(net, x):
  ...   y = net(x)
  ...   return jnp.sum(y.features), y
  >>> _ = jsparse.nn.grow_on_overflow(step)(net, x)  # 9 sites, 1.25 x 9: from 8 to 16 rows, again
  >>> net.out_capacity
  16
  """

  _check_margin(margin)
  if step is None:
    return functools.partial(grow_on_overflow, margin=margin)

  @functools.partial(jax.jit, static_argnames=("graphdef", "where"))
  def pure(graphdef, state, args, kwargs, where):
    nodes = iter(nnx.merge(graphdef, state))
    positions, names = where
    args = tuple(next(nodes) if i in positions else a for i, a in enumerate(args))
    kwargs = {k: next(nodes) if k in names else v for k, v in kwargs.items()}
    merged = tuple(args[i] for i in positions) + tuple(kwargs[k] for k in names)
    result, overflow = step(*args, **kwargs)
    return result, _overflow_only(overflow), nnx.state(merged)

  @functools.wraps(step)
  def run(*args: Any, **kwargs: Any) -> Any:
    # The models and optimizers among the arguments travel as their state; the rest as they are.
    positions = tuple(i for i, a in enumerate(args) if isinstance(a, nnx.Pytree))
    names = tuple(k for k, v in kwargs.items() if isinstance(v, nnx.Pytree))
    nodes = tuple(args[i] for i in positions) + tuple(kwargs[k] for k in names)
    rest = tuple(None if i in positions else a for i, a in enumerate(args))
    rest_kwargs = {k: None if k in names else v for k, v in kwargs.items()}
    while True:
      graphdef, state = nnx.split(nodes)
      result, overflow, new_state = pure(graphdef, state, rest, rest_kwargs, where=(positions, names))
      short = {key: pairs for key, pairs in _records(overflow).items() if any(n > c for n, c in pairs)}
      if not short:
        nnx.update(nodes, new_state)
        return result
      layers = _site_layers(*nodes)
      for key, pairs in short.items():
        n, c = max(pairs)  # the call that needed the most
        if key not in layers:
          raise CapacityError(
            f"{key} needed {n} rows but holds {c}, and it is not a layer of this step's modules; "
            f"give it a capacity >= {n} (e.g. jsparse.round_capacity({n}) = {round_capacity(n)})"
          )
        path, layer = layers[key]
        layer.out_capacity = _capacity_with_margin(n, margin)
        logger.warning(
          "jsparse: %s (%s) needed %d output sites but had %d rows: out_capacity is now %d and the step "
          "runs again from the same state (a new compilation)",
          path, key, n, c, layer.out_capacity,
        )  # fmt: skip

  return run


def _overflow_only(overflow: Any) -> Any:
  """The overflow records of a step's ``overflow`` (tensors reduced to their ``.overflow`` dict),
  so that the jitted step returns those and not whole tensors."""
  if isinstance(overflow, SparseConvTensor):
    return overflow.overflow
  if isinstance(overflow, (list, tuple)):
    return [_overflow_only(part) for part in overflow]
  return overflow
