"""The README's snippets: the quickstart runs as pasted, and each integration snippet is an
excerpt of the example script it links to (so that examples/ keeps it from rotting)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_quickstart_runs_as_pasted(tmp_path):
    quickstart = _blocks(README.split("## Quickstart", 1)[1])[0]
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_integration_snippets_are_excerpts_of_their_examples():
    section = README.split("## Where you train", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(
        r"\(\[`(examples/\w+\.py)`\]\(examples/\w+\.py\)\):\n\n```python\n(.*?)```", section, re.S
    )
    assert len(pairs) == 4  # Lightning, the Hugging Face Trainer, accelerate, Fabric
    for example, snippet in pairs:
        source = " ".join((ROOT / example).read_text().split())
        for line in snippet.splitlines():
            code = line.split("#")[0].strip().rstrip(",")
            if code and code != "...":
                # each statement of the snippet appears in the example, up to whitespace
                assert " ".join(code.split()) in source or _names_in(code, source), (example, line)


def _names_in(code: str, source: str) -> bool:
    """A statement whose arguments are split over lines in the example: every identifier and
    keyword argument in it appears there."""
    return all(token in source for token in re.findall(r"[A-Za-z_][\w.]*=?", code))
