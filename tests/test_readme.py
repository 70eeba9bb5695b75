"""The README's quickstart runs as written and prints what it says."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_prints_its_comments():
  text = README.read_text()
  commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  assert [line.split()[:2] for line in commands.splitlines()] == [["make", "demo"], ["make", "test"]]
  code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(code, str(README), "exec"), {})
  claimed = [m.group(1).strip() for m in re.finditer(r"^print\(.*?\)\s+# (.*)$", code, re.M)]
  assert [line.strip() for line in printed.getvalue().splitlines()] == [c.split(":")[0] for c in claimed]
