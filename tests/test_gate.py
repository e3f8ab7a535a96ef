"""The precision quality gate (dewey_export.gate): it accepts an export that computes what PyTorch fp32
computes, refuses a degraded reduced-precision export (exit 1, the report kept in the folder and naming
the failed figure, at export and again in ``dewey-export verify``), and reads the user's own texts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript) is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from dewey_export import onnx_export as exporter  # noqa: E402
from dewey_export.cli import EXIT_BAD_INPUT, EXIT_VERIFY_FAILED, main  # noqa: E402
from dewey_export.gate import GATE_QUERIES, load_gate_data, run_gate  # noqa: E402
from runtimes.backends.onnx_backend import OnnxBackend  # noqa: E402
from runtimes.backends.torch_backend import TorchBackend  # noqa: E402
from runtimes.config import load_config  # noqa: E402
from runtimes.errors import BadInputError  # noqa: E402
from runtimes.export_format import MANIFEST_FILE, ONNX_FILE  # noqa: E402

# The degraded export: every weight matrix rounded to 4 bits (16 levels, symmetric, per tensor).
FOUR_BIT_LEVELS = 7
DOCUMENTS = [
    "The lighthouse keeper climbed the stairs every evening at dusk. He lit the great lamp and watched the "
    "ships pass far out at sea.",
    "Bread rises because yeast turns sugar into carbon dioxide inside the dough. Bakers knead it so the gas "
    "stays trapped in a web of gluten.",
    "A glacier moves a few metres every year down its valley. The ice grinds the rock beneath it into fine "
    "flour that colours the rivers below.",
]


@pytest.fixture(scope="module")
def gate_data():
    return load_gate_data()


def test_gate_accepts_the_fp32_export(onnx_export, checkpoint, gate_data):
    report = run_gate(TorchBackend.from_folder(checkpoint), OnnxBackend(onnx_export / ONNX_FILE), checkpoint,
                      load_config(checkpoint), gate_data)
    assert report["passed"] and report["failed"] == []
    assert report["min_cosine"] >= 0.99999 and report["top1_agreement"] == 1.0
    assert abs(report["ndcg@10"]["drop"]) < 1e-6
    assert report["data"]["queries"] == GATE_QUERIES and report["data"]["documents"] >= 2
    assert set(report["min_cosine_by_kind"]) == {"queries", "documents", "chunks"}


def _round_to_four_bits(model):
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                scale = weight.abs().max() / FOUR_BIT_LEVELS
                weight.copy_(torch.round(weight / scale).clamp(-FOUR_BIT_LEVELS - 1, FOUR_BIT_LEVELS) * scale)
    return model


def test_gate_refuses_a_degraded_export_with_exit_1(checkpoint, tmp_path, monkeypatch):
    """An fp16 export whose weights were rounded to 4 bits: exit 1, the folder kept with the failed gate
    in its manifest, the failed figure named; ``dewey-export verify`` re-runs the gate and says so too."""
    graph_model = exporter.graph_model
    monkeypatch.setattr(exporter, "graph_model", lambda model, opts: _round_to_four_bits(graph_model(model, opts)))
    out = tmp_path / "degraded"
    result = CliRunner().invoke(main, ["onnx", "--model", str(checkpoint), "--precision", "fp16",
                                       "--out", str(out)])
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    gate = json.loads((out / MANIFEST_FILE).read_text())["gate"]
    assert gate["passed"] is False and "min_cosine" in gate["failed"]
    assert "quality gate failed" in result.output and "min cosine" in result.output

    monkeypatch.undo()
    again = CliRunner().invoke(main, ["verify", str(out), "--json", str(tmp_path / "reports.json")])
    assert again.exit_code == EXIT_VERIFY_FAILED, again.output
    assert "quality gate failed" in again.output
    assert "min_cosine" in json.loads((tmp_path / "reports.json").read_text())["gate"]["failed"]


def test_gate_data_from_jsonl_and_text_files(tmp_path):
    """runtimes.corpus's one rule, as for training and dewey-embed: a JSONL record or a text file is one
    document, so the gate reads a JSONL file or a folder of text files."""
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCUMENTS), encoding="utf-8")
    texts = tmp_path / "texts"
    texts.mkdir()
    for number, doc in enumerate(DOCUMENTS):
        (texts / f"{number}.txt").write_text(doc, encoding="utf-8")
    for path in (jsonl, texts):
        data = load_gate_data(path)
        assert data.documents == DOCUMENTS and data.source == str(path)
        assert data.queries and all(query in DOCUMENTS[gold] for query, gold in zip(data.queries, data.gold))
    single = tmp_path / "one.txt"
    single.write_text("\n\n".join(DOCUMENTS), encoding="utf-8")  # blank lines do not split a text file
    with pytest.raises(BadInputError, match="at least 2"):
        load_gate_data(single)


def test_missing_gate_data_file_is_a_usage_error(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["onnx", "--model", str(checkpoint), "--out", str(tmp_path / "x"),
                                       "--gate-data", str(tmp_path / "absent.jsonl")])
    assert result.exit_code == EXIT_BAD_INPUT and not (tmp_path / "x").exists()
