"""Build a TensorRT engine from a Dewey checkpoint and encode with it (NVIDIA GPU and TensorRT needed).

The build runs ``dewey-export trt`` in a child process: it exports the gpu-target ONNX graph, builds
one optimization profile per length bucket and checks the engine against PyTorch on the GPU. The folder
is then loaded with ``backend="trt"``. Without TensorRT or a usable GPU the script says what is missing
and exits with code 3, before anything is written.

    python examples/tensorrt_build.py                                   # the packaged dewey-mini, fp16
    python examples/tensorrt_build.py --model CKPT --out DIR --precision bf16 --buckets 512x16,8192x2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from dewey_export.trt_build import tensorrt_status
from runtimes import load

EXIT_NO_TENSORRT = 3  # distinct from dewey-export's own codes (1 verification failed, 2 bad input)
# Small profiles build quickly; the CLI's default also covers documents up to 131,072 tokens.
DEFAULT_BUCKETS = "512x16,8192x2"
TEXTS = ("encoded by a TensorRT engine", "an engine built for this GPU", "the sky is blue")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Checkpoint folder (default: the packaged dewey-mini).")
    parser.add_argument("--out", type=Path, help="New engine folder (default: one in a fresh temporary folder).")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--buckets", default=DEFAULT_BUCKETS,
                        help="Length buckets MAX_TOKENSxMAX_BATCH, one optimization profile each.")
    args = parser.parse_args()

    missing = tensorrt_status()
    if missing:
        print(f"cannot build a TensorRT engine here: {missing}", file=sys.stderr)
        sys.exit(EXIT_NO_TENSORRT)
    out = args.out or Path(tempfile.mkdtemp(prefix="dewey-trt-")) / "engine"
    options = ["trt", "--out", str(out), "--precision", args.precision, "--buckets", args.buckets,
               *(["--model", str(args.model)] if args.model else [])]
    print("building: dewey-export", *options, flush=True)
    if code := subprocess.call([sys.executable, "-m", "dewey_export.cli", *options]):
        sys.exit(code)  # dewey-export has said why
    encoder = load(out, backend="trt", device="cuda")
    print(f"serving: {encoder}")
    vectors = encoder.encode(list(TEXTS), prompt="query")
    print(f"vectors {vectors.shape} {vectors.dtype}; cosine of the first two texts {vectors[0] @ vectors[1]:.3f}")
    print(f"engine folder: {out}")


if __name__ == "__main__":
    main()
