"""Triton Python-backend model: texts in, Dewey vectors out (copied as ``model.py`` by dewey_export.triton).

It runs inside Triton's Python stub, beside the ``runtimes`` package and the model's config and tokenizer,
which ``write_triton_repository`` copies into the same version folder. Everything but the forward pass is
the Encoder's own code (tokenization, prompts, truncation, chunk spans, batching, modes, normalisation):
``TritonGraphBackend`` is an Encoder backend whose forward is a BLS request to the repository's graph model.
BLS rather than ONNX Runtime in this process: the graph model is then scheduled and batched by the server
(its dynamic batcher merges the requests of every instance of this model), runs on the GPU or the CPU as
its own instance_group says, and the same file serves an ONNX graph and a TensorRT engine unchanged; this
process needs only numpy and tokenizers.

Request: ``text`` BYTES [N, 1] (UTF-8). Optional request parameters: ``mode`` (``cls``, ``mean``,
``cls_add_mean``: one vector per text, default the model's; ``chunks``: late chunking), ``prompt`` (a
prompt name of the model or a literal prompt), and in chunk mode ``chunk_size``, ``chunk_overlap``,
``splitter``. Response: ``vectors`` FP32 [N, D]; in chunk mode ``chunk_vectors`` FP32 [N, C, D],
``chunk_spans`` INT64 [N, C, 2] (character spans into each text) and ``chunk_count`` INT64 [N, 1], padded
to the request's largest C with zero vectors and (-1, -1) spans. Concurrent requests with the same
parameters are encoded as one Encoder call.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The runtimes package copied beside this file, first: the export's own version, even when another
# dewey is installed in the stub's environment.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtimes.config import load_config  # noqa: E402
from runtimes.encoder import Encoder  # noqa: E402
from runtimes.tokenization import DeweyTokenizer  # noqa: E402

# Folder (beside this file) with the model's config.json and tokenizer files.
MODEL_FILES = "model_files"
CHUNK_MODE = "chunks"
# Request parameters of each mode; any other is refused rather than silently ignored.
ENCODE_PARAMETERS = ("mode", "prompt")
CHUNK_PARAMETERS = ("mode", "prompt", "chunk_size", "chunk_overlap", "splitter")
# Padding of chunk_spans beyond a text's own chunks.
NO_SPAN = -1


class TritonGraphBackend:
    """Encoder backend (runtimes.backends contract) running the forward pass as a BLS request to the
    repository's graph model."""

    name = "triton"

    def __init__(self, model_name: str, vector_size: int):
        self.model_name = model_name
        self.vector_size = vector_size

    def forward(self, input_ids, attention_mask, span_bounds):
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=np.int64)) for name, value in
                  (("input_ids", input_ids), ("attention_mask", attention_mask), ("span_bounds", span_bounds))]
        request = pb_utils.InferenceRequest(model_name=self.model_name, inputs=inputs,
                                            requested_output_names=["cls", "spans"])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"graph model {self.model_name}: {response.error().message()}")
        return tuple(pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in ("cls", "spans"))


class RequestError(ValueError):
    """A request that cannot be answered as sent: its message goes back to the client."""


def request_texts(request) -> list[str]:
    raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
    try:
        return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in raw]
    except UnicodeDecodeError as exc:
        raise RequestError(f"text must be UTF-8: {exc}") from None


def request_options(request) -> dict:
    """The request's parameters, checked against the mode's names."""
    options = json.loads(request.parameters() or "{}")
    allowed = CHUNK_PARAMETERS if options.get("mode") == CHUNK_MODE else ENCODE_PARAMETERS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RequestError(f"unknown request parameter(s) {unknown}; this mode takes {list(allowed)}")
    return options


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = {key: value["string_value"] for key, value in config["parameters"].items()}
        folder = Path(__file__).resolve().parent / MODEL_FILES
        model_config = load_config(folder)
        backend = TritonGraphBackend(settings["graph_model"], model_config.vector_size)
        self.encoder = Encoder(model_config, DeweyTokenizer.from_folder(folder, model_config), backend)
        # Batches as the graph model takes them: its max_batch_size rows and the token budget.
        self.batching = {"batch_size": int(settings["graph_max_batch_size"]),
                         "max_batch_tokens": int(settings["max_batch_tokens"])}

    def execute(self, requests):
        """One response per request; requests with equal parameters share one Encoder call. Should that
        call fail, each of its requests is answered alone, so one bad text fails only its own request."""
        responses = [None] * len(requests)
        groups: dict[str, list] = {}
        for index, request in enumerate(requests):
            try:
                texts, options = request_texts(request), request_options(request)
            except (RequestError, json.JSONDecodeError) as exc:
                responses[index] = error_response(exc)
                continue
            groups.setdefault(json.dumps(options, sort_keys=True), []).append((index, texts, options))
        for members in groups.values():
            try:
                answers = self.answer([texts for _, texts, _ in members], members[0][2])
            except (ValueError, TypeError, RuntimeError) as exc:
                if len(members) == 1:
                    responses[members[0][0]] = error_response(exc)
                    continue
                answers = [self.answer_alone(texts, options) for _, texts, options in members]
            for (index, _, _), answer in zip(members, answers):
                responses[index] = answer
        return responses

    def answer_alone(self, texts: list[str], options: dict):
        try:
            return self.answer([texts], options)[0]
        except (ValueError, TypeError, RuntimeError) as exc:
            return error_response(exc)

    def answer(self, text_lists: list[list[str]], options: dict) -> list:
        """Responses for requests of equal ``options``, the texts of all of them encoded in one call."""
        texts = [text for text_list in text_lists for text in text_list]
        options = dict(options)
        mode = options.pop("mode", None)
        if mode == CHUNK_MODE:
            docs = self.encoder.encode_chunks(texts, **options, **self.batching)
            results, start = [], 0
            for text_list in text_lists:
                results.append(chunk_response(docs[start:start + len(text_list)], self.encoder.vector_size))
                start += len(text_list)
            return results
        vectors = self.encoder.encode(texts, mode=mode, **options, **self.batching)
        bounds = np.cumsum([0] + [len(text_list) for text_list in text_lists])
        return [pb_utils.InferenceResponse([pb_utils.Tensor("vectors", vectors[a:b])])
                for a, b in zip(bounds[:-1], bounds[1:])]


def chunk_response(docs, vector_size: int):
    """Chunk outputs of one request, padded to its largest chunk count."""
    longest = max(len(doc.char_spans) for doc in docs)
    vectors = np.zeros((len(docs), longest, vector_size), dtype=np.float32)
    spans = np.full((len(docs), longest, 2), NO_SPAN, dtype=np.int64)
    for row, doc in enumerate(docs):
        vectors[row, : len(doc.char_spans)] = doc.vectors
        spans[row, : len(doc.char_spans)] = doc.char_spans
    counts = np.array([[len(doc.char_spans)] for doc in docs], dtype=np.int64)
    return pb_utils.InferenceResponse([pb_utils.Tensor("chunk_vectors", vectors),
                                       pb_utils.Tensor("chunk_spans", spans),
                                       pb_utils.Tensor("chunk_count", counts)])


def error_response(exc: Exception):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
