"""Fixtures of the dewey-serve tests: real servers (``python -m dewey_serve.cli`` in a subprocess on
127.0.0.1, an ephemeral port read from its 'listening' log line, stopped by its PID), dewey-mini
exported once per session to ONNX and OpenVINO, and the in-process Encoders they must agree with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="dewey-serve needs the serve extra: pip install 'dewey[serve]'")
pytest.importorskip("uvicorn", reason="dewey-serve needs the serve extra: pip install 'dewey[serve]'")
pytest.importorskip("openai", reason="the tests talk to the server with the official openai client")

ROOT = Path(__file__).resolve().parents[2]
# Seconds a server may take to listen and then to be ready (loading torch and dewey-mini on a busy
# 2-core machine takes ~10 s), and to exit after SIGTERM.
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60
# The tests' input limit: long enough for a few-hundred-token text and its chunks, short enough that the
# warm-up forward at it is quick.
MAX_INPUT_TOKENS = 1024
API_KEYS = ("sk-test-first-key", "sk-test-second-key")
# Answers of the server against the in-process Encoder: the bound.
PARITY_ATOL = 1e-6


class Server:
    """One ``dewey-serve`` process; its JSON log lines go to ``log_path``."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "dewey_serve.cli", "--port", "0", *args],
                                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.port = self._wait_for("listening")["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def events(self, name: str | None = None) -> list[dict]:
        records = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if name is None or record.get("event") == name:
                    records.append(record)
        return records

    def _wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = self.events(event)
            if found:
                return found[0]
            if self.process.poll() is not None:
                raise RuntimeError(f"dewey-serve exited {self.process.returncode}:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"dewey-serve logged no {event!r} within {START_TIMEOUT_S} s:\n{self.log_path.read_text()}")

    def wait_ready(self) -> "Server":
        self._wait_for("ready")
        status, _, _ = http("GET", self.url + "/ready")
        assert status == 200
        return self

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT_S)
        return self.process.returncode

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's samples named ``name`` whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        _, _, text = http("GET", self.url + "/metrics", raw=True)
        total = 0.0
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bool = False, timeout: float = 120):
    """(status, headers, JSON body or bytes) of one request, errors included."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, payload = exc.code, dict(exc.headers), exc.read()
    return status, head, payload if raw else json.loads(payload)


@pytest.fixture(scope="session")
def mini():
    """The packaged dewey-mini checkpoint."""
    from runtimes import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def mini_torch(mini):
    from runtimes import load

    return load(mini, backend="torch")


@pytest.fixture(scope="session")
def mini_onnx(mini, tmp_path_factory):
    """dewey-mini exported to ONNX once per session (the Python export function, as tests/test_export.py)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    return export(mini, tmp_path_factory.mktemp("serve-onnx") / "dewey-mini-onnx", OnnxTarget(), log=lambda m: None).folder


@pytest.fixture(scope="session")
def mini_openvino(mini, tmp_path_factory):
    """dewey-mini exported to OpenVINO (fp32) once per session, as tests/test_openvino.py does."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from dewey_export.openvino_export import OpenVINOTarget
    from dewey_export.pipeline import export

    result = export(mini, tmp_path_factory.mktemp("serve-ov") / "dewey-mini-openvino", OpenVINOTarget(precision="fp32"),
                    log=lambda m: None)
    return result.folder


def start(tmp_path_factory, name: str, *args) -> Server:
    return Server([str(a) for a in args], tmp_path_factory.mktemp(name) / "server.log")


@pytest.fixture(scope="session")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("# test keys\n" + "\n".join(API_KEYS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def torch_server(tmp_path_factory, mini, key_file):
    """dewey-mini on torch with API keys, a small payload limit and the tests' input limit."""
    server = start(tmp_path_factory, "torch-server", mini, "--api-key-file", key_file,
                   "--max-input-tokens", MAX_INPUT_TOKENS, "--max-payload-bytes", 200_000)
    try:
        yield server.wait_ready()
    finally:
        assert server.stop() == 0


@pytest.fixture
def client(torch_server):
    from openai import OpenAI

    with OpenAI(base_url=torch_server.url + "/v1", api_key=API_KEYS[1], max_retries=0, timeout=120) as c:
        yield c
