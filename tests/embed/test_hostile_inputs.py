"""dewey-embed against hostile or careless input (issue 22): the same corpus spelt differently,
huge documents, symbolic links, earlier outputs inside the corpus, FIFOs and devices, user folders that
look like temporary ones, bad --glob patterns, and a precision the machine runs differently on resume.
Every refusal is exit 2 with one line and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="dewey-embed writes Parquet: pip install pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3
SUBPROCESS_TIMEOUT_S = 120
# A process id above Linux's largest (pid_max is at most 2**22): no process has it, so a temporary name
# carrying it reads as a dead writer's.
DEAD_PID = 2 ** 22 + 1


def one_line(result) -> str:
    """The single line of a refusal: exit 2, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def ids(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "documents", columns=["id"])["id"].to_pylist())


@pytest.fixture
def three_files(tmp_path):
    corpus = tmp_path / "in"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("The first document.", encoding="utf-8")
    (corpus / "b.md").write_text("# The second\n\nA Markdown document.", encoding="utf-8")
    (corpus / "sub" / "c.txt").write_text("The third, one folder down.", encoding="utf-8")
    return corpus


# -- 1: ids from names relative to the INPUT root ------------------------------------------------------


def test_the_same_files_spelt_differently_are_embedded_once(three_files, checkpoint, embed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = embed(three_files, "--out", out, "--model", checkpoint)  # an absolute path
    assert first.exit_code == 0, first.output
    assert ids(out) == ["a.txt", "b.md", "sub/c.txt"]
    sources = pq.read_table(out / "documents", columns=["source"])["source"].to_pylist()
    assert sorted(sources) == sorted(str(three_files / name) for name in ("a.txt", "b.md", "sub/c.txt"))

    monkeypatch.chdir(tmp_path)
    assert embed("./in/", "--out", "out", "--model", checkpoint).exit_code == 0
    monkeypatch.chdir(three_files / "sub")  # another working folder
    again = embed("..", "--out", "../../out", "--model", checkpoint)
    assert again.exit_code == 0 and "0 documents embedded" in again.stderr and "3 already in" in again.stderr
    assert ids(out) == ["a.txt", "b.md", "sub/c.txt"]  # 3 rows, not 9


def test_a_file_keeps_its_name_when_another_root_names_it(three_files, checkpoint, embed, tmp_path):
    """A resume from a subfolder, one file, or the parent folder maps each file to the id it has in OUT."""
    out = tmp_path / "out"
    assert embed(three_files, "--out", out, "--model", checkpoint).exit_code == 0
    for inputs in ([three_files / "sub"], [three_files / "sub" / "c.txt"], [tmp_path]):
        result = embed(*inputs, "--out", out, "--model", checkpoint)
        assert result.exit_code == 0 and "0 documents embedded" in result.stderr, (inputs, result.output)
    assert ids(out) == ["a.txt", "b.md", "sub/c.txt"]

    # The other way round: a file first, then its folder.
    other = tmp_path / "other"
    assert embed(three_files / "sub" / "c.txt", "--out", other, "--model", checkpoint).exit_code == 0
    assert ids(other) == ["c.txt"]
    result = embed(three_files, "--out", other, "--model", checkpoint)
    assert result.exit_code == 0 and "2 documents embedded" in result.stderr, result.output
    assert ids(other) == ["a.txt", "b.md", "c.txt"]


def test_an_out_of_the_earlier_id_scheme_is_refused(three_files, checkpoint, embed, tmp_path):
    out = tmp_path / "out"
    assert embed(three_files, "--out", out, "--model", checkpoint).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert "another version of dewey-embed" in one_line(embed(three_files, "--out", out, "--model", checkpoint))
    assert embed(three_files, "--out", out, "--model", checkpoint, "--overwrite").exit_code == 0


# -- 2: bounded work per document ----------------------------------------------------------------------


class CountingTokenizer:
    """A tokenizers.Tokenizer that records how many characters each call was given."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls: list[int] = []

    def encode(self, text, *args, **kwargs):
        self.calls.append(len(text))
        return self._tokenizer.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self.calls.extend(len(text) for text in texts)
        return self._tokenizer.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture
def counting(checkpoint):
    """An Encoder of the test checkpoint whose tokenizer records the characters of each call."""
    from runtimes import load

    encoder = load(checkpoint, backend="torch")
    encoder.tokenizer.tokenizer = CountingTokenizer(encoder.tokenizer.tokenizer)
    return encoder


def huge_text(chars: int) -> str:
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    return (text * (chars // len(text) + 1))[:chars]


def test_encode_tokenizes_only_what_it_keeps(counting):
    from runtimes.encoder import TruncationWarning
    from runtimes.tokenization import TOKENIZE_PIECE_CHARS

    text = huge_text(2_000_000)
    with pytest.warns(TruncationWarning, match="not counted"):
        vector = counting.encode(text, max_length=64)
    calls = counting.tokenizer.tokenizer.calls
    assert max(calls) <= TOKENIZE_PIECE_CHARS and sum(calls) <= 2 * TOKENIZE_PIECE_CHARS, calls
    assert np.isfinite(vector).all()


def test_encode_chunks_windows_a_huge_text_piece_by_piece(counting):
    """encode_chunks embeds every token of a long text (in windows), yet never hands the tokenizer more
    than a piece."""
    import warnings

    from runtimes.tokenization import TOKENIZE_PIECE_CHARS

    text = huge_text(300_000)
    total = len(counting.tokenizer.tokenizer._tokenizer.encode(text, add_special_tokens=False).ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        document = counting.encode_chunks(text, chunk_size=256, chunk_overlap=64, max_length=4096)
    assert document.truncated_tokens == 0 and document.n_tokens == total and document.windows > 1
    assert document.token_spans[-1][1] == total
    assert max(counting.tokenizer.tokenizer.calls[1:]) <= TOKENIZE_PIECE_CHARS  # [0]: the short test above


@pytest.mark.parametrize("piece", [8, 16, 64])
def test_tokens_in_pieces_equal_one_call(checkpoint, piece, monkeypatch):
    """The piecewise tokenization gives the tokens and offsets of one call over the whole text, for any
    prefix limit: words, punctuation, CJK, emoji, combining marks, whitespace runs, added tokens cut by
    a piece's end, and dropped characters."""
    import random

    import runtimes.tokenization as tokenization
    from runtimes.config import load_config

    monkeypatch.setattr(tokenization, "TOKENIZE_PIECE_CHARS", piece)
    tokenizer = tokenization.DeweyTokenizer.from_folder(checkpoint, load_config(checkpoint))
    rng = random.Random(piece)
    atoms = list("ab c\n\t.,日本🙂é") + ["<|END_INSTRUCTION|>", "   ", "word ", "e\u0301", "\u200b", "x" * 120]
    for _ in range(150):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 120)))
        whole = tokenizer.tokenizer.encode(text, add_special_tokens=False)
        tokens = tokenizer.bounded_tokens(text)
        assert tokens.ids.tolist() == whole.ids and tokens.offsets.tolist() == [list(o) for o in whole.offsets], text
        limit = rng.randint(1, 40)
        cut = tokenizer.bounded_tokens(text, limit, count=False)
        assert cut.ids.tolist() == whole.ids[:limit]
        assert cut.cut == (len(whole.ids) > limit)
        assert tokenizer.bounded_tokens(text, limit).total == len(whole.ids)


def test_batch_embedder_never_tokenizes_a_huge_text_at_once(checkpoint):
    from dewey_embed.pipeline import BatchEmbedder, EmbedOptions
    from runtimes.tokenization import TOKENIZE_PIECE_CHARS

    options = EmbedOptions(mode="mean", prompt=None, chunks=False, chunk_size=256, chunk_overlap=64,
                           splitter="tokens", max_length=64, batch_tokens=4096)
    embedder = BatchEmbedder(str(checkpoint), "torch", None, options)
    counting = embedder.encoder.tokenizer.tokenizer = CountingTokenizer(embedder.encoder.tokenizer.tokenizer)
    text = huge_text(500_000)
    total = len(counting._tokenizer.encode(text, add_special_tokens=False).ids)
    result = embedder(pa.table({"id": ["huge"], "source": ["huge.txt"], "text": [text], "error": [None]}))
    assert max(counting.calls) <= TOKENIZE_PIECE_CHARS
    row = result.to_pylist()[0]
    assert row["status"] == "embedded" and (row["n_tokens"], row["truncated_tokens"]) == (62, total - 62)


def test_documents_over_the_size_limit_are_errors_unread(checkpoint, embed, read_output, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "big.txt").write_text("word " * 400, encoding="utf-8")  # 2,000 bytes
    (docs / "small.txt").write_text("A small document.", encoding="utf-8")
    (docs / "lines.jsonl").write_text(json.dumps({"id": "long", "text": "word " * 400}) + "\n"
                                      + json.dumps({"id": "short", "text": "fits"}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"id": ["wide", "narrow"], "text": ["word " * 400, "fits too"]}), docs / "rows.parquet")
    out = tmp_path / "out"
    result = embed(docs, "--out", out, "--model", checkpoint, "--max-document-bytes", 1000)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert sorted(read_output(out)[0]) == ["narrow", "short", "small.txt"]
    errors = {e["id"]: e["error"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors == {
        "big.txt": "the file is 2000 bytes, over the limit of 1000 bytes a document (--max-document-bytes); "
                   "it was not read",
        "lines.jsonl:1": errors["lines.jsonl:1"],
        "wide": errors["wide"],
    }
    assert errors["lines.jsonl:1"].startswith("line 1 is 2") and "--max-document-bytes" in errors["lines.jsonl:1"]
    assert errors["wide"].startswith("row 0 is 2000 bytes")


def test_a_window_holds_a_bounded_number_of_characters(tmp_path):
    from dewey_embed.inputs import Fields, InputFile, input_tables

    files = []
    for name in "abcde":
        (tmp_path / f"{name}.txt").write_text(name * 100, encoding="utf-8")
        files.append(InputFile(tmp_path / f"{name}.txt", f"{name}.txt"))
    tables = list(input_tables(files, Fields(), rows=256, max_chars=250))
    assert [table.num_rows for table in tables] == [3, 2]


# -- 4 and 5: what listing a folder leaves out ------------------------------------------------------------


def test_symlinks_out_of_the_root_are_skipped_and_said(checkpoint, embed, tmp_path):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.txt").write_text("SECRET from outside the corpus", encoding="utf-8")
    (outside / "folder" / "more.txt").write_text("MORE from outside the corpus", encoding="utf-8")
    corpus = tmp_path / "in"
    (corpus / "real").mkdir(parents=True)
    (corpus / "real" / "own.txt").write_text("A document of the corpus.", encoding="utf-8")
    (corpus / "leak.txt").symlink_to(outside / "secret.txt")
    (corpus / "leakdir").symlink_to(outside / "folder")
    (corpus / "alias.txt").symlink_to(corpus / "real" / "own.txt")  # inside: read, once
    (corpus / "inner").symlink_to(corpus / "real")  # a folder inside: walked, its file read once
    (corpus / "gone.txt").symlink_to(tmp_path / "missing.txt")

    out = tmp_path / "out"
    result = embed(corpus, "--out", out, "--model", checkpoint)
    assert result.exit_code == 0, result.output
    assert ids(out) == ["alias.txt"]  # real/own.txt and inner/own.txt are the same file
    assert f"skipped 2 symbolic link(s) in {corpus} leading outside it" in result.stderr
    assert "--follow-symlinks" in result.stderr and "skipped 1 broken symbolic link(s)" in result.stderr

    followed = tmp_path / "followed"
    result = embed(corpus, "--out", followed, "--model", checkpoint, "--follow-symlinks")
    assert result.exit_code == 0, result.output
    assert ids(followed) == ["alias.txt", "leak.txt", "leakdir/more.txt"]


def test_earlier_outputs_in_an_input_folder_are_not_read(checkpoint, embed, tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "doc.txt").write_text("The only document of the corpus.", encoding="utf-8")
    assert embed(corpus, "--out", corpus / "previous", "--model", checkpoint).exit_code == 0
    for folder, manifest in (("export", "dewey_export.json"), ("repository", "dewey_triton.json")):
        (corpus / folder).mkdir()
        (corpus / folder / manifest).write_text("{}", encoding="utf-8")
        (corpus / folder / "README.md").write_text("Not a document of the corpus.", encoding="utf-8")

    out = tmp_path / "out"
    result = embed(corpus, "--out", out, "--model", checkpoint)
    assert result.exit_code == 0, result.output
    assert ids(out) == ["doc.txt"]
    assert f"skipped {corpus / 'previous'}: a dewey-embed output" in result.stderr
    assert f"skipped {corpus / 'export'}: a dewey-export folder" in result.stderr
    assert f"skipped {corpus / 'repository'}: a dewey-export Triton repository" in result.stderr
    assert "is a dewey-embed output, not a corpus" in one_line(embed(corpus / "previous", "--out", tmp_path / "o2",
                                                                     "--model", checkpoint))


def test_the_triton_mark_is_the_exporters():
    pytest.importorskip("torch")
    from dewey_embed.inputs import TRITON_MANIFEST
    from dewey_export.triton import REPOSITORY_MANIFEST

    assert TRITON_MANIFEST == REPOSITORY_MANIFEST


# -- 6: regular files only -----------------------------------------------------------------------------------


def test_a_device_as_input_exits_2_before_out(checkpoint, embed, tmp_path):
    out = tmp_path / "out"
    line = one_line(embed("/dev/zero", "--out", out, "--model", checkpoint))
    assert line == ("Error: input /dev/zero is not a regular file or a folder (a device): "
                    "dewey-embed reads regular files only")
    assert not out.exists()


def test_a_fifo_as_input_exits_2_and_never_hangs(checkpoint, tmp_path, subprocess_env, cli_command):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    result = subprocess.run([*cli_command, str(fifo), "--out", str(out), "--model", str(checkpoint)],
                            env=subprocess_env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == EXIT_BAD_INPUT
    assert result.stderr.strip().splitlines() == [f"Error: input {fifo} is not a regular file or a folder (a FIFO): "
                                                  "dewey-embed reads regular files only"]
    assert not out.exists()


def test_a_fifo_in_a_folder_is_skipped_and_said(checkpoint, embed, tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "doc.txt").write_text("A document.", encoding="utf-8")
    os.mkfifo(corpus / "pipe.txt")
    result = embed(corpus, "--out", tmp_path / "out", "--model", checkpoint)
    assert result.exit_code == 0, result.output
    assert f"skipped 1 file(s) in {corpus} that are not regular files (first: {corpus / 'pipe.txt'}, a FIFO)" \
        in result.stderr
    assert ids(tmp_path / "out") == ["doc.txt"]


def test_a_fifo_put_in_place_after_listing_is_an_error_row(tmp_path):
    from dewey_embed.inputs import Fields, InputFile, read_file

    fifo = tmp_path / "late.txt"
    os.mkfifo(fifo)
    rows = list(read_file(InputFile(fifo, "late.txt"), Fields()))  # would block forever if opened plainly
    assert [row["error"] for row in rows] == ["cannot read the file: not a regular file (a FIFO): dewey-embed "
                                              "reads regular files only"]


# -- 7: cleanup removes only what dewey-embed writes ---------------------------------------------------------


def test_a_user_folder_named_like_a_leftover_is_never_removed(three_files, checkpoint, embed, tmp_path):
    # An OUT without a manifest holding a user's folder with a temporary-looking name: not ours, refused.
    foreign = tmp_path / "foreign"
    mine = foreign / f".notes.{DEAD_PID}.0123abcd.tmp"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("mine", encoding="utf-8")
    assert "is not a dewey-embed output" in one_line(embed(three_files, "--out", foreign, "--model", checkpoint))
    assert (mine / "keep.txt").read_text() == "mine"

    # Inside our own OUT: user folders matching the pattern stay; a dead run's temporary shard goes.
    out = tmp_path / "out"
    assert embed(three_files, "--out", out, "--model", checkpoint).exit_code == 0
    user_top = out / f".documents.{DEAD_PID}.0123abcd.tmp"
    user_shard = out / "documents" / f".part-000000.parquet.{DEAD_PID}.0123abcd.tmp"
    for folder in (user_top, user_shard):
        folder.mkdir()
        (folder / "keep.txt").write_text("mine", encoding="utf-8")
    leftover = out / "documents" / f".part-000007.parquet.{DEAD_PID}.89abcdef.tmp"
    leftover.write_bytes(b"half a shard")
    result = embed(three_files, "--out", out, "--model", checkpoint)
    assert result.exit_code == 0, result.output
    assert not leftover.exists() and f"removed {leftover}" in result.stderr
    assert (user_top / "keep.txt").is_file() and (user_shard / "keep.txt").is_file()


def test_an_out_holding_only_a_dead_runs_manifest_file_is_started(three_files, checkpoint, embed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f".manifest.json.{DEAD_PID}.0123abcd.tmp").write_text("{", encoding="utf-8")
    result = embed(three_files, "--out", out, "--model", checkpoint)
    assert result.exit_code == 0, result.output
    assert not list(out.glob(".manifest.json.*"))


# -- 8: bad --glob patterns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, message", [
    ("/etc/*", "patterns are relative to each INPUT folder"),
    ("", "an empty pattern matches nothing"),
    ("../*.txt", "patterns are relative to each INPUT folder"),
    ("a**.txt", "'**' must be a whole path component"),
])
def test_bad_glob_patterns_exit_2_with_one_line(three_files, checkpoint, embed, tmp_path, pattern, message):
    line = one_line(embed(three_files, "--out", tmp_path / "out", "--model", checkpoint, "--glob", pattern))
    assert line.startswith(f"Error: --glob {pattern!r}: ") and message in line
    assert not (tmp_path / "out").exists()


def test_glob_patterns_match_as_pathlib_does(three_files):
    from dewey_embed.inputs import list_files

    def names(*globs):
        return [file.name for file in list_files([three_files], globs)]

    assert names("*.txt") == ["a.txt"]
    assert names("**/*.txt") == ["a.txt", "sub/c.txt"]
    assert names("sub/*") == ["sub/c.txt"]
    assert names("**/*.md", "*.md") == ["b.md"]


# -- 10: the precision a resumed run really runs in ------------------------------------------------------


@pytest.fixture(scope="module")
def openvino_bf16(checkpoint, tmp_path_factory):
    """The test checkpoint exported to OpenVINO in bf16 (unverified: only the precision matters here)."""
    openvino = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    pytest.importorskip("torch")
    from dewey_export.openvino_export import OpenVINOTarget
    from dewey_export.pipeline import export
    from runtimes.backends.openvino_backend import cpu_has_bf16

    if not cpu_has_bf16(openvino.Core()):
        pytest.skip("this CPU has no native bfloat16: a bf16 run cannot be started here to be resumed")
    folder = tmp_path_factory.mktemp("ov") / "tiny-openvino-bf16"
    return export(checkpoint, folder, OpenVINOTarget(precision="bf16"), verify=False, log=lambda message: None).folder


def test_a_bf16_run_resumed_where_the_cpu_runs_fp32_is_refused(openvino_bf16, three_files, embed, tmp_path,
                                                                 monkeypatch):
    from runtimes.backends import openvino_backend

    out = tmp_path / "out"
    first = embed(three_files, "--out", out, "--model", openvino_bf16, "--backend", "openvino")
    assert first.exit_code == 0, first.output
    assert json.loads((out / "manifest.json").read_text())["settings"]["precision"] == "bf16"

    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda core: False)  # a CPU without bfloat16
    line = one_line(embed(three_files, "--out", out, "--model", openvino_bf16, "--backend", "openvino"))
    assert "precision: 'bf16' -> 'fp32'" in line
    fresh = tmp_path / "fresh"  # a new OUT on such a CPU records what it runs
    assert embed(three_files, "--out", fresh, "--model", openvino_bf16, "--backend", "openvino").exit_code == 0
    assert json.loads((fresh / "manifest.json").read_text())["settings"]["precision"] == "fp32"


def test_a_backend_running_another_precision_than_the_settings_is_refused(openvino_bf16):
    from dewey_embed.pipeline import BatchEmbedder, EmbedOptions

    options = EmbedOptions(mode="mean", prompt=None, chunks=False, chunk_size=256, chunk_overlap=64,
                           splitter="tokens", max_length=None, batch_tokens=4096)
    with pytest.raises(ValueError, match="runs .* in bf16 on this machine, not in fp32"):
        BatchEmbedder(str(openvino_bf16), "openvino", None, options, precision="fp32")
