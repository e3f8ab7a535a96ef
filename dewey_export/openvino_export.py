"""Checkpoint folder -> OpenVINO export folder (IR), verified against PyTorch before it is published.

Source graph. The checkpoint is traced to ONNX by the ONNX target's own flow for the ``openvino`` graph
form (onnx_export.GRAPH_FORMS: the gpu form's graph, opset 23 with the standard Attention op, span
pooling in centered float32), and that file is converted with ``openvino.convert_model``. Every
candidate source converts, matches PyTorch fp32 to 5e-6 and runs alike (docs/benchmarks.md has the
timings). So the choice rests on the graph: opset 23 holds standard ops only (OpenVINO reads ONNX Runtime's
contrib MultiHeadAttention too, but need not); its centered float32 pooling stays exact where the CPU
plugin computes float64 nodes in float32 (the cpu target's float64 prefix sums would silently become
plain float32 ones; unmarked bf16 parity 0.9979 with them, 0.9992 with centered float32); and it comes
from the same trace as the ONNX and TensorRT exports, where ``convert_model`` on the module takes a
TorchScript trace that freezes Python-level shape logic at the example's values (TracerWarnings,
harmless here only because the exporter turns the length policy off).

Precision. The IR keeps fp32 weights (int8 after ``--precision int8``); the arithmetic's precision is
chosen when the backend compiles it (runtimes.backends.openvino_backend), and the manifest records the
precision verified here: bf16 by default where the CPU has native bfloat16 (OpenVINO's
OPTIMIZATION_CAPABILITIES lists BF16: AMX or AVX512-BF16), fp32 elsewhere. Under bf16 these nodes keep
fp32, marked in the IR with OpenVINO's DisableFP16Compression runtime attribute (which the CPU
plugin's bf16 pass honours, as its fp16 compression does):

- LayerNorm: every MVN node and its scale (and bias);
- softmax of the sliding-window layers, with the addition of the window bias before it;
- the rotary tables: sine, cosine and the angles they are taken of (the plugin keeps these fp32 on
  its own; the marks make it explicit). The rotation itself runs in the plugin's fused RoPE kernel,
  on bf16 queries and keys as in PyTorch's bf16 path: the fusion drops marks;
- the output stage: everything after the final LayerNorm (span pooling and the head).

Without the marks bf16 fails the quality gate on dewey-mini; with them it passes, for a few per cent
of bf16's speed (docs/benchmarks.md).

Global attention runs in the plugin's fused attention kernel, on bf16 inputs, as PyTorch's bf16 SDPA
does. ``int8`` (``--quantization weights``, the default): weight-only int8 (``nncf.compress_weights``,
asymmetric, per output channel) with the rest bf16 (fp32 without bfloat16). ``--quantization full``:
int8 activations too (``nncf.quantize``, dewey_export.quantize.quantize_openvino_full), calibrated on
real text of several lengths. Every int8 export is checked to run what it claims on this machine, and
to be faster than the fp32 IR at the same arithmetic (dewey_export.quantize, the ``int8`` report); full
int8 is refused before anything is built where OpenVINO reports no int8 capability for the CPU. Every
reduced-precision export must pass the quality gate (dewey_export.gate) besides parity.
"""

from __future__ import annotations

import logging
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from runtimes.errors import ExportError, MissingDependencyError
from runtimes.export_format import (
    ONNX_FILE,
    OPENVINO_BIN_FILE,
    OPENVINO_KEY,
    OPENVINO_XML_FILE,
    ExportManifest,
    graph_description,
)

from .onnx_export import OnnxTarget, attention_description, trace_graph
from .pipeline import Built
from .quantize import INT8_CAPABILITY, MIN_INT8_SPEEDUP
from .verify import INT8_WEIGHTS

# What --precision takes for OpenVINO: the arithmetic (fp32, bf16), or int8 weights with bf16 arithmetic.
OPENVINO_PRECISIONS = ("fp32", "bf16", INT8_WEIGHTS)
# --quantization, for int8: weight-only, or int8 activations too.
QUANTIZATIONS = ("weights", "full")
# What to install for each package an export needs: the runtime's extra, and nncf (int8 only) apart,
# so that serving installs neither nncf nor its scikit-learn and scipy.
INSTALL = {"openvino": "pip install 'dewey[openvino]'", "nncf": "pip install 'dewey[openvino-int8]'"}
# OpenVINO's DisableFP16Compression runtime attribute as the IR spells it (rt_info name and version).
KEEP_PRECISION_ATTRIBUTE = {"name": "precise", "version": "0"}
# Elementwise ops that apply a LayerNorm's scale and bias to the MVN node's output.
_AFFINE_OPS = ("Multiply", "Add")
# The graph the IR is converted from.
SOURCE_GRAPH = OnnxTarget(form="openvino").check()


def require_openvino(precision: str | None = None) -> None:
    """Raise MissingDependencyError, with the install command, when what an export of ``precision``
    needs is missing (nncf only for int8)."""
    needed = ["openvino"] + (["nncf"] if precision == INT8_WEIGHTS else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingDependencyError(
                f"an OpenVINO export needs the package {module!r}, which is not installed: {INSTALL[module]}"
            ) from exc


def plan_precision(precision: str | None, has_bf16: bool) -> tuple[str, str]:
    """(arithmetic precision, weights) for ``--precision``; None: bf16 where the CPU has it, else fp32."""
    if precision is not None and precision not in OPENVINO_PRECISIONS:
        raise ExportError(f"--precision for OpenVINO must be one of {', '.join(OPENVINO_PRECISIONS)}, "
                          f"got {precision!r}")
    if precision == "bf16" and not has_bf16:
        raise ExportError("--precision bf16 needs a CPU with native bfloat16 (AMX or AVX512-BF16), which OpenVINO "
                          "does not report here; export fp32 (or int8 weights with fp32 arithmetic)")
    arithmetic = "bf16" if has_bf16 else "fp32"
    if precision == INT8_WEIGHTS:
        return arithmetic, INT8_WEIGHTS
    return precision or arithmetic, "fp32"


@dataclass(frozen=True)
class OpenVINOTarget:
    """precision: ``fp32``, ``bf16`` or ``int8`` (see the module's notes); None picks bf16 where the CPU
    has it. quantization (int8 only): ``weights`` (the default) or ``full``. min_int8_speedup: the speed
    an int8 IR must reach against the fp32 IR here (0: not measured). ``check`` fills in ``arithmetic``
    and ``weights``."""

    precision: str | None = None
    quantization: str | None = None
    min_int8_speedup: float = MIN_INT8_SPEEDUP
    arithmetic: str | None = None
    weights: str | None = None

    name = "openvino"
    reports = ("parity", "gate")

    def check(self, config=None, log=None) -> "OpenVINOTarget":
        if self.quantization is not None and self.precision != INT8_WEIGHTS:
            raise ExportError("--quantization applies to --precision int8 only")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ExportError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if not self.min_int8_speedup >= 0:
            raise ExportError(f"--min-int8-speedup must be 0 or more, got {self.min_int8_speedup}")
        require_openvino(self.precision)
        import openvino as ov

        from runtimes.backends.openvino_backend import cpu_has_bf16

        core = ov.Core()
        arithmetic, weights = plan_precision(self.precision, cpu_has_bf16(core))
        quantization = (self.quantization or "weights") if weights == INT8_WEIGHTS else None
        if quantization == "full":
            capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if INT8_CAPABILITY not in capabilities:
                raise ExportError(
                    f"--quantization full needs int8 kernels, and OpenVINO reports none for this CPU (its "
                    f"capabilities: {', '.join(capabilities)}): it would run the int8 IR in float; export "
                    "--quantization weights, fp32 or bf16 instead")
        return replace(self, arithmetic=arithmetic, weights=weights, quantization=quantization)

    def build(self, reference, checkpoint: Path, folder: Path, log) -> Built:
        calibration = None
        if self.quantization == "full":
            from runtimes.model_source import resolve_model

            from .quantize import calibration_inputs

            calibration = calibration_inputs(resolve_model(checkpoint))
        reports = {}
        with tempfile.TemporaryDirectory(dir=folder) as onnx_folder:  # the IR replaces the ONNX graph
            onnx_path = Path(onnx_folder) / ONNX_FILE
            traced, seconds = trace_graph(reference, SOURCE_GRAPH, onnx_path, log)
            description = convert(onnx_path, folder, self.weights, SOURCE_GRAPH.opset, log, self.quantization,
                                  calibration)
            if self.weights == INT8_WEIGHTS:
                fp32_folder = Path(onnx_folder) / "fp32"
                fp32_folder.mkdir()
                convert(onnx_path, fp32_folder, "fp32", SOURCE_GRAPH.opset, lambda message: None)
                reports["int8"] = self._execution_check(fp32_folder, folder, reference.config, log)
        log(f"  {self.arithmetic} arithmetic, {self.weights} weights"
            + (", int8 activations" if self.quantization == "full" else ""))
        return Built(OPENVINO_KEY, description, self.arithmetic, SOURCE_GRAPH.form,
                     attention_description(SOURCE_GRAPH, traced.pooling), seconds, reports=reports)

    def _execution_check(self, fp32_folder: Path, folder: Path, config, log) -> dict:
        """The int8 report (dewey_export.quantize): what the CPU plugin runs of the int8 IR, and its speed
        against the fp32 IR compiled at the same arithmetic."""
        import openvino as ov

        from runtimes.backends.openvino_backend import OpenVINOBackend

        from .quantize import execution_report, measure_speedup, openvino_executed, speed_batch

        log("Checking that the int8 IR runs in int8, and faster than the fp32 IR on this machine")
        int8 = OpenVINOBackend(folder / OPENVINO_XML_FILE, precision=self.arithmetic)
        tail = set(float_tail_scope(ov.Core().read_model(str(fp32_folder / OPENVINO_XML_FILE))))
        executed = openvino_executed(int8.compiled, tail, self.quantization)
        speed = None
        if self.min_int8_speedup > 0:
            fp32 = OpenVINOBackend(fp32_folder / OPENVINO_XML_FILE, precision=self.arithmetic)
            speed = measure_speedup(fp32, int8, speed_batch(config))
            speed["arithmetic"] = self.arithmetic
        report = execution_report(executed, speed, self.min_int8_speedup)
        speed_note = f", {speed['speedup']:.2f}x the fp32 IR ({self.arithmetic} arithmetic)" if speed else ""
        log(f"  {executed['quantized_nodes']} of {executed['expected_quantized_nodes']} weight layers run "
            f"{'int8 kernels' if self.quantization == 'full' else 'int8 weights'}{speed_note}: "
            f"{'passed' if report['passed'] else 'FAILED'}")
        return report

    def candidate(self, folder: Path, manifest: ExportManifest, device=None):
        """OpenVINO's CPU plugin running the IR at the export's precision (fp32 on a CPU without
        bfloat16), checked at that precision, or int8's limits for int8 weights."""
        from runtimes.backends.openvino_backend import OpenVINOBackend

        backend = OpenVINOBackend.from_folder(folder, device=device)
        return backend, INT8_WEIGHTS if backend.weights == INT8_WEIGHTS else backend.precision


def convert(onnx_path: Path, folder: Path, weights: str, opset: int, log, quantization: str | None = None,
            calibration: list | None = None) -> dict:
    """``onnx_path`` (of ``opset``) -> ``model.xml`` and ``model.bin`` in ``folder``, int8 weights if
    asked (``quantization`` full: int8 activations too, calibrated on ``calibration``), the fp32 nodes
    marked; returns the manifest's description of the IR."""
    import openvino as ov

    log(f"Converting to OpenVINO IR ({weights} weights{', int8 activations' if quantization == 'full' else ''})")
    model = ov.convert_model(str(onnx_path))
    details = {}
    if quantization == "full":
        from .quantize import quantize_openvino_full

        log(f"  calibrating int8 activations on {len(calibration)} rows of real text")
        model, details = quantize_openvino_full(model, calibration)
        details = {"activations": INT8_WEIGHTS, "quantization": details}
    elif weights == INT8_WEIGHTS:
        import nncf

        logging.getLogger("nncf").setLevel(logging.WARNING)  # not its table of layers per bit width
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        details = {"activations": "float"}
    kept = keep_fp32(model)
    xml_path = folder / OPENVINO_XML_FILE
    # compress_to_fp16=False: the IR keeps the fp32 weights exactly (fp16 storage would round them).
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    mark_nodes(xml_path, {name for names in kept.values() for name in names})
    log("  fp32 under bf16: " + ", ".join(f"{len(names)} {kind} nodes" for kind, names in kept.items()))
    return graph_description([OPENVINO_XML_FILE, OPENVINO_BIN_FILE],
                             converted_from=f"ONNX opset {opset} (standard ops), openvino.convert_model",
                             weights=weights, **details, fp32_nodes={kind: len(names) for kind, names in kept.items()})


def _consumers(node) -> list:
    return [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]


def _is_constant(output) -> bool:
    return output.get_node().get_type_name() == "Constant"


def keep_fp32(model) -> dict[str, set[str]]:
    """The names of the nodes that must stay fp32 under bf16, by kind (see the module's notes).

    Softmax nodes of opset 8 are replaced by opset 1's: the CPU plugin converts opset 8 to opset 1 itself
    and the replacement loses the mark (measured: marked opset-8 softmax ran bf16, opset-1 fp32).
    """
    from openvino import opset1

    for node in model.get_ordered_ops():
        if node.get_type_name() == "Softmax" and node.get_type_info().version_id != "opset1":
            rank = node.get_output_partial_shape(0).rank.get_length()
            replacement = opset1.softmax(node.input_value(0), node.get_attributes()["axis"] % rank)
            replacement.set_friendly_name(node.get_friendly_name())
            node.output(0).replace(replacement.output(0))
    model.validate_nodes_and_infer_types()

    layer_norms, softmax, rotary = set(), set(), set()
    last_norm = None  # the final LayerNorm: every other one comes before it in topological order
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind == "MVN":
            norm = _layer_norm(node)
            layer_norms |= {n.get_friendly_name() for n in norm}
            last_norm = norm[-1]
        elif kind == "Softmax":
            softmax.add(node.get_friendly_name())
            source = node.input_value(0).get_node()
            if source.get_type_name() == "Add":
                softmax.add(source.get_friendly_name())
        elif kind in ("Sin", "Cos"):
            rotary |= {n.get_friendly_name() for n in _float_ancestors(node)}
    if last_norm is None:
        raise ExportError("the OpenVINO graph has no LayerNorm (MVN) node: not a ModernBERT graph")
    return {"LayerNorm": layer_norms, "softmax": softmax, "rotary table": rotary,
            "output stage": {n.get_friendly_name() for n in _descendants(last_norm)}}


def _layer_norm(mvn) -> list:
    """A LayerNorm's nodes: its MVN, then the scale and bias applied to it (constant operands)."""
    nodes = [mvn]
    while len(consumers := _consumers(nodes[-1])) == 1 and consumers[0].get_type_name() in _AFFINE_OPS \
            and any(_is_constant(v) for v in consumers[0].input_values()):
        nodes.append(consumers[0])
    return nodes


def _float_ancestors(node) -> list:
    """``node`` and the non-constant nodes with float outputs it is computed from (a rotary table's angles
    from the integer positions)."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current.get_friendly_name() in seen:
            continue
        seen.add(current.get_friendly_name())
        found.append(current)
        stack += [v.get_node() for v in current.input_values()
                  if not _is_constant(v) and v.get_element_type().is_real()]
    return found


def _descendants(node) -> list:
    """Every node computed from ``node``'s output, results excluded."""
    found, stack, seen = [], [node], set()
    while stack:
        for consumer in _consumers(stack.pop()):
            name = consumer.get_friendly_name()
            if name not in seen and consumer.get_type_name() != "Result":
                seen.add(name)
                found.append(consumer)
                stack.append(consumer)
    return found


def float_tail_scope(model) -> list[str]:
    """Friendly names of the nodes full int8 keeps in float: the token-embedding Gather (data from a 2-d
    float constant, the vocabulary table), the final LayerNorm (the last MVN in topological order) and
    every node computed from it (its scale, span pooling, the head)."""
    names, last_mvn = [], None
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind == "Gather":
            data = node.input_value(0)
            if _is_constant(data) and data.get_element_type().is_real() \
                    and data.get_partial_shape().rank.get_length() == 2:
                names.append(node.get_friendly_name())
        elif kind == "MVN":
            last_mvn = node
    if last_mvn is None:
        raise ExportError("the OpenVINO graph has no LayerNorm (MVN) node: not a ModernBERT graph")
    return names + [last_mvn.get_friendly_name()] + [n.get_friendly_name() for n in _descendants(last_mvn)]


def mark_nodes(xml_path: Path, names: set[str]) -> None:
    """Give the IR layers named ``names`` the keep-precision attribute (rt_info, next to the layer's
    data). The Python API cannot create that attribute, but the IR reader makes it from this XML."""
    tree = ET.parse(xml_path)
    layers = [layer for layer in tree.getroot().iter("layer") if layer.get("name") in names]
    counts = Counter(layer.get("name") for layer in layers)
    if set(counts) != names or max(counts.values()) > 1:
        wrong = sorted(name for name in names if counts[name] != 1)
        raise ExportError(f"{len(wrong)} node(s) to keep in fp32 are not exactly one IR layer each: {wrong[:5]}")
    for layer in layers:
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.Element("rt_info")
            layer.insert(1 if layer.find("data") is not None else 0, rt_info)
        ET.SubElement(rt_info, "attribute", KEEP_PRECISION_ATTRIBUTE)
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
