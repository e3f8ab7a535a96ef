"""ONNX export, verification, the ONNX Runtime backend and the dewey-export CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript) is not installed")
import onnx  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import runtimes  # noqa: E402
from dewey_export import onnx_export as exporter  # noqa: E402
from dewey_export.cli import main  # noqa: E402
from dewey_export.onnx_export import OnnxTarget  # noqa: E402
from dewey_export.pipeline import export  # noqa: E402
from dewey_export.verify import FP32_MAX_ABS_DIFF, FP32_MIN_COSINE  # noqa: E402
from runtimes.backends.onnx_backend import OnnxBackend, available_cpus  # noqa: E402
from runtimes.export_format import MANIFEST_FILE, ONNX_FILE, file_table, sha256_file, write_manifest  # noqa: E402

from test_no_torch import run_without_torch  # noqa: E402


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def test_export_passes_verification_and_records_it(onnx_export, checkpoint):
    manifest = manifest_of(onnx_export)
    parity = manifest["parity"]
    assert parity["passed"] is True
    assert parity["max_abs_diff"] <= FP32_MAX_ABS_DIFF and parity["min_cosine"] >= FP32_MIN_COSINE
    names = [case["name"] for case in parity["cases"]]
    assert {"batch1_len16", "batch1_len128", "batch1_len300"} <= set(names)
    assert any(name.startswith("padded_batch") for name in names)
    assert manifest["onnx"]["opset"] == 18 and manifest["precision"] == "fp32"
    assert manifest["source"]["sha256"]["model.safetensors"] == sha256_file(checkpoint / "model.safetensors")
    assert manifest["files"][ONNX_FILE] == {"bytes": (onnx_export / ONNX_FILE).stat().st_size,
                                            "sha256": sha256_file(onnx_export / ONNX_FILE)}
    assert set(manifest["files"]) == {p.name for p in onnx_export.iterdir()} - {MANIFEST_FILE}
    assert {"torch", "onnxruntime", "onnx"} <= set(manifest["tools"])
    for name in ("config.json", "tokenizer.json", ONNX_FILE):
        assert (onnx_export / name).is_file()
    assert not list(onnx_export.parent.glob(".*")), "staging folder left behind"


def test_graph_io_has_dynamic_batch_sequence_and_chunks(onnx_export):
    model = onnx.load(str(onnx_export / ONNX_FILE), load_external_data=False)
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in list(model.graph.input) + list(model.graph.output)
    }
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "sequence"]
    assert dims["span_bounds"] == ["batch", "chunks", 2]
    assert dims["cls"] == ["batch", 48]
    assert dims["spans"] == ["batch", "chunks", 48]


def test_corrupted_graph_fails_verification(onnx_export, checkpoint, tmp_path):
    """A weight changed after export must be caught by `dewey-export verify` (exit 1): by its sha256, and
    by parity when the manifest's table is re-recorded to match (a graph that was wrong at export)."""
    folder = Path(shutil.copytree(onnx_export, tmp_path / "corrupt"))
    model = onnx.load(str(folder / ONNX_FILE))
    weights = [init for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT
               and np.prod(init.dims) > 100]
    target = weights[len(weights) // 2]
    array = onnx.numpy_helper.to_array(target).copy()
    array *= 1.05
    target.CopyFrom(onnx.numpy_helper.from_array(array, target.name))
    onnx.save(model, str(folder / ONNX_FILE))

    result = CliRunner().invoke(main, ["verify", str(folder), "--model", str(checkpoint)])
    assert result.exit_code == 1, result.output
    assert "model.onnx: sha256 differs" in result.output

    manifest = manifest_of(folder)
    manifest["files"] = file_table(folder)
    write_manifest(folder, manifest)
    result = CliRunner().invoke(main, ["verify", str(folder), "--model", str(checkpoint)])
    assert result.exit_code == 1, result.output
    assert "parity check failed" in result.output

    intact = CliRunner().invoke(main, ["verify", str(onnx_export)])
    assert intact.exit_code == 0, intact.output
    assert "parity: passed" in intact.output


def test_verify_refuses_a_different_checkpoint(onnx_export, tmp_path):
    from runtimes.testing import make_test_checkpoint

    other = make_test_checkpoint(tmp_path / "other", seed=7)
    result = CliRunner().invoke(main, ["verify", str(onnx_export), "--model", str(other)])
    assert result.exit_code == 2
    assert "model.safetensors" in result.output and "not the checkpoint" in result.output


def test_onnx_backend_matches_torch_through_the_encoder(onnx_export, checkpoint, encoder, long_text):
    onnx_encoder = runtimes.load(onnx_export, backend="onnx")
    texts = ["short", long_text[:900], "Grüße 🙂 日本語 " * 12]
    for mode in ("cls", "mean"):
        a = encoder.encode(texts, mode=mode, prompt="query", normalize=False)
        b = onnx_encoder.encode(texts, mode=mode, prompt="query", normalize=False)
        assert np.abs(a - b).max() <= FP32_MAX_ABS_DIFF
    a = encoder.encode_chunks(long_text, chunk_size=64, chunk_overlap=16, normalize=False)
    b = onnx_encoder.encode_chunks(long_text, chunk_size=64, chunk_overlap=16, normalize=False)
    assert a.token_spans == b.token_spans
    assert np.abs(a.vectors - b.vectors).max() <= FP32_MAX_ABS_DIFF


def test_onnx_backend_works_without_torch(onnx_export, tmp_path):
    """The embedded-service path: numpy + onnxruntime + tokenizers, torch and transformers unimportable."""
    expected = runtimes.load(onnx_export, backend="onnx").encode(["an embedded service", "no torch here"])
    out = tmp_path / "vectors.npy"
    result = run_without_torch(
        f"""
        import numpy as np, runtimes
        enc = runtimes.load({str(onnx_export)!r}, backend="onnx")
        np.save({str(out)!r}, enc.encode(["an embedded service", "no torch here"]))
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        assert not heavy, heavy
        """
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(out), expected)


def test_opset_23_export_verifies(checkpoint, tmp_path):
    result = export(checkpoint, tmp_path / "o23", OnnxTarget(opset=23), log=lambda m: None)
    assert result.passed
    ops = {node.op_type for node in onnx.load(str(result.folder / ONNX_FILE)).graph.node}
    assert "RotaryEmbedding" in ops


def test_cli_export_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "cli-export"
    result = CliRunner().invoke(main, ["onnx", "--model", str(checkpoint), "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "Exporting to ONNX" in result.output
    assert manifest_of(out)["parity"] == {"skipped": True, "thresholds": manifest_of(out)["parity"]["thresholds"]}
    vectors = runtimes.load(out, backend="onnx").encode(["exported by the CLI"])
    assert vectors.shape == (1, 48)

    again = CliRunner().invoke(main, ["onnx", "--model", str(checkpoint), "--out", str(out), "--no-verify"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / ONNX_FILE).is_file(), "a refused export must leave the existing folder alone"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["onnx", "--model", "{missing}", "--out", "{out}"], "{missing}"),
        (["--model", "{ckpt}", "--to", "pdf", "--out", "{out}"], "'pdf' is not one of"),
        (["--model", "{ckpt}", "--out", "{out}"], "missing the subcommand"),
        (["trt", "--model", "{ckpt}", "--out", "{out}"], "TensorRT"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(checkpoint, tmp_path, args, needle):
    values = {"missing": str(tmp_path / "no-such-model"), "out": str(tmp_path / "out"), "ckpt": str(checkpoint)}
    args = [a.format(**values) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert needle.format(**values) in result.output
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_no_folder(checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(exporter, "_trace", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export(checkpoint, tmp_path / "out", OnnxTarget(), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_requested_provider_that_is_missing_raises(onnx_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the missing-provider path cannot be shown")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        runtimes.load(onnx_export, backend="onnx", device="cuda")


def test_session_threads_follow_cpu_affinity(onnx_export):
    import os

    backend = OnnxBackend.from_folder(onnx_export)
    assert backend.session_options.intra_op_num_threads == available_cpus() <= len(os.sched_getaffinity(0))
    assert OnnxBackend.from_folder(onnx_export, threads=1).session_options.intra_op_num_threads == 1


def test_onnx_backend_rejects_damaged_or_foreign_files(onnx_export, tmp_path):
    folder = Path(shutil.copytree(onnx_export, tmp_path / "damaged"))
    with open(folder / ONNX_FILE, "ab") as handle:
        handle.write(b"\0" * 10)
    with pytest.raises(runtimes.ModelFileError, match="changed or damaged"):
        runtimes.load(folder, backend="onnx")

    (folder / ONNX_FILE).write_bytes(b"not a protobuf at all")
    with pytest.raises(runtimes.ModelFileError, match="cannot load"):
        OnnxBackend(folder / ONNX_FILE)

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(folder / ONNX_FILE))
    with pytest.raises(runtimes.ModelFileError, match="not a Dewey graph"):
        OnnxBackend(folder / ONNX_FILE)



def test_onnx_backend_takes_the_graph_precision_in_any_spelling(onnx_export):
    """dtype="fp32", as the torch backend and the CLI spell it, loads an fp32 graph (it was refused)."""
    import torch

    for dtype in ("fp32", "float32", np.float32, torch.float32):
        assert runtimes.load(onnx_export, backend="onnx", dtype=dtype).encode(["any spelling"]).shape == (1, 48)


@pytest.mark.parametrize("dtype, error", [("bf16", "graph of precision fp32"), ("float16", "graph of precision fp32"),
                                          ("int8", "precision must be one of")])
def test_onnx_backend_refuses_another_precision(onnx_export, dtype, error):
    with pytest.raises(ValueError, match=error):
        runtimes.load(onnx_export, backend="onnx", dtype=dtype)


def test_loading_a_checkpoint_with_the_onnx_backend_says_to_export(checkpoint):
    with pytest.raises(runtimes.ModelFileError, match="export the checkpoint first"):
        runtimes.load(checkpoint, backend="onnx")


def test_tensorrt_provider_options_carry_one_profile_and_the_cache(tmp_path):
    from runtimes.backends.onnx_backend import providers_for, tensorrt_provider_options
    from runtimes.trt_plan import plan_profiles

    profiles = plan_profiles([(512, 8), (4096, 1)], max_position_embeddings=4096)
    options = tensorrt_provider_options(profiles[1], engine_cache_path=tmp_path)
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_fp16_enable"] is False  # the fp16 graph, built strongly typed
    mins = options["trt_profile_min_shapes"].split(",")
    maxs = options["trt_profile_max_shapes"].split(",")
    assert len(mins) == len(maxs) == 3  # one profile x three inputs: one profile per session
    assert "input_ids:1x4096" in maxs and "input_ids:1x513" in mins
    provider, provider_options = providers_for("tensorrt:1", options)[0]
    assert provider == "TensorrtExecutionProvider" and provider_options["device_id"] == 1
    assert providers_for("tensorrt")[1][0] == "CUDAExecutionProvider"
    assert tensorrt_provider_options() == {"trt_fp16_enable": False}


def test_cli_trt_without_tensorrt_exits_2_and_writes_nothing(checkpoint, tmp_path):
    pytest.importorskip("click")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    except ImportError:
        pass
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["trt", "--model", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.output and "pip install tensorrt-cu12" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision, low", [("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16)])
def test_reduced_precision_graph_keeps_norms_softmax_and_rotary_in_fp32(checkpoint, tmp_path, precision, low):
    """The graph strongly typed TensorRT builds from: matmuls in fp16/bf16, LayerNorm, Softmax and the
    rotary Cos/Sin tables in fp32 (fp16 LayerNorm overflows; 16-bit rotary tables misplace far tokens)."""
    result = export(checkpoint, tmp_path / precision, OnnxTarget(form="gpu", precision=precision), log=lambda m: None)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(result.folder / ONNX_FILE)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})

    def input_types(op):
        return [types.get(n.input[0]) for n in model.graph.node if n.op_type == op]

    for op in ("LayerNormalization", "Softmax", "Cos", "Sin"):
        found = input_types(op)
        assert found and set(found) == {onnx.TensorProto.FLOAT}, (op, found)
    matmul_inputs = set(input_types("MatMul"))
    assert low in matmul_inputs, matmul_inputs
    big_weights = [i for i in model.graph.initializer if np.prod(i.dims) >= 32 * 32]
    assert big_weights and all(i.data_type in (low, onnx.TensorProto.FLOAT) for i in big_weights)
    assert sum(i.data_type == low for i in big_weights) > len(big_weights) / 2
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    manifest = manifest_of(result.folder)
    assert manifest["precision"] == precision
    assert manifest["attention"]["pooling"] == "centered_float32"
    if precision == "fp16":
        assert manifest["parity"]["passed"] and manifest["parity"]["min_cosine"] >= 0.999
    else:
        assert "no bfloat16 kernels" in manifest["parity"]["skipped"]


def test_weights_over_the_threshold_go_to_external_data(checkpoint, tmp_path, monkeypatch):
    """Above protobuf's 2 GB limit the weights move to model.onnx.data (threshold lowered to show it)."""
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    result = export(checkpoint, tmp_path / "ext", OnnxTarget(), log=lambda m: None)
    data = result.folder / (ONNX_FILE + ".data")
    assert data.is_file() and data.stat().st_size >= 0.9 * (checkpoint / "model.safetensors").stat().st_size
    assert result.manifest.files[data.name] == {"bytes": data.stat().st_size, "sha256": sha256_file(data)}
    assert result.passed
    assert runtimes.load(result.folder, backend="onnx").encode(["external weights"]).shape == (1, 48)
