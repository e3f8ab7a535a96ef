"""The precision quality gate: real text through a reduced-precision export and through PyTorch fp32.

Parity (dewey_export.verify) checks random token ids; a reduced-precision export must also keep what
users rely on, on real text. The gate embeds queries (``encode``, the model's single-vector mode) and
documents (``encode_chunks``: late chunking, one pass over each whole document giving its chunks' vectors
and its single vector) with the export and with the fp32 reference, both behind the same
``runtimes.Encoder`` (tokenization, prompts, chunking and pooling as users get them). A document's score
for a query is its best chunk's (multi-vector retrieval, what late chunking is for). The export passes
only if

- the lowest cosine between the two vectors of any query, document or chunk is at least
  ``GATE_MIN_COSINE``;
- the document ranked first for a query is the same one for at least ``GATE_MIN_TOP1_AGREEMENT`` of
  the queries;
- nDCG@10 of retrieving each query's own document falls by at most ``GATE_MAX_NDCG_DROP``.

One pass over the documents per backend keeps the gate short (a few seconds for dewey-mini; the
figures are in docs/benchmarks.md).

Default data: the held-out documents of the built-in corpus (runtimes.corpus: the Python documentation
and standard-library docstrings, offline on every machine; the same stable split as training uses, so
a model trained on the built-in corpus never saw them), each queried by one of its own sentences
(runtimes.evaluation), as in the long-document retrieval evaluation. ``--gate-data PATH`` replaces them
with the user's own, read by the one reader of runtimes.corpus: a JSONL file of ``{"text": ...}``
records, or text files (one document each) in a folder.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtimes import Encoder, TruncationWarning
from runtimes.corpus import DEFAULT_HELDOUT_FRACTION, STDLIB, iter_documents, split_documents
from runtimes.errors import BadInputError
from runtimes.evaluation import ndcg_at_k, sample_sentence_queries
from runtimes.tokenization import DeweyTokenizer

from .verify import REDUCED_MIN_COSINE, compare_backends

# Thresholds: a reduced-precision export must embed real text as fp32 does, to the cosine
# of the parity check's reduced precision, and retrieve as fp32 does.
GATE_MIN_COSINE = REDUCED_MIN_COSINE
GATE_MIN_TOP1_AGREEMENT = 0.98
GATE_MAX_NDCG_DROP = 0.005
GATE_NDCG_K = 10
# Sentence queries asked of the documents: 200 allow four top-1 disagreements at 98 %; the default data
# (25 held-out documents, 19.5k dewey-mini tokens) yields more than that.
GATE_QUERIES = 200
GATE_SEED = 0
# Why the gate did not run on an fp32 export.
NOT_REDUCED = "fp32 export: the parity check's fp32 limits already hold it to PyTorch"


@dataclass
class GateData:
    """Documents, sentence queries and each query's own document (``gold``), with where they came from."""

    source: str
    documents: list[str]
    queries: list[str]
    gold: np.ndarray

    def describe(self) -> dict:
        texts = "\0".join(self.documents + self.queries).encode("utf-8")
        return {"source": self.source, "documents": len(self.documents), "queries": len(self.queries),
                "sha256": hashlib.sha256(texts).hexdigest()}


def load_gate_data(path: str | Path | None = None) -> GateData:
    """The gate's texts: the built-in held-out documents, or the documents of ``path`` (a JSONL file, a
    text file or a folder of them: runtimes.corpus's one rule, a text file is one document); queries are
    sentences of them. Too little text is a BadInputError naming the path."""
    if path is None:
        # Training's own default split, so a model trained on the built-in corpus never saw these.
        source = f"built-in corpus, held-out documents ({DEFAULT_HELDOUT_FRACTION:.0%} split)"
        _, documents = split_documents([STDLIB], DEFAULT_HELDOUT_FRACTION)
    else:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise BadInputError(f"--gate-data {path} does not exist")
        documents = list(iter_documents([path]))
        if len(documents) < 2:
            raise BadInputError(f"--gate-data {path} holds {len(documents)} document(s); the gate retrieves among "
                                "at least 2 (JSONL records, or text files in a folder: one document each)")
    pairs = sample_sentence_queries(documents, GATE_QUERIES, seed=GATE_SEED)
    return GateData(source, documents, [q for q, _ in pairs], np.array([i for _, i in pairs], dtype=np.int64))


def gate_thresholds() -> dict:
    return {"min_cosine": GATE_MIN_COSINE, "min_top1_agreement": GATE_MIN_TOP1_AGREEMENT,
            "max_ndcg_drop": GATE_MAX_NDCG_DROP}


def skipped_gate(reason: str | bool = True) -> dict:
    """The gate report of a gate that was not run: ``reason`` says why (True: not asked for)."""
    return {"skipped": reason, "thresholds": gate_thresholds()}


def _embed(encoder: Encoder, data: GateData) -> tuple[dict[str, np.ndarray], list[int]]:
    """Normalised vectors of the queries, the documents and their chunks, as users embed them, and the
    number of chunks of each document."""
    prompts = encoder.config.prompts

    def prompt(name: str) -> str | None:
        return name if name in prompts else None

    # Documents longer than the model's maximum are cut (as users' would be); the reference and the
    # export see the same cut text, so it is no reason to warn here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        chunked = encoder.encode_chunks(data.documents, prompt_name=prompt("passage"))  # default chunking
    vectors = {"queries": encoder.encode(data.queries, prompt_name=prompt("query")),
               "documents": np.stack([doc.vector for doc in chunked]),
               "chunks": np.concatenate([doc.vectors for doc in chunked])}
    return vectors, [len(doc.vectors) for doc in chunked]


def _document_scores(vectors: dict[str, np.ndarray], counts: list[int]) -> np.ndarray:
    """[queries, documents]: each document's best chunk for each query."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return np.maximum.reduceat(vectors["queries"] @ vectors["chunks"].T, starts, axis=1)


def run_gate(reference, candidate, model_folder: str | Path, config, data: GateData, log=None) -> dict:
    """Embed ``data`` with both backends (``reference``: PyTorch fp32) through the Encoder of
    ``model_folder``'s tokenizer; the report's ``failed`` names each figure outside its limit."""
    tokenizer = DeweyTokenizer.from_folder(model_folder, config)
    if log:
        log(f"  quality gate: {len(data.queries)} queries, {len(data.documents)} documents ({data.source})")
    started = time.perf_counter()
    ref, counts = _embed(Encoder(config, tokenizer, reference), data)
    cand, _ = _embed(Encoder(config, tokenizer, candidate), data)
    # Vectors are unit length, so the row-wise dot product is the cosine.
    by_kind = {kind: float((ref[kind] * cand[kind]).sum(-1).min()) for kind in ref}
    report = {"thresholds": gate_thresholds(), "data": data.describe(), "min_cosine_by_kind": by_kind,
              "min_cosine": min(by_kind.values())}
    finite = all(np.isfinite(v).all() for v in cand.values())
    if finite:
        ref_scores, cand_scores = _document_scores(ref, counts), _document_scores(cand, counts)
        ndcg_ref = ndcg_at_k(ref_scores, data.gold, GATE_NDCG_K)
        ndcg_cand = ndcg_at_k(cand_scores, data.gold, GATE_NDCG_K)
        report["top1_agreement"] = float((ref_scores.argmax(1) == cand_scores.argmax(1)).mean())
        report[f"ndcg@{GATE_NDCG_K}"] = {"reference": ndcg_ref, "export": ndcg_cand, "drop": ndcg_ref - ndcg_cand}
    failed = [] if finite else ["finite"]
    # Written as "not >=" so that a NaN fails.
    if not report["min_cosine"] >= GATE_MIN_COSINE:
        failed.append("min_cosine")
    if finite and not report["top1_agreement"] >= GATE_MIN_TOP1_AGREEMENT:
        failed.append("top1_agreement")
    if finite and not report[f"ndcg@{GATE_NDCG_K}"]["drop"] <= GATE_MAX_NDCG_DROP:
        failed.append(f"ndcg@{GATE_NDCG_K}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["failed"] = failed
    report["passed"] = not failed
    if log:
        log(f"  {describe_gate(report)}: {'passed' if report['passed'] else 'FAILED'} ({report['seconds']} s)")
    return report


def describe_gate(report: dict) -> str:
    """The gate's figures in one line."""
    if "skipped" in report:
        return f"quality gate skipped ({report['skipped']})"
    parts = [f"min cosine {report['min_cosine']:.6f}"]
    if "top1_agreement" in report:
        ndcg = report[f"ndcg@{GATE_NDCG_K}"]
        parts += [f"top-1 agreement {report['top1_agreement']:.1%}",
                  f"nDCG@{GATE_NDCG_K} {ndcg['reference']:.4f} -> {ndcg['export']:.4f} (drop {ndcg['drop']:+.4f})"]
    return "quality gate: " + ", ".join(parts)


def describe_gate_failure(report: dict) -> str:
    """One line per failed figure, with its limit."""
    limits, ndcg = report["thresholds"], f"ndcg@{GATE_NDCG_K}"
    by_kind = ", ".join(f"{kind} {value:.6f}" for kind, value in report["min_cosine_by_kind"].items())
    lines = []
    for name in report["failed"]:
        if name == "finite":
            lines.append("the export gave NaN or infinite vectors")
        elif name == "min_cosine":
            lines.append(f"min cosine {report['min_cosine']:.6f} < {limits['min_cosine']} (by kind: {by_kind})")
        elif name == "top1_agreement":
            lines.append(f"top-1 agreement {report[name]:.1%} < {limits['min_top1_agreement']:.0%}")
        else:
            lines.append(f"nDCG@{GATE_NDCG_K} drop {report[ndcg]['drop']:.4f} > {limits['max_ndcg_drop']}")
    return "quality gate failed:\n  " + "\n  ".join(lines)


def verify_candidate(reference, candidate, model_folder: Path, config, precision: str, reduced: bool,
                     gate_data: GateData | None, log) -> tuple[dict, dict]:
    """Parity of ``candidate`` with the fp32 ``reference`` at ``precision``'s limits, and, for a
    ``reduced``-precision candidate, the quality gate on ``gate_data`` (None: the built-in texts, read
    only when the gate runs): the (parity, gate) reports of every target and of ``dewey-export verify``."""
    log("Verifying against the PyTorch backend (fp32)")
    parity = compare_backends(reference, candidate, config, precision, log)
    gate = run_gate(reference, candidate, model_folder, config, gate_data or load_gate_data(), log) if reduced \
        else skipped_gate(NOT_REDUCED)
    return parity, gate
