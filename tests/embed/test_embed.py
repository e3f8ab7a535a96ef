"""dewey-embed on one machine: the same vectors as the Encoder, exact spans, resumption after a
SIGKILL, refusals that protect OUT, and bad inputs that are reported without stopping the run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtimes.encoder import TruncationWarning

pa = pytest.importorskip("pyarrow", reason="dewey-embed writes Parquet: pip install pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[2]
FP32_ATOL = 1e-5  # the bound for normalised fp32 vectors
# Tokens per row: the corpus's long document (about 1,700 tokens) is cut, the others are not.
TEST_MAX_LENGTH = 1024
EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3
SUBPROCESS_TIMEOUT_S = 120
KILL_POLL_S = 0.01


def test_help_states_the_exit_codes(embed):
    result = embed("--help")
    assert result.exit_code == 0
    assert "3 finished, but some documents failed" in result.stdout and "--ray" in result.stdout


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_vectors_and_spans_match_the_encoder(backend, corpus, embed, read_output, tmp_path, request):
    from runtimes import load

    model = request.getfixturevalue("checkpoint" if backend == "torch" else "onnx_export")
    folder, texts = corpus
    out = tmp_path / "out"
    result = embed(folder, "--out", out, "--model", model, "--backend", backend, "--chunks", "--chunk-size", 64,
                   "--chunk-overlap", 16, "--max-length", TEST_MAX_LENGTH, "--shard-size", 3)
    assert result.exit_code == 0, result.output
    documents, chunks = read_output(out)
    assert sorted(documents) == sorted(texts)

    ids = sorted(texts)
    encoder = load(model, backend=backend)
    with pytest.warns(TruncationWarning):  # encode cuts the long document to TEST_MAX_LENGTH
        expected = encoder.encode([texts[i] for i in ids], prompt="passage", max_length=TEST_MAX_LENGTH)
    # encode_chunks runs it in windows of TEST_MAX_LENGTH instead: nothing is cut.
    expected_chunks = encoder.encode_chunks([texts[i] for i in ids], chunk_size=64, chunk_overlap=16,
                                            prompt="passage", max_length=TEST_MAX_LENGTH)
    windowed = [reference.windows > 1 for reference in expected_chunks]
    assert sum(windowed) == 1  # the premise: one document is over the row
    expected[windowed] = np.stack([reference.vector for reference, w in zip(expected_chunks, windowed) if w])
    got = np.stack([documents[i]["vector"] for i in ids])
    assert np.abs(got - expected).max() <= FP32_ATOL
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=FP32_ATOL)
    assert all(documents[i]["truncated_tokens"] == 0 for i in ids)
    for doc_id, reference in zip(ids, expected_chunks):
        rows = chunks[doc_id]
        assert [r["chunk_index"] for r in rows] == list(range(len(reference.texts)))
        assert [(r["token_start"], r["token_end"]) for r in rows] == reference.token_spans
        assert [(r["char_start"], r["char_end"]) for r in rows] == reference.char_spans
        assert np.abs(np.stack([r["vector"] for r in rows]) - reference.vectors).max() <= FP32_ATOL
        assert documents[doc_id]["truncated_tokens"] == reference.truncated_tokens
        assert documents[doc_id]["n_tokens"] == reference.token_spans[-1][1]  # tokens windows end at the text's end
        text = texts[doc_id]
        assert all(text[r["char_start"]:r["char_end"]] == r["text"] for r in rows), doc_id

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["backend"] == backend
    assert manifest["counts"]["documents"] == len(texts)
    assert manifest["counts"]["chunks"] == sum(len(rows) for rows in chunks.values())
    if backend == "onnx":
        export = json.loads((model / "dewey_export.json").read_text())
        assert manifest["settings"]["model"]["files"] == {n: e["sha256"] for n, e in export["files"].items()}
        assert manifest["settings"]["precision"] == export["precision"]
    else:
        assert manifest["settings"]["precision"] == "fp32"


def test_sigkill_then_rerun_gives_every_document_once(corpus, checkpoint, embed, read_output, tmp_path,
                                                      subprocess_env, cli_command):
    folder, texts = corpus
    args = [str(folder), "--model", str(checkpoint), "--chunks", "--chunk-size", "64", "--chunk-overlap", "16",
            "--max-length", str(TEST_MAX_LENGTH), "--shard-size", "1"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([*cli_command, *args, "--out", str(killed)], env=subprocess_env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_shard = killed / "documents" / "part-000000.parquet"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(KILL_POLL_S)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    shards_at_kill = len(list((killed / "documents").glob("part-*.parquet")))
    assert 1 <= shards_at_kill < len(texts), "the run was not killed in the middle"
    assert not json.loads((killed / "manifest.json").read_text())["complete"]

    resumed = embed(*args, "--out", killed)
    assert resumed.exit_code == 0, resumed.output
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["complete"]
    assert manifest["last_run"]["skipped"] == shards_at_kill  # one document a shard
    assert manifest["last_run"]["embedded"] == len(texts) - shards_at_kill
    assert not [p for p in killed.rglob(".*") if p.is_file()], "a killed writer's temporary files are left"

    uninterrupted = tmp_path / "uninterrupted"
    assert embed(*args, "--out", uninterrupted).exit_code == 0
    ids = [row["id"] for row in pq.read_table(killed / "documents").to_pylist()]
    assert sorted(ids) == sorted(texts), "a document is missing or duplicated"
    documents, chunks = read_output(killed)
    reference_documents, reference_chunks = read_output(uninterrupted)
    for doc_id in texts:
        assert np.abs(documents[doc_id]["vector"] - reference_documents[doc_id]["vector"]).max() <= FP32_ATOL
        assert len(chunks[doc_id]) == len(reference_chunks[doc_id])
        for row, reference in zip(chunks[doc_id], reference_chunks[doc_id]):
            assert (row["char_start"], row["char_end"]) == (reference["char_start"], reference["char_end"])
            assert np.abs(row["vector"] - reference["vector"]).max() <= FP32_ATOL


def test_rerun_skips_everything_and_new_inputs_add_only_themselves(corpus, checkpoint, embed, tmp_path):
    folder, texts = corpus
    out = tmp_path / "out"
    assert embed(folder, "--out", out, "--model", checkpoint).exit_code == 0
    shards = sorted(p.name for p in (out / "documents").iterdir())
    again = embed(folder, "--out", out, "--model", checkpoint)
    assert again.exit_code == 0 and "0 documents embedded" in again.stderr
    assert f"{len(texts)} already in" in again.stderr
    assert sorted(p.name for p in (out / "documents").iterdir()) == shards

    extra = tmp_path / "extra.txt"
    extra.write_text("A document added after the first run.", encoding="utf-8")
    added = embed(folder, extra, "--out", out, "--model", checkpoint)
    assert added.exit_code == 0 and "1 documents embedded" in added.stderr
    assert pq.read_table(out / "documents").num_rows == len(texts) + 1


def test_changed_settings_refuse_to_mix_unless_overwrite(corpus, checkpoint, embed, tmp_path):
    folder, texts = corpus
    out = tmp_path / "out"
    assert embed(folder, "--out", out, "--model", checkpoint).exit_code == 0
    before = sorted(p.name for p in out.rglob("*"))

    changed = embed(folder, "--out", out, "--model", checkpoint, "--mode", "cls")
    assert changed.exit_code == EXIT_BAD_INPUT
    assert "options.mode: 'cls_add_mean' -> 'cls'" in changed.stderr and "--overwrite" in changed.stderr
    assert sorted(p.name for p in out.rglob("*")) == before

    replaced = embed(folder, "--out", out, "--model", checkpoint, "--mode", "cls", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["options"]["mode"] == "cls"
    assert manifest["counts"]["documents"] == pq.read_table(out / "documents").num_rows == len(texts)


def test_never_clears_what_dewey_embed_did_not_write(corpus, checkpoint, embed, tmp_path):
    folder, _ = corpus
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    for extra in ([], ["--overwrite"]):
        result = embed(folder, "--out", foreign, "--model", checkpoint, *extra)
        assert result.exit_code == EXIT_BAD_INPUT and "is not a dewey-embed output" in result.stderr
        assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    out = tmp_path / "out"
    assert embed(folder, "--out", out, "--model", checkpoint).exit_code == 0
    (out / "documents" / "my-analysis.csv").write_text("a,b\n", encoding="utf-8")
    before = sorted(p.name for p in out.rglob("*"))
    result = embed(folder, "--out", out, "--model", checkpoint, "--mode", "mean", "--overwrite")
    assert result.exit_code == EXIT_BAD_INPUT and "my-analysis.csv" in result.stderr
    assert "nothing was removed" in result.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_second_run_on_the_same_out_is_refused(corpus, checkpoint, embed, tmp_path):
    from dewey_embed.shards import open_output

    folder, _ = corpus
    out = tmp_path / "out"
    assert embed(folder, "--out", out, "--model", checkpoint).exit_code == 0
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    with open_output(out, settings, overwrite=False, log=print):  # a run in progress holds OUT
        result = embed(folder, "--out", out, "--model", checkpoint)
    assert result.exit_code == EXIT_BAD_INPUT and "another dewey-embed run is writing to" in result.stderr


def test_missing_input_is_one_line_naming_it(checkpoint, embed, tmp_path):
    missing = tmp_path / "no-such-corpus"
    result = embed(missing, "--out", tmp_path / "out", "--model", checkpoint)
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.strip().splitlines() == [f"Error: input not found: {missing}"]
    assert not (tmp_path / "out").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = embed(empty, "--out", tmp_path / "out", "--model", checkpoint)
    assert result.exit_code == EXIT_BAD_INPUT and f"no files to read in the folder {empty}" in result.stderr


def test_bad_documents_are_listed_and_the_run_goes_on(checkpoint, embed, read_output, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a-good.txt").write_text("A good document comes first.", encoding="utf-8")
    (docs / "b-latin1.txt").write_bytes("caf\xe9 in Latin-1".encode("latin-1"))
    (docs / "c-empty.md").write_text("  \n\n", encoding="utf-8")
    (docs / "d-lines.jsonl").write_text("\n".join([
        json.dumps({"id": "ok-1", "text": "The first good record."}),
        "{not json",
        json.dumps({"id": "no-text", "body": "the text is under another name"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "lone-surrogate", "text": "bad \ud800 half"}),
        "",
        json.dumps({"id": "ok-2", "text": "A good record after the bad ones."}),
    ]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["no text column here"]}), docs / "e-no-column.parquet")
    (docs / "f-broken.parquet").write_bytes(b"these bytes are not a Parquet file")
    (docs / "g-last.txt").write_text("A good document comes last.", encoding="utf-8")

    out = tmp_path / "out"
    result = embed(docs, "--out", out, "--model", checkpoint)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "8 failed" in result.stderr and "errors.jsonl" in result.stderr
    documents, _ = read_output(out)
    assert sorted(documents) == sorted(["a-good.txt", "ok-1", "ok-2", "g-last.txt"])  # names relative to docs

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    by_source = {(Path(e["source"]).name, e["id"]): e["error"] for e in errors}
    lines = "d-lines.jsonl"
    assert by_source == {
        ("b-latin1.txt", "b-latin1.txt"): "not UTF-8 text: byte 0xe9 at offset 3",
        ("c-empty.md", "c-empty.md"): "empty text: there is nothing to embed",
        ("d-lines.jsonl", f"{lines}:2"): by_source[("d-lines.jsonl", f"{lines}:2")],
        ("d-lines.jsonl", f"{lines}:3"): "line 3 has no 'text' field (fields: 'id', 'body'); see --text-field",
        ("d-lines.jsonl", f"{lines}:4"): "line 4 is a JSON list, not an object",
        ("d-lines.jsonl", "lone-surrogate"): by_source[("d-lines.jsonl", "lone-surrogate")],
        ("e-no-column.parquet", None): "no column 'text' (columns: 'body'); see --text-field",
        ("f-broken.parquet", None): by_source[("f-broken.parquet", None)],
    }
    assert by_source[("d-lines.jsonl", f"{lines}:2")].startswith("line 2 is not JSON: ")
    assert "lone surrogate" in by_source[("d-lines.jsonl", "lone-surrogate")]
    assert by_source[("f-broken.parquet", None)].startswith("cannot read the file: ")


def test_a_text_without_tokens_fails_alone(embed, read_output, tmp_path):
    pytest.importorskip("torch", reason="the packaged model runs on the torch backend")
    # dewey-mini's WordPiece normaliser drops zero-width and control characters: such a text is not
    # empty, yet gives no token, and must not take the other documents of its window down with it.
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "invisible", "text": "\u200b\u200b"}) + "\n"
                       + json.dumps({"id": "visible", "text": "Plain words."}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = embed(records, "--out", out)  # the packaged dewey-mini
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert list(read_output(out)[0]) == ["visible"]
    error = json.loads((out / "errors.jsonl").read_text())
    assert error["id"] == "invisible" and "no tokens" in error["error"]


def test_duplicate_ids_are_reported_once_kept_once(checkpoint, embed, tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": "same", "text": text}) + "\n"
                               for text in ("first copy", "second copy")), encoding="utf-8")
    out = tmp_path / "out"
    for _ in range(2):  # the rerun meets both copies again and says so again
        result = embed(records, "--out", out, "--model", checkpoint)
        assert result.exit_code == EXIT_SOME_FAILED
        errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        assert [e["id"] for e in errors] == ["same"] and errors[0]["error"].startswith("duplicate id")
        assert pq.read_table(out / "documents")["id"].to_pylist() == ["same"]


def test_ray_missing_exits_2_with_the_install_line(corpus, checkpoint, embed, tmp_path, monkeypatch):
    folder, _ = corpus
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = embed(folder, "--out", tmp_path / "out", "--model", checkpoint, "--ray")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "pip install 'dewey[ray]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_options_the_model_cannot_take_exit_2_before_writing(corpus, checkpoint, embed, tmp_path):
    folder, _ = corpus
    for args, message in ((["--max-length", 10 ** 6], "exceeds the model's maximum"),
                          (["--chunks", "--chunk-size", 8, "--chunk-overlap", 8], "chunk_overlap"),
                          (["--backend", "onnx"], "reads a dewey-export folder")):
        result = embed(folder, "--out", tmp_path / "out", "--model", checkpoint, *args)
        assert result.exit_code == EXIT_BAD_INPUT, (args, result.output)
        assert message in result.stderr
        assert not (tmp_path / "out").exists()


def test_example_embed_corpus(tmp_path, subprocess_env):
    pytest.importorskip("torch", reason="the packaged model runs on the torch backend")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed_corpus.py"), "--topics", "specialnames,formatstrings,for",
         "--max-chars", "8000", "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    found = re.search(r"text\[a:b\] == chunk text for (\d+) of (\d+) chunks", out)
    assert found and found[1] == found[2] and int(found[2]) > 3, out
    best = out.split("question: ")[1].splitlines()[1]
    assert "specialnames" in best and "__new__" in best, out
    assert "torch imported by this process: no" in out
