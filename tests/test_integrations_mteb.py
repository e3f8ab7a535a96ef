"""The MTEB adapter on the packaged dewey-mini: a retrieval task defined here (pages of Python's reference,
questions drawn from their sentences, one relevant page each; no hub), run through ``mteb.evaluate`` on the
torch backend and on an ONNX export of the same model. Both backends score the same (to 1e-4), and nDCG@10
equals the project's own evaluation (``ndcg_at_k``) of the same vectors, single-vector and multi-vector
(a page scores as its best late chunk)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch", reason="the packaged model runs on the torch backend")
pytest.importorskip("mteb", reason="the mteb extra is not installed")
import mteb  # noqa: E402
from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from runtimes.evaluation import ndcg_at_k, sample_sentence_queries  # noqa: E402
from runtimes import Encoder  # noqa: E402
from runtimes.integrations.mteb import DeweyMTEBModel, DeweyMTEBMultiVector  # noqa: E402
from test_integrations_imports import CHUNK_OVERLAP, CHUNK_SIZE, corpus  # noqa: E402

N_QUESTIONS = 16  # two per page: enough for an nDCG@10 below 1 on dewey-mini
SEED = 0
BACKEND_ATOL = 1e-4  # the bound for the same task scored on two backends
# The metric families mteb reports for retrieval (the nAUC ones need more queries than a test has).
METRICS = ("ndcg_at_", "map_at_", "recall_at_", "precision_at_", "mrr_at_", "hit_rate_at_")


def local_data():
    """(corpus ids, page texts, questions, index of each question's page)."""
    pages = corpus()
    ids, texts = list(pages), list(pages.values())
    pairs = sample_sentence_queries(texts, N_QUESTIONS, seed=SEED)
    return ids, texts, [question for question, _ in pairs], np.array([page for _, page in pairs])


class LocalRetrieval(AbsTaskRetrieval):
    """A retrieval task whose data is built here: no download."""

    metadata = TaskMetadata(
        name="DeweyLocalRetrieval", description="Questions drawn from pages of Python's reference.",
        type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", dataset={"path": "local/dewey-python-reference", "revision": "local"},
    )

    def load_data(self, num_proc=None, **kwargs) -> None:
        ids, texts, questions, gold = local_data()
        self.dataset = {"default": {"test": RetrievalSplitData(
            corpus=Dataset.from_list([{"id": i, "title": "", "text": t} for i, t in zip(ids, texts)]),
            queries=Dataset.from_list([{"id": f"q{k}", "text": q} for k, q in enumerate(questions)]),
            relevant_docs={f"q{k}": {ids[g]: 1} for k, g in enumerate(gold)},
            top_ranked=None,
        )}}
        self.data_loaded = True


def mteb_scores(model) -> dict[str, float]:
    """mteb's retrieval metrics of ``model`` on the local task (nothing cached on disk)."""
    result = mteb.evaluate(model, LocalRetrieval(), cache=None, show_progress_bar=False,
                           encode_kwargs={"batch_size": 8, "show_progress_bar": False})
    scores = result.task_results[0].scores["test"][0]
    return {key: float(value) for key, value in scores.items() if key.startswith(METRICS)}


def own_ndcg_at_10(encoder, multi_vector: bool) -> float:
    """The project's own evaluation of the same data: Encoder vectors, ``ndcg_at_k``."""
    _, texts, questions, gold = local_data()
    queries = encoder.encode(questions, prompt="query")
    if not multi_vector:
        return ndcg_at_k(queries @ encoder.encode(texts, prompt="passage").T, gold, 10)
    docs = encoder.encode_chunks(texts, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP, prompt="passage")
    scores = np.stack([(queries @ doc.vectors.T).max(axis=1) for doc in docs], axis=1)
    return ndcg_at_k(scores, gold, 10)


def models(encoder) -> dict[str, DeweyMTEBModel]:
    return {
        "single": DeweyMTEBModel(encoder),
        "multi": DeweyMTEBMultiVector(encoder, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP),
    }


@pytest.fixture(scope="module")
def torch_encoder():
    from runtimes import load

    return load()


@pytest.fixture(scope="session")
def mini_onnx(tmp_path_factory):
    """dewey-mini exported to ONNX once per session (verified against PyTorch at export)."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason="the export extra is not installed")
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export
    from runtimes import default_model_path

    return export(default_model_path(), tmp_path_factory.mktemp("mteb") / "dewey-mini-onnx", OnnxTarget(),
                  log=lambda message: None).folder


@pytest.fixture(scope="module")
def torch_scores(torch_encoder):
    return {kind: mteb_scores(model) for kind, model in models(torch_encoder).items()}


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_mteb_ndcg_equals_the_projects_own_evaluation(torch_encoder, torch_scores, kind):
    scores = torch_scores[kind]
    own = own_ndcg_at_10(torch_encoder, multi_vector=kind == "multi")
    assert 0.5 < own < 1.0  # a task that can tell rankings apart
    assert scores["ndcg_at_10"] == pytest.approx(own, abs=BACKEND_ATOL)


def test_onnx_backend_scores_as_torch(mini_onnx, torch_scores):
    from runtimes import load

    onnx_scores = {kind: mteb_scores(model) for kind, model in models(load(mini_onnx, backend="onnx")).items()}
    for kind in ("single", "multi"):
        torch_kind, onnx_kind = torch_scores[kind], onnx_scores[kind]
        assert set(torch_kind) == set(onnx_kind) and len(torch_kind) >= 30
        different = {k: (torch_kind[k], onnx_kind[k]) for k in torch_kind
                     if not math.isclose(torch_kind[k], onnx_kind[k], rel_tol=0, abs_tol=BACKEND_ATOL)}
        assert not different, (kind, different)


def test_task_and_prompt_type_choose_the_prompt(torch_encoder):
    def task(task_type, name="SomeTask"):
        return SimpleNamespace(type=task_type, name=name)

    model = DeweyMTEBModel(torch_encoder)
    assert model.prompt_for(task("Retrieval"), PromptType.query) == "query"
    assert model.prompt_for(task("Retrieval"), PromptType.document) == "passage"
    assert model.prompt_for(task("STS"), None) is None  # dewey-mini declares no "sts" prompt
    prompts = {**torch_encoder.config.prompts, "sts": "Similar: ", "Banking77Classification": "Intent: "}
    declaring = Encoder(replace(torch_encoder.config, prompts=prompts), torch_encoder.tokenizer, torch_encoder.backend)
    model = DeweyMTEBModel(declaring)
    for symmetric in ("STS", "PairClassification", "Summarization", "Reranking"):
        assert model.prompt_for(task(symmetric), PromptType.query) == "sts"
    assert model.prompt_for(task("Classification", "Banking77Classification"), None) == "Banking77Classification"
    assert model.prompt_for(task("Classification", "ImdbClassification"), None) is None
    assert model.prompt_for(task("Retrieval"), PromptType.document) == "passage"


def test_encode_is_the_encoders_with_the_chosen_prompt(torch_encoder):
    _, _, questions, _ = local_data()
    batches = [{"text": questions[:3]}, {"text": questions[3:6]}]  # what mteb's dataloader yields
    vectors = DeweyMTEBModel(torch_encoder).encode(
        batches, task_metadata=LocalRetrieval.metadata, hf_split="test", hf_subset="default",
        prompt_type=PromptType.query, batch_size=6)
    np.testing.assert_array_equal(vectors, torch_encoder.encode(questions[:6], prompt="query", batch_size=6))


def test_multi_vector_search_scores_best_chunks_and_reranks_only_candidates(torch_encoder):
    ids, texts, questions, gold = local_data()
    task = LocalRetrieval()
    task.load_data()
    split = task.dataset["default"]["test"]
    model = DeweyMTEBMultiVector(torch_encoder, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)
    options = dict(task_metadata=task.metadata, hf_split="test", hf_subset="default",
                   encode_kwargs={"batch_size": 8, "show_progress_bar": False})
    with pytest.raises(ValueError, match="index"):
        model.search(split["queries"], top_k=3, **options)
    model.index(split["corpus"], **options)
    results = model.search(split["queries"], top_k=3, **options)
    queries = torch_encoder.encode(questions, prompt="query", batch_size=8)
    docs = torch_encoder.encode_chunks(texts, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP, prompt="passage",
                                       batch_size=8)
    for k, query in enumerate(queries):
        best = {ids[j]: float((query @ doc.vectors.T).max()) for j, doc in enumerate(docs)}
        top3 = sorted(best, key=best.get, reverse=True)[:3]
        assert list(results[f"q{k}"]) == top3
        assert [results[f"q{k}"][d] for d in top3] == pytest.approx([best[d] for d in top3], abs=1e-6)
    candidates = {f"q{k}": [ids[(g + 1) % len(ids)], ids[g]] for k, g in enumerate(gold)}
    reranked = model.search(split["queries"], top_k=5, top_ranked=candidates, **options)
    assert all(set(reranked[q]) == set(candidates[q]) for q in candidates)


def test_example_scores_the_same_on_both_backends(tmp_path, mini_onnx):
    from test_examples import run_example, succeeded

    lines = {}
    for backend, folder in (("torch", None), ("onnx", mini_onnx)):
        args = [] if folder is None else ["--model", folder, "--backend", backend]
        out = succeeded(run_example("mteb_local_task.py", *args, cwd=tmp_path))
        lines[backend] = [line for line in out.splitlines() if line.startswith("DeweyMTEB")]
    assert len(lines["torch"]) == 2 and lines["torch"] == lines["onnx"], lines
    for line in lines["torch"]:
        assert 0.5 < float(re.search(r"ndcg_at_10 ([\d.]+)", line)[1]) <= 1.0, line
