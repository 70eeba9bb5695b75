"""Every notebook in notebooks/ is committed without outputs and executes top to bottom (their cells
assert what they show)."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


def stored_state_problems(notebook: nbformat.NotebookNode) -> list[str]:
  """What keeps ``notebook`` from being committed as is: outputs, execution counts, a kernel other
  than python3 (the one the execution test and CI start)."""
  problems = []
  kernel = notebook.metadata.get("kernelspec", {}).get("name")
  if kernel != "python3":
    problems.append(f"kernelspec name is {kernel!r}, not 'python3'")
  for number, cell in enumerate(notebook.cells):
    if cell.cell_type != "code":
      continue
    found = []
    if cell.get("outputs"):
      found.append(f"{len(cell.outputs)} output(s)")
    if cell.get("execution_count") is not None:
      found.append(f"execution_count {cell.execution_count}")
    if found:
      problems.append(f"code cell {number} ({cell.get('id', 'no id')}): {', '.join(found)}")
  return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  problems = stored_state_problems(notebook)
  assert not problems, (
    f"{path.name} must be committed without outputs and execution counts, with the python3 kernel "
    "(clear them: Jupyter's 'Clear All Outputs', or `jupyter nbconvert --clear-output --inplace`):\n  "
    + "\n  ".join(problems)
  )


def test_stored_state_check_finds_outputs():
  """The check above can fail: an executed cell and a foreign kernel are reported."""
  notebook = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "conda-env", "display_name": "x"}})
  cell = nbformat.v4.new_code_cell("1 + 1", execution_count=3)
  cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)]
  notebook.cells = [nbformat.v4.new_markdown_cell("# title"), cell, nbformat.v4.new_code_cell("pass")]
  assert stored_state_problems(notebook) == [
    "kernelspec name is 'conda-env', not 'python3'",
    f"code cell 1 ({cell.id}): 1 output(s), execution_count 3",
  ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  resources = {"metadata": {"path": str(path.parent)}}
  NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
