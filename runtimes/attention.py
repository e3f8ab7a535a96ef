"""Linear-memory attention for Dewey's two layer kinds, one implementation for PyTorch and export.

ModernBERT alternates sliding-window layers (each token sees |i - j| <= W keys, W = 64 for Dewey) and
global layers. transformers builds dense (B, 1, S, S) masks for both and scores every pair: memory
grows with S^2 and a 24 GiB machine stops near 16-28k tokens. Here:

- Sliding layers attend block-locally: queries in blocks of W, each block against the keys of the
  previous, current and next block under a constant (W, 3W) band mask. The band covers every key a
  query may see, so the result equals the masked dense computation exactly; memory is 3W per query.
- Global layers take no mask at all. Key padding is folded into the keys instead: the head dimension
  gains ``HEAD_PAD`` extra lanes, the query's first extra lane is 1 and a padded key's is ``MASKED_KEY``,
  so a padded key scores about -1e8 and gets exactly zero weight (exp underflows), while real keys
  are untouched (their extra lanes are 0). With no mask, memory-efficient kernels run: PyTorch's flash
  SDPA, ONNX ``Attention`` (opset 23, fused by TensorRT), or ONNX Runtime's contrib
  ``MultiHeadAttention`` CPU flash path, which turns quadratic as soon as it is given a mask.

``install(model)`` switches a transformers ModernBertModel to these functions; its masks are then
passed as the plain [B, S] key-validity tensor (a dict per layer type), so no S x S mask is ever built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTENTION_NAME = "dewey_linear"
# Extra head lanes for the key-padding trick; 8 keeps head sizes multiples of 8 for GPU kernels.
HEAD_PAD = 8
# Added (before scaling) to a padded key's score; -1e9 x 1/8 = -1.25e8 underflows exp() in fp32 and
# bf16, and overflows to -inf in fp16, which also gives weight 0. Real keys keep at least the CLS
# token, so no row is ever all-masked.
MASKED_KEY = -1e9

# Additive score bias of a key outside the window (float32 scores): far below any real score, yet
# finite, so an all-masked row softmaxes to uniform weights instead of NaN.
_MASKED_SCORE = -1e30

# The length policy (one place, ``masked_attention_for``): in the PyTorch backend, rows of at most
# SHORT_MASKED_MAX tokens run both layer kinds as one masked SDPA call (a [B, 1, S, S] boolean mask is
# small there), where the block-local form wastes work on neighbourhoods as wide as the row. Measured
# with bench/length_policy.py (ModernBERT-base shape, 4096 tokens per batch, 2 threads, 2026-11-28),
# linear vs masked seconds: 128 tokens 6.69 vs 5.21, 256: 5.53 vs 5.14, 512: 5.76 vs 5.46,
# 1024: 5.92 vs 6.28, 2048: 6.56 vs 8.13. ONNX Runtime runs the linear graph as fast or faster than the
# plain masked export even at short lengths (bench/throughput.py: 32 x 128 tokens 3.14 vs 3.57 s;
# 8 x 512, 3.11 vs 5.28 s), so exported graphs never contain the masked form: the policy is off unless
# ``set_length_policy`` switches it on (the PyTorch backend does).
SHORT_MASKED_MAX = 512

# Global-attention kernels: "sdpa" (PyTorch; exports to MatMul/Softmax at opset 18 and to the fused
# Attention op at opset 23), "ort_contrib" (com.microsoft.MultiHeadAttention, for ONNX Runtime CPU), both
# with the HEAD_PAD lanes; "sdpa_key_bias" (SDPA with a [B, 1, 1, S] additive key-padding bias and the
# plain head size, for OpenVINO: its CPU plugin runs attention as a fused subgraph that takes the
# broadcast bias without an S x S tensor, and the head size of 64 instead of 72 saved 14 % of a global
# layer's time at 8,192 tokens, 12 heads, bf16: 0.43 against 0.50 s).
GLOBAL_KERNELS = ("sdpa", "ort_contrib", "sdpa_key_bias")


def sliding_window_attention(query, key, value, key_valid, window: int, scaling: float):
    """Exact attention over |i - j| <= window for [B, H, S, D] inputs; returns [B, S, H, D].

    ``key_valid`` is a [B, S] bool tensor (False for padding). A query with no valid key in reach
    (padding far from any real token) gets a zero output instead of the NaN of an all-masked softmax.
    """
    batch, heads, seq, dim = query.shape
    blocks = (seq + window - 1) // window
    pad = blocks * window - seq
    span = blocks * window

    q = F.pad(query, (0, 0, 0, pad)).reshape(batch, heads, blocks, window, dim)
    # Keys and values padded by one block on each side: block b sees blocks b-1, b and b+1.
    k = F.pad(key, (0, 0, window, pad + window))
    v = F.pad(value, (0, 0, window, pad + window))
    valid = F.pad(key_valid, (window, pad + window), value=False)

    def neighbourhoods(x, seq_dim):
        # Blocks b-1, b, b+1 side by side: [..., nb, 3W, ...] from x padded by a block on each side.
        parts = [x.narrow(seq_dim, i * window, span).unflatten(seq_dim, (blocks, window)) for i in range(3)]
        return torch.cat(parts, dim=seq_dim + 1)

    keys = neighbourhoods(k, 2)  # [B, H, nb, 3W, D]
    values = neighbourhoods(v, 2)
    reach = neighbourhoods(valid, 1)  # [B, nb, 3W]

    # Query i of a block sits at key slot i + window of its neighbourhood.
    slots = torch.arange(3 * window, device=query.device)
    rows = torch.arange(window, device=query.device)
    band = (slots.unsqueeze(0) - rows.unsqueeze(1) - window).abs() <= window  # [W, 3W]
    allowed = (band & reach.unsqueeze(2)).unsqueeze(1)  # [B, 1, nb, W, 3W], shared by the heads

    # The score tensors ([B, H, nb, W, 3W]) dominate memory, so as few of them as possible exist: the
    # scale goes on the queries, the mask is one broadcast additive bias, and rows with no visible key
    # (softmax over the bias alone: uniform, finite) are zeroed on the smaller output.
    # Softmax in float32 whatever the model's precision (a no-op for fp32 models).
    scores = torch.matmul(q * scaling, keys.transpose(-1, -2)).float()
    bias = torch.where(allowed, 0.0, _MASKED_SCORE)
    probs = torch.softmax(scores + bias, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)
    out = torch.where(allowed.any(dim=-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.reshape(batch, heads, span, dim)[:, :, :seq].transpose(1, 2)


def _augment(query, key, value, key_valid):
    """Append HEAD_PAD lanes: query lane 0 is 1, key lane 0 is 0 (valid) or MASKED_KEY (padding)."""
    batch, heads, seq, dim = query.shape
    zeros = query.new_zeros(batch, heads, seq, HEAD_PAD)
    ones_lane = F.pad(query.new_ones(batch, heads, seq, 1), (0, HEAD_PAD - 1))
    mask_lane = torch.where(key_valid, 0.0, MASKED_KEY).to(key.dtype)[:, None, :, None]
    mask_lane = F.pad(mask_lane.expand(batch, heads, seq, 1), (0, HEAD_PAD - 1))
    return (
        torch.cat([query, ones_lane], dim=-1),
        torch.cat([key, mask_lane], dim=-1),
        torch.cat([value, zeros], dim=-1),
    )


@torch.library.custom_op("dewey::mha", mutates_args=())
def _mha(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """[B, S, H*D] attention without a mask; exported as com.microsoft.MultiHeadAttention."""
    batch, seq, width = query.shape
    split = lambda x: x.reshape(batch, seq, num_heads, width // num_heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(query), split(key), split(value), scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, width)


@_mha.register_fake
def _(query, key, value, num_heads, scale):
    return torch.empty_like(query)


def global_attention(query, key, value, key_valid, scaling: float, kernel: str = "sdpa"):
    """Full attention with key padding but no S x S mask, [B, H, S, D] in, [B, S, H, D] out."""
    batch, heads, seq, dim = query.shape
    if kernel == "sdpa_key_bias":
        bias = torch.where(key_valid, 0.0, MASKED_KEY).to(query.dtype)[:, None, None, :]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling).transpose(1, 2)
    q, k, v = _augment(query, key, value, key_valid)
    if kernel == "ort_contrib":
        merge = lambda x: x.transpose(1, 2).reshape(batch, seq, heads * (dim + HEAD_PAD))  # noqa: E731
        out = _mha(merge(q), merge(k), merge(v), heads, scaling)
        return out.reshape(batch, seq, heads, dim + HEAD_PAD)[..., :dim]
    out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
    return out.transpose(1, 2)[..., :dim]


def masked_attention_for(seq_len: int, short_masked_max: int) -> bool:
    """The length policy: whether a batch of ``seq_len``-token rows takes the masked SDPA form."""
    return 0 < seq_len <= short_masked_max


def masked_attention(query, key, value, key_valid, window, scaling: float):
    """Reference-style attention with a boolean mask: key padding, plus the band |i - j| <= window for
    sliding layers (window None: global). Each query may always see itself, so a padding row far from
    any real token stays finite (real rows are unchanged: a real token is a valid key in its own band).
    [B, H, S, D] in, [B, S, H, D] out."""
    seq = query.shape[2]
    allowed = key_valid[:, None, None, :]
    if window is not None:
        positions = torch.arange(seq, device=query.device)
        band = (positions[None, :] - positions[:, None]).abs() <= window
        allowed = allowed & band
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2)


def dewey_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    **kwargs):
    """A transformers attention function (registered as ``ATTENTION_NAME``).

    ``attention_mask`` is the [B, S] key-validity tensor; ModernBERT passes ``sliding_window`` =
    half-window + 1 for sliding layers (flash-attention's inclusive convention) and None for global ones.
    """
    if dropout:
        raise ValueError("dewey attention runs without attention dropout (Dewey's is 0)")
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if attention_mask is None:
        key_valid = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
    elif attention_mask.dim() == 2:
        key_valid = attention_mask.bool()
    else:
        raise ValueError(
            f"dewey attention takes the [batch, sequence] key mask, got shape {tuple(attention_mask.shape)}: "
            "call the backbone with attention_mask={'full_attention': mask, 'sliding_attention': mask}"
        )
    if masked_attention_for(query.shape[2], getattr(module, "dewey_short_masked_max", 0)):
        window = sliding_window - 1 if sliding_window is not None else None
        return masked_attention(query, key, value, key_valid, window, scaling), None
    if sliding_window is not None:
        out = sliding_window_attention(query, key, value, key_valid, sliding_window - 1, scaling)
    else:
        out = global_attention(query, key, value, key_valid, scaling, getattr(module, "dewey_global_kernel", "sdpa"))
    return out, None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, dewey_attention)


def set_global_kernel(backbone, kernel: str) -> None:
    if kernel not in GLOBAL_KERNELS:
        raise ValueError(f"global attention kernel must be one of {GLOBAL_KERNELS}, got {kernel!r}")
    for layer in backbone.layers:
        layer.attn.dewey_global_kernel = kernel


def set_length_policy(backbone, short_masked_max: int = SHORT_MASKED_MAX) -> None:
    """Rows of at most ``short_masked_max`` tokens take the masked form (0: never). For eager PyTorch
    only; the exporter leaves it off so a traced graph is always the linear one."""
    for layer in backbone.layers:
        layer.attn.dewey_short_masked_max = int(short_masked_max)
