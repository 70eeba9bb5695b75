"""The README's two commands, and its code blocks run as written and print what they say."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_two_commands_come_first():
  commands = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
  assert [line.split()[:2] for line in commands.splitlines()] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("section", ["Quickstart", "From points to a trained network"])
def test_code_runs_and_prints_its_comments(section, monkeypatch):
  match = re.search(rf"## {section}\n\n(?:[^#]*?\n\n)?```python\n(.*?)```", README.read_text(), re.S)
  assert match, f"README.md has no python block right under '## {section}'"
  code = match.group(1)
  monkeypatch.chdir(README.parent)  # paths in the README are relative to the repository
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(code, str(README), "exec"), {})
  claimed = [m.group(1).strip() for m in re.finditer(r"^print\(.*?\)\s+# (.*)$", code, re.M)]
  assert claimed, "each block prints something and says what in a comment"
  assert [line.strip() for line in printed.getvalue().splitlines()] == [c.split(":")[0] for c in claimed]


def test_linked_files_exist():
  for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
    if not target.startswith("http"):
      assert (README.parent / target).exists(), f"README.md links to {target}, which is missing"
