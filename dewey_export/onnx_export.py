"""The ``onnx`` target: a checkpoint traced to an ONNX graph for ONNX Runtime (cpu) or TensorRT / ORT CUDA
(gpu), run by ONNX Runtime for its checks.

The graph is ``DeweyModel.forward`` traced by ``torch.onnx.export(dynamo=True)``: the backend contract
as graph I/O, dynamic ``batch``, ``sequence`` and ``chunks`` axes, span pooling before the head. The
pipeline (dewey_export.pipeline) stages, verifies and publishes the folder; the OpenVINO and TensorRT
targets reuse ``trace_graph`` for their own graph forms.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from runtimes.errors import ExportError
from runtimes.export_format import INPUTS, INT8, ONNX_FILE, OUTPUTS, ExportManifest, graph_description
from runtimes.precision import precision_name

from .pipeline import Built, CannotVerifyHere
from .quantize import MIN_INT8_SPEEDUP

SUPPORTED_OPSETS = (18, 23)
# The graph forms, by where the graph will run. The form decides global attention (runtimes.attention):
# cpu: ONNX Runtime's contrib MultiHeadAttention (its CPU flash kernel is linear in memory);
# gpu: the standard ONNX Attention op of opset 23, which TensorRT 10.15.1+ imports (with
# RotaryEmbedding); no contrib ops.
# openvino: the gpu form with a key-padding bias, the source of dewey_export.openvino_export (which
# explains the choice).
# And how span pooling accumulates (runtimes.modeling.POOLING_ACCUMULATIONS): float64 where the runtime
# has it; centered float32 for TensorRT, which has no float64, and OpenVINO's CPU plugin, which runs
# float64 nodes in float32.
GRAPH_FORMS = {
    "cpu": {"opset": 18, "global_kernel": "ort_contrib", "pooling": "float64"},
    "gpu": {"opset": 23, "global_kernel": "sdpa", "pooling": "centered_float32"},
    "openvino": {"opset": 23, "global_kernel": "sdpa_key_bias", "pooling": "centered_float32"},
}
ATTENTION_MODES = ("linear", "dense")
ATTENTION_FORMS = {
    ("linear", "ort_contrib"): "com.microsoft.MultiHeadAttention, no mask (key padding folded into the keys)",
    ("linear", "sdpa"): "ONNX Attention (opset 23) or MatMul/Softmax (opset 18), no mask",
    ("linear", "sdpa_key_bias"): "ONNX Attention (opset 23) with a [B, 1, 1, S] key-padding bias, no S x S mask",
    ("dense", "sdpa"): "transformers' masked attention with dense S x S masks (quadratic memory)",
}
# Protobuf cannot hold a file over 2 GiB; above this many weight bytes the weights go to model.onnx.data.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
# Why a bf16 graph is not checked on a CPU.
NO_CPU_BF16 = ("ONNX Runtime's CPU provider has no bfloat16 kernels; check this graph on a GPU with "
               "dewey-export verify DIR --device cuda")


@dataclass(frozen=True)
class OnnxTarget:
    """form: where the graph will run, ``cpu`` (ONNX Runtime) or ``gpu`` (TensorRT, ORT CUDA; needs opset
    23); opset: 18 or 23 (None: the form's); attention: ``linear`` (memory linear in length) or ``dense``
    (transformers' graph with S x S masks, for comparison only); precision: fp32, or fp16/bf16 with
    LayerNorm, softmax, rotary tables and pooling kept float32 inside the graph (what strongly typed
    TensorRT builds from), or int8 (cpu form: ONNX Runtime dynamic int8, dewey_export.quantize, refused
    unless its quantized operators run and it is ``min_int8_speedup`` times as fast as fp32 here)."""

    form: str = "cpu"
    opset: int | None = None
    attention: str = "linear"
    precision: str = "fp32"
    min_int8_speedup: float = MIN_INT8_SPEEDUP

    name = "onnx"
    reports = ("parity", "gate")

    @property
    def global_kernel(self) -> str:
        return GRAPH_FORMS[self.form]["global_kernel"] if self.attention == "linear" else "sdpa"

    def check(self, config=None, log=None) -> "OnnxTarget":
        """The options checked (ExportError names the bad one), the form's opset filled in."""
        if self.form not in GRAPH_FORMS:
            raise ExportError(f"the graph form {self.form!r} is not one of {sorted(GRAPH_FORMS)}")
        opset = GRAPH_FORMS[self.form]["opset"] if self.opset is None else self.opset
        if opset not in SUPPORTED_OPSETS:
            raise ExportError(f"opset {opset} is not supported; choose one of {SUPPORTED_OPSETS}")
        if self.form == "gpu" and opset < 23:
            raise ExportError("a gpu graph needs opset 23: its global layers use the ONNX Attention op")
        if self.attention not in ATTENTION_MODES:
            raise ExportError(f"attention must be 'linear' or 'dense', got {self.attention!r}")
        if self.precision == INT8:
            if self.form != "cpu":
                raise ExportError("--precision int8 is for ONNX Runtime on CPUs (--device cpu); a GPU graph "
                                  "runs fp16 or bf16")
            if not self.min_int8_speedup >= 0:
                raise ExportError(f"--min-int8-speedup must be 0 or more, got {self.min_int8_speedup}")
            return replace(self, opset=opset)
        try:
            precision = precision_name(self.precision)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        return replace(self, opset=opset, precision=precision)

    def build(self, reference, checkpoint: Path, folder: Path, log) -> Built:
        if self.precision == INT8:
            return self._build_int8(reference, folder, log)
        traced, seconds = trace_graph(reference, self, folder / ONNX_FILE, log)
        return Built("onnx", graph_description(opset=self.opset, file=ONNX_FILE), self.precision, self.form,
                     attention_description(self, traced.pooling), seconds)

    def _build_int8(self, reference, folder: Path, log) -> Built:
        """The fp32 graph traced beside the folder, quantized into it, and the execution check of the
        two (dewey_export.quantize): the graph's arithmetic stays fp32 outside the int8 MatMuls."""
        from .quantize import execution_report, measure_speedup, ort_executed, quantize_onnx_dynamic, speed_batch

        float_graph = replace(self, precision="fp32")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            fp32_path = Path(tmp) / ONNX_FILE
            traced, seconds = trace_graph(reference, float_graph, fp32_path, log)
            quantization = quantize_onnx_dynamic(fp32_path, folder / ONNX_FILE, log)
            log("Checking that the int8 graph runs in int8, and faster than fp32 on this machine")
            executed = ort_executed(folder / ONNX_FILE, quantization["quantized_matmuls"],
                                    len(quantization["float_weight_matmuls"]))
            speed = None
            if self.min_int8_speedup > 0:
                from runtimes.backends.onnx_backend import OnnxBackend

                speed = measure_speedup(OnnxBackend(fp32_path), OnnxBackend(folder / ONNX_FILE),
                                        speed_batch(reference.config))
            report = execution_report(executed, speed, self.min_int8_speedup)
        speed_note = f", {speed['speedup']:.2f}x fp32" if speed else ""
        log(f"  {executed['quantized_nodes']} quantized MatMul nodes run{speed_note}: "
            f"{'passed' if report['passed'] else 'FAILED'}")
        description = graph_description(opset=self.opset, file=ONNX_FILE, weights=INT8, quantization=quantization)
        return Built("onnx", description, "fp32", self.form, attention_description(float_graph, traced.pooling),
                     seconds, reports={"int8": report})

    def candidate(self, folder: Path, manifest: ExportManifest, device=None):
        """ONNX Runtime on ``device`` (cpu, cuda[:N], tensorrt[:N]) running the folder's graph, checked at
        the manifest's ``checked_precision`` (int8's limits for an int8 graph)."""
        from runtimes.backends.onnx_backend import OnnxBackend, providers_for

        if manifest.precision == "bf16" and (device or "cpu") == "cpu":
            raise CannotVerifyHere(NO_CPU_BF16)
        return OnnxBackend(folder / ONNX_FILE, providers=providers_for(device)), manifest.checked_precision


def graph_model(model, options: OnnxTarget):
    """The form of the fp32 ``model`` that is traced for ``options``: a copy (``model`` stays the parity
    reference) with the form's global attention kernel, pooling and precision."""
    from runtimes.attention import set_global_kernel
    from runtimes.backends.torch_backend import torch_dtype
    from runtimes.modeling import reduce_precision

    traced = copy.deepcopy(model)
    if options.attention == "linear":
        set_global_kernel(traced.backbone, options.global_kernel)
    traced.pooling = GRAPH_FORMS[options.form]["pooling"]
    return reduce_precision(traced, torch_dtype(options.precision))


def trace_graph(model, options: OnnxTarget, onnx_path: Path, log):
    """Trace the graph of the fp32 ``model`` for ``options`` to ``onnx_path``; returns the traced model
    (``graph_model``) and the seconds the export took."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    traced = graph_model(model, options)
    log(f"Exporting to ONNX ({options.form} graph, opset {options.opset}, {options.attention} attention, "
        f"{options.precision}, {weight_bytes / 1e6:.1f} MB of fp32 weights)")
    started = time.perf_counter()
    _trace(traced, onnx_path, options.opset, external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES,
           contrib=options.global_kernel == "ort_contrib")
    export_seconds = time.perf_counter() - started
    log(f"  exported in {export_seconds:.1f} s")
    return traced, export_seconds


def attention_description(options: OnnxTarget, pooling: str) -> dict:
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
