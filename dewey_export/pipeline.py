"""One export pipeline for every target: checkpoint -> verified export folder, published atomically.

``export(source, out, target)`` resolves and checks the source checkpoint and the target's options,
prepares the output (what a killed export left beside it is removed; only a previous export is ever
replaced, and only with ``overwrite``), stages the folder, loads the fp32 reference once, calls the
target's ``build``, copies the config and tokenizer, writes the manifest, runs parity AND, for every
reduced precision, the quality gate on the target's ``candidate`` (the backend that runs the folder),
records both reports and publishes. A failed check still publishes the folder with its reports, so the
failure can be inspected; ``result.passed`` tells (the CLI exits 1). ``dewey-export verify`` re-runs
the same checks on the same ``candidate`` (``verify_folder``).

A target is a frozen options dataclass with three methods (the ``Target`` protocol):

- ``check(config, log)``: the options checked against the model and what is installed, defaults filled
  in; returns the resolved target. Runs before anything is written.
- ``build(reference, checkpoint, folder, log)``: writes the graph (and engine) into the staging folder;
  returns a ``Built``: the graph's manifest entries.
- ``candidate(folder, manifest, device)``: the backend that runs the folder and the precision it is
  checked at; ``CannotVerifyHere`` where this machine cannot run it.

The reference is PyTorch fp32 on the CPU for every target: one rule, and the exact one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol

from runtimes.config import CONFIG_FILE, DeweyConfig
from runtimes.errors import BadInputError, ExportError, ModelFileError
from runtimes.export_format import (
    MANIFEST_FILE,
    ONNX_FILE,
    OPENVINO_BIN_FILE,
    OPENVINO_XML_FILE,
    ExportManifest,
    file_table,
    is_export_folder,
)
from runtimes.files import LEFTOVER_MARK, atomic_path, clean_leftovers, staged_folder
from runtimes.tokenization import TOKENIZER_FILE
from runtimes.trt_plan import ENGINE_FILE, METADATA_FILE

from .gate import load_gate_data, skipped_gate, verify_candidate
from .verify import check_checkpoint, skipped_report, source_hashes

# The checkpoint's files every export folder carries beside its graph.
COPIED_FILES = (CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
# What an export writes into its folder; TEMPORARY_PREFIXES: tempfile's folders made inside it.
EXPORT_NAMES = frozenset({*COPIED_FILES, ONNX_FILE, f"{ONNX_FILE}.data", OPENVINO_XML_FILE, OPENVINO_BIN_FILE,
                          ENGINE_FILE, METADATA_FILE, MANIFEST_FILE})
TEMPORARY_PREFIXES = ("tmp",)
# Packages whose versions the manifest records.
RECORDED_TOOLS = ("dewey", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                  "openvino", "nncf")


class CannotVerifyHere(BadInputError):
    """This machine cannot run the export for a check (a precision or device it lacks); says where to."""


@dataclass(frozen=True)
class Built:
    """What a target's ``build`` wrote, as the manifest records it."""

    graph_key: str  # "onnx" or "openvino"
    graph: dict  # runtimes.export_format.graph_description
    precision: str
    form: str  # the form the graph was made for: cpu, gpu or openvino (the manifest's "target")
    attention: dict
    export_seconds: float
    # Reports the target settles itself (a TensorRT folder's graph, checked through its engine).
    reports: dict = field(default_factory=dict)


class Target(Protocol):
    name: str  # onnx, openvino, tensorrt
    reports: tuple[str, str]  # the manifest keys of its (parity, gate) reports

    def check(self, config: DeweyConfig, log) -> "Target": ...

    def build(self, reference, checkpoint: Path, folder: Path, log) -> Built: ...

    def candidate(self, folder: Path, manifest: ExportManifest, device=None) -> tuple[object, str]: ...


@dataclass
class ExportResult:
    folder: Path
    manifest: ExportManifest

    @property
    def passed(self) -> bool:
        return self.manifest.passed


def tool_versions() -> dict:
    versions = {}
    for name in RECORDED_TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def check_output_folder(checkpoint, out, overwrite: bool) -> None:
    """Refuse an output path whose replacement would destroy anything but a previous export.

    Refused always: ``out`` is, contains or is inside the checkpoint (resolved paths, so symlinks and
    ``..`` do not hide it); ``out`` is a file; ``out`` is a non-empty folder without a dewey manifest;
    a path that cannot be created. A previous export is replaced only with ``overwrite``. Reads only.
    """
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    if out == checkpoint or checkpoint in out.parents or out in checkpoint.parents:
        relation = "is" if out == checkpoint else "is inside" if checkpoint in out.parents else "contains"
        raise ExportError(f"--out {out} {relation} the source checkpoint {checkpoint}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; remove it or choose another path")
    if out.exists() and any(out.iterdir()):
        if not is_export_folder(out):
            raise ExportError(
                f"--out {out} is a folder with files and no {MANIFEST_FILE}: not a dewey export, so it is "
                "never replaced (not even with --overwrite); choose a new or empty folder"
            )
        if not overwrite:
            raise ExportError(f"{out} already exists and is not empty; pass overwrite (--overwrite) to replace it")
    existing = next(folder for folder in out.parents if folder.exists())
    if not existing.is_dir():
        raise ExportError(f"cannot write --out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write --out {out}: {existing} is not writable")


def written_by_us(names) -> Callable[[Path], bool]:
    """A predicate for ``clean_leftovers``: whether a leftover beside the output is a folder (not a link)
    holding nothing but ``names`` (what dewey-export writes there), their atomic temporary files,
    temporary folders and the mark of a staging folder (runtimes.files.LEFTOVER_MARK). A user's file or
    folder that merely matches the leftover pattern is never removed, nor moved into the output."""
    def owned(path: Path) -> bool:
        if path.is_symlink() or not path.is_dir():
            return False
        return all(child.name in names or child.name == LEFTOVER_MARK or child.name.startswith(TEMPORARY_PREFIXES)
                   or any(child.name.startswith(f".{name}.") for name in names) for child in path.iterdir())

    return owned


def prepare_output(checkpoint: Path, out: Path, overwrite: bool, log, names=EXPORT_NAMES) -> None:
    """Remove what a killed export left beside ``out`` (only what ``written_by_us(names)`` accepts),
    then ``check_output_folder``."""
    # Before the check: a folder a crash left moved aside is put back, and is then again a previous
    # export that only overwrite replaces.
    clean_leftovers(out.parent, out.name, log=log, owned=written_by_us(names))
    check_output_folder(checkpoint, out, overwrite)


def load_reference(model, log, attention: str = "linear"):
    """The model's fp32 DeweyModel (a runtimes.model_source.ModelSource), loaded once per export: the
    graph is made from a copy of it, and it is the parity and gate reference."""
    from runtimes.modeling import DeweyModel

    log(f"Loading {model!r}")
    return DeweyModel.from_pretrained(model, attention=attention)


def copy_model_files(model, folder: Path) -> None:
    """The files every export folder carries: the model's config.json as the runtime reads it (the
    backbone's keys and the Dewey fields of ``ModelSource.config_dict``, so a model of any layout loads
    like a Dewey checkpoint) and the tokenizer files."""
    with atomic_path(folder / CONFIG_FILE) as tmp:
        Path(tmp).write_text(json.dumps(model.config_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        if name != CONFIG_FILE and (model.tokenizer_folder / name).is_file():
            shutil.copy2(model.tokenizer_folder / name, folder / name)


def export(source, out, target: Target, *, verify: bool = True, gate_data=None, overwrite: bool = False,
           head=None, log=print) -> ExportResult:
    """Export the model ``source`` (a folder of any layout runtimes.model_source reads, a Hub id or a
    ModelSource; ``head``: its head tensors where their shapes leave a choice) for ``target`` into the
    folder ``out`` (see the module's notes); ``gate_data``: the quality gate's texts (runtimes.corpus
    sources: a JSONL file, a text file or a folder of them; None: the built-in held-out documents)."""
    model = check_checkpoint(source, head=head)
    checkpoint, out, config = model.folder.resolve(), Path(out).resolve(), model.config
    prepare_output(checkpoint, out, overwrite, log)
    target = target.check(config, log)
    # The user's gate texts are read before the long steps, so bad ones cost nothing.
    texts = load_gate_data(gate_data) if verify and gate_data is not None else None
    with staged_folder(out) as staging:  # made first: an --out that cannot be written fails before the load
        reference = load_reference(model, log, getattr(target, "attention", "linear"))
        built = target.build(reference, checkpoint, staging, log)
        copy_model_files(model, staging)
        parity_key, gate_key = target.reports
        manifest = _manifest(model, staging, built, {})
        checked = manifest.checked_precision
        pending = {parity_key: skipped_report(checked), gate_key: skipped_gate(True, checked), **built.reports}
        manifest = _manifest(model, staging, built, pending)
        manifest.write(staging)  # the candidate reads the folder as a loader would
        if verify:
            from runtimes.backends.torch_backend import TorchBackend

            reports = check_candidate(target, TorchBackend(reference), staging, manifest, model.tokenizer_folder,
                                      config, texts, log)
            manifest = _manifest(model, staging, built, {**pending, **reports})
            manifest.write(staging)
    log(f"Wrote {out}")
    return ExportResult(out, manifest)


def check_candidate(target: Target, reference, folder: Path, manifest: ExportManifest, tokenizer_folder: Path,
                    config: DeweyConfig, gate_data, log, device=None, strict: bool = False) -> dict:
    """The (parity, gate) reports of ``target``'s candidate for ``folder`` against ``reference`` (the
    gate tokenizes with ``tokenizer_folder``'s tokenizer), under the target's report keys. A candidate this machine cannot run raises ``CannotVerifyHere`` with
    ``strict``, else gives skipped reports saying why (an export made here for another machine)."""
    parity_key, gate_key = target.reports
    try:
        candidate, precision = target.candidate(folder, manifest, device)
    except CannotVerifyHere as exc:
        if strict:
            raise
        log(f"Not verified: {exc}")
        checked = manifest.checked_precision
        return {parity_key: skipped_report(checked, str(exc)), gate_key: skipped_gate(str(exc), checked)}
    log(f"Checking {candidate!r}")
    parity, gate = verify_candidate(reference, candidate, tokenizer_folder, config, precision, precision != "fp32",
                                    gate_data, log)
    return {parity_key: parity, gate_key: gate}


def _manifest(model, folder: Path, built: Built, reports: dict) -> ExportManifest:
    """``source.model`` records the model's layout, the head tensors read and, for a Hub id, the commit."""
    return ExportManifest(
        source={"path": str(model.folder.resolve()), "sha256": source_hashes(model), "model": model.describe()},
        graph_key=built.graph_key, graph=built.graph, files=file_table(folder), precision=built.precision,
        target=built.form, reports=reports, attention=built.attention,
        export_seconds=round(built.export_seconds, 2), tools=tool_versions(),
    )


def target_of(manifest: ExportManifest) -> Target:
    """The target whose ``candidate`` runs a folder of ``manifest``'s kind."""
    if manifest.kind == "openvino":
        from .openvino_export import OpenVINOTarget

        return OpenVINOTarget()
    if manifest.kind == "tensorrt":
        from .trt_build import TensorRTTarget

        return TensorRTTarget()
    from .onnx_export import OnnxTarget

    return OnnxTarget()


def verify_folder(folder: Path, manifest: ExportManifest, model: Path | None, device, gate_data, log) -> dict:
    """``dewey-export verify``: the reports of the folder's candidate against its checkpoint (``model``
    or the one its manifest records, with the recorded hashes), under the manifest's report keys. A
    candidate this machine cannot run is a ``CannotVerifyHere``."""
    from runtimes.backends.torch_backend import TorchBackend

    from .verify import check_source

    source, config = check_source(manifest, model)
    log(f"Comparing {folder} with {source!r}")
    return check_candidate(target_of(manifest), TorchBackend.from_folder(source), folder, manifest,
                           source.tokenizer_folder, config, load_gate_data(gate_data) if gate_data else None, log,
                           device, strict=True)
