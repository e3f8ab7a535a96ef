"""``dewey_train.evaluation``: metrics, query sampling, synthetic documents, end to end.

The end-to-end checks run a tiny random student (its vectors mean nothing, so only ranges are checked
for it) beside a fake teacher: a hashed bag of words that sees only its first ``max_tokens`` words. That
teacher must find a passkey by the person's name when it sees the fact, and must fail when the fact lies
beyond its window: the two cases the comparison of methods is about.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import pytest

from dewey_train.evaluation.report import format_table
from dewey_train.evaluation.retrieval import (
    METHODS,
    long_document_retrieval,
    student_token_counter,
)
from runtimes.evaluation import ndcg_at_k, recall_at_k, sample_sentence_queries, split_sentences
from dewey_train.evaluation.synthetic import (
    evaluate_synthetic_task,
    make_needle_task,
    make_passkey_task,
    stdlib_prose,
    synthetic_eval,
)


class BagOfWordsTeacher:
    """Deterministic fake teacher: binary hashed bag of lower-cased words, cut to ``max_tokens`` words."""

    def __init__(self, max_tokens: int = 256, dim: int = 4096):
        self.max_tokens = max_tokens
        self.dim = dim
        self.name = f"bag-of-words-{max_tokens}"

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split()[: self.max_tokens]:
                word = re.sub(r"[^a-z0-9]", "", word.lower())
                if word:
                    out[i, zlib.crc32(word.encode()) % self.dim] = 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@pytest.fixture(scope="module")
def short_student(tmp_path_factory):
    """A tiny random student with only 512 positions, so truncation and skipped lengths are cheap to reach."""
    from runtimes import load
    from runtimes.testing import make_test_checkpoint

    folder = make_test_checkpoint(tmp_path_factory.mktemp("short-student"), seed=1, max_position_embeddings=512)
    return load(folder, backend="torch")


@pytest.fixture(scope="module")
def count_tokens(encoder):
    return student_token_counter(encoder)


@pytest.fixture(scope="module")
def topic_documents():
    """Six real documents of about 1,000-1,500 characters (the stdlib docs)."""
    from pydoc_data.topics import topics

    keys = ["assert", "break", "class", "for", "if", "while"]
    return [topics[k][:1500] for k in keys]


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    scores = np.array(
        [
            [0.9, 0.1, 0.5],  # gold 0 ranks 0
            [0.9, 0.1, 0.5],  # gold 2 ranks 1
            [0.9, 0.1, 0.5],  # gold 1 ranks 2
        ]
    )
    gold = np.array([0, 2, 1])
    assert recall_at_k(scores, gold, 1) == pytest.approx(1 / 3)
    assert recall_at_k(scores, gold, 2) == pytest.approx(2 / 3)
    assert recall_at_k(scores, gold, 3) == pytest.approx(1.0)
    expected = (1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3
    assert ndcg_at_k(scores, gold, 10) == pytest.approx(expected)
    assert ndcg_at_k(scores, gold, 2) == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert ndcg_at_k(scores, gold, 1) == pytest.approx(1 / 3)
    # k beyond the number of documents counts every document.
    assert recall_at_k(scores, gold, 100) == recall_at_k(scores, gold, 3)


def test_ties_rank_the_gold_document_last():
    constant = np.zeros((4, 5))
    gold = np.array([0, 1, 2, 4])
    assert recall_at_k(constant, gold, 1) == 0.0
    assert recall_at_k(constant, gold, 4) == 0.0  # tied with 4 others: rank 4
    assert recall_at_k(constant, gold, 5) == 1.0
    assert ndcg_at_k(constant, gold, 10) == pytest.approx(1 / math.log2(6))
    # Tied with one other document at the top: rank 1, not 0.
    assert recall_at_k(np.array([[1.0, 1.0, 0.0]]), np.array([0]), 1) == 0.0
    assert ndcg_at_k(np.array([[1.0, 1.0, 0.0]]), np.array([1]), 10) == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize(
    "scores, gold, k",
    [
        (np.zeros((2, 3)), np.array([0, 1]), 0),  # k < 1
        (np.zeros((2, 3)), np.array([0, 3]), 1),  # gold out of range
        (np.zeros((2, 3)), np.array([0]), 1),  # one gold per query
        (np.zeros((0, 3)), np.array([], dtype=int), 1),  # no queries
        (np.array([[np.nan, 0.0]]), np.array([0]), 1),  # NaN scores
        (np.zeros((1, 2)), np.array([0.5]), 1),  # non-integer gold
    ],
)
def test_metrics_reject_bad_input(scores, gold, k):
    with pytest.raises(ValueError):
        recall_at_k(scores, gold, k)
    with pytest.raises(ValueError):
        ndcg_at_k(scores, gold, k)


# -- sentence queries ----------------------------------------------------------------------------


def test_split_sentences_at_sentence_ends_and_newlines():
    text = "One two three. Four five!  Six?\nSeven eight\n\nnine ten.Eleven"
    assert split_sentences(text) == ["One two three.", "Four five!", "Six?", "Seven eight", "nine ten.Eleven"]


def test_sentence_queries_are_deterministic_and_from_their_document(topic_documents):
    pairs = sample_sentence_queries(topic_documents, 12, seed=3, min_words=6, max_words=20)
    assert pairs == sample_sentence_queries(topic_documents, 12, seed=3, min_words=6, max_words=20)
    assert pairs != sample_sentence_queries(topic_documents, 12, seed=4, min_words=6, max_words=20)
    assert len(pairs) == 12
    assert len(set(pairs)) == 12
    for query, index in pairs:
        assert query in topic_documents[index]
        assert 6 <= len(query.split()) <= 20
    # Rounds over the documents: 12 queries from 6 documents give each document two.
    assert sorted(np.bincount([i for _, i in pairs])) == [2] * 6


def test_sentence_queries_skip_documents_without_a_fitting_sentence():
    documents = ["Too short. Tiny.", "This sentence has exactly seven words in it. Short one.", "Nope."]
    pairs = sample_sentence_queries(documents, 5, seed=0, min_words=6, max_words=8)
    assert pairs == [("This sentence has exactly seven words in it.", 1)]
    with pytest.raises(ValueError, match="no document"):
        sample_sentence_queries(["a b c."], 3, seed=0)
    with pytest.raises(ValueError):
        sample_sentence_queries([], 3, seed=0)
    with pytest.raises(ValueError):
        sample_sentence_queries(documents, 0, seed=0)
    with pytest.raises(ValueError):
        sample_sentence_queries(documents, 1, seed=0, min_words=6, max_words=5)


def test_sentence_found_in_two_documents_is_not_a_query():
    shared = "This shared sentence appears in both of the documents."
    documents = [shared + " Another long enough sentence sits in the first document.", shared]
    pairs = sample_sentence_queries(documents, 10, seed=0)
    assert pairs == [("Another long enough sentence sits in the first document.", 0)]


# -- synthetic documents -------------------------------------------------------------------------


@pytest.mark.parametrize("maker, marker", [(make_passkey_task, "pass key is"), (make_needle_task, None)])
def test_synthetic_documents(maker, marker, count_tokens):
    lengths = [128, 400]
    task = maker(lengths, n_docs=10, seed=5, count_tokens=count_tokens)
    assert task.lengths == lengths
    for length, item in task.sets.items():
        counts = count_tokens(item.documents)
        assert counts == item.token_counts
        assert all(0.9 * length <= c <= 1.1 * length for c in counts), counts
        assert list(item.gold) == list(range(10))
        assert len(item.queries) == len(item.documents) == len(item.depths) == 10
        names = [re.search(r"[A-Z][a-z]+ [A-Z][a-z]+(?='s| keeps| was| learned)", f).group(0) for f in item.facts]
        assert len(set(names)) == 10
        for i, (doc, fact, name) in enumerate(zip(item.documents, item.facts, names)):
            assert doc.count(fact) == 1
            if marker:
                assert doc.count(marker) == 1
            assert name in item.queries[i]
            # Neither the full name nor either half of it appears in any other document.
            for word in name.split():
                holders = [j for j, other in enumerate(item.documents) if word in other]
                assert holders == [i]
        assert min(item.depths) < 0.35 and max(item.depths) > 0.65
        assert all(0.0 <= d <= 1.0 for d in item.depths)
    again = maker(lengths, n_docs=10, seed=5, count_tokens=count_tokens)
    other = maker(lengths, n_docs=10, seed=6, count_tokens=count_tokens)
    assert again.sets[400].documents == task.sets[400].documents
    assert other.sets[400].documents != task.sets[400].documents


def test_passkey_task_uses_longembed_filler_and_distinct_keys(count_tokens):
    item = make_passkey_task([256], n_docs=8, seed=0, count_tokens=count_tokens).sets[256]
    assert len(set(item.answers)) == 8
    for doc, fact, answer in zip(item.documents, item.facts, item.answers):
        assert re.fullmatch(r"\d{5}", answer)
        assert doc.count(answer) == 2  # "<Name>'s pass key is N. Remember it. N is the pass key of <Name>."
        filler = doc.replace(fact, " ").split()
        assert set(filler) <= set("The grass is green. sky blue. sun yellow. Here we go. There and back again.".split())


def test_needle_filler_is_a_contiguous_slice_of_stdlib_prose(count_tokens):
    item = make_needle_task([300], n_docs=4, seed=1, count_tokens=count_tokens).sets[300]
    prose = " ".join(stdlib_prose().split())
    for doc, fact in zip(item.documents, item.facts):
        before, after = (" ".join(part.split()) for part in doc.split(fact))
        for part in (before, after):
            assert not part or part in prose


def test_depth_range_places_the_fact(count_tokens):
    item = make_passkey_task([300], n_docs=6, seed=2, count_tokens=count_tokens, depth_range=(0.7, 1.0)).sets[300]
    assert min(item.depths) >= 0.6
    for doc, fact in zip(item.documents, item.facts):
        assert doc.index(fact) > 0.5 * len(doc)


def test_synthetic_generation_rejects_bad_input(count_tokens):
    with pytest.raises(ValueError):
        make_passkey_task([0], n_docs=3, count_tokens=count_tokens)
    with pytest.raises(ValueError):
        make_passkey_task([256], n_docs=0, count_tokens=count_tokens)
    with pytest.raises(ValueError):
        make_passkey_task([256], n_docs=1000, count_tokens=count_tokens)
    with pytest.raises(ValueError):
        make_passkey_task([], n_docs=3, count_tokens=count_tokens)
    with pytest.raises(ValueError):
        make_passkey_task([256], n_docs=3, count_tokens=count_tokens, depth_range=(0.8, 0.2))


# -- end to end ----------------------------------------------------------------------------------


def assert_scores_in_range(methods: dict) -> None:
    assert set(methods) == set(METHODS)
    for values in methods.values():
        values = values.values() if isinstance(values, dict) else values
        assert all(0.0 <= v <= 1.0 for v in values)


def test_long_document_retrieval_end_to_end(encoder, topic_documents):
    result = long_document_retrieval(
        encoder, BagOfWordsTeacher(), topic_documents, n_queries=12, seed=0, chunk_size=64, chunk_overlap=16
    )
    assert result["n_queries"] == 12 and result["n_documents"] == 6
    assert_scores_in_range(result["methods"])
    for values in result["methods"].values():
        assert set(values) == {"ndcg@10", "recall@1"}
    tokens = result["document_tokens"]
    assert 0 < tokens["min"] <= tokens["median"] <= tokens["max"]
    assert result["n_truncated_documents"] == 0 and result["notes"] == []
    # An exact sentence is found by its words once the teacher sees every chunk.
    assert result["methods"]["teacher_chunks"]["recall@1"] >= 0.9
    assert result == long_document_retrieval(
        encoder, BagOfWordsTeacher(), topic_documents, n_queries=12, seed=0, chunk_size=64, chunk_overlap=16
    )
    table = format_table(result)
    assert all(method in table for method in METHODS) and "ndcg@10" in table


def test_long_documents_are_truncated_with_a_note(short_student):
    from pydoc_data.topics import topics

    documents = [topics["specialnames"][:6000], topics["assert"]]
    result = long_document_retrieval(short_student, BagOfWordsTeacher(), documents, n_queries=4, chunk_size=128)
    assert result["document_tokens"]["max"] > 512
    assert result["n_truncated_documents"] == 1
    assert any("truncated" in note for note in result["notes"])
    assert "Notes:" in format_table(result)


def test_bag_of_words_teacher_finds_the_passkey_by_name(short_student):
    result = synthetic_eval(
        short_student,
        BagOfWordsTeacher(max_tokens=256),
        lengths=(160, 1024),
        n_docs=6,
        seed=0,
        tasks=("passkey", "needle"),
        chunk_size=64,
        chunk_overlap=16,
    )
    assert result["lengths"] == [160] and result["skipped_lengths"] == [1024]
    assert any("skipped" in note for note in result["notes"])
    for task in ("passkey", "needle"):
        assert result["tasks"][task]["lengths"] == [160]
        assert_scores_in_range(result["tasks"][task]["methods"])
    assert result["tasks"]["passkey"]["methods"]["teacher_chunks"] == [1.0]
    table = format_table({"synthetic": result})
    assert "passkey" in table and "needle" in table and "| 160" in table


@pytest.mark.parametrize("splitter", ["tokens", "words"])
def test_truncated_teacher_misses_a_fact_beyond_its_window(encoder, count_tokens, splitter):
    # Facts in the last 30% of ~300-token documents; the teacher sees 24 words: only LongEmbed filler.
    task = make_passkey_task([300], n_docs=6, seed=0, count_tokens=count_tokens, depth_range=(0.7, 1.0))
    item = task.sets[300]
    assert all(len(doc[: doc.index(fact)].split()) > 24 for doc, fact in zip(item.documents, item.facts))
    result = evaluate_synthetic_task(
        encoder, BagOfWordsTeacher(max_tokens=24), task, chunk_size=24, chunk_overlap=4, splitter=splitter
    )
    assert result["methods"]["teacher_truncated"][0] <= 1 / 6
    assert result["methods"]["teacher_chunks"] == [1.0]


def test_evaluation_rejects_bad_input(encoder, topic_documents):
    teacher = BagOfWordsTeacher()
    with pytest.raises(ValueError):
        long_document_retrieval(encoder, teacher, [], n_queries=3)
    with pytest.raises(ValueError):
        long_document_retrieval(encoder, teacher, topic_documents, n_queries=3, chunk_size=32, chunk_overlap=32)
    with pytest.raises(ValueError, match="splitter"):
        long_document_retrieval(encoder, teacher, topic_documents, n_queries=3, splitter="nonsense")
    with pytest.raises(ValueError):
        synthetic_eval(encoder, teacher, lengths=(256,), tasks=("nonsense",))
    with pytest.raises(ValueError, match="exceeds"):
        synthetic_eval(encoder, teacher, lengths=(10**6,))
    with pytest.raises(ValueError):
        format_table({"something": 1})
