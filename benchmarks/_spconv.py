"""spconv 2.3.8 on the CPU, single-threaded: the baseline that the benchmarks measure beside jsparse.

Install with ``pip install torch==2.13.0 spconv==2.3.8`` (the CPU wheels). spconv's CPU-only build
has one algorithm, ``ConvAlgo.Native`` (its layers assert it): the kernel map is built in C++
(``SpconvOps.get_indice_pairs``: a hash table over the input sites, pairs ``[2, K, N]`` grouped by
kernel offset) and the convolution is a Python loop over the offsets, each a C++ gather, a
``torch.mm`` and a C++ scatter-add. The implicit-GEMM algorithms (``MaskImplicitGemm`` and its
masks, sorted pair tables) are CUDA only, so on the CPU "map building" means the native pair
table, which ``spconv.pytorch.ops.get_indice_pairs`` builds on its own.

The CPU kernels are only correct single-threaded. spconv's extension carries its own OpenMP
runtime, which reads ``OMP_NUM_THREADS`` once, when it loads: :func:`available` sets it to 1
around the first import, and every measurement also calls ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

_modules: tuple[ModuleType, ModuleType, ModuleType] | None = None


def _load() -> tuple[ModuleType, ModuleType, ModuleType]:
  """Imports ``(torch, spconv.pytorch, spconv.pytorch.ops)`` once, with OpenMP at one thread."""
  global _modules
  if _modules is None:
    if "spconv.core_cc" in sys.modules and os.environ.get("OMP_NUM_THREADS") != "1":
      warnings.warn(
        "spconv was imported before OMP_NUM_THREADS=1 was set: its CPU kernels may run multi-threaded",
        stacklevel=3,
      )
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read once, when spconv's OpenMP runtime loads
    try:
      import spconv.pytorch as spconv
      import torch
      from spconv.pytorch import ops
    finally:
      if previous is None:
        del os.environ["OMP_NUM_THREADS"]
      else:
        os.environ["OMP_NUM_THREADS"] = previous
    _modules = torch, spconv, ops
  _modules[0].set_num_threads(1)
  return _modules


def available() -> bool:
  """Whether torch and spconv import (never raises)."""
  try:
    _load()
  except Exception:
    return False
  return True


def calls(
  indices: np.ndarray, spatial_shape: Sequence[int], batch_size: int, channels: int, seed: int = 0
) -> dict[str, Callable[[], Any]]:
  """spconv's 3-D layers on ``indices int32 [N, 4]`` (batch, z, y, x) as zero-argument calls, to
  be timed single-threaded beside jsparse.

  Args:
    indices: active sites, unique, column 0 the batch index.
    spatial_shape: the grid, 3 ints in the order of the coordinate columns.
    batch_size: number of samples.
    channels: ``C``; both convolutions map ``C -> C`` without bias, on float32 features ``[N, C]``.
    seed: seed of the random features.

  Returns:
    - ``subm_map``: the SubM 3x3x3 kernel map alone.
    - ``subm_forward``: ``SubMConv3d(C, C, 3)`` forward reusing that map (cached under its
      ``indice_key``), so only the convolution runs.
    - ``conv_forward``: ``SparseConv3d(C, C, 3, stride=2, padding=1)`` forward, map building
      included.
    - ``conv_map``: that strided conv's kernel map alone.
  """
  torch, spconv, ops = _load()
  from spconv.core import ConvAlgo

  indices_t = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int32))
  shape = [int(n) for n in spatial_shape]
  rng = np.random.default_rng(seed)
  features = torch.from_numpy(rng.standard_normal((indices_t.shape[0], channels)).astype(np.float32))
  subm = spconv.SubMConv3d(channels, channels, 3, bias=False, indice_key="subm")
  down = spconv.SparseConv3d(channels, channels, 3, stride=2, padding=1, bias=False)

  def build_map(layer: Any) -> Any:
    # Exactly the call a Native layer makes when its map is not cached (spconv/pytorch/conv.py).
    assert layer.algo == ConvAlgo.Native, layer.algo
    return ops.get_indice_pairs(
      indices_t, batch_size, shape, layer.algo, layer.kernel_size, layer.stride, layer.padding,
      layer.dilation, layer.output_padding, layer.subm, layer.transposed,
    )  # fmt: skip

  def fresh() -> Any:
    return spconv.SparseConvTensor(features, indices_t, shape, batch_size)

  def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
      torch.set_num_threads(1)
      with torch.no_grad():
        return fn()

    return call

  with torch.no_grad():
    cached = fresh()
    cached.indice_dict = subm(cached).indice_dict  # the map under "subm": reused from now on
  return {
    "subm_map": no_grad(lambda: build_map(subm)),
    "subm_forward": no_grad(lambda: subm(cached)),
    "conv_forward": no_grad(lambda: down(fresh())),
    "conv_map": no_grad(lambda: build_map(down)),
  }
