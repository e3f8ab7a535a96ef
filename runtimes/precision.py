"""Numeric precision: one spelling for every option, manifest and backend.

The canonical names are ``fp32``, ``fp16`` and ``bf16``: what ``dewey-export --precision`` takes, what
both manifests (``dewey_export.json`` and a TensorRT folder's ``engine.json``) record, and what every
backend and exporter compares. ``precision_name`` turns the other spellings a caller may hold (the
element type's full name, a numpy or torch dtype) into the canonical one. numpy only: the ONNX path
imports it without torch.
"""

from __future__ import annotations

import numpy as np

# Canonical name -> the element type's full name, as numpy, torch and the ONNX element types spell it.
FULL_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PRECISIONS = tuple(FULL_NAMES)
_CANONICAL = {**{name: name for name in FULL_NAMES}, **{full: name for name, full in FULL_NAMES.items()}}


def precision_name(value) -> str:
    """The canonical name (``fp32``, ``fp16``, ``bf16``) of a precision in any spelling: the name itself,
    the full name (``float32``, ``float16``, ``bfloat16``), a torch dtype (``torch.bfloat16``) or a numpy
    dtype (``np.float32``, ``np.dtype("float16")``, ml_dtypes' bfloat16). Anything else is a ValueError."""
    if isinstance(value, str):
        spelling = value
    elif type(value).__module__ == "torch":  # a torch.dtype, recognised without importing torch
        spelling = str(value).removeprefix("torch.")
    elif value is None:  # np.dtype(None) would be float64
        spelling = None
    else:
        try:
            spelling = np.dtype(value).name
        except (TypeError, ValueError):  # not a dtype at all
            spelling = None
    if spelling not in _CANONICAL:
        raise ValueError(
            f"precision must be one of {', '.join(PRECISIONS)} (or {', '.join(FULL_NAMES.values())}, or a numpy "
            f"or torch dtype of those), got {value!r}"
        )
    return _CANONICAL[spelling]
