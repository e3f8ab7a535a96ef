"""Retrieval evaluation tasks for ``dewey-train eval``.

Four ways to score a query against a document, compared on the same queries and candidates:

- ``student_single``: the student's mean vector of the whole document (one pass, up to its maximum);
- ``student_multi``: the student's late-chunking vectors (``encode_chunks``), document score = max over chunks;
- ``teacher_truncated``: the teacher's vector of the document, which the teacher cuts to its own window;
- ``teacher_chunks``: the teacher's vectors of the student's chunk texts, document score = max over chunks.

Queries always use the same model as the documents they are compared with: student and teacher vectors
live in different spaces and are never compared with each other.

Tasks: ``long_document_retrieval`` (a sentence of a document is the query, the document is its answer)
and ``synthetic_eval`` (LongEmbed-style passkey and needle documents of set token lengths, built offline).
Metrics assume one relevant document per query; a gold document tied with others is ranked after them,
so a constant scorer gets no credit. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from runtimes import TruncationWarning
from runtimes.chunking import check_chunk_args
from runtimes.validation import require_int

METHODS = ("student_single", "student_multi", "teacher_truncated", "teacher_chunks")
SYNTHETIC_TASKS = ("passkey", "needle")
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

TokenCounter = Callable[[list[str]], list[int]]


class TeacherLike(Protocol):
    """What the evaluation needs of a teacher model."""

    name: str
    max_tokens: int  # the teacher's window: longer texts are cut to it inside ``embed``

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [N, d], L2-normalised; each text truncated to the teacher's window."""
        ...


# -- metrics -----------------------------------------------------------------------------------


def _gold_ranks(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """0-based rank of each query's gold document; documents tied with the gold one rank before it."""
    scores = np.asarray(scores, dtype=np.float64)
    gold = np.asarray(gold)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty [queries, documents] matrix, got shape {scores.shape}")
    if gold.shape != (scores.shape[0],):
        raise ValueError(f"gold must have one index per query: shape ({scores.shape[0]},), got {gold.shape}")
    if not np.issubdtype(gold.dtype, np.integer):
        raise ValueError(f"gold must hold integer document indices, got dtype {gold.dtype}")
    if gold.min() < 0 or gold.max() >= scores.shape[1]:
        raise ValueError(f"gold indices must lie in [0, {scores.shape[1]}), got {gold.min()}..{gold.max()}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    gold_scores = scores[np.arange(len(gold)), gold]
    return (scores >= gold_scores[:, None]).sum(axis=1) - 1


def ndcg_at_k(scores: np.ndarray, gold: np.ndarray, k: int = 10) -> float:
    """Mean nDCG@k with one relevant document per query: 1/log2(rank + 2) if rank < k, else 0.

    scores: [Q, N] similarity of each query to each document; gold: [Q] index of the relevant document.
    A gold document tied with others counts as ranked after all of them.
    """
    k = require_int("k", k, 1)
    ranks = _gold_ranks(scores, gold)
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def recall_at_k(scores: np.ndarray, gold: np.ndarray, k: int = 1) -> float:
    """Fraction of queries whose gold document ranks in the top k (ties ranked pessimistically)."""
    k = require_int("k", k, 1)
    return float((_gold_ranks(scores, gold) < k).mean())


# -- queries from documents --------------------------------------------------------------------

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


def _check_documents(documents: Sequence[str], name: str = "documents") -> list[str]:
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(documents).__name__}")
    if len(documents) == 0:
        raise ValueError(f"{name} is empty: there is nothing to retrieve from")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str) or not doc.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty string")
    return list(documents)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by whitespace, and at newlines."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def sample_sentence_queries(
    documents: Sequence[str], n_queries: int, seed: int = 0, min_words: int = 6, max_words: int = 40
) -> list[tuple[str, int]]:
    """Up to ``n_queries`` (sentence, document index) pairs; each sentence occurs in its document.

    Documents are drawn uniformly in rounds (a random order of all documents that have a sentence of
    ``min_words``..``max_words`` words, one unused sentence each, then again), so a document gives a
    second query only once every eligible document has given one. Documents with no such sentence are
    skipped; a sentence found in more than one document is never used (it has no single answer).
    Fewer than ``n_queries`` pairs come back when the sentences run out.
    """
    documents = _check_documents(documents)
    n_queries = require_int("n_queries", n_queries, 1)
    min_words = require_int("min_words", min_words, 1)
    max_words = require_int("max_words", max_words, min_words)
    rng = np.random.default_rng(seed)
    per_doc = [
        list(dict.fromkeys(s for s in split_sentences(doc) if min_words <= len(s.split()) <= max_words))
        for doc in documents
    ]
    owners = Counter(s for sentences in per_doc for s in sentences)
    remaining = {i: [s for s in sentences if owners[s] == 1] for i, sentences in enumerate(per_doc)}
    remaining = {i: sentences for i, sentences in remaining.items() if sentences}
    if not remaining:
        raise ValueError(f"no document has a sentence of {min_words}..{max_words} words to use as a query")
    queries: list[tuple[str, int]] = []
    while remaining and len(queries) < n_queries:
        for i in rng.permutation(sorted(remaining)):
            sentences = remaining[int(i)]
            queries.append((sentences.pop(int(rng.integers(len(sentences)))), int(i)))
            if not sentences:
                del remaining[int(i)]
            if len(queries) == n_queries:
                break
    return queries


# -- the four scoring methods ------------------------------------------------------------------


def _quiet_truncation(fn, *args, **kwargs):
    """Call ``fn``; return its result and the messages of the TruncationWarnings it raised.

    The test configuration turns TruncationWarning into an error; here truncation is expected and
    reported in the result instead. Other warnings pass through unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncationWarning)
        result = fn(*args, **kwargs)
    notes = []
    for w in caught:
        if issubclass(w.category, TruncationWarning):
            notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, notes


def _teacher_embed(teacher: TeacherLike, texts: list[str]) -> np.ndarray:
    """Teacher vectors of ``texts``; blank texts (a chunk of whitespace) get a zero vector."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    vectors = np.asarray(teacher.embed([texts[i] for i in keep]), dtype=np.float32) if keep else None
    if vectors is not None and (vectors.ndim != 2 or len(vectors) != len(keep)):
        raise ValueError(f"teacher {teacher.name!r} returned shape {vectors.shape} for {len(keep)} texts")
    width = vectors.shape[1] if vectors is not None else 1
    out = np.zeros((len(texts), width), dtype=np.float32)
    if keep:
        out[keep] = vectors
    return out


def _max_per_document(similarities: np.ndarray, chunk_counts: list[int]) -> np.ndarray:
    """[Q, total chunks] -> [Q, documents]: the best chunk of each document."""
    starts = np.concatenate([[0], np.cumsum(chunk_counts)[:-1]]).astype(np.int64)
    return np.maximum.reduceat(similarities, starts, axis=1)


def _score_methods(
    student,
    teacher: TeacherLike,
    queries: list[str],
    documents: list[str],
    chunk_size: int,
    chunk_overlap: int,
    splitter: str,
    batch_size: int,
    show_progress: bool,
) -> tuple[dict[str, np.ndarray], list[str], list]:
    """Scores [Q, N] of every method, truncation notes, and the student's ChunkedDocuments.

    Each document is embedded once per method; the chunk texts the teacher sees are the student's
    chunks (``splitter``), so both chunked methods score the same pieces of text.
    """
    options = dict(batch_size=batch_size, show_progress=show_progress)
    notes = []
    student_queries, cut = _quiet_truncation(student.encode, queries, mode="mean", **options)
    notes += [f"student queries: {m}" for m in cut]
    student_docs, cut = _quiet_truncation(student.encode, documents, mode="mean", **options)
    notes += [f"student_single: {m}" for m in cut]
    chunked, cut = _quiet_truncation(
        student.encode_chunks, documents, chunk_size=chunk_size, chunk_overlap=chunk_overlap, splitter=splitter,
        **options,
    )
    notes += [f"student_multi and teacher_chunks: {m}" for m in cut]
    counts = [len(doc.texts) for doc in chunked]
    student_chunks = np.concatenate([doc.vectors for doc in chunked])

    teacher_queries = _teacher_embed(teacher, queries)
    teacher_docs = _teacher_embed(teacher, documents)
    teacher_chunks = _teacher_embed(teacher, [text for doc in chunked for text in doc.texts])

    scores = {
        "student_single": student_queries @ student_docs.T,
        "student_multi": _max_per_document(student_queries @ student_chunks.T, counts),
        "teacher_truncated": teacher_queries @ teacher_docs.T,
        "teacher_chunks": _max_per_document(teacher_queries @ teacher_chunks.T, counts),
    }
    return scores, notes, chunked


def student_token_counter(student) -> TokenCounter:
    """A ``count_tokens`` function: text tokens of each text by the student's tokenizer (no [CLS]/[SEP])."""

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(t.ids) for t in student.tokenizer.encode_texts(list(texts))]

    return count_tokens


def _check_eval_args(chunk_size: int, chunk_overlap: int, splitter: str, batch_size: int) -> None:
    check_chunk_args(chunk_size, chunk_overlap, splitter)
    require_int("batch_size", batch_size, 1)


# -- long-document retrieval -------------------------------------------------------------------


def long_document_retrieval(
    student,
    teacher: TeacherLike,
    documents: Sequence[str],
    n_queries: int = 200,
    seed: int = 0,
    chunk_size: int = 256,
    chunk_overlap: int = 64,
    splitter: str = "tokens",
    batch_size: int = 8,
    show_progress: bool = False,
    query_documents: Sequence[int] | None = None,
    min_tokens_bands: Sequence[int] = (),
) -> dict:
    """Retrieve each document from one of its own sentences, by the four methods.

    ``query_documents``: indices of the documents queries are drawn from (default: all); every document
    stays a candidate. ``min_tokens_bands``: also report the metrics over the queries whose gold
    document has more than each of these many student tokens (``by_min_tokens``).

    Queries come from ``sample_sentence_queries``; all ``documents`` are candidates for every query.
    Returns ``{"task", "n_queries", "n_documents", "document_tokens": {min, median, max},
    "n_truncated_documents", "chunk_size", "chunk_overlap", "teacher", "methods": {method: {"ndcg@10",
    "recall@1"}}, "notes"}``. Documents longer than the student's maximum are truncated (noted).
    ``splitter`` is the student's chunker (``tokens``: fixed token windows, the authors' 256/64 setting;
    ``words``, ``recursive``); ``teacher_chunks`` embeds the same chunk texts.
    """
    documents = _check_documents(documents)
    _check_eval_args(chunk_size, chunk_overlap, splitter, batch_size)
    if query_documents is None:
        pairs = sample_sentence_queries(documents, n_queries, seed=seed)
    else:
        pool = [int(i) for i in query_documents]
        if not pool or min(pool) < 0 or max(pool) >= len(documents):
            raise ValueError(f"query_documents must be indices into the {len(documents)} documents")
        pairs = [(q, pool[i]) for q, i in sample_sentence_queries([documents[i] for i in pool], n_queries, seed=seed)]
    queries = [q for q, _ in pairs]
    gold = np.array([i for _, i in pairs], dtype=np.int64)
    tokens = np.array(student_token_counter(student)(documents))

    scores, notes, chunked = _score_methods(
        student, teacher, queries, documents, chunk_size, chunk_overlap, splitter, batch_size, show_progress
    )
    if len(pairs) < n_queries:
        notes.append(f"only {len(pairs)} usable sentences were found for queries ({n_queries} asked)")
    return {
        "task": "long_document_retrieval",
        "n_queries": len(pairs),
        "n_documents": len(documents),
        "document_tokens": {
            "min": int(tokens.min()),
            "median": float(np.median(tokens)),
            "max": int(tokens.max()),
        },
        "n_truncated_documents": sum(doc.truncated_tokens > 0 for doc in chunked),
        "chunk_size": chunk_size,
        "chunk_overlap": chunk_overlap,
        "splitter": splitter,
        "teacher": getattr(teacher, "name", type(teacher).__name__),
        "methods": {
            method: {"ndcg@10": ndcg_at_k(s, gold, 10), "recall@1": recall_at_k(s, gold, 1)}
            for method, s in scores.items()
        },
        "by_min_tokens": {
            str(band): {
                "n_queries": int((tokens[gold] > band).sum()),
                **{method: {"ndcg@10": ndcg_at_k(s[tokens[gold] > band], gold[tokens[gold] > band], 10),
                            "recall@1": recall_at_k(s[tokens[gold] > band], gold[tokens[gold] > band], 1)}
                   for method, s in scores.items()},
            }
            for band in min_tokens_bands if (tokens[gold] > band).any()
        },
        "notes": notes,
    }


# -- synthetic LongEmbed-style documents -------------------------------------------------------

LONGEMBED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

FIRST_NAMES = (
    "Abigail", "Bartholomew", "Cordelia", "Desmond", "Eleanor", "Fitzgerald", "Gwendolyn", "Horatio",
    "Isadora", "Jasper", "Katarina", "Leopold", "Marisol", "Nathaniel", "Ophelia", "Percival",
    "Rosalind", "Sebastian", "Theodora", "Ulysses", "Valentina", "Wilhelmina", "Xavier", "Yolanda",
    "Zachariah", "Anastasia", "Benedict", "Clementine", "Dmitri", "Esmeralda", "Florian", "Genevieve",
    "Humphrey", "Imogen", "Jeremiah", "Kassandra", "Lysander", "Magnolia", "Nikolai", "Octavia",
    "Peregrine", "Quentin", "Rosamund", "Solomon", "Tabitha", "Evander", "Henrietta", "Ignatius",
)
SURNAMES = (
    "Abernathy", "Blackwood", "Castellano", "Delacroix", "Eisenberg", "Fairweather", "Galloway",
    "Hargreaves", "Ivanova", "Jablonski", "Kowalczyk", "Lindqvist", "Montgomery", "Nakamura", "Okonkwo",
    "Pemberton", "Quigley", "Rasmussen", "Szymanski", "Thistlewood", "Underhill", "Vanderbilt",
    "Whitcombe", "Yamamoto", "Zimmerman", "Ashcroft", "Brightwater", "Carmichael", "Dunmore",
    "Esterhazy", "Fenwick", "Gallagher", "Holloway", "Inglewood", "Jorgensen", "Kingsley", "Lockhart",
    "Mortimer", "Northcott", "Oyelaran", "Prendergast", "Ravenscroft", "Stanhope", "Trevelyan",
    "Urquhart", "Villanueva", "Wetherby", "Youngblood",
)

PASSKEY_FACT = "{name}'s pass key is {value}. Remember it. {value} is the pass key of {name}."
PASSKEY_QUERY = "What is {name}'s pass key?"

# (fact, query, values): a fact sentence about a person, the question it answers, and its answers.
NEEDLE_TEMPLATES = (
    (
        "The secret ingredient of {name}'s famous soup is {value}.",
        "What is the secret ingredient of {name}'s famous soup?",
        ("smoked paprika", "star anise", "roasted fennel", "lemongrass", "black garlic", "saffron"),
    ),
    (
        "{name} keeps the spare key under the blue {value}.",
        "Where does {name} keep the spare key?",
        ("flowerpot", "doormat", "garden gnome", "watering can", "stone frog", "milk crate"),
    ),
    (
        "{name}'s first pet was a parrot called {value}.",
        "What was the name of {name}'s first pet?",
        ("Biscuit", "Pepper", "Marmalade", "Juniper", "Toffee", "Pistachio"),
    ),
    (
        "{name} was born in the harbour town of {value}.",
        "In which town was {name} born?",
        ("Saltmere", "Kestrel Bay", "Wyncombe", "Dunhaven", "Larkspur Cove", "Port Ellery"),
    ),
    (
        "{name} learned to play the {value} from a retired lighthouse keeper.",
        "Which instrument did {name} learn from a retired lighthouse keeper?",
        ("cello", "accordion", "banjo", "harp", "oboe", "mandolin"),
    ),
    (
        "The combination of {name}'s bicycle lock is {value}.",
        "What is the combination of {name}'s bicycle lock?",
        ("4817", "2093", "7751", "3368", "9042", "6125"),
    ),
)

# Filler is cut into units at sentence ends (or blank lines); a fact goes only before a unit that starts
# a sentence. Longer sentences are split into pieces of this many words so lengths can be hit closely.
_FACT_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_MAX_UNIT_WORDS = 8
_LENGTH_TOLERANCE = 0.10  # documents must be within +-10% of the target token count
_LENGTH_AIM = 0.03  # stop refining a document once it is within +-3%
_REFINE_ROUNDS = 8
_RESTARTS = 4


@dataclass
class SyntheticSet:
    """The documents of one target length; query ``i`` asks for the fact in ``documents[gold[i]]``."""

    length: int  # target length in tokens (of the task's token counter)
    documents: list[str]
    queries: list[str]
    gold: np.ndarray  # int64 [n_docs]
    depths: list[float]  # fraction of the filler that precedes the fact: 0 = start, 1 = end
    facts: list[str]
    answers: list[str]
    token_counts: list[int]


@dataclass
class SyntheticTask:
    """A passkey or needle task: one ``SyntheticSet`` per target length."""

    name: str
    sets: dict[int, SyntheticSet]

    @property
    def lengths(self) -> list[int]:
        return list(self.sets)


@dataclass
class _Filler:
    units: list[str]  # consecutive pieces of the filler text, each ending in whitespace
    sentence_start: np.ndarray  # bool [U]: a fact may be inserted before this unit
    tokens: np.ndarray  # int64 [U]: estimated tokens of each unit in running text


def _count_words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def stdlib_prose() -> str:
    """Real English prose available offline: the Python documentation topics (``pydoc_data``), in key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def _split_filler(text: str, count_tokens: TokenCounter) -> _Filler:
    text = text.strip()
    if not text:
        raise ValueError("filler text is empty")
    ends = [m.end() for m in _FACT_BOUNDARY.finditer(text)] + [len(text)]
    units, starts, begin = [], [], 0
    for end in ends:
        sentence = text[begin:end]
        begin = end
        words = re.findall(r"\S+\s*", sentence)
        for j in range(0, len(words), _MAX_UNIT_WORDS):
            units.append("".join(words[j : j + _MAX_UNIT_WORDS]))
            starts.append(j == 0)
    units[-1] = units[-1].rstrip() + " "  # the filler repeats: its end runs into its start
    tokens = count_tokens([" " + u.strip() for u in units])
    return _Filler(units, np.array(starts), np.maximum(np.asarray(tokens, dtype=np.int64), 1))


def _usable_names(pool: Sequence[str], filler: str) -> list[str]:
    """Names of ``pool`` that never occur in the filler, so a name points to exactly one document."""
    return [name for name in pool if not re.search(rf"\b{re.escape(name)}\b", filler, re.IGNORECASE)]


@dataclass
class _Draft:
    """One document in the making: where its filler starts, its fact, and where the fact goes."""

    start: int
    fact: str
    depth_draw: float
    fact_tokens: int
    budget: float = 0.0  # estimated filler tokens wanted
    text: str = ""
    depth: float = 0.0
    tokens: int = 0


def _build(filler: _Filler, draft: _Draft) -> None:
    """Fill ``draft.text``: filler from ``draft.start`` worth about ``draft.budget`` tokens, fact inside."""
    per_cycle = int(filler.tokens.sum())
    cycles = int(np.ceil(max(draft.budget, 1) * 1.5 / per_cycle)) + 1
    order = (draft.start + np.arange(cycles * len(filler.units))) % len(filler.units)
    cumulative = np.concatenate([[0], np.cumsum(filler.tokens[order])])
    n = int(np.argmin(np.abs(cumulative - draft.budget)))
    # Insertion points: before a unit that starts a sentence, or at the very end.
    points = np.array([k for k in range(n + 1) if k in (0, n) or filler.sentence_start[order[k]]])
    k = int(points[np.argmin(np.abs(points - draft.depth_draw * n))])
    before = "".join(filler.units[i] for i in order[:k])
    after = "".join(filler.units[i] for i in order[k:n])
    draft.text = (before + draft.fact + " " + after).rstrip()
    draft.depth = len(before) / max(len(before) + len(after.rstrip()), 1)


def _refine(filler: _Filler, drafts: list[_Draft], todo: list[int], length: int, count_tokens, best: dict) -> list[int]:
    """Rebuild drafts ``todo``, correcting their filler budgets by the measured error; keep each one's best
    version in ``best``; return those still further than ``_LENGTH_AIM`` from ``length``."""
    for _ in range(_REFINE_ROUNDS):
        for i in todo:
            _build(filler, drafts[i])
        measured = count_tokens([drafts[i].text for i in todo])
        still = []
        for i, tokens in zip(todo, measured):
            if i not in best or abs(tokens - length) < abs(best[i][0] - length):
                best[i] = (int(tokens), drafts[i].text, drafts[i].depth)
            if abs(tokens - length) > _LENGTH_AIM * length:
                drafts[i].budget += length - tokens
                still.append(i)
        todo = still
        if not todo:
            break
    return todo


def _fit_lengths(
    filler: _Filler, drafts: list[_Draft], length: int, count_tokens: TokenCounter, rng: np.random.Generator
) -> None:
    """Bring every draft within a few percent of ``length`` tokens (at most +-10%).

    A draft whose filler cannot get close (units too coarse where it starts) restarts elsewhere in the filler.
    """
    best: dict[int, tuple[int, str, float]] = {}
    todo = list(range(len(drafts)))
    for _ in range(_RESTARTS):
        todo = _refine(filler, drafts, todo, length, count_tokens, best)
        todo = [i for i in todo if abs(best[i][0] - length) > _LENGTH_TOLERANCE * length]
        if not todo:
            break
        for i in todo:
            drafts[i].start = int(rng.choice(np.flatnonzero(filler.sentence_start)))
            drafts[i].budget = length - drafts[i].fact_tokens
    for i, draft in enumerate(drafts):
        draft.tokens, draft.text, draft.depth = best[i]
        if abs(draft.tokens - length) > _LENGTH_TOLERANCE * length:
            raise RuntimeError(
                f"could not build a document of {length} tokens (+-10%): got {draft.tokens}, with a fact of "
                f"{draft.fact_tokens} tokens; ask for longer documents"
            )


def _check_task_args(lengths, n_docs, depth_range, n_names: int) -> tuple[list[int], int, tuple[float, float]]:
    if isinstance(lengths, (int, np.integer)):
        lengths = [lengths]
    lengths = [require_int("lengths[i]", length, 1) for length in lengths]
    if not lengths:
        raise ValueError("lengths is empty")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths repeat: {lengths}")
    n_docs = require_int("n_docs", n_docs, 1)
    if n_docs > n_names:
        raise ValueError(f"n_docs={n_docs} exceeds the {n_names} distinct names available")
    lo, hi = (float(x) for x in depth_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"depth_range must satisfy 0 <= low <= high <= 1, got {depth_range}")
    return lengths, n_docs, (lo, hi)


def _make_task(
    name: str,
    lengths,
    n_docs: int,
    seed: int,
    filler: str,
    count_tokens: TokenCounter | None,
    depth_range: tuple[float, float],
    make_facts: Callable[[np.random.Generator, list[str]], list[tuple[str, str, str]]],
) -> SyntheticTask:
    """Shared generator: ``make_facts(rng, people)`` gives (fact, query, answer) per document."""
    first, last = _usable_names(FIRST_NAMES, filler), _usable_names(SURNAMES, filler)
    lengths, n_docs, (lo, hi) = _check_task_args(lengths, n_docs, depth_range, min(len(first), len(last)))
    count_tokens = count_tokens or _count_words
    rng = np.random.default_rng(seed)
    units = _split_filler(filler, count_tokens)
    sentence_starts = np.flatnonzero(units.sentence_start)
    sets = {}
    for length in lengths:
        # First names and surnames are each drawn without replacement: every name word is in one document.
        people = [
            f"{first[a]} {last[b]}"
            for a, b in zip(rng.choice(len(first), n_docs, replace=False), rng.choice(len(last), n_docs, replace=False))
        ]
        facts = make_facts(rng, people)
        fact_tokens = count_tokens([" " + fact for fact, _, _ in facts])
        drafts = [
            _Draft(int(rng.choice(sentence_starts)), fact, float(rng.uniform(lo, hi)), int(t), float(length - t))
            for (fact, _, _), t in zip(facts, fact_tokens)
        ]
        _fit_lengths(units, drafts, length, count_tokens, rng)
        sets[length] = SyntheticSet(
            length=length,
            documents=[d.text for d in drafts],
            queries=[query for _, query, _ in facts],
            gold=np.arange(n_docs, dtype=np.int64),
            depths=[d.depth for d in drafts],
            facts=[fact for fact, _, _ in facts],
            answers=[answer for _, _, answer in facts],
            token_counts=[d.tokens for d in drafts],
        )
    return SyntheticTask(name, sets)


def make_passkey_task(
    lengths: Sequence[int],
    n_docs: int = 20,
    seed: int = 0,
    filler: str | None = None,
    count_tokens: TokenCounter | None = None,
    depth_range: tuple[float, float] = (0.0, 1.0),
) -> SyntheticTask:
    """LongEmbed-style passkey retrieval: per length, ``n_docs`` documents of about that many tokens.

    Each document is repeated filler (default: LongEmbed's "The grass is green. ...") with
    "<Name>'s pass key is <5 digits>. Remember it. <5 digits> is the pass key of <Name>." inserted at a
    sentence boundary at a uniformly random depth within ``depth_range``; its query is
    "What is <Name>'s pass key?". Names and pass keys differ between the documents of a length.
    Lengths are measured with ``count_tokens`` (default: whitespace words; pass
    ``student_token_counter(student)`` for student tokens) and land within +-10%.
    """
    filler = LONGEMBED_FILLER if filler is None else filler

    def make_facts(rng, people):
        keys = rng.choice(90000, len(people), replace=False) + 10000
        return [
            (PASSKEY_FACT.format(name=p, value=k), PASSKEY_QUERY.format(name=p), str(k)) for p, k in zip(people, keys)
        ]

    return _make_task("passkey", lengths, n_docs, seed, filler, count_tokens, depth_range, make_facts)


def make_needle_task(
    lengths: Sequence[int],
    n_docs: int = 20,
    seed: int = 0,
    filler: str | None = None,
    count_tokens: TokenCounter | None = None,
    depth_range: tuple[float, float] = (0.0, 1.0),
) -> SyntheticTask:
    """Needle in a haystack over real prose: per length, ``n_docs`` documents of about that many tokens.

    Each document is a random contiguous slice of the filler (default: ``stdlib_prose()``, wrapping
    around at its end) with one needle sentence about a distinct person, from ``NEEDLE_TEMPLATES``
    (e.g. "The secret ingredient of <Name>'s famous soup is <thing>."), inserted at a sentence boundary
    at a uniformly random depth within ``depth_range``; the query asks about it ("What is the secret
    ingredient of <Name>'s famous soup?"). Lengths as in ``make_passkey_task``.
    """
    filler = stdlib_prose() if filler is None else filler

    def make_facts(rng, people):
        facts = []
        for person in people:
            fact, query, values = NEEDLE_TEMPLATES[int(rng.integers(len(NEEDLE_TEMPLATES)))]
            value = values[int(rng.integers(len(values)))]
            facts.append((fact.format(name=person, value=value), query.format(name=person), value))
        return facts

    return _make_task("needle", lengths, n_docs, seed, filler, count_tokens, depth_range, make_facts)


TASK_MAKERS = {"passkey": make_passkey_task, "needle": make_needle_task}


def evaluate_synthetic_task(
    student,
    teacher: TeacherLike,
    task: SyntheticTask,
    chunk_size: int = 256,
    chunk_overlap: int = 64,
    splitter: str = "tokens",
    batch_size: int = 8,
    show_progress: bool = False,
) -> dict:
    """Accuracy (recall@1 among the documents of the same length) of every method at every length.

    Returns ``{"lengths": [...], "methods": {method: [accuracy per length]}, "median_tokens": [...],
    "notes": [...]}``. Chunking (``chunk_size``, ``chunk_overlap``, ``splitter``) as in
    ``long_document_retrieval``.
    """
    _check_eval_args(chunk_size, chunk_overlap, splitter, batch_size)
    methods: dict[str, list[float]] = {method: [] for method in METHODS}
    notes: list[str] = []
    for length, item in task.sets.items():
        scores, cut, _ = _score_methods(
            student, teacher, item.queries, item.documents,
            chunk_size, chunk_overlap, splitter, batch_size, show_progress,
        )
        notes += [f"{task.name} {length}: {m}" for m in cut]
        for method in METHODS:
            methods[method].append(recall_at_k(scores[method], item.gold, 1))
    return {
        "lengths": task.lengths,
        "methods": methods,
        "median_tokens": [float(np.median(s.token_counts)) for s in task.sets.values()],
        "notes": notes,
    }


def synthetic_eval(
    student,
    teacher: TeacherLike,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    n_docs: int = 20,
    seed: int = 0,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    chunk_size: int = 256,
    chunk_overlap: int = 64,
    splitter: str = "tokens",
    batch_size: int = 8,
    show_progress: bool = False,
) -> dict:
    """Passkey and needle accuracy per length, lengths counted in student tokens.

    Lengths above the student's ``max_position_embeddings`` are skipped (noted). Returns ``{"task":
    "synthetic", "n_docs", "seed", "chunk_size", "chunk_overlap", "teacher", "lengths", "skipped_lengths",
    "tasks": {task: evaluate_synthetic_task(...)}, "notes"}``.
    """
    unknown = [t for t in tasks if t not in TASK_MAKERS]
    if not tasks or unknown:
        raise ValueError(f"tasks must be a non-empty selection of {SYNTHETIC_TASKS}, got {tuple(tasks)}")
    _check_eval_args(chunk_size, chunk_overlap, splitter, batch_size)
    lengths, n_docs, _ = _check_task_args(lengths, n_docs, (0.0, 1.0), len(FIRST_NAMES))
    limit = student.config.max_position_embeddings
    kept = [length for length in lengths if length <= limit]
    skipped = [length for length in lengths if length > limit]
    if not kept:
        raise ValueError(f"every length in {lengths} exceeds the student's {limit} positions")
    notes = [f"lengths {skipped} skipped: above the student's {limit} positions"] if skipped else []
    counter = student_token_counter(student)
    results = {}
    for name in tasks:
        task = TASK_MAKERS[name](kept, n_docs, seed=seed, count_tokens=counter)
        results[name] = evaluate_synthetic_task(
            student, teacher, task, chunk_size, chunk_overlap, splitter, batch_size, show_progress
        )
        notes += results[name].pop("notes")
    return {
        "task": "synthetic",
        "n_docs": n_docs,
        "seed": seed,
        "chunk_size": chunk_size,
        "chunk_overlap": chunk_overlap,
        "splitter": splitter,
        "teacher": getattr(teacher, "name", type(teacher).__name__),
        "lengths": kept,
        "skipped_lengths": skipped,
        "tasks": results,
        "notes": notes,
    }


# -- report ------------------------------------------------------------------------------------


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _with_notes(table: str, notes: list[str]) -> str:
    return table + "".join(["\n\nNotes:"] + [f"\n- {note}" for note in notes] if notes else [])


def _retrieval_report(result: dict) -> str:
    t = result["document_tokens"]
    lines = [
        f"### Long-document retrieval: {result['n_queries']} queries, {result['n_documents']} documents "
        f"(student tokens min/median/max {t['min']}/{t['median']:g}/{t['max']}; "
        f"chunks {result['chunk_size']}/{result['chunk_overlap']}; teacher {result['teacher']})",
        "",
    ]
    metrics = ["ndcg@10", "recall@1"]
    bands = result.get("by_min_tokens", {})
    header = ["method"] + [f"{m} (all)" for m in metrics]
    for band, values in bands.items():
        header += [f"{m} (>{band} tok, {values['n_queries']} q)" for m in metrics]
    rows = []
    for method, values in result["methods"].items():
        row = [method] + [f"{values[m]:.3f}" for m in metrics]
        for band_values in bands.values():
            row += [f"{band_values[method][m]:.3f}" for m in metrics]
        rows.append(row)
    lines.append(_markdown_table(header, rows))
    return _with_notes("\n".join(lines), result["notes"])


def _synthetic_report(result: dict) -> str:
    lines = []
    for name, task in result["tasks"].items():
        lines += [
            f"### Synthetic {name}: accuracy (recall@1 among {result['n_docs']} documents per length; "
            f"chunks {result['chunk_size']}/{result['chunk_overlap']}; teacher {result['teacher']})",
            "",
        ]
        rows = [[method] + [f"{a:.3f}" for a in accuracies] for method, accuracies in task["methods"].items()]
        lines += [_markdown_table(["method"] + [str(length) for length in task["lengths"]], rows), ""]
    return _with_notes("\n".join(lines).rstrip(), result["notes"])


def format_table(results: dict) -> str:
    """Markdown tables of a ``long_document_retrieval`` or ``synthetic_eval`` result, or of a dict of them.

    Retrieval: one row per method, columns ndcg@10 and recall@1. Synthetic: one table per task, one row
    per method, one column per length. Notes (truncation, skipped lengths) follow each table.
    """
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    sections = [results] if "task" in results else [r for r in results.values() if isinstance(r, dict)]
    reports = []
    for result in sections:
        if result.get("task") == "long_document_retrieval":
            reports.append(_retrieval_report(result))
        elif result.get("task") == "synthetic":
            reports.append(_synthetic_report(result))
    if not reports:
        raise ValueError("results hold no long_document_retrieval or synthetic_eval result")
    return "\n\n".join(reports) + "\n"
