"""Checkpoint folder -> ONNX export folder, verified against PyTorch before it is published.

The graph is ``DeweyModel.forward`` traced by ``torch.onnx.export(dynamo=True)``: the backend contract
as graph I/O, dynamic ``batch``, ``sequence`` and ``chunks`` axes, span pooling (float64 prefix sums)
before the head. A reduced-precision (fp16) graph must also pass the quality gate on real text
(dewey_export.gate). Everything is written into a staging folder beside the target and renamed into place
at the end (runtimes.files), so an interrupted export never leaves a half-written folder, and the next
export into the same place removes what a killed one left. Only a previous export is ever replaced, and
only with ``overwrite`` (``check_output_folder``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from runtimes.config import CONFIG_FILE, DeweyConfig
from runtimes.export_format import (
    INPUTS,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    ONNX_FILE,
    OUTPUTS,
    file_table,
    is_export_folder,
    write_manifest,
)
from runtimes.files import atomic_path, clean_leftovers, staged_folder
from runtimes.model_source import resolve_model
from runtimes.precision import precision_name
from runtimes.tokenization import TOKENIZER_FILE

from .verify import check_checkpoint, skipped_report, source_hashes

SUPPORTED_OPSETS = (18, 23)
# Where the graph will run decides the form of global attention (runtimes.attention):
# cpu: ONNX Runtime's contrib MultiHeadAttention (its CPU flash kernel is linear in memory);
# gpu: the standard ONNX Attention op of opset 23, which TensorRT 10.15.1+ imports (with
# RotaryEmbedding); no contrib ops.
# openvino: the gpu form, the source of dewey_export.openvino_export (which explains the choice).
# And how span pooling accumulates (runtimes.modeling.POOLING_ACCUMULATIONS): float64 where the runtime
# has it; centered float32 for TensorRT, which has no float64, and OpenVINO's CPU plugin, which runs
# float64 nodes in float32.
TARGETS = {
    "cpu": {"opset": 18, "global_kernel": "ort_contrib", "pooling": "float64"},
    "gpu": {"opset": 23, "global_kernel": "sdpa", "pooling": "centered_float32"},
    "openvino": {"opset": 23, "global_kernel": "sdpa_key_bias", "pooling": "centered_float32"},
}
ATTENTION_FORMS = {
    ("linear", "ort_contrib"): "com.microsoft.MultiHeadAttention, no mask (key padding folded into the keys)",
    ("linear", "sdpa"): "ONNX Attention (opset 23) or MatMul/Softmax (opset 18), no mask",
    ("linear", "sdpa_key_bias"): "ONNX Attention (opset 23) with a [B, 1, 1, S] key-padding bias, no S x S mask",
    ("dense", "sdpa"): "transformers' masked attention with dense S x S masks (quadratic memory)",
}
# Protobuf cannot hold a file over 2 GiB; above this many weight bytes the weights go to model.onnx.data.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
COPIED_FILES = (CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")


class ExportError(RuntimeError):
    """The export could not be made (bad input, or a step failed); nothing was written."""


@dataclass
class ExportResult:
    folder: Path
    manifest: dict
    # The manifest's parity report that decides ``passed``: the graph's, or an engine folder's engine's.
    parity_key: str = "parity"

    @property
    def parity(self) -> dict:
        return self.manifest[self.parity_key]

    @property
    def passed(self) -> bool:
        """Parity held, and the quality gate too where it ran (reduced-precision exports)."""
        return self.parity.get("passed") is not False and self.manifest.get("gate", {}).get("passed") is not False


def tool_versions() -> dict:
    versions = {}
    for name in ("dewey", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                 "openvino", "nncf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass(frozen=True)
class GraphOptions:
    """What the graph is made for, checked by ``graph_options``."""

    target: str
    opset: int
    attention: str
    global_kernel: str
    precision: str  # runtimes.precision's name: fp32, fp16 or bf16


def graph_options(target: str = "cpu", opset: int | None = None, attention: str = "linear",
                  precision: str = "fp32") -> GraphOptions:
    """Check the export options (ExportError names the bad one) and fill in the target's defaults."""
    if target not in TARGETS:
        raise ExportError(f"target {target!r} is not one of {sorted(TARGETS)}")
    opset = TARGETS[target]["opset"] if opset is None else opset
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {SUPPORTED_OPSETS}")
    if target == "gpu" and opset < 23:
        raise ExportError("target gpu needs opset 23: its global layers use the ONNX Attention op")
    if attention not in ("linear", "dense"):
        raise ExportError(f"attention must be 'linear' or 'dense', got {attention!r}")
    try:
        precision = precision_name(precision)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    global_kernel = TARGETS[target]["global_kernel"] if attention == "linear" else "sdpa"
    return GraphOptions(target, opset, attention, global_kernel, precision)


def check_output_folder(checkpoint, out, overwrite: bool) -> None:
    """Refuse an output path whose replacement would destroy anything but a previous export.

    Refused always: ``out`` is, contains or is inside the checkpoint (resolved paths, so symlinks and
    ``..`` do not hide it); ``out`` is a file; ``out`` is a non-empty folder without a dewey manifest;
    a path that cannot be created. A previous export is replaced only with ``overwrite``. Reads only:
    the CLI runs it before anything else, and every exporter runs it before writing.
    """
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    if out == checkpoint or checkpoint in out.parents or out in checkpoint.parents:
        relation = "is" if out == checkpoint else "is inside" if checkpoint in out.parents else "contains"
        raise ExportError(f"--out {out} {relation} the source checkpoint {checkpoint}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; remove it or choose another path")
    if out.exists() and any(out.iterdir()):
        if not is_export_folder(out):
            raise ExportError(
                f"--out {out} is a folder with files and no {MANIFEST_FILE}: not a dewey export, so it is "
                "never replaced (not even with --overwrite); choose a new or empty folder"
            )
        if not overwrite:
            raise ExportError(f"{out} already exists and is not empty; pass overwrite (--overwrite) to replace it")
    existing = next(folder for folder in out.parents if folder.exists())
    if not existing.is_dir():
        raise ExportError(f"cannot write --out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write --out {out}: {existing} is not writable")


def prepare_output(checkpoint: Path, out: Path, overwrite: bool, log) -> None:
    """Remove what a killed export left beside ``out``, then ``check_output_folder``."""
    # Before the check: a folder a crash left moved aside is put back, and is then again a previous
    # export that only overwrite replaces.
    clean_leftovers(out.parent, out.name, log=log)
    check_output_folder(checkpoint, out, overwrite)


def load_reference(checkpoint, attention: str, log):
    """The fp32 DeweyModel of the checkpoint (a folder, Hub id or runtimes.model_source.ModelSource),
    loaded once per export: the graph is traced from a copy of it, and parity is checked against it."""
    from runtimes.modeling import DeweyModel

    log(f"Loading {checkpoint!r}")
    return DeweyModel.from_pretrained(checkpoint, attention=attention)


def export_onnx(checkpoint, out, target: str = "cpu", opset: int | None = None, attention: str = "linear",
                precision: str = "fp32", verify: bool = True, overwrite: bool = False, gate_data=None,
                log=print) -> ExportResult:
    """Export ``checkpoint`` to the folder ``out``; returns the manifest (its parity and quality gate
    reports included).

    target: ``cpu`` (ONNX Runtime) or ``gpu`` (TensorRT, ORT CUDA); opset: 18 or 23 (default: the
    target's, and gpu needs 23); attention: ``linear`` (linear memory, the default) or ``dense`` (the
    plain transformers graph, quadratic, kept for comparison); precision: ``fp32``, or ``fp16``/``bf16``
    with LayerNorm, softmax, rotary tables and pooling kept in float32 inside the graph (what strongly
    typed TensorRT builds from). The gpu target pools with float32 (TensorRT has no float64). An fp16
    graph also passes the quality gate (dewey_export.gate) on ``gate_data`` (None: the built-in texts).
    A failed verification still publishes the folder, its numbers in the manifest, so the failure can
    be inspected; the caller decides what to do with ``result.passed`` (the CLI exits 1).
    ``out`` is checked by ``check_output_folder`` first; what a killed export left beside it is removed.
    """
    source = check_checkpoint(checkpoint)
    out = Path(out).resolve()
    options = graph_options(target, opset, attention, precision)
    prepare_output(source.folder.resolve(), out, overwrite, log)
    with staged_folder(out) as staging:  # made first: an --out that cannot be written fails before the load
        model = load_reference(source, options.attention, log)
        manifest = write_export(source, source.config, model, staging, options, verify, log, gate_data)
    log(f"Wrote {out}")
    return ExportResult(out, manifest)


def graph_model(model, options: GraphOptions):
    """The form of the fp32 ``model`` that is traced for ``options``: a copy (``model`` stays the parity
    reference) with the target's global attention kernel, pooling and precision."""
    from runtimes.attention import set_global_kernel
    from runtimes.backends.torch_backend import torch_dtype
    from runtimes.modeling import reduce_precision

    traced = copy.deepcopy(model)
    if options.attention == "linear":
        set_global_kernel(traced.backbone, options.global_kernel)
    traced.pooling = TARGETS[options.target]["pooling"]
    return reduce_precision(traced, torch_dtype(options.precision))


def write_export(checkpoint, config: DeweyConfig, model, folder: Path, options: GraphOptions, verify: bool,
                 log, gate_data=None) -> dict:
    """Fill the empty ``folder`` with the export of ``checkpoint`` and its manifest; returns the manifest.

    ``config`` and ``model`` (fp32, from ``load_reference``) are the checkpoint's, read once by the caller;
    ``model`` is left as it is. ``folder`` is a staging folder (runtimes.files.staged_folder): only a
    complete export is published.
    """
    from runtimes.backends.onnx_backend import OnnxBackend
    from runtimes.backends.torch_backend import TorchBackend

    from .gate import skipped_gate, verify_candidate

    onnx_path = folder / ONNX_FILE
    checkpoint = resolve_model(checkpoint)
    traced, export_seconds = trace_graph(model, options, onnx_path, log)
    copy_model_files(checkpoint, folder)

    if verify and options.precision == "bf16":
        reason = ("ONNX Runtime's CPU provider has no bfloat16 kernels; check this graph on a GPU with "
                  "dewey-export verify DIR --device cuda")
        log(f"Not verified: {reason}")
        parity, gate = skipped_report(options.precision, reason), skipped_gate(reason)
    elif verify:
        parity, gate = verify_candidate(TorchBackend(model), OnnxBackend(onnx_path), checkpoint.tokenizer_folder, config,
                                        options.precision, options.precision != "fp32", gate_data, log)
    else:
        parity, gate = skipped_report(options.precision), skipped_gate()

    manifest = build_manifest(checkpoint, folder, {"onnx": onnx_description(options.opset)},
                              precision=options.precision, target=options.target,
                              attention=attention_description(options, traced.pooling),
                              export_seconds=export_seconds, parity=parity, gate=gate)
    write_manifest(folder, manifest)
    return manifest


def trace_graph(model, options: GraphOptions, onnx_path: Path, log):
    """Trace the graph of the fp32 ``model`` for ``options`` to ``onnx_path``; returns the traced model
    (``graph_model``) and the seconds the export took."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    traced = graph_model(model, options)
    log(f"Exporting to ONNX (target {options.target}, opset {options.opset}, {options.attention} attention, "
        f"{options.precision}, {weight_bytes / 1e6:.1f} MB of fp32 weights)")
    started = time.perf_counter()
    _trace(traced, onnx_path, options.opset, external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES,
           contrib=options.global_kernel == "ort_contrib")
    export_seconds = time.perf_counter() - started
    log(f"  exported in {export_seconds:.1f} s")
    return traced, export_seconds


def copy_model_files(checkpoint, folder: Path) -> None:
    """The files every export folder carries: the model's config.json as the runtime reads it (the
    backbone's keys and the Dewey fields of runtimes.model_source.ModelSource.config_dict, so a model of
    any layout loads like a Dewey checkpoint) and the tokenizer files."""
    source = resolve_model(checkpoint)
    with atomic_path(folder / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps(source.config_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        if name != CONFIG_FILE and (source.tokenizer_folder / name).is_file():
            shutil.copy2(source.tokenizer_folder / name, folder / name)


def attention_description(options: GraphOptions, pooling: str) -> dict:
    """The manifest's ``attention``: the form of each layer kind, and of pooling."""
    return {
        "mode": options.attention,
        "sliding_layers": "block-local, exact (W x 3W band)" if options.attention == "linear" else "dense masked",
        "global_layers": ATTENTION_FORMS[(options.attention, options.global_kernel)],
        "pooling": pooling,
    }


def _trace(model, onnx_path: Path, opset: int, external_data: bool, contrib: bool) -> None:
    import torch

    from .contrib_ops import translation_table

    assert not model.training, "export needs an eval-mode model"
    window = int(getattr(model.config, "local_attention", 128))
    # Example sizes above 1 so torch.export keeps every axis dynamic; longer than one window.
    batch, seq = 2, window + 37
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, seq // 2 :] = 0
    span_bounds = torch.tensor([[[1, seq - 1], [1, 9], [0, 0]], [[1, seq // 2 - 1], [3, 20], [0, 0]]])
    dims = {name: torch.export.Dim(name) for name in ("batch", "sequence", "chunks")}
    dynamic_shapes = {
        name: {axis: dims[label] for axis, label in enumerate(axes) if isinstance(label, str)}
        for name, (_, axes) in INPUTS.items()
    }
    torch.onnx.export(
        model,
        (input_ids, attention_mask, span_bounds),
        str(onnx_path),
        input_names=list(INPUTS),
        output_names=list(OUTPUTS),
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        dynamo=True,
        external_data=external_data,
        custom_translation_table=translation_table() if contrib else None,
        verbose=False,
    )
    assert not model.training, "export switched the model to train mode"


def onnx_description(opset: int) -> dict:
    """The manifest's ``onnx``: the graph file, its opset and its I/O."""
    return {
        "file": ONNX_FILE,
        "opset": opset,
        "inputs": {name: {"type": t, "axes": axes} for name, (t, axes) in INPUTS.items()},
        "outputs": {name: {"type": t, "axes": axes} for name, (t, axes) in OUTPUTS.items()},
    }


def build_manifest(checkpoint, folder: Path, graph: dict, *, precision: str, target: str, attention: dict,
                   export_seconds: float, parity: dict, gate: dict) -> dict:
    """The manifest of the finished ``folder``; ``graph`` is the graph's description under its key
    (``{"onnx": ...}`` or ``{"openvino": ...}``, runtimes.export_format.graph_files). ``source.model``
    records the layout, the head tensors read and, for a Hub id, the resolved commit."""
    source = resolve_model(checkpoint)
    return {
        "format": MANIFEST_FORMAT,
        "source": {
            "path": str(source.folder.resolve()),
            "sha256": source_hashes(source),
            "model": source.describe(),
        },
        **graph,
        "files": file_table(folder),
        "precision": precision,
        "target": target,
        "attention": attention,
        "export_seconds": round(export_seconds, 2),
        "tools": tool_versions(),
        "parity": parity,
        "gate": gate,
    }
