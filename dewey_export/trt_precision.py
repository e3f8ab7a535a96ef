"""The precision plan of a TensorRT build, by TensorRT version: plain data, tested without TensorRT.

Every supported TensorRT (10.15.1 and newer, 11.x) builds the same way: a strongly typed network parsed
from the ONNX graph of the engine's own precision (fp32, or fp16/bf16 with LayerNorm, softmax, the
rotary angles and pooling kept fp32 inside the graph by the exporter). No precision builder flags and no
per-layer pins: the graph carries every tensor's type. Only the builder (``trt_build``) needs this; an
engine carries its precision, and the runtime reads it from ``engine.json`` (runtimes.trt_plan).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtimes.precision import precision_name
from runtimes.trt_plan import parse_tensorrt_version

# The oldest TensorRT whose ONNX parser takes the gpu-target graph (opset 23): onnx-tensorrt's changelog
# adds the `Attention` operator in its 10.14 release and `RotaryEmbedding` in 10.15, and NVIDIA's
# "Working with Transformers" page marks IRotaryEmbeddingLayer "Added in version 10.15.1". An older
# parser rejects the graph only after the ONNX export has run, so the builder refuses it first.
MIN_TENSORRT_VERSION = (10, 15, 1)
# NetworkDefinitionCreationFlag names. Strong typing on 10.x as on 11.x: NVIDIA deprecated the weak
# typing APIs in TensorRT 10.12 ("TensorRT will be using strong-typing exclusively in the future",
# 10.12.0 release notes) and 11.x removes them ("Strong typing (always enforced)", 10.x -> 11.x
# migration guide); on 11.x the flag is accepted and has no effect. Under weak typing the FP16 flag
# let TensorRT run the rotary angles (int64 positions cast to float, times inv_freq) in fp16, where
# positions above 2,048 lose integers and above 65,504 overflow: NaN vectors in long buckets.
NETWORK_FLAGS = ("STRONGLY_TYPED",)
# BuilderFlag names cleared for fp32 engines: TensorRT may run fp32 matmuls on TF32 tensor cores by
# default (10-bit mantissa), which would break fp32 parity with PyTorch.
FP32_CLEARED_BUILDER_FLAGS = ("TF32",)


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build an engine of one precision: ``network_flags`` are
    ``tensorrt.NetworkDefinitionCreationFlag`` member names to create the network with,
    ``cleared_builder_flags`` ``tensorrt.BuilderFlag`` member names to clear. No precision flag is set and
    no layer is pinned: the precision is the ONNX graph's (``graph_options(precision=plan.precision)``)."""

    precision: str
    network_flags: tuple[str, ...] = NETWORK_FLAGS
    cleared_builder_flags: tuple[str, ...] = ()


def tensorrt_version_problem(tensorrt_version: str) -> str | None:
    """None when this TensorRT can build the gpu-target graph; otherwise why not, naming the installed and
    the required version. An unreadable version string is a ValueError."""
    if parse_tensorrt_version(tensorrt_version)[:3] >= MIN_TENSORRT_VERSION:
        return None
    required = ".".join(map(str, MIN_TENSORRT_VERSION))
    return (f"TensorRT {tensorrt_version} is installed, but the gpu-target graph needs TensorRT >= {required}: "
            "its ONNX parser imports the opset-23 Attention operator from 10.14 and RotaryEmbedding from "
            f"10.15.1. Upgrade (pip install -U 'tensorrt-cu12>={required}', or tensorrt-cu13), then run this again")


def precision_plan(precision, tensorrt_version: str) -> PrecisionPlan:
    """The precision plan for ``precision`` (fp32 | fp16 | bf16, any spelling of runtimes.precision) on
    TensorRT ``tensorrt_version``; a version below ``MIN_TENSORRT_VERSION`` is a ValueError."""
    precision = precision_name(precision)
    problem = tensorrt_version_problem(tensorrt_version)
    if problem:
        raise ValueError(problem)
    if precision == "fp32":
        return PrecisionPlan(precision, cleared_builder_flags=FP32_CLEARED_BUILDER_FLAGS)
    return PrecisionPlan(precision)
