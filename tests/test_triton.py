"""``dewey-export --to triton``: the repository's configs, and a real Triton server serving it.

The server is tritonserver 2.51 from its own venv (tests/triton_env.py), on 127.0.0.1 with ephemeral
ports, auto-complete off, stopped by its PID. Its onnxruntime backend is emulated (no registry ships the
C++ one): results of the graph model are "onnxruntime backend emulated"; the core, the Python backend, the
dynamic batcher and BLS are the real ones. Skipped, with the reason, when the server cannot be installed.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtimes.export_format import ONNX_FILE

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from dewey_export.triton import GRAPH_MODEL, TEXT_MODEL, write_triton_repository  # noqa: E402

# The text model and the Encoder run the same ONNX graph on the same rows, but in other batches: fp32
# rounding of differently padded batches (tests/conftest.py FP32_ATOL, with room for the head's sums).
SERVER_ATOL = 1e-5
CONCURRENT_REQUESTS = 16
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Grüße aus Köln 🙂", "short", "a " * 90 + "end"]
_ORT_TO_TRITON = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32"}


@pytest.fixture(scope="module")
def repository(onnx_export, tmp_path_factory):
    return write_triton_repository(onnx_export, tmp_path_factory.mktemp("triton") / "repo", log=lambda m: None)


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    import triton_env

    try:
        venv = triton_env.ensure_venv(log=lambda m: None)
    except triton_env.ServerUnavailable as exc:
        pytest.skip(f"the Triton server venv cannot be built: {exc}")
    with triton_env.TritonServer(venv, repository, tmp_path_factory.mktemp("tritonserver")) as running:
        print(f"\ntritonserver start to ready: {running.ready_seconds:.2f} s")
        yield running


@pytest.fixture(scope="module")
def client(server):
    return httpclient.InferenceServerClient(server.url, network_timeout=60)


@pytest.fixture(scope="module")
def onnx_encoder(onnx_export):
    from runtimes import load

    return load(onnx_export, backend="onnx")


def config_text(repository, model: str) -> str:
    return (repository / model / "config.pbtxt").read_text(encoding="utf-8")


def config_tensors(text: str, block: str) -> dict:
    """``{name: (data_type, dims)}`` of a config's ``input`` or ``output`` block."""
    body = re.search(rf"^{block} \[\n(.*?)\n\]", text, re.S | re.M).group(1)
    return {name: (data_type, [int(d) for d in dims.split(",")]) for name, data_type, dims in
            re.findall(r'name: "(\w+)" data_type: (\w+) dims: \[ ([-\d, ]+) \]', body)}


def text_input(texts):
    array = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
    tensor = httpclient.InferInput("text", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def outputs(*names):
    return [httpclient.InferRequestedOutput(name) for name in names]


def statistics(client, model: str, timeout_s: float = 10.0) -> tuple[int, int]:
    """(requests answered, executions) of ``model`` so far, from the server's statistics, once they
    have settled: the server may count a request after its answer has reached the client (a Python
    backend model does), so one read right after a request can miss it. Reads until two reads
    0.2 s apart agree, for at most ``timeout_s``."""
    def read() -> tuple[int, int]:
        stats = client.get_inference_statistics(model)["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"])

    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        current = read()
        if current == last:
            return current
        last = current
    return last


# -- the repository, without a server -------------------------------------------------------------


def test_configs_follow_the_servers_load_rules(repository):
    """Triton refuses at load a dim of 0 and a preferred batch size above max_batch_size."""
    for model in (GRAPH_MODEL, TEXT_MODEL):
        text = config_text(repository, model)
        max_batch = int(re.search(r"^max_batch_size: (\d+)$", text, re.M).group(1))
        assert max_batch >= 1
        for block in ("input", "output"):
            for name, (_, dims) in config_tensors(text, block).items():
                assert dims and all(d == -1 or d > 0 for d in dims), f"{model} {name}: dims {dims}"
        for sizes in re.findall(r"preferred_batch_size: \[ ([\d, ]+) \]", text):
            assert all(0 < int(size) <= max_batch for size in sizes.split(",")), f"{model}: {sizes} > {max_batch}"


def test_graph_config_is_the_graphs_own_io(repository, onnx_export):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_export / ONNX_FILE), providers=["CPUExecutionProvider"])
    text = config_text(repository, GRAPH_MODEL)
    assert 'platform: "onnxruntime_onnx"' in text and "kind: KIND_CPU" in text
    for block, tensors in (("input", session.get_inputs()), ("output", session.get_outputs())):
        expected = {t.name: (_ORT_TO_TRITON[t.type], [d if isinstance(d, int) else -1 for d in t.shape[1:]])
                    for t in tensors}
        assert config_tensors(text, block) == expected
    assert (repository / GRAPH_MODEL / "1" / ONNX_FILE).read_bytes() == (onnx_export / ONNX_FILE).read_bytes()


def test_only_a_previous_repository_is_replaced(repository, onnx_export, tmp_path):
    from dewey_export.onnx_export import ExportError

    with pytest.raises(ExportError, match="overwrite"):
        write_triton_repository(onnx_export, repository, log=lambda m: None)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="never replaced"):
        write_triton_repository(onnx_export, tmp_path, log=lambda m: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- a real server ----------------------------------------------------------------------------------


def test_every_model_is_ready(client):
    index = {entry["name"]: entry.get("state") for entry in client.get_model_repository_index()}
    assert index == {GRAPH_MODEL: "READY", TEXT_MODEL: "READY"}


@pytest.mark.parametrize("parameters", [{}, {"mode": "cls"}, {"mode": "mean"}, {"prompt": "query"}],
                         ids=["default", "cls", "mean", "prompt"])
def test_text_model_matches_the_encoder(client, onnx_encoder, parameters):
    result = client.infer(TEXT_MODEL, [text_input(TEXTS)], outputs=outputs("vectors"), parameters=parameters)
    served = result.as_numpy("vectors")
    local = onnx_encoder.encode(TEXTS, **parameters)
    assert served.dtype == np.float32 and served.shape == local.shape
    diff = float(np.abs(served - local).max())
    print(f"\n{parameters or 'default'}: max abs diff vs Encoder {diff:.2e} (onnxruntime backend emulated)")
    assert diff <= SERVER_ATOL


def test_chunk_mode_matches_encode_chunks(client, onnx_encoder, long_text):
    texts = [long_text[:3000], TEXTS[0]]
    parameters = {"mode": "chunks", "chunk_size": 64, "chunk_overlap": 16, "splitter": "words"}
    result = client.infer(TEXT_MODEL, [text_input(texts)], parameters=parameters,
                          outputs=outputs("chunk_vectors", "chunk_spans", "chunk_count"))
    docs = onnx_encoder.encode_chunks(texts, chunk_size=64, chunk_overlap=16, splitter="words")
    counts = result.as_numpy("chunk_count")[:, 0]
    assert counts.tolist() == [len(doc.char_spans) for doc in docs] and counts[0] > 1
    for row, doc in enumerate(docs):
        n = len(doc.char_spans)
        assert result.as_numpy("chunk_spans")[row, :n].tolist() == [list(span) for span in doc.char_spans]
        assert np.abs(result.as_numpy("chunk_vectors")[row, :n] - doc.vectors).max() <= SERVER_ATOL
        assert (result.as_numpy("chunk_spans")[row, n:] == -1).all()


def graph_inputs(encoder, texts):
    """The graph's inputs for ``texts``, as the Encoder lays them out (one span: the text tokens)."""
    from runtimes.batching import pad_batch

    tokens = encoder.tokenizer.encode_texts(texts)
    rows = [encoder.tokenizer.row(np.zeros(0, dtype=np.int64), t.ids) for t in tokens]
    spans = [np.array([[1, 1 + len(t.ids)]], dtype=np.int64) for t in tokens]
    arrays = pad_batch(rows, spans, encoder.config.pad_token_id)
    tensors = []
    for name, array in zip(("input_ids", "attention_mask", "span_bounds"), arrays):
        tensor = httpclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return arrays, tensors


def test_graph_model_matches_the_onnx_backend(client, onnx_encoder):
    arrays, tensors = graph_inputs(onnx_encoder, TEXTS)
    result = client.infer(GRAPH_MODEL, tensors, outputs=outputs("cls", "spans"))
    cls, spans = onnx_encoder.backend.forward(*arrays)
    assert np.abs(result.as_numpy("cls") - cls).max() <= SERVER_ATOL
    assert np.abs(result.as_numpy("spans") - spans).max() <= SERVER_ATOL


def test_graph_model_refuses_more_rows_than_max_batch_size(client, onnx_encoder, repository):
    max_batch = int(re.search(r"^max_batch_size: (\d+)$", config_text(repository, GRAPH_MODEL), re.M).group(1))
    _, tensors = graph_inputs(onnx_encoder, ["x"] * (max_batch + 1))
    with pytest.raises(InferenceServerException) as refused:
        client.infer(GRAPH_MODEL, tensors)
    assert refused.value.status() == "400" and "batch" in refused.value.message()


def test_bad_request_parameters_fail_only_their_request(client):
    with pytest.raises(InferenceServerException, match="mode must be one of"):
        client.infer(TEXT_MODEL, [text_input(TEXTS)], parameters={"mode": "max"})
    with pytest.raises(InferenceServerException, match="unknown request parameter"):
        client.infer(TEXT_MODEL, [text_input(TEXTS)], parameters={"chunk_size": 8})
    assert client.infer(TEXT_MODEL, [text_input(TEXTS)]).as_numpy("vectors").shape[0] == len(TEXTS)


def send_together(url: str, model: str, make_inputs, output: str, count: int) -> list[np.ndarray]:
    """``count`` requests released at once from as many threads, each with its own client (a client is
    not thread-safe; the client's own async_infer sent them one after another: no batch was ever merged)."""
    barrier = threading.Barrier(count)

    def send(_):
        own = httpclient.InferenceServerClient(url, network_timeout=60)
        inputs = make_inputs()
        barrier.wait()
        return own.infer(model, inputs, outputs=outputs(output)).as_numpy(output)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(send, range(count)))


@pytest.mark.parametrize("model", [TEXT_MODEL, GRAPH_MODEL])
def test_concurrent_requests_are_batched_by_the_server(server, client, onnx_encoder, model):
    """Concurrent requests: fewer executions than requests in the server's statistics, same answers."""
    if model == TEXT_MODEL:
        make_inputs, output = (lambda: [text_input(TEXTS)]), "vectors"
    else:
        make_inputs, output = (lambda: graph_inputs(onnx_encoder, TEXTS)[1]), "cls"
    alone = client.infer(model, make_inputs(), outputs=outputs(output)).as_numpy(output)
    requests_before, executions_before = statistics(client, model)
    started = time.perf_counter()
    answers = send_together(server.url, model, make_inputs, output, CONCURRENT_REQUESTS)
    seconds = time.perf_counter() - started
    requests_after, executions_after = statistics(client, model)
    requests, executions = requests_after - requests_before, executions_after - executions_before
    print(f"\n{model}: {requests} requests in {executions} executions, "
          f"{requests * len(TEXTS) / seconds:.0f} texts/s through the server")
    assert requests == CONCURRENT_REQUESTS and executions < requests
    for answer in answers:
        assert np.abs(answer - alone).max() <= SERVER_ATOL


def test_throughput_against_the_encoder(client, onnx_encoder):
    """Figures for the report: texts per second through the server (sequential requests of 32 texts)
    and in-process with the Encoder on the same graph."""
    texts = (TEXTS * 8)[:32]
    rounds = 10
    started = time.perf_counter()
    for _ in range(rounds):
        client.infer(TEXT_MODEL, [text_input(texts)], outputs=outputs("vectors"))
    served = rounds * len(texts) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(rounds):
        onnx_encoder.encode(texts)
    local = rounds * len(texts) / (time.perf_counter() - started)
    print(f"\ntexts/s: {served:.0f} through the server, {local:.0f} in-process (onnxruntime backend emulated)")
    assert served > 0 and local > 0
