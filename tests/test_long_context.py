"""Linear-memory attention: exact against dense masked attention, and no S x S value in the graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtimes
from runtimes.attention import GLOBAL_KERNELS, dewey_attention, global_attention, sliding_window_attention
from runtimes.backends.torch_backend import TorchBackend
from runtimes.batching import plan_batches
from runtimes.modeling import DeweyModel

# Exact up to float rounding: this formulation measured 1.2e-6 against masked SDPA.
ATTENTION_ATOL = 1e-5
# Whole-model tolerance against the dense reference: rounding accumulates over layers.
MODEL_ATOL = 1e-4


def dense_reference(query, key, value, key_valid, window, scaling):
    """Masked attention over every (query, key) pair; window=None for global layers. [B, S, H, D]."""
    seq = query.shape[2]
    allowed = key_valid[:, None, None, :].expand(-1, 1, seq, seq)
    if window is not None:
        pos = torch.arange(seq)
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= window)
    scores = (query @ key.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ value).transpose(1, 2)


def random_qkv(batch, heads, seq, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq, dim, generator=generator) for _ in range(3)]


@pytest.mark.parametrize("seq", [1, 5, 7, 8, 9, 16, 50, 64, 129, 300])
@pytest.mark.parametrize("window", [8, 64])
def test_sliding_attention_equals_masked_dense(seq, window):
    """Below, at and above the window, lengths that are not multiples of the block, with padding."""
    query, key, value = random_qkv(3, 2, seq, 16, seed=seq)
    valid = torch.ones(3, seq, dtype=torch.bool)
    valid[1, max(1, seq * 2 // 3):] = False  # padded row
    valid[2, 1:] = seq == 1  # a row with a single real token
    ours = sliding_window_attention(query, key, value, valid, window, 0.25)
    reference = dense_reference(query, key, value, valid, window, 0.25)
    real = valid[:, :, None, None].expand_as(ours)  # padded query rows are never read
    assert torch.isfinite(ours).all()
    assert float((ours - reference).abs()[real].max()) <= ATTENTION_ATOL


def test_sliding_attention_window_is_inclusive():
    """|i - j| <= window, not < window: a one-off band would differ from ModernBERT by far more."""
    query, key, value = random_qkv(1, 2, 50, 16)
    valid = torch.ones(1, 50, dtype=torch.bool)
    ours = sliding_window_attention(query, key, value, valid, 8, 0.25)
    assert float((ours - dense_reference(query, key, value, valid, 7, 0.25)).abs().max()) > 0.01
    assert float((ours - dense_reference(query, key, value, valid, 8, 0.25)).abs().max()) <= ATTENTION_ATOL


def test_sliding_attention_gives_zeros_not_nan_far_inside_padding():
    query, key, value = random_qkv(1, 2, 100, 16)
    valid = torch.zeros(1, 100, dtype=torch.bool)
    valid[0, :5] = True
    out = sliding_window_attention(query, key, value, valid, 8, 0.25)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[0, 20:]) == 0


@pytest.mark.parametrize("seq", [1, 7, 129, 1000])
def test_global_attention_folds_key_padding_exactly(seq):
    query, key, value = random_qkv(2, 3, seq, 16, seed=seq)
    valid = torch.ones(2, seq, dtype=torch.bool)
    valid[1, max(1, seq // 2):] = False
    # Make padded keys attractive: if the padding trick leaked, they would dominate the softmax.
    key[1, :, max(1, seq // 2):] = query[1, :, :1] * 10
    reference = dense_reference(query, key, value, valid, None, 0.25)
    for kernel in GLOBAL_KERNELS:
        ours = global_attention(query, key, value, valid, 0.25, kernel)
        assert float((ours - reference).abs().max()) <= ATTENTION_ATOL, kernel


def test_attention_function_refuses_a_dense_mask():
    query, key, value = random_qkv(1, 2, 10, 8)
    with pytest.raises(ValueError, match="key mask"):
        dewey_attention(None, query, key, value, torch.ones(1, 1, 10, 10, dtype=torch.bool), sliding_window=9)


@pytest.fixture(scope="module")
def dense_encoder(checkpoint, encoder):
    """The same checkpoint on transformers' own masked sdpa attention: the reference."""
    model = DeweyModel.from_pretrained(checkpoint, attention="dense")
    return runtimes.Encoder(encoder.config, encoder.tokenizer, TorchBackend(model))


@pytest.fixture(scope="module")
def long_document():
    from pydoc_data.topics import topics

    return topics["specialnames"][:15000]  # about 5,000 tokens of the test tokenizer


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_long_document_chunks_equal_the_dense_reference(request, backend, dense_encoder, encoder, long_document):
    """Chunk mode on several thousand tokens, both backends, against the dense masked model."""
    candidate = encoder if backend == "torch" else runtimes.load(request.getfixturevalue("onnx_export"), backend="onnx")
    kwargs = dict(chunk_size=256, chunk_overlap=64, prompt="passage", normalize=False)
    reference = dense_encoder.encode_chunks(long_document, **kwargs)
    ours = candidate.encode_chunks(long_document, **kwargs)
    assert reference.token_spans[-1][1] > 4000
    assert ours.token_spans == reference.token_spans
    assert np.abs(ours.vectors - reference.vectors).max() <= MODEL_ATOL
    for mode in ("cls", "mean"):
        a = candidate.encode(long_document, mode=mode, normalize=False)
        b = dense_encoder.encode(long_document, mode=mode, normalize=False)
        assert np.abs(a - b).max() <= MODEL_ATOL


def test_padded_batch_with_a_long_row_is_finite_and_padding_invariant(encoder, long_document):
    """A 4-token text padded to a ~5k-token neighbour: thousands of padding rows, no NaN, same vector."""
    short = "tiny text"
    together = encoder.encode([long_document, short], mode="mean", normalize=False, max_batch_tokens=20000)
    alone = encoder.encode(short, mode="mean", normalize=False)
    assert np.isfinite(together).all()
    assert np.abs(together[1] - alone).max() <= 1e-5


def graph_values_with_two_sequence_dims(path) -> list[str]:
    """Names of graph values (after shape inference) with two dimensions that grow with the sequence.

    Dimensions are symbolic expressions of ``sequence``; one counts as growing when it takes different
    values at two lengths (so ``(32*Min(sequence, 8*((sequence + 7)//8)))//sequence``, which is 32, does
    not)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))

    def grows(expr: str) -> bool:
        if "sequence" not in expr:
            return False
        values = {eval(expr, {"Min": min, "Max": max, "sequence": n, "batch": 2, "chunks": 3})  # noqa: S307
                  for n in (1000, 1729)}
        return len(values) > 1

    bad = []
    for value in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
        if sum(grows(d) for d in dims if d) >= 2:
            bad.append(f"{value.name}{dims}")
    return bad


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_exported_graph_has_no_sequence_by_sequence_value(checkpoint, tmp_path, target):
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    folder = export(checkpoint, tmp_path / target, OnnxTarget(form=target), verify=False, log=lambda m: None).folder
    assert graph_values_with_two_sequence_dims(folder / "model.onnx") == []


def test_the_graph_check_catches_dense_masks(checkpoint, tmp_path):
    """Guard for the guard: the plain dense export does hold S x S values, and the check finds them."""
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    folder = export(checkpoint, tmp_path / "dense", OnnxTarget(attention="dense"), verify=False, log=lambda m: None).folder
    assert graph_values_with_two_sequence_dims(folder / "model.onnx")


def test_target_graphs_use_the_intended_global_attention(onnx_export, checkpoint, tmp_path):
    import onnx

    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    cpu_ops = {(n.op_type, n.domain) for n in onnx.load(str(onnx_export / "model.onnx")).graph.node}
    assert ("MultiHeadAttention", "com.microsoft") in cpu_ops
    gpu = export(checkpoint, tmp_path / "gpu", OnnxTarget(form="gpu"), verify=False, log=lambda m: None).folder
    gpu_ops = {(n.op_type, n.domain) for n in onnx.load(str(gpu / "model.onnx")).graph.node}
    assert ("Attention", "") in gpu_ops
    assert not [op for op in gpu_ops if op[1] == "com.microsoft"], "contrib ops in a graph meant for TensorRT"


def test_long_rows_are_never_padded():
    """Rows over the threshold batch only with equal-length rows; short rows pack by the budget."""
    lengths = [5000, 5000, 3000, 100, 90, 5000, 2500]
    batches = plan_batches(lengths, batch_size=8, max_batch_tokens=20000, long_threshold=2048)
    for batch in batches:
        widths = {lengths[i] for i in batch}
        if max(widths) > 2048:
            assert len(widths) == 1, batch
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [0, 1, 5] in batches and [3, 4] in batches


def test_length_policy_masked_form_equals_the_linear_form(checkpoint):
    """Short rows take one masked SDPA call in the PyTorch backend (runtimes.attention's length policy);
    the result equals the block-local / mask-free form, padding rows far from any token included."""
    from runtimes.attention import SHORT_MASKED_MAX, masked_attention_for, set_length_policy

    model = DeweyModel.from_pretrained(checkpoint).eval()  # local_attention 16: window 8
    torch.manual_seed(0)
    seq = 120
    ids = torch.randint(5, model.config.vocab_size, (3, seq))
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, 40:] = 0  # padding reaching far beyond the window
    mask[2, 7:] = 0
    spans = torch.tensor([[[1, 119], [10, 60]], [[1, 39], [5, 30]], [[1, 6], [0, 0]]])
    with torch.inference_mode():
        set_length_policy(model.backbone, 0)
        linear = model(ids, mask, spans)
        set_length_policy(model.backbone, SHORT_MASKED_MAX)
        masked = model(ids, mask, spans)
    for a, b in zip(linear, masked):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert masked_attention_for(seq, SHORT_MASKED_MAX) and not masked_attention_for(SHORT_MASKED_MAX + 1, SHORT_MASKED_MAX)
    assert not masked_attention_for(seq, 0)
    assert TorchBackend(model).model.backbone.layers[0].attn.dewey_short_masked_max == SHORT_MASKED_MAX
