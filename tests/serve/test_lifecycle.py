"""The server's life: 503 until ready, SIGTERM under load (in-flight requests complete, later ones get
503, exit 0), a model that fails to load (exit 1), and bad command lines (exit 2, one line)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner

from dewey_serve.cli import EXIT_BAD_INPUT, main

from .conftest import PARITY_ATOL, STOP_TIMEOUT_S, Server, http, start

IN_FLIGHT = 6


def test_not_ready_then_ready_and_sigterm_drains_under_load(tmp_path_factory, mini, mini_torch):
    # a warm-up long enough that the first probes surely come before it ends
    server = start(tmp_path_factory, "drain", mini, "--warmup-tokens", 4096, "--max-input-tokens", 4096)
    try:
        assert server.events("listening")[0]["host"] == "127.0.0.1"
        status, headers, body = http("GET", server.url + "/ready")
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert http("GET", server.url + "/health")[0] == 200
        status, headers, body = http("POST", server.url + "/v1/embeddings", {"model": "dewey-mini", "input": "x"})
        assert status == 503 and headers["retry-after"] == "1"
        server.wait_ready()

        texts = [f"request {k}: " + "word " * 300 for k in range(IN_FLIGHT)]
        body_of = lambda k: {"model": "dewey-mini", "input": [texts[k]] * 32}  # noqa: E731
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(http, "POST", server.url + "/v1/embeddings", body_of(k)) for k in range(IN_FLIGHT)]
            deadline = time.monotonic() + 60
            while server.metric("dewey_serve_requests_in_flight") < IN_FLIGHT and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.metric("dewey_serve_requests_in_flight") == IN_FLIGHT
            os.kill(server.pid, signal.SIGTERM)
            while not server.events("draining"):
                time.sleep(0.02)
            status, headers, later = http("POST", server.url + "/v1/embeddings", {"model": "dewey-mini", "input": "x"})
            assert status == 503 and later["error"]["code"] == "shutting_down"
            assert http("GET", server.url + "/ready")[0] == 503 and http("GET", server.url + "/health")[0] == 200
            answers = [f.result(120) for f in futures]
        assert server.process.wait(STOP_TIMEOUT_S) == 0
        expected = mini_torch.encode(texts)
        for k, (status, _, body) in enumerate(answers):
            assert status == 200 and len(body["data"]) == 32
            np.testing.assert_allclose(body["data"][31]["embedding"], expected[k], rtol=0, atol=PARITY_ATOL)
        assert server.events("draining")[0]["in_flight"] == IN_FLIGHT
    finally:
        server.stop()


def test_a_model_that_fails_to_load_exits_1(checkpoint, tmp_path):
    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    server = Server([str(broken)], tmp_path / "server.log")
    try:
        assert server.process.wait(STOP_TIMEOUT_S) == 1
        failed = server.events("load_failed")
        assert failed and "safetensors" in failed[0]["error"].lower()
    finally:
        server.stop()


@pytest.mark.parametrize("args,needle", [
    (["{missing}"], "is not a folder"),
    (["{checkpoint}", "--backend", "onnx"], "export it first"),
    (["{checkpoint}", "--api-key-file", "{empty}"], "holds no key"),
    (["{checkpoint}", "--api-key-file", "{missing}"], "cannot read it"),
    (["{checkpoint}", "--max-input-tokens", "4096", "--max-queue-tokens", "1000"], "could never be queued"),
])
def test_bad_command_lines_exit_2_with_one_line(checkpoint, tmp_path, args, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    names = {"checkpoint": checkpoint, "missing": tmp_path / "missing", "empty": empty}
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert needle in result.output and "Traceback" not in result.output
