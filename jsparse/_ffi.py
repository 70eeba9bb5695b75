"""The XLA FFI targets: one table of every target, the compiled extensions that provide them.

:data:`TARGETS` names each target once, with its operands, attributes and results in the order
the handlers bind them. A target means the same on every device: the CPU extension
(``xla_ffi/cpu``) and the CUDA extension (``xla_ffi/cuda``) register handlers under these names,
each extension providing the targets it has. Registration (:func:`targets`), ``build_info()`` and
dispatch (:func:`platforms_with`, :func:`call`) all read the table, so a device gains an op by
adding handlers of the same names, and nothing else changes.

Each extension module (``_ffi_cpu``, ``_ffi_cuda``) exposes ``registrations()``, a dict from
target name to handler capsule. Targets are registered with XLA on first use, not at import, so
``import jsparse`` stays cheap and silent, and a missing extension means the reference path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Sequence
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Target:
  """An FFI target: names of its operands, attributes and results, in binding order."""

  name: str
  operands: tuple[str, ...]
  attributes: tuple[str, ...]
  results: tuple[str, ...]
  vmap_method: str = "sequential"


# A kernel map's geometry (xla_ffi/common/kmap.h, jsparse/ops/_kmap.py).
_MAP_GEOMETRY = (
  "kernel_size", "stride", "padding", "dilation", "in_spatial_shape", "out_spatial_shape", "transpose",
  "batch_size",
)  # fmt: skip

TARGETS: dict[str, Target] = {
  t.name: t
  for t in (
    # ops/_indices.py: per-row status of site indices.
    Target(
      "jsparse_check_indices", ("indices",), ("spatial_shape", "batch_size"), ("status",), "broadcast_all"
    ),
    # ops/_kmap.py: kernel maps.
    Target("jsparse_kmap_output_sites", ("indices",), _MAP_GEOMETRY, ("out_indices", "num_out")),
    Target(
      "jsparse_kmap_neighbors", ("in_indices", "out_indices"), ("symmetric", *_MAP_GEOMETRY), ("nbr", "nbr_t")
    ),
    Target("jsparse_kmap_build", ("indices",), _MAP_GEOMETRY, ("out_indices", "num_out", "nbr", "nbr_t")),
    # ops/_conv.py: gather-GEMM-scatter convolution and its gradients.
    Target("jsparse_conv_gather_gemm", ("features", "kernel", "nbr"), ("groups", "reverse_taps"), ("out",)),
    Target("jsparse_conv_weight_grad", ("features", "d_out", "nbr"), ("groups",), ("d_kernel",)),
    Target(
      "jsparse_conv_backward_symmetric",
      ("features", "d_out", "kernel_t", "nbr"),
      ("groups",),
      ("d_features", "d_kernel"),
    ),
    # ops/_pool.py: pooling over a kernel map.
    Target("jsparse_pool_max", ("features", "nbr"), (), ("out", "arg")),
    Target("jsparse_pool_max_grad", ("d_out", "arg", "nbr_t"), (), ("d_features",)),
    Target("jsparse_pool_avg", ("features", "nbr", "counts"), (), ("out",)),
    Target("jsparse_pool_avg_grad", ("scaled_d_out", "nbr_t"), (), ("d_features",)),
    # ops/_hash_table.py: spconv's hash table.
    Target(
      "jsparse_hash_table_insert",
      ("table_keys", "table_values", "dropped", "keys", "values"),
      (),
      ("table_keys", "table_values", "dropped"),
      "broadcast_all",
    ),
    Target(
      "jsparse_hash_table_query",
      ("table_keys", "table_values", "keys"),
      (),
      ("values", "found"),
      "broadcast_all",
    ),
    Target(
      "jsparse_hash_table_insert_exist_keys",
      ("table_keys", "table_values", "keys", "values"),
      (),
      ("table_values", "found"),
      "broadcast_all",
    ),
    # ops/_voxelize.py: point-cloud voxelization.
    Target(
      "jsparse_voxelize",
      ("points", "num_points", "reused"),
      ("voxel_size", "range_min", "grid_size", "empty_mean"),
      ("voxels", "coords", "num_points_per_voxel", "pc_voxel_id", "num_voxels"),
    ),
  )
}

# platform (as jax.lax.platform_dependent names it) -> (extension module, XLA platform name)
_EXTENSIONS = {"cpu": ("jsparse._ffi_cpu", "cpu"), "cuda": ("jsparse._ffi_cuda", "CUDA")}
PLATFORMS = tuple(_EXTENSIONS)
# The platforms whose kernels the "auto" backend uses. The CUDA kernels are built and tested
# against the reference path by benchmarks/gpu_check.sh, but have not yet passed it on a GPU:
# until they have, "auto" runs the reference path there and backend("ffi") opts in.
AUTO_PLATFORMS = ("cpu",)


@functools.cache
def _extension(platform: str):
  try:
    return importlib.import_module(_EXTENSIONS[platform][0])
  except ImportError:
    return None


def built(platform: str) -> bool:
  """Whether the extension for ``platform`` ("cpu" or "cuda") was built and imports."""
  return _extension(platform) is not None


@functools.cache
def targets(platform: str) -> frozenset[str]:
  """Registers the extension's targets for ``platform`` (once) and returns their names.

  Raises:
    RuntimeError: the extension has a handler that :data:`TARGETS` does not declare (the
      extension and the Python package are from different builds).
  """
  module = _extension(platform)
  if module is None:
    return frozenset()
  registrations = module.registrations()
  unknown = sorted(set(registrations) - set(TARGETS))
  if unknown:
    raise RuntimeError(
      f"the {platform} extension {module.__file__} has handlers {unknown} that jsparse._ffi.TARGETS does "
      "not declare; it comes from another build of jsparse: reinstall it (make test rebuilds it)"
    )
  for name, capsule in registrations.items():
    jax.ffi.register_ffi_target(name, capsule, platform=_EXTENSIONS[platform][1])
  return frozenset(registrations)


def platforms_with(target: str) -> tuple[str, ...]:
  """The platforms on which ``target`` (a name in :data:`TARGETS`) is built and registered."""
  if target not in TARGETS:
    raise KeyError(f"{target!r} is not an FFI target of jsparse (jsparse._ffi.TARGETS)")
  return tuple(p for p in PLATFORMS if target in targets(p))


def _result_type(shape: jax.ShapeDtypeStruct, operands: Sequence[Any]) -> Any:
  """``shape`` with the varying manual axes (``jax.shard_map``) of the operand that varies along
  the most (JAX makes an FFI call's operands vary alike). Results declared without them would
  look replicated inside ``shard_map``, and ``grad`` would fail on the mismatch."""
  if not operands:
    return shape
  types = [jax.typeof(x) for x in operands]
  widest = max(types, key=lambda t: len(t.manual_axis_type.varying))
  return widest.update(shape=shape.shape, dtype=shape.dtype, weak_type=False)


def call(
  name: str,
  results: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
  *operands: Any,
  input_output_aliases: dict[int, int] | None = None,
  **attributes: Any,
) -> Any:
  """Calls the FFI target ``name`` as :data:`TARGETS` declares it.

  Args:
    name: a target of :data:`TARGETS`.
    results: the result shapes and dtypes, one per declared result (or a single one when the
      target has one result, which is then returned as an array).
    *operands: the declared operands, in order.
    input_output_aliases: as for ``jax.ffi.ffi_call``.
    **attributes: the declared attributes (numpy scalars and arrays).

  Raises:
    TypeError: the operands, attributes or results do not match the declaration.
  """
  target = TARGETS[name]
  single = isinstance(results, jax.ShapeDtypeStruct)
  shapes = (results,) if single else tuple(results)
  if len(operands) != len(target.operands) or set(attributes) != set(target.attributes):
    raise TypeError(
      f"{name} takes operands {target.operands} and attributes {target.attributes}; got "
      f"{len(operands)} operands and attributes {tuple(sorted(attributes))}"
    )
  if len(shapes) != len(target.results):
    raise TypeError(f"{name} returns {target.results}; got {len(shapes)} result shapes")
  typed = tuple(_result_type(s, operands) for s in shapes)
  ffi = jax.ffi.ffi_call(
    name,
    typed[0] if single else typed,
    vmap_method=target.vmap_method,
    input_output_aliases=input_output_aliases,
  )
  return ffi(*operands, **attributes)


def cpu_isa() -> str | None:
  """The instruction set of the CPU kernels' vector code ("avx512", "avx2", "portable"), or None."""
  module = _extension("cpu")
  return None if module is None else module.cpu_isa()
