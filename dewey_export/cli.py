"""``dewey-export``: export a Dewey checkpoint, and re-check an export against PyTorch.

Exit codes: 0 ok; 1 verification failed (parity, or export files that differ from their manifest);
2 bad usage or input (missing or corrupt model folder or manifest, unknown target, an output path that
exists and may not be replaced, or cannot be written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtimes.config import ModelFileError

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
@click.option("--to", "target", type=click.Choice(["onnx", "trt"]),
              help="What to build: an ONNX export folder, or a TensorRT engine.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder; written atomically.")
@click.option("--target", "device_target", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the ONNX graph will run. cpu: ONNX Runtime, global attention through its contrib "
                   "MultiHeadAttention flash kernel. gpu: TensorRT / ORT CUDA, the standard opset-23 "
                   "Attention op and no contrib ops.")
@click.option("--opset", type=click.Choice(["18", "23"]), default=None,
              help="ONNX opset (default: 18 for cpu, 23 for gpu, which needs it). 23 also fuses "
                   "RotaryEmbedding and runs faster on ONNX Runtime CPU at short lengths.")
@click.option("--attention", type=click.Choice(["linear", "dense"]), default="linear", show_default=True,
              help="linear: block-local sliding layers and mask-free global layers, memory linear in "
                   "length (128k tokens). dense: transformers' graph with S x S masks, for comparison only.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Element type of the graph (and of a TensorRT engine). fp16/bf16 keep LayerNorm, softmax, "
                   "rotary tables and pooling in fp32 inside the graph; verified by cosine >= 0.999.")
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
                   "<= 1e-4, cosine >= 0.99999); a failure exits 1 and is recorded in the manifest.")
@click.option("--overwrite", is_flag=True,
              help="Replace --out if it holds a previous dewey export (only once the new export is complete). "
                   "Any other existing folder or file, and the checkpoint itself, is never replaced.")
@click.pass_context
def main(ctx, model, target, out, device_target, opset, attention, precision, buckets, workspace_gib, timing_cache,
         version_compatible, verify, overwrite):
    """Export Dewey embedding models: PyTorch checkpoint -> ONNX (-> TensorRT).

    \b
    Export:  dewey-export --model CKPT --to onnx --out DIR [--target cpu|gpu] [--no-verify]
    Check:   dewey-export verify DIR [--model CKPT]
    """
    if ctx.invoked_subcommand is not None:
        if model or target or out:
            raise click.UsageError("--model/--to/--out belong to an export, not to a subcommand")
        return
    missing = [flag for flag, value in (("--to", target), ("--out", out)) if value is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (see dewey-export --help)")
    if model is None:
        from runtimes import default_model_path

        try:
            model = default_model_path()
        except ModelFileError as exc:
            raise click.UsageError(f"no --model given and {exc}") from exc
        _log(f"No --model given: exporting the packaged default model {model}")
    if target == "trt":
        return _export_trt(model, out, precision, buckets, workspace_gib, timing_cache, version_compatible,
                           verify, overwrite)
    from .onnx_export import ExportError, export_onnx
    from .verify import describe_failure

    try:
        result = export_onnx(model, out, target=device_target, opset=int(opset) if opset else None,
                             attention=attention, precision=precision, verify=verify, overwrite=overwrite,
                             log=_log)
    except (ModelFileError, ExportError, OSError) as exc:  # OSError: --out cannot be written
        raise BadInput(str(exc)) from exc
    if not result.passed:
        _log(describe_failure(result.manifest["parity"]))
        _log(f"The export was written to {result.folder} with the failed report in its manifest.")
        sys.exit(EXIT_VERIFY_FAILED)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path),
              help="Reference checkpoint; default: the source recorded in the export's manifest.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the parity report here.")
@click.option("--device", default="cpu", show_default=True,
              help="ONNX Runtime device for the export: cpu, cuda[:N] or tensorrt[:N] (needs onnxruntime-gpu); "
                   "the PyTorch reference runs on the CPU in fp32.")
def verify(folder, model, json_out, device):
    """Check an export FOLDER's files against its manifest (size and sha256 of each), then re-run the
    parity check against its PyTorch checkpoint. Exit 1 if a file differs or parity fails."""
    from runtimes.backends.onnx_backend import OnnxBackend, ProviderUnavailableError, providers_for
    from runtimes.backends.torch_backend import TorchBackend
    from runtimes.config import load_config
    from runtimes.export_format import ONNX_FILE, ExportFilesChanged, check_export_files, sha256_file

    from .onnx_export import CHECKPOINT_FILES, check_checkpoint
    from .verify import compare_backends, describe_failure, parity_cases, parity_thresholds

    try:
        manifest = check_export_files(folder)
    except ExportFilesChanged as exc:
        _log(f"{folder}: files changed or damaged since export (compared with its manifest):\n  "
             + "\n  ".join(exc.problems))
        sys.exit(EXIT_VERIFY_FAILED)
    except ModelFileError as exc:
        raise BadInput(str(exc)) from exc
    try:
        model = Path(model or manifest["source"]["path"])
        check_checkpoint(model)
        changed = [name for name in CHECKPOINT_FILES
                   if sha256_file(model / name) != manifest["source"]["sha256"].get(name)]
        if changed:
            raise BadInput(f"{model} is not the checkpoint this export was made from: {', '.join(changed)} differ "
                           "(sha256 in the manifest); pass --model with the original checkpoint")
        _log(f"Comparing {folder} with {model}")
        candidate = OnnxBackend(folder / ONNX_FILE, providers=providers_for(device))
        report = compare_backends(TorchBackend.from_folder(model), candidate,
                                  parity_cases(load_config(model)), log=_log,
                                  **parity_thresholds(manifest["precision"]))
    except (ModelFileError, ProviderUnavailableError, ValueError) as exc:
        raise BadInput(str(exc)) from exc
    for case in report["cases"]:
        click.echo(f"{case['name']:<32} max abs diff {case['max_abs_diff']:.3g}  min cosine {case['min_cosine']:.8f}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not report["passed"]:
        _log(describe_failure(report))
        sys.exit(EXIT_VERIFY_FAILED)
    click.echo("parity: passed")


def _export_trt(model, out, precision, buckets, workspace_gib, timing_cache, version_compatible, verify, overwrite):
    from runtimes.trt_plan import parse_buckets

    from .onnx_export import ExportError, check_output_folder
    from .trt_build import EngineBuildSettings, TensorRTUnavailable, build_engine_folder, tensorrt_status

    try:  # read-only: a refused --out is reported whether or not TensorRT is here
        check_output_folder(model, out, overwrite)
    except ExportError as exc:
        raise BadInput(str(exc)) from exc
    status = tensorrt_status()  # before anything is written
    if status:
        raise BadInput(f"--to trt: {status}")
    try:
        settings = EngineBuildSettings(precision=precision, buckets=tuple(parse_buckets(buckets)),
                                       workspace_gib=workspace_gib, timing_cache=timing_cache,
                                       version_compatible=version_compatible)
        folder = build_engine_folder(model, out, settings, overwrite=overwrite, log=_log)
    except (ModelFileError, ExportError, TensorRTUnavailable, ValueError, OSError) as exc:
        raise BadInput(str(exc)) from exc
    if verify:
        _verify_engine(Path(model), folder, precision)


def _verify_engine(model: Path, folder: Path, precision: str) -> None:
    """Parity of the engine against PyTorch fp32 on the GPU; recorded in the manifest, exit 1 below it."""
    from runtimes.backends.torch_backend import TorchBackend
    from runtimes.backends.trt_backend import TensorRTBackend
    from runtimes.config import load_config
    from runtimes.export_format import read_manifest, write_manifest

    from .onnx_export import PRECISIONS
    from .verify import compare_backends, describe_failure, parity_cases, parity_thresholds

    _log("Verifying the engine against the PyTorch backend (fp32, cuda)")
    report = compare_backends(TorchBackend.from_folder(model, device="cuda"), TensorRTBackend(folder),
                              parity_cases(load_config(model)), log=_log, **parity_thresholds(PRECISIONS[precision]))
    manifest = read_manifest(folder)
    manifest["tensorrt_parity"] = report
    write_manifest(folder, manifest)
    if not report["passed"]:
        _log(describe_failure(report))
        sys.exit(EXIT_VERIFY_FAILED)
    _log(f"  max abs diff {report['max_abs_diff']:.3g}, min cosine {report['min_cosine']:.6f}: passed")


if __name__ == "__main__":  # python -m dewey_export.cli, as the crash tests run it
    main()
