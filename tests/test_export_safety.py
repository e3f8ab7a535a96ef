"""What an export may destroy, what a damaged export folder does at load time, and what a killed export
leaves behind.

- ``--overwrite`` replaces only a previous export: never the checkpoint, a folder around or inside it, a
  foreign folder or a file.
- Every file of an export is in its manifest's table (size and sha256); ``runtimes.load`` and
  ``dewey-export verify`` compare the folder with it before anything is read.
- Malformed manifests and unwritable output paths give a one-line error, never a traceback.
- An export killed at any point leaves the previous export intact, and the next export cleans up.

Where the tracer is not what a test is about, ``_trace`` copies the session export's graph instead of
tracing (tracing the tiny model costs 5-20 s on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript) is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
import onnx  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import runtimes  # noqa: E402
from dewey_export import onnx_export as exporter  # noqa: E402
from dewey_export import trt_build  # noqa: E402
from dewey_export.onnx_export import OnnxTarget  # noqa: E402
from dewey_export.pipeline import export  # noqa: E402
from dewey_export.cli import EXIT_BAD_INPUT, EXIT_VERIFY_FAILED, main  # noqa: E402
from runtimes.config import CONFIG_FILE, load_config  # noqa: E402
from runtimes.export_format import (  # noqa: E402
    MANIFEST_FILE,
    ONNX_FILE,
    ExportFilesChanged,
    check_export_files,
    file_table,
    read_manifest,
    write_manifest,
)
from runtimes.files import leftovers  # noqa: E402
from runtimes.tokenization import TOKENIZER_FILE  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a previous export must survive", "a killed one"]
# Generous: a subprocess imports torch and loads the model on a loaded 2-core machine.
SUBPROCESS_TIMEOUT_S = 240


def folder_state(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture
def copied_graph(monkeypatch, onnx_export):
    """``_trace`` copies the session export's graph (fast) instead of tracing."""
    monkeypatch.setattr(exporter, "_trace", lambda model, onnx_path, *args, **kwargs:
                        shutil.copyfile(onnx_export / ONNX_FILE, onnx_path))


@pytest.fixture
def project(tmp_path, checkpoint):
    """A folder P holding a copy of the checkpoint (P/ckpt) and a file of the user's (P/notes.txt)."""
    shutil.copytree(checkpoint, tmp_path / "P" / "ckpt")
    (tmp_path / "P" / "notes.txt").write_text("the user's own file\n")
    return tmp_path / "P"


# --- 1. --overwrite replaces only a previous export ---------------------------------------------


@pytest.mark.parametrize("out, relation", [(".", "contains"), ("ckpt", "is"), ("ckpt/onnx", "is inside"),
                                           ("link-to-ckpt", "is")])
@pytest.mark.parametrize("to", ["onnx", "trt"])
def test_overwrite_never_touches_the_checkpoint(project, out, relation, to):
    (project / "link-to-ckpt").symlink_to(project / "ckpt")
    before = folder_state(project)
    result = CliRunner().invoke(main, [to, "--model", str(project / "ckpt"), "--out",
                                       str(project / out), "--overwrite", "--no-verify"])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    line = one_line_error(result.output)
    assert f"{relation} the source checkpoint" in line and str((project / out).resolve()) in line
    assert folder_state(project) == before


@pytest.mark.parametrize("kind", ["foreign folder", "file"])
def test_overwrite_never_replaces_what_is_not_an_export(project, kind):
    out = project / "out"
    if kind == "file":
        out.write_text("not an export\n")
    else:
        out.mkdir()
        (out / "data.csv").write_text("1,2,3\n")
    before = folder_state(project)
    result = CliRunner().invoke(main, ["onnx", "--model", str(project / "ckpt"), "--out", str(out),
                                       "--overwrite", "--no-verify"])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert str(out) in one_line_error(result.output)
    assert folder_state(project) == before


def test_export_onnx_and_build_engine_folder_refuse_the_checkpoint_from_python(project, monkeypatch):
    before = folder_state(project)
    with pytest.raises(exporter.ExportError, match="contains the source checkpoint"):
        export(project / "ckpt", project, OnnxTarget(), overwrite=True, log=lambda m: None)
    # Past the TensorRT check (as on a GPU machine): the --out check comes before anything else.
    monkeypatch.setattr(trt_build, "tensorrt_status", lambda: None)
    with pytest.raises(exporter.ExportError, match="is the source checkpoint"):
        export(project / "ckpt", project / "ckpt", trt_build.TensorRTTarget(), overwrite=True, log=lambda m: None)
    assert folder_state(project) == before


def test_overwrite_replaces_a_previous_export_of_any_format(project, onnx_export, copied_graph):
    out = shutil.copytree(onnx_export, project / "out")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    write_manifest(out, {**manifest, "format": 1})  # made by an older dewey
    (out / "stale.txt").write_text("from the previous export\n")
    result = export(project / "ckpt", out, OnnxTarget(), verify=False, overwrite=True, log=lambda m: None)
    assert not (out / "stale.txt").exists() and read_manifest(out).source["path"] == str(project / "ckpt")
    assert result.manifest.files == file_table(out)
    assert (project / "notes.txt").is_file() and not leftovers(project)


def test_engine_folder_lists_the_engine_files_and_load_checks_them(checkpoint, tmp_path, monkeypatch, copied_graph):
    """build_engine_folder's staging and manifest, with a stand-in for TensorRT and the GPU (none here)."""
    import types

    from runtimes.trt_plan import ENGINE_FILE, METADATA_FILE, EngineMetadata

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.15.1.29"))
    monkeypatch.setattr(trt_build, "tensorrt_status", lambda: None)
    monkeypatch.setattr(trt_build, "gpu_identity", lambda: ("Stand-in GPU", "9.0"))
    monkeypatch.setattr(trt_build, "_serialize_engine", lambda *args: b"serialized engine")
    settings = trt_build.TensorRTTarget(precision="fp16", buckets="512x8")
    result = export(checkpoint, tmp_path / "engine", settings, verify=False, log=lambda m: None)
    out = result.folder
    manifest = check_export_files(out)
    assert {ENGINE_FILE, METADATA_FILE, ONNX_FILE} <= set(manifest.files) and manifest.files == file_table(out)
    assert manifest.precision == EngineMetadata.read(out).precision == "fp16"  # strongly typed: the fp16 graph
    assert result.manifest.reports == manifest.reports and manifest.reports["tensorrt_parity"]["skipped"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    (out / ENGINE_FILE).write_bytes(b"serialized enginf")
    with pytest.raises(ExportFilesChanged, match="model.plan: sha256 differs"):
        runtimes.load(out, backend="trt")


# --- 5. bad input: one line, exit 2 ---------------------------------------------------------------


def test_unwritable_out_exits_2_with_one_line(project):
    """Under a path whose parent is a regular file: refused even for root."""
    out = project / "notes.txt" / "export"
    result = CliRunner().invoke(main, ["onnx", "--model", str(project / "ckpt"), "--out", str(out)])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "notes.txt is a file" in one_line_error(result.output)


def test_permission_error_while_writing_exits_2_with_one_line(project, monkeypatch):
    """No folder can be made in P (as if it were read-only; chmod does not stop root)."""
    mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if self == project or project in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    result = CliRunner().invoke(main, ["onnx", "--model", str(project / "ckpt"), "--out",
                                       str(project / "out")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Permission denied" in one_line_error(result.output)


MALFORMED = {
    "bytes missing": (lambda m: m["files"][ONNX_FILE].pop("bytes"), "files['model.onnx'].bytes"),
    "bytes a string": (lambda m: m["files"][ONNX_FILE].update(bytes=str(m["files"][ONNX_FILE]["bytes"])),
                       "files['model.onnx'].bytes must be a non-negative integer"),
    "sha256 not hex": (lambda m: m["files"][ONNX_FILE].update(sha256="abc"), "files['model.onnx'].sha256"),
    "files a list": (lambda m: m.update(files=[]), "files must be an object"),
    "file outside": (lambda m: m["files"].update({"../ckpt/config.json": m["files"][CONFIG_FILE]}),
                     "files['../ckpt/config.json']"),
    "onnx null": (lambda m: m.update(onnx=None), "onnx must be an object"),
    "parity a list": (lambda m: m.update(parity=[]), "parity must be an object"),
    "precision a number": (lambda m: m.update(precision=16), "precision must be one of"),
    "source path missing": (lambda m: m["source"].pop("path"), "source.path"),
    "format 1": (lambda m: m.update(format=1), "made by an older dewey"),
    "format unknown": (lambda m: m.update(format="2"), "unknown manifest format '2'"),
    "not an object": (lambda m: None, "must hold a JSON object"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_manifest_names_the_file_and_the_key(onnx_export, tmp_path, case):
    folder = Path(shutil.copytree(onnx_export, tmp_path / "export"))
    change, needle = MALFORMED[case]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    change(manifest)
    write_manifest(folder, manifest if case != "not an object" else [manifest])
    with pytest.raises(runtimes.ModelFileError) as caught:
        runtimes.load(folder, backend="onnx")
    assert str(folder / MANIFEST_FILE) in str(caught.value) and needle in str(caught.value)
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert needle in one_line_error(result.output)


# --- 3, 4. every file checked at load and by verify -----------------------------------------------


@pytest.fixture(scope="module")
def sibling_export(tmp_path_factory):
    """Another checkpoint's export (other weights, same tokenizer and shapes), weights in model.onnx.data."""
    from runtimes.testing import make_test_checkpoint

    root = tmp_path_factory.mktemp("sibling")
    other = make_test_checkpoint(root / "ckpt", seed=7)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
        return export(other, root / "export", OnnxTarget(), verify=False, log=lambda m: None).folder


def rewrite_weight(folder: Path, choose, change) -> str:
    """Change one float32 initializer where it is stored, keeping every file's size; returns that file."""
    model = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
    weight = choose([w for w in model.graph.initializer if w.data_type == onnx.TensorProto.FLOAT])
    if weight.data_location == onnx.TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in weight.external_data}
        path, offset, length = folder / info["location"], int(info.get("offset", 0)), int(info["length"])
    else:
        path = folder / ONNX_FILE
        offset, length = path.read_bytes().index(weight.raw_data), len(weight.raw_data)
    blob = bytearray(path.read_bytes())
    array = np.frombuffer(bytes(blob[offset:offset + length]), dtype=np.float32).reshape(weight.dims).copy()
    change(array)
    blob[offset:offset + length] = array.tobytes()
    size = path.stat().st_size
    path.write_bytes(bytes(blob))
    assert path.stat().st_size == size
    return path.name


def largest(weights):
    return max(weights, key=lambda w: int(np.prod(w.dims)))


def scale_weight(folder, sibling):
    return [rewrite_weight(folder, largest, lambda a: a.__imul__(1.05))]


def nan_embedding_row(folder, sibling):
    cls = load_config(folder).cls_token_id
    return [rewrite_weight(folder, largest, lambda a: a.__setitem__(cls, np.nan))]  # the embedding table


def sibling_graph(folder, sibling):
    for name in (ONNX_FILE, ONNX_FILE + ".data"):
        shutil.copyfile(sibling / name, folder / name)
    return [ONNX_FILE]  # model.onnx.data is not in this folder's table and not read by its graph


def external_weights(folder, sibling):
    shutil.rmtree(folder)
    shutil.copytree(sibling, folder)
    return [rewrite_weight(folder, lambda weights: weights[len(weights) // 2], lambda a: a.__iadd__(1e-3))]


def json_value(name, old, new):
    def corrupt(folder, sibling):
        path = folder / name
        text = path.read_text()
        assert old in text and len(old) == len(new)
        path.write_text(text.replace(old, new, 1))
        return [name]
    return corrupt


def delete_file(folder, sibling):
    (folder / TOKENIZER_FILE).unlink()
    return [TOKENIZER_FILE]


CORRUPTIONS = {
    "model.onnx: one weight x1.05, same size": scale_weight,
    "model.onnx: embedding row of [CLS] set to NaN": nan_embedding_row,
    "model.onnx (+ .data) of a sibling export copied in": sibling_graph,
    "model.onnx.data: one weight changed": external_weights,
    "config.json: cls_token_id 1 -> 4": json_value(CONFIG_FILE, '"cls_token_id": 1,', '"cls_token_id": 4,'),
    "config.json: sep_token_id 2 -> 3": json_value(CONFIG_FILE, '"sep_token_id": 2,', '"sep_token_id": 3,'),
    "tokenizer.json: a token renamed": json_value(TOKENIZER_FILE, '"[MASK]"', '"[MASX]"'),
    "tokenizer_config.json: max length": json_value("tokenizer_config.json", '"model_max_length": 8192',
                                                    '"model_max_length": 9192'),
    "tokenizer.json deleted": delete_file,
}


def test_every_corrupted_file_is_caught_by_load_and_by_verify(onnx_export, sibling_export, tmp_path):
    caught = []
    for index, (case, corrupt) in enumerate(CORRUPTIONS.items()):
        folder = Path(shutil.copytree(onnx_export, tmp_path / str(index)))
        names = corrupt(folder, sibling_export)
        try:
            runtimes.load(folder, backend="onnx")
            loaded = None
        except runtimes.ModelFileError as exc:
            loaded = str(exc)
        result = CliRunner().invoke(main, ["verify", str(folder)])
        if (loaded and all(name in loaded for name in names) and result.exit_code == EXIT_VERIFY_FAILED
                and all(name in result.output for name in names)):
            caught.append(case)
    missed = [case for case in CORRUPTIONS if case not in caught]
    assert not missed, f"{len(CORRUPTIONS)} files corrupted, {len(caught)} caught; missed: {missed}"


def test_verify_fails_non_finite_outputs_even_with_a_matching_table(onnx_export, checkpoint, tmp_path):
    """A graph that was already NaN at export (its table records it as it is): parity, not a note."""
    folder = Path(shutil.copytree(onnx_export, tmp_path / "nan"))
    nan_embedding_row(folder, None)
    manifest = read_manifest(folder)
    write_manifest(folder, {**manifest.to_dict(), "files": file_table(folder)})
    result = CliRunner().invoke(main, ["verify", str(folder), "--model", str(checkpoint)])
    assert result.exit_code == EXIT_VERIFY_FAILED, result.output
    assert "finite=False" in result.output


def test_verify_files_false_checks_sizes_only(onnx_export, tmp_path):
    folder = Path(shutil.copytree(onnx_export, tmp_path / "hot"))
    scale_weight(folder, None)
    assert runtimes.load(folder, backend="onnx", verify_files=False).encode(TEXTS).shape == (2, 48)
    with open(folder / TOKENIZER_FILE, "a") as handle:
        handle.write(" ")
    with pytest.raises(ExportFilesChanged, match="tokenizer.json has"):
        runtimes.load(folder, backend="onnx", verify_files=False)
    with pytest.raises(TypeError, match="verify_files"):
        runtimes.load(folder, backend="onnx", verify_files="no")


# --- 2, 6. killed exports ---------------------------------------------------------------------------

# Runs dewey-export in a child process that dies at a given point: "stderr" (the parent kills it when a
# line appears), "before-publish" (the staged export is complete) or "between-renames" (the previous
# export moved aside, the new one not yet in place). argv: point, graph to copy instead of tracing
# ('' traces), then dewey-export's arguments.
CHILD = """
import os, shutil, signal, sys
from pathlib import Path
import runtimes.files
from dewey_export import onnx_export
from dewey_export.cli import main

point, graph, args = sys.argv[1], sys.argv[2], sys.argv[3:]
out = Path(args[args.index("--out") + 1]).resolve()
if graph:
    onnx_export._trace = lambda model, onnx_path, *a, **k: shutil.copyfile(graph, onnx_path)

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

if point == "before-publish":
    runtimes.files.publish_folder = die
elif point == "between-renames":
    rename = Path.rename
    def rename_or_die(self, target):
        if Path(target) == out and self.name.endswith(".tmp"):
            die()
        return rename(self, target)
    Path.rename = rename_or_die
sys.argv = ["dewey-export", *args]
main()
"""

KILL_POINTS = {
    # name: (point, trigger line on stderr, signal sent, trace for real, verify)
    "writing the ONNX graph": ("stderr", "Exporting to ONNX", signal.SIGKILL, True, False),
    "verifying (SIGTERM)": ("stderr", "parity case", signal.SIGTERM, False, True),
    "before publishing": ("before-publish", None, None, False, False),
    "between the two renames of publishing": ("between-renames", None, None, False, False),
}


def kill_export(checkpoint: Path, out: Path, graph: Path, point, trigger, sig, trace, verify) -> None:
    args = ["onnx", "--model", str(checkpoint), "--out", str(out), "--overwrite"]
    args += [] if verify else ["--no-verify"]
    child = subprocess.Popen([sys.executable, "-c", CHILD, point, "" if trace else str(graph), *args],
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in child.stderr:
            seen.append(line)
            if trigger and trigger in line:
                child.send_signal(sig)
                break
        child.wait(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -(sig or signal.SIGKILL), "".join(seen)


@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_killed_export_keeps_the_previous_one_and_the_next_cleans_up(checkpoint, onnx_export, tmp_path,
                                                                      copied_graph, kill_point):
    out = Path(shutil.copytree(onnx_export, tmp_path / "out"))
    expected = runtimes.load(out, backend="onnx").encode(TEXTS)
    before = folder_state(out)

    kill_export(checkpoint, out, onnx_export / ONNX_FILE, *KILL_POINTS[kill_point])

    left = leftovers(tmp_path, out.name)
    assert left, f"nothing left behind by an export killed {kill_point}?"
    if out.exists():
        assert folder_state(out) == before
        np.testing.assert_array_equal(runtimes.load(out, backend="onnx").encode(TEXTS), expected)
    else:  # killed between the renames: the previous export is the .old leftover
        assert any(path.name.endswith(".old") and folder_state(path) == before for path in left)
        with pytest.raises(runtimes.ModelFileError):
            runtimes.load(out, backend="onnx")

    messages = []
    export(checkpoint, out, OnnxTarget(), verify=False, overwrite=True, log=messages.append)
    assert not leftovers(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert any(str(path) in message for path in left for message in messages), messages
    np.testing.assert_array_equal(runtimes.load(out, backend="onnx").encode(TEXTS), expected)
