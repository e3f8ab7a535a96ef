"""Training samples: documents cut to the row length, chunked as in the paper, with teacher targets.

1. **Pieces.** A document longer than a training row (``max_length`` tokens with [CLS], [SEP] and the
   longest prompt) is cut into consecutive pieces at word boundaries, so no text is thrown away.
2. **Chunks** (the mix of the Dewey report, arXiv 2503.20376): per piece, with probability
   ``recursive_fraction`` (0.7) the recursive splitter (paragraphs, lines, sentences, words), otherwise
   split by words; ``chunk_size`` uniform in ``chunk_size_min..chunk_size_max`` and the overlap uniform
   in ``0.3..0.6 x chunk_size``, all counted in *student tokens*: the paper does not say its unit, and
   tokens are what the student's spans and the teacher's window are measured in. With
   ``clamp_chunks_to_teacher`` the largest chunk size is cut to the teacher's window (254 tokens for
   MiniLM), or the teacher would embed only the start of a long chunk while the student's span covers
   all of it. The spans come from ``runtimes.chunking.chunk_spans``, the function that serves
   ``encode_chunks``: a sample's chunks are the chunks ``encode_chunks`` returns for its piece with the
   same splitter, size, overlap, prompt and row length (a piece fits its row; ``encode_chunks`` would
   run a longer text in windows, where training cuts it). Each piece's draw is seeded by (seed, text
   hash, variant), so a run is reproducible and different ``variant`` numbers give different chunkings
   of the same text.
3. **Targets.** Each chunk's text embedded alone by the teacher is its span's target. The whole piece
   is the CLS target: embedded whole when it fits the teacher's window (``whole_text_target="auto"``),
   otherwise (and always with ``"chunk_mean"``) the normalised mean of its chunks' teacher vectors.
4. **Batches.** ``make_batch`` pads samples into the tensors of one forward pass, with their targets
   (training and the teacher-agreement evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtimes.batching import pad_batch
from runtimes.chunking import RecursiveSplitter, char_spans, chunk_spans, word_starts, word_windows
from runtimes.tokenization import SPECIAL_TOKENS_PER_ROW, DeweyTokenizer

from .config import TrainConfig
from runtimes.corpus import text_hash


@dataclass
class Sample:
    """One training row: a piece of text, its chunk spans and (once attached) its teacher targets."""

    text: str
    prompt: str | None
    row: np.ndarray  # int64 [S]: [CLS] prompt text [SEP]
    spans: np.ndarray  # int64 [C, 2], positions in the row (prompt and [CLS] excluded)
    chunk_texts: list[str]
    splitter: str
    chunk_size: int
    chunk_overlap: int
    cls_target: np.ndarray | None = None  # [d_teacher]
    chunk_targets: np.ndarray | None = None  # [C, d_teacher]


def split_into_pieces(texts: list[str], tokenizer: DeweyTokenizer, budget: int, min_tokens: int = 1) -> list[str]:
    """Each text, or its consecutive word-aligned pieces of at most ``budget`` tokens; texts with fewer
    than ``min_tokens`` tokens are dropped."""
    pieces = []
    for text, tok in zip(texts, tokenizer.encode_texts(texts)):
        n = len(tok.ids)
        if n < min_tokens:
            continue
        if n <= budget:
            pieces.append(text)
            continue
        for start, end in word_windows(word_starts(text, tok.offsets), n, budget, 0):
            piece = text[int(tok.offsets[start, 0]): int(tok.offsets[end - 1, 1])]
            if end - start >= min_tokens and piece.strip():
                pieces.append(piece)
    return pieces


def chunk_draw(text: str, cfg: TrainConfig, max_chunk: int, seed: int, variant: int):
    """The seeded choice of splitter, chunk size, overlap and prompt for one piece."""
    rng = np.random.default_rng([seed, int(text_hash(text)[:12], 16), variant])
    splitter = "recursive" if rng.random() < cfg.recursive_fraction else "words"
    size = int(rng.integers(cfg.chunk_size_min, max(cfg.chunk_size_min, max_chunk) + 1))
    overlap = min(int(round(rng.uniform(cfg.chunk_overlap_min, cfg.chunk_overlap_max) * size)), size - 1)
    prompt = cfg.prompts[int(rng.integers(len(cfg.prompts)))]
    return splitter, size, overlap, prompt


class SampleBuilder:
    """Seeded samples of pieces of text for one training configuration and tokenizer."""

    def __init__(self, tokenizer: DeweyTokenizer, cfg: TrainConfig, teacher_window: int | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg
        # Text tokens per row: the room that [CLS], [SEP] and the longest configured prompt leave.
        longest_prompt = max((tokenizer.prompt_ids(p) for p in cfg.prompts), key=len)
        self.budget = tokenizer.text_budget(longest_prompt, cfg.max_length)
        if self.budget < cfg.chunk_size_min:
            raise ValueError(f"max_length={cfg.max_length} leaves {self.budget} text tokens, fewer than chunk_size_min")
        self.max_chunk = cfg.chunk_size_max
        if cfg.clamp_chunks_to_teacher and teacher_window is not None:
            # The teacher's rows carry [CLS] and [SEP] around the chunk too.
            self.max_chunk = min(self.max_chunk, teacher_window - SPECIAL_TOKENS_PER_ROW)
        self.recursive = RecursiveSplitter(tokenizer.tokenizer)

    def build(self, texts: list[str], variant: int = 0, seed: int | None = None) -> list[Sample]:
        """Samples (no targets yet), each text cut to the budget: pass pieces that fit one row."""
        seed = self.cfg.seed if seed is None else seed
        samples = []
        for text, tok in zip(texts, self.tokenizer.encode_texts(texts)):
            n = min(len(tok.ids), self.budget)
            splitter, size, overlap, prompt = chunk_draw(text, self.cfg, self.max_chunk, seed, variant)
            spans = chunk_spans(text, tok.offsets[:n], size, overlap, splitter, self.recursive)
            chars = char_spans(tok.offsets, spans)
            prompt_ids = self.tokenizer.prompt_ids(prompt)
            samples.append(Sample(
                text=text[: int(tok.offsets[n - 1, 1])],
                prompt=prompt,
                row=self.tokenizer.row(prompt_ids, tok.ids[:n]),
                spans=spans + 1 + len(prompt_ids),
                chunk_texts=[text[a:b] for a, b in chars],
                splitter=splitter,
                chunk_size=size,
                chunk_overlap=overlap,
            ))
        return samples


def attach_targets(samples: list[Sample], teacher, whole_text_target: str = "auto",
                   show_progress: bool = False) -> None:
    """Fill ``cls_target`` and ``chunk_targets`` from the teacher (through its cache)."""
    chunk_texts = [t for ex in samples for t in ex.chunk_texts]
    chunk_vectors = teacher.embed(chunk_texts, show_progress=show_progress)
    whole = []
    if whole_text_target == "auto":
        fits = teacher.fits([ex.text for ex in samples])
        whole = [ex.text for ex, ok in zip(samples, fits) if ok]
    whole_vectors = dict(zip(whole, teacher.embed(whole))) if whole else {}
    at = 0
    for ex in samples:
        ex.chunk_targets = chunk_vectors[at: at + len(ex.chunk_texts)]
        at += len(ex.chunk_texts)
        if ex.text in whole_vectors:
            ex.cls_target = whole_vectors[ex.text]
        else:
            mean = ex.chunk_targets.mean(axis=0)
            ex.cls_target = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def make_batch(samples: list[Sample], pad_token_id: int, device):
    """``samples`` with targets as tensors on ``device``: (input_ids, attention_mask, span_bounds, valid
    spans mask, CLS targets, chunk targets of the valid spans in order), and the count of non-padding
    tokens."""
    ids, mask, bounds = pad_batch([s.row for s in samples], [s.spans for s in samples], pad_token_id)
    counts = torch.tensor([len(s.spans) for s in samples])
    valid = torch.arange(bounds.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    cls_target = torch.from_numpy(np.stack([s.cls_target for s in samples]))
    chunk_target = torch.from_numpy(np.concatenate([s.chunk_targets for s in samples]))
    to = dict(device=device)
    return (torch.from_numpy(ids).to(**to), torch.from_numpy(mask).to(**to), torch.from_numpy(bounds).to(**to),
            valid.to(**to), cls_target.to(**to), chunk_target.to(**to), int(mask.sum()))
