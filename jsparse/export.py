"""``jax.export`` for functions that take or return jsparse's pytrees.

Importing jsparse registers the serialization of :class:`~jsparse.SparseConvTensor`,
:class:`~jsparse.IndicePairs`, :class:`~jsparse.ops.HashTable` and
:class:`~jsparse.ops.Voxels`, so ``Exported.serialize()`` and ``jax.export.deserialize`` accept
functions whose arguments or results hold them.

``jax.export`` refuses custom calls it does not know, and jsparse's FFI kernels are custom calls.
Pass :func:`disabled_checks` to allow exactly jsparse's targets:

>>> import jax, jsparse
>>> exported = jax.export.export(jax.jit(model_fn), disabled_checks=jsparse.export.disabled_checks())
... # doctest: +SKIP
>>> blob = exported.serialize()  # doctest: +SKIP

The serialized function calls the kernels by name, so the process that runs it needs the same
jsparse installed: load it with :func:`deserialize`, which also registers the kernels with XLA
(``jax.export.deserialize`` alone leaves a fresh process without them). The reference path
(``jsparse.backend("reference")``) exports to plain StableHLO that needs no jsparse at all.
"""

from __future__ import annotations

import json
from typing import Any

from jax import export as jax_export

from jsparse import _ffi
from jsparse.ops import HashTable, IndicePairs, MapSpec, Voxels
from jsparse.tensor import SparseConvTensor

__all__ = ["deserialize", "disabled_checks"]


def disabled_checks() -> list[jax_export.DisabledSafetyCheck]:
  """The checks to pass to ``jax.export.export`` so that it accepts jsparse's FFI targets.

  One ``DisabledSafetyCheck.custom_call`` per target of ``jsparse._ffi.TARGETS``; every other
  custom call is still refused.
  """
  return [jax_export.DisabledSafetyCheck.custom_call(name) for name in _ffi.TARGETS]


def deserialize(blob: bytes | bytearray) -> jax_export.Exported:
  """``jax.export.deserialize`` after registering jsparse's kernels with XLA for every platform
  built here, so that ``exported.call(...)`` finds them in a process that has not used them yet."""
  for platform in _ffi.PLATFORMS:
    _ffi.targets(platform)
  return jax_export.deserialize(blob)


def _json(value: Any) -> bytes:
  return json.dumps(value).encode()


def _spec_to_json(spec: MapSpec) -> list[Any]:
  return [
    spec.kind, spec.kernel_size, spec.stride, spec.padding, spec.dilation, spec.in_spatial_shape
  ]  # fmt: skip


def _spec_from_json(fields: list[Any]) -> MapSpec:
  kind, *shapes = fields
  return MapSpec(kind, *(tuple(s) for s in shapes))


def _register() -> None:
  jax_export.register_pytree_node_serialization(
    SparseConvTensor,
    serialized_name="jsparse.SparseConvTensor",
    serialize_auxdata=lambda aux: _json([list(aux[0]), aux[1]]),
    deserialize_auxdata=lambda b: (tuple(json.loads(b)[0]), json.loads(b)[1]),
  )
  jax_export.register_pytree_node_serialization(
    IndicePairs,
    serialized_name="jsparse.IndicePairs",
    serialize_auxdata=lambda aux: _json([_spec_to_json(aux[0]), aux[1]]),
    deserialize_auxdata=lambda b: (_spec_from_json(json.loads(b)[0]), json.loads(b)[1]),
  )
  jax_export.register_pytree_node_serialization(
    HashTable,
    serialized_name="jsparse.HashTable",
    serialize_auxdata=lambda aux: b"",
    deserialize_auxdata=lambda b: (),
  )
  jax_export.register_namedtuple_serialization(Voxels, serialized_name="jsparse.Voxels")


_register()
