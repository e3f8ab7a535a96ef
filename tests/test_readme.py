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


def test_python_example_runs_as_written(tmp_path):
    example = blocks("python")
    assert example, "README has no Python example"
    result = subprocess.run(
        [sys.executable, "-c", example[0]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "(1, 2) float32" in result.stdout
    assert "refused:" in result.stdout
