"""One prepared check for a lent GPU machine: what is there, parity, speed and memory, one compact report.

    python scripts/gpu_check.py                 # base shape, 8 x 512 batch and one 32k document
    python scripts/gpu_check.py --shape tiny --doc-tokens 4096 --budget-s 120   # a quick smoke run

Needs the repository (run from its root), torch, transformers, tokenizers and onnx/onnxscript; uses
onnxruntime-gpu, tensorrt and pynvml when they are installed, and says so when they are not. No network.

(a) The parity suite (tests/parity) for the backends available, without its TensorRT candidates: the
    two engines below are compared with PyTorch fp32 on the GPU by their own build (dewey-export's
    verification), so the run builds two engines, not four.
(b) Per backend: the load (for TensorRT: export, build and verification of an engine with two buckets,
    8 x 512 and one document), one batch of 8 texts up to 512 tokens and one long document, timed; peak
    GPU memory as torch's allocator saw it (reset per backend) and device-wide (NVML through pynvml when
    importable, else cudaMemGetInfo), sampled in a thread: TensorRT allocates outside torch's allocator.
(c) One table: every backend ran, was skipped (why) or failed (why), with its parity and the engine's
    compatibility notes. Every step has a deadline so the whole run stays within --budget-s (default
    420 s, under the 8 minutes a lent machine allows).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vector_size=128),
    "base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                 vector_size=768),
}
# The engines' short bucket: the timed batch of 8 texts up to 512 tokens. The second bucket holds the
# document (batch 1), so every engine has exactly two optimization profiles.
BATCH_BUCKET = (512, 8)
# Time a step needs at least before it is started: a TensorRT engine build (with its verification, or by
# ONNX Runtime's provider; estimated for the base shape, the table's load column shows what it really
# took), and any other backend.
MIN_SECONDS_FOR_ENGINE = 60
MIN_SECONDS_FOR_BACKEND = 10
# Seconds kept back from --budget-s for the report, and the share of it the parity suite may use.
REPORT_RESERVE_S = 30
PARITY_SHARE = 0.45
# How often the device memory in use is sampled while a backend loads and runs.
MEMORY_POLL_S = 0.01


def environment() -> dict:
    env = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnxruntime", "tensorrt", "pynvml"):
        try:
            env[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception as exc:  # missing or broken: say which
            env[name] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = f"{props.name} (cc {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    except ImportError:
        env["cuda"] = False
    try:
        import onnxruntime as ort

        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        env["ort_providers"] = []
    from dewey_export.trt_build import tensorrt_status

    env["tensorrt_status"] = tensorrt_status() or "ok"
    return env


def run_parity(deadline: float) -> dict:
    """The parity suite without its TensorRT candidates, as one row of the report."""
    row = {"backend": "parity suite (tests/parity, not tensorrt)"}
    timeout = int(deadline - time.time())
    if timeout < MIN_SECONDS_FOR_BACKEND:
        return {**row, "status": "skipped", "note": "time budget spent"}
    command = [sys.executable, "-m", "pytest", "tests/parity", "-q", "-rfEs", "-p", "no:cacheprovider",
               "-k", "not tensorrt"]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "note": f"stopped after {timeout} s"}
    row["load_s"] = time.perf_counter() - started
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith("FAILED")]
    row["status"] = "ran" if result.returncode == 0 else "failed"
    row["parity"] = lines[-1] if lines else "no output"
    row["note"] = "; ".join(failures[:5])
    return row


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up (TensorRT/cuDNN pick kernels, ORT builds its graph)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def device_memory_reader():
    """(source name, function returning the bytes in use on CUDA device 0), or (None, None) without a GPU.

    NVML counts every allocation on the device, TensorRT's included; the device is found by UUID, since
    NVML numbers GPUs without regard to CUDA_VISIBLE_DEVICES. cudaMemGetInfo (through torch) is the
    fallback when pynvml is missing or cannot start.
    """
    import torch

    if not torch.cuda.is_available():
        return None, None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(0).uuid}")
        return "NVML", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except Exception:  # pynvml not installed, no NVML library, or an unknown UUID form
        pass

    def used() -> int:
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    return "cudaMemGetInfo", used


class DevicePeak:
    """Peak device memory in use above the level at entry, sampled every MEMORY_POLL_S seconds in a thread
    while the block runs; ``gib`` is None without a reader (no GPU)."""

    def __init__(self, read):
        self.read, self.gib = read, None
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(MEMORY_POLL_S):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> DevicePeak:
        if self.read is not None:
            self.baseline = self.peak = self.read()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.read is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.read())
            self.gib = (self.peak - self.baseline) / 2**30


def parity_summary(report: dict) -> str:
    if report.get("skipped"):
        return "not verified"
    verdict = "passed" if report.get("passed") else "FAILED"
    return f"{verdict}: min cosine {report['min_cosine']:.6f}, max abs diff {report['max_abs_diff']:.2g}"


def candidates(shape: str, doc_tokens: int, workdir: Path, env: dict) -> list[tuple[str, object, str | None]]:
    """(name, loader, skip reason) per backend; a loader takes the report row (for parity and notes) and
    returns an Encoder. Engines are slowest and come last, so a spent budget skips them first."""
    import torch

    import runtimes
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export
    from dewey_export.trt_build import TensorRTTarget
    from runtimes.backends.onnx_backend import tensorrt_provider_options
    from runtimes.testing import make_test_checkpoint
    from runtimes.trt_plan import plan_profiles

    max_positions = max(8192, doc_tokens)
    checkpoint = make_test_checkpoint(workdir / shape, initializer_range=0.02, local_attention=128,
                                      max_position_embeddings=max_positions, **SHAPES[shape])
    cuda = torch.cuda.is_available()
    providers = env["ort_providers"]
    no_gpu = "torch sees no CUDA device"
    buckets = f"{BATCH_BUCKET[0]}x{BATCH_BUCKET[1]},{max_positions}x1"

    def onnx_export(name: str, **options):
        return export(checkpoint, workdir / name, OnnxTarget(**options), verify=False, log=lambda m: None).folder

    def engine(precision: str):
        def load(row):
            result = export(checkpoint, workdir / f"trt-{precision}", TensorRTTarget(precision=precision, buckets=buckets),
                            log=lambda m: None)
            row["parity"] = parity_summary(result.manifest.reports["tensorrt_parity"])
            with warnings.catch_warnings():  # the notes go in the table instead
                warnings.simplefilter("ignore", RuntimeWarning)
                encoder = runtimes.load(result.folder, backend="trt")
            row["note"] = "; ".join(encoder.backend.notes)
            return encoder
        return load

    def ort_tensorrt(row):
        # One session, one profile covering every length up to the document (tensorrt_provider_options).
        profile = plan_profiles([(max_positions, BATCH_BUCKET[1])], max_positions)[0]
        options = tensorrt_provider_options(profile, engine_cache_path=workdir / "ort-trt-cache")
        return runtimes.load(onnx_export("onnx-gpu-fp16", form="gpu", precision="fp16"), backend="onnx",
                             device="tensorrt", tensorrt_options=options)

    cuda_ep = "CUDAExecutionProvider" in providers
    trt_ep = "TensorrtExecutionProvider" in providers
    trt_missing = None if env["tensorrt_status"] == "ok" else env["tensorrt_status"]
    return [
        ("torch cpu fp32", lambda row: runtimes.load(checkpoint, backend="torch"),
         "a GPU is here: the CUDA rows replace it" if cuda else None),
        ("torch cuda fp32", lambda row: runtimes.load(checkpoint, backend="torch", device="cuda"),
         None if cuda else no_gpu),
        ("torch cuda bf16", lambda row: runtimes.load(checkpoint, backend="torch", device="cuda", dtype="bf16"),
         None if cuda else no_gpu),
        ("onnxruntime cpu fp32", lambda row: runtimes.load(onnx_export("onnx-cpu"), backend="onnx"),
         "the CUDA provider is here: its row replaces this one" if cuda_ep else None),
        ("onnxruntime cuda fp32",
         lambda row: runtimes.load(onnx_export("onnx-gpu", form="gpu"), backend="onnx", device="cuda"),
         None if cuda_ep else f"CUDAExecutionProvider is not in this onnxruntime ({providers})"),
        ("tensorrt fp16", engine("fp16"), trt_missing),
        ("tensorrt fp32", engine("fp32"), trt_missing),
        ("onnxruntime tensorrt, fp16 graph", ort_tensorrt,
         None if trt_ep else f"TensorrtExecutionProvider is not in this onnxruntime ({providers})"),
    ]


def measure(name: str, load, doc_tokens: int, read_memory) -> dict:
    """Load, time and measure one backend; a failure is reported in the row, never raised."""
    import numpy as np
    import torch

    import runtimes

    row = {"backend": name, "status": "ran"}
    # Eight texts cut to 512 tokens each (truncation is the point here, so its warning is silenced).
    warnings.filterwarnings("ignore", category=runtimes.TruncationWarning)
    texts = [" ".join(f"word{i}x{j}" for j in range(400)) for i in range(8)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    encoder = None
    try:
        with DevicePeak(read_memory) as device_peak:
            started = time.perf_counter()
            encoder = load(row)
            row["load_s"] = time.perf_counter() - started
            tokens = sum(min(len(t.ids) + 2, BATCH_BUCKET[0]) for t in encoder.tokenizer.encode_texts(texts))
            seconds = timed(lambda: encoder.encode(texts, max_length=BATCH_BUCKET[0], batch_size=BATCH_BUCKET[1]))
            row["batch_tokens_per_s"] = tokens / seconds
            ids = np.random.default_rng(0).integers(10, 1000, (1, doc_tokens))
            ids[0, 0], ids[0, -1] = encoder.config.cls_token_id, encoder.config.sep_token_id
            bounds = np.array([[[1, doc_tokens - 1]]])
            row["doc_s"] = timed(lambda: encoder.backend.forward(ids, np.ones_like(ids), bounds), repeats=1)
    except Exception as exc:  # report and go on: one backend failing must not hide the others
        row["status"], row["note"] = "failed", f"{type(exc).__name__}: {str(exc)[:160]}"
    if device_peak.gib is not None:
        row["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["device_peak_gib"] = device_peak.gib
    del encoder  # the next backend's memory is measured from a clean device
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def bench(shape: str, doc_tokens: int, deadline: float, workdir: Path, env: dict) -> tuple[list[dict], str | None]:
    source, read_memory = device_memory_reader()
    rows = []
    for name, load, skip in candidates(shape, doc_tokens, workdir, env):
        needed = MIN_SECONDS_FOR_ENGINE if "tensorrt" in name else MIN_SECONDS_FOR_BACKEND
        if skip is None and deadline - time.time() < needed:
            skip = f"time budget spent (needs about {needed} s)"
        rows.append({"backend": name, "status": "skipped", "note": skip} if skip
                    else measure(name, load, doc_tokens, read_memory))
        print(f"  {name}: {rows[-1]['status']}", flush=True)
    return rows, source


def print_report(rows: list[dict], memory_source: str | None, shape: str, doc_tokens: int) -> None:
    print(f"\n{shape} shape: a batch of 8 texts up to {BATCH_BUCKET[0]} tokens; one {doc_tokens}-token document. "
          f"Device peak: memory in use above the level before the backend loaded "
          f"({memory_source or 'no GPU'}); torch peak: torch's allocator only.")
    print("| step | status | load s | batch tokens/s | document s | torch peak GiB | device peak GiB | parity | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cell = lambda key, fmt: format(row[key], fmt) if key in row else "-"  # noqa: E731
        print(f"| {row['backend']} | {row['status']} | {cell('load_s', '.1f')} | {cell('batch_tokens_per_s', '.0f')} | "
              f"{cell('doc_s', '.2f')} | {cell('torch_peak_gib', '.2f')} | {cell('device_peak_gib', '.2f')} | "
              f"{row.get('parity', '-')} | {row.get('note') or ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--doc-tokens", type=int, default=32768)
    parser.add_argument("--budget-s", type=int, default=420)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    start = time.time()
    env = environment()
    print("environment:", json.dumps(env, indent=1), flush=True)
    rows = [{"backend": "parity suite (tests/parity, not tensorrt)", "status": "skipped", "note": "--skip-parity"}
            if args.skip_parity else run_parity(start + args.budget_s * PARITY_SHARE)]
    print(f"  parity suite: {rows[0]['status']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bench_rows, memory_source = bench(args.shape, args.doc_tokens, start + args.budget_s - REPORT_RESERVE_S,
                                          Path(tmp), env)
    rows += bench_rows
    print_report(rows, memory_source, args.shape, args.doc_tokens)
    print(f"\ntotal {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "memory_source": memory_source, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
