"""The README is for users: its commands are what CI runs, and its Python example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_setup_and_test_commands():
    setup, test = blocks("bash")[0].strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert setup in ci, "README's setup command differs from .ci/run"
    assert test in ci, "README's test command differs from .ci/run"
    assert ci.index(setup) < ci.index(test)


def test_examples_run_as_written(tmp_path):
    """The encode example (on the packaged dewey-mini), then the CLI lines of the export section, then the
    ONNX Runtime example, in one folder, exactly as a user would paste them."""
    python = blocks("python")
    cli = [line for line in blocks("bash")[1].splitlines() if line.startswith("dewey-export")]
    assert len(python) >= 2 and cli, "README lost its examples"

    def run(command):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    first = run([sys.executable, "-c", python[0]])
    assert "(1, 2) float32" in first and "refused:" in first
    for line in cli:
        run([str(Path(sys.executable).parent / "dewey-export"), *line.split()[1:]])
    assert "(1, 384)" in run([sys.executable, "-c", python[1]])
