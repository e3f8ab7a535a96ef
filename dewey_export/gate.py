"""The precision quality gate: real text through a reduced-precision export and through PyTorch fp32.

Parity (dewey_export.verify) checks random token ids; a reduced-precision export must also keep what
users rely on, on real text. The gate embeds queries (``encode``, the model's single-vector mode) and
documents (``encode_chunks``: late chunking, one pass over each whole document giving its chunks' vectors
and its single vector) with the export and with the fp32 reference, both behind the same
``runtimes.Encoder`` (tokenization, prompts, chunking and pooling as users get them). A document's score
for a query is its best chunk's (multi-vector retrieval, what late chunking is for).

The limits come in tiers, by the precision checked (``GATE_TIERS``; docs/export.md gives the evidence):
``reduced`` (fp16, bf16) and ``int8``. An export passes only if

- every vector is finite;
- the lowest cosine between the two vectors of any query, document or chunk is at least the tier's
  ``min_cosine``, and (int8) the mean cosine of each kind at least its ``min_mean_cosine`` (an int8
  graph drifts a little everywhere; a collapse moves the mean);
- the document ranked first for a query is the same one for at least ``min_top1_agreement`` of the
  queries;
- nDCG@10 of retrieving each query's own document falls by at most ``max_ndcg_drop``.

Retrieval decides, and real text of several lengths is in it: short sentence queries, and documents
of natural lengths (22 to 4k tokens) plus, in the default data, documents of about 512, 2k and 8k
tokens (``LENGTH_SETS``). The report gives the figures per set of documents as well.

Default data: the held-out documents of the built-in corpus (runtimes.corpus: the Python documentation
and standard-library docstrings, offline on every machine; the same stable split as training uses, so
a model trained on the built-in corpus never saw them), each queried by one of its own sentences
(runtimes.evaluation), as in the long-document retrieval evaluation; the long sets are consecutive
pieces of the corpus's other documents (the held-out text is too short for them), cut at whitespace by
characters (``CHARS_PER_TOKEN``; the report records their real token counts). ``--gate-data PATH``
replaces all of them with the user's own, read by the one reader of runtimes.corpus: a JSONL file of
``{"text": ...}`` records, or text files (one document each) in a folder.
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
from runtimes.export_format import INT8
from runtimes.tokenization import DeweyTokenizer

from .verify import INT8_MIN_COSINE, REDUCED_MIN_COSINE, compare_backends

# Thresholds by tier: a reduced-precision export must embed real text as fp32 does, to the cosine of
# the parity check's limit for its precision, and retrieve as fp32 does.
GATE_TIERS = {
    "reduced": {"min_cosine": REDUCED_MIN_COSINE, "min_mean_cosine": None, "min_top1_agreement": 0.98,
                "max_ndcg_drop": 0.005},
    "int8": {"min_cosine": INT8_MIN_COSINE, "min_mean_cosine": 0.998, "min_top1_agreement": 0.97,
             "max_ndcg_drop": 0.005},
}
# The reduced tier's, by their earlier names.
GATE_MIN_COSINE = GATE_TIERS["reduced"]["min_cosine"]
GATE_MIN_TOP1_AGREEMENT = GATE_TIERS["reduced"]["min_top1_agreement"]
GATE_MAX_NDCG_DROP = GATE_TIERS["reduced"]["max_ndcg_drop"]
GATE_NDCG_K = 10
# Sentence queries asked of the documents: 200 allow four top-1 disagreements at 98 %; the default data
# (25 held-out documents, 19.5k dewey-mini tokens, and the length sets) yields more than that.
GATE_QUERIES = 200
GATE_SEED = 0
# The default data's documents of fixed lengths: (about this many tokens, documents).
LENGTH_SETS = ((512, 8), (2048, 4), (8192, 2))
# Characters per token of the built-in corpus (3.7 with dewey-mini's tokenizer), to cut those documents.
CHARS_PER_TOKEN = 3.7
HELDOUT_SET = "held-out"
# Why the gate did not run on an fp32 export.
NOT_REDUCED = "fp32 export: the parity check's fp32 limits already hold it to PyTorch"


@dataclass
class GateData:
    """Documents, sentence queries and each query's own document (``gold``), with where they came from;
    ``sets``: the set of each document (``held-out``, ``~512 tokens``, ...; one set for the user's data)."""

    source: str
    documents: list[str]
    queries: list[str]
    gold: np.ndarray
    sets: list[str] | None = None

    def describe(self) -> dict:
        texts = "\0".join(self.documents + self.queries).encode("utf-8")
        sets = self.sets or [HELDOUT_SET] * len(self.documents)
        return {"source": self.source, "documents": len(self.documents), "queries": len(self.queries),
                "sets": {name: sets.count(name) for name in dict.fromkeys(sets)},
                "sha256": hashlib.sha256(texts).hexdigest()}


def length_documents(documents: list[str], sets=LENGTH_SETS) -> tuple[list[str], list[str]]:
    """Consecutive pieces of ``documents`` (joined) of about each set's tokens, cut at whitespace, and
    their set names."""
    text = "\n\n".join(documents)
    pieces, names, start = [], [], 0
    for tokens, count in sets:
        size = int(tokens * CHARS_PER_TOKEN)
        for _ in range(count):
            end = text.rfind(" ", start, start + size)
            end = start + size if end <= start else end
            if end > len(text):
                raise BadInputError(f"the built-in corpus is too short for the gate's {tokens}-token documents")
            pieces.append(text[start:end].strip())
            names.append(f"~{tokens} tokens")
            start = end
    return pieces, names


def load_gate_data(path: str | Path | None = None) -> GateData:
    """The gate's texts: the built-in held-out documents, or the documents of ``path`` (a JSONL file, a
    text file or a folder of them: runtimes.corpus's one rule, a text file is one document); queries are
    sentences of them. Too little text is a BadInputError naming the path."""
    sets = None
    if path is None:
        # Training's own default split, so a model trained on the built-in corpus never saw these.
        source = (f"built-in corpus, held-out documents ({DEFAULT_HELDOUT_FRACTION:.0%} split) and documents of "
                  f"about {', '.join(str(n) for n, _ in LENGTH_SETS)} tokens")
        train, documents = split_documents([STDLIB], DEFAULT_HELDOUT_FRACTION)
        long_documents, long_sets = length_documents(train)
        sets = [HELDOUT_SET] * len(documents) + long_sets
        documents = documents + long_documents
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
    return GateData(source, documents, [q for q, _ in pairs], np.array([i for _, i in pairs], dtype=np.int64),
                    sets)


def gate_tier(precision: str | None = None) -> str:
    """The tier of the precision checked: ``int8`` for an int8 graph, ``reduced`` for fp16 and bf16."""
    return "int8" if precision == INT8 else "reduced"


def gate_thresholds(precision: str | None = None) -> dict:
    return {"tier": gate_tier(precision), **GATE_TIERS[gate_tier(precision)]}


def skipped_gate(reason: str | bool = True, precision: str | None = None) -> dict:
    """The gate report of a gate that was not run: ``reason`` says why (True: not asked for)."""
    return {"skipped": reason, "thresholds": gate_thresholds(precision)}


def _embed(encoder: Encoder, data: GateData) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
    """Normalised vectors of the queries, the documents and their chunks, as users embed them, the
    number of chunks of each document and its tokens."""
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
    return vectors, [len(doc.vectors) for doc in chunked], [doc.n_tokens for doc in chunked]


def _document_scores(vectors: dict[str, np.ndarray], counts: list[int]) -> np.ndarray:
    """[queries, documents]: each document's best chunk for each query."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return np.maximum.reduceat(vectors["queries"] @ vectors["chunks"].T, starts, axis=1)


def _cosines(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row-wise cosine of each kind (vectors are unit length, so the dot product is the cosine)."""
    return {kind: (ref[kind] * cand[kind]).sum(-1) for kind in ref}


def _by_set(data: GateData, cosines: dict, counts: list[int], tokens: list[int], top1: np.ndarray | None) -> dict:
    """Per set of documents: documents, their tokens (fewest, most), the min and mean cosine of their
    vectors and chunks, and the top-1 agreement of the queries whose own document is in the set."""
    sets = np.array(data.sets or [HELDOUT_SET] * len(data.documents))
    chunk_sets = np.repeat(sets, counts)
    tokens = np.array(tokens)
    figures = {}
    for name in dict.fromkeys(sets.tolist()):
        docs, chunks = sets == name, chunk_sets == name
        values = np.concatenate([cosines["documents"][docs], cosines["chunks"][chunks]])
        entry = {"documents": int(docs.sum()), "tokens": [int(tokens[docs].min()), int(tokens[docs].max())],
                 "min_cosine": float(values.min()), "mean_cosine": float(values.mean())}
        asked = sets[data.gold] == name
        if top1 is not None and asked.any():
            entry["queries"], entry["top1_agreement"] = int(asked.sum()), float(top1[asked].mean())
        figures[name] = entry
    return figures


def run_gate(reference, candidate, model_folder: str | Path, config, data: GateData, log=None,
             precision: str | None = None) -> dict:
    """Embed ``data`` with both backends (``reference``: PyTorch fp32) through the Encoder of
    ``model_folder``'s tokenizer, and hold the candidate to the limits of ``precision``'s tier (None:
    the reduced tier); the report's ``failed`` names each figure outside its limit."""
    limits = gate_thresholds(precision)
    tokenizer = DeweyTokenizer.from_folder(model_folder, config)
    if log:
        log(f"  quality gate ({limits['tier']} tier): {len(data.queries)} queries, {len(data.documents)} documents "
            f"({data.source})")
    started = time.perf_counter()
    ref, counts, tokens = _embed(Encoder(config, tokenizer, reference), data)
    cand, _, _ = _embed(Encoder(config, tokenizer, candidate), data)
    cosines = _cosines(ref, cand)
    by_kind = {kind: float(values.min()) for kind, values in cosines.items()}
    report = {"thresholds": limits, "data": data.describe(), "min_cosine_by_kind": by_kind,
              "mean_cosine_by_kind": {kind: float(values.mean()) for kind, values in cosines.items()},
              "min_cosine": min(by_kind.values())}
    report["mean_cosine"] = min(report["mean_cosine_by_kind"].values())
    finite = all(np.isfinite(v).all() for v in cand.values())
    top1 = None
    if finite:
        ref_scores, cand_scores = _document_scores(ref, counts), _document_scores(cand, counts)
        ndcg_ref = ndcg_at_k(ref_scores, data.gold, GATE_NDCG_K)
        ndcg_cand = ndcg_at_k(cand_scores, data.gold, GATE_NDCG_K)
        top1 = ref_scores.argmax(1) == cand_scores.argmax(1)
        report["top1_agreement"] = float(top1.mean())
        report[f"ndcg@{GATE_NDCG_K}"] = {"reference": ndcg_ref, "export": ndcg_cand, "drop": ndcg_ref - ndcg_cand}
    report["by_set"] = _by_set(data, cosines, counts, tokens, top1)
    failed = [] if finite else ["finite"]
    # Written as "not >=" so that a NaN fails.
    if not report["min_cosine"] >= limits["min_cosine"]:
        failed.append("min_cosine")
    if limits["min_mean_cosine"] is not None and not report["mean_cosine"] >= limits["min_mean_cosine"]:
        failed.append("mean_cosine")
    if finite and not report["top1_agreement"] >= limits["min_top1_agreement"]:
        failed.append("top1_agreement")
    if finite and not report[f"ndcg@{GATE_NDCG_K}"]["drop"] <= limits["max_ndcg_drop"]:
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
    if "mean_cosine" in report:
        parts.append(f"mean cosine {report['mean_cosine']:.6f}")
    if "top1_agreement" in report:
        ndcg = report[f"ndcg@{GATE_NDCG_K}"]
        parts += [f"top-1 agreement {report['top1_agreement']:.1%}",
                  f"nDCG@{GATE_NDCG_K} {ndcg['reference']:.4f} -> {ndcg['export']:.4f} (drop {ndcg['drop']:+.4f})"]
    tier = report.get("thresholds", {}).get("tier")
    return f"quality gate{f' ({tier} tier)' if tier else ''}: " + ", ".join(parts)


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
        elif name == "mean_cosine":
            means = ", ".join(f"{kind} {value:.6f}" for kind, value in report["mean_cosine_by_kind"].items())
            lines.append(f"mean cosine {report['mean_cosine']:.6f} < {limits['min_mean_cosine']} (by kind: {means})")
        elif name == "top1_agreement":
            lines.append(f"top-1 agreement {report[name]:.1%} < {limits['min_top1_agreement']:.0%}")
        else:
            lines.append(f"nDCG@{GATE_NDCG_K} drop {report[ndcg]['drop']:.4f} > {limits['max_ndcg_drop']}")
    return f"quality gate failed ({limits.get('tier', 'reduced')} tier):\n  " + "\n  ".join(lines)


def verify_candidate(reference, candidate, model_folder: Path, config, precision: str, reduced: bool,
                     gate_data: GateData | None, log) -> tuple[dict, dict]:
    """Parity of ``candidate`` with the fp32 ``reference`` at ``precision``'s limits, and, for a
    ``reduced``-precision candidate, the quality gate on ``gate_data`` (None: the built-in texts, read
    only when the gate runs): the (parity, gate) reports of every target and of ``dewey-export verify``."""
    log("Verifying against the PyTorch backend (fp32)")
    parity = compare_backends(reference, candidate, config, precision, log)
    gate = run_gate(reference, candidate, model_folder, config, gate_data or load_gate_data(), log, precision) \
        if reduced else skipped_gate(NOT_REDUCED)
    return parity, gate
