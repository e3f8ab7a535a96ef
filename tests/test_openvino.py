"""The OpenVINO backend and ``dewey-export openvino``: the IR equals PyTorch fp32 in a process
without torch, bf16 keeps the marked nodes in fp32, the folder is a complete export, and a missing
OpenVINO is a usage error that writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra (openvino) is not installed")
pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript) is not installed")
import openvino as ov  # noqa: E402

import runtimes  # noqa: E402
from dewey_export.cli import EXIT_BAD_INPUT  # noqa: E402
from dewey_export.openvino_export import OpenVINOTarget  # noqa: E402
from dewey_export.pipeline import export  # noqa: E402
from dewey_export.verify import FP32_MAX_ABS_DIFF, FP32_MIN_COSINE, _cosines, parity_cases  # noqa: E402
from runtimes.backends.openvino_backend import OpenVINOBackend, cpu_has_bf16  # noqa: E402
from runtimes.config import load_config  # noqa: E402
from runtimes.export_format import (  # noqa: E402
    MANIFEST_FILE,
    OPENVINO_XML_FILE,
    ExportFilesChanged,
    check_export_files,
)

from test_no_torch import run_without_torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_BF16 = cpu_has_bf16(ov.Core())
# A row far shorter than the longest of its batch: nearly all of its sliding-window blocks and global
# keys are padding, where an all-masked softmax would give NaN.
FAR_PADDED_BATCH = (1500, 3, 40)
# The CPU plugin's names of the kernels the exporter keeps in fp32 under bf16 (LayerNorm, softmax,
# pooling's prefix sums and gathers).
PINNED_KERNELS = ("MVN", "Softmax", "CumSum", "GatherElements")


@pytest.fixture(scope="module")
def openvino_export(checkpoint, tmp_path_factory):
    """The tiny checkpoint exported to OpenVINO in fp32, verified against PyTorch at export time."""
    result = export(checkpoint, tmp_path_factory.mktemp("ov") / "tiny-openvino", OpenVINOTarget(precision="fp32"), log=lambda message: None)
    assert result.passed
    return result.folder


def test_export_folder_is_complete_and_checked(openvino_export, checkpoint):
    manifest = json.loads((openvino_export / MANIFEST_FILE).read_text())
    assert manifest["precision"] == "fp32" and manifest["target"] == "openvino"
    assert manifest["parity"]["passed"] is True and manifest["parity"]["min_cosine"] >= FP32_MIN_COSINE
    assert "skipped" in manifest["gate"]  # fp32: parity's fp32 limits hold it
    description = manifest["openvino"]
    assert description["weights"] == "fp32" and "onnx" not in manifest
    assert all(description["fp32_nodes"][kind] > 0 for kind in ("LayerNorm", "softmax", "output stage"))
    names = {p.name for p in openvino_export.iterdir()}
    assert {"model.xml", "model.bin", "config.json", "tokenizer.json", MANIFEST_FILE} <= names
    assert "model.onnx" not in names and not list(openvino_export.glob(".*"))
    assert set(manifest["files"]) == names - {MANIFEST_FILE}
    check_export_files(openvino_export)
    assert "openvino" in manifest["tools"]


def test_changed_ir_is_refused_at_load(openvino_export, tmp_path):
    folder = Path(shutil.copytree(openvino_export, tmp_path / "changed"))
    weights = bytearray((folder / "model.bin").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (folder / "model.bin").write_bytes(bytes(weights))
    with pytest.raises(ExportFilesChanged, match="model.bin: sha256 differs"):
        runtimes.load(folder, backend="openvino")
    (folder / "model.xml").unlink()
    with pytest.raises(ExportFilesChanged, match="model.xml is missing"):
        runtimes.load(folder, backend="openvino")


def test_backend_equals_pytorch_fp32_without_torch(openvino_export, checkpoint, tmp_path):
    """Parity inputs and a far-padded batch through the IR in a process where torch cannot be imported,
    against the PyTorch backend here: fp32 limits, finite everywhere."""
    config = load_config(checkpoint)
    cases = parity_cases(config) + parity_cases(config, lengths=(), padded_batch=FAR_PADDED_BATCH)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **{f"{i}_{part}": array for i, case in enumerate(cases)
                        for part, array in zip(("ids", "mask", "bounds"), case[1:])})
    outputs = tmp_path / "outputs.npz"
    result = run_without_torch(
        f"""
        import numpy as np
        import runtimes
        enc = runtimes.load({str(openvino_export)!r}, backend="openvino", dtype="fp32")
        data = np.load({str(inputs)!r})
        out = {{}}
        for i in range({len(cases)}):
            cls, spans = enc.backend.forward(data[f"{{i}}_ids"], data[f"{{i}}_mask"], data[f"{{i}}_bounds"])
            out[f"{{i}}_cls"], out[f"{{i}}_spans"] = cls, spans
        np.savez({str(outputs)!r}, **out)
        vectors = enc.encode(["an OpenVINO service", "without torch"], prompt_name="query")
        assert vectors.shape == (2, enc.vector_size) and np.isfinite(vectors).all()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "safetensors"))
        assert not heavy, heavy
        print(repr(enc))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "precision='fp32'" in result.stdout

    reference = runtimes.load(checkpoint, backend="torch").backend
    got = np.load(outputs)
    for i, (name, ids, mask, bounds) in enumerate(cases):
        ref_cls, ref_spans = reference.forward(ids, mask, bounds)
        cls, spans = got[f"{i}_cls"], got[f"{i}_spans"]
        assert np.isfinite(cls).all() and np.isfinite(spans).all(), name
        nonempty = bounds[..., 1] > bounds[..., 0]
        assert max(np.abs(cls - ref_cls).max(), np.abs(spans - ref_spans).max()) <= FP32_MAX_ABS_DIFF, name
        cosine = min(_cosines(cls, ref_cls).min(), _cosines(spans[nonempty], ref_spans[nonempty]).min())
        assert cosine >= FP32_MIN_COSINE, name
        assert (spans[~nonempty] == 0).all(), f"{name}: empty spans must be exact zeros"


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bfloat16 (OpenVINO reports no BF16)")
def test_bf16_runs_layer_norm_softmax_and_pooling_in_fp32(openvino_export):
    """The marks in the IR survive OpenVINO's compilation: under bf16, the kernels of LayerNorm, softmax
    and span pooling run fp32 (the plugin's own runtime graph says which precision each kernel ran)."""
    backend = OpenVINOBackend.from_folder(openvino_export, dtype="bf16")
    assert backend.precision == "bf16" and "precision='bf16'" in repr(backend)
    kernels = {}
    for op in backend.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kernels.setdefault(info["layerType"].astype(str), set()).add(info["runtimePrecision"].astype(str))
    for kind in PINNED_KERNELS:
        assert kernels[kind] == {"f32"}, (kind, kernels[kind])
    assert "bf16" in kernels["FullyConnected"], "the matrix products should run bf16"


def test_precision_follows_the_manifest_and_the_cpu(openvino_export):
    assert OpenVINOBackend.from_folder(openvino_export).precision == "fp32"  # an fp32 export runs fp32
    with pytest.raises(ValueError, match="runs fp32 or bf16"):
        OpenVINOBackend.from_folder(openvino_export, dtype="fp16")
    with pytest.raises(ValueError, match="CPU"):
        OpenVINOBackend.from_folder(openvino_export, device="cuda")
    if not HAS_BF16:
        with pytest.raises(ValueError, match="no native bfloat16"):
            OpenVINOBackend.from_folder(openvino_export, dtype="bf16")


def test_threads_come_from_the_cpu_quota(openvino_export):
    from runtimes.backends.onnx_backend import available_cpus

    backend = OpenVINOBackend.from_folder(openvino_export)
    assert backend.threads == available_cpus()
    assert backend.compiled.get_property("INFERENCE_NUM_THREADS") == available_cpus()


BLOCK_OPENVINO = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "openvino":
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, Block())
    from dewey_export.cli import main
    main()
    """
)


def test_to_openvino_without_openvino_exits_2_and_writes_nothing(checkpoint, tmp_path):
    out = tmp_path / "exports" / "tiny-openvino"
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_OPENVINO, "openvino", "--model", str(checkpoint), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "pip install 'dewey[openvino]'" in result.stderr
    assert not out.exists() and not (tmp_path / "exports").exists()
    assert list(tmp_path.iterdir()) == []


def test_int8_weights_are_compressed_and_gated(checkpoint, tmp_path):
    pytest.importorskip("nncf", reason="nncf (int8 weight compression) is not installed")
    result = export(checkpoint, tmp_path / "int8", OpenVINOTarget(precision="int8"), log=lambda message: None)
    manifest = result.manifest.to_dict()
    assert manifest["openvino"]["weights"] == "int8"
    assert manifest["precision"] == ("bf16" if HAS_BF16 else "fp32")
    assert manifest["parity"]["thresholds"]["max_abs_diff"] is None  # held to the reduced limits
    assert {"min_cosine", "top1_agreement", "ndcg@10", "passed"} <= set(manifest["gate"])
    layers = ov.Core().read_model(str(result.folder / OPENVINO_XML_FILE)).get_ordered_ops()
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.u8 for op in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random tiny weights may fail int8's gate, which warns
        backend = OpenVINOBackend.from_folder(result.folder)
    assert repr(backend).startswith(f"OpenVINOBackend(precision={manifest['precision']!r}, weights='int8'")


@pytest.mark.parametrize("flags", [["--device", "gpu"], ["--opset", "18"], ["--attention", "dense"],
                                   ["--device", "cpu", "--opset", "23"]])
def test_onnx_graph_options_are_refused_with_to_openvino(checkpoint, tmp_path, flags):
    """The OpenVINO graph is fixed: an ONNX-only option given to the openvino subcommand is an error, not
    ignored."""
    from click.testing import CliRunner

    from dewey_export.cli import main

    out = tmp_path / "openvino"
    result = CliRunner().invoke(main, ["openvino", "--model", str(checkpoint), "--out", str(out), *flags])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "No such option" in result.output and flags[0] in result.output
    assert not out.exists()
