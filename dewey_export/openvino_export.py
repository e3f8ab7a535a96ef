"""Checkpoint folder -> OpenVINO export folder (IR), verified against PyTorch before it is published.

Source graph. The checkpoint is traced to ONNX by the ONNX exporter's own flow for the ``openvino``
target (onnx_export.TARGETS: the gpu target's graph, opset 23 with the standard Attention op, span
pooling in centered float32), and that file is converted with ``openvino.convert_model``. Every
candidate converts and matches PyTorch fp32 to 5e-6, and they run alike: dewey-mini, OpenVINO 2026.4.1,
2 threads, 2-core Sapphire Rapids VM (load 1-2), interleaved runs, fastest of 2-5, f32 / bf16 seconds:

    source                                       32 x 128 tokens   8 x 512        1 x 16384
    ONNX opset 23, Attention op (used)           0.139 / 0.058     0.153 / 0.064  3.43 / 1.71
    ONNX opset 18, plain MatMul/Softmax          0.144 / 0.057     0.156 / 0.062  3.31 / 1.71
    ONNX opset 18, com.microsoft MHA (cpu)       0.141 / 0.057     0.151 / 0.062  3.33 / 1.72
    openvino.convert_model(DeweyModel)           0.142 / 0.057     0.153 / 0.063  3.32 / 1.73

So the choice rests on the graph: opset 23 holds standard ops only (OpenVINO reads ONNX Runtime's
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

Measured on dewey-mini: without the marks bf16 fails the quality gate (chunk cosine 0.99805; 0.99825
with LayerNorm alone), with them it passes (0.99977), for about 9 % of bf16's speed on short batches.

Global attention runs in the plugin's fused attention kernel, on bf16 inputs, as PyTorch's bf16 SDPA
does. ``int8``: weight-only int8 (``nncf.compress_weights``, asymmetric, per output channel) with the
rest bf16 (fp32 without bfloat16). Every reduced-precision export must pass the quality gate
(dewey_export.gate) besides parity.
"""

from __future__ import annotations

import logging
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from runtimes.export_format import (
    INPUTS,
    ONNX_FILE,
    OPENVINO_BIN_FILE,
    OPENVINO_KEY,
    OPENVINO_XML_FILE,
    OUTPUTS,
    write_manifest,
)
from runtimes.files import staged_folder

from .onnx_export import (
    ExportError,
    ExportResult,
    attention_description,
    build_manifest,
    copy_model_files,
    graph_options,
    load_reference,
    prepare_output,
    trace_graph,
)
from .verify import INT8_WEIGHTS, check_checkpoint, skipped_report

OPENVINO_TARGET = "openvino"
# What --precision takes for OpenVINO: the arithmetic (fp32, bf16), or int8 weights with bf16 arithmetic.
OPENVINO_PRECISIONS = ("fp32", "bf16", INT8_WEIGHTS)
# What to install for each package an export needs: the runtime's extra, and nncf (int8 only) apart,
# so that serving installs neither nncf nor its scikit-learn and scipy.
INSTALL = {"openvino": "pip install 'dewey[openvino]'", "nncf": "pip install 'dewey[openvino-int8]'"}
# OpenVINO's DisableFP16Compression runtime attribute as the IR spells it (rt_info name and version).
KEEP_PRECISION_ATTRIBUTE = {"name": "precise", "version": "0"}
# Elementwise ops that apply a LayerNorm's scale and bias to the MVN node's output.
_AFFINE_OPS = ("Multiply", "Add")


class OpenVINOUnavailable(RuntimeError):
    """OpenVINO (or nncf, for int8) is not installed; the message says how to install it."""


def require_openvino(precision: str | None = None) -> None:
    """Raise OpenVINOUnavailable, with the install command, when what an export of ``precision`` needs
    is missing (nncf only for int8)."""
    needed = ["openvino"] + (["nncf"] if precision == INT8_WEIGHTS else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError as exc:
            raise OpenVINOUnavailable(
                f"--to openvino needs the package {module!r}, which is not installed: {INSTALL[module]}"
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


def export_openvino(checkpoint, out, precision: str | None = None, verify: bool = True, overwrite: bool = False,
                    gate_data=None, log=print) -> ExportResult:
    """Export ``checkpoint`` to an OpenVINO folder ``out`` (IR, config, tokenizer, manifest).

    precision: ``fp32``, ``bf16`` or ``int8`` (see the module's notes); None picks bf16 where the CPU has
    it. With ``verify``, the IR runs against PyTorch fp32 before the folder is published: parity on the
    random inputs, and the quality gate on ``gate_data`` (None: the built-in texts) for bf16 and int8.
    A failed check still publishes the folder with its reports, as ``export_onnx`` does. OpenVINO is
    looked for before anything is written.
    """
    checkpoint, out = check_checkpoint(checkpoint), Path(out).resolve()
    config = checkpoint.config
    require_openvino(precision)
    import openvino as ov

    from runtimes.backends.openvino_backend import cpu_has_bf16

    arithmetic, weights = plan_precision(precision, cpu_has_bf16(ov.Core()))
    options = graph_options(OPENVINO_TARGET)
    prepare_output(checkpoint.folder.resolve(), out, overwrite, log)
    with staged_folder(out) as staging:  # made first: an --out that cannot be written fails before the load
        model = load_reference(checkpoint, options.attention, log)
        with tempfile.TemporaryDirectory(dir=staging) as onnx_folder:  # the IR replaces the ONNX graph
            onnx_path = Path(onnx_folder) / ONNX_FILE
            traced, export_seconds = trace_graph(model, options, onnx_path, log)
            description = convert(onnx_path, staging, weights, options.opset, log)
        copy_model_files(checkpoint, staging)
        label = INT8_WEIGHTS if weights == INT8_WEIGHTS else arithmetic
        parity, gate = _verify(model, staging, checkpoint, config, arithmetic, weights, label, verify, gate_data, log)
        manifest = build_manifest(checkpoint, staging, {OPENVINO_KEY: description}, precision=arithmetic,
                                  target=OPENVINO_TARGET, attention=attention_description(options, traced.pooling),
                                  export_seconds=export_seconds, parity=parity, gate=gate)
        write_manifest(staging, manifest)
    log(f"Wrote {out} ({arithmetic} arithmetic, {weights} weights)")
    return ExportResult(out, manifest)


def _verify(model, folder: Path, checkpoint, config, arithmetic: str, weights: str, label: str, verify: bool,
            gate_data, log) -> tuple[dict, dict]:
    from runtimes.backends.openvino_backend import OpenVINOBackend
    from runtimes.backends.torch_backend import TorchBackend

    from .gate import skipped_gate, verify_candidate

    if not verify:
        return skipped_report(label), skipped_gate()
    candidate = OpenVINOBackend(folder / OPENVINO_XML_FILE, precision=arithmetic, weights=weights)
    log(f"OpenVINO runs it as {candidate!r}")
    return verify_candidate(TorchBackend(model), candidate, checkpoint.tokenizer_folder, config, label, label != "fp32",
                            gate_data, log)


def convert(onnx_path: Path, folder: Path, weights: str, opset: int, log) -> dict:
    """``onnx_path`` (of ``opset``) -> ``model.xml`` and ``model.bin`` in ``folder``, int8 weights if
    asked, the fp32 nodes marked; returns the manifest's description of the IR."""
    import openvino as ov

    log(f"Converting to OpenVINO IR ({weights} weights)")
    model = ov.convert_model(str(onnx_path))
    if weights == INT8_WEIGHTS:
        import nncf

        logging.getLogger("nncf").setLevel(logging.WARNING)  # not its table of layers per bit width
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    kept = keep_fp32(model)
    xml_path = folder / OPENVINO_XML_FILE
    # compress_to_fp16=False: the IR keeps the fp32 weights exactly (fp16 storage would round them).
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    mark_nodes(xml_path, {name for names in kept.values() for name in names})
    log("  fp32 under bf16: " + ", ".join(f"{len(names)} {kind} nodes" for kind, names in kept.items()))
    return {
        "files": [OPENVINO_XML_FILE, OPENVINO_BIN_FILE],
        "converted_from": f"ONNX opset {opset} (standard ops), openvino.convert_model",
        "inputs": {name: {"type": t, "axes": axes} for name, (t, axes) in INPUTS.items()},
        "outputs": {name: {"type": t, "axes": axes} for name, (t, axes) in OUTPUTS.items()},
        "weights": weights,
        "fp32_nodes": {kind: len(names) for kind, names in kept.items()},
    }


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
