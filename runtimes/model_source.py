"""Model sources: a folder or Hub id, read once into the one description of a model the rest uses.

``resolve_model`` recognises, from the files alone (nothing in a model folder is imported or run, and
pickled weights are never unpickled):

- ``checkpoint``: a transformers ModernBERT folder (``ModernBertModel``, ``ModernBertForMaskedLM``),
  our own checkpoints included (their head is ``dewey_head.weight``);
- ``dewey_release``: a config whose ``architectures`` names ``DeweyV1`` or whose ``auto_map`` points
  into the folder's own Python code: the backbone is read under whatever common prefix it carries
  (``model.`` or none), and the projection head is found by shape (``find_head``);
- ``sentence_transformers``: a folder with ``modules.json``: a ModernBERT ``Transformer``, a ``Pooling``
  (cls or mean), optional ``Dense`` layers (identity or tanh, with or without a bias) and ``Normalize``.

The result, a ``ModelSource``, carries the backbone's config and weights file, the head as a chain of
Linear layers applied to the pooled vector (sentence-transformers applies its Dense modules after
pooling, so the chain sits where Dewey's linear head sits), and a ``DeweyConfig`` with the pooling,
span rule, prompts, length and dimensions. The PyTorch model (runtimes.modeling), the exporters and
``runtimes.load`` all start from it; an export folder's ``config.json`` is ``ModelSource.config_dict``.
No torch here: safetensors headers are read as JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .config import CONFIG_FILE, DeweyConfig, ModelFileError, check_backbone_fields, read_config_dict
from .hub import parse_hub_id, resolve_hub_id
from .tokenization import TOKENIZER_FILE

SAFETENSORS_FILE = "model.safetensors"
# Weights stored with pickle: refused by name, since loading them could run code.
PICKLED_WEIGHTS = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt")
LAYOUTS = ("checkpoint", "dewey_release", "sentence_transformers")
# ModernBertModel's top-level parameter groups; the one that locates the backbone's prefix.
BACKBONE_ROOTS = ("embeddings.", "layers.", "final_norm.")
BACKBONE_ANCHOR = "embeddings.tok_embeddings.weight"
# ModernBertForMaskedLM's masked-LM head: not part of an embedding model.
MLM_PREFIXES = ("head.", "decoder.")
# The head's name in our own checkpoints (runtimes.modeling.HEAD_KEY): taken by name, whatever its shape,
# so a wrong shape is reported against config.json's vector_size.
DEWEY_HEAD_KEY = "dewey_head.weight"
# Longest head chain tried by shape; published heads are one layer.
MAX_HEAD_LAYERS = 4
# A safetensors header above this is not a header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
HEAD_ACTIVATIONS = ("identity", "tanh")
# Files that describe a model: the config keys that only describe how a transformers folder was saved.
_BOOKKEEPING_KEYS = ("auto_map", "architectures", "transformers_version", "torch_dtype", "dtype")

# sentence-transformers modules dewey maps onto its forward, by class name.
ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
ST_MODULES_FILE = "modules.json"
ST_MODULE_CONFIG = "sentence_bert_config.json"
ST_MODEL_CONFIG = "config_sentence_transformers.json"
ST_MODEL_CARD = "README.md"
# Pooling modes that map onto one pass of the forward, and the reason each other mode does not.
# lasttoken is the mean of a one-token span (the last attended token, [SEP]).
ST_POOLING = ("cls", "mean", "lasttoken")
ST_POOLING_REFUSED = {
    "max": "an element-wise maximum over tokens is not a mean over a span, which is what the forward pools",
    "mean_sqrt_len_tokens": "a sum divided by the square root of the length is not a span mean, and its scale "
                            "reaches the Dense layers",
    "weightedmean": "a position-weighted mean is not a span mean",
}
# Activation class names of a Dense module.
ST_ACTIVATIONS = {"Identity": "identity", "Tanh": "tanh"}
# Where sentence-transformers' model card records the dimensions a MatryoshkaLoss trained for.
_MATRYOSHKA_DIMS = re.compile(r'"matryoshka_dims"\s*:\s*\[([0-9,\s]+)\]')


@dataclass(frozen=True)
class HeadLayer:
    """One Linear layer of a head: ``activation(x @ weight.T + bias)``, tensors named in ``file``."""

    file: Path
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    activation: str = "identity"

    def describe(self, folder: Path) -> dict:
        return {"file": str(self.file.relative_to(folder)), "weight": self.weight, "bias": self.bias,
                "shape": [self.out_features, self.in_features], "activation": self.activation}


@dataclass(frozen=True)
class ModelSource:
    """A model as found on disk: the backbone, the head chain and how vectors are made (``config``)."""

    layout: str
    folder: Path  # what was given (a Hub id's snapshot folder)
    backbone_folder: Path  # the backbone's config.json, weights and tokenizer
    weights_file: Path
    backbone_prefix: str
    backbone_config: dict  # the backbone's config.json, as read
    dewey_fields: dict  # DeweyConfig's fields as config.json keys
    config: DeweyConfig
    head: tuple[HeadLayer, ...] = ()
    files: tuple[str, ...] = ()  # every file read, relative to ``folder``
    ignored: tuple[str, ...] = ()  # tensors outside the backbone and the head
    hub: dict | None = None  # {"id", "revision", "commit"} for a Hub id

    @property
    def tokenizer_folder(self) -> Path:
        return self.backbone_folder

    def config_dict(self) -> dict:
        """A self-contained config.json: the backbone's ModernBERT keys plus the Dewey fields, which an
        export folder carries and ``runtimes.config.load_config`` reads back."""
        raw = {k: v for k, v in self.backbone_config.items() if k not in _BOOKKEEPING_KEYS}
        return {**raw, "model_type": "modernbert", "architectures": ["ModernBertModel"], **self.dewey_fields}

    def describe(self) -> dict:
        """The export manifest's record of where the model came from and what was read as its head."""
        out = {"layout": self.layout, "backbone_prefix": self.backbone_prefix,
               "head": [layer.describe(self.folder) for layer in self.head]}
        if self.ignored:
            out["ignored_tensors"] = list(self.ignored)
        if self.hub:
            out["hub"] = dict(self.hub)
        return out

    def __repr__(self) -> str:
        head = ", ".join(f"{layer.weight}{'+bias' if layer.bias else ''}"
                         f"[{layer.in_features}->{layer.out_features}"
                         f"{', tanh' if layer.activation == 'tanh' else ''}]" for layer in self.head) or "none"
        where = f"{self.hub['id']}@{self.hub['commit'] or self.hub['revision']}" if self.hub else str(self.folder)
        return (f"ModelSource({self.layout}: {where}, head={head}, mode={self.config.single_vector_type}, "
                f"mean={self.config.mean_tokens})")


def resolve_model(model, head=None) -> ModelSource:
    """The ``ModelSource`` of a folder or Hub id (``org/name``, ``org/name@revision``).

    ``head``: the head's weight tensors in order (``"a.weight,b.weight"`` or a list; a name may omit
    ``.weight``), for a folder whose head is ambiguous by shape. A ModelSource is returned as it is.
    """
    if isinstance(model, ModelSource):
        return model
    folder, hub = Path(model), None
    if not folder.exists():
        if parse_hub_id(str(model)) is None or str(model).startswith((".", "/", "~")):
            raise ModelFileError(
                f"{folder} is not a folder: it does not exist (expected a model folder or a Hub id org/name[@revision])"
            )
        folder, hub = resolve_hub_id(str(model))
    if not folder.is_dir():
        raise ModelFileError(f"{folder} is not a folder (expected a model folder or a Hub id org/name[@revision])")
    names = _head_names(head)
    if (folder / ST_MODULES_FILE).is_file():
        source = _sentence_transformers(folder, names)
    else:
        source = _transformers_folder(folder, names)
    return replace(source, hub=hub)


def _head_names(head) -> list[str] | None:
    if head is None:
        return None
    names = head.split(",") if isinstance(head, str) else list(head)
    names = [str(name).strip() for name in names if str(name).strip()]
    if not names:
        raise ValueError("head names no tensor; give the head's weight tensors, e.g. head='proj.weight'")
    return names


# -- files ---------------------------------------------------------------------------------------


def read_json(path: Path, required: bool = True):
    if not path.is_file():
        if required:
            raise ModelFileError(f"{path.parent} has no {path.name}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None


def weights_file(folder: Path) -> Path:
    """``folder``'s safetensors weights; a folder with pickled weights only is refused, naming the file."""
    path = folder / SAFETENSORS_FILE
    if path.is_file():
        return path
    pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    if pickled:
        raise ModelFileError(
            f"{folder / pickled[0]} holds pickled weights, which dewey never loads (unpickling can run code); "
            f"save a safetensors copy as {SAFETENSORS_FILE} (safetensors.torch.save_file, or save_pretrained "
            "in transformers)"
        )
    if (folder / f"{SAFETENSORS_FILE}.index.json").is_file():
        raise ModelFileError(f"{folder} holds sharded safetensors weights; dewey reads one {SAFETENSORS_FILE}")
    raise ModelFileError(f"{folder} has no {SAFETENSORS_FILE}")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its JSON header only."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError(f"header size {size}")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        return {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file: {exc}") from None


def backbone_prefix(shapes: dict, path: Path) -> str:
    """The prefix under which ``path`` stores a ModernBERT backbone (``""``, ``"model."``, ...)."""
    found = sorted(name[: -len(BACKBONE_ANCHOR)] for name in shapes if name.endswith(BACKBONE_ANCHOR))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ModelFileError(f"{path} holds {what} ModernBERT backbone(s) (tensors ending in {BACKBONE_ANCHOR})")
    return found[0]


def _is_backbone(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix):].startswith(BACKBONE_ROOTS)


def _relative(folder: Path, paths) -> tuple[str, ...]:
    return tuple(sorted({str(Path(p).relative_to(folder)) for p in paths}))


def _prompts_file(folder: Path) -> dict:
    """prompts and default_prompt_name from config_sentence_transformers.json, if the folder has one."""
    raw = read_json(folder / ST_MODEL_CONFIG, required=False) or {}
    if not isinstance(raw, dict):
        raise ModelFileError(f"{folder / ST_MODEL_CONFIG} must hold a JSON object")
    out = {}
    if raw.get("prompts"):
        out["prompts"] = raw["prompts"]
    if raw.get("default_prompt_name"):
        out["default_prompt_name"] = raw["default_prompt_name"]
    return out


def _tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
            if (folder / name).is_file()]


# -- heads ---------------------------------------------------------------------------------------


def _linear_layers(shapes: dict, names) -> dict[str, tuple[int, int, str | None]]:
    """2-d tensors among ``names`` as Linear weights: name -> (in, out, bias name or None)."""
    layers = {}
    for name in names:
        shape = shapes[name]
        if len(shape) != 2:
            continue
        out_features, in_features = shape
        bias = name[: -len("weight")] + "bias" if name.endswith("weight") else None
        if bias is not None and shapes.get(bias) != (out_features,):
            bias = None
        layers[name] = (in_features, out_features, bias)
    return layers


def head_candidates(layers: dict, hidden: int, vector_size: int | None) -> list[tuple[str, ...]]:
    """Chains of Linear weights ``hidden -> ... -> vector_size`` (each weight used once, at most
    ``MAX_HEAD_LAYERS``); with ``vector_size`` None, the chains from ``hidden`` that cannot be extended."""
    found = []

    def extend(chain: tuple[str, ...], width: int) -> None:
        nexts = [n for n, (i, _, _) in layers.items() if i == width and n not in chain]
        if chain and (width == vector_size or (vector_size is None and not nexts)):
            found.append(chain)
        if len(chain) < MAX_HEAD_LAYERS:
            for name in sorted(nexts):
                extend(chain + (name,), layers[name][1])

    extend((), hidden)
    return found


def find_head(shapes: dict, others: list[str], hidden: int, vector_size: int | None, chosen: list[str] | None,
              path: Path) -> tuple[HeadLayer, ...]:
    """The head among the tensors ``others`` (outside the backbone) of ``path``, found by shape.

    vector_size (declared in config.json) == hidden: no head. Otherwise exactly one chain of Linear
    weights from the hidden size (to ``vector_size`` when declared) is the head; none or several raise
    ModelFileError listing the candidates and how to choose one. ``chosen`` names the chain instead.
    """
    layers = _linear_layers(shapes, others)
    if chosen is not None:
        names = [n if n in layers else f"{n}.weight" for n in chosen]
        unknown = [n for n, given in zip(names, chosen) if n not in layers]
        if unknown:
            raise ModelFileError(
                f"{path}: head tensor(s) {unknown} are not 2-d tensors outside the backbone; "
                f"candidates: {_listing(shapes, layers)}"
            )
        chain = tuple(names)
        widths = [hidden] + [layers[n][1] for n in chain]
        if any(layers[n][0] != widths[i] for i, n in enumerate(chain)) or (vector_size not in (None, widths[-1])):
            raise ModelFileError(
                f"{path}: head {list(chain)} does not chain {hidden} -> ... -> {vector_size or 'any size'}: "
                f"shapes {[list(shapes[n]) for n in chain]}"
            )
    elif DEWEY_HEAD_KEY in layers and vector_size not in (None, hidden):
        return (HeadLayer(path, DEWEY_HEAD_KEY, None, hidden, vector_size),)
    else:
        if vector_size == hidden:
            return ()
        candidates = head_candidates(layers, hidden, vector_size)
        if vector_size is None and not candidates:
            return ()
        if not candidates:
            raise ModelFileError(
                f"{path} has no {DEWEY_HEAD_KEY!r}, but config.json asks for a head {hidden} -> {vector_size}, and no "
                f"chain of tensors outside the backbone fits (2-d tensors: {_listing(shapes, layers)}); choose the "
                "head with --head NAME[,NAME] (CLI) or head='NAME,...' (runtimes.load)"
            )
        if len(candidates) != 1:
            target = f"{hidden} -> {vector_size}" if vector_size else f"from {hidden}"
            listed = "; ".join(" -> ".join(f"{n} {list(shapes[n])}" for n in c) for c in candidates) or "none"
            raise ModelFileError(
                f"{path}: {'no' if not candidates else len(candidates)} projection head chain(s) {target} among the "
                f"tensors outside the backbone ({listed}); other tensors: {_listing(shapes, layers)}. Choose the "
                "head with --head NAME[,NAME] (CLI) or head='NAME,...' (runtimes.load)"
            )
        chain = candidates[0]
    return tuple(HeadLayer(path, n, layers[n][2], layers[n][0], layers[n][1]) for n in chain)


def _listing(shapes: dict, layers: dict) -> str:
    return ", ".join(f"{n} {list(shapes[n])}" for n in sorted(layers)) or "none"


# -- layouts -------------------------------------------------------------------------------------


def _transformers_folder(folder: Path, head: list[str] | None) -> ModelSource:
    raw = read_config_dict(folder)
    check_backbone_fields(raw, str(folder / CONFIG_FILE))  # an impossible size is named before any shape test
    architectures = raw.get("architectures") or []
    release = "DeweyV1" in architectures or "auto_map" in raw
    if not release and raw.get("model_type") not in (None, "modernbert"):
        raise ModelFileError(
            f"{folder / CONFIG_FILE}: model_type {raw.get('model_type')!r}; dewey runs ModernBERT backbones"
        )
    path = weights_file(folder)
    shapes = tensor_shapes(path)
    prefix = backbone_prefix(shapes, path)
    others = [n for n in shapes if not _is_backbone(n, prefix)]
    if "ModernBertForMaskedLM" in architectures:
        others = [n for n in others if not n.startswith(MLM_PREFIXES)]
    hidden = raw.get("hidden_size")
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        raise ModelFileError(f"{folder / CONFIG_FILE}: required key 'hidden_size' is missing or not an integer")
    vector_size = raw.get("vector_size")
    layers = find_head(shapes, others, hidden, vector_size, head, path)
    used = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    fields = {key: raw[key] for key in _DEWEY_KEYS if key in raw}
    for key, value in _prompts_file(folder).items():
        fields.setdefault(key, value)
    fields["vector_size"] = layers[-1].out_features if layers else hidden
    config = _config({**raw, **fields}, folder / CONFIG_FILE)
    files = [folder / CONFIG_FILE, path, *_tokenizer_files(folder)]
    if (folder / ST_MODEL_CONFIG).is_file():
        files.append(folder / ST_MODEL_CONFIG)
    return ModelSource(
        layout="dewey_release" if release else "checkpoint", folder=folder, backbone_folder=folder, weights_file=path,
        backbone_prefix=prefix, backbone_config=raw, dewey_fields=fields, config=config, head=layers,
        files=_relative(folder, files), ignored=tuple(sorted(set(others) - used)),
    )


# config.json keys of the Dewey fields (runtimes.config.DeweyConfig).
_DEWEY_KEYS = ("vector_size", "single_vector_type", "prompts", "instruction_tokens", "mean_tokens", "prompt_style",
               "default_prompt_name", "normalize_embeddings", "max_seq_length", "matryoshka_dimensions",
               "head_affine")


def _config(raw: dict, source: Path) -> DeweyConfig:
    return DeweyConfig.from_dict(raw, source=str(source))


def _sentence_transformers(folder: Path, head: list[str] | None) -> ModelSource:
    modules_path = folder / ST_MODULES_FILE
    modules = read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise ModelFileError(f"{modules_path} must be a list of modules, each with a type")
    if head is not None:
        raise ValueError(f"{folder} is a sentence-transformers folder: its head is its Dense modules; do not pass head")
    kinds = []
    for i, module in enumerate(modules):
        kind = str(module["type"]).rsplit(".", 1)[-1]
        if not str(module["type"]).startswith("sentence_transformers.") or kind not in ST_MODULES:
            raise ModelFileError(
                f"{modules_path}: module {i} is {module['type']!r}; dewey maps only sentence-transformers' "
                f"{', '.join(ST_MODULES)} modules onto its forward (code in a model folder is never run)"
            )
        kinds.append((kind, folder / str(module.get("path", ""))))
    order = [kind for kind, _ in kinds]
    dense_count = order.count("Dense")
    expected = ["Transformer", "Pooling"] + ["Dense"] * dense_count + (["Normalize"] if "Normalize" in order else [])
    if order != expected:
        raise ModelFileError(
            f"{modules_path}: modules {order}; dewey reads Transformer, Pooling, then any Dense modules, then an "
            "optional Normalize"
        )
    backbone_folder = kinds[0][1]
    files = [modules_path, *_tokenizer_files(backbone_folder)]
    raw = read_config_dict(backbone_folder)
    if raw.get("model_type") != "modernbert":
        raise ModelFileError(
            f"{backbone_folder / CONFIG_FILE}: the Transformer module is model_type {raw.get('model_type')!r}; "
            "dewey runs ModernBERT backbones"
        )
    check_backbone_fields(raw, str(backbone_folder / CONFIG_FILE))
    hidden = raw.get("hidden_size")
    module_config = read_json(backbone_folder / ST_MODULE_CONFIG, required=False) or {}
    if module_config:
        files.append(backbone_folder / ST_MODULE_CONFIG)
    if module_config.get("do_lower_case"):
        raise ModelFileError(
            f"{backbone_folder / ST_MODULE_CONFIG}: do_lower_case is set; dewey tokenizes texts as given"
        )
    path = weights_file(backbone_folder)
    shapes = tensor_shapes(path)
    prefix = backbone_prefix(shapes, path)
    files += [backbone_folder / CONFIG_FILE, path]

    pooling_folder = kinds[1][1]
    mode, include_prompt = _st_pooling(pooling_folder, hidden)
    files.append(pooling_folder / CONFIG_FILE)
    layers, width = [], hidden
    for kind, module_folder in kinds[2:]:
        if kind == "Dense":
            layer = _st_dense(module_folder, width)
            layers.append(layer)
            files += [module_folder / CONFIG_FILE, layer.file]
            width = layer.out_features

    prompts = _prompts_file(folder)
    if (folder / ST_MODEL_CONFIG).is_file():
        files.append(folder / ST_MODEL_CONFIG)
    length = module_config.get("max_seq_length") or _tokenizer_max_length(backbone_folder)
    positions = raw.get("max_position_embeddings")
    if isinstance(length, int) and isinstance(positions, int):
        length = min(length, positions)
    dims = _matryoshka_dims(folder)
    if dims:
        files.append(folder / ST_MODEL_CARD)
    fields = {
        "vector_size": width,
        "single_vector_type": "cls" if mode == "cls" else "mean",
        "mean_tokens": "last" if mode == "lasttoken" else "attended" if include_prompt else "after_prompt",
        "prompt_style": "prefix",
        "prompts": prompts.get("prompts", {}),
        "default_prompt_name": prompts.get("default_prompt_name"),
        "normalize_embeddings": "Normalize" in order,
        "max_seq_length": length,
        "matryoshka_dimensions": dims,
        "head_affine": all(layer.activation == "identity" for layer in layers),
    }
    config = _config({**raw, **fields}, modules_path)
    return ModelSource(
        layout="sentence_transformers", folder=folder, backbone_folder=backbone_folder, weights_file=path,
        backbone_prefix=prefix, backbone_config=raw, dewey_fields=fields, config=config, head=tuple(layers),
        files=_relative(folder, files), ignored=tuple(sorted(n for n in shapes if not _is_backbone(n, prefix))),
    )


def _st_pooling(folder: Path, hidden) -> tuple[str, bool]:
    """The Pooling module's mode (cls, mean or lasttoken) and include_prompt; the other modes are refused
    with the reason."""
    path = folder / CONFIG_FILE
    raw = read_json(path)
    mode = raw.get("pooling_mode")
    if mode is None:  # sentence-transformers before 6: one boolean per mode
        mode = [key[len("pooling_mode_"):] for key, on in raw.items() if key.startswith("pooling_mode_") and on]
        mode = [{"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max", "weightedmean_tokens": "weightedmean"}
                .get(m, m) for m in mode] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise ModelFileError(
            f"{path}: pooling concatenates {modes}; dewey gives one vector per text from one pooling"
        )
    mode = modes[0]
    if mode not in ST_POOLING:
        reason = ST_POOLING_REFUSED.get(mode, "it is not a pooling dewey knows")
        raise ModelFileError(f"{path}: pooling mode {mode!r} is not supported: {reason}")
    width = raw.get("embedding_dimension", raw.get("word_embedding_dimension", hidden))
    if width != hidden:
        raise ModelFileError(f"{path}: pooling width {width} differs from the backbone's hidden_size {hidden}")
    include_prompt = raw.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ModelFileError(f"{path}: include_prompt must be true or false, got {include_prompt!r}")
    if mode == "cls" and not include_prompt:
        raise ModelFileError(
            f"{path}: cls pooling with include_prompt false pools the first token after the prompt, not [CLS]; "
            "dewey's cls is the [CLS] token"
        )
    return mode, include_prompt


def _st_dense(folder: Path, width: int) -> HeadLayer:
    path = folder / CONFIG_FILE
    raw = read_json(path)
    in_features, out_features = raw.get("in_features"), raw.get("out_features")
    if in_features != width or not isinstance(out_features, int) or out_features < 1:
        raise ModelFileError(f"{path}: Dense {in_features} -> {out_features} does not follow a {width}-d vector")
    activation_name = str(raw.get("activation_function") or "Identity").rsplit(".", 1)[-1]
    if activation_name not in ST_ACTIVATIONS:
        raise ModelFileError(
            f"{path}: activation {raw.get('activation_function')!r} is not supported (dewey maps "
            f"{', '.join(ST_ACTIVATIONS)})"
        )
    weights = weights_file(folder)
    shapes = tensor_shapes(weights)
    bias = "linear.bias" if raw.get("bias", True) else None
    wanted = {"linear.weight": (out_features, in_features), **({bias: (out_features,)} if bias else {})}
    for name, shape in wanted.items():
        if shapes.get(name) != shape:
            raise ModelFileError(f"{weights}: {name} has shape {shapes.get(name)}, {path} implies {shape}")
    return HeadLayer(weights, "linear.weight", bias, in_features, out_features, ST_ACTIVATIONS[activation_name])


def _tokenizer_max_length(folder: Path) -> int | None:
    """tokenizer_config.json's model_max_length (sentence-transformers 6 keeps max_seq_length there);
    transformers writes a huge sentinel when there is none."""
    raw = read_json(folder / "tokenizer_config.json", required=False) or {}
    length = raw.get("model_max_length")
    return length if isinstance(length, int) and 0 < length < 10**9 else None


def _matryoshka_dims(folder: Path) -> list[int]:
    """The Matryoshka dimensions sentence-transformers' model card records for a MatryoshkaLoss (read as
    text, in the card's loss parameters)."""
    card = folder / ST_MODEL_CARD
    if not card.is_file():
        return []
    match = _MATRYOSHKA_DIMS.search(card.read_text(encoding="utf-8", errors="replace"))
    return [int(d) for d in match[1].replace(" ", "").split(",") if d.strip()] if match else []


__all__ = ["HeadLayer", "LAYOUTS", "ModelSource", "find_head", "resolve_model", "tensor_shapes"]
