"""The precision plan of a TensorRT build, by TensorRT version: plain data, tested without TensorRT.

Builder flags, strong or weak typing, the precision of the ONNX graph given to the parser and the layer
kinds pinned to fp32 differ between TensorRT 10 (weak typing) and 11 (strong typing only). Only the
builder (``trt_build``) needs them: an engine carries its precision, and the runtime reads it from
``engine.json`` (runtimes.trt_plan).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtimes.precision import precision_name
from runtimes.trt_plan import parse_tensorrt_version

# tensorrt.LayerType names pinned to fp32 under TensorRT 10 weak typing (layer.precision and its output
# types set to float32, enforced by OBEY_PRECISION_CONSTRAINTS):
# - NORMALIZATION: LayerNorm's variance sums squares over the hidden size and overflows fp16 after
#   attention. TensorRT itself warns "Running layernorm after self-attention in FP16 may cause overflow
#   ... forcing layernorm layers to run in FP32 precision can help" (quoted in pytorch/TensorRT#2730).
# - SOFTMAX: exponentials of attention scores (the unfused MatMul/Softmax form of opset 18).
# - REDUCE, CUMULATIVE: the span pooling's sums over up to 131,072 tokens (prefix sums in the graph)
#   leave fp16's range (65,504) and bf16's precision (8 bits).
# Not reachable by kind: the rotary angles (position x inv_freq, a MatMul/Mul like every GEMM).
# Positions above 65,504 overflow fp16 and above 256 lose integers in bf16, so the builder must pin the
# layers that compute them by name, or the graph must keep them fp32 (as the strongly typed graph of
# TensorRT 11 does).
FP32_LAYER_KINDS = ("NORMALIZATION", "SOFTMAX", "REDUCE", "CUMULATIVE")


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build an engine of one precision on one TensorRT version.

    ``builder_flags`` are ``tensorrt.BuilderFlag`` member names to set, ``cleared_builder_flags`` ones to
    clear; ``strongly_typed`` asks for ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
    ``graph_precision`` is the precision (runtimes.precision) of the ONNX graph given to the parser;
    ``fp32_layers`` are ``tensorrt.LayerType`` names to pin to fp32 (weak typing only).
    """

    precision: str
    builder_flags: tuple[str, ...]
    strongly_typed: bool
    graph_precision: str
    fp32_layers: tuple[str, ...] = ()
    cleared_builder_flags: tuple[str, ...] = ()


def precision_plan(precision, tensorrt_version: str) -> PrecisionPlan:
    """The precision plan for ``precision`` (fp32 | fp16 | bf16, any spelling of runtimes.precision) on
    TensorRT ``tensorrt_version``.

    TensorRT 10 (weak typing): the parser gets the fp32 graph; ``FP16`` or ``BF16`` lets the builder pick
    reduced-precision kernels, and ``OBEY_PRECISION_CONSTRAINTS`` holds the layers in
    ``FP32_LAYER_KINDS`` at fp32. TensorRT 11 removed ``BuilderFlag.FP16/BF16`` and
    ``OBEY/PREFER_PRECISION_CONSTRAINTS`` ("Strong typing (always enforced)", NVIDIA's 10.x -> 11.x
    migration guide, Removed Python APIs): no precision flags, a strongly typed network, and the ONNX
    graph itself is fp16/bf16 with LayerNorm, softmax and rotary kept fp32 inside it (made by the
    exporter). fp32 on either: an fp32 graph and ``TF32`` cleared, since TensorRT may use TF32 tensor
    cores for fp32 matmuls by default (10-bit mantissa), which would break fp32 parity with PyTorch.
    """
    precision = precision_name(precision)
    major = parse_tensorrt_version(tensorrt_version)[0]
    if major < 10:
        raise ValueError(f"TensorRT >= 10 required, found {tensorrt_version}")
    strong = major >= 11
    if precision == "fp32":
        return PrecisionPlan("fp32", (), strong, "fp32", (), ("TF32",))
    if strong:
        return PrecisionPlan(precision, (), True, precision)
    flag = "FP16" if precision == "fp16" else "BF16"
    return PrecisionPlan(precision, (flag, "OBEY_PRECISION_CONSTRAINTS"), False, "fp32", FP32_LAYER_KINDS)
