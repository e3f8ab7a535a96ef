"""``dewey-export``: export a Dewey checkpoint for a target, package an export for Triton, re-check an export.

    dewey-export onnx     --model CKPT --out DIR [--device cpu|gpu] [--precision fp32|fp16|bf16|int8]
    dewey-export openvino --model CKPT --out DIR [--precision fp32|bf16|int8]
                          [--quantization weights|full]
    dewey-export trt      --model CKPT --out DIR [--precision fp32|fp16|bf16] [--buckets ...]
    dewey-export triton   EXPORT_DIR --out REPO [--engine onnx|trt]
    dewey-export verify   EXPORT_DIR [--model CKPT]

Exit codes (runtimes.errors): 0 ok; 1 verification failed (parity, the quality gate of a
reduced-precision export, an int8 export whose quantized operators do not run or that is not faster
than fp32, export files that differ from their manifest, or a Triton source whose reports failed); 2
bad usage or input (missing or corrupt model folder or manifest, an output path that exists and may
not be replaced, or cannot be written, a runtime that is not installed, a build step that failed).
``--to X`` (the one-command form of earlier releases) still works for one release, with a deprecation
note.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from runtimes.errors import EXIT_BAD_INPUT, EXIT_VERIFICATION_FAILED, VerificationFailed, cli_errors
from runtimes.precision import PRECISIONS

from .quantize import MIN_INT8_SPEEDUP
from .triton import INT32_MAX
from .trt_build import TensorRTTarget
from .verify import INT8_WEIGHTS

# Kept for the callers that imported them from here.
EXIT_VERIFY_FAILED = EXIT_VERIFICATION_FAILED
__all__ = ["EXIT_BAD_INPUT", "EXIT_VERIFY_FAILED", "main"]
# --to's values (each is now a subcommand) and the options the subcommand spells another way: --to
# onnx's --target is onnx's --device; --to triton's --model is triton's EXPORT_DIR argument.
LEGACY_TARGETS = ("onnx", "openvino", "trt", "triton")
LEGACY_OPTIONS = {"onnx": {"--target": "--device"}, "triton": {"--model": None}}
# The TensorRT target's defaults, shown by trt's options.
TRT_DEFAULTS = TensorRTTarget()


def _log(message: str) -> None:
    click.echo(message, err=True)


class ExportGroup(click.Group):
    """The subcommands, and ``--to X`` rewritten to subcommand ``X`` with a deprecation note."""

    def parse_args(self, ctx, args):
        args = list(args)
        for index, arg in enumerate(args):
            if arg == "--to" or arg.startswith("--to="):
                value = arg.partition("=")[2] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
                if value not in LEGACY_TARGETS:
                    raise click.UsageError(f"--to: {value!r} is not one of {', '.join(LEGACY_TARGETS)}")
                del args[index:index + (1 if "=" in arg else 2)]
                renames = LEGACY_OPTIONS.get(value, {})
                args = [value, *(renames.get(a, a) for a in args if renames.get(a, a) is not None)]
                _log(f"Note: --to {value} is deprecated and goes in the next release; use: dewey-export {value} ...")
                break
        if args and args[0].startswith("--") and args[0] not in ctx.help_option_names:
            raise click.UsageError(f"missing the subcommand: dewey-export {{{'|'.join(self.commands)}}} [OPTIONS]")
        return super().parse_args(ctx, args)


@cli_errors
@click.group(cls=ExportGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Export Dewey embedding models (PyTorch checkpoint -> ONNX, OpenVINO IR or a TensorRT engine),
    package an export for Triton, and re-check an export against its checkpoint.

    Every export is verified before it is published: parity with PyTorch fp32 and, for a reduced
    precision, the quality gate on real text; a failure exits 1 and keeps the folder with its reports.
    """


def export_options(command):
    """The options every export subcommand shares, defined once."""
    options = [
        click.option("--model", "model",
                     help="Model to export: a Dewey checkpoint, a ModernBERT, Dewey-release or sentence-transformers "
                          "folder, or a Hub id org/name[@revision] (docs/models.md); default: the packaged "
                          "dewey-mini."),
        click.option("--head", default=None,
                     help="The projection head's weight tensors, comma-separated (NAME[,NAME]), where their shapes "
                          "in model.safetensors leave a choice (docs/models.md)."),
        click.option("--out", required=True, type=click.Path(path_type=Path),
                     help="Output folder; written atomically."),
        click.option("--overwrite", is_flag=True,
                     help="Replace --out if it holds a previous dewey export (only once the new export is "
                          "complete). Any other existing folder or file, and the checkpoint, is never replaced."),
        click.option("--verify/--no-verify", default=True, show_default=True,
                     help="Check the export against PyTorch fp32 before publishing it (fp32: max abs diff "
                          "<= 1e-4, cosine >= 0.99999; reduced precision: cosine >= 0.999 and the quality "
                          "gate); a failure exits 1 and is recorded in the manifest."),
        click.option("--gate-data", type=click.Path(exists=True, path_type=Path),
                     help="Texts for the quality gate of reduced precisions: a JSONL file ({\"text\": ...} per "
                          "line), or text files (one document each) in a folder; default: held-out documents "
                          "of the built-in corpus."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _export(target, model, head, out, overwrite, verify, gate_data) -> None:
    """Run the pipeline for ``target``; a failed check exits 1 naming each failed report."""
    from .pipeline import export

    if model is None:
        from runtimes import default_model_path

        model = default_model_path()
        _log(f"No --model given: exporting the packaged default model {model}")
    result = export(model, out, target, verify=verify, gate_data=gate_data, overwrite=overwrite, head=head, log=_log)
    if not result.passed:
        _report_failures(result.manifest.reports)
        raise VerificationFailed(f"{result.folder} failed its {', '.join(result.manifest.failed)} check(s); it was "
                                 "written with the failed reports in its manifest")


def _report_failures(reports: dict) -> None:
    from .gate import describe_gate_failure
    from .quantize import describe_execution_failure
    from .verify import describe_failure

    for name, report in reports.items():
        if report.get("passed") is False:
            _log(describe_gate_failure(report) if name.endswith("gate") else describe_execution_failure(report)
                 if name == "int8" else describe_failure(report))


def int8_speed_option(command):
    return click.option(
        "--min-int8-speedup", type=click.FloatRange(min=0), default=MIN_INT8_SPEEDUP, show_default=True,
        help="int8 only: the speed the int8 graph must reach against the same engine in fp32 on this machine "
             "(a short batch); slower exits 1. 0 skips the measurement (the check that the quantized "
             "operators run still holds).")(command)


@main.command("onnx")
@export_options
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the graph will run. cpu: ONNX Runtime, global attention through its contrib "
                   "MultiHeadAttention flash kernel. gpu: TensorRT / ORT CUDA, the standard opset-23 "
                   "Attention op and no contrib ops.")
@click.option("--opset", type=click.Choice(["18", "23"]), default=None,
              help="ONNX opset (default: 18 for cpu, 23 for gpu, which needs it). 23 also fuses "
                   "RotaryEmbedding and runs faster on ONNX Runtime CPU at short lengths.")
@click.option("--attention", type=click.Choice(["linear", "dense"]), default="linear", show_default=True,
              help="linear: block-local sliding layers and mask-free global layers, memory linear in "
                   "length (128k tokens). dense: transformers' graph with S x S masks, for comparison only.")
@click.option("--precision", type=click.Choice([*PRECISIONS, INT8_WEIGHTS]), default="fp32", show_default=True,
              help="Element type of the graph. fp16/bf16 keep LayerNorm, softmax, rotary tables and pooling "
                   "in fp32 inside the graph. int8 (cpu): ONNX Runtime dynamic int8 of the weight MatMuls, "
                   "int8 weights per channel, the rest fp32 (docs/export.md).")
@int8_speed_option
def onnx_command(model, head, out, overwrite, verify, gate_data, device, opset, attention, precision,
                 min_int8_speedup):
    """An ONNX export folder (model.onnx, config, tokenizer, manifest)."""
    from .onnx_export import OnnxTarget

    target = OnnxTarget(form=device, opset=int(opset) if opset else None, attention=attention, precision=precision,
                        min_int8_speedup=min_int8_speedup)
    _export(target, model, head, out, overwrite, verify, gate_data)


@main.command("openvino")
@export_options
@click.option("--precision", type=click.Choice(["fp32", "bf16", INT8_WEIGHTS]), default=None,
              help="fp32, bf16 (the default where the CPU has native bfloat16) or int8 (see --quantization; the "
                   "float arithmetic is bf16 where the CPU has it, else fp32).")
@click.option("--quantization", type=click.Choice(["weights", "full"]), default=None,
              help="int8 only. weights (default): int8 weights, float arithmetic. full: int8 activations too "
                   "(nncf, calibrated on real text; refused where OpenVINO has no int8 kernels for the CPU).")
@int8_speed_option
def openvino_command(model, head, out, overwrite, verify, gate_data, precision, quantization, min_int8_speedup):
    """An OpenVINO IR folder (model.xml, model.bin, config, tokenizer, manifest) for OpenVINO's CPU plugin."""
    from .openvino_export import OpenVINOTarget

    target = OpenVINOTarget(precision=precision, quantization=quantization, min_int8_speedup=min_int8_speedup)
    _export(target, model, head, out, overwrite, verify, gate_data)


@main.command("trt")
@export_options
@click.option("--precision", type=click.Choice(PRECISIONS), default=TRT_DEFAULTS.precision, show_default=True,
              help="The engine's precision.")
@click.option("--buckets", default=",".join(f"{n}x{b}" for n, b in TRT_DEFAULTS.buckets), show_default=True,
              help="Length buckets MAX_TOKENSxMAX_BATCH, one TensorRT optimization profile each; inputs longer "
                   "than the last bucket are refused.")
@click.option("--workspace-gib", type=float, default=TRT_DEFAULTS.workspace_gib, show_default=True,
              help="Builder workspace limit.")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file, read and updated (default: ~/.cache/dewey/timing-GPU-TRT.cache).")
@click.option("--version-compatible", is_flag=True,
              help="Build a version-compatible plan (runs on newer TensorRT of the same major).")
def trt_command(model, head, out, overwrite, verify, gate_data, precision, buckets, workspace_gib, timing_cache,
                version_compatible):
    """A TensorRT engine folder: the gpu-form ONNX export and model.plan built from it on this GPU."""
    target = TensorRTTarget(precision=precision, buckets=buckets, workspace_gib=workspace_gib,
                            timing_cache=timing_cache, version_compatible=version_compatible)
    _export(target, model, head, out, overwrite, verify, gate_data)


@main.command("triton")
@click.argument("export_folder", metavar="EXPORT_DIR", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Repository folder; written atomically.")
@click.option("--engine", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
              help="Serve the ONNX graph (onnxruntime_onnx) or a trt folder's engine (tensorrt_plan).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each model.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1, max=INT32_MAX), default=None,
              help="Padded tokens per graph batch (default 16384); sets max_batch_size.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds a previous repository.")
def triton_command(export_folder, out, engine, instances, max_batch_tokens, overwrite):
    """A Triton Inference Server model repository of a finished, passed export folder."""
    from .triton import write_triton_repository

    write_triton_repository(export_folder, out, engine=engine, instances=instances, max_batch_tokens=max_batch_tokens,
                            overwrite=overwrite, log=_log)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path),
              help="Reference checkpoint; default: the source recorded in the export's manifest.")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Also write the reports here: {\"parity\": ..., \"gate\": ...} (an engine folder's: "
                   "tensorrt_parity, tensorrt_gate).")
@click.option("--device", default=None,
              help="Where the export runs: ONNX Runtime's cpu (default), cuda[:N] or tensorrt[:N] (needs "
                   "onnxruntime-gpu); a TensorRT engine's cuda[:N]; an OpenVINO folder's cpu. The PyTorch "
                   "reference runs on the CPU in fp32.")
@click.option("--gate-data", type=click.Path(exists=True, path_type=Path),
              help="Texts for the quality gate (as for the export); default: the built-in held-out documents.")
def verify(folder, model, json_out, device, gate_data):
    """Check an export FOLDER's files against its manifest (size and sha256 of each), then re-run the
    parity check against its PyTorch checkpoint, and the quality gate for a reduced precision, on the
    backend that serves it (a TensorRT folder: its engine). Exit 1 if a file differs, or a check fails."""
    from runtimes.export_format import ExportFilesChanged, check_export_files

    from .gate import describe_gate
    from .pipeline import verify_folder

    try:
        manifest = check_export_files(folder)
    except ExportFilesChanged as exc:
        _log(f"{folder}: files changed or damaged since export (compared with its manifest):\n  "
             + "\n  ".join(exc.problems))
        raise VerificationFailed(f"{folder}: {len(exc.problems)} file(s) differ from its manifest") from None
    reports = verify_folder(folder, manifest, model, device, gate_data, _log)
    parity, gate = reports.values()
    for case in parity["cases"]:
        if "error" in case:
            click.echo(f"{case['name']:<32} {case['error']}")
        else:
            click.echo(f"{case['name']:<32} max abs diff {case['max_abs_diff']:.3g}  "
                       f"min cosine {case['min_cosine']:.8f}")
    click.echo(describe_gate(gate))
    if json_out:
        json_out.write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")
    failed = [name for name, report in reports.items() if report.get("passed") is False]
    if failed:
        _report_failures(reports)
        raise VerificationFailed(f"{folder}: {', '.join(failed)} failed")
    click.echo("parity: passed")


if __name__ == "__main__":  # python -m dewey_export.cli, as the crash tests run it
    main()
