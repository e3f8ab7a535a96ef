"""Every Dewey CPU path against the plain peers, same weights and texts, in one run.

    python bench/cpu_engines.py                                   # tiny and base shapes, all workloads
    python bench/cpu_engines.py --shapes tiny --lengths 2048 --repeats 1
    python bench/cpu_engines.py --model runtimes/models/dewey-mini --workloads short,tiny-batch

Engines. Peers: ``plain-fp32`` (transformers' ModernBertModel, sdpa, fp32) and ``plain-ov-bf16`` (that
module through ``openvino.convert_model``, bf16 inference, each query allowed to see itself so that
padded rows give no NaN: ``nan_safe``); both run batches of ``--batch`` texts in
input order padded to their longest row and mean-pool the text tokens. Dewey: ``torch-fp32``,
``torch-bf16``, ``onnx-fp32``, ``openvino-fp32``, ``openvino-bf16``, each through ``runtimes.load``;
``--int8`` adds the int8 engines: ``onnx-int8`` (ONNX Runtime dynamic int8), ``openvino-int8`` (int8
weights, the CPU's best float arithmetic: bf16 where it has it), ``openvino-int8-full`` (int8
activations too), and both with ``-f32`` (fp32 arithmetic, as on a CPU without bf16), exported without
their speed floor (the table is the measurement). The column "int8 vs same engine fp32" compares each
with the fp32 export on the same runtime at the same arithmetic (onnx-fp32; openvino-bf16, or
openvino-fp32 for the -f32 rows and on CPUs without bf16). The first line says which CPU ran and its
int8 / bf16 features.

Workloads: ``short`` (8 texts of 288..512 tokens), ``tiny-batch`` (32 texts of 16..128 tokens), through
``encode`` (tokenization and pooling included; warm-up once, median of ``--repeats``), and ``long``: one
document of each ``--lengths`` (an integer in ``--workloads`` names one length), timed once per engine
in a fresh process with its peak RSS (bench/long_context.py's measurement; its mean and 256/64 chunks).
Tokens are real rows' tokens ([CLS] and [SEP] included, padding not). The cosine column is the minimum
over texts (long: over the document's vectors) against ``torch-fp32``, for the peers against ``plain-fp32``.
Plain attention is quadratic, so the peers skip documents over ``--peer-max-length``.
``--profile`` adds, for the long documents, the time per operator type of the onnx and openvino engines
(ONNX Runtime's profiler; OpenVINO's performance counters, by node type and the precision it ran in).
Not a test: numbers depend on the machine; docs/benchmarks.md records them with the command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import long_context  # noqa: E402  (puts the repository root on sys.path)
from throughput import openvino_op_seconds, ort_op_seconds, texts_of_exactly, time_encode  # noqa: E402

PEERS = ("plain-fp32", "plain-ov-bf16")
DEWEY = ("torch-fp32", "torch-bf16", "onnx-fp32", "openvino-fp32", "openvino-bf16")
INT8 = ("onnx-int8", "openvino-int8", "openvino-int8-f32", "openvino-int8-full", "openvino-int8-full-f32")
SHORT = {"short": (8, 288, 512), "tiny-batch": (32, 16, 128)}  # texts, shortest and longest row
PLAIN_OV_XML = "plain-openvino/model.xml"
GIB = long_context.GIB
PROFILE_ROWS = 12  # operator types listed per profiled engine


def reference_of(engine: str) -> str:
    return "plain-fp32" if engine in PEERS else "torch-fp32"


def quiet(message: str) -> None:
    pass


def span_means(hidden, spans):
    """Mean of ``hidden`` [B, S, D] over each span [B, C, 2] (end exclusive; empty spans give 0)."""
    import numpy as np

    sums = np.concatenate([np.zeros_like(hidden[:, :1], dtype=np.float64), hidden.cumsum(1, dtype=np.float64)], 1)
    rows = np.arange(len(hidden))[:, None]
    counts = np.maximum(spans[..., 1] - spans[..., 0], 1)[..., None]
    return ((sums[rows, spans[..., 1]] - sums[rows, spans[..., 0]]) / counts).astype(np.float32)


class PlainEncoder:
    """The peers' ``encode``: Dewey's tokenizer and rows ([CLS] text [SEP]), batches of ``batch_size``
    texts in input order padded to their longest row, the last hidden state mean-pooled over the text."""

    def __init__(self, tokenizer, forward):
        self.tokenizer, self.forward = tokenizer, forward

    def encode(self, texts, mode: str = "mean", batch_size: int = 32):
        import numpy as np

        from runtimes.batching import pad_batch

        no_prompt = np.zeros(0, dtype=np.int64)
        rows = [self.tokenizer.row(no_prompt, text.ids) for text in self.tokenizer.encode_texts(texts)]
        vectors = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            spans = [np.array([[1, len(row) - 1]], dtype=np.int64) for row in batch]
            vectors.append(self.forward(*pad_batch(batch, spans, self.tokenizer.config.pad_token_id))[:, 0])
        return np.concatenate(vectors)


def load_engine(engine: str, workdir: Path, threads: int, profile: bool = False):
    """(object with ``encode``, ``forward(input_ids, attention_mask, span_bounds) -> span vectors``).
    ``profile``: the onnx and openvino engines record their time per operator (``op_seconds``)."""
    import runtimes

    checkpoint = workdir / "checkpoint"
    if engine.startswith("torch"):
        import torch

        torch.set_num_threads(threads)
        encoder = runtimes.load(checkpoint, backend="torch", dtype=engine.split("-")[1])
    elif engine.startswith("onnx"):
        from runtimes.backends.onnx_backend import default_session_options

        options = default_session_options(threads)
        options.enable_profiling = profile
        options.profile_file_prefix = str(workdir / "ort_profile")
        encoder = runtimes.load(workdir / engine, backend="onnx", session_options=options)
    elif engine.startswith("openvino"):
        # *-f32: the int8 folder run in fp32 arithmetic, as on a CPU without bf16.
        folder, dtype = workdir / engine.removesuffix("-f32"), "fp32" if engine.endswith("-f32") else None
        encoder = runtimes.load(folder, backend="openvino", threads=threads, dtype=dtype,
                                properties={"PERF_COUNT": True} if profile else None)
    else:
        return plain_engine(engine, workdir, threads)
    return encoder, lambda ids, mask, spans: encoder.backend.forward(ids, mask, spans)[1]


def plain_engine(engine: str, workdir: Path, threads: int):
    from runtimes.config import load_config
    from runtimes.tokenization import DeweyTokenizer

    checkpoint = workdir / "checkpoint"
    tokenizer = DeweyTokenizer.from_folder(checkpoint, load_config(checkpoint))
    if engine == "plain-fp32":
        import torch

        torch.set_num_threads(threads)
        model = plain_model(checkpoint)

        def forward(ids, mask, spans):
            with torch.inference_mode():
                hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
            return span_means(hidden.numpy(), spans)
    else:
        import openvino as ov

        from runtimes.backends.openvino_backend import INFERENCE_PRECISIONS

        # The settings of Dewey's OpenVINO backend, bf16 arithmetic.
        compiled = ov.Core().compile_model(str(workdir / PLAIN_OV_XML), "CPU", {
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS["bf16"], "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()

        def forward(ids, mask, spans):
            return span_means(request.infer({"input_ids": ids, "attention_mask": mask})[0], spans)
    return PlainEncoder(tokenizer, forward), forward


def plain_model(checkpoint: Path):
    """The checkpoint's backbone as plain transformers loads it (the Dewey head's key is ignored)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.ModernBertModel.from_pretrained(checkpoint, attn_implementation="sdpa").eval()


def nan_safe(model):
    """``model`` (a plain ModernBertModel) with each query allowed to see itself in both masks, so a padding
    row far from any real token, whose keys would all be masked, gives finite values instead of NaN (which
    the next layer's weight-0 products would spread to every row). Real rows are unchanged: a real token is
    a valid key of its own window. Still transformers' dense (B, 1, S, S) masks, built here from the [B, S]
    mask; the last hidden state is the output."""
    import torch

    class NanSafe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1])
            itself = positions[:, None] == positions[None, :]
            valid = attention_mask.bool()[:, None, None, :]
            band = (positions[None, :] - positions[:, None]).abs() <= model.config.sliding_window
            masks = {"full_attention": valid | itself, "sliding_attention": (valid & band) | itself}
            return self.model(input_ids=input_ids, attention_mask=masks).last_hidden_state

    return NanSafe().eval()


def prepare(spec: dict) -> None:
    """Checkpoint and exports of one model, in a child process (the measuring parent stays small)."""
    import numpy as np

    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.openvino_export import OpenVINOTarget
    from dewey_export.pipeline import export
    from runtimes.testing import make_test_checkpoint

    workdir = Path(spec["workdir"])
    checkpoint = workdir / "checkpoint"
    if spec["model"]:
        checkpoint.symlink_to(Path(spec["model"]).resolve())
    else:
        make_test_checkpoint(checkpoint, max_position_embeddings=131072, local_attention=128,
                             **long_context.SHAPES[spec["shape"]])
    for engine in spec["engines"]:
        if engine == "onnx-fp32":
            export(checkpoint, workdir / engine, OnnxTarget(), verify=False, log=quiet)
        elif engine == "onnx-int8":
            export(checkpoint, workdir / engine, OnnxTarget(precision="int8", min_int8_speedup=0), verify=False,
                   log=quiet)
        elif engine.startswith("openvino-int8"):
            folder = workdir / engine.removesuffix("-f32")
            if not folder.exists():
                quantization = "full" if folder.name.endswith("full") else "weights"
                export(checkpoint, folder, OpenVINOTarget(precision="int8", quantization=quantization,
                                                          min_int8_speedup=0), verify=False, log=quiet)
        elif engine.startswith("openvino"):
            export(checkpoint, workdir / engine, OpenVINOTarget(precision=engine.split("-")[1]), verify=False,
                   log=quiet)
        elif engine == "plain-ov-bf16":
            import openvino as ov
            import torch

            ids = torch.from_numpy(np.random.default_rng(0).integers(10, 1000, size=(2, 64)))
            mask = torch.ones_like(ids)
            mask[1, 40:] = 0
            model = ov.convert_model(nan_safe(plain_model(checkpoint)),
                                     example_input={"input_ids": ids, "attention_mask": mask})
            ov.save_model(model, workdir / PLAIN_OV_XML, compress_to_fp16=False)


def min_cosine(vectors, reference) -> float:
    import numpy as np

    dots = (vectors * reference).sum(-1)
    return float((dots / (np.linalg.norm(vectors, axis=-1) * np.linalg.norm(reference, axis=-1))).min())


def run_short(spec: dict) -> None:
    """The short workloads of one model, every engine in turn, in one child process; prints JSON rows."""
    from types import SimpleNamespace

    import numpy as np

    from runtimes.config import load_config
    from runtimes.tokenization import DeweyTokenizer

    workdir = Path(spec["workdir"])
    checkpoint = workdir / "checkpoint"
    tokens = SimpleNamespace(tokenizer=DeweyTokenizer.from_folder(checkpoint, load_config(checkpoint)))
    texts = {}
    for workload in spec["workloads"]:
        count, shortest, longest = SHORT[workload]
        lengths = np.linspace(shortest, longest, count).round().astype(int)
        # Text i is the i-th topic long enough, cut to its row length: all texts differ.
        texts[workload] = ([texts_of_exactly(tokens, int(n), i + 1)[i] for i, n in enumerate(lengths)], int(lengths.sum()))
    rows, vectors = [], {}
    for engine in spec["engines"]:
        encoder, _ = load_engine(engine, workdir, spec["threads"])
        for workload, (batch_texts, n_tokens) in texts.items():
            vectors[engine, workload] = encoder.encode(batch_texts, mode="mean", batch_size=spec["batch"])  # warm-up
            seconds = time_encode(encoder, batch_texts, spec["batch"], spec["repeats"], 0)
            reference = vectors.get((reference_of(engine), workload))
            row = dict(workload=workload, engine=engine, tokens=n_tokens, seconds=seconds,
                       min_cos=None if reference is None else min_cosine(vectors[engine, workload], reference))
            if not np.isfinite(vectors[engine, workload]).all():
                row["error"] = "non-finite vectors"
            rows.append(row)
        del encoder
    print(json.dumps(rows))


def child(engine: str, folder: str, length: int) -> None:
    """long_context.measure's child: one document of ``length`` tokens through ``engine``; prints JSON."""
    import os
    import time

    import numpy as np

    from runtimes.config import load_config

    workdir = Path(folder)
    config = load_config(workdir / "checkpoint")
    ids, mask, spans = long_context.document(length, config.vocab_size, config)
    profile = bool(os.environ.get("BENCH_PROFILE")) and engine.startswith(("onnx", "openvino"))
    encoder, forward = load_engine(engine, workdir, int(os.environ["BENCH_THREADS"]), profile)
    start = time.perf_counter()
    vectors = forward(ids, mask, spans)
    seconds = time.perf_counter() - start
    np.save(os.environ["BENCH_SAVE"], vectors[0])
    result = {"seconds": seconds, "finite": bool(np.isfinite(vectors).all())}
    if profile:
        backend = encoder.backend
        per_op = (ort_op_seconds(backend.session) if engine.startswith("onnx") else openvino_op_seconds(backend._request()))
        result["profile"] = dict(per_op.most_common(PROFILE_ROWS))
        result["profile_total"] = sum(per_op.values())
    print(json.dumps(result))


def run_long(workdir: Path, engines: list[str], length: int, args) -> list[dict]:
    import numpy as np

    # long_context.measure starts ``python <its __file__> --child ENGINE FOLDER LENGTH`` and reads its
    # peak RSS; this file's --child takes the same arguments.
    long_context.__file__ = str(Path(__file__).resolve())
    rows = []
    for engine in engines:
        row = dict(workload=str(length), engine=engine, tokens=length)
        if engine in PEERS and length > args.peer_max_length:
            rows.append(dict(row, error=f"skipped: over --peer-max-length {args.peer_max_length}"))
            continue
        save = workdir / f"vectors-{engine}-{length}.npy"
        row.update(long_context.measure(engine, workdir, length, args.threads, args.timeout, save))
        if row.pop("finite", True) is False:
            row["error"] = "non-finite vectors"
        reference = workdir / f"vectors-{reference_of(engine)}-{length}.npy"
        if "error" not in row and reference.exists():
            row["min_cos"] = min_cosine(np.load(save), np.load(reference))
        rows.append(row)
    return rows


def in_child(mode: str, spec: dict) -> str:
    return subprocess.run([sys.executable, __file__, mode, json.dumps(spec)], check=True, stdout=subprocess.PIPE,
                          text=True).stdout


def same_engine_fp32(engine: str) -> str | None:
    """The fp32 export an int8 engine is compared with: the same runtime's, at the same arithmetic."""
    if engine not in INT8:
        return None
    if engine.startswith("onnx") or engine.endswith("-f32"):
        return f"{engine.split('-')[0]}-fp32"
    from runtimes.cpu_features import bf16_support

    return "openvino-bf16" if bf16_support() else "openvino-fp32"


def add_ratios(rows: list[dict]) -> None:
    for row in rows:
        if "seconds" in row:
            row["tokens_per_s"] = row["tokens"] / row["seconds"]

    def speed(row, engine):
        base = next((r for r in rows if r["model"] == row["model"] and r["workload"] == row["workload"]
                     and r["engine"] == engine and "tokens_per_s" in r), None)
        return base["tokens_per_s"] if base else None

    for row in rows:
        if "tokens_per_s" not in row:
            continue
        for peer in PEERS + ("fp32",):
            engine = same_engine_fp32(row["engine"]) if peer == "fp32" else peer
            if engine and speed(row, engine):
                row[f"vs_{peer}"] = row["tokens_per_s"] / speed(row, engine)


def best_ratios(rows: list[dict]) -> list[str]:
    """Per model and workload: the fastest int8 engine against the fastest bf16 one."""
    lines = []
    for key in dict.fromkeys((r["model"], r["workload"]) for r in rows):
        timed = [r for r in rows if (r["model"], r["workload"]) == key and "tokens_per_s" in r]
        int8 = max((r for r in timed if r["engine"] in INT8), key=lambda r: r["tokens_per_s"], default=None)
        bf16 = max((r for r in timed if r["engine"].endswith("bf16")), key=lambda r: r["tokens_per_s"], default=None)
        if int8 and bf16:
            lines.append(f"{key[0]}, {key[1]}: best int8 {int8['engine']} / best bf16 {bf16['engine']} = "
                         f"{int8['tokens_per_s'] / bf16['tokens_per_s']:.2f}x")
    return lines


def format_row(row: dict) -> str:
    def cell(key, form):
        return format(row[key], form) if row.get(key) is not None else "-"

    rss = f"{row['peak_rss'] / GIB:.2f}" if "peak_rss" in row else "-"
    tail = row.get("error", "")
    return (f"| {row['model']} | {row['workload']} | {row['engine']} | {row['tokens']} | {cell('seconds', '.3f')} | "
            f"{cell('tokens_per_s', '.0f')} | {cell('vs_plain-fp32', '.2f')} | {cell('vs_plain-ov-bf16', '.2f')} | "
            f"{cell('vs_fp32', '.2f')} | {cell('min_cos', '.5f')} | {rss} | {tail} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "FOLDER", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--short", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--model", type=Path, help="a checkpoint folder to run instead of the random shapes")
    parser.add_argument("--workloads", default="short,tiny-batch,long",
                        help="comma list of short, tiny-batch, long (every --lengths) and document lengths")
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768], help="tokens of the long documents")
    parser.add_argument("--engines", default=",".join(PEERS + DEWEY), help=f"comma list of {', '.join(PEERS + DEWEY)}")
    parser.add_argument("--int8", action="store_true", help=f"add {', '.join(INT8)} (OpenVINO's need nncf)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="texts per batch (Encoder's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-max-length", type=int, default=8192,
                        help="longest document the peers run (quadratic attention masks)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per long-document measurement")
    parser.add_argument("--profile", action="store_true",
                        help="long documents: time per operator type of the onnx and openvino engines (the "
                             "profiled run is the timed one, so its seconds include the profiler's cost)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.profile:
        import os

        os.environ["BENCH_PROFILE"] = "1"  # read by the long-document children
    if args.child:
        engine, folder, length = args.child
        return child(engine, folder, int(length))
    if args.prepare:
        return prepare(json.loads(args.prepare))
    if args.short:
        return run_short(json.loads(args.short))

    known = PEERS + DEWEY + INT8
    engines = args.engines.split(",") + (list(INT8) if args.int8 else [])
    unknown = [e for e in engines if e not in known]
    workloads = args.workloads.split(",")
    bad = [w for w in workloads if w not in SHORT and w != "long" and not w.isdigit()]
    if unknown or bad:
        parser.error(f"unknown engines {unknown} or workloads {bad}")
    engines = [e for e in known if e in engines]  # the references first
    short = [w for w in workloads if w in SHORT]
    lengths = [int(w) for w in workloads if w.isdigit()] + (args.lengths if "long" in workloads else [])
    models = [args.model.name] if args.model else args.shapes

    from runtimes.cpu_features import describe_cpu

    cpu = describe_cpu()
    print(f"CPU: {cpu['name']} ({cpu['machine']}); features: {', '.join(cpu['features']) or 'unknown'}; int8 dot "
          f"products: {cpu['int8_dot_products']}; native bf16: {cpu['bf16']}")
    print(f"{args.threads} threads; short workloads: median of {args.repeats} after a warm-up; long documents: "
          "one run each in a fresh process\n")
    print("| model | workload | engine | tokens | seconds | tokens/s | vs plain fp32 | vs plain OV bf16 | "
          "int8 vs same engine fp32 | min cos | peak RSS GiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            spec = dict(workdir=tmp, shape=model, model=str(args.model) if args.model else None, engines=engines,
                        workloads=short, threads=args.threads, batch=args.batch, repeats=args.repeats)
            in_child("--prepare", spec)
            model_rows = []
            for length in lengths:  # first, while this process holds no model
                model_rows += run_long(Path(tmp), engines, length, args)
            if short:
                model_rows = json.loads(in_child("--short", spec).strip().splitlines()[-1]) + model_rows
            for row in model_rows:
                row["model"] = model
            add_ratios(model_rows)
            rows += model_rows
            for row in model_rows:
                print(format_row(row), flush=True)
    if ratios := best_ratios(rows):
        print("\n" + "\n".join(ratios))
    for row in rows:
        if "profile" in row:
            total = row["profile_total"]
            print(f"\n{row['model']}, {row['workload']} tokens, {row['engine']}: seconds per operator type (top "
                  f"{PROFILE_ROWS})")
            for op, seconds in row["profile"].items():
                print(f"  {op:32s} {seconds:8.2f}  {100 * seconds / total:5.1f} %")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
