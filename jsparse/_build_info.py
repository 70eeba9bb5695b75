"""What this installation of jsparse was built with."""

from __future__ import annotations

from typing import Any

import jax
import jaxlib

from jsparse import _ffi
from jsparse.ops import _backend

# What a layer needs to run on a device's kernels: building kernel maps and the convolution,
# forward and backward.
_CONV_PATH = frozenset(
  {
    "jsparse_kmap_build",
    "jsparse_kmap_neighbors",
    "jsparse_kmap_output_sites",
    "jsparse_conv_gather_gemm",
    "jsparse_conv_weight_grad",
    "jsparse_conv_backward_symmetric",
  }
)


def build_info() -> dict[str, Any]:
  """Describes the installation.

  Returns:
    A dict with ``cpu_ffi`` and ``cuda_ffi`` (that platform's extension is built with the kernel
    maps and the convolution, forward and backward; CUDA kernels run only where jax has a CUDA
    backend), ``ffi_targets`` (the targets of ``jsparse._ffi.TARGETS`` each platform's extension
    provides; the others run on the reference path there), ``backend`` (the backend in force),
    ``cpu_isa`` (the instruction set of the CPU kernels: "avx512", "avx2" or "portable", picked at
    load time; ``$JSPARSE_CPU_ISA`` can lower it), ``jax_version``, ``jaxlib_version``,
    ``jax_platform``.

  >>> sorted(build_info())[:3]
  ['backend', 'cpu_ffi', 'cpu_isa']
  """
  targets = {platform: sorted(_ffi.targets(platform)) for platform in _ffi.PLATFORMS}
  return {
    "cpu_ffi": _CONV_PATH <= set(targets["cpu"]),
    "cuda_ffi": _CONV_PATH <= set(targets["cuda"]),
    "ffi_targets": targets,
    "backend": _backend.current_backend(),
    "cpu_isa": _ffi.cpu_isa(),
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "jax_platform": jax.default_backend(),
  }
