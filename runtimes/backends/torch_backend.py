"""PyTorch backend: the reference forward, in eval mode under ``torch.inference_mode``.

fp32 or bf16 (LayerNorm, softmax, rotary tables and pooling stay float32: modeling.reduce_precision),
on cpu or cuda. Pooling accumulates in float64, and outputs are returned as float32 numpy arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..attention import set_length_policy
from ..memory import tune_for_length
from ..modeling import DeweyModel, reduce_precision
from ..precision import FULL_NAMES, precision_name
from ..validation import require_int
from . import contract_inputs

# What this backend runs: fp16 overflows in Dewey's activations (its authors run it in bf16).
TORCH_PRECISIONS = ("fp32", "bf16")


def resolve_device(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    return device


def torch_dtype(precision) -> torch.dtype:
    """The torch dtype of a precision in any spelling of runtimes.precision."""
    return getattr(torch, FULL_NAMES[precision_name(precision)])


def resolve_dtype(dtype) -> torch.dtype:
    """The backend's dtype: fp32 when None, else fp32 or bf16 in any spelling."""
    precision = "fp32" if dtype is None else precision_name(dtype)
    if precision not in TORCH_PRECISIONS:
        raise ValueError(f"the torch backend runs {' or '.join(TORCH_PRECISIONS)} (fp16 overflows), got {dtype!r}")
    return torch_dtype(precision)


class TorchBackend:
    name = "torch"

    def __init__(self, model: DeweyModel, device=None, dtype=None, threads: int | None = None):
        self.device = resolve_device(device)
        if threads is not None:  # torch's intra-op pool is per process: this sets it for every model
            torch.set_num_threads(require_int("threads", threads, 1))
        self.threads = torch.get_num_threads()
        self.dtype = resolve_dtype(dtype)
        self.model = reduce_precision(model, self.dtype).to(device=self.device).eval()
        if model.attention == "linear":
            set_length_policy(self.model.backbone)  # short rows: one masked SDPA call (runtimes.attention)
        self.vector_size = model.vector_size

    @classmethod
    def from_folder(cls, folder: str | Path, device=None, dtype=None, threads: int | None = None) -> "TorchBackend":
        return cls(DeweyModel.from_pretrained(folder), device=device, dtype=dtype, threads=threads)

    def __repr__(self) -> str:
        return f"TorchBackend(device={str(self.device)!r}, dtype={precision_name(self.dtype)!r})"

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, span_bounds: np.ndarray):
        tune_for_length(np.shape(input_ids)[-1])  # long rows: freed activations go back to the system
        inputs = contract_inputs(input_ids, attention_mask, span_bounds)
        with torch.inference_mode():
            cls, spans = self.model(*(torch.from_numpy(array).to(self.device) for array in inputs.values()))
        return cls.float().cpu().numpy(), spans.float().cpu().numpy()
