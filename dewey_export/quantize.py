"""int8 graphs, and the check that they really run in int8 and faster than fp32 (fail closed).

ONNX Runtime (``dewey-export onnx --precision int8``): dynamic quantization of the weight MatMuls only:
int8 weights per output channel, activations quantized to uint8 per tensor at run time. The embedding
lookup, LayerNorms, softmax, rotary tables, the attention-score products (MatMuls of two activations),
residual adds, span pooling, the head (everything after the final LayerNorm) and normalisation stay in
float. ONNX Runtime's preprocessing runs first (its graph optimizer and ONNX shape inference; its
symbolic shape inference cannot read the contrib MultiHeadAttention node, and is not needed: every
weight MatMul has a constant second input).

The execution check (the manifest's ``int8`` report), made on the machine that builds the export:

- the quantized operators are in the graph the runtime really runs (ONNX Runtime's optimized graph:
  DynamicQuantizeMatMul / MatMulIntegerToFloat / MatMulInteger nodes, one per quantized MatMul, and no
  weight MatMul left in float beyond those kept on purpose; OpenVINO: the precision each compiled
  MatMul / FullyConnected node runs in);
- the int8 graph is at least ``MIN_INT8_SPEEDUP`` times as fast as the same engine running the fp32
  graph, on a short batch (8 texts of 288..512 tokens), fp32 and int8 runs interleaved, medians.

A failure is recorded (``passed: false``, ``failed`` naming each figure) and the export exits 1: an int8
graph that silently runs in float, or slower than fp32, is refused rather than shipped.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from runtimes.errors import ExportError, MissingDependencyError

# Speed an int8 graph must reach against fp32 on the machine that builds it (0 turns the rule off).
MIN_INT8_SPEEDUP = 1.2
# The short batch the speed is measured on: texts, shortest and longest row (tokens), and repeats.
SPEED_BATCH = (8, 288, 512)
SPEED_REPEATS = 5
# ONNX Runtime's operators that run a quantized MatMul (before and after its graph fusions).
ORT_QUANTIZED_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul")
# ONNX Runtime's operators that multiply by a weight in float.
ORT_FLOAT_MATMULS = ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits")
INSTALL_ORT = "pip install 'dewey[export]'"


def _require_quantization():
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise MissingDependencyError(
            f"an int8 ONNX export needs onnxruntime's quantization tools (onnxruntime and onnx): {INSTALL_ORT}"
        ) from exc
    return quantization


def _initializers(graph) -> set[str]:
    return {init.name for init in graph.initializer}


def final_norm_descendants(graph) -> set[str]:
    """Names of the nodes computed from the last LayerNormalization (topological order): the output
    stage (span pooling, the head), kept in float."""
    norms = [i for i, node in enumerate(graph.node) if node.op_type == "LayerNormalization"]
    if not norms:
        raise ExportError("the ONNX graph has no LayerNormalization node: not a ModernBERT graph")
    produced = set(graph.node[norms[-1]].output)
    after = set()
    for node in graph.node[norms[-1] + 1:]:
        if produced & set(node.input):
            after.add(node.name)
            produced |= set(node.output)
    return after


def weight_matmuls(graph) -> tuple[list[str], list[str]]:
    """(the MatMul nodes to quantize: a constant weight, before the final LayerNorm; the weight MatMuls
    and Gemms kept in float: the output stage's)."""
    constants = _initializers(graph) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    output_stage = final_norm_descendants(graph)
    weights = [node for node in graph.node if node.op_type in ("MatMul", "Gemm") and node.input[1] in constants]
    return ([n.name for n in weights if n.op_type == "MatMul" and n.name not in output_stage],
            [n.name for n in weights if n.name in output_stage])


def quantize_onnx_dynamic(fp32_path: Path, out_path: Path, log) -> dict:
    """The fp32 graph at ``fp32_path`` -> the dynamic int8 graph at ``out_path`` (see the module's
    notes); returns the manifest's description of the quantization."""
    import onnx

    quantization = _require_quantization()
    external = Path(f"{fp32_path}.data").exists()
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        log("Quantizing to int8 (ONNX Runtime: preprocessing, then dynamic int8 MatMul weights per channel)")
        quantization.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True,
                                       save_as_external_data=external)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        quantized, kept = weight_matmuls(graph)
        if not quantized:
            raise ExportError("the ONNX graph has no weight MatMul to quantize")
        quantization.quantize_dynamic(
            str(prepared), str(out_path), op_types_to_quantize=["MatMul"], nodes_to_quantize=quantized,
            per_channel=True, reduce_range=False, weight_type=quantization.QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    log(f"  {len(quantized)} weight MatMuls in int8; {len(kept)} kept in float (the output stage)")
    return {"weights": "int8", "activations": "uint8, quantized per tensor at run time",
            "method": "onnxruntime.quantization.quantize_dynamic (per channel, MatMul weights only)",
            "quantized_matmuls": len(quantized), "float_weight_matmuls": kept}


def ort_executed(model_path: Path, expected: int, kept_float: int, threads: int | None = None) -> dict:
    """What ONNX Runtime really runs of the int8 graph at ``model_path``: its optimized graph's quantized
    MatMul nodes against the ``expected`` count, and the weight MatMuls left in float against the
    ``kept_float`` kept on purpose."""
    import onnx
    import onnxruntime as ort

    from runtimes.backends.onnx_backend import default_session_options

    with tempfile.TemporaryDirectory() as tmp:
        options = default_session_options(threads)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # The optimized graph's weights go to a side file: only its nodes are read.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    constants = _initializers(graph)
    ops = Counter(node.op_type for node in graph.node)
    float_weights = [node.name for node in graph.node
                     if node.op_type in ORT_FLOAT_MATMULS and len(node.input) > 1 and node.input[1] in constants]
    return {"quantized_nodes": sum(ops[op] for op in ORT_QUANTIZED_OPS), "expected_quantized_nodes": expected,
            "quantized_ops": {op: ops[op] for op in ORT_QUANTIZED_OPS if ops[op]},
            "float_weight_matmuls": len(float_weights), "expected_float_weight_matmuls": kept_float,
            "float_weight_matmul_names": float_weights[:20]}


def speed_batch(config, seed: int = 0):
    """The speed check's inputs: ``SPEED_BATCH`` rows of random tokens, padded, one span each."""
    count, shortest, longest = SPEED_BATCH
    lengths = [min(int(n), config.max_position_embeddings) for n in np.linspace(shortest, longest, count)]
    rng = np.random.default_rng(seed)
    ids = np.full((count, max(lengths)), config.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    spans = np.zeros((count, 1, 2), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(0, config.vocab_size, n)
        ids[row, 0], ids[row, n - 1] = config.cls_token_id, config.sep_token_id
        mask[row, :n] = 1
        spans[row, 0] = (1, n - 1)
    return ids, mask, spans


def measure_speedup(fp32, int8, inputs, repeats: int = SPEED_REPEATS) -> dict:
    """Seconds of ``fp32.forward`` and ``int8.forward`` on ``inputs`` (one warm-up each, then
    ``repeats`` runs interleaved so that load on the machine hits both alike; medians) and their ratio."""
    times = {"fp32": [], "int8": []}
    for backend in (fp32, int8):
        backend.forward(*inputs)
    for _ in range(repeats):
        for name, backend in (("fp32", fp32), ("int8", int8)):
            start = time.perf_counter()
            backend.forward(*inputs)
            times[name].append(time.perf_counter() - start)
    fp32_s, int8_s = float(np.median(times["fp32"])), float(np.median(times["int8"]))
    return {"fp32_seconds": round(fp32_s, 4), "int8_seconds": round(int8_s, 4), "speedup": round(fp32_s / int8_s, 3),
            "batch": list(np.shape(inputs[0])), "repeats": repeats}


def execution_report(executed: dict, speed: dict | None, min_speedup: float) -> dict:
    """The manifest's ``int8`` report: ``executed`` (what the runtime runs), ``speed`` (None: not measured,
    ``min_speedup`` 0) and the verdict; ``failed`` names each rule broken."""
    from runtimes.cpu_features import describe_cpu

    failed = []
    if executed["quantized_nodes"] < executed["expected_quantized_nodes"]:
        failed.append("quantized_nodes")
    if executed["float_weight_matmuls"] > executed["expected_float_weight_matmuls"]:
        failed.append("float_weight_matmuls")
    if speed is not None and not speed["speedup"] >= min_speedup:
        failed.append("speedup")
    return {"executed": executed, "speed": speed if speed is not None else {"skipped": "min_speedup 0"},
            "min_speedup": min_speedup, "cpu": describe_cpu(), "failed": failed, "passed": not failed}


def describe_execution_failure(report: dict) -> str:
    """One line per broken rule: what fell back, or how slow it ran."""
    executed, lines = report["executed"], []
    for name in report["failed"]:
        if name == "quantized_nodes":
            lines.append(f"only {executed['quantized_nodes']} of {executed['expected_quantized_nodes']} quantized "
                         "MatMul nodes run in int8: the rest fell back to float")
        elif name == "float_weight_matmuls":
            names = ", ".join(executed.get("float_weight_matmul_names", [])[:5])
            lines.append(f"{executed['float_weight_matmuls']} weight MatMuls run in float where "
                         f"{executed['expected_float_weight_matmuls']} were kept on purpose ({names})")
        else:
            speed = report["speed"]
            arithmetic = f" ({speed['arithmetic']} arithmetic)" if "arithmetic" in speed else ""
            lines.append(f"int8 is {speed['speedup']:.2f}x the speed of fp32{arithmetic} on this machine "
                         f"({speed['int8_seconds']:.3f} s "
                         f"vs {speed['fp32_seconds']:.3f} s on a batch of {speed['batch'][0]} x {speed['batch'][1]} "
                         f"tokens); the floor is {report['min_speedup']}x (--min-int8-speedup)")
    return "int8 execution check failed:\n  " + "\n  ".join(lines)


# -- OpenVINO ----------------------------------------------------------------------------------------

# The calibration texts of OpenVINO's full int8: (tokens per row, rows), real text of the built-in
# corpus's training split at several lengths.
CALIBRATION_ROWS = ((32, 24), (512, 16), (2048, 8))
# SmoothQuant's alpha for the MatMuls, and nncf's preset (PERFORMANCE: symmetric int8 activations, no
# zero-point subtraction left unfused). Measured on dewey-mini (docs/openvino.md): alpha 0.5-0.65 keeps
# the queries' min cosine highest (0.999 at 0.65, 0.998 at nncf's transformer default 0.95, 0.997 off).
SMOOTH_QUANT_ALPHA = 0.65
QUANTIZATION_PRESET = "PERFORMANCE"
# The CPU plugin's compiled node types that multiply by a weight (FullyConnected) or by an activation.
OV_WEIGHT_LAYERS = ("FullyConnected",)
OV_INT8_TYPES = ("u8", "i8")
# OPTIMIZATION_CAPABILITIES' entry of a CPU plugin that runs int8 kernels.
INT8_CAPABILITY = "INT8"


def calibration_inputs(source, rows=CALIBRATION_ROWS, seed: int = 0) -> list[dict]:
    """Backend-contract inputs (batch 1) of real text for calibration: for each (tokens, count), ``count``
    documents of the built-in corpus's training split with at least 3/4 of ``tokens`` tokens, cut to
    ``tokens`` as the Encoder makes rows (prompts, [CLS] .. [SEP]), one span over the text."""
    import warnings

    from runtimes import Encoder
    from runtimes.corpus import DEFAULT_HELDOUT_FRACTION, STDLIB, split_documents
    from runtimes.tokenization import DeweyTokenizer

    encoder = Encoder(source.config, DeweyTokenizer.from_folder(source.tokenizer_folder, source.config), None)
    train, _ = split_documents([STDLIB], DEFAULT_HELDOUT_FRACTION)
    rng = np.random.default_rng(seed)
    inputs = []
    for tokens, count in rows:
        tokens = min(tokens, source.config.max_position_embeddings)
        found = 0
        for index in rng.permutation(len(train)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cutting is the point here
                plan = encoder.plan_encode([train[int(index)]], max_length=tokens)
            if plan.lengths[0] < 0.75 * tokens:
                continue
            row = plan.row(0)
            inputs.append({"input_ids": row[None].astype(np.int64), "attention_mask": np.ones((1, len(row)), np.int64),
                           "span_bounds": plan.spans[0][None].astype(np.int64)})
            found += 1
            if found == count:
                break
    return inputs


def quantize_openvino_full(model, calibration: list[dict], alpha: float | None = None):
    """int8 activations and weights for the encoder's linear layers and activation products (nncf's
    post-training quantization, transformer preset, SmoothQuant at ``alpha``: None, SMOOTH_QUANT_ALPHA;
    negative, off), the embeddings, the final LayerNorm and the output stage kept in float; returns the
    quantized model and its description."""
    import logging

    import nncf

    from .openvino_export import float_tail_scope

    alpha = SMOOTH_QUANT_ALPHA if alpha is None else alpha
    logging.getLogger("nncf").setLevel(logging.WARNING)
    kept = float_tail_scope(model)
    quantized = nncf.quantize(
        model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
        preset=getattr(nncf.QuantizationPreset, QUANTIZATION_PRESET), subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(names=kept, validate=False),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=alpha)),
    )
    return quantized, {"weights": "int8", "activations": "int8",
                       "method": f"nncf.quantize (transformer model type, {QUANTIZATION_PRESET} preset, "
                                 + (f"SmoothQuant alpha {alpha})" if alpha >= 0 else "no SmoothQuant)"),
                       "calibration": [list(r) for r in CALIBRATION_ROWS], "float_nodes": len(kept)}


def openvino_executed(compiled, float_tail: set[str], mode: str) -> dict:
    """What OpenVINO's CPU plugin really runs: each compiled weight layer (FullyConnected) by the element
    types of its inputs: int8 kernels (int8 activations, ``mode`` full), int8 weights in a float kernel
    (``mode`` weights), or float. Expected: every weight layer quantized but those of ``float_tail``
    (the friendly names kept in float on purpose)."""
    quantized = floating = expected_float = total = 0
    names = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer not in OV_WEIGHT_LAYERS:
            continue
        total += 1
        types = [op.input(i).get_element_type().get_type_name() for i in range(op.get_input_size())]
        int8 = types[0] in OV_INT8_TYPES if mode == "full" else len(types) > 1 and types[1] in OV_INT8_TYPES
        in_tail = any(part in float_tail for part in op.get_friendly_name().split(","))
        expected_float += in_tail
        if int8:
            quantized += 1
        else:
            floating += 1
            names.append(op.get_friendly_name())
    return {"quantized_nodes": quantized, "expected_quantized_nodes": total - expected_float,
            "float_weight_matmuls": floating, "expected_float_weight_matmuls": expected_float,
            "float_weight_matmul_names": names[:20], "int8_kernels": mode == "full"}
