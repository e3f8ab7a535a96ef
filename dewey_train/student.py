"""A new student checkpoint: Dewey's long-context settings at a small size, the teacher's vocabulary.

The student uses the teacher's own tokenizer (``tokenizer="teacher"``) with Dewey's two instruction
tokens added, so chunk sizes in student tokens are chunk sizes in teacher tokens too, and its token
embeddings can start from the teacher's: the teacher's embedding matrix, centred and projected on its
top ``hidden_size`` principal directions (``embedding_init="teacher_pca"``). Everything else starts
from ModernBERT's initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtimes.config import DEWEY_INSTRUCTION_TOKENS, DEWEY_PROMPTS
from runtimes.files import atomic_path
from runtimes.tokenization import TOKENIZER_FILE, read_tokenizer_file

from .config import StudentShape

_VOCAB_MULTIPLE = 64  # embedding rows padded to a multiple of 64 (faster matmuls; ModernBERT does the same)
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
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = -(-vocab // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    cls_id = _special_id(tokenizer, ("[CLS]", "<s>", "<cls>"))
    sep_id = _special_id(tokenizer, ("[SEP]", "</s>", "<sep>"))
    pad_id = _special_id(tokenizer, ("[PAD]", "<pad>"))
    return {
        "model_type": "modernbert",
        "architectures": ["ModernBertModel"],
        "vocab_size": vocab,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "local_attention": shape.local_attention,
        "global_attn_every_n_layers": shape.global_attn_every_n_layers,
        "global_rope_theta": shape.global_rope_theta,
        "local_rope_theta": shape.local_rope_theta,
        "max_position_embeddings": shape.max_position_embeddings,
        "norm_eps": 1e-5,
        "initializer_range": 0.02,
        "cls_token_id": cls_id,
        "bos_token_id": cls_id,
        "sep_token_id": sep_id,
        "eos_token_id": sep_id,
        "pad_token_id": pad_id,
        "vector_size": shape.vector_size,
        "single_vector_type": shape.single_vector_type,
        "prompts": dict(DEWEY_PROMPTS),
        "instruction_tokens": list(DEWEY_INSTRUCTION_TOKENS),
    }


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
    model.save_pretrained(folder)
    with atomic_path(folder / TOKENIZER_FILE) as tmp:
        tokenizer.save(tmp)
    write_tokenizer_config(folder, raw)
    return folder


def write_tokenizer_config(folder: Path, raw: dict) -> None:
    with atomic_path(folder / "tokenizer_config.json") as tmp:
        Path(tmp).write_text(json.dumps({"model_max_length": raw["max_position_embeddings"]}, indent=2) + "\n",
                             encoding="utf-8")
