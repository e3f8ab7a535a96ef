"""Hub ids resolved offline from a huggingface_hub cache folder that the test builds itself (no network):
models--org--name/{refs/main, snapshots/<commit>/..., blobs/<sha256>}, HF_HOME and HF_HUB_OFFLINE set."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtimes
from runtimes.config import ModelFileError
from runtimes.hub import hub_cache_dir, parse_hub_id

from test_models_release import assert_never_opened, opened_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def add_to_cache(hub: Path, repo_id: str, folder: Path, commit: str, ref: str | None = "main") -> Path:
    """Store ``folder``'s files as huggingface_hub does: content in blobs/<sha256>, the snapshot as
    relative symlinks to them, and refs/<ref> naming the commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, checkpoint, monkeypatch):
    """HF_HOME with org/tiny-dewey at COMMIT (main) and OLD_COMMIT (no ref); the snapshot also holds a
    .py file and pickled weights, as Hub repositories may, which must never be opened."""
    home = tmp_path / "hf-home"
    source = Path(shutil.copytree(checkpoint, tmp_path / "repo"))
    (source / "modeling_custom.py").write_text("raise SystemExit('model code ran')\n")
    (source / "pytorch_model.bin").write_bytes(b"pickled bytes")
    add_to_cache(home / "hub", "org/tiny-dewey", source, COMMIT)
    add_to_cache(home / "hub", "org/tiny-dewey", source, OLD_COMMIT, ref=None)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_ids_parse():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    assert parse_hub_id("just-a-name") is None and parse_hub_id("a/b/c") is None


def test_load_resolves_a_hub_id_offline_from_the_cache(hub_cache, checkpoint):
    assert hub_cache_dir() == hub_cache / "hub"
    with opened_files() as opened:
        encoder = runtimes.load("org/tiny-dewey")
    snapshot = hub_cache / "hub" / "models--org--tiny-dewey" / "snapshots" / COMMIT
    assert encoder.source.folder == snapshot
    assert encoder.source.hub == {"id": "org/tiny-dewey", "revision": "main", "commit": COMMIT}
    assert_never_opened(opened, snapshot)
    forbidden = {(snapshot / name).resolve() for name in ("modeling_custom.py", "pytorch_model.bin")}
    assert not forbidden & {Path(p).resolve() for p in opened}, "a .py or .bin blob was opened"
    expected = runtimes.load(checkpoint).encode(["from the hub", "offline"])
    np.testing.assert_array_equal(encoder.encode(["from the hub", "offline"]), expected)
    pinned = runtimes.load(f"org/tiny-dewey@{OLD_COMMIT}")
    assert pinned.source.hub["commit"] == OLD_COMMIT


def test_offline_with_nothing_cached_is_one_line(hub_cache):
    for missing in ("org/not-cached", "org/tiny-dewey@v2"):
        with pytest.raises(ModelFileError) as caught:
            runtimes.load(missing)
        message = str(caught.value)
        assert "\n" not in message and "HF_HUB_OFFLINE is set" in message and "nothing is cached" in message


def test_export_records_the_resolved_commit(hub_cache, tmp_path):
    pytest.importorskip("onnxruntime")
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    result = export("org/tiny-dewey", tmp_path / "onnx", OnnxTarget(), verify=False, log=lambda message: None)
    source = result.manifest.source
    assert source["model"]["hub"] == {"id": "org/tiny-dewey", "revision": "main", "commit": COMMIT}
    assert set(source["sha256"]) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert runtimes.load(result.folder, backend="onnx").encode("text").shape == (48,)


def test_hf_hub_cache_wins_over_hf_home(hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub_cache_dir() == tmp_path / "elsewhere"
    with pytest.raises(ModelFileError, match="nothing is cached"):
        runtimes.load("org/tiny-dewey")


def test_hub_ids_and_model_sources_resolve_without_torch(hub_cache):
    """The ONNX Runtime path stays torch-free: resolving a Hub id and describing the model read headers
    and JSON only."""
    from test_no_torch import run_without_torch

    result = run_without_torch(
        """
        from runtimes.model_source import resolve_model
        source = resolve_model("org/tiny-dewey")
        print(source.hub["commit"], source.config.vector_size, source.head[0].weight)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [COMMIT, "48", "dewey_head.weight"]
