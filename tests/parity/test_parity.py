"""Parity suite: the same inputs through every backend available here, compared with PyTorch fp32.

Each candidate backend is listed with a probe that says whether it can run on this machine; one that
cannot is skipped with the probe's reason, never passed silently. Vectors are compared un-normalised:
max abs diff <= 1e-4 and cosine >= 0.99999 (fp32; dewey_export.verify holds the numbers and why).
"""

from __future__ import annotations

import numpy as np
import pytest

import runtimes
from dewey_export.verify import FP32_MAX_ABS_DIFF, FP32_MIN_COSINE


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
    return "runtimes has no TensorRT backend yet (the TensorRT issue adds it)"


# name -> (probe returning a skip reason or None, how to load it from (checkpoint, onnx export folder))
CANDIDATES = {
    "onnx-cpu": (_onnx_provider_probe("CPUExecutionProvider"),
                 lambda ckpt, export: runtimes.load(export, backend="onnx", device="cpu")),
    "onnx-cuda": (_onnx_provider_probe("CUDAExecutionProvider"),
                  lambda ckpt, export: runtimes.load(export, backend="onnx", device="cuda")),
    "torch-cuda": (_cuda_probe, lambda ckpt, export: runtimes.load(ckpt, backend="torch", device="cuda")),
    "tensorrt": (_tensorrt_probe, None),
}


@pytest.fixture(scope="module", params=sorted(CANDIDATES))
def candidate(request, checkpoint):
    probe, loader = CANDIDATES[request.param]
    reason = probe()
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    export = request.getfixturevalue("onnx_export") if request.param.startswith("onnx") else None
    return loader(checkpoint, export)


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


def assert_close(reference: np.ndarray, candidate: np.ndarray, what: str):
    assert reference.shape == candidate.shape, what
    diff = float(np.abs(reference - candidate).max())
    ref, cand = reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
    cos = (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1))
    assert diff <= FP32_MAX_ABS_DIFF, f"{what}: max abs diff {diff:.3g} > {FP32_MAX_ABS_DIFF}"
    assert cos.min() >= FP32_MIN_COSINE, f"{what}: min cosine {cos.min():.8f} < {FP32_MIN_COSINE}"


@pytest.mark.parametrize("mode", ["cls", "mean", "cls_add_mean"])
@pytest.mark.parametrize("prompt", [None, "query", "passage", "Represent this text: "])
def test_single_vectors_match_torch(encoder, candidate, parity_texts, mode, prompt):
    texts = list(parity_texts.values())
    normalize = mode == "cls_add_mean"  # its definition normalises; the others are compared raw
    reference = encoder.encode(texts, mode=mode, prompt=prompt, normalize=normalize)
    assert_close(reference, candidate.encode(texts, mode=mode, prompt=prompt, normalize=normalize),
                 f"{mode}/{prompt}")


def test_each_text_alone_matches_the_padded_batch(candidate, parity_texts):
    """Padding in the candidate's forward changes nothing: alone == inside a length-mixed batch."""
    texts = list(parity_texts.values())
    batch = candidate.encode(texts, mode="mean", normalize=False)
    alone = np.stack([candidate.encode(t, mode="mean", normalize=False) for t in texts])
    assert_close(alone, batch, "alone vs batch")


@pytest.mark.parametrize("splitter", ["tokens", "recursive"])
def test_chunk_vectors_match_torch(encoder, candidate, parity_texts, splitter):
    texts = [parity_texts["tokens_300"], parity_texts["unicode_emoji"], parity_texts["several_thousand_tokens"]]
    kwargs = dict(chunk_size=48, chunk_overlap=12, splitter=splitter, prompt="passage", normalize=False)
    for ref, cand in zip(encoder.encode_chunks(texts, **kwargs), candidate.encode_chunks(texts, **kwargs)):
        assert ref.token_spans == cand.token_spans and ref.char_spans == cand.char_spans
        assert_close(ref.vectors, cand.vectors, f"chunks/{splitter}")
