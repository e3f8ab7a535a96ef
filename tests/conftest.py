"""Shared fixtures: one tiny random Dewey checkpoint per test session, and an Encoder on it."""

from __future__ import annotations

import pytest

# Tolerance for fp32 results that must be equal up to float rounding (padding invariance,
# pooling against a naive reference): the bound for padded batches.
FP32_ATOL = 1e-5


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Tiny checkpoint: hidden 32, 3 layers (1 global, 2 sliding with a 16-token window), head 32 -> 48."""
    from runtimes.testing import make_test_checkpoint

    return make_test_checkpoint(tmp_path_factory.mktemp("tiny-dewey"), seed=0)


@pytest.fixture(scope="session")
def encoder(checkpoint):
    from runtimes import load

    return load(checkpoint, backend="torch")


@pytest.fixture(scope="session")
def long_text():
    """Real English text of a few thousand tokens (the stdlib's own docs), with unicode added."""
    from pydoc_data.topics import topics

    return topics["specialnames"][:6000] + " Grüße 🙂 日本語."


@pytest.fixture(scope="session")
def onnx_export(checkpoint, tmp_path_factory):
    """The tiny checkpoint exported to ONNX (opset 18), verified against PyTorch at export time."""
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    result = export(checkpoint, tmp_path_factory.mktemp("export") / "tiny-onnx", OnnxTarget(), log=lambda message: None)
    return result.folder
