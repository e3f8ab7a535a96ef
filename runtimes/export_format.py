"""The export folder's layout and manifest, shared by the exporter (writer) and the loaders (readers).

An export folder holds ``model.onnx`` (plus ``model.onnx.data`` when the weights pass protobuf's 2 GB
limit) or, for OpenVINO, the IR ``model.xml`` and ``model.bin`` instead, ``config.json``,
``tokenizer.json`` and the tokenizer's other files copied from the checkpoint, for TensorRT also
``model.plan`` and ``engine.json``, and ``dewey_export.json``: the manifest with the source checkpoint's
hashes, the graph's description (``onnx``: opset, I/O names and axes; or ``openvino``), precision, tool
versions, the parity report, the precision gate's report (``gate``, reduced-precision exports) and the
``files`` table, the byte size and sha256 of every other file in the folder. ``check_export_files``
compares a folder with that table before anything in it is read. The precision is recorded in
runtimes.precision's spelling (fp32, fp16, bf16). No torch: services read it without torch installed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .config import CONFIG_FILE, ModelFileError
from .files import atomic_path
from .precision import PRECISIONS
from .tokenization import TOKENIZER_FILE

MANIFEST_FILE = "dewey_export.json"
ONNX_FILE = "model.onnx"
# OpenVINO's IR: the graph (XML) and its weights; the manifest's "openvino" key marks such a folder.
OPENVINO_XML_FILE = "model.xml"
OPENVINO_BIN_FILE = "model.bin"
OPENVINO_KEY = "openvino"
# 2: the "files" table (size and sha256 of every file) replaced format 1's onnx bytes/sha256.
MANIFEST_FORMAT = 2
# Files every export folder holds and the runtime reads, beside its graph (graph_files): the table must
# list them.
REQUIRED_FILES = (CONFIG_FILE, TOKENIZER_FILE)
_SHA256 = re.compile(r"[0-9a-f]{64}")

# The backend contract as graph I/O: names, element types and dynamic axes.
INPUTS = {
    "input_ids": ("int64", ["batch", "sequence"]),
    "attention_mask": ("int64", ["batch", "sequence"]),
    "span_bounds": ("int64", ["batch", "chunks", 2]),
}
OUTPUTS = {
    "cls": ("float32", ["batch", "vector_size"]),
    "spans": ("float32", ["batch", "chunks", "vector_size"]),
}


class ExportFilesChanged(ModelFileError):
    """Files of an export folder differ from its manifest's table: changed, damaged, missing or unlisted."""

    def __init__(self, folder: Path, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{folder}: {len(problems)} file(s) changed or damaged after export ({'; '.join(problems)}); "
            "export again"
        )


def check_graph_io(model_path: str | Path, inputs: dict, outputs: dict, type_names: dict) -> None:
    """Refuse a graph whose inputs and outputs (name -> the engine's type name) are not the backend
    contract; ``type_names`` spells this module's element types the engine's way."""
    want_in = {name: type_names[dtype] for name, (dtype, _) in INPUTS.items()}
    want_out = {name: type_names[dtype] for name, (dtype, _) in OUTPUTS.items()}
    if inputs != want_in or outputs != want_out:
        raise ModelFileError(
            f"{model_path} is not a Dewey graph: inputs {inputs}, outputs {outputs}; "
            f"expected inputs {want_in} and outputs {want_out}"
        )


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_table(folder: str | Path) -> dict:
    """Size and sha256 of every file in ``folder`` but the manifest: the manifest's ``files`` table."""
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(Path(folder).iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }


def check_export_files(folder: str | Path, hashes: bool = True) -> dict:
    """Read the manifest of an export folder and compare the folder with its ``files`` table; returns
    the manifest.

    Every listed file must exist with the recorded size and, with ``hashes``, sha256; sizes are compared
    first, and only files of the right size are hashed. The files the runtime reads (config, tokenizer,
    the graph (ONNX, or OpenVINO IR), TensorRT engine and its metadata) must be listed; other files beside
    them (an ONNX Runtime engine cache, a note) are never read and not checked. Raises
    ``ExportFilesChanged`` naming every file that differs. sha256 ran at 560-620 MB/s on the 2-core
    development machine (a 100 MB file, page cache warm): about 3 s for the 1.6 GB of a large fp32 model;
    ``hashes=False`` keeps the size check only.
    """
    from .trt_plan import ENGINE_FILE, METADATA_FILE  # trt_plan imports this module's INPUTS

    folder = Path(folder)
    manifest = read_manifest(folder)
    table = manifest["files"]
    read_by_runtime = [*REQUIRED_FILES, *graph_files(manifest),
                       *(name for name in (ENGINE_FILE, METADATA_FILE) if (folder / name).exists())]
    problems = [f"{name} is not listed in {MANIFEST_FILE}" for name in read_by_runtime if name not in table]
    sized = []
    for name, entry in table.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest records {entry['bytes']}")
        else:
            sized.append(name)
    if hashes:
        problems += [f"{name}: sha256 differs from the manifest" for name in sized
                     if sha256_file(folder / name) != table[name]["sha256"]]
    if problems:
        raise ExportFilesChanged(folder, problems)
    return manifest


def graph_files(manifest: dict) -> tuple[str, ...]:
    """The files that hold an export's graph: the OpenVINO IR, or the ONNX graph."""
    return (OPENVINO_XML_FILE, OPENVINO_BIN_FILE) if OPENVINO_KEY in manifest else (ONNX_FILE,)


def is_export_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a dewey export manifest of any format (what ``--overwrite`` may replace)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(manifest, dict) and type(manifest.get("format")) is int
            and ("onnx" in manifest or OPENVINO_KEY in manifest))


def write_manifest(folder: str | Path, manifest: dict) -> None:
    with atomic_path(Path(folder) / MANIFEST_FILE) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an export folder, its format and the fields the code uses checked: any problem is a
    ModelFileError naming the file and the key."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ModelFileError(
            f"{Path(folder)} has no {MANIFEST_FILE}: it is not a dewey export folder "
            "(make one with: dewey-export --model CHECKPOINT --to onnx --out DIR)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ModelFileError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    found = manifest.get("format")
    if type(found) is int and found < MANIFEST_FORMAT:
        raise ModelFileError(
            f"{path} is manifest format {found}, made by an older dewey that recorded no hashes of the "
            "export's files; export again (dewey-export ... --overwrite)"
        )
    if found != MANIFEST_FORMAT:
        raise ModelFileError(f"{path}: unknown manifest format {found!r} (this dewey reads {MANIFEST_FORMAT})")
    _check_fields(manifest, path)
    return manifest


def _field(mapping: dict, name: str, key: str, expected: str, valid, path: Path):
    """``mapping[name]`` if ``valid`` accepts it; ``key`` is its full name in the messages."""
    if name not in mapping:
        raise ModelFileError(f"{path}: required key {key} is missing")
    value = mapping[name]
    if not valid(value):
        raise ModelFileError(f"{path}: {key} must be {expected}, got {value!r}")
    return value


def _is_object(value) -> bool:
    return isinstance(value, dict)


def _check_fields(manifest: dict, path: Path) -> None:
    source = _field(manifest, "source", "source", "an object", _is_object, path)
    _field(source, "path", "source.path", "a string", lambda v: isinstance(v, str), path)
    _field(source, "sha256", "source.sha256", "an object of file names to sha256 digests",
           lambda v: isinstance(v, dict) and all(isinstance(h, str) for h in v.values()), path)
    graph_key = OPENVINO_KEY if OPENVINO_KEY in manifest else "onnx"
    _field(manifest, graph_key, graph_key, "an object", _is_object, path)
    _field(manifest, "precision", "precision", f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS, path)
    parity = _field(manifest, "parity", "parity", "an object", _is_object, path)
    if "passed" in parity:
        _field(parity, "passed", "parity.passed", "true or false", lambda v: isinstance(v, bool), path)
    if "gate" in manifest:
        gate = _field(manifest, "gate", "gate", "an object", _is_object, path)
        if "passed" in gate:
            _field(gate, "passed", "gate.passed", "true or false", lambda v: isinstance(v, bool), path)
    files = _field(manifest, "files", "files", "an object of file names", _is_object, path)
    for name in files:
        key = f"files[{name!r}]"
        if name in ("", ".", "..") or Path(name).name != name:
            raise ModelFileError(f"{path}: {key} is not a file name inside the export folder")
        entry = _field(files, name, key, "an object with bytes and sha256", _is_object, path)
        _field(entry, "bytes", f"{key}.bytes", "a non-negative integer",
               lambda v: type(v) is int and v >= 0, path)
        _field(entry, "sha256", f"{key}.sha256", "64 lowercase hex digits",
               lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None, path)
