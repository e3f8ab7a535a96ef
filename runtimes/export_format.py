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
import warnings
from dataclasses import dataclass, field
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
# The manifest key of each kind of graph: the ONNX graph, or the OpenVINO IR.
GRAPH_KEYS = ("onnx", OPENVINO_KEY)
# The graph forms a manifest's "target" may name (dewey_export.onnx_export.GRAPH_FORMS).
GRAPH_FORM_NAMES = ("cpu", "gpu", "openvino")
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


def check_export_files(folder: str | Path, hashes: bool = True) -> ExportManifest:
    """Read the manifest of an export folder and compare the folder with its ``files`` table; returns
    the manifest.

    Every listed file must exist with the recorded size and, with ``hashes``, sha256; sizes are compared
    first, and only files of the right size are hashed. The files the runtime reads (config, tokenizer,
    the graph (ONNX, or OpenVINO IR), TensorRT engine and its metadata) must be listed; other files beside
    them (an ONNX Runtime engine cache, a note) are never read and not checked. Raises
    ``ExportFilesChanged`` naming every file that differs. Hashing costs seconds for a large fp32 model
    (docs/benchmarks.md); ``hashes=False`` keeps the size check only.
    """
    from .trt_plan import ENGINE_FILE, METADATA_FILE  # trt_plan imports this module's INPUTS

    folder = Path(folder)
    manifest = read_manifest(folder)
    table = manifest.files
    read_by_runtime = [*REQUIRED_FILES, *manifest.graph_files(),
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


def is_export_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a dewey export manifest of any format (what ``--overwrite`` may replace)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(manifest, dict) and type(manifest.get("format")) is int
            and any(key in manifest for key in GRAPH_KEYS))


def graph_description(files: list[str] | None = None, **details) -> dict:
    """The manifest's description of a graph: its files (when not the ONNX graph alone), the contract's
    inputs and outputs (``contract_tensors``), and ``details`` (opset, weights, ...)."""
    return {**({"files": files} if files else {}), **details, **contract_tensors()}


def contract_tensors() -> dict:
    """The backend contract as the manifest records a graph's I/O: ``{"inputs": {name: {"type", "axes"}},
    "outputs": ...}``."""
    return {"inputs": {name: {"type": t, "axes": axes} for name, (t, axes) in INPUTS.items()},
            "outputs": {name: {"type": t, "axes": axes} for name, (t, axes) in OUTPUTS.items()}}


# The manifest's verification reports, each ``{"passed": bool, ...}`` or ``{"skipped": reason, ...}``:
# the graph's parity and quality gate, an int8 graph's execution check (its quantized operators run, and
# faster than fp32), and for a TensorRT folder the engine's.
REPORTS = ("parity", "gate", "int8", "tensorrt_parity", "tensorrt_gate")
# A graph description's ``weights`` of an int8 export (ONNX dynamic int8, OpenVINO int8).
INT8 = "int8"
# The manifest's top-level keys besides the graph's and the reports, in the order they are written.
_FIELDS = ("format", "source", "files", "precision", "target", "attention", "export_seconds", "tools")


@dataclass(frozen=True)
class ExportManifest:
    """``dewey_export.json``, typed: read, validated and written only here.

    ``graph_key`` is ``onnx`` or ``openvino`` and ``graph`` its description (files, I/O, details);
    ``target`` is the form the graph was made for (cpu, gpu, openvino: the manifest's key since format
    1); ``reports`` maps each of ``REPORTS`` present to its report. One rule decides a manifest's
    verdict: a report whose ``passed`` is False failed; a skipped report failed nothing.
    """

    source: dict
    graph_key: str
    graph: dict
    files: dict
    precision: str
    target: str
    reports: dict = field(default_factory=dict)
    attention: dict = field(default_factory=dict)
    export_seconds: float = 0.0
    tools: dict = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    @property
    def kind(self) -> str:
        """What the folder holds: ``openvino`` (an IR), ``tensorrt`` (an ONNX graph and an engine built
        from it) or ``onnx``."""
        if self.graph_key == OPENVINO_KEY:
            return "openvino"
        return "tensorrt" if "tensorrt_parity" in self.reports else "onnx"

    @property
    def quantized(self) -> bool:
        """Whether the graph holds int8 weights (``precision`` then names its float arithmetic)."""
        return self.graph.get("weights") == INT8

    @property
    def checked_precision(self) -> str:
        """The precision whose limits the checks apply: ``int8`` for a quantized graph, else ``precision``."""
        return INT8 if self.quantized else self.precision

    @property
    def failed(self) -> list[str]:
        """The names of the reports that failed, in ``REPORTS`` order."""
        return [name for name in REPORTS if self.reports.get(name, {}).get("passed") is False]

    @property
    def passed(self) -> bool:
        return not self.failed

    def graph_files(self) -> tuple[str, ...]:
        """The files that hold the graph: the OpenVINO IR, or the ONNX graph."""
        return (OPENVINO_XML_FILE, OPENVINO_BIN_FILE) if self.graph_key == OPENVINO_KEY else (ONNX_FILE,)

    def to_dict(self) -> dict:
        fields = {name: getattr(self, name) for name in _FIELDS}
        return {**fields, self.graph_key: self.graph, **self.reports}

    def write(self, folder: str | Path) -> None:
        write_manifest(folder, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = MANIFEST_FILE) -> "ExportManifest":
        """The manifest ``data`` (read from ``path``, named in messages), checked: any problem is a
        ModelFileError naming the file and the key."""
        path = Path(path)
        if not isinstance(data, dict):
            raise ModelFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
        found = data.get("format")
        if type(found) is int and found < MANIFEST_FORMAT:
            raise ModelFileError(
                f"{path} is manifest format {found}, made by an older dewey that recorded no hashes of the "
                "export's files; export again (dewey-export ... --overwrite)"
            )
        if found != MANIFEST_FORMAT:
            raise ModelFileError(f"{path}: unknown manifest format {found!r} (this dewey reads {MANIFEST_FORMAT})")
        graph_key = OPENVINO_KEY if OPENVINO_KEY in data else "onnx"
        _check_fields(data, graph_key, path)
        return cls(source=data["source"], graph_key=graph_key, graph=data[graph_key], files=data["files"],
                   precision=data["precision"], target=data.get("target", "cpu"),
                   reports={name: data[name] for name in REPORTS if name in data},
                   attention=data.get("attention", {}), export_seconds=data.get("export_seconds", 0.0),
                   tools=data.get("tools", {}))

    @classmethod
    def read(cls, folder: str | Path) -> "ExportManifest":
        """The manifest of an export folder (``from_dict``'s checks)."""
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise ModelFileError(
                f"{Path(folder)} has no {MANIFEST_FILE}: it is not a dewey export folder "
                "(make one with: dewey-export onnx --model CHECKPOINT --out DIR)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path} is not readable JSON: {exc}") from exc
        return cls.from_dict(data, path)

    def warn_if_failed(self, folder: str | Path, stacklevel: int = 3) -> None:
        """One RuntimeWarning naming every failed report: a loader runs such a folder, but says so."""
        if self.failed:
            warnings.warn(f"{folder} failed its {', '.join(self.failed)} check(s) at export time (see them in "
                          f"{Path(folder) / MANIFEST_FILE})", RuntimeWarning, stacklevel=stacklevel)


def write_manifest(folder: str | Path, data: dict) -> None:
    """Write ``data`` as ``folder``'s manifest, atomically (``ExportManifest.write``'s last step)."""
    with atomic_path(Path(folder) / MANIFEST_FILE) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: str | Path) -> ExportManifest:
    """``ExportManifest.read``: the checked manifest of an export folder."""
    return ExportManifest.read(folder)


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


def _check_fields(manifest: dict, graph_key: str, path: Path) -> None:
    source = _field(manifest, "source", "source", "an object", _is_object, path)
    _field(source, "path", "source.path", "a string", lambda v: isinstance(v, str), path)
    _field(source, "sha256", "source.sha256", "an object of file names to sha256 digests",
           lambda v: isinstance(v, dict) and all(isinstance(h, str) for h in v.values()), path)
    graph = _field(manifest, graph_key, graph_key, "an object", _is_object, path)
    expected = contract_tensors()
    for side in ("inputs", "outputs"):
        _field(graph, side, f"{graph_key}.{side}", f"the backend contract's tensors {expected[side]}",
               lambda v, want=expected[side]: v == want, path)
    _field(manifest, "precision", "precision", f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS, path)
    if "target" in manifest:
        _field(manifest, "target", "target", f"one of {', '.join(GRAPH_FORM_NAMES)}",
               lambda v: v in GRAPH_FORM_NAMES, path)
    _field(manifest, "parity", "parity", "an object", _is_object, path)
    for name in REPORTS:
        if name in manifest:
            report = _field(manifest, name, name, "an object", _is_object, path)
            if "passed" in report:
                _field(report, "passed", f"{name}.passed", "true or false", lambda v: isinstance(v, bool), path)
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
