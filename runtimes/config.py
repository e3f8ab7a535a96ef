"""The Dewey fields of a checkpoint's ``config.json``, read with the standard library only.

A checkpoint's ``config.json`` is a ModernBERT config (what ``transformers`` reads to build the
backbone) plus the Dewey fields below. The runtime needs only these few values, so it reads them here
without importing transformers: the ONNX Runtime path must work where transformers is not installed.
``check_backbone_fields`` checks the ModernBERT structure values, for the PyTorch model builder only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError  # noqa: F401  (defined with dewey's other errors; importable from here too)
from .validation import require_int, require_positive_real

CONFIG_FILE = "config.json"

SINGLE_VECTOR_TYPES = ("cls", "mean", "cls_add_mean")
# Which tokens of a row the single-vector ``mean`` averages. "text": the text's own tokens (Dewey's
# mean: no [CLS], prompt or [SEP]). "attended": every attended token, [CLS], prompt and [SEP] included
# (sentence-transformers' mean pooling). "after_prompt": sentence-transformers' mean with
# ``include_prompt: false``: from the first token after [CLS] and the prompt (tokenized alone) to [SEP].
# "last": the last attended token alone, [SEP] (sentence-transformers' lasttoken pooling, a one-token span).
MEAN_TOKEN_RULES = ("text", "attended", "after_prompt", "last")
# How a prompt joins the text. "separate": each is tokenized alone and the ids are joined (Dewey's
# prompts end in a special token, so this equals tokenizing the joined string). "prefix": the prompt
# string is prepended to the text and the whole is tokenized, as sentence-transformers does.
PROMPT_STYLES = ("separate", "prefix")
# ModernBERT's two attention layer kinds (transformers' layer_types).
LAYER_TYPES = ("full_attention", "sliding_attention")
# ModernBERT sizes that must be positive integers to build a backbone at all.
_BACKBONE_SIZES = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
    "max_position_embeddings",
)

# The instruction prompts published with dewey_en_beta; prepended to the text with no separator.
DEWEY_INSTRUCTION_TOKENS = ("<|START_INSTRUCTION|>", "<|END_INSTRUCTION|>")
DEWEY_PROMPTS = {
    "query": "<|START_INSTRUCTION|>Answer the question<|END_INSTRUCTION|>",
    "passage": "<|START_INSTRUCTION|>Candidate document<|END_INSTRUCTION|>",
}


@dataclass(frozen=True)
class DeweyConfig:
    """What the shared runtime layer needs to know about a model."""

    hidden_size: int
    vector_size: int
    max_position_embeddings: int
    vocab_size: int
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    single_vector_type: str = "cls_add_mean"
    prompts: dict[str, str] = field(default_factory=dict)
    instruction_tokens: tuple[str, ...] = ()
    mean_tokens: str = "text"
    prompt_style: str = "separate"
    default_prompt_name: str | None = None
    normalize_embeddings: bool = True  # encode's default for normalize
    max_seq_length: int | None = None  # the default row length (None: max_position_embeddings)
    matryoshka_dimensions: tuple[int, ...] = ()  # what encode(dimensions=N) accepts, besides vector_size
    # The head is affine (Linear layers, with or without a bias, no activation): a weighted mean of its
    # outputs is its output of the weighted mean, which windows past the model's length rely on.
    head_affine: bool = True

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "DeweyConfig":
        def need(key: str, minimum: int) -> int:
            if key not in raw:
                raise ModelFileError(f"{source}: required key {key!r} is missing")
            return _checked(source, require_int, key, raw[key], minimum)

        hidden = need("hidden_size", 1)
        vector_size = _checked(source, require_int, "vector_size", raw.get("vector_size", hidden), 1)
        single = raw.get("single_vector_type", "cls_add_mean")
        if single not in SINGLE_VECTOR_TYPES:
            raise ModelFileError(
                f"{source}: 'single_vector_type' is {single!r}; expected one of {SINGLE_VECTOR_TYPES}"
            )
        prompts = raw.get("prompts") or {}
        if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
        ):
            raise ModelFileError(f"{source}: 'prompts' must map prompt names to strings")
        instruction_tokens = raw.get("instruction_tokens") or []
        if not isinstance(instruction_tokens, list) or not all(isinstance(t, str) for t in instruction_tokens):
            raise ModelFileError(f"{source}: 'instruction_tokens' must be a list of strings")
        extras = _model_fields(raw, source, vector_size, prompts)
        config = cls(
            hidden_size=hidden,
            vector_size=vector_size,
            max_position_embeddings=need("max_position_embeddings", 1),
            vocab_size=need("vocab_size", 1),
            cls_token_id=need("cls_token_id", 0),
            sep_token_id=need("sep_token_id", 0),
            pad_token_id=need("pad_token_id", 0),
            single_vector_type=single,
            prompts=dict(prompts),
            instruction_tokens=tuple(instruction_tokens),
            **extras,
        )
        if config.max_seq_length is not None and config.max_seq_length > config.max_position_embeddings:
            raise ModelFileError(
                f"{source}: max_seq_length {config.max_seq_length} exceeds max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        for key in ("cls_token_id", "sep_token_id", "pad_token_id"):
            if getattr(config, key) >= config.vocab_size:
                raise ModelFileError(
                    f"{source}: {key} {getattr(config, key)} is outside the vocabulary (size {config.vocab_size})"
                )
        return config


def _model_fields(raw: dict, source: str, vector_size: int, prompts: dict) -> dict:
    """The optional fields that describe how a model is used rather than built (span rule, prompt
    style, defaults, Matryoshka dimensions), checked; absent keys keep Dewey's behaviour."""
    def choice(key: str, allowed: tuple, default: str) -> str:
        value = raw.get(key, default)
        if value not in allowed:
            raise ModelFileError(f"{source}: {key!r} is {value!r}; expected one of {allowed}")
        return value

    default_prompt = raw.get("default_prompt_name")
    if default_prompt is not None and default_prompt not in prompts:
        raise ModelFileError(f"{source}: default_prompt_name {default_prompt!r} is not one of the prompts {sorted(prompts)}")
    flags = {}
    for key in ("normalize_embeddings", "head_affine"):
        flags[key] = raw.get(key, True)
        if not isinstance(flags[key], bool):
            raise ModelFileError(f"{source}: {key!r} must be true or false, got {flags[key]!r}")
    length = raw.get("max_seq_length")
    if length is not None:
        length = _checked(source, require_int, "max_seq_length", length, 3)
    dims = raw.get("matryoshka_dimensions") or []
    if not isinstance(dims, list):
        raise ModelFileError(f"{source}: 'matryoshka_dimensions' must be a list of integers")
    dims = [_checked(source, require_int, "matryoshka_dimensions", d, 1) for d in dims]
    if any(d > vector_size for d in dims):
        raise ModelFileError(f"{source}: matryoshka_dimensions {dims} exceed the vector size {vector_size}")
    return {
        "mean_tokens": choice("mean_tokens", MEAN_TOKEN_RULES, "text"),
        "prompt_style": choice("prompt_style", PROMPT_STYLES, "separate"),
        "default_prompt_name": default_prompt,
        "normalize_embeddings": flags["normalize_embeddings"],
        "head_affine": flags["head_affine"],
        "max_seq_length": length,
        "matryoshka_dimensions": tuple(sorted(set(dims), reverse=True)),
    }


def check_backbone_fields(raw: dict, source: str = "config") -> None:
    """Refuse ModernBERT structure values that cannot build a model, naming the file and the key.

    transformers checks few of them, and an impossible one fails deep inside the model builder
    (``num_attention_heads: 0`` is a ZeroDivisionError) or, worse, builds a model that runs
    (``local_attention: 7`` silently gives a window of 3 on each side). Absent keys take transformers'
    defaults, which are valid. Only the PyTorch builder needs these: an exported graph fixes them.
    """
    def present(key: str) -> bool:
        return raw.get(key) is not None

    for key in _BACKBONE_SIZES:
        if present(key):
            _checked(source, require_int, key, raw[key], 1)
    if present("hidden_size") and present("num_attention_heads") and raw["hidden_size"] % raw["num_attention_heads"]:
        raise ModelFileError(
            f"{source}: hidden_size {raw['hidden_size']} is not divisible by num_attention_heads "
            f"{raw['num_attention_heads']}"
        )
    if present("local_attention"):
        window = _checked(source, require_int, "local_attention", raw["local_attention"], 2)
        if window % 2:
            # ModernBERT attends local_attention // 2 tokens to each side: an odd size is not a window.
            raise ModelFileError(f"{source}: local_attention must be even (the window on both sides), got {window}")
    if present("global_attn_every_n_layers"):
        _checked(source, require_int, "global_attn_every_n_layers", raw["global_attn_every_n_layers"], 1)
    if present("layer_types"):
        _check_layer_types(raw, source)
    for key, value in _backbone_reals(raw, source):
        _checked(source, require_positive_real, key, value)


def _check_layer_types(raw: dict, source: str) -> None:
    layer_types = raw["layer_types"]
    layers = raw.get("num_hidden_layers")
    if not isinstance(layer_types, list) or any(t not in LAYER_TYPES for t in layer_types):
        raise ModelFileError(f"{source}: layer_types must be a list of {LAYER_TYPES}, got {layer_types!r}")
    if layers is not None and len(layer_types) != layers:
        raise ModelFileError(
            f"{source}: layer_types has {len(layer_types)} entries for num_hidden_layers {layers}"
        )


def _backbone_reals(raw: dict, source: str):
    """(key, value) of every positive real the backbone reads: the norm epsilon and the rope thetas,
    in the old flat keys and in transformers 5's rope_parameters."""
    for key in ("norm_eps", "global_rope_theta", "local_rope_theta"):
        if raw.get(key) is not None:
            yield key, raw[key]
    rope = raw.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise ModelFileError(f"{source}: rope_parameters must map layer types to their settings, got {rope!r}")
    for layer_type, params in (rope or {}).items():
        if isinstance(params, dict) and "rope_theta" in params:
            yield f"rope_parameters.{layer_type}.rope_theta", params["rope_theta"]


def _checked(source: str, check, key: str, value, *limits):
    """Run a runtimes.validation check on a config value; its TypeError or ValueError becomes a
    ModelFileError that names the file (the check's message already names the key)."""
    try:
        return check(key, value, *limits)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: {exc}") from None


def read_config_dict(folder: str | Path) -> dict:
    """The raw ``config.json`` of a model folder, with errors that name the file."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(f"{Path(folder)} is not a Dewey model folder: {CONFIG_FILE} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} must hold a JSON object")
    return raw


def load_config(folder: str | Path) -> DeweyConfig:
    return DeweyConfig.from_dict(read_config_dict(folder), source=str(Path(folder) / CONFIG_FILE))


MODERNBERT_NORM_EPS = 1e-5
# Dewey's attention pattern and RoPE bases, as in dewey_en_beta's config.json.
DEWEY_GLOBAL_ATTN_EVERY_N_LAYERS = 3
DEWEY_GLOBAL_ROPE_THETA = 73780400.0
DEWEY_LOCAL_ROPE_THETA = 10000.0


def dewey_config_dict(
    vocab_size: int,
    cls_token_id: int,
    sep_token_id: int,
    pad_token_id: int,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    local_attention: int,
    global_attn_every_n_layers: int,
    global_rope_theta: float,
    local_rope_theta: float,
    max_position_embeddings: int,
    initializer_range: float,
    vector_size: int,
    single_vector_type: str,
) -> dict:
    """The config.json dict of a new Dewey model: ModernBERT's keys plus the Dewey fields (vector size,
    single-vector mode, prompts, instruction tokens)."""
    return {
        "model_type": "modernbert",
        "architectures": ["ModernBertModel"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "local_attention": local_attention,
        "global_attn_every_n_layers": global_attn_every_n_layers,
        "global_rope_theta": global_rope_theta,
        "local_rope_theta": local_rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "norm_eps": MODERNBERT_NORM_EPS,
        "initializer_range": initializer_range,
        "cls_token_id": cls_token_id,
        "bos_token_id": cls_token_id,
        "sep_token_id": sep_token_id,
        "eos_token_id": sep_token_id,
        "pad_token_id": pad_token_id,
        "vector_size": vector_size,
        "single_vector_type": single_vector_type,
        "prompts": dict(DEWEY_PROMPTS),
        "instruction_tokens": list(DEWEY_INSTRUCTION_TOKENS),
    }
