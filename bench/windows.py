"""Late chunking past the model's window: seam fidelity, retrieval, and cost (``runtimes.windows``).

    python bench/windows.py seams --models dewey-mini,base --tokens 16384 --window 2048 --overlaps 0,128,256,512,1024
    python bench/windows.py retrieval --window 512 --queries 300
    python bench/windows.py cost --lengths 131072,524288,1048576 [--window 8192]

seams: one real document (the Python docs' topics, concatenated) of ``--tokens`` tokens, chunked 256 / 64,
once in one pass and once in forced windows of ``--window`` tokens for each overlap; the cosine of each
chunk vector to its one-pass vector, by the chunk's distance (tokens) to the nearest seam (a cut between
two windows' kept ranges; 0 for a chunk that holds one). Models: ``dewey-mini`` (the packaged real
weights) and ``base`` (random weights, ModernBERT-base shape, Dewey's attention pattern), torch fp32.

retrieval: dewey-mini over the Python docs' topics longer than ``--window`` tokens; queries are sentences
of the documents (each answered by its own document); nDCG@10 with a document scored by its best chunk
(multi) or by its ``mean`` vector (single), for: the document cut to the window (truncation), windows of
``--window`` tokens (default overlap), and one pass over the whole document (the ceiling).

cost: the tiny shape exported to ONNX (the default cpu export), one document of each length through
``encode_chunks`` in windows of ``--window`` tokens (default: the model's 131,072 positions), each length
in a fresh process: wall time, tokens per second and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK_SIZE, CHUNK_OVERLAP = 256, 64  # the Dewey authors' retrieval setting
# Distance buckets (tokens from a chunk to the nearest seam) for the seam table.
SEAM_BUCKETS = (0, 1, 64, 256, 1024)
SHAPES = {
    "base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                 vector_size=768),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vector_size=128),
}


def real_document(encoder, n_tokens: int) -> str:
    """Real prose of exactly ``n_tokens`` tokens: the Python docs' topics, longest first, repeated as
    often as needed and cut at a token boundary."""
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[name] for name in sorted(topics, key=lambda name: -len(topics[name])))
    text = corpus
    while True:
        offsets = encoder.tokenizer.encode_texts([text])[0].offsets
        if len(offsets) >= n_tokens:
            return text[: int(offsets[n_tokens - 1, 1])]
        text = "\n\n".join([text] * (n_tokens // len(offsets) + 1))


def model(name: str, workdir: Path):
    import runtimes
    from runtimes.testing import make_test_checkpoint

    if name == "dewey-mini":
        return runtimes.load(backend="torch")
    folder = make_test_checkpoint(workdir / name, initializer_range=0.02, local_attention=128,
                                  max_position_embeddings=131072, **SHAPES[name])
    return runtimes.load(folder, backend="torch")


def seam_distances(encoder, n_tokens: int, max_length: int, overlap: int, spans) -> np.ndarray:
    from runtimes.windows import plan_windows

    capacity = max_length - 2
    cuts = plan_windows(n_tokens, capacity, overlap).kept[1:, 0]
    out = []
    for a, b in spans:
        if ((cuts > a) & (cuts < b)).any():
            out.append(0)
        else:
            out.append(int(np.min(np.minimum(np.abs(cuts - a), np.abs(cuts - b)))) if len(cuts) else 10**9)
    return np.asarray(out)


def bucket_label(lo: int, hi: int | None) -> str:
    if lo == 0 and hi == 1:
        return "holds a seam"
    return f"{lo}-{hi - 1}" if hi else f">= {lo}"


def run_seams(args) -> dict:
    overlaps = [int(x) for x in args.overlaps.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            encoder = model(name, Path(tmp))
            text = real_document(encoder, args.tokens)
            started = time.perf_counter()
            full = encoder.encode_chunks(text, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP, mode="mean")
            one_pass_s = time.perf_counter() - started
            rows = []
            for overlap in overlaps:
                started = time.perf_counter()
                windowed = encoder.encode_chunks(text, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP,
                                                 mode="mean", max_length=args.window, window_overlap=overlap)
                seconds = time.perf_counter() - started
                cosine = (windowed.vectors * full.vectors).sum(1)
                distance = seam_distances(encoder, args.tokens, args.window, overlap, full.token_spans)
                buckets = {}
                edges = list(SEAM_BUCKETS) + [None]
                for lo, hi in zip(edges[:-1], edges[1:]):
                    inside = (distance >= lo) & (distance < hi if hi else True)
                    if inside.any():
                        buckets[bucket_label(lo, hi)] = (float(cosine[inside].mean()), float(cosine[inside].min()),
                                                         int(inside.sum()))
                rows.append({"overlap": overlap, "windows": windowed.windows, "seconds": seconds,
                             "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
                             "document_cosine": float(windowed.vector @ full.vector), "by_distance": buckets})
                print(f"{name} overlap {overlap}: {windowed.windows} windows, chunk cosine mean {cosine.mean():.5f} "
                      f"min {cosine.min():.5f}, {seconds:.1f} s (one pass {one_pass_s:.1f} s)", flush=True)
            results[name] = {"tokens": args.tokens, "window": args.window, "one_pass_s": one_pass_s, "rows": rows}
            del encoder
    print(f"\n| model | overlap | windows | chunk cosine mean / min | document mean cosine | by distance to the "
          "nearest seam (mean / min cosine, chunks) |\n|---|---|---|---|---|---|")
    for name, result in results.items():
        for row in result["rows"]:
            cells = "; ".join(f"{label}: {mean:.5f} / {low:.5f} ({n})"
                              for label, (mean, low, n) in row["by_distance"].items())
            print(f"| {name} | {row['overlap']} | {row['windows']} | {row['mean_cosine']:.5f} / "
                  f"{row['min_cosine']:.5f} | {row['document_cosine']:.6f} | {cells} |")
    return results


def run_retrieval(args) -> dict:
    import runtimes
    from pydoc_data.topics import topics

    from runtimes.evaluation import ndcg_at_k, sample_sentence_queries

    encoder = runtimes.load(backend="torch")
    capacity = args.window - 2
    names = sorted(topics)
    tokens = encoder.tokenizer.encode_texts([topics[n] for n in names])
    keep = [i for i, t in enumerate(tokens) if len(t.ids) > args.window]
    documents = [topics[names[i]] for i in keep]
    cut = [topics[names[i]][: int(tokens[i].offsets[capacity - 1, 1])] for i in keep]
    queries = sample_sentence_queries(documents, args.queries, seed=0)
    gold = np.array([doc for _, doc in queries])
    q = encoder.encode([text for text, _ in queries], prompt="query", mode="mean")
    chunking = dict(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP, prompt="passage", mode="mean")
    variants = {
        "truncation (the document cut to the window)": encoder.encode_chunks(cut, **chunking),
        f"windows of {args.window} tokens": encoder.encode_chunks(documents, max_length=args.window, **chunking),
        "one pass (the ceiling)": encoder.encode_chunks(documents, **chunking),
    }
    results = {"documents": len(documents), "queries": len(queries), "window": args.window,
               "document_tokens": [len(tokens[i].ids) for i in keep]}
    print(f"{len(documents)} documents of {min(results['document_tokens'])}..{max(results['document_tokens'])} "
          f"tokens, {len(queries)} queries, window {args.window}\n")
    print("| method | nDCG@10 multi (best chunk) | nDCG@10 single (mean) |\n|---|---|---|")
    for label, docs in variants.items():
        multi = np.stack([(d.vectors @ q.T).max(0) for d in docs], axis=1)
        single = q @ np.stack([d.vector for d in docs]).T
        results[label] = {"multi": ndcg_at_k(multi, gold), "single": ndcg_at_k(single, gold)}
        print(f"| {label} | {results[label]['multi']:.4f} | {results[label]['single']:.4f} |", flush=True)
    return results


def cost_child(folder: str, n_tokens: int, window: int | None) -> None:
    """One length in this process: prints a JSON line with seconds, windows and peak RSS."""
    import runtimes

    encoder = runtimes.load(folder, backend="onnx", threads=2)
    text = real_document(encoder, n_tokens)
    started = time.perf_counter()
    doc = encoder.encode_chunks(text, chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP, mode="mean",
                                max_length=window)
    seconds = time.perf_counter() - started
    print(json.dumps({"tokens": n_tokens, "seconds": seconds, "windows": doc.windows, "chunks": len(doc.texts),
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def run_cost(args) -> dict:
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export
    from runtimes.testing import make_test_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_test_checkpoint(Path(tmp) / "tiny", initializer_range=0.02, local_attention=128,
                                          max_position_embeddings=131072, **SHAPES["tiny"])
        folder = export(checkpoint, Path(tmp) / "tiny-onnx", OnnxTarget(), log=lambda m: None).folder
        for n in (int(x) for x in args.lengths.split(",")):
            out = subprocess.run([sys.executable, __file__, "cost-child", str(folder), str(n), str(args.window or 0)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{n} tokens: {row['windows']} windows, {row['seconds']:.1f} s "
                  f"({n / row['seconds']:.0f} tokens/s), peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    base = rows[0]["peak_rss_gib"]
    print("\n| tokens | windows | seconds | tokens/s | peak RSS GiB | vs the first |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tokens']:,} | {row['windows']} | {row['seconds']:.1f} | {row['tokens'] / row['seconds']:.0f} | "
              f"{row['peak_rss_gib']:.2f} | {row['peak_rss_gib'] / base:.2f}x |")
    return {"rows": rows}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "cost-child":
        cost_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) or None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    seams = sub.add_parser("seams")
    seams.add_argument("--models", default="dewey-mini,base")
    seams.add_argument("--tokens", type=int, default=16384)
    seams.add_argument("--window", type=int, default=2048)
    seams.add_argument("--overlaps", default="0,128,256,512,1024")
    retrieval = sub.add_parser("retrieval")
    retrieval.add_argument("--window", type=int, default=512)
    retrieval.add_argument("--queries", type=int, default=300)
    cost = sub.add_parser("cost")
    cost.add_argument("--lengths", default="131072,524288,1048576")
    cost.add_argument("--window", type=int, help="max_length of the windows (default: the model's maximum)")
    for p in (seams, retrieval, cost):
        p.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {"seams": run_seams, "retrieval": run_retrieval, "cost": run_cost}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
