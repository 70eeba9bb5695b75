"""Importing spconv 2.3.8 for the oracle tests: one OpenMP thread, or the test module skips.

With ``JSPARSE_REQUIRE_SPCONV=1`` (``make test-spconv`` sets it) a missing torch or spconv fails the
test module instead of skipping it, so that CI cannot pass without running the oracles.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ENV = "JSPARSE_REQUIRE_SPCONV"


def _import(name: str) -> ModuleType:
  if os.environ.get(REQUIRE_ENV) == "1":
    try:
      return importlib.import_module(name)
    except ImportError as error:
      reason = f"{type(error).__name__}: {error}"
    # Outside the except clause: the report shows this message alone, not the ImportError's chain too.
    pytest.fail(
      f"{REQUIRE_ENV}=1 but {name} cannot be imported ({reason}); `make test-spconv` installs "
      "torch==2.13.0 and spconv==2.3.8",
      pytrace=False,
    )
  return pytest.importorskip(name)


def import_spconv(module: str) -> tuple[ModuleType, ModuleType]:
  """``(torch, module)``, e.g. ``module="spconv.pytorch"``, with spconv's CPU kernels on one thread
  (its only correct setting); skips the calling test module where torch or spconv is missing (fails
  it instead when ``JSPARSE_REQUIRE_SPCONV=1``)."""
  previous = os.environ.get("OMP_NUM_THREADS")
  os.environ["OMP_NUM_THREADS"] = "1"  # read once, when spconv's bundled OpenMP runtime loads
  try:
    return _import("torch"), _import(module)
  finally:
    if previous is None:
      del os.environ["OMP_NUM_THREADS"]
    else:
      os.environ["OMP_NUM_THREADS"] = previous
