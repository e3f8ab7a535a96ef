"""MTEB: evaluate a Dewey model, on any backend, with ``mteb.evaluate`` on a retrieval task of your own.

The task is defined here, offline: pages of Python's own documentation (``pydoc_data.topics``) are the
corpus, and a few questions each have one relevant page. ``DeweyMTEBModel`` follows mteb's encoder
protocol (retrieval queries get the model's query prompt, documents its passage prompt);
``DeweyMTEBMultiVector`` also implements mteb's search, scoring each page as its best late chunk.
Run it on the packaged dewey-mini (PyTorch), then on an export (``--model FOLDER --backend onnx``) to
see the deployed model score what the original does.

    python examples/mteb_local_task.py
    python examples/mteb_local_task.py --model dewey-mini-onnx --backend onnx
"""

from __future__ import annotations

import argparse

import datasets
import mteb
from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from pydoc_data.topics import topics

from runtimes import load
from runtimes.integrations.mteb import DeweyMTEBModel, DeweyMTEBMultiVector

MAX_CHARS = 1500  # the start of each page: a few chunks each, quick on a CPU
CHUNK_SIZE, CHUNK_OVERLAP = 128, 32  # tokens, for the multi-vector run
QUESTIONS = {
    "What happens when the condition of an assert statement is false?": "assert",
    "How does Python find and load a module named in an import statement?": "import",
    "Which method of a context manager runs when a with block is entered?": "with",
    "When does the else clause of a for loop run?": "for",
    "How do I run cleanup code whether or not an exception was raised?": "try",
    "What does a class definition statement create?": "class",
    "Can an anonymous function contain statements or annotations?": "lambda",
    "How do I assign to a module-level variable from inside a function?": "global",
}
SHOWN = ("ndcg_at_10", "recall_at_1", "mrr_at_10")


class PythonReferenceRetrieval(AbsTaskRetrieval):
    """A retrieval task whose data is built here: no download."""

    metadata = TaskMetadata(
        name="PythonReferenceRetrieval", description="Questions about pages of Python's reference.",
        type="Retrieval", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", dataset={"path": "local/python-reference", "revision": "local"},
    )

    def load_data(self, num_proc=None, **kwargs) -> None:
        pages = sorted(set(QUESTIONS.values()))
        self.dataset = {"default": {"test": RetrievalSplitData(
            corpus=Dataset.from_list([{"id": name, "title": "", "text": topics[name][:MAX_CHARS]} for name in pages]),
            queries=Dataset.from_list([{"id": f"q{k}", "text": q} for k, q in enumerate(QUESTIONS)]),
            relevant_docs={f"q{k}": {page: 1} for k, page in enumerate(QUESTIONS.values())},
            top_ranked=None,
        )}}
        self.data_loaded = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A checkpoint or export folder (default: the packaged dewey-mini).")
    parser.add_argument("--backend", default="torch", help="torch, onnx, openvino or trt (default: torch).")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    datasets.disable_progress_bars()  # mteb reshapes the task's data with datasets.map
    encoder = load(args.model, backend=args.backend)
    print(f"model: {encoder}")
    for model in (DeweyMTEBModel(encoder),
                  DeweyMTEBMultiVector(encoder, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)):
        # cache=None: nothing is written under ~/.cache/mteb
        result = mteb.evaluate(model, PythonReferenceRetrieval(), cache=None, show_progress_bar=False,
                               encode_kwargs={"batch_size": args.batch_size, "show_progress_bar": False})
        scores = result.task_results[0].scores["test"][0]
        shown = ", ".join(f"{name} {scores[name]:.4f}" for name in SHOWN)
        print(f"{type(model).__name__}: {shown}")


if __name__ == "__main__":
    main()
