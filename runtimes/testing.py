"""Small deterministic Dewey checkpoints built offline, for tests, examples and benchmarks.

The config comes from ``runtimes.config.dewey_config_dict`` (the one builder of a new model's
config.json, which ``dewey_train`` builds its students with too) and the tokenizer's training text
from ``runtimes.corpus.python_doc_topics``.

The tokenizer is a byte-level BPE (the kind ModernBERT uses) trained on the Python standard library's
own documentation (``pydoc_data``), so it needs no download and every machine builds the same one. It
carries ModernBERT-style special tokens and Dewey's two instruction tokens. The model has random
weights from a fixed seed: the vectors mean nothing, but every code path runs as with the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import (
    DEWEY_GLOBAL_ATTN_EVERY_N_LAYERS,
    DEWEY_GLOBAL_ROPE_THETA,
    DEWEY_INSTRUCTION_TOKENS,
    DEWEY_LOCAL_ROPE_THETA,
    dewey_config_dict,
)
from .corpus import python_doc_topics
from .files import atomic_path
from .tokenization import TOKENIZER_FILE

SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
TEST_VOCAB_SIZE = 1024


def build_test_tokenizer(vocab_size: int = TEST_VOCAB_SIZE):
    """A deterministic byte-level BPE ``tokenizers.Tokenizer`` with [CLS]=1, [SEP]=2, [PAD]=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(DEWEY_INSTRUCTION_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(python_doc_topics(), trainer)
    tokenizer.add_special_tokens(list(DEWEY_INSTRUCTION_TOKENS))
    return tokenizer


def test_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 2,
    intermediate_size: int = 48,
    local_attention: int = 16,
    vector_size: int = 48,
    max_position_embeddings: int = 8192,
    initializer_range: float = 0.3,
) -> dict:
    """A config.json dict of a tiny Dewey model with Dewey's attention pattern and RoPE settings.

    ``initializer_range`` defaults to 0.3, 15x ModernBERT's 0.02: with 0.02, attention in a random
    32-wide model is nearly uniform and a text's vectors barely depend on its context (dropping 40
    characters moved CLS by 6e-6), which would let tests of context, prompts and truncation pass by
    accident; at 0.3 it moves 1e-2. Deep, wide shapes (benchmarks) use 0.02: at 0.3, 22 random layers
    give attention logits in the hundreds, and float rounding is amplified far beyond what trained
    weights see.
    """
    return dewey_config_dict(
        vocab_size, SPECIAL_TOKENS.index("[CLS]"), SPECIAL_TOKENS.index("[SEP]"), SPECIAL_TOKENS.index("[PAD]"),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        local_attention=local_attention,
        global_attn_every_n_layers=DEWEY_GLOBAL_ATTN_EVERY_N_LAYERS,
        global_rope_theta=DEWEY_GLOBAL_ROPE_THETA,
        local_rope_theta=DEWEY_LOCAL_ROPE_THETA,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        vector_size=vector_size,
        single_vector_type="cls_add_mean",
    )


def make_test_checkpoint(folder: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random Dewey checkpoint (config.json, model.safetensors, tokenizer.json) to ``folder``.

    ``config_overrides`` go to ``test_config`` (hidden_size, num_hidden_layers, vector_size, ...).
    """
    import torch

    from .modeling import DeweyModel, backbone_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_test_tokenizer()
    raw = test_config(tokenizer.get_vocab_size(with_added_tokens=True), **config_overrides)
    torch.manual_seed(seed)
    model = DeweyModel(backbone_config(raw)).eval()
    model.save_pretrained(folder)
    with atomic_path(folder / TOKENIZER_FILE) as tmp:
        tokenizer.save(tmp)
    with atomic_path(folder / "tokenizer_config.json") as tmp:
        Path(tmp).write_text(
            json.dumps(
                {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                 "mask_token": "[MASK]", "model_max_length": raw["max_position_embeddings"]},
                indent=2,
            ) + "\n",
            encoding="utf-8",
        )
    return folder
