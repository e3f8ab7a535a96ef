"""The Dewey model in PyTorch: a ModernBERT backbone, span pooling, and a linear head.

This is the one definition of the forward contract (DESIGN.md): the PyTorch backend runs it, the
exporter traces it and training optimises it. It imports torch and transformers, so only those three
import this module; ``runtimes`` itself never does at import time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import attention as linear_attention
from .config import CONFIG_FILE, ModelFileError, read_config_dict
from .files import atomic_path

WEIGHTS_FILE = "model.safetensors"
# The head's key in model.safetensors. Backbone keys are stored bare (as ModernBertModel saves them), so
# `transformers.AutoModel.from_pretrained(folder)` loads the backbone and merely ignores this key.
HEAD_KEY = "dewey_head.weight"
# Keys a checkpoint may carry that belong to neither part (a ModernBertForMaskedLM's MLM head).
_IGNORED_PREFIXES = ("head.", "decoder.")


# "linear": runtimes.attention (block-local sliding layers, mask-free global layers), the default
# everywhere. "dense": transformers' own sdpa with its S x S masks, kept as the reference it must equal.
ATTENTION_MODES = ("linear", "dense")


def backbone_config(raw: dict, attention: str = "linear"):
    """A transformers ModernBertConfig from a config.json dict; Dewey fields ride along as attributes."""
    from transformers import ModernBertConfig

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    # Bookkeeping keys (architectures, versions, "_"-prefixed notes) are not model settings.
    raw = {k: v for k, v in raw.items()
           if k not in ("architectures", "transformers_version", "torch_dtype", "dtype") and not k.startswith("_")}
    config = ModernBertConfig(**raw)
    if attention == "linear":
        linear_attention.register()
        config._attn_implementation = linear_attention.ATTENTION_NAME
    else:
        config._attn_implementation = "sdpa"
    return config


def span_means(hidden: torch.Tensor, attention_mask: torch.Tensor, span_bounds: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden[b, start:end]`` for every ``(start, end)`` in ``span_bounds[b, c]``.

    Prefix sums make this one vectorised op for any number of spans. They accumulate in float64:
    a float32 prefix grows with the position, and the difference of two large prefixes late in a
    128k-token row would lose the digits of a 256-token span. An empty span (start == end) gives
    zeros. Padded positions are zeroed with ``where``, never by multiplying, so a NaN in a padding row
    cannot reach a prefix.
    """
    batch, _, width = hidden.shape
    valid = attention_mask.bool().unsqueeze(-1)
    values = torch.where(valid, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    prefix = torch.cumsum(values.to(torch.float64), dim=1)
    prefix = torch.cat([prefix.new_zeros(batch, 1, width), prefix], dim=1)
    starts = span_bounds[..., 0]
    ends = span_bounds[..., 1]

    def at(index: torch.Tensor) -> torch.Tensor:
        return torch.gather(prefix, 1, index.unsqueeze(-1).expand(-1, -1, width))

    sums = at(ends) - at(starts)
    counts = (ends - starts).clamp(min=1).unsqueeze(-1).to(torch.float64)
    return (sums / counts).to(hidden.dtype)


class DeweyModel(nn.Module):
    """ModernBERT backbone + optional linear head (hidden -> vector_size; none when they are equal)."""

    def __init__(self, config):
        super().__init__()
        from transformers import ModernBertModel

        self.config = config
        self.backbone = ModernBertModel(config)
        self.attention = "linear" if config._attn_implementation == linear_attention.ATTENTION_NAME else "dense"
        vector_size = getattr(config, "vector_size", config.hidden_size)
        self.head = None if vector_size == config.hidden_size else nn.Linear(config.hidden_size, vector_size, bias=False)

    @property
    def vector_size(self) -> int:
        return self.config.hidden_size if self.head is None else self.head.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, span_bounds: torch.Tensor):
        """The backend contract: ``cls`` [B, D] and ``spans`` [B, C, D], not normalised.

        Pooling happens before the head (it is linear), so no [S, vector_size] tensor is ever built.
        """
        batch, seq = input_ids.shape
        # Explicit [B, S] positions: ONNX Runtime's opset-23 RotaryEmbedding fails at batch > 1 with
        # the backbone's default [1, S] (FACTS.md); the values are the same either way.
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
        mask = attention_mask
        if self.attention == "linear":
            # The [B, S] key validity itself, per layer type: the backbone then builds no S x S mask.
            valid = attention_mask.bool()
            mask = {"full_attention": valid, "sliding_attention": valid}
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        cls = hidden[:, 0]
        spans = span_means(hidden, attention_mask, span_bounds)
        if self.head is not None:
            cls, spans = self.head(cls), self.head(spans)
        return cls, spans

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                        attention: str = "linear") -> "DeweyModel":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        config = backbone_config(read_config_dict(folder), attention)
        weights_path = folder / WEIGHTS_FILE
        if not weights_path.is_file():
            raise ModelFileError(f"{folder} has no {WEIGHTS_FILE}")
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"{weights_path} is not a readable safetensors file: {exc}") from exc

        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        with torch.device("cpu"):
            model = cls(config)
        expected = model.state_dict()
        if model.head is not None:
            if HEAD_KEY not in state:
                raise ModelFileError(
                    f"{weights_path} has no {HEAD_KEY!r}, but config.json asks for a head "
                    f"{config.hidden_size} -> {model.vector_size}"
                )
        state = {("head.weight" if k == HEAD_KEY else "backbone." + k): v for k, v in state.items()
                 if not k.startswith(_IGNORED_PREFIXES)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelFileError(
                f"{weights_path} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ModelFileError(
                    f"{weights_path}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(expected[key].shape)}"
                )
        model.load_state_dict(state)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``, each file atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = dict(self.backbone.state_dict())
        if self.head is not None:
            state[HEAD_KEY] = self.head.weight
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        config = self.config.to_dict()
        config["architectures"] = ["ModernBertModel"]
        config.pop("dtype", None)
        with atomic_path(folder / CONFIG_FILE) as tmp:
            Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

