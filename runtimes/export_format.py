"""The export folder's layout and manifest, shared by the exporter (writer) and the backends (readers).

An export folder holds ``model.onnx`` (plus ``model.onnx.data`` when the weights pass protobuf's 2 GB
limit), ``config.json`` and ``tokenizer.json`` copied from the checkpoint, and ``dewey_export.json``:
the manifest with the source checkpoint's hashes, opset, precision, I/O names and axes, tool versions
and the parity report. Standard library and numpy only: services read it without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ModelFileError

MANIFEST_FILE = "dewey_export.json"
ONNX_FILE = "model.onnx"
MANIFEST_FORMAT = 1

# The backend contract as graph I/O (DESIGN.md): names, element types and dynamic axes.
INPUTS = {
    "input_ids": ("int64", ["batch", "sequence"]),
    "attention_mask": ("int64", ["batch", "sequence"]),
    "span_bounds": ("int64", ["batch", "chunks", 2]),
}
OUTPUTS = {
    "cls": ("float32", ["batch", "vector_size"]),
    "spans": ("float32", ["batch", "chunks", "vector_size"]),
}


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ModelFileError(
            f"{Path(folder)} has no {MANIFEST_FILE}: it is not a dewey export folder "
            "(make one with: dewey-export --model CHECKPOINT --to onnx --out DIR)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ModelFileError(f"{path}: unknown manifest format {manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    for key in ("onnx", "source", "parity"):
        if key not in manifest:
            raise ModelFileError(f"{path}: required key {key!r} is missing")
    return manifest
