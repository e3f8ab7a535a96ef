"""The one export pipeline (dewey_export.pipeline): every target's reduced precision goes through parity
AND the quality gate on the target's candidate, TensorRT included (through a stand-in engine: no GPU
here); ``dewey-export verify`` checks every kind of folder with the same candidate; Triton packages
only a passed export; the typed manifest's one rule for "failed"; ``load()`` picks the backend a folder
is for; and the export side imports without dewey_train."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript) is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
from click.testing import CliRunner  # noqa: E402

import runtimes  # noqa: E402
from dewey_export import onnx_export as onnx_module  # noqa: E402
from dewey_export import trt_build  # noqa: E402
from dewey_export.cli import main  # noqa: E402
from dewey_export.onnx_export import OnnxTarget  # noqa: E402
from dewey_export.pipeline import export  # noqa: E402
from dewey_export.triton import write_triton_repository  # noqa: E402
from dewey_export.verify import compare_backends  # noqa: E402
from runtimes.backends import backend_for_folder  # noqa: E402
from runtimes.backends.onnx_backend import OnnxBackend  # noqa: E402
from runtimes.config import load_config  # noqa: E402
from runtimes.files import LEFTOVER_MARK  # noqa: E402
from runtimes.errors import EXIT_BAD_INPUT, EXIT_VERIFICATION_FAILED, ModelFileError, VerificationFailed  # noqa: E402
from runtimes.export_format import MANIFEST_FILE, ONNX_FILE, ExportManifest, read_manifest, write_manifest  # noqa: E402
from runtimes.trt_plan import EngineMetadata  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Noise added to a degraded stand-in engine's vectors, relative to their scale: far outside the reduced
# precision's cosine limit (0.999), as a broken engine would be.
DEGRADING_NOISE = 0.3


class StandInEngine:
    """In place of a TensorRT engine (no GPU here): the engine folder's own gpu-form ONNX graph, which
    the engine is built from, run by ONNX Runtime on the CPU; ``noise`` degrades its vectors."""

    def __init__(self, folder: Path, noise: float = 0.0):
        self.metadata = EngineMetadata.read(folder)
        self.graph = OnnxBackend(folder / ONNX_FILE)
        self.vector_size = self.graph.vector_size
        self.noise = noise

    def __repr__(self) -> str:
        return f"StandInEngine(precision={self.metadata.precision!r}, noise={self.noise})"

    def forward(self, input_ids, attention_mask, span_bounds):
        cls, spans = self.graph.forward(input_ids, attention_mask, span_bounds)
        if not self.noise:
            return cls, spans
        rng = np.random.default_rng(0)
        scale = self.noise * float(np.abs(cls).mean())
        return (cls + scale * rng.standard_normal(cls.shape).astype(np.float32),
                spans + scale * rng.standard_normal(spans.shape).astype(np.float32))


@pytest.fixture
def stand_in_tensorrt(monkeypatch):
    """TensorRT, the GPU and the builder replaced (no GPU here): the build writes a placeholder plan, and
    the engine's candidate is a StandInEngine; returns a setter for its noise."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.15.1.29"))
    monkeypatch.setattr(trt_build, "tensorrt_status", lambda: None)
    monkeypatch.setattr(trt_build, "gpu_identity", lambda: ("Stand-in GPU", "9.0"))
    monkeypatch.setattr(trt_build, "_serialize_engine", lambda *args: b"serialized engine")
    noise = {"value": 0.0}
    monkeypatch.setattr(trt_build, "engine_backend",
                        lambda folder, device=None: StandInEngine(folder, noise["value"]))
    return lambda value: noise.update(value=value)


def test_tensorrt_reduced_precision_runs_parity_and_the_gate_on_the_engine(checkpoint, tmp_path, stand_in_tensorrt):
    """fp16 engine: the engine's parity and quality gate are run and recorded (before, the gate was
    skipped for engines); the graph's own reports say the engine was checked instead."""
    result = export(checkpoint, tmp_path / "engine", trt_build.TensorRTTarget(precision="fp16", buckets="512x8"),
                    log=lambda m: None)
    reports = result.manifest.reports
    assert result.passed and result.manifest.kind == "tensorrt"
    assert reports["tensorrt_parity"]["passed"] is True and reports["tensorrt_parity"]["min_cosine"] >= 0.999
    assert reports["tensorrt_gate"]["passed"] is True and reports["tensorrt_gate"]["data"]["queries"] > 0
    assert "checked instead" in reports["parity"]["skipped"] and "checked instead" in reports["gate"]["skipped"]


def test_degraded_tensorrt_engine_is_refused_by_the_gate_with_exit_1(checkpoint, tmp_path, stand_in_tensorrt):
    stand_in_tensorrt(DEGRADING_NOISE)
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["trt", "--model", str(checkpoint), "--out", str(out), "--precision", "fp16",
                                       "--buckets", "512x8"])
    assert result.exit_code == EXIT_VERIFICATION_FAILED, result.output
    gate = read_manifest(out).reports["tensorrt_gate"]
    assert gate["passed"] is False and "min_cosine" in gate["failed"]
    assert "quality gate failed" in result.output and "min cosine" in result.output
    assert "tensorrt_gate" in result.output.strip().splitlines()[-1] and "Traceback" not in result.output


def test_verify_checks_an_engine_folder_through_its_engine(checkpoint, tmp_path, stand_in_tensorrt):
    out = export(checkpoint, tmp_path / "engine", trt_build.TensorRTTarget(precision="fp16", buckets="512x8"),
                 verify=False, log=lambda m: None).folder
    reports = tmp_path / "reports.json"
    passed = CliRunner().invoke(main, ["verify", str(out), "--json", str(reports)])
    assert passed.exit_code == 0, passed.output
    assert set(json.loads(reports.read_text())) == {"tensorrt_parity", "tensorrt_gate"}
    assert json.loads(reports.read_text())["tensorrt_gate"]["passed"] is True
    stand_in_tensorrt(DEGRADING_NOISE)
    failed = CliRunner().invoke(main, ["verify", str(out)])
    assert failed.exit_code == EXIT_VERIFICATION_FAILED, failed.output
    assert "tensorrt_parity, tensorrt_gate failed" in failed.output


def test_degraded_openvino_int8_export_is_refused_by_the_gate(checkpoint, tmp_path, monkeypatch):
    """OpenVINO's reduced precision (int8 weights) through the same gate: weights rounded to 4 bits."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import torch

    graph_model = onnx_module.graph_model

    def four_bit(model, options):
        model = graph_model(model, options)
        with torch.no_grad():
            for weight in model.parameters():
                if weight.ndim == 2:
                    scale = weight.abs().max() / 7
                    weight.copy_(torch.round(weight / scale).clamp(-8, 7) * scale)
        return model

    monkeypatch.setattr(onnx_module, "graph_model", four_bit)
    out = tmp_path / "int8"
    result = CliRunner().invoke(main, ["openvino", "--model", str(checkpoint), "--out", str(out),
                                       "--precision", "int8"])
    assert result.exit_code == EXIT_VERIFICATION_FAILED, result.output
    assert read_manifest(out).reports["gate"]["passed"] is False
    assert "quality gate failed" in result.output


def test_verify_checks_onnx_and_openvino_folders(onnx_export, checkpoint, tmp_path):
    pytest.importorskip("openvino")
    from dewey_export.openvino_export import OpenVINOTarget

    openvino = export(checkpoint, tmp_path / "ov", OpenVINOTarget(precision="fp32"), verify=False,
                      log=lambda m: None).folder
    for folder in (onnx_export, openvino):
        result = CliRunner().invoke(main, ["verify", str(folder)])
        assert result.exit_code == 0 and "parity: passed" in result.output, result.output


class WrongShape:
    """A candidate whose vectors have the wrong width: a wrong answer, not bad input."""

    vector_size = 3

    def forward(self, input_ids, attention_mask, span_bounds):
        return (np.zeros((len(input_ids), 3), np.float32),
                np.zeros(span_bounds.shape[:2] + (3,), np.float32))


def test_parity_shape_mismatch_fails_the_check_with_exit_1(onnx_export, checkpoint, monkeypatch):
    from runtimes.backends.torch_backend import TorchBackend

    report = compare_backends(TorchBackend.from_folder(checkpoint), WrongShape(), load_config(checkpoint), "fp32")
    assert report["passed"] is False and all("output shapes differ" in case["error"] for case in report["cases"])
    monkeypatch.setattr(OnnxTarget, "candidate", lambda self, folder, manifest, device=None: (WrongShape(), "fp32"))
    result = CliRunner().invoke(main, ["verify", str(onnx_export)])
    assert result.exit_code == EXIT_VERIFICATION_FAILED, result.output
    assert "output shapes differ" in result.output and "Traceback" not in result.output


def _with_report(source: Path, folder: Path, name: str, report: dict) -> Path:
    shutil.copytree(source, folder)
    data = read_manifest(folder).to_dict()
    data[name] = report
    write_manifest(folder, data)
    return folder


@pytest.mark.parametrize("name", ["parity", "gate", "tensorrt_parity", "tensorrt_gate"])
def test_triton_refuses_an_export_whose_any_report_failed(onnx_export, tmp_path, name):
    """Before, the Triton writer read ``parity`` only: a failed gate or engine parity was packaged."""
    folder = _with_report(onnx_export, tmp_path / "failed", name, {"passed": False, "thresholds": {}})
    with pytest.raises(VerificationFailed, match=name):
        write_triton_repository(folder, tmp_path / "repo", log=lambda m: None)
    result = CliRunner().invoke(main, ["triton", str(folder), "--out", str(tmp_path / "repo")])
    assert result.exit_code == EXIT_VERIFICATION_FAILED and name in result.output, result.output
    assert not (tmp_path / "repo").exists()


def test_triton_refuses_a_checkpoint(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["triton", str(checkpoint), "--out", str(tmp_path / "repo")])
    assert result.exit_code == EXIT_BAD_INPUT and "dewey-export onnx --model" in result.output, result.output


def test_manifest_failed_is_one_rule_for_every_report(onnx_export):
    manifest = read_manifest(onnx_export)
    assert manifest.passed and manifest.failed == []
    skipped = replace(manifest, reports={**manifest.reports, "gate": {"skipped": "fp32", "thresholds": {}}})
    assert skipped.passed
    for name in ("parity", "gate", "tensorrt_parity", "tensorrt_gate"):
        failed = replace(manifest, reports={**manifest.reports, name: {"passed": False}})
        assert failed.failed == [name] and not failed.passed
    assert ExportManifest.from_dict(manifest.to_dict()) == manifest


@pytest.mark.parametrize("change, key", [
    (lambda d: d["onnx"]["inputs"]["input_ids"].update(type="int32"), "onnx.inputs"),
    (lambda d: d["onnx"]["outputs"].pop("spans"), "onnx.outputs"),
    (lambda d: d["onnx"]["inputs"]["span_bounds"].update(axes=["batch", "chunks"]), "onnx.inputs"),
    (lambda d: d.update(tensorrt_gate={"passed": "no"}), "tensorrt_gate.passed"),
])
def test_manifest_tensors_must_be_the_graph_contract(onnx_export, change, key):
    data = read_manifest(onnx_export).to_dict()
    change(data)
    with pytest.raises(ModelFileError, match=key):
        ExportManifest.from_dict(data, onnx_export / MANIFEST_FILE)


def test_load_picks_the_backend_each_folder_is_for(checkpoint, onnx_export, tmp_path, stand_in_tensorrt):
    assert backend_for_folder(checkpoint) == "torch" and runtimes.load(checkpoint).backend.name == "torch"
    assert backend_for_folder(onnx_export) == "onnx" and runtimes.load(onnx_export).backend.name == "onnx"
    engine = export(checkpoint, tmp_path / "engine", trt_build.TensorRTTarget(buckets="512x8"), verify=False,
                    log=lambda m: None).folder
    assert backend_for_folder(engine) == "trt"
    assert runtimes.load(onnx_export, backend="onnx", threads=1).backend.session_options.intra_op_num_threads == 1
    with pytest.raises(ModelFileError, match="no model.safetensors"):  # a named backend wins
        runtimes.load(onnx_export, backend="torch")


def test_load_picks_openvino_and_passes_threads(checkpoint, tmp_path):
    pytest.importorskip("openvino")
    from dewey_export.openvino_export import OpenVINOTarget

    folder = export(checkpoint, tmp_path / "ov", OpenVINOTarget(precision="fp32"), verify=False,
                    log=lambda m: None).folder
    assert backend_for_folder(folder) == "openvino"
    encoder = runtimes.load(folder, threads=1)
    assert encoder.backend.name == "openvino" and encoder.backend.threads == 1


def test_load_warns_once_naming_every_failed_report(onnx_export, tmp_path):
    folder = _with_report(onnx_export, tmp_path / "failed", "gate", {"passed": False, "thresholds": {}})
    with pytest.warns(RuntimeWarning, match="failed its gate check") as caught:
        runtimes.load(folder)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_export_side_imports_without_dewey_train():
    """The gate's corpus, split, queries and metrics live in the torch-free core: dewey_export and
    runtimes import (and read the gate's default texts) with dewey_train blocked."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "dewey_train":
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
                return None
        sys.meta_path.insert(0, Block())
        import runtimes, runtimes.corpus, runtimes.evaluation
        import dewey_export.cli, dewey_export.pipeline, dewey_export.gate, dewey_export.triton
        data = dewey_export.gate.load_gate_data()
        assert len(data.documents) >= 2 and len(data.queries) == dewey_export.gate.GATE_QUERIES
        try:
            import dewey_train
        except ModuleNotFoundError:
            print("blocked")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blocked"


# -- issue 22's export-side cases: what a manifest says never reaches a config, a README or a limit --


@pytest.mark.parametrize("change, key", [
    # a tensor name with quotes and newlines once added `backend: "python"` to config.pbtxt
    (lambda d: d["onnx"]["inputs"].update({'x" }\nbackend: "python"\n{ name: "y': d["onnx"]["inputs"].pop("input_ids")}),
     "onnx.inputs"),
    (lambda d: d["onnx"]["inputs"]["input_ids"].update(type="int32"), "onnx.inputs"),  # once a KeyError
    (lambda d: d["onnx"]["outputs"]["cls"].update(axes=[True, "vector_size"]), "onnx.outputs"),
    (lambda d: d.update(target="cpu`](javascript:alert(1))"), "target"),  # once verbatim in the README
])
def test_triton_refuses_a_manifest_outside_the_contract(onnx_export, tmp_path, change, key):
    folder = Path(shutil.copytree(onnx_export, tmp_path / "tampered"))
    data = read_manifest(folder).to_dict()
    change(data)
    write_manifest(folder, data)  # the manifest is not in its own files table: only the contract check sees this
    result = CliRunner().invoke(main, ["triton", str(folder), "--out", str(tmp_path / "repo")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert key in result.output and "Traceback" not in result.output and not (tmp_path / "repo").exists()


def test_triton_configs_come_from_the_contract_with_int32_bounds(onnx_export, tmp_path):
    from dewey_export.triton import INT32_MAX, REPOSITORY_MANIFEST

    too_many = CliRunner().invoke(main, ["triton", str(onnx_export), "--out", str(tmp_path / "big"),
                                         "--max-batch-tokens", str(INT32_MAX + 1)])
    assert too_many.exit_code == EXIT_BAD_INPUT and not (tmp_path / "big").exists(), too_many.output
    repo = write_triton_repository(onnx_export, tmp_path / "repo", log=lambda m: None)
    config = (repo / "dewey_graph" / "config.pbtxt").read_text()
    assert config.count("name:") == 1 + 5 and "backend" not in config  # the model and the contract's 5 tensors
    record = json.loads((repo / REPOSITORY_MANIFEST).read_text())
    from runtimes.export_format import sha256_file

    assert record["source"] == {"path": str(onnx_export.resolve()),
                                "manifest_sha256": sha256_file(onnx_export / MANIFEST_FILE)}


def test_graph_forms_are_the_forms_the_manifest_accepts():
    from runtimes.export_format import GRAPH_FORM_NAMES

    assert tuple(onnx_module.GRAPH_FORMS) == GRAPH_FORM_NAMES


def test_openvino_weights_come_from_the_ir_not_the_label(checkpoint, tmp_path):
    """An fp32 IR whose manifest was edited to say int8 would have been judged by int8's looser limits."""
    pytest.importorskip("openvino")
    from dewey_export.openvino_export import OpenVINOTarget

    folder = export(checkpoint, tmp_path / "ov", OpenVINOTarget(precision="fp32"), verify=False,
                    log=lambda m: None).folder
    data = read_manifest(folder).to_dict()
    data["openvino"]["weights"] = "int8"
    write_manifest(folder, data)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "holds fp32 weights" in result.output


def test_cleanup_beside_out_touches_only_what_dewey_export_wrote(onnx_export, checkpoint, tmp_path, monkeypatch):
    """A user's folders merely named like leftovers of a dead writer: neither removed nor moved into OUT
    (before, dewey-export deleted the .tmp one and renamed the .old one into OUT before its output check)."""
    monkeypatch.setattr(onnx_module, "_trace", lambda model, onnx_path, *a, **k:
                        shutil.copyfile(onnx_export / ONNX_FILE, onnx_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    users = {kind: tmp_path / f".out.{pid}.0123abcd.{kind}" for kind in ("tmp", "old")}
    for folder in users.values():
        folder.mkdir()
        (folder / "data.csv").write_text("the user's\n")
    ours = tmp_path / f".out.{pid}.4567cdef.tmp"  # what a killed export left: its own files and the mark
    shutil.copytree(onnx_export, ours)
    (ours / LEFTOVER_MARK).mkdir()
    export(checkpoint, tmp_path / "out", OnnxTarget(), verify=False, log=lambda m: None)
    assert all((folder / "data.csv").read_text() == "the user's\n" for folder in users.values())
    assert not ours.exists() and not (tmp_path / "out" / "data.csv").exists()


def test_trt_option_defaults_are_the_targets_own():
    """Before, the CLI built fp32 engines while EngineBuildSettings defaulted to fp16, and --buckets'
    default was a copy of trt_plan.DEFAULT_BUCKETS."""
    from dewey_export.cli import trt_command
    from runtimes.trt_plan import DEFAULT_BUCKETS, parse_buckets

    defaults = {param.name: param.default for param in trt_command.params}
    target = trt_build.TensorRTTarget()
    assert defaults["precision"] == target.precision and defaults["workspace_gib"] == target.workspace_gib
    assert tuple(parse_buckets(defaults["buckets"])) == target.buckets == DEFAULT_BUCKETS
    shared = {"model", "out", "overwrite", "verify", "gate_data"}
    assert shared <= defaults.keys() and not {"device", "opset", "attention", "engine"} & defaults.keys()
