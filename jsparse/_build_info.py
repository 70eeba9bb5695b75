"""What this installation of jsparse was built with."""

from __future__ import annotations

from typing import Any

import jax
import jaxlib

from jsparse import _ffi
from jsparse.ops import _backend


def build_info() -> dict[str, Any]:
  """Describes the installation.

  Returns:
    A dict with ``cpu_ffi`` (the CPU extension is built and its targets registered),
    ``cuda_ffi`` (the CUDA extension was built; usable only where jax has a CUDA backend),
    ``ffi_targets`` (the targets of each built extension, by platform), ``backend``
    (the backend in force), ``cpu_isa`` (the instruction set of the CPU kernels: "avx512",
    "avx2" or "portable", picked at load time; ``$JSPARSE_CPU_ISA`` can lower it), ``jax_version``,
    ``jaxlib_version``, ``jax_platform``.

  >>> sorted(build_info())[:3]
  ['backend', 'cpu_ffi', 'cpu_isa']
  """
  targets = {platform: sorted(_ffi.targets(platform)) for platform in ("cpu", "cuda")}
  return {
    "cpu_ffi": bool(targets["cpu"]),
    "cuda_ffi": _ffi.built("cuda"),
    "ffi_targets": targets,
    "backend": _backend.current_backend(),
    "cpu_isa": _ffi.cpu_isa(),
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "jax_platform": jax.default_backend(),
  }
