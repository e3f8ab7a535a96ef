"""runtimes.integrations: importing it loads none of the libraries, a missing library names its extra, and
the small corpus the adapter tests share (the stdlib's documentation, offline)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Pages of Python's reference (pydoc_data.topics), cut to about 350 tokens: several chunks each at the
# tests' chunk size of 128 tokens, and quick to encode on dewey-mini.
TOPICS = ("assert", "import", "with", "for", "try", "class", "lambda", "global")
DOCUMENT_CHARS = 1500
# Questions that open a sentence of one page (verbatim), and that page's topic.
QUESTIONS = (
    ('The "with" statement guarantees that if the "__enter__()" method', "with"),
    ('The basic import statement (no "from" clause) is executed in two', "import"),
    ('The "try" statement specifies exception handlers and/or cleanup code', "try"),
)
CHUNK_SIZE, CHUNK_OVERLAP = 128, 32  # tokens: three or four chunks per page
ADAPTERS = {
    "runtimes.integrations.langchain": ("langchain_core", "langchain"),
    "runtimes.integrations.llamaindex": ("llama_index", "llamaindex"),
    "runtimes.integrations.mteb": ("mteb", "mteb"),
}


def corpus() -> dict[str, str]:
    """topic -> the start of its page."""
    from pydoc_data.topics import topics

    return {name: topics[name][:DOCUMENT_CHARS] for name in TOPICS}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_package_imports_no_library():
    code = ("import sys, runtimes.integrations, runtimes.integrations.common\n"
            "print(sorted(m for m in ('langchain_core', 'llama_index', 'mteb', 'torch') if m in sys.modules))")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", sorted(ADAPTERS))
def test_missing_library_names_its_extra(module):
    library, extra = ADAPTERS[module]
    # A None entry in sys.modules makes `import library` raise ImportError, as if it were not installed.
    code = (f"import sys; sys.modules[{library!r}] = None\n"
            f"try:\n    import {module}\nexcept ImportError as error:\n    print(error)\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert f"pip install 'dewey[{extra}]'" in result.stdout, result.stdout


def test_standard_prompts_the_model_does_not_declare_are_dropped():
    from types import SimpleNamespace

    from runtimes.config import DEWEY_PROMPTS
    from runtimes.integrations.common import model_prompt

    without = SimpleNamespace(config=SimpleNamespace(prompts={}))
    declaring = SimpleNamespace(config=SimpleNamespace(prompts=dict(DEWEY_PROMPTS)))
    assert model_prompt(without, "query") is None and model_prompt(without, "passage") is None
    assert model_prompt(declaring, "query") == "query" and model_prompt(declaring, "passage") == "passage"
    assert model_prompt(without, "Represent this text: ") == "Represent this text: "  # a literal prompt
    assert model_prompt(declaring, None) is None
