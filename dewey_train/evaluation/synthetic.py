"""LongEmbed-style synthetic tasks: passkey and needle documents of set token lengths, built offline.

Each document hides one fact about a distinct person at a random depth in filler text; its query asks
for that fact, and every method of ``retrieval`` must find the document among those of the same length.
Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from runtimes.corpus import python_doc_topics
from runtimes.validation import require_int

from runtimes.evaluation import recall_at_k
from .retrieval import METHODS, TeacherLike, TokenCounter, check_eval_args, score_methods, student_token_counter

SYNTHETIC_TASKS = ("passkey", "needle")
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# -- building the documents --------------------------------------------------------------------

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
    """Real English prose available offline: the Python documentation topics, in key order."""
    return "".join(python_doc_topics())


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


def _fill_draft(filler: _Filler, draft: _Draft) -> None:
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
            _fill_draft(filler, drafts[i])
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


# -- scoring the methods on them ---------------------------------------------------------------


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
    check_eval_args(chunk_size, chunk_overlap, splitter, batch_size)
    methods: dict[str, list[float]] = {method: [] for method in METHODS}
    notes: list[str] = []
    for length, item in task.sets.items():
        scores, cut, _ = score_methods(
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
    check_eval_args(chunk_size, chunk_overlap, splitter, batch_size)
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

