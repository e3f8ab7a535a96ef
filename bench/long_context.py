"""Time and peak memory of ONE long document (batch 1) per backend, each in a fresh subprocess.

    python bench/long_context.py                          # tiny to 128k, base to 32k
    python bench/long_context.py --shapes large --lengths 8192 16384 32768
    python bench/long_context.py --shapes tiny --exactness # also max abs diff vs the dense reference

Engines: ``torch`` (PyTorch backend, linear attention), ``onnx`` (ONNX Runtime, export target cpu:
block-local sliding layers and the contrib MultiHeadAttention flash kernel), and the plain ``dense``
export (transformers' graph with S x S masks) where it fits. Each measurement runs in its own child
process; its peak RSS comes from that child's rusage (os.wait4), so imports and the model are counted
and one measurement cannot inflate the next (models are built in another child: a forked child's
ru_maxrss starts from its parent's peak, so the measuring parent holds no model). The document's vectors are its mean and its 256/64-token
chunks, pooled in the same pass. Not a test: the README records the figures and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(initializer_range=0.02, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vector_size=128),
    "base": dict(initializer_range=0.02, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                 vector_size=768),
    "large": dict(initializer_range=0.02, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=2624,
                  vector_size=2048),
}
# Lengths run by default: global attention is quadratic in compute even with linear memory, so the
# larger shapes stop where one document takes minutes on 2 cores.
DEFAULT_LENGTHS = {
    "tiny": [4096, 8192, 16384, 32768, 65536, 131072],
    "base": [4096, 8192, 16384, 32768],
    "large": [8192, 16384, 32768],
}
# The dense export builds (B, heads, S, S) tensors in every layer (ONNX Runtime needed 14.9 GiB at 16k tokens for the tiny shape).
DENSE_MAX_LENGTH = {"tiny": 8192, "base": 4096, "large": 4096}
GIB = 1024**3


def document(length: int, vocab: int, config):
    """One row of exactly ``length`` tokens, with its mean span and 256/64 chunk spans."""
    import numpy as np

    from runtimes.chunking import token_windows

    rng = np.random.default_rng(0)
    ids = rng.integers(10, vocab, size=(1, length), dtype=np.int64)
    ids[0, 0], ids[0, -1] = config.cls_token_id, config.sep_token_id
    spans = np.concatenate([[[1, length - 1]], 1 + token_windows(length - 2, 256, 64)])
    return ids, np.ones_like(ids), spans[None].astype(np.int64)


def child(engine: str, folder: str, length: int) -> None:
    """Runs in the measured subprocess: load the engine, run one document, print JSON."""
    from runtimes.config import load_config

    config = load_config(folder)
    ids, mask, spans = document(length, config.vocab_size, config)
    if engine in ("onnx", "dense"):
        from runtimes.backends.onnx_backend import OnnxBackend

        backend = OnnxBackend.from_folder(folder)
    else:
        import torch

        from runtimes.backends.torch_backend import TorchBackend
        from runtimes.modeling import DeweyModel

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        attention = "dense" if engine == "torch-dense" else "linear"
        backend = TorchBackend(DeweyModel.from_pretrained(folder, attention=attention))
    start = time.perf_counter()
    cls, pooled = backend.forward(ids, mask, spans)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "finite": bool((cls == cls).all() and (pooled == pooled).all())}
    if os.environ.get("BENCH_SAVE"):
        import numpy as np

        np.save(os.environ["BENCH_SAVE"], pooled[0])
    print(json.dumps(out))


def measure(engine: str, folder: Path, length: int, threads: int, timeout: int, save: Path | None = None) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if save:
        env["BENCH_SAVE"] = str(save)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", engine, str(folder), str(length)],
                                stdout=out, stderr=err, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        # wait4 reaps this child and gives its own rusage (RUSAGE_CHILDREN would keep the max of all).
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        killed = proc.returncode == -9
        last = (stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"over {timeout} s" if killed else f"exit {proc.returncode}: {last[:120]}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    return result


def folders_of(shape: str, workdir: Path) -> dict[str, Path]:
    checkpoint = workdir / shape
    return {"torch": checkpoint, "torch-dense": checkpoint, "onnx": workdir / f"{shape}-onnx",
            "dense": workdir / f"{shape}-dense"}


def prepare(shape: str, workdir: Path) -> None:
    """Checkpoint and the two exports of a shape, built once and kept in workdir.

    Runs in a child process of its own: Linux carries a parent's peak RSS at fork into the child's
    ru_maxrss, so the measuring parent must stay small (no torch, no model in it)."""
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export
    from runtimes.testing import make_test_checkpoint

    folders = folders_of(shape, workdir)
    if not (folders["torch"] / "model.safetensors").is_file():
        make_test_checkpoint(folders["torch"], max_position_embeddings=131072, local_attention=128, **SHAPES[shape])
    for engine, attention in (("onnx", "linear"), ("dense", "dense")):
        if not (folders[engine] / "dewey_export.json").is_file():
            export(folders["torch"], folders[engine], OnnxTarget(form="cpu", attention=attention), verify=False,
                   overwrite=True, log=lambda message: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "FOLDER", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=2, metavar=("SHAPE", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "base"], choices=sorted(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int, help="override the default lengths of every shape")
    parser.add_argument("--engines", nargs="+", default=["torch", "onnx", "dense"],
                        choices=["torch", "onnx", "dense", "torch-dense"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    parser.add_argument("--exactness", action="store_true",
                        help="max abs diff of the chunk vectors against PyTorch's dense eager model, up to the "
                             "dense limit of each shape")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench_cache")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        engine, folder, length = args.child
        return child(engine, folder, int(length))
    if args.prepare:
        return prepare(args.prepare[0], Path(args.prepare[1]))

    import numpy as np

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"one document, batch 1, {args.threads} threads; peak RSS of the measuring process\n")
    print("| shape | tokens | engine | seconds | peak RSS GiB | max abs diff vs dense |")
    print("|---|---|---|---|---|---|", flush=True)
    rows = []
    for shape in args.shapes:
        subprocess.run([sys.executable, __file__, "--prepare", shape, str(args.workdir)], check=True)
        folders = folders_of(shape, args.workdir)
        for length in args.lengths or DEFAULT_LENGTHS[shape]:
            for engine in args.engines:
                if engine in ("dense", "torch-dense") and length > DENSE_MAX_LENGTH[shape]:
                    continue
                save = args.workdir / f"vectors-{engine}.npy" if args.exactness else None
                result = measure(engine, folders[engine], length, args.threads, args.timeout, save)
                row = dict(shape=shape, length=length, engine=engine, **result)
                if args.exactness and "error" not in result and length <= DENSE_MAX_LENGTH[shape]:
                    ref = args.workdir / "vectors-reference.npy"
                    if not ref.exists() or engine == args.engines[0]:
                        measure("torch-dense", folders["torch"], length, args.threads, args.timeout, ref)
                    row["max_abs_diff_vs_dense"] = float(np.abs(np.load(save) - np.load(ref)).max())
                rows.append(row)
                print(format_row(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['shape']} | {row['length']} | {row['engine']} | - | - | {row['error']} |"
    diff = f"{row['max_abs_diff_vs_dense']:.2g}" if "max_abs_diff_vs_dense" in row else "-"
    return (f"| {row['shape']} | {row['length']} | {row['engine']} | {row['seconds']:.2f} | "
            f"{row['peak_rss'] / GIB:.2f} | {diff} |")


if __name__ == "__main__":
    main()
