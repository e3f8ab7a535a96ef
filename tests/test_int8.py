"""int8 exports (dewey_export.quantize, the int8 gate tier): the packaged dewey-mini's ONNX Runtime int8
export passes the int8 tier on real text, a model with large activation outliers is refused by it
(naming the figure), a graph whose quantized operators do not run, or that is not faster than fp32, is
refused with exit 1, and int8 exports load and answer without torch, deterministically."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript) is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
from click.testing import CliRunner  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import runtimes  # noqa: E402
from dewey_export import quantize  # noqa: E402
from dewey_export.cli import EXIT_BAD_INPUT, EXIT_VERIFY_FAILED, main  # noqa: E402
from dewey_export.gate import GATE_TIERS, gate_thresholds  # noqa: E402
from dewey_export.onnx_export import OnnxTarget  # noqa: E402
from dewey_export.pipeline import export  # noqa: E402
from dewey_export.verify import INT8_MIN_COSINE, REDUCED_MIN_COSINE, parity_thresholds  # noqa: E402
from runtimes import cpu_features  # noqa: E402
from runtimes.export_format import MANIFEST_FILE, ONNX_FILE  # noqa: E402

from test_no_torch import run_without_torch  # noqa: E402

# Two channels of one layer's MLP input scaled up by this much (and the weights that read them scaled
# down, so fp32 computes the same function): outliers that per-tensor int8 activations cannot hold.
OUTLIER_FACTOR = 100.0
TEXTS = ["int8 on the edge", "A glacier moves a few metres every year down its valley, grinding the rock below. " * 30]


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def mini_int8(tmp_path_factory):
    """The packaged dewey-mini (real weights) exported to ONNX Runtime int8 and verified: parity and the
    gate's int8 tier. The speed floor is not part of a test (it depends on the machine's load); the
    speed is still measured and recorded."""
    out = tmp_path_factory.mktemp("int8") / "mini-int8"
    return export(runtimes.default_model_path(), out, OnnxTarget(precision="int8", min_int8_speedup=0), log=quiet)


def test_dewey_mini_int8_passes_the_int8_tier_on_real_text(mini_int8):
    manifest = mini_int8.manifest
    assert mini_int8.passed, manifest.failed
    assert manifest.precision == "fp32" and manifest.quantized and manifest.checked_precision == "int8"
    quantization = manifest.graph["quantization"]
    assert quantization["quantized_matmuls"] > 0 and quantization["float_weight_matmuls"]  # the head stays float
    executed = manifest.reports["int8"]["executed"]
    assert executed["quantized_nodes"] == quantization["quantized_matmuls"]
    assert executed["float_weight_matmuls"] == len(quantization["float_weight_matmuls"])
    gate, parity = manifest.reports["gate"], manifest.reports["parity"]
    assert gate["thresholds"]["tier"] == "int8" and parity["thresholds"]["min_cosine"] == INT8_MIN_COSINE
    assert gate["min_cosine"] >= GATE_TIERS["int8"]["min_cosine"] and gate["mean_cosine"] >= 0.998
    assert gate["top1_agreement"] >= 0.97 and gate["ndcg@10"]["drop"] <= 0.005
    # Real text at several lengths: the held-out documents and the 512 / 2k / 8k-token sets.
    assert set(gate["by_set"]) == {"held-out", "~512 tokens", "~2048 tokens", "~8192 tokens"}
    assert gate["by_set"]["~8192 tokens"]["tokens"][0] > 6000
    # int8 really differs from fp32 (the graph is quantized), within the tier.
    assert gate["min_cosine"] < 0.99999
    import onnx

    graph = onnx.load(str(mini_int8.folder / ONNX_FILE)).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == quantization["quantized_matmuls"]


def _outlier_checkpoint(source: Path, out: Path, layer: int = 1, channels=(3, 17)) -> Path:
    """``source`` with two channels of ``layer``'s MLP norm scaled by OUTLIER_FACTOR and the MLP's input
    weights for them divided by it: the same function in fp32, activation outliers for int8."""
    shutil.copytree(source, out)
    tensors = load_file(str(source / "model.safetensors"))
    for channel in channels:
        tensors[f"layers.{layer}.mlp_norm.weight"][channel] *= OUTLIER_FACTOR
        tensors[f"layers.{layer}.mlp.Wi.weight"][:, channel] /= OUTLIER_FACTOR
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_a_model_with_activation_outliers_is_refused_by_the_int8_gate(checkpoint, tmp_path):
    outliers = _outlier_checkpoint(checkpoint, tmp_path / "outliers")
    fp32_same = [runtimes.load(folder, backend="torch").encode(TEXTS) for folder in (checkpoint, outliers)]
    np.testing.assert_allclose(fp32_same[0], fp32_same[1], atol=1e-4)  # the same model in fp32
    out = tmp_path / "int8"
    result = CliRunner().invoke(main, ["onnx", "--model", str(outliers), "--out", str(out), "--precision", "int8",
                                       "--min-int8-speedup", "0"])
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    gate = json.loads((out / MANIFEST_FILE).read_text())["gate"]
    assert gate["passed"] is False and {"min_cosine", "mean_cosine"} <= set(gate["failed"])
    assert gate["min_cosine"] < 0.9
    assert "quality gate failed (int8 tier)" in result.output and f"< {INT8_MIN_COSINE}" in result.output


def test_a_graph_whose_quantized_nodes_fell_back_is_refused_with_exit_1(checkpoint, tmp_path, monkeypatch):
    """The quantizer 'succeeds' but the graph it writes runs every MatMul in float: exit 1, naming it."""
    real = quantize.quantize_onnx_dynamic

    def fell_back(fp32_path, out_path, log):
        description = real(fp32_path, out_path.with_name("unused.onnx"), log)
        Path(out_path.with_name("unused.onnx")).unlink()
        shutil.copy(fp32_path, out_path)  # the float graph in place of the int8 one
        return description

    monkeypatch.setattr(quantize, "quantize_onnx_dynamic", fell_back)
    out = tmp_path / "fell-back"
    result = CliRunner().invoke(main, ["onnx", "--model", str(checkpoint), "--out", str(out), "--precision", "int8",
                                       "--min-int8-speedup", "0", "--no-verify"])
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    report = json.loads((out / MANIFEST_FILE).read_text())["int8"]
    assert report["passed"] is False and {"quantized_nodes", "float_weight_matmuls"} <= set(report["failed"])
    assert "int8 execution check failed" in result.output and "fell back to float" in result.output


def test_an_int8_graph_slower_than_the_floor_is_refused_with_exit_1(checkpoint, tmp_path):
    """No int8 graph is 1000 times as fast as fp32: the speed rule refuses it, with the figures."""
    out = tmp_path / "slow"
    result = CliRunner().invoke(main, ["onnx", "--model", str(checkpoint), "--out", str(out), "--precision", "int8",
                                       "--min-int8-speedup", "1000", "--no-verify"])
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    report = json.loads((out / MANIFEST_FILE).read_text())["int8"]
    assert report["failed"] == ["speedup"] and report["speed"]["speedup"] < 1000
    assert report["speed"]["fp32_seconds"] > 0 and report["speed"]["int8_seconds"] > 0
    assert "the floor is 1000.0x" in result.output


def test_int8_is_refused_for_a_gpu_graph(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["onnx", "--model", str(checkpoint), "--out", str(tmp_path / "x"),
                                       "--precision", "int8", "--device", "gpu"])
    assert result.exit_code == EXIT_BAD_INPUT and "int8 is for ONNX Runtime on CPUs" in result.output
    assert not (tmp_path / "x").exists()


def test_int8_export_answers_without_torch_deterministically(mini_int8):
    """Loaded in a process where torch cannot be imported: the same vectors as here, bit for bit, and
    the same again on one thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a CPU without VNNI warns
        here = runtimes.load(mini_int8.folder).encode(TEXTS)
        again = runtimes.load(mini_int8.folder).encode(TEXTS)
        one_thread = runtimes.load(mini_int8.folder, threads=1).encode(TEXTS)
    assert np.array_equal(here, again)
    np.testing.assert_allclose(one_thread, here, atol=1e-6)
    result = run_without_torch(f"""
        import json, warnings
        import numpy as np
        import runtimes
        warnings.simplefilter("ignore", RuntimeWarning)
        vectors = runtimes.load({str(mini_int8.folder)!r}).encode({TEXTS!r})
        print(json.dumps(vectors.tolist()))
        """)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.array(json.loads(result.stdout), dtype=np.float32), here)


def test_loading_int8_on_a_cpu_without_int8_dot_products_warns_once(mini_int8, monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda cpuinfo=None: {"avx2", "fma"})
    monkeypatch.setattr(cpu_features, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no int8 dot-product instructions"):
        runtimes.load(mini_int8.folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        runtimes.load(mini_int8.folder)  # once per process


@pytest.mark.parametrize("flags, machine, expected", [
    ({"avx2", "avx512_vnni"}, "x86_64", True), ({"avx2", "avx_vnni"}, "x86_64", True),
    ({"avx2", "amx_int8"}, "x86_64", True), ({"avx2", "fma"}, "x86_64", False),
    ({"fp", "asimd", "asimddp"}, "aarch64", True), ({"fp", "asimd"}, "aarch64", False), (set(), "x86_64", None),
])
def test_int8_support_reads_the_cpu_flags(flags, machine, expected):
    assert cpu_features.int8_support(flags, machine)[0] is expected


def test_cpu_flags_are_read_from_cpuinfo():
    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0c\n"
    assert cpu_features.cpu_flags(x86) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_features.cpu_flags(arm) == {"fp", "asimd", "asimddp"}
    assert cpu_features.cpu_name(x86) == "Some CPU"


def test_each_precision_has_its_tier():
    assert gate_thresholds("bf16") == {"tier": "reduced", **GATE_TIERS["reduced"]}
    assert gate_thresholds("int8")["tier"] == "int8"
    assert GATE_TIERS["int8"] == {"min_cosine": 0.99, "min_mean_cosine": 0.998, "min_top1_agreement": 0.97,
                                  "max_ndcg_drop": 0.005}
    assert parity_thresholds("int8")["min_cosine"] == INT8_MIN_COSINE
    assert parity_thresholds("fp16")["min_cosine"] == REDUCED_MIN_COSINE
    assert parity_thresholds("fp32")["max_abs_diff"] is not None


def test_execution_report_rules():
    executed = {"quantized_nodes": 20, "expected_quantized_nodes": 20, "float_weight_matmuls": 2,
                "expected_float_weight_matmuls": 2}
    fast = {"fp32_seconds": 2.0, "int8_seconds": 1.0, "speedup": 2.0, "batch": [8, 512], "repeats": 5}
    assert quantize.execution_report(executed, fast, 1.2)["passed"]
    assert quantize.execution_report(executed, None, 0)["passed"]
    assert quantize.execution_report(executed, dict(fast, speedup=1.1), 1.2)["failed"] == ["speedup"]
    assert quantize.execution_report(dict(executed, quantized_nodes=19), fast, 1.2)["failed"] == ["quantized_nodes"]
    nan = dict(fast, speedup=float("nan"))
    assert quantize.execution_report(executed, nan, 1.2)["failed"] == ["speedup"]


@pytest.fixture(scope="module")
def mini_openvino_full(tmp_path_factory):
    """dewey-mini's OpenVINO full int8 export (int8 activations and weights), verified; no speed floor."""
    pytest.importorskip("openvino", reason="the openvino extra (openvino) is not installed")
    pytest.importorskip("nncf", reason="nncf (the openvino-int8 extra) is not installed")
    from dewey_export.openvino_export import OpenVINOTarget

    out = tmp_path_factory.mktemp("ov-int8") / "mini-full"
    target = OpenVINOTarget(precision="int8", quantization="full", min_int8_speedup=0)
    return export(runtimes.default_model_path(), out, target, log=quiet)


def test_openvino_full_int8_of_dewey_mini_runs_int8_kernels_and_passes(mini_openvino_full):
    manifest = mini_openvino_full.manifest
    assert mini_openvino_full.passed, manifest.failed
    assert manifest.graph["weights"] == "int8" and manifest.graph["activations"] == "int8"
    assert manifest.checked_precision == "int8" and manifest.reports["gate"]["thresholds"]["tier"] == "int8"
    executed = manifest.reports["int8"]["executed"]
    assert executed["int8_kernels"] and executed["quantized_nodes"] == executed["expected_quantized_nodes"] > 0
    assert executed["float_weight_matmuls"] <= executed["expected_float_weight_matmuls"]


def test_openvino_int8_answers_without_torch_deterministically(mini_openvino_full):
    folder = mini_openvino_full.folder
    here = runtimes.load(folder).encode(TEXTS)
    assert np.array_equal(here, runtimes.load(folder).encode(TEXTS))
    np.testing.assert_allclose(runtimes.load(folder, threads=1).encode(TEXTS), here, atol=1e-5)
    result = run_without_torch(f"""
        import json
        import runtimes
        vectors = runtimes.load({str(folder)!r}).encode({TEXTS!r})
        print(json.dumps(vectors.tolist()))
        """)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.array(json.loads(result.stdout), dtype=np.float32), here)


def test_full_int8_is_refused_where_openvino_has_no_int8_kernels(checkpoint, tmp_path, monkeypatch):
    """Where the CPU plugin would run an int8 IR in float, the export says so and builds nothing."""
    ov = pytest.importorskip("openvino", reason="the openvino extra (openvino) is not installed")
    pytest.importorskip("nncf", reason="nncf (the openvino-int8 extra) is not installed")

    class NoInt8Core(ov.Core):
        def get_property(self, device, name, *args):
            found = super().get_property(device, name, *args)
            return [c for c in found if c != "INT8"] if name == "OPTIMIZATION_CAPABILITIES" else found

    monkeypatch.setattr(ov, "Core", NoInt8Core)
    out = tmp_path / "full"
    result = CliRunner().invoke(main, ["openvino", "--model", str(checkpoint), "--out", str(out),
                                       "--precision", "int8", "--quantization", "full"])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "reports none for this CPU" in result.output and not out.exists()


def test_quantization_needs_int8(checkpoint, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra (openvino) is not installed")
    result = CliRunner().invoke(main, ["openvino", "--model", str(checkpoint), "--out", str(tmp_path / "x"),
                                       "--precision", "bf16", "--quantization", "full"])
    assert result.exit_code == EXIT_BAD_INPUT and "--quantization applies to --precision int8" in result.output
