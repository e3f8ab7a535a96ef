"""Text every machine has, and the one reader of documents from files: the torch-free core of training
data, the quality gate's texts and the evaluation filler.

Sources are plain-text files (``.txt``, ``.md``, ``.rst``: one document per file, in training, embedding
and the quality gate alike), JSONL files (one ``{"text": ...}`` record per document), folders of them,
or ``"stdlib"``, the built-in corpus. Documents stream from their sources one at a time. The train /
held-out split is by document and stable: a document is held out when the hash of its text falls under
``heldout_fraction``, so the same text lands on the same side in every run, on every machine, whatever
the order of the sources.

The built-in corpus (``"stdlib"``) is real English text found on every Python installation: the
topics of the Python documentation (``pydoc_data.topics``) and the docstrings of the standard library,
read from its source files with ``ast`` (no module is imported: some run code on import). Each module
makes one document (its docstring, then its classes' and functions' docstrings in source order, each
under a heading line), each documentation topic another. Docstrings are cleaned (``inspect.cleandoc``)
and de-duplicated: a docstring met before (after whitespace normalisation) is dropped, and so is a
whole document met before.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import BadInputError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
STDLIB = "stdlib"
# Trees of the standard library that are tests, demos or bundled third-party code, not documentation.
_SKIPPED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                         "lib2to3", "turtledemo", "ensurepip", "__phello__", "pydoc_data"}
_MIN_DOCSTRING_CHARS = 40
# The share of documents held out of training (dewey_train's default heldout_fraction): the quality
# gate's default texts are the built-in corpus's held-out documents, which a model trained on it never saw.
DEFAULT_HELDOUT_FRACTION = 0.05


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_heldout(text: str, fraction: float) -> bool:
    """Stable document-level split: the first 8 bytes of the text's SHA-256 as a number in [0, 1)."""
    return int(text_hash(text)[:16], 16) / 2**64 < fraction


def _normalise_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}:{number}: not valid JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BadInputError(f'{path}:{number}: expected an object with a string "text" field')
            yield record["text"]


def iter_source(source: str | Path) -> Iterator[str]:
    """The documents of one source: ``"stdlib"``, a JSONL file, a text file, or a folder of them."""
    if str(source) == STDLIB:
        yield from stdlib_corpus()
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise BadInputError(f"{path} holds no {TEXT_SUFFIXES + JSONL_SUFFIXES} files")
        for file in files:
            yield from iter_source(file)
    elif path.is_file():
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _read_jsonl(path)
        else:
            yield path.read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(f"data source {source} does not exist (give files, folders, *.jsonl or 'stdlib')")


def iter_documents(sources: Iterable[str | Path]) -> Iterator[str]:
    """Every non-empty document of every source, in order, exact duplicates dropped."""
    seen = set()
    for source in sources:
        for text in iter_source(source):
            if not text.strip():
                continue
            key = text_hash(text)
            if key in seen:
                continue
            seen.add(key)
            yield text


def split_documents(sources: Iterable[str | Path], heldout_fraction: float) -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for text in iter_documents(sources):
        (heldout if is_heldout(text, heldout_fraction) else train).append(text)
    return train, heldout


# -- the built-in corpus ------------------------------------------------------------------------


def python_doc_topics() -> list[str]:
    """The pages of the Python documentation's topics (``pydoc_data.topics``, shipped with every Python),
    in key order: real English text that needs no download."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]



def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & _SKIPPED_STDLIB_PARTS or path.name.startswith("test_"):
            continue
        files.append(path)
    return files


def _module_document(path: Path, module: str, seen: set[str]) -> str | None:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    sections = []

    def add(heading: str, node) -> None:
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            return
        doc = inspect.cleandoc(doc)
        key = _normalise_space(doc)
        if len(key) < _MIN_DOCSTRING_CHARS or key in seen:
            return
        seen.add(key)
        sections.append(f"{heading}\n{doc}" if heading else doc)

    add(f"Module {module}", tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            add(f"class {node.name}", node)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    add(f"{node.name}.{item.name}()", item)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.col_offset == 0:
            if not node.name.startswith("_"):
                add(f"{node.name}()", node)
    return "\n\n".join(sections) if sections else None


def stdlib_corpus() -> Iterator[str]:
    """The built-in corpus: Python documentation topics, then one document per standard-library module."""
    seen: set[str] = set()
    for topic in python_doc_topics():
        text = topic.strip()
        normalised = _normalise_space(text)
        if len(normalised) >= _MIN_DOCSTRING_CHARS and normalised not in seen:
            seen.add(normalised)
            yield text
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        doc = _module_document(path, module, seen)
        if doc:
            yield doc


def corpus_stats(documents: list[str], count_tokens=None) -> dict:
    """Documents, characters and (with a token counter) tokens of a corpus, with the Python version
    that supplied it (the built-in corpus differs a little between Python releases)."""
    stats = {
        "documents": len(documents),
        "characters": sum(len(d) for d in documents),
        "python": sys.version.split()[0],
        "sha256": hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()[:16],
    }
    if count_tokens is not None and documents:
        counts = count_tokens(documents)
        ordered = sorted(counts)
        stats.update(
            tokens=int(sum(counts)),
            tokens_median=int(ordered[len(ordered) // 2]),
            tokens_max=int(ordered[-1]),
            documents_over_1k_tokens=sum(c > 1024 for c in counts),
        )
    return stats
