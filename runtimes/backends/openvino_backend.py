"""OpenVINO backend: imports numpy and openvino only (plus the standard library).

Runs the IR of a ``dewey-export openvino`` folder on OpenVINO's CPU plugin. The IR holds fp32
weights (int8 ones after an int8 export); the precision of the arithmetic is chosen when the model is
compiled (the CPU plugin's INFERENCE_PRECISION_HINT): bf16 where the CPU has native bfloat16 (AMX or
AVX512-BF16), else fp32. Under bf16, the nodes the exporter marked (LayerNorm, softmax, the rotary
tables, span pooling and the head) keep fp32 (dewey_export.openvino_export). One inference request per
thread: a request is not safe to share, and the compiled model schedules concurrent requests itself.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..config import ModelFileError
from ..export_format import INT8, OPENVINO_XML_FILE, check_graph_io, read_manifest
from ..precision import precision_name
from . import contract_inputs
from .onnx_backend import available_cpus

# Weight-only int8, as dewey-export openvino --precision int8 writes it.
INT8_WEIGHTS = INT8
# The CPU plugin's OPTIMIZATION_CAPABILITIES entry for native bfloat16 arithmetic.
BF16_CAPABILITY = "BF16"
# The CPU plugin's INFERENCE_PRECISION_HINT for each precision this backend runs.
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# How OpenVINO names the element types of runtimes.export_format.
_OV_TYPES = {"int64": "i64", "float32": "f32"}


def cpu_has_bf16(core) -> bool:
    """Whether the CPU computes in bfloat16 natively (OpenVINO's own answer, AMX or AVX512-BF16)."""
    return BF16_CAPABILITY in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def inference_precision(requested, has_bf16: bool, exported: str = "fp32") -> str:
    """The precision to compile with: ``requested`` (a dtype in any spelling of runtimes.precision), or,
    when None, the export's own. A bf16 export runs fp32 on a CPU without native bfloat16 (the more exact
    of the two, and the CPU has no fast bfloat16 path to offer), while asking for bf16 there is an error."""
    if requested is None:
        return exported if exported == "fp32" or has_bf16 else "fp32"
    precision = precision_name(requested)
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"the openvino backend runs {' or '.join(INFERENCE_PRECISIONS)}, got {requested!r}")
    if precision == "bf16" and not has_bf16:
        raise ValueError("dtype bf16 was asked for, but this CPU has no native bfloat16 (AMX or AVX512-BF16); "
                         "use fp32")
    return precision


def ir_weights(model) -> str:
    """``int8`` when the IR's weights are int8 (nncf's compressed constants, int8 or uint8), else ``fp32``."""
    import openvino as ov

    compressed = (ov.Type.i8, ov.Type.u8)
    return INT8_WEIGHTS if any(op.get_type_name() == "Constant" and op.get_element_type() in compressed
                               for op in model.get_ops()) else "fp32"


class OpenVINOBackend:
    name = "openvino"

    def __init__(self, model_path: str | Path, precision: str = "fp32", threads: int | None = None,
                 properties: dict | None = None):
        import openvino as ov

        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelFileError(f"{model_path} does not exist")
        core = ov.Core()
        precision = inference_precision(precision, cpu_has_bf16(core))
        self.threads = threads or available_cpus()
        try:
            model = core.read_model(str(model_path))
            self.compiled = core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
                "INFERENCE_NUM_THREADS": self.threads,
                # One stream running each request on all threads: one call's latency, as the other backends.
                "PERFORMANCE_HINT": "LATENCY",
                **(properties or {}),
            })
        except RuntimeError as exc:  # OpenVINO raises RuntimeError for unreadable or invalid IR
            raise ModelFileError(f"OpenVINO cannot load {model_path}: {exc}") from exc
        # What the plugin really compiled with, which is what the repr reports.
        compiled_hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = {hint: name for name, hint in INFERENCE_PRECISIONS.items()}[compiled_hint]
        # Read from the graph, never from a label: what the checks' limits and the repr say it runs.
        self.weights = ir_weights(model)
        self._check_io(model_path)
        self.vector_size = self.compiled.output("cls").get_partial_shape()[-1].get_length()
        self._local = threading.local()

    def _check_io(self, model_path: Path) -> None:
        def described(ports) -> dict:
            return {port.get_any_name(): port.get_element_type().get_type_name() for port in ports}

        check_graph_io(model_path, described(self.compiled.inputs), described(self.compiled.outputs), _OV_TYPES)

    @classmethod
    def from_folder(cls, folder: str | Path, device=None, dtype=None, threads: int | None = None,
                    **options) -> "OpenVINOBackend":
        """The IR of an export folder; ``runtimes.load`` has compared the folder's files with the manifest
        before this reads anything. ``dtype`` None runs the export's precision (fp32 where the CPU has no
        bfloat16); fp32 or bf16 choose. ``options``: ``threads`` (default: the CPUs this process may use),
        ``properties`` (more CPU plugin properties for ``compile_model``, e.g. ``{"PERF_COUNT": True}``)."""
        folder = Path(folder)
        if device is not None and str(device) != "cpu":
            raise ValueError(f"the openvino backend runs on the CPU (device 'cpu'), got {device!r}")
        manifest = read_manifest(folder)
        if manifest.kind != "openvino" or not (folder / OPENVINO_XML_FILE).is_file():
            raise ModelFileError(
                f"{folder} holds no OpenVINO export; make one with: "
                f"dewey-export openvino --model CHECKPOINT --out {folder}"
            )
        import openvino as ov

        if manifest.graph.get("activations") == INT8:
            from ..cpu_features import warn_int8_once

            warn_int8_once("int8 OpenVINO export (int8 activations)")
        precision = inference_precision(dtype, cpu_has_bf16(ov.Core()), exported=manifest.precision)
        backend = cls(folder / OPENVINO_XML_FILE, precision=precision, threads=threads, **options)
        if backend.weights != manifest.graph.get("weights"):
            raise ModelFileError(f"{folder}: the manifest says {manifest.graph.get('weights')!r} weights but the IR "
                                 f"holds {backend.weights} weights; export again")
        return backend

    def __repr__(self) -> str:
        return f"OpenVINOBackend(precision={self.precision!r}, weights={self.weights!r}, threads={self.threads})"

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, span_bounds: np.ndarray):
        # infer copies the outputs out of the request (share_outputs=False), so they outlive the next call.
        outputs = self._request().infer(contract_inputs(input_ids, attention_mask, span_bounds))
        return outputs["cls"], outputs["spans"]
