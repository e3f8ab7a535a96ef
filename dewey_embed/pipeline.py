"""The per-batch function of dewey-embed, and the loop that writes its results.

``BatchEmbedder`` holds one Encoder and turns a window of input rows (``inputs.INPUT_SCHEMA``) into a
result table of ``result_schema``: one row per input row, ``embedded`` (with the document vector and,
with chunks, the list of its chunks), ``done`` (its id is in a complete shard of OUT already) or
``failed``. It is the whole of the embedding work: the one-machine run calls it in a loop, and on Ray it
is the map_batches actor. The Encoder sorts the window's documents by length and batches them under the
token budget, so a long document never pads a batch of short ones.

``write_results`` consumes result tables in the order they come: failed rows go to errors.jsonl, done
rows are counted, a document whose id was already met is reported as a duplicate (ids must be unique:
they are what a resumed run skips by), and the embedded rest becomes one shard.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtimes import load
from runtimes.chunking import check_chunk_args
from runtimes.encoder import TruncationWarning

from .shards import OutputFolder, chunks_schema, documents_schema, vector_type

EMBEDDED, DONE, FAILED = "embedded", "done", "failed"
DUPLICATE_ERROR = "duplicate id: a document met earlier in this corpus has the same id; this one was skipped"


@dataclass(frozen=True)
class EmbedOptions:
    """What decides the vectors, beside the model and the backend (batch_tokens decides only the speed)."""

    mode: str
    prompt: str | None
    chunks: bool
    chunk_size: int
    chunk_overlap: int
    splitter: str
    max_length: int | None
    batch_tokens: int

    def identity(self) -> dict:
        """The options a resumed run must share with the run that began OUT; chunk settings only with chunks."""
        options = asdict(self)
        del options["batch_tokens"]  # padding changes vectors by float rounding only
        if not self.chunks:
            options.update(chunk_size=None, chunk_overlap=None, splitter=None)
        return options


def result_schema(dim: int, chunks: bool) -> pa.Schema:
    """The per-batch function's output: a documents row plus status and error, and the chunks as a list."""
    documents = documents_schema(dim)
    fields = [documents.field("id"), documents.field("source"),
              pa.field("status", pa.string()),  # EMBEDDED, DONE or FAILED
              pa.field("error", pa.string()),  # why a FAILED row failed
              documents.field("n_tokens"), documents.field("truncated_tokens"), documents.field("vector")]
    if chunks:
        chunk_fields = [field for field in chunks_schema(dim) if field.name != "doc_id"]
        fields.append(pa.field("chunks", pa.list_(pa.struct(chunk_fields))))
    return pa.schema(fields)


def token_budget(config, tokenizer, options: EmbedOptions) -> int:
    """Text tokens one row holds with ``options`` (beside [CLS], [SEP] and the prompt), as the Encoder
    counts them; ValueError for options the model cannot take (an unknown prompt name, a max_length
    past its positions, chunk sizes out of range), so a run can refuse them before reading anything."""
    if options.chunks:
        check_chunk_args(options.chunk_size, options.chunk_overlap, options.splitter)
    limit = config.max_position_embeddings
    if options.max_length is not None and options.max_length > limit:
        raise ValueError(f"max_length={options.max_length} exceeds the model's maximum of {limit} positions")
    return tokenizer.text_budget(tokenizer.prompt_ids(options.prompt), options.max_length or limit)


def running_precision(backend: str, exported: str) -> str:
    """The precision an export of precision ``exported`` runs in with ``backend`` on this machine: its
    own, except on openvino, which compiles a bf16 export in fp32 on a CPU without native bfloat16 (the
    backend's own rule, asked here without loading the model). A resumed run compares it with OUT's."""
    if backend != "openvino":
        return exported
    import openvino

    from runtimes.backends import openvino_backend

    return openvino_backend.inference_precision(None, openvino_backend.cpu_has_bf16(openvino.Core()), exported)


def thread_options(backend: str, threads: int | None) -> dict:
    """Limit the Encoder to ``threads`` CPU threads (one of several on a machine): torch's thread count is
    per process and set here; ONNX Runtime's is a session option, returned for ``load``."""
    if threads is None:
        return {}
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
        return {}
    return {"threads": threads}


class BatchEmbedder:
    """One Encoder, and the function from a window of input rows to a result table. Rows whose id is in
    ``done_ids`` (the documents already in OUT) pass through as ``done``, unembedded. ``precision``: what
    the run's settings say the backend runs; a backend that reports another (a Ray node whose CPU lacks
    bfloat16) raises ValueError before embedding anything."""

    def __init__(self, model: str, backend: str, device: str | None, options: EmbedOptions,
                 done_ids: frozenset = frozenset(), threads: int | None = None, precision: str | None = None):
        self.encoder = load(model, backend=backend, device=device, **thread_options(backend, threads))
        running = getattr(self.encoder.backend, "precision", None)
        if precision is not None and running is not None and running != precision:
            raise ValueError(f"the {backend} backend runs {model} in {running} on this machine, not in {precision} "
                             "as the run's settings say")
        self.options = options
        self.done_ids = done_ids
        self.schema = result_schema(self.encoder.vector_size, options.chunks)
        self._budget = token_budget(self.encoder.config, self.encoder.tokenizer, options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        status = [FAILED if row["error"] is not None else DONE if row["id"] in self.done_ids else EMBEDDED
                  for row in rows]
        errors = [row["error"] for row in rows]
        pending = [i for i, state in enumerate(status) if state == EMBEDDED]
        # Token counts for n_tokens and truncated_tokens, tokenized piece by piece: past the budget the
        # tokens are only counted (here; with chunks encode_chunks windows them all and says how many),
        # so a huge text costs time, never memory. A text the tokenizer reduces to nothing (only characters it drops) would
        # fail the whole window inside the Encoder, so it fails alone here.
        n_tokens = [None] * len(rows)
        for i in pending:
            n_tokens[i] = self.encoder.tokenizer.bounded_tokens(rows[i]["text"], self._budget,
                                                                count=not self.options.chunks).total
            if n_tokens[i] == 0:
                status[i], errors[i] = FAILED, "the text has no tokens: there is nothing to embed"
        pending = [i for i in pending if status[i] == EMBEDDED]
        embedded = np.zeros(len(rows), dtype=bool)
        embedded[pending] = True
        vectors = np.zeros((len(rows), self.encoder.vector_size), dtype=np.float32)
        documents = self._embed([rows[i]["text"] for i in pending], vectors, pending)
        for i, document in zip(pending, documents):
            if n_tokens[i] is None:  # longer than the budget: encode_chunks windowed all of it
                n_tokens[i] = document.n_tokens

        # With chunks, a document over the row runs in windows (Encoder.encode_chunks): nothing is cut.
        budget = float("inf") if self.options.chunks else self._budget
        columns = {
            "id": [row["id"] for row in rows],
            "source": [row["source"] for row in rows],
            "status": status,
            "error": errors,
            "n_tokens": [min(n, budget) if ok else None for n, ok in zip(n_tokens, embedded)],
            "truncated_tokens": [max(n - budget, 0) if ok else None for n, ok in zip(n_tokens, embedded)],
        }
        arrays = [pa.array(values, type=self.schema.field(name).type) for name, values in columns.items()]
        arrays.append(_vectors(vectors, null=~embedded))
        if self.options.chunks:
            arrays.append(self._chunk_lists(documents, pending, embedded))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _embed(self, texts: list[str], vectors: np.ndarray, rows: list[int]) -> list:
        """Fill ``vectors[rows]`` with the document vectors of ``texts``; returns their ChunkedDocuments
        with chunks, else []."""
        if not texts:
            return []
        options = self.options
        common = dict(prompt=options.prompt, max_length=options.max_length, max_batch_tokens=options.batch_tokens,
                      show_progress=False)
        with warnings.catch_warnings():
            # Truncation is recorded per document (truncated_tokens), not warned about per window.
            warnings.simplefilter("ignore", TruncationWarning)
            if not options.chunks:
                vectors[rows] = self.encoder.encode(texts, mode=options.mode, **common)
                return []
            # One forward pass per document gives its vector and its chunks' vectors together.
            documents = self.encoder.encode_chunks(texts, chunk_size=options.chunk_size, mode=options.mode,
                                                   chunk_overlap=options.chunk_overlap, splitter=options.splitter,
                                                   **common)
            vectors[rows] = np.stack([document.vector for document in documents])
            return documents

    def _chunk_lists(self, documents, rows: list[int], embedded: np.ndarray) -> pa.Array:
        """The ``chunks`` column: the list of its chunks for each embedded row, null for the others."""
        struct_type = self.schema.field("chunks").type.value_type
        lengths = np.zeros(len(embedded), dtype=np.int32)
        lengths[rows] = [len(document.texts) for document in documents]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        token_spans = [span for document in documents for span in document.token_spans]
        char_spans = [span for document in documents for span in document.char_spans]
        children = {
            "chunk_index": [j for document in documents for j in range(len(document.texts))],
            "token_start": [a for a, _ in token_spans],
            "token_end": [b for _, b in token_spans],
            "char_start": [a for a, _ in char_spans],
            "char_end": [b for _, b in char_spans],
            "text": [text for document in documents for text in document.texts],
        }
        arrays = [pa.array(values, type=struct_type.field(name).type) for name, values in children.items()]
        arrays.append(_vectors(np.concatenate([document.vectors for document in documents]
                                              or [np.zeros((0, self.encoder.vector_size), dtype=np.float32)])))
        values = pa.StructArray.from_arrays(arrays, fields=list(struct_type))
        return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~embedded))


def _vectors(matrix: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """Rows of a float32 [N, D] matrix as a fixed-size-list column (``null``: rows that are null)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(
        pa.array(matrix.reshape(-1)), type=vector_type(matrix.shape[1]),
        mask=None if null is None else pa.array(null),
    )


def split_result(result: pa.Table, keep: np.ndarray) -> tuple[pa.Table, pa.Table | None]:
    """The documents and chunks tables of one shard: the result rows where ``keep`` (embedded ones)."""
    kept = result.filter(pa.array(keep))
    dim = kept.schema.field("vector").type.list_size
    documents = kept.select(documents_schema(dim).names).cast(documents_schema(dim))
    if "chunks" not in kept.column_names:
        return documents, None
    lists = kept["chunks"].combine_chunks()
    chunk_rows = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    columns = {"doc_id": pc.take(kept["id"], parents)}
    columns.update({field.name: chunk_rows.field(field.name) for field in chunk_rows.type})
    return documents, pa.table(columns, schema=chunks_schema(dim))


class Progress:
    """Two tqdm bars, documents (of the counted total) and tokens embedded (with tokens/s); shown only
    when stderr is a terminal."""

    def __init__(self, total_documents: int):
        from tqdm.auto import tqdm

        self.documents = tqdm(total=total_documents, unit="doc", desc="documents", position=0, disable=None)
        self.tokens = tqdm(unit="tok", unit_scale=True, desc="tokens", position=1, disable=None)

    def update(self, documents: int, tokens: int, skipped: int, failed: int) -> None:
        self.documents.update(documents)
        self.documents.set_postfix(skipped=skipped, failed=failed, refresh=False)
        self.tokens.update(tokens)

    def close(self) -> None:
        # The total was counted ahead, before the files were parsed: a Parquet file without the text
        # column counts its rows there but gives one error row. The final count is the true one.
        self.documents.total = self.documents.n
        self.tokens.close()
        self.documents.close()


def write_results(results, output: OutputFolder, progress: Progress) -> dict:
    """Write each result table as one shard (its embedded, not duplicate rows), errors to errors.jsonl;
    returns this run's figures: embedded, skipped (done before), failed documents, tokens, seconds."""
    started = time.perf_counter()
    figures = {"embedded": 0, "skipped": 0, "failed": 0, "tokens": 0}
    seen: set[str] = set()
    for result in results:
        status = result["status"].to_pylist()
        ids = result["id"].to_pylist()
        keep = np.zeros(len(status), dtype=bool)
        for i, (doc_id, state) in enumerate(zip(ids, status)):
            if state == FAILED:
                output.record_error(doc_id, result["source"][i].as_py(), result["error"][i].as_py())
                figures["failed"] += 1
            elif doc_id in seen:
                output.record_error(doc_id, result["source"][i].as_py(), DUPLICATE_ERROR)
                figures["failed"] += 1
            else:
                seen.add(doc_id)
                keep[i] = state == EMBEDDED
                figures["skipped"] += state == DONE
        tokens = 0
        if keep.any():
            documents, chunks = split_result(result, keep)
            output.write_shard(documents, chunks)
            tokens = int(pc.sum(documents["n_tokens"]).as_py())
            figures["embedded"] += documents.num_rows
            figures["tokens"] += tokens
        progress.update(len(status), tokens, figures["skipped"], figures["failed"])
    figures["seconds"] = round(time.perf_counter() - started, 3)
    return figures
