"""A benchmark's table: fixed-width columns, the first (the case) left-aligned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def row(columns: Sequence[tuple[str, int]], *cells: Any, digits: int = 3) -> str:
  """One line: each cell right-aligned in its ``(name, width)`` column (the first left-aligned);
  floats with ``digits`` decimals, ``None`` blank."""
  text = []
  for index, ((_, width), cell) in enumerate(zip(columns, cells)):
    cell = "" if cell is None else f"{cell:.{digits}f}" if isinstance(cell, float) else str(cell)
    text.append(f"{cell:<{width}}" if index == 0 else f"{cell:>{width}}")
  return "".join(text)


def header(columns: Sequence[tuple[str, int]]) -> str:
  return row(columns, *(name for name, _ in columns))
