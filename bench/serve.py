"""dewey-serve against in-process encoding: throughput, a short query's latency under long documents,
start-to-ready time and memory, in one run on one machine.

    python bench/serve.py                                  # dewey-mini, torch backend
    python bench/serve.py --backend onnx --texts 512 --clients 64 --long-tokens 32768

1. In-process (a child process, so its memory is measured alone): ``load`` the model, ``encode`` the
   texts (8..512 tokens each, cut from the stdlib's documentation) once to warm up, then once timed:
   tokens/s, and the process's RSS and peak RSS.
2. Server: ``dewey-serve`` in a subprocess on 127.0.0.1; seconds from the start to the 'listening' log
   line and to ``/ready`` (load + warm-up at ``--long-tokens``).
3. Saturation: ``--clients`` threads, each with a keep-alive connection, send the same texts
   (``--per-request`` per request, base64 as the openai client asks) as fast as answers come; wall time
   from the first send to the last answer: tokens/s, against step 1.
4. Latency: ``--long-clients`` threads keep sending ``--long-tokens``-token documents, so the long lane
   is never idle, while one client sends a 32-token query every ``--query-gap`` s: its p50 / p99 (and the
   same query's latency on the idle server before), beside the long documents' forward time.
5. The server's RSS and peak RSS.

The clients run on the same machine and take CPU from the server: the ratio in step 3 is a floor.
Not a test: numbers depend on the machine; docs/serve.md records them with the command.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUERY = "how do I read a file line by line?"  # padded below to about 32 tokens
QUERY_TOKENS = 32


def bench_texts(count: int, tokenizer) -> list[str]:
    """``count`` texts of 8..512 tokens (spread evenly), each from a different place of the stdlib docs."""
    from pydoc_data.topics import topics

    corpus = " ".join(topics[k] for k in sorted(topics))
    tokens = tokenizer.encode_texts([corpus])[0]
    texts, start = [], 0
    for i in range(count):
        n = 8 + (i * 504) // max(count - 1, 1)
        start = (start + 613) % (len(tokens.ids) - 600)
        a, b = int(tokens.offsets[start, 0]), int(tokens.offsets[start + n - 1, 1])
        texts.append(corpus[a:b])
    return texts


def long_document(tokenizer, n_tokens: int) -> str:
    from pydoc_data.topics import topics

    corpus = " ".join(topics[k] for k in sorted(topics))
    while len(tokenizer.encode_texts([corpus])[0].ids) < n_tokens:
        corpus += " " + corpus
    tokens = tokenizer.encode_texts([corpus])[0]
    return corpus[: int(tokens.offsets[n_tokens - 3, 1])]  # [CLS] + text + [SEP] = n_tokens


def query_text(tokenizer) -> str:
    text = QUERY
    while len(tokenizer.encode_texts([text])[0].ids) < QUERY_TOKENS - 2:
        text += " please"
    return text


def memory(pid: int | str = "self") -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024  # MiB
    return {"rss_mib": fields.get("VmRSS"), "peak_rss_mib": fields.get("VmHWM")}


def in_process(args) -> None:
    """Step 1, in its own process: loads, then encodes the texts once per line read on stdin ("go"),
    printing one JSON line each time; "quit" prints its memory and ends."""
    import runtimes
    from runtimes.batching import plan_batches

    started = time.perf_counter()
    encoder = runtimes.load(args.model, backend=args.backend)
    loaded = time.perf_counter() - started
    texts = bench_texts(args.texts, encoder.tokenizer)
    encoder.encode(texts[: len(texts) // 4])
    lengths = [len(t.ids) + 2 for t in encoder.tokenizer.encode_texts(texts)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan_batches(lengths))
    print(json.dumps({"load_s": loaded, "tokens": sum(lengths), "padded": padded}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start, cpu = time.perf_counter(), time.process_time()
        encoder.encode(texts)
        print(json.dumps({"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}), flush=True)
    print(json.dumps(memory()), flush=True)


class Client:
    """One keep-alive connection posting to /v1/embeddings."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def embed(self, texts, model: str) -> tuple[int, int]:
        body = json.dumps({"model": model, "input": texts, "encoding_format": "base64"})
        self.connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {answer}")
        for item in answer["data"]:  # decode as a client would
            base64.b64decode(item["embedding"])
        return response.status, answer["usage"]["total_tokens"]


def start_server(args, log_path: Path):
    command = [sys.executable, "-m", "dewey_serve.cli", "--port", "0", "--backend", args.backend,
               "--max-input-tokens", str(args.long_tokens), "--model-name", "bench"]
    if args.model:
        command.insert(3, str(args.model))
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    times, port = {}, None
    while "ready" not in times:
        if process.poll() is not None:
            raise SystemExit(f"dewey-serve exited {process.returncode}:\n{log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event["event"] in ("listening", "ready") and event["event"] not in times:
                    times[event["event"]] = time.perf_counter() - started
                    port = event.get("port", port)
                    if event["event"] == "ready":
                        times["load_s"], times["warmup_s"] = event["load_s"], event["warmup_s"]
        time.sleep(0.05)
    return process, port, times


def saturate(port: int, texts: list[str], clients: int, per_request: int) -> float:
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    lock = threading.Lock()

    def work():
        client = Client(port)
        while True:
            with lock:
                if not requests:
                    return
                batch = requests.pop()
            client.embed(batch, "bench")

    threads = [threading.Thread(target=work) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(port: int, name: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_under_long_documents(port: int, query: str, document: str, args) -> dict:
    idle_client = Client(port)
    idle = []
    for _ in range(5):
        start = time.perf_counter()
        idle_client.embed([query], "bench")
        idle.append(time.perf_counter() - start)
    stop = threading.Event()
    long_done = []

    def long_work():
        client = Client(port)
        while not stop.is_set():
            start = time.perf_counter()
            client.embed([document], "bench")
            long_done.append(time.perf_counter() - start)

    threads = [threading.Thread(target=long_work) for _ in range(args.long_clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the long lane is busy
    client, samples = Client(port), []
    while len(samples) < args.queries:
        start = time.perf_counter()
        client.embed([query], "bench")
        samples.append(time.perf_counter() - start)
        time.sleep(args.query_gap)
    stop.set()
    for thread in threads:
        thread.join()
    return {"idle_p50_ms": 1000 * statistics.median(idle), "p50_ms": 1000 * percentile(samples, 0.5),
            "p99_ms": 1000 * percentile(samples, 0.99), "max_ms": 1000 * max(samples), "queries": len(samples),
            "long_requests_done": len(long_done),
            "long_request_s": statistics.median(long_done) if long_done else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the packaged dewey-mini)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=32768)
    parser.add_argument("--long-clients", type=int, default=2)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--query-gap", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=3, help="alternating in-process / server throughput rounds")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        return in_process(args)

    import runtimes
    from runtimes.config import load_config
    from runtimes.tokenization import DeweyTokenizer

    folder = args.model or runtimes.default_model_path()
    tokenizer = DeweyTokenizer.from_folder(folder, load_config(folder))
    texts = bench_texts(args.texts, tokenizer)
    child = [sys.executable, __file__, "--in-process", "--backend", args.backend, "--texts", str(args.texts)]
    if args.model:
        child += ["--model", str(args.model)]
    local = subprocess.Popen(child, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(command: str) -> dict:
        local.stdin.write(command + "\n")
        local.stdin.flush()
        return json.loads(local.stdout.readline())

    setup = json.loads(local.stdout.readline())
    tokens = setup["tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        process, port, times = start_server(args, Path(tmp) / "server.log")
        try:
            print(f"server: listening after {times['listening']:.1f} s, ready after {times['ready']:.1f} s "
                  f"(load {times['load_s']:.1f} s, warm-up at {args.long_tokens} tokens {times['warmup_s']:.1f} s); "
                  f"in-process load {setup['load_s']:.1f} s", flush=True)
            saturate(port, texts[: len(texts) // 4], args.clients, args.per_request)  # warm the request path
            padded_before = metric(port, "dewey_serve_batch_padded_tokens_sum")
            local_s, server_s, local_cpu, server_cpu = [], [], [], []
            for _ in range(args.rounds):  # alternate, so both see the same load of a shared machine
                answer = ask("go")
                local_s.append(answer["seconds"])
                local_cpu.append(answer["cpu_s"])
                cpu = cpu_seconds(process.pid)
                server_s.append(saturate(port, texts, args.clients, args.per_request))
                server_cpu.append(cpu_seconds(process.pid) - cpu)
            padded = (metric(port, "dewey_serve_batch_padded_tokens_sum") - padded_before) / args.rounds
            local_rate, rate = tokens / statistics.median(local_s), tokens / statistics.median(server_s)
            print(f"{tokens} tokens ({len(texts)} texts of 8..512 tokens), median of {args.rounds} alternating rounds: "
                  f"in-process {local_rate:.0f} tokens/s (padded to {setup['padded']}); through the server, "
                  f"{args.clients} clients x {args.per_request} texts per request: {rate:.0f} tokens/s "
                  f"(padded to {padded:.0f}) = {rate / local_rate:.2f}x in-process", flush=True)
            print(f"  rounds, wall s: in-process {[round(x, 2) for x in local_s]}, server {[round(x, 2) for x in server_s]}")
            print(f"  CPU s of the encoding process: in-process {[round(x, 2) for x in local_cpu]}, server "
                  f"{[round(x, 2) for x in server_cpu]}: tokens per CPU-second through the server = "
                  f"{statistics.median(local_cpu) / statistics.median(server_cpu):.2f}x in-process", flush=True)
            server_memory = memory(process.pid)
            local_memory = ask("quit")
            print(f"memory after the same texts: in-process RSS {local_memory['rss_mib']} MiB (peak "
                  f"{local_memory['peak_rss_mib']}), server RSS {server_memory['rss_mib']} MiB (peak "
                  f"{server_memory['peak_rss_mib']})", flush=True)
            latency = latency_under_long_documents(port, query_text(tokenizer), long_document(tokenizer, args.long_tokens),
                                                   args)
            print(f"latency of a {QUERY_TOKENS}-token query: idle p50 {latency['idle_p50_ms']:.0f} ms; with "
                  f"{args.long_clients} clients sending {args.long_tokens}-token documents "
                  f"({latency['long_request_s']:.1f} s each, {latency['long_requests_done']} done): "
                  f"p50 {latency['p50_ms']:.0f} ms, p99 {latency['p99_ms']:.0f} ms, max {latency['max_ms']:.0f} ms "
                  f"over {latency['queries']} queries", flush=True)
            print(f"server memory after the long documents: {memory(process.pid)}", flush=True)
        finally:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(120)
            local.kill()
            local.wait(60)


if __name__ == "__main__":
    main()
