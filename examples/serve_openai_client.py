"""Serve the packaged dewey-mini with dewey-serve and query it with the official openai client.

Starts ``dewey-serve`` on 127.0.0.1 (a free port), waits until it is ready, embeds passages and a query
through the OpenAI embeddings API (the client's default base64 encoding), asks for late-chunked vectors
with the Dewey extension endpoint, then stops the server with SIGTERM. Needs the serve and torch extras
and the openai package; runs offline.

    python examples/serve_openai_client.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PASSAGES = [
    "The sky looks blue because air molecules scatter short wavelengths of sunlight more than long ones.",
    "Yeast ferments the sugars in dough and the carbon dioxide it releases makes bread rise.",
    "A lighthouse warns ships of dangerous coastlines with a bright rotating lamp.",
]
QUERY = "why does bread dough rise?"
STARTUP_TIMEOUT_S = 180


def start_server(log_path: Path, warmup_tokens: int) -> tuple[subprocess.Popen, str]:
    """dewey-serve on a free port; returns the process and its base URL once /ready says so."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dewey_serve.cli", "--port", "0",
                                    "--max-input-tokens", "2048", "--warmup-tokens", str(warmup_tokens)],
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        names = {e["event"]: e for e in events}
        if "ready" in names:
            return process, f"http://127.0.0.1:{names['listening']['port']}"
        if process.poll() is not None:
            raise SystemExit(f"dewey-serve exited {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"dewey-serve was not ready within {STARTUP_TIMEOUT_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-tokens", type=int, default=512, help="length of the server's warm-up forward")
    args = parser.parse_args()
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(Path(folder) / "server.log", args.warmup_tokens)
        try:
            print(f"dewey-serve ready at {url} (pid {process.pid})")
            client = OpenAI(base_url=url + "/v1", api_key="unused-without-api-key-file", timeout=120)
            passages = client.embeddings.create(model="dewey-mini", input=PASSAGES,
                                                extra_body={"prompt": "passage"})
            query = client.embeddings.create(model="dewey-mini", input=QUERY, extra_body={"prompt": "query"})
            p = np.array([d.embedding for d in passages.data], dtype=np.float32)
            q = np.array(query.data[0].embedding, dtype=np.float32)
            print(f"passage vectors {p.shape}, {passages.usage.total_tokens} tokens")
            scores = p @ q
            print(f"query: {QUERY}\n  best: {PASSAGES[int(np.argmax(scores))]} (score {scores.max():.3f})")

            document = " ".join(PASSAGES * 4)
            chunked = client.post("/embeddings/chunks", cast_to=object, body={
                "model": "dewey-mini", "input": document, "chunk_size": 48, "chunk_overlap": 8})
            chunks = chunked["data"][0]["chunks"]
            exact = sum(document[c["char_span"][0]:c["char_span"][1]] == c["text"] for c in chunks)
            print(f"late chunking: {len(chunks)} chunk vectors from one pass; "
                  f"document[a:b] == chunk text for {exact} of {len(chunks)} chunks")
        finally:
            os.kill(process.pid, signal.SIGTERM)
            code = process.wait(60)
        print(f"dewey-serve stopped with exit code {code}")


if __name__ == "__main__":
    main()
