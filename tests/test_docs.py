"""The docs stay in step with the code: links resolve, every keyword of the public API is documented,
and nothing points at files outside the repository."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def _keywords(function) -> list[str]:
    return [name for name, p in inspect.signature(function).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def test_api_reference_names_every_keyword():
    from runtimes import Encoder, load

    reference = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for function in (load, Encoder.encode, Encoder.encode_chunks):
        undocumented = [k for k in _keywords(function) if f"`{k}" not in reference and f"{k}=" not in reference]
        assert not undocumented, f"docs/api.md does not describe {function.__qualname__}({undocumented})"


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\b(DESIGN|FACTS|DEWEY|STYLE)\.md\b|\.\./shared")
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".json", ".txt"} or "models" in path.parts or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line) and path.name != "test_docs.py":
                offenders.append(f"{name}:{number}")
    assert not offenders, f"lines pointing at files outside the repository: {offenders}"
