"""Importing spconv 2.3.8 for the oracle tests: one OpenMP thread, or the test module skips."""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def import_spconv(module: str) -> tuple[ModuleType, ModuleType]:
  """``(torch, module)``, e.g. ``module="spconv.pytorch"``, with spconv's CPU kernels on one thread
  (its only correct setting); skips the calling test module where torch or spconv is missing."""
  previous = os.environ.get("OMP_NUM_THREADS")
  os.environ["OMP_NUM_THREADS"] = "1"  # read once, when spconv's bundled OpenMP runtime loads
  try:
    return pytest.importorskip("torch"), pytest.importorskip(module)
  finally:
    if previous is None:
      del os.environ["OMP_NUM_THREADS"]
    else:
      os.environ["OMP_NUM_THREADS"] = previous
