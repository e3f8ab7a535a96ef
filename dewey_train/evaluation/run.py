"""``dewey-train eval``: what a trained student is worth, on held-out data.

1. **Teacher agreement**: held-out documents chunked as in training; mean cosine of the student's CLS
   against the whole-text target, and of its chunk vectors (from one pass over the whole text) against
   each chunk embedded alone by the teacher.
2. **Long-document retrieval** (``retrieval.long_document_retrieval``): queries are sentences of held-out
   documents of 1k-16k student tokens; every held-out document is a candidate; student single vector
   (``mean``), student multi-vector (max over 256/64 chunks), the teacher on the text cut to its
   window, and the teacher on the same chunks embedded one by one.
3. **Synthetic passkey and needle tasks** (``synthetic.synthetic_eval``): accuracy by document length.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from runtimes.corpus import corpus_stats, split_documents
from .retrieval import long_document_retrieval, student_token_counter
from .synthetic import DEFAULT_LENGTHS, synthetic_eval

RETRIEVAL_MIN_TOKENS = 1024
RETRIEVAL_MAX_TOKENS = 16384
RETRIEVAL_BANDS = (1024, 2048)


def teacher_agreement(model_folder: Path, cfg: TrainConfig, teacher, documents: list[str], batch_size: int = 4) -> dict:
    """Mean student-teacher cosine for CLS (whole text) and chunk vectors, training chunking (variant 0)."""
    import torch

    from runtimes.config import load_config
    from runtimes.modeling import DeweyModel
    from runtimes.tokenization import DeweyTokenizer

    from ..samples import SampleBuilder, attach_targets, make_batch, split_into_pieces

    model = DeweyModel.from_pretrained(model_folder)
    if model.vector_size != teacher.dim:
        return {"skipped": f"the student gives {model.vector_size}-d vectors and the teacher {teacher.dim}-d; "
                           "train with export_projection = true to compare them"}
    tokenizer = DeweyTokenizer.from_folder(model_folder, load_config(model_folder))
    plain = dataclasses.replace(cfg, prompts=[None])
    builder = SampleBuilder(tokenizer, plain, teacher.max_tokens)
    examples = builder.build(split_into_pieces(documents, tokenizer, builder.budget, plain.min_text_tokens))
    attach_targets(examples, teacher, plain.whole_text_target)
    cls_cos, chunk_cos = [], []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            ids, mask, bounds, valid, cls_t, chunk_t, _ = make_batch(batch, tokenizer.config.pad_token_id, "cpu")
            cls, spans = model(ids, mask, bounds)
            cls_cos.extend(torch.nn.functional.cosine_similarity(cls, cls_t).tolist())
            chunk_cos.extend(torch.nn.functional.cosine_similarity(spans[valid], chunk_t).tolist())
    return {"documents": len(examples), "chunks": len(chunk_cos),
            "cls_cosine": float(np.mean(cls_cos)), "chunk_cosine": float(np.mean(chunk_cos))}


def evaluate(model_path: str | Path, cfg: TrainConfig, n_queries: int = 200, synthetic_docs: int = 20,
             max_synthetic_length: int = 32768, seed: int = 0, log=None) -> dict:
    """All three evaluations of the student at ``model_path`` on the held-out part of ``cfg.data``.

    Returns ``{"model", "teacher", "heldout", "agreement", "retrieval", "synthetic", "eval_seconds"}``;
    a section that cannot run holds ``{"skipped": reason}``. ``format_report`` renders it.
    """
    from runtimes import load

    from ..teacher import Teacher

    log = log or (lambda message: print(message, flush=True))
    model_path = Path(model_path)
    teacher = Teacher(cfg.teacher, cfg.resolved_teacher_cache(), batch_size=cfg.teacher_batch_size)
    _, heldout = split_documents(cfg.data, cfg.heldout_fraction)
    if not heldout:
        raise ValueError("no held-out documents: raise heldout_fraction or add data")
    student = load(model_path, backend="torch")
    count = student_token_counter(student)
    tokens = np.array(count(heldout))
    results = {"model": str(model_path), "teacher": teacher.name, "heldout": corpus_stats(heldout, count)}
    started = time.time()

    log("teacher agreement ...")
    results["agreement"] = teacher_agreement(model_path, cfg, teacher, heldout)

    log("long-document retrieval ...")
    in_range = [i for i, n in enumerate(tokens) if RETRIEVAL_MIN_TOKENS < n <= RETRIEVAL_MAX_TOKENS]
    if in_range:
        results["retrieval"] = long_document_retrieval(
            student, teacher, heldout, n_queries=n_queries, seed=seed, query_documents=in_range,
            min_tokens_bands=RETRIEVAL_BANDS)
        results["retrieval"]["query_documents"] = len(in_range)
    else:
        results["retrieval"] = {"skipped": f"no held-out document has {RETRIEVAL_MIN_TOKENS}-{RETRIEVAL_MAX_TOKENS} tokens"}

    log("synthetic passkey / needle ...")
    lengths = tuple(n for n in DEFAULT_LENGTHS if n <= max_synthetic_length)
    results["synthetic"] = synthetic_eval(student, teacher, lengths=lengths, n_docs=synthetic_docs, seed=seed)
    results["eval_seconds"] = round(time.time() - started, 1)
    return results
