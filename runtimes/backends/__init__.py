"""Backends: each owns exactly one thing, the forward pass (the backend contract).

    forward(input_ids int64[B, S], attention_mask int64[B, S], span_bounds int64[B, C, 2])
        -> cls float32[B, D], spans float32[B, C, D]

``spans[b, c]`` is the head applied to the mean of the final hidden states of tokens
``span_bounds[b, c, 0] .. span_bounds[b, c, 1] - 1`` (an empty span gives zeros); ``cls[b]`` is the head
applied to token 0. Nothing is normalised. A backend module is imported only when it is asked for, so
its heavy dependencies (torch, onnxruntime, openvino, tensorrt) cost nothing to users of the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

# name -> ("module:class", how to install what it needs); imported lazily.
_BACKENDS = {
    "torch": ("runtimes.backends.torch_backend:TorchBackend", "pip install 'dewey[torch]'"),
    "onnx": ("runtimes.backends.onnx_backend:OnnxBackend", "pip install 'dewey[onnx]'"),
    "openvino": ("runtimes.backends.openvino_backend:OpenVINOBackend", "pip install 'dewey[openvino]'"),
    "trt": ("runtimes.backends.trt_backend:TensorRTBackend",
            "on a GPU machine: pip install 'dewey[torch]' tensorrt-cu12 (TensorRT comes from NVIDIA's index)"),
}


class Backend(Protocol):
    name: str
    vector_size: int

    @classmethod
    def from_folder(cls, folder: str | Path, device=None, dtype=None, threads: int | None = None,
                    **options) -> Backend:
        """The backend for a model folder: a checkpoint (torch) or an export folder (onnx, openvino, trt).
        ``dtype`` is a precision in any spelling of runtimes.precision; ``threads`` the CPU threads of the
        forward pass (None: the CPUs this process may use); ``options`` are the backend's own (the onnx
        backend's providers and session settings, the openvino backend's properties)."""

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, span_bounds: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


def contract_inputs(input_ids, attention_mask, span_bounds) -> dict[str, np.ndarray]:
    """The forward inputs by contract name, as C-contiguous int64 arrays: every backend's one coercion."""
    arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "span_bounds": span_bounds}
    return {name: np.ascontiguousarray(value, dtype=np.int64) for name, value in arrays.items()}


def backend_for_folder(folder: str | Path) -> str:
    """The backend that runs ``folder``: its manifest's kind for an export folder (an OpenVINO IR:
    ``openvino``; a TensorRT engine folder: ``trt``; an ONNX graph: ``onnx``), ``torch`` for a checkpoint."""
    from ..export_format import MANIFEST_FILE, read_manifest

    if not (Path(folder) / MANIFEST_FILE).exists():
        return "torch"
    return {"openvino": "openvino", "tensorrt": "trt", "onnx": "onnx"}[read_manifest(folder).kind]


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def get_backend_class(name: str) -> type[Backend]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_BACKENDS)}")
    target, install = _BACKENDS[name]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"backend {name!r} needs the package {exc.name!r}, which is not installed: {install}"
        ) from exc
    return getattr(module, class_name)
