"""``dewey-export``: export a Dewey checkpoint, and re-check an export against PyTorch.

Exit codes: 0 ok; 1 verification failed (parity, the quality gate of a reduced-precision export, or
export files that differ from their manifest); 2 bad usage or input (missing or corrupt model folder or
manifest, unknown target, an output path that exists and may not be replaced, or cannot be written, a
runtime that is not installed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtimes.config import ModelFileError
from runtimes.precision import PRECISIONS

from .verify import INT8_WEIGHTS

EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model", type=click.Path(path_type=Path),
              help="Checkpoint folder to export (config.json, model.safetensors, tokenizer.json); "
                   "default: the packaged dewey-mini.")
@click.option("--to", "to", type=click.Choice(["onnx", "trt", "openvino", "triton"]),
              help="What to build: an ONNX export folder, a TensorRT engine, an OpenVINO IR folder, or a Triton "
                   "Inference Server model repository (--model: a checkpoint or an export folder).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder; written atomically.")
@click.option("--target", "target", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the ONNX graph will run. cpu: ONNX Runtime, global attention through its contrib "
                   "MultiHeadAttention flash kernel. gpu: TensorRT / ORT CUDA, the standard opset-23 "
                   "Attention op and no contrib ops.")
@click.option("--opset", type=click.Choice(["18", "23"]), default=None,
              help="ONNX opset (default: 18 for cpu, 23 for gpu, which needs it). 23 also fuses "
                   "RotaryEmbedding and runs faster on ONNX Runtime CPU at short lengths.")
@click.option("--attention", type=click.Choice(["linear", "dense"]), default="linear", show_default=True,
              help="linear: block-local sliding layers and mask-free global layers, memory linear in "
                   "length (128k tokens). dense: transformers' graph with S x S masks, for comparison only.")
@click.option("--precision", type=click.Choice([*PRECISIONS, INT8_WEIGHTS]), default=None,
              help="Element type of the graph (and of a TensorRT engine); default fp32. fp16/bf16 keep LayerNorm, "
                   "softmax, rotary tables and pooling in fp32 inside the graph; verified by cosine >= 0.999 and "
                   "the quality gate on real text. --to openvino: fp32, bf16 (the default where the CPU has "
                   "native bfloat16) or int8 (int8 weights, bf16 arithmetic).")
@click.option("--gate-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Texts for the quality gate of reduced-precision exports: JSONL ({\"text\": ...} per line) or "
                   "text (documents separated by blank lines); default: held-out documents of the built-in corpus.")
@click.option("--buckets", default="512x64,8192x4,32768x1,131072x1", show_default=True,
              help="--to trt: length buckets MAX_TOKENSxMAX_BATCH, one TensorRT optimization profile each; "
                   "inputs longer than the last bucket are refused.")
@click.option("--workspace-gib", type=float, default=8.0, show_default=True, help="--to trt: builder workspace limit.")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="--to trt: timing cache file, read and updated (default: ~/.cache/dewey/timing-GPU-TRT.cache).")
@click.option("--version-compatible", is_flag=True,
              help="--to trt: build a version-compatible plan (runs on newer TensorRT of the same major).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare the export with the PyTorch backend before publishing it (fp32: max abs diff "
                   "<= 1e-4, cosine >= 0.99999; reduced precision: the quality gate too); a failure exits 1 "
                   "and is recorded in the manifest.")
@click.option("--engine", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
              help="--to triton: serve the ONNX graph (onnxruntime_onnx) or a --to trt folder's engine (tensorrt_plan).")
@click.option("--instances", type=int, default=1, show_default=True, help="--to triton: instances of each model.")
@click.option("--max-batch-tokens", type=int, default=None,
              help="--to triton: padded tokens per graph batch (default 16384); sets max_batch_size.")
@click.option("--head", default=None,
              help="The projection head's weight tensors, comma-separated (NAME[,NAME]), where their shapes in "
                   "model.safetensors leave a choice (docs/models.md).")
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it holds a previous dewey export (only once the new export is complete). "
                   "Any other existing folder or file, and the checkpoint itself, is never replaced.")
@click.pass_context
def main(ctx, model, to, out, target, opset, attention, precision, gate_data, buckets, workspace_gib, timing_cache,
         version_compatible, verify, engine, instances, max_batch_tokens, head, overwrite):
    """Export Dewey embedding models: PyTorch checkpoint -> ONNX (-> TensorRT), or -> OpenVINO IR.

    \b
    Export:  dewey-export --model CKPT --to onnx --out DIR [--target cpu|gpu] [--no-verify]
             dewey-export --model CKPT --to openvino --out DIR [--precision fp32|bf16|int8]
             dewey-export --model CKPT_OR_EXPORT --to triton --out REPO [--engine onnx|trt]
    Check:   dewey-export verify DIR [--model CKPT]
    """
    if ctx.invoked_subcommand is not None:
        if model or to or out:
            raise click.UsageError("--model/--to/--out belong to an export, not to a subcommand")
        return
    missing = [flag for flag, value in (("--to", to), ("--out", out)) if value is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (see dewey-export --help)")
    if precision == INT8_WEIGHTS and to != "openvino":
        raise click.UsageError("--precision int8 (int8 weights) is for --to openvino only")
    if to == "openvino":
        given = [f"--{name}" for name in ("target", "opset", "attention")
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} do(es) not apply to --to openvino: its graph is always the "
                                   "opset-23 linear-attention graph made for OpenVINO")
    if model is None:
        from runtimes import default_model_path

        try:
            model = default_model_path()
        except ModelFileError as exc:
            raise click.UsageError(f"no --model given and {exc}") from exc
        _log(f"No --model given: exporting the packaged default model {model}")
    from .onnx_export import ExportError, export_onnx
    from .openvino_export import OpenVINOUnavailable, export_openvino
    from .trt_build import EngineBuildSettings, TensorRTUnavailable, build_engine_folder

    try:
        if head is not None:
            from .verify import check_checkpoint

            model = check_checkpoint(model, head=head)
        if to == "triton":
            from .triton import write_triton_repository

            write_triton_repository(model, out, engine=engine, instances=instances, max_batch_tokens=max_batch_tokens,
                                    target=target, verify=verify, overwrite=overwrite, log=_log)
            return
        if to == "openvino":
            result = export_openvino(model, out, precision=precision, verify=verify, overwrite=overwrite,
                                     gate_data=gate_data, log=_log)
        elif to == "trt":
            settings = EngineBuildSettings(precision=precision or "fp32", buckets=buckets, workspace_gib=workspace_gib,
                                           timing_cache=timing_cache, version_compatible=version_compatible)
            result = build_engine_folder(model, out, settings, verify=verify, overwrite=overwrite, log=_log)
        else:
            result = export_onnx(model, out, target=target, opset=int(opset) if opset else None,
                                 attention=attention, precision=precision or "fp32", verify=verify,
                                 overwrite=overwrite, gate_data=gate_data, log=_log)
    # ValueError: --buckets or a bucket over the model's length, or --gate-data with too little text;
    # OSError: --out cannot be written
    except (ModelFileError, ExportError, TensorRTUnavailable, OpenVINOUnavailable, ValueError, OSError) as exc:
        raise BadInput(str(exc)) from exc
    if not result.passed:
        _report_failures(result.parity, result.manifest.get("gate", {}))
        _log(f"The export was written to {result.folder} with the failed report in its manifest.")
        sys.exit(EXIT_VERIFY_FAILED)


def _report_failures(parity: dict, gate: dict) -> None:
    from .gate import describe_gate_failure
    from .verify import describe_failure

    if parity.get("passed") is False:
        _log(describe_failure(parity))
    if gate.get("passed") is False:
        _log(describe_gate_failure(gate))


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path),
              help="Reference checkpoint; default: the source recorded in the export's manifest.")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Also write the reports here: {\"parity\": ..., \"gate\": ...}.")
@click.option("--device", default="cpu", show_default=True,
              help="ONNX Runtime device for the export: cpu, cuda[:N] or tensorrt[:N] (needs onnxruntime-gpu); "
                   "an OpenVINO folder runs on the cpu. The PyTorch reference runs on the CPU in fp32.")
@click.option("--gate-data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Texts for the quality gate (as for the export); default: the built-in held-out documents.")
def verify(folder, model, json_out, device, gate_data):
    """Check an export FOLDER's files against its manifest (size and sha256 of each), then re-run the
    parity check against its PyTorch checkpoint, and the quality gate for a reduced-precision export.
    Exit 1 if a file differs, or parity or the gate fails."""
    from runtimes.backends.onnx_backend import ProviderUnavailableError
    from runtimes.backends.torch_backend import TorchBackend
    from runtimes.export_format import ExportFilesChanged, check_export_files

    from .gate import describe_gate, verify_candidate
    from .verify import check_source

    try:
        manifest = check_export_files(folder)
    except ExportFilesChanged as exc:
        _log(f"{folder}: files changed or damaged since export (compared with its manifest):\n  "
             + "\n  ".join(exc.problems))
        sys.exit(EXIT_VERIFY_FAILED)
    except ModelFileError as exc:
        raise BadInput(str(exc)) from exc
    try:
        model, config = check_source(manifest, model)
        _log(f"Comparing {folder} with {model}")
        candidate, precision = _candidate(folder, manifest, device)
        parity, gate = verify_candidate(TorchBackend.from_folder(model), candidate, model.tokenizer_folder, config, precision,
                                        precision != "fp32", gate_data, _log)
    # ImportError: the folder's runtime is not installed (the message says how to install it)
    except (ModelFileError, ProviderUnavailableError, ValueError, ImportError) as exc:
        raise BadInput(str(exc)) from exc
    for case in parity["cases"]:
        click.echo(f"{case['name']:<32} max abs diff {case['max_abs_diff']:.3g}  min cosine {case['min_cosine']:.8f}")
    click.echo(describe_gate(gate))
    if json_out:
        json_out.write_text(json.dumps({"parity": parity, "gate": gate}, indent=2) + "\n", encoding="utf-8")
    if not (parity["passed"] and gate.get("passed") is not False):
        _report_failures(parity, gate)
        sys.exit(EXIT_VERIFY_FAILED)
    click.echo("parity: passed")


def _candidate(folder: Path, manifest: dict, device: str):
    """The backend that runs the export in ``folder``, and the precision it is checked at: the manifest's,
    or for OpenVINO what the backend runs (fp32 on a CPU without bfloat16; int8 for int8 weights)."""
    from runtimes.backends import get_backend_class
    from runtimes.backends.onnx_backend import OnnxBackend, providers_for
    from runtimes.export_format import ONNX_FILE, OPENVINO_KEY

    if OPENVINO_KEY in manifest:
        backend = get_backend_class("openvino").from_folder(folder, device=device)
        return backend, INT8_WEIGHTS if backend.weights == INT8_WEIGHTS else backend.precision
    return OnnxBackend(folder / ONNX_FILE, providers=providers_for(device)), manifest["precision"]


if __name__ == "__main__":  # python -m dewey_export.cli, as the crash tests run it
    main()
