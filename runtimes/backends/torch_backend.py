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

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    return device


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


class TorchBackend:
    name = "torch"

    def __init__(self, model: DeweyModel, device=None, dtype=None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = reduce_precision(model, self.dtype).to(device=self.device).eval()
        if model.attention == "linear":
            set_length_policy(self.model.backbone)  # short rows: one masked SDPA call (runtimes.attention)
        self.vector_size = model.vector_size

    @classmethod
    def from_folder(cls, folder: str | Path, config=None, device=None, dtype=None) -> "TorchBackend":
        return cls(DeweyModel.from_pretrained(folder), device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"TorchBackend(device={str(self.device)!r}, dtype={str(self.dtype).removeprefix('torch.')!r})"

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, span_bounds: np.ndarray):
        tune_for_length(np.shape(input_ids)[-1])  # long rows: freed activations go back to the system
        with torch.inference_mode():
            cls, spans = self.model(
                torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device),
                torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device),
                torch.from_numpy(np.ascontiguousarray(span_bounds, dtype=np.int64)).to(self.device),
            )
        return cls.float().cpu().numpy(), spans.float().cpu().numpy()
