"""The Dewey model in PyTorch: a ModernBERT backbone, span pooling, and a linear head.

This is the one definition of the forward contract (runtimes.backends): the PyTorch backend runs it, the
exporter traces it and training optimises it. It imports torch and transformers, so only those three
import this module; ``runtimes`` itself never does at import time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as linear_attention
from .config import CONFIG_FILE, ModelFileError, check_backbone_fields, read_config_dict
from .files import atomic_path

WEIGHTS_FILE = "model.safetensors"
# The head's key in model.safetensors. Backbone keys are stored bare (as ModernBertModel saves them), so
# `transformers.AutoModel.from_pretrained(folder)` loads the backbone and merely ignores this key.
HEAD_KEY = "dewey_head.weight"
# ModernBertModel's top-level parameter groups (runtimes.model_source locates their prefix).
_BACKBONE_ROOTS = ("embeddings.", "layers.", "final_norm.")


# "linear": runtimes.attention (block-local sliding layers, mask-free global layers), the default
# everywhere. "dense": transformers' own sdpa with its S x S masks, kept as the reference it must equal.
ATTENTION_MODES = ("linear", "dense")


def backbone_config(raw: dict, attention: str = "linear", source: str = "config"):
    """A transformers ModernBertConfig from a config.json dict; Dewey fields ride along as attributes.

    An impossible value raises ModelFileError naming ``source`` (the file) and the key.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import ModernBertConfig
    from transformers.activations import ACT2FN

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    check_backbone_fields(raw, source)
    # Bookkeeping keys (architectures, versions, "_"-prefixed notes) are not model settings.
    raw = {k: v for k, v in raw.items()
           if k not in ("architectures", "transformers_version", "torch_dtype", "dtype") and not k.startswith("_")}
    try:
        config = ModernBertConfig(**raw)
    except (TypeError, ValueError, StrictDataclassError) as exc:
        # transformers' own type checks (norm_eps: "x"), which name the key but not the file.
        raise ModelFileError(f"{source}: {exc}") from exc
    if config.hidden_activation not in ACT2FN:  # else a bare KeyError when the layers are built
        raise ModelFileError(
            f"{source}: hidden_activation {config.hidden_activation!r} is not an activation transformers knows"
        )
    if attention == "linear":
        linear_attention.register()
        config._attn_implementation = linear_attention.ATTENTION_NAME
    else:
        config._attn_implementation = "sdpa"
    return config


# How span_means accumulates its prefix sums. "float64": exact to float64 rounding; the default.
# "centered_float32": for engines without float64 (TensorRT): each row's per-dimension mean is
# subtracted first, so prefix sums drift like a random walk (~sqrt(S)) instead of growing with S x mean.
POOLING_ACCUMULATIONS = ("float64", "centered_float32")
# Tokens per pooling block: sums inside a block (at most this many terms) stay in float32; only the
# short sequence of block totals (S / 64 rows) is accumulated in float64.
POOL_BLOCK = 64


def span_means(hidden: torch.Tensor, attention_mask: torch.Tensor, span_bounds: torch.Tensor,
               accumulate: str = "float64") -> torch.Tensor:
    """Mean of ``hidden[b, start:end]`` for every ``(start, end)`` in ``span_bounds[b, c]``; float32.

    Two-level prefix sums make this one vectorised op for any number of spans, in linear memory: a
    float32 running sum inside each block of ``POOL_BLOCK`` tokens, and a running sum of the block
    totals in float64. A single float32 prefix over the row would grow with the position, and the
    difference of two large prefixes late in a 128k-token row would lose the digits of a 256-token
    span; a float64 prefix over every token would hold two more [B, S, D] float64 copies. An empty span
    (start == end) gives zeros. Padded positions are zeroed with ``where``, never by multiplying, so a
    NaN in a padding row cannot reach a sum.
    """
    if accumulate not in POOLING_ACCUMULATIONS:
        raise ValueError(f"accumulate must be one of {POOLING_ACCUMULATIONS}, got {accumulate!r}")
    batch, seq, width = hidden.shape
    total_dtype = torch.float64 if accumulate == "float64" else torch.float32
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    valid = attention_mask.bool().unsqueeze(-1)
    values = torch.where(valid, hidden.float(), zero)
    if accumulate == "centered_float32":
        count = valid.sum(dim=1, keepdim=True).clamp(min=1).float()
        center = values.sum(dim=1, keepdim=True) / count  # [B, 1, D]
        values = torch.where(valid, values - center, zero)
    blocks = (seq + POOL_BLOCK - 1) // POOL_BLOCK
    values = F.pad(values, (0, 0, 0, blocks * POOL_BLOCK - seq)).reshape(batch, blocks, POOL_BLOCK, width)
    inner = torch.cumsum(values, dim=2)  # inclusive sums inside each block
    block_totals = inner[:, :, -1].to(total_dtype)  # [B, nb, D]
    before_block = torch.cumsum(block_totals, dim=1) - block_totals  # sum of the blocks before each
    inner = inner.reshape(batch, blocks * POOL_BLOCK, width)

    def gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.gather(source, 1, index.unsqueeze(-1).expand(-1, -1, width))

    def prefix(index: torch.Tensor) -> torch.Tensor:
        """Sum of values[:, :index], from the last included token (index - 1) and its block."""
        last = (index - 1).clamp(min=0)
        total = gather(before_block, last // POOL_BLOCK) + gather(inner, last).to(total_dtype)
        return torch.where((index > 0).unsqueeze(-1), total, torch.zeros((), dtype=total_dtype, device=total.device))

    starts, ends = span_bounds[..., 0], span_bounds[..., 1]
    lengths = (ends - starts).unsqueeze(-1)
    means = (prefix(ends) - prefix(starts)) / lengths.clamp(min=1).to(total_dtype)
    if accumulate == "centered_float32":
        means = torch.where(lengths > 0, means + center, torch.zeros((), dtype=total_dtype, device=hidden.device))
    return means.float()


class Float32LayerNorm(nn.Module):
    """A LayerNorm that computes in float32 inside a reduced-precision model (fp16 overflows there)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


class Float32Rotary(nn.Module):
    """Rotary tables in float32: at 128k positions and theta 7.4e7 a 16-bit inv_freq or cos/sin table
    misplaces far tokens. ModernBERT casts the tables to its input's dtype, so it gets a float32 input."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary.float()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type=None):
        return self.rotary(x.float(), position_ids, layer_type)


def reduce_precision(model: "DeweyModel", dtype: torch.dtype) -> "DeweyModel":
    """Cast the model to fp16/bf16 with LayerNorm, softmax (runtimes.attention), the rotary tables and
    span pooling kept in float32: the one reduced-precision form, for the PyTorch backend and for the
    reduced-precision ONNX graphs that strongly typed TensorRT builds from."""
    if dtype == torch.float32:
        return model
    model = model.to(dtype)
    backbone = model.backbone
    backbone.rotary_emb = Float32Rotary(backbone.rotary_emb)
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, Float32LayerNorm(child))
    return model


class HeadChain(nn.Module):
    """A head of several Linear layers, or of one with an activation: ``activation(layer(x))`` in turn
    (sentence-transformers' Dense modules). A lone identity layer stays a plain ``nn.Linear``."""

    def __init__(self, layers: list[nn.Linear], activations: list[str]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.activations = tuple(activations)

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, activation in zip(self.layers, self.activations):
            x = layer(x)
            if activation == "tanh":
                x = torch.tanh(x)
        return x


def build_head(hidden: int, layers) -> nn.Module | None:
    """The head module of ``layers`` (runtimes.model_source.HeadLayer, in order); None for no layers."""
    if not layers:
        return None
    linears = [nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None) for layer in layers]
    if linears[0].in_features != hidden:
        raise ModelFileError(f"the head starts at {linears[0].in_features} features, the backbone gives {hidden}")
    if len(layers) == 1 and layers[0].activation == "identity":
        return linears[0]
    return HeadChain(linears, [layer.activation for layer in layers])


def _head_state_keys(head: nn.Module, index: int) -> tuple[str, str]:
    """The model's state keys of layer ``index`` of the head: its weight and bias."""
    stem = "head" if isinstance(head, nn.Linear) else f"head.layers.{index}"
    return f"{stem}.weight", f"{stem}.bias"


class DeweyModel(nn.Module):
    """ModernBERT backbone + optional head (hidden -> vector_size; none when they are equal): one Linear
    layer, or the chain of a model source (runtimes.model_source)."""

    def __init__(self, config, head_layers=None):
        super().__init__()
        from transformers import ModernBertModel

        self.config = config
        self.backbone = ModernBertModel(config)
        self.attention = "linear" if config._attn_implementation == linear_attention.ATTENTION_NAME else "dense"
        self.pooling = "float64"  # see POOLING_ACCUMULATIONS; the TensorRT target sets centered_float32

        if head_layers is not None:
            self.head = build_head(config.hidden_size, head_layers)
        else:
            vector_size = getattr(config, "vector_size", config.hidden_size)
            self.head = (None if vector_size == config.hidden_size
                         else nn.Linear(config.hidden_size, vector_size, bias=False))

    @property
    def vector_size(self) -> int:
        return self.config.hidden_size if self.head is None else self.head.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, span_bounds: torch.Tensor):
        """The backend contract: ``cls`` [B, D] and ``spans`` [B, C, D] in float32, not normalised.

        Pooling happens before the head: a linear head commutes with a mean, so no [S, vector_size]
        tensor is ever built; a head with a bias or a tanh is applied to the pooled vector, which is
        where sentence-transformers applies its Dense modules. In a reduced-precision model the pooled
        means go through the head in that precision.
        """
        batch, seq = input_ids.shape
        # Explicit [B, S] positions: ONNX Runtime's opset-23 RotaryEmbedding fails at batch > 1 with
        # the backbone's default [1, S]; the values are the same either way.
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
        mask = attention_mask
        if self.attention == "linear":
            # The [B, S] key validity itself, per layer type: the backbone then builds no S x S mask.
            valid = attention_mask.bool()
            mask = {"full_attention": valid, "sliding_attention": valid}
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        cls = hidden[:, 0]
        spans = span_means(hidden, attention_mask, span_bounds, self.pooling).to(hidden.dtype)
        if self.head is not None:
            cls, spans = self.head(cls), self.head(spans)
        return cls.float(), spans.float()

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32, device="cpu",
                        attention: str = "linear", head=None) -> "DeweyModel":
        """The model of a folder, Hub id or ``ModelSource`` (runtimes.model_source.resolve_model; ``head``
        names the head tensors where their shapes leave a choice)."""
        from .model_source import resolve_model

        source = resolve_model(folder, head=head)
        config = backbone_config(source.config_dict(), attention, source=str(source.backbone_folder / CONFIG_FILE))
        with torch.device("cpu"):
            model = cls(config, head_layers=source.head)
        expected = model.state_dict()
        file_tensors = _read_tensors(source)
        state, file_keys = {}, {}  # model key -> tensor, and -> its file and key (for messages)
        prefix = source.backbone_prefix
        for file_key, tensor in file_tensors[source.weights_file].items():
            if file_key.startswith(prefix) and file_key[len(prefix):].startswith(_BACKBONE_ROOTS):
                key = "backbone." + file_key[len(prefix):]
                state[key], file_keys[key] = tensor, f"{source.weights_file}: {file_key}"
        for index, layer in enumerate(source.head):
            for key, name in zip(_head_state_keys(model.head, index), (layer.weight, layer.bias)):
                if name is not None:
                    state[key], file_keys[key] = file_tensors[layer.file][name], f"{layer.file}: {name}"
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelFileError(
                f"{source.weights_file} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ModelFileError(
                    f"{file_keys[key]} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(expected[key].shape)}"
                )
            # load_state_dict would cast integer weights to float and copy NaN/inf without a word; a
            # model that then answers NaN for every text is far harder to trace than this error.
            if not tensor.is_floating_point():
                raise ModelFileError(f"{file_keys[key]} holds {tensor.dtype} values, not floats")
            # A sum is NaN or infinite when any element is, and one float32 reduction is cheap; the
            # element-wise isfinite (boolean temporaries) runs only when the sum is not finite, which
            # finite weights reach only by overflowing float32. dewey-mini (11M fp16 values): 7-38 ms,
            # against 34-110 ms for isfinite on every tensor, in a whole load of 0.9-2.6 s (2 cores).
            if not (torch.isfinite(tensor.sum(dtype=torch.float32)) or torch.isfinite(tensor).all()):
                bad = int(tensor.numel() - torch.isfinite(tensor).sum())
                raise ModelFileError(f"{file_keys[key]} holds {bad} NaN or infinite values")
        model.load_state_dict(state)
        model.source = source
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``, each file atomically: a Dewey
        checkpoint, whose head is one bias-free Linear layer (or none)."""
        from safetensors.torch import save_file

        if self.head is not None and not (isinstance(self.head, nn.Linear) and self.head.bias is None):
            raise ValueError(
                "save_pretrained writes Dewey checkpoints, whose head is one bias-free Linear layer; this model's "
                "head is another shape: export it (dewey-export) or keep its source folder"
            )
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



def _read_tensors(source) -> dict:
    """The tensors of every weights file of ``source``: file -> {name: tensor}, each file read once."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = {source.weights_file, *(layer.file for layer in source.head)}
    out = {}
    for path in files:
        try:
            out[path] = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"{path} is not a readable safetensors file: {exc}") from exc
    return out
