"""A new student checkpoint: Dewey's long-context settings at a small size, the teacher's vocabulary.

The student uses the teacher's own tokenizer (``tokenizer="teacher"``) with Dewey's two instruction
tokens added, so chunk sizes in student tokens are chunk sizes in teacher tokens too, and its token
embeddings can start from the teacher's: the teacher's embedding matrix, centred and projected on its
top ``hidden_size`` principal directions (``embedding_init="teacher_pca"``). Everything else starts
from ModernBERT's initialisation.

``embedding_init="teacher_static"`` starts the whole student in the teacher's space instead: its token
embeddings are the teacher's *output* vectors of every token embedded alone as a one-token text,
centred and projected on their top principal directions; its output head maps those directions back
into the teacher's space; the output projections of every attention and MLP block start at zero. A new
student is then exactly a bag of static teacher vectors (the mean of the span's token vectors), which
already ranks text in the teacher's space, names and words the training corpus never shows included;
training adds context on top. (The idea of static vectors distilled from a sentence encoder is
Model2Vec's; the code here is ours.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from runtimes.config import DEWEY_INSTRUCTION_TOKENS
from runtimes.files import atomic_path
from runtimes.config import dewey_config_dict
from runtimes.tokenization import TOKENIZER_FILE, read_tokenizer_file

from .config import StudentShape

_VOCAB_MULTIPLE = 64  # embedding rows padded to a multiple of 64 (faster matmuls; ModernBERT does the same)
_MODERNBERT_INITIALIZER_RANGE = 0.02  # ModernBERT's own initialisation scale
# StudentShape fields that say how to build the student, not what its config.json holds.
_BUILD_ONLY_FIELDS = ("tokenizer", "embedding_init")
_TEACHER_EMBEDDING_KEYS = ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight",
                           "0.auto_model.embeddings.word_embeddings.weight")


def student_tokenizer(shape: StudentShape, teacher_path: Path):
    source = teacher_path / TOKENIZER_FILE if shape.tokenizer == "teacher" else Path(shape.tokenizer)
    tokenizer = read_tokenizer_file(source)
    tokenizer.add_special_tokens(list(DEWEY_INSTRUCTION_TOKENS))
    return tokenizer


def _special_id(tokenizer, candidates: tuple[str, ...]) -> int:
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"the student tokenizer has none of the special tokens {candidates}")


def student_config(shape: StudentShape, tokenizer) -> dict:
    """The new student's config.json dict: ``shape`` on the tokenizer's vocabulary and special tokens."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = -(-vocab // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    cls_id = _special_id(tokenizer, ("[CLS]", "<s>", "<cls>"))
    sep_id = _special_id(tokenizer, ("[SEP]", "</s>", "<sep>"))
    pad_id = _special_id(tokenizer, ("[PAD]", "<pad>"))
    architecture = {k: v for k, v in dataclasses.asdict(shape).items() if k not in _BUILD_ONLY_FIELDS}
    return dewey_config_dict(vocab, cls_id, sep_id, pad_id, initializer_range=_MODERNBERT_INITIALIZER_RANGE,
                             **architecture)


def teacher_pca_embeddings(teacher_path: Path, rows: int, width: int):
    """The teacher's token embeddings [rows, width]: centred, projected on the top ``width`` principal
    directions, scaled to unit RMS per coordinate (the student's embedding LayerNorm follows)."""
    import torch
    from safetensors import safe_open

    weights = teacher_path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"embedding_init='teacher_pca' needs {weights}")
    with safe_open(str(weights), "pt") as handle:
        key = next((k for k in _TEACHER_EMBEDDING_KEYS if k in handle.keys()), None)
        if key is None:
            raise ValueError(f"{weights} has no word-embedding matrix ({_TEACHER_EMBEDDING_KEYS})")
        table = handle.get_tensor(key).double()
    if width > table.shape[1] or rows < table.shape[0]:
        raise ValueError(
            f"teacher embeddings are {tuple(table.shape)}: cannot fill {rows} rows of width {width}"
        )
    centred = table - table.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vh[:width].T
    projected = projected / projected.pow(2).mean().sqrt()
    return projected.float()


@functools.lru_cache(maxsize=2)
def teacher_static_vectors(teacher_path: Path, batch_size: int = 1024):
    """The teacher's vector of every token of its vocabulary embedded alone (the one-token text
    ``[CLS] token [SEP]``, through the teacher's own pooling): float64 [teacher vocab, teacher dim].
    About 15 s for MiniLM on 2 cores; kept for the process (callers must not modify the tensor)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(teacher_path), device="cpu", local_files_only=True).eval()
    tokenizer = model.tokenizer
    # The special tokens around a one-token text, as the teacher's tokenizer adds them.
    full, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(bare) != 1 or bare[0] not in full:
        raise ValueError(f"teacher {teacher_path}: cannot find how its tokenizer wraps a one-token text")
    at = full.index(bare[0])
    ids = torch.tensor([full[:at] + [i] + full[at + 1:] for i in range(tokenizer.vocab_size)], dtype=torch.long)
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            part = ids[start:start + batch_size]
            features = {"input_ids": part, "attention_mask": torch.ones_like(part)}
            if "token_type_ids" in tokenizer.model_input_names:
                features["token_type_ids"] = torch.zeros_like(part)
            out.append(model(features)["sentence_embedding"].double())
    return torch.cat(out)


def apply_static_init(model, teacher_path: Path) -> None:
    """Make a new ``DeweyModel`` a bag of the teacher's static token vectors (module docstring).

    Embedding rows are PCA coordinates of the centred static vectors on ``hidden_size - 1`` directions,
    written in a basis of zero-mean coordinates: LayerNorm (weight 1, no bias) then only rescales a row,
    so the embedding and final norms keep its direction. The head maps the coordinates back into the
    teacher's space. Rows past the teacher's vocabulary (Dewey's added tokens, padding) keep their
    random values."""
    import torch

    if model.head is None:
        raise ValueError(
            "embedding_init='teacher_static' needs a head back into the teacher's space: vector_size = the "
            f"teacher's dimension, different from hidden_size (both are {model.config.hidden_size})"
        )
    vectors = teacher_static_vectors(Path(teacher_path))
    dim = vectors.shape[1]
    width = model.config.hidden_size
    if model.head.out_features != dim:
        raise ValueError(
            f"embedding_init='teacher_static' needs vector_size = the teacher's dimension ({dim}) and a "
            f"hidden_size different from it (the head maps back into the teacher's space); got "
            f"vector_size {model.vector_size}, hidden_size {width}"
        )
    if not 2 <= width <= dim + 1:
        raise ValueError(f"embedding_init='teacher_static' needs 2 <= hidden_size <= {dim + 1}, got {width}")
    embeddings = model.backbone.embeddings.tok_embeddings.weight
    if embeddings.shape[0] < len(vectors):
        raise ValueError(f"the student has {embeddings.shape[0]} embedding rows, the teacher's vocabulary {len(vectors)}")
    centred = vectors - vectors.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[: width - 1]  # [k, dim]
    # Orthonormal columns spanning the zero-mean vectors of R^width: [width, k]
    zero_mean = torch.linalg.svd(torch.eye(width, dtype=torch.float64) - 1.0 / width)[0][:, : width - 1]
    table = centred @ basis.T @ zero_mean.T
    table = table / table.pow(2).mean().sqrt()
    with torch.no_grad():
        embeddings[: len(table)] = table.to(embeddings.dtype)
        model.head.weight.copy_((basis.T @ zero_mean.T).to(model.head.weight.dtype))
        for layer in model.backbone.layers:
            for block in (layer.attn, layer.mlp):
                block.Wo.weight.zero_()
                if block.Wo.bias is not None:
                    block.Wo.bias.zero_()


def build_student(shape: StudentShape, teacher_path: Path, folder: str | Path, seed: int = 0) -> Path:
    """Write a new student checkpoint (config.json, model.safetensors, tokenizer files) into ``folder``."""
    import torch

    from runtimes.modeling import DeweyModel, backbone_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = student_tokenizer(shape, teacher_path)
    raw = student_config(shape, tokenizer)
    torch.manual_seed(seed)
    model = DeweyModel(backbone_config(raw)).eval()
    if shape.embedding_init == "teacher_pca":
        if shape.tokenizer != "teacher":
            raise ValueError("embedding_init='teacher_pca' needs tokenizer='teacher' (the rows must be the same tokens)")
        table = teacher_pca_embeddings(teacher_path, raw["vocab_size"], shape.hidden_size)
        with torch.no_grad():
            model.backbone.embeddings.tok_embeddings.weight[: table.shape[0]] = table
    elif shape.embedding_init == "teacher_static":
        if shape.tokenizer != "teacher":
            raise ValueError("embedding_init='teacher_static' needs tokenizer='teacher' (the rows must be the same tokens)")
        apply_static_init(model, teacher_path)
    model.save_pretrained(folder)
    with atomic_path(folder / TOKENIZER_FILE) as tmp:
        tokenizer.save(tmp)
    write_tokenizer_config(folder, raw)
    return folder


def write_tokenizer_config(folder: Path, raw: dict) -> None:
    with atomic_path(folder / "tokenizer_config.json") as tmp:
        Path(tmp).write_text(json.dumps({"model_max_length": raw["max_position_embeddings"]}, indent=2) + "\n",
                             encoding="utf-8")
