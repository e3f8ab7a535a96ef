"""Parity suite: the same inputs through every backend available here, compared with PyTorch fp32.

Each candidate backend is listed with a probe that says whether it can run on this machine; one that
cannot is skipped with the probe's reason, never passed silently. Vectors are compared un-normalised:
max abs diff <= 1e-4 and cosine >= 0.99999 for fp32 candidates, cosine >= 0.999 and the same retrieval
top-1 for fp16/bf16 ones (dewey_export.verify holds the numbers and why).
"""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from dewey_export.verify import parity_thresholds


def _onnx_provider_probe(provider: str):
    def probe():
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed (pip install 'dewey[onnx]')"
        if provider not in ort.get_available_providers():
            return f"{provider} is not available in this onnxruntime ({ort.get_available_providers()})"
        return None

    return probe


def _cuda_probe():
    import torch

    return None if torch.cuda.is_available() else "torch sees no CUDA device"


def _tensorrt_probe():
    from dewey_export.trt_build import tensorrt_status

    return tensorrt_status()


def _build_tensorrt(checkpoint, tmp_path_factory, precision: str):
    from dewey_export.pipeline import export
    from dewey_export.trt_build import TensorRTTarget

    folder = tmp_path_factory.mktemp("trt") / f"engine-{precision}"
    # Small buckets: enough for the parity texts (a few thousand tokens), quick to build.
    settings = TensorRTTarget(precision=precision, buckets="512x8,8192x2")
    # Not verified by the builder: this suite is the comparison.
    result = export(checkpoint, folder, settings, verify=False, log=lambda m: None)
    return runtimes.load(result.folder, backend="trt")


def _fp16_export(checkpoint, tmp_path_factory):
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    folder = tmp_path_factory.mktemp("fp16") / "onnx-fp16"
    return runtimes.load(export(checkpoint, folder, OnnxTarget(precision="fp16"), log=lambda m: None).folder, backend="onnx")


# name -> (probe returning a skip reason or None, loader(checkpoint, request), precision of its vectors)
CANDIDATES = {
    "onnx-cpu": (_onnx_provider_probe("CPUExecutionProvider"),
                 lambda ckpt, req: runtimes.load(req.getfixturevalue("onnx_export"), backend="onnx"), "fp32"),
    "onnx-cpu-fp16": (_onnx_provider_probe("CPUExecutionProvider"),
                      lambda ckpt, req: _fp16_export(ckpt, req.getfixturevalue("tmp_path_factory")), "fp16"),
    "onnx-cuda": (_onnx_provider_probe("CUDAExecutionProvider"),
                  lambda ckpt, req: runtimes.load(req.getfixturevalue("onnx_export"), backend="onnx", device="cuda"),
                  "fp32"),
    "torch-cuda": (_cuda_probe, lambda ckpt, req: runtimes.load(ckpt, backend="torch", device="cuda"), "fp32"),
    "tensorrt-fp32": (_tensorrt_probe,
                      lambda ckpt, req: _build_tensorrt(ckpt, req.getfixturevalue("tmp_path_factory"), "fp32"),
                      "fp32"),
    "tensorrt-fp16": (_tensorrt_probe,
                      lambda ckpt, req: _build_tensorrt(ckpt, req.getfixturevalue("tmp_path_factory"), "fp16"),
                      "fp16"),
}


@pytest.fixture(scope="module", params=sorted(CANDIDATES))
def candidate(request, checkpoint):
    probe, loader, precision = CANDIDATES[request.param]
    reason = probe()
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    encoder = loader(checkpoint, request)
    encoder.precision = precision
    return encoder


def prefix_with_tokens(encoder, text: str, n_tokens: int) -> str:
    """The prefix of ``text`` that holds its first ``n_tokens`` tokens."""
    offsets = encoder.tokenizer.encode_texts([text])[0].offsets
    return text[: int(offsets[n_tokens - 1, 1])]


@pytest.fixture(scope="module")
def parity_texts(encoder, long_text):
    """Lengths around the test model's sliding window (16 tokens: 8 each side), unicode, one long text."""
    window = 16
    texts = {f"tokens_{n}": prefix_with_tokens(encoder, long_text, n) for n in (1, window - 1, window, window + 1, 300)}
    texts["unicode_emoji"] = "Grüße aus Köln 🙂🚀 — 日本語のテキスト, naïve café. " * 4
    from pydoc_data.topics import topics

    texts["several_thousand_tokens"] = topics["specialnames"][:12000]  # about 4,000 tokens
    return texts


def assert_close(reference: np.ndarray, candidate, values: np.ndarray, what: str):
    """fp32 candidates: max abs diff and cosine limits; fp16/bf16 ones: cosine only (verify.py)."""
    limits = parity_thresholds(candidate.precision)
    assert reference.shape == values.shape, what
    diff = float(np.abs(reference - values).max())
    ref, cand = reference.reshape(-1, reference.shape[-1]), values.reshape(-1, values.shape[-1])
    cos = (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1))
    if limits["max_abs_diff"] is not None:
        assert diff <= limits["max_abs_diff"], f"{what}: max abs diff {diff:.3g} > {limits['max_abs_diff']}"
    assert cos.min() >= limits["min_cosine"], f"{what}: min cosine {cos.min():.8f} < {limits['min_cosine']}"


@pytest.mark.parametrize("mode", ["cls", "mean", "cls_add_mean"])
@pytest.mark.parametrize("prompt", [None, "query", "passage", "Represent this text: "])
def test_single_vectors_match_torch(encoder, candidate, parity_texts, mode, prompt):
    texts = list(parity_texts.values())
    normalize = mode == "cls_add_mean"  # its definition normalises; the others are compared raw
    reference = encoder.encode(texts, mode=mode, prompt=prompt, normalize=normalize)
    assert_close(reference, candidate, candidate.encode(texts, mode=mode, prompt=prompt, normalize=normalize),
                 f"{mode}/{prompt}")


def test_each_text_alone_matches_the_padded_batch(candidate, parity_texts):
    """Padding in the candidate's forward changes nothing: alone == inside a length-mixed batch."""
    texts = list(parity_texts.values())
    batch = candidate.encode(texts, mode="mean", normalize=False)
    alone = np.stack([candidate.encode(t, mode="mean", normalize=False) for t in texts])
    assert_close(alone, candidate, batch, "alone vs batch")


@pytest.mark.parametrize("splitter", ["tokens", "recursive"])
def test_chunk_vectors_match_torch(encoder, candidate, parity_texts, splitter):
    texts = [parity_texts["tokens_300"], parity_texts["unicode_emoji"], parity_texts["several_thousand_tokens"]]
    kwargs = dict(chunk_size=48, chunk_overlap=12, splitter=splitter, prompt="passage", normalize=False)
    for ref, cand in zip(encoder.encode_chunks(texts, **kwargs), candidate.encode_chunks(texts, **kwargs)):
        assert ref.token_spans == cand.token_spans and ref.char_spans == cand.char_spans
        assert_close(ref.vectors, candidate, cand.vectors, f"chunks/{splitter}")


def test_retrieval_top1_matches_torch(encoder, candidate):
    """Reduced precision may move vectors a little, never the answer: each query's best passage is the
    same as with PyTorch fp32."""
    from pydoc_data.topics import topics

    passages = [topics[key][:1500] for key in sorted(topics)[:40]]
    queries = [p.split(".")[0][:200] for p in passages]
    ref = encoder.encode(queries, prompt="query") @ encoder.encode(passages, prompt="passage").T
    got = candidate.encode(queries, prompt="query") @ candidate.encode(passages, prompt="passage").T
    assert (ref.argmax(1) == got.argmax(1)).all()
