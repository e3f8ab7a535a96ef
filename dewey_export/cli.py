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
from runtimes.precision import PRECISIONS

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
@click.option("--to", "to", type=click.Choice(["onnx", "trt"]),
              help="What to build: an ONNX export folder, or a TensorRT engine.")
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
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
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
def main(ctx, model, to, out, target, opset, attention, precision, buckets, workspace_gib, timing_cache,
         version_compatible, verify, overwrite):
    """Export Dewey embedding models: PyTorch checkpoint -> ONNX (-> TensorRT).

    \b
    Export:  dewey-export --model CKPT --to onnx --out DIR [--target cpu|gpu] [--no-verify]
    Check:   dewey-export verify DIR [--model CKPT]
    """
    if ctx.invoked_subcommand is not None:
        if model or to or out:
            raise click.UsageError("--model/--to/--out belong to an export, not to a subcommand")
        return
    missing = [flag for flag, value in (("--to", to), ("--out", out)) if value is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (see dewey-export --help)")
    if model is None:
        from runtimes import default_model_path

        try:
            model = default_model_path()
        except ModelFileError as exc:
            raise click.UsageError(f"no --model given and {exc}") from exc
        _log(f"No --model given: exporting the packaged default model {model}")
    from .onnx_export import ExportError, export_onnx
    from .trt_build import EngineBuildSettings, TensorRTUnavailable, build_engine_folder
    from .verify import describe_failure

    try:
        if to == "trt":
            settings = EngineBuildSettings(precision=precision, buckets=buckets, workspace_gib=workspace_gib,
                                           timing_cache=timing_cache, version_compatible=version_compatible)
            result = build_engine_folder(model, out, settings, verify=verify, overwrite=overwrite, log=_log)
        else:
            result = export_onnx(model, out, target=target, opset=int(opset) if opset else None,
                                 attention=attention, precision=precision, verify=verify, overwrite=overwrite,
                                 log=_log)
    # ValueError: --buckets or a bucket over the model's length; OSError: --out cannot be written
    except (ModelFileError, ExportError, TensorRTUnavailable, ValueError, OSError) as exc:
        raise BadInput(str(exc)) from exc
    if not result.passed:
        _log(describe_failure(result.parity))
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
    from runtimes.export_format import ONNX_FILE, ExportFilesChanged, check_export_files

    from .verify import check_source, compare_backends, describe_failure

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
        candidate = OnnxBackend(folder / ONNX_FILE, providers=providers_for(device))
        report = compare_backends(TorchBackend.from_folder(model), candidate, config, manifest["precision"], log=_log)
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


if __name__ == "__main__":  # python -m dewey_export.cli, as the crash tests run it
    main()
