"""The compiled XLA FFI extensions: one registry for every target on every platform.

Each extension module (``_ffi_cpu``, ``_ffi_cuda``) exposes ``registrations()``, a dict from
target name to handler capsule. Targets are registered with XLA on first use, not at import, so
``import jsparse`` stays cheap and silent, and a missing extension means the reference path.
"""

from __future__ import annotations

import functools
import importlib

import jax

# platform (as jax.lax.platform_dependent names it) -> (extension module, XLA platform name)
_EXTENSIONS = {"cpu": ("jsparse._ffi_cpu", "cpu"), "cuda": ("jsparse._ffi_cuda", "CUDA")}


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
  """Registers the extension's targets for ``platform`` (once) and returns their names."""
  module = _extension(platform)
  if module is None:
    return frozenset()
  registrations = module.registrations()
  for name, capsule in registrations.items():
    jax.ffi.register_ffi_target(name, capsule, platform=_EXTENSIONS[platform][1])
  return frozenset(registrations)


def platforms_with(target: str) -> tuple[str, ...]:
  """The platforms on which ``target`` is built and registered."""
  return tuple(p for p in _EXTENSIONS if target in targets(p))


def cpu_isa() -> str | None:
  """The instruction set of the CPU kernels' vector code ("avx512", "avx2", "portable"), or None."""
  module = _extension("cpu")
  return None if module is None else module.cpu_isa()
