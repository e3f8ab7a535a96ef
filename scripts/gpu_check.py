"""One prepared check for a lent GPU machine: what is there, parity, speed, one compact report.

    python scripts/gpu_check.py                 # base shape, 8 x 512 batch and one 32k document
    python scripts/gpu_check.py --shape tiny --doc-tokens 4096 --budget-s 120   # a quick smoke run

Needs the repository (run from its root), torch, transformers, tokenizers and onnx/onnxscript; uses
onnxruntime-gpu and tensorrt when they are installed, and says so when they are not. No network.
(a) runs the parity suite (tests/parity) for the backends available; (b) times each backend on one
batch of 8 x 512 tokens and one long document; (c) prints a report. Every step has a deadline so the
whole run stays within --budget-s (default 420 s, under the 8 minutes a lent machine allows).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
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


def environment() -> dict:
    env = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnxruntime", "tensorrt"):
        try:
            env[name] = importlib.import_module(name).__version__
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


def run_parity(deadline: float) -> str:
    timeout = max(30, int(deadline - time.time()))
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "tests/parity", "-q", "-rs", "-p", "no:cacheprovider"],
                                cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"parity: stopped after {timeout} s"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else "no output"
    failures = [line for line in lines if line.startswith("FAILED")]
    return "\n".join([f"parity: {summary}"] + failures[:10])


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up (TensorRT/cuDNN pick kernels, ORT builds its graph)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench(shape: str, doc_tokens: int, deadline: float, workdir: Path) -> list[dict]:
    import numpy as np
    import torch

    import runtimes
    from dewey_export.onnx_export import export_onnx
    from runtimes.testing import make_test_checkpoint

    checkpoint = make_test_checkpoint(workdir / shape, initializer_range=0.02, local_attention=128,
                                      max_position_embeddings=max(8192, doc_tokens), **SHAPES[shape])
    loaders = {}
    if torch.cuda.is_available():
        loaders["torch cuda fp32"] = lambda: runtimes.load(checkpoint, backend="torch", device="cuda")
        loaders["torch cuda bf16"] = lambda: runtimes.load(checkpoint, backend="torch", device="cuda", dtype="bf16")
    else:
        loaders["torch cpu fp32"] = lambda: runtimes.load(checkpoint, backend="torch")
    env_providers = environment()["ort_providers"]
    if "CUDAExecutionProvider" in env_providers:
        loaders["onnxruntime cuda fp32"] = lambda: runtimes.load(
            export_onnx(checkpoint, workdir / "onnx-gpu", target="gpu", verify=False, log=lambda m: None).folder,
            backend="onnx", device="cuda")
    elif "CPUExecutionProvider" in env_providers:
        loaders["onnxruntime cpu fp32"] = lambda: runtimes.load(
            export_onnx(checkpoint, workdir / "onnx-cpu", verify=False, log=lambda m: None).folder, backend="onnx")
    from dewey_export.trt_build import EngineBuildSettings, build_engine_folder, tensorrt_status

    if tensorrt_status() is None:
        for precision in ("fp16", "fp32"):
            loaders[f"tensorrt {precision}"] = lambda precision=precision: runtimes.load(build_engine_folder(
                checkpoint, workdir / f"trt-{precision}",
                EngineBuildSettings(precision=precision, buckets=f"512x8,{max(8192, doc_tokens)}x1"),
                verify=False, log=lambda m: None).folder, backend="trt")

    # Eight texts cut to 512 tokens each (truncation is the point here, so its warning is silenced).
    warnings.filterwarnings("ignore", category=runtimes.TruncationWarning)
    texts = [" ".join(f"word{i}x{j}" for j in range(400)) for i in range(8)]
    rows = []
    for name, load in loaders.items():
        if time.time() > deadline:
            rows.append({"backend": name, "note": "skipped: time budget spent"})
            continue
        row = {"backend": name}
        try:
            started = time.perf_counter()
            encoder = load()
            row["load_s"] = time.perf_counter() - started
            tokens = sum(min(len(t.ids) + 2, 512) for t in encoder.tokenizer.encode_texts(texts))
            seconds = timed(lambda: encoder.encode(texts, max_length=512, batch_size=8))
            row["batch_tokens_per_s"] = tokens / seconds
            if time.time() < deadline:
                ids = np.random.default_rng(0).integers(10, 1000, (1, doc_tokens))
                ids[0, 0], ids[0, -1] = encoder.config.cls_token_id, encoder.config.sep_token_id
                bounds = np.array([[[1, doc_tokens - 1]]])
                row["doc_s"] = timed(lambda: encoder.backend.forward(ids, np.ones_like(ids), bounds), repeats=1)
                if torch.cuda.is_available():
                    row["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as exc:  # report and go on: one backend failing must not hide the others
            row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
    return rows


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
    parity = "parity: skipped" if args.skip_parity else run_parity(start + args.budget_s * 0.45)
    print(parity, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(args.shape, args.doc_tokens, start + args.budget_s - 30, Path(tmp))
    print(f"\nspeed, {args.shape} shape: batch of 8 texts up to 512 tokens; one {args.doc_tokens}-token document")
    print("| backend | load s | batch tokens/s | document s | GPU peak GiB | note |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cell = lambda key, fmt: format(row[key], fmt) if key in row else "-"  # noqa: E731
        print(f"| {row['backend']} | {cell('load_s', '.1f')} | {cell('batch_tokens_per_s', '.0f')} | "
              f"{cell('doc_s', '.2f')} | {cell('gpu_peak_gib', '.2f')} | {row.get('note', '')} |")
    print(f"\ntotal {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "parity": parity, "speed": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
