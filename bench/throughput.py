"""Throughput of the PyTorch and ONNX Runtime backends on the same texts, in one run.

    python bench/throughput.py                      # tiny and ModernBERT-base shapes, 2 threads
    python bench/throughput.py --shapes base --opsets 18 23 --attention linear dense --profile

For each model shape: build a random checkpoint (runtimes.testing), export it to ONNX (timed), then
encode the same 8 texts of exactly 512 tokens each (one batch of 8 x 512, through the Encoder, so
tokenization and pooling are included) with each backend, threads fixed. Reports the median seconds
per batch, sequences/s and tokens/s. --profile adds ONNX Runtime's per-operator time split.
Not a test: numbers depend on the machine; the README records them with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "tiny": dict(initializer_range=0.02, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                 local_attention=128, vector_size=128),
    "base": dict(initializer_range=0.02, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                 local_attention=128, vector_size=768),
}


def texts_of_exactly(encoder, n_tokens: int, count: int) -> list[str]:
    """``count`` different texts whose rows are exactly ``n_tokens`` long ([CLS] + text + [SEP])."""
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics, key=lambda k: -len(topics[k])):
        body = topics[key]
        tokens = encoder.tokenizer.encode_texts([body])[0]
        if len(tokens.ids) < n_tokens:
            continue
        text = body[: int(tokens.offsets[n_tokens - 3, 1])]
        if len(encoder.tokenizer.encode_texts([text])[0].ids) == n_tokens - 2:
            texts.append(text)
        if len(texts) == count:
            return texts
    raise RuntimeError(f"not enough long documents for {count} texts of {n_tokens} tokens")


def time_encode(encoder, texts, batch: int, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        encoder.encode(texts, mode="mean", batch_size=batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.encode(texts, mode="mean", batch_size=batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ort_profile(folder: Path, texts, batch: int, threads: int) -> list[tuple[str, float]]:
    """Share of ONNX Runtime kernel time per operator type, from one profiled run."""
    import runtimes
    from runtimes.backends.onnx_backend import default_session_options

    options = default_session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort_profile")
    encoder = runtimes.load(folder, backend="onnx", session_options=options)
    encoder.encode(texts, mode="mean", batch_size=batch)
    per_op = ort_op_seconds(encoder.backend.session)
    total = sum(per_op.values())
    return [(op, 100.0 * seconds / total) for op, seconds in per_op.most_common(8)]


def ort_op_seconds(session) -> Counter:
    """Kernel seconds per operator type of a profiling ONNX Runtime session (ends its profiling)."""
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e6
    return per_op


def openvino_op_seconds(request) -> Counter:
    """Seconds per executed node type of an OpenVINO infer request compiled with PERF_COUNT, by the
    type and precision the plugin ran (e.g. ``MatMul bf16``)."""
    per_op = Counter()
    for node in request.get_profiling_info():
        if node.status.name == "EXECUTED":
            per_op[f"{node.node_type} {node.exec_type.rsplit('_', 1)[-1]}"] += node.real_time.total_seconds()
    return per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "base"], choices=sorted(SHAPES))
    parser.add_argument("--opsets", nargs="+", type=int, default=[18], choices=[18, 23])
    parser.add_argument("--attention", nargs="+", default=["linear"], choices=["linear", "dense"],
                        help="attention forms to export: linear (the default export) and/or dense (plain)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per row, [CLS] and [SEP] included")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print ONNX Runtime's time per operator type")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    import runtimes
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export
    from runtimes.backends.torch_backend import TorchBackend
    from runtimes.modeling import DeweyModel
    from runtimes.testing import make_test_checkpoint

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            checkpoint = make_test_checkpoint(Path(tmp) / shape, max_position_embeddings=8192, **SHAPES[shape])
            torch_encoder = runtimes.load(checkpoint, backend="torch")
            texts = texts_of_exactly(torch_encoder, args.tokens, args.batch)
            seconds = time_encode(torch_encoder, texts, args.batch, args.repeats, args.warmup)
            rows.append(dict(shape=shape, backend="torch fp32, linear attention", export_s=None, seconds=seconds))
            if "dense" in args.attention:
                dense = runtimes.Encoder(torch_encoder.config, torch_encoder.tokenizer,
                                         TorchBackend(DeweyModel.from_pretrained(checkpoint, attention="dense")))
                seconds = time_encode(dense, texts, args.batch, args.repeats, args.warmup)
                rows.append(dict(shape=shape, backend="torch fp32, dense attention (sdpa + masks)", export_s=None,
                                 seconds=seconds))
            for attention in args.attention:
                for opset in args.opsets:
                    folder = Path(tmp) / f"{shape}-{attention}-onnx{opset}"
                    started = time.perf_counter()
                    export(checkpoint, folder, OnnxTarget(opset=opset, attention=attention), verify=False,
                           log=lambda message: None)
                    export_s = time.perf_counter() - started
                    onnx_encoder = runtimes.load(folder, backend="onnx", threads=args.threads)
                    seconds = time_encode(onnx_encoder, texts, args.batch, args.repeats, args.warmup)
                    name = f"onnxruntime fp32 opset {opset}, {attention} attention"
                    rows.append(dict(shape=shape, backend=name, export_s=export_s, seconds=seconds))
                    if args.profile:
                        print(f"\nONNX Runtime time per operator, {shape}, {name}:")
                        for op, share in ort_profile(folder, texts, args.batch, args.threads):
                            print(f"  {op:<28} {share:5.1f} %")

    tokens = args.batch * args.tokens
    print(f"\nbatch {args.batch} x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}\n")
    print("| shape | backend | s/batch | sequences/s | tokens/s | vs torch | export s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["backend"].startswith("torch fp32, linear"))
        row.update(sequences_per_s=args.batch / row["seconds"], tokens_per_s=tokens / row["seconds"],
                   speedup=base["seconds"] / row["seconds"])
        export = f"{row['export_s']:.1f}" if row["export_s"] is not None else "-"
        print(f"| {row['shape']} | {row['backend']} | {row['seconds']:.3f} | {row['sequences_per_s']:.1f} | "
              f"{row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | {export} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
