"""Export a Dewey checkpoint to ONNX, then serve it with ONNX Runtime in a process that never imports torch.

The export runs ``dewey-export onnx`` in a child process (it needs torch: it traces the model and
checks the graph against PyTorch before publishing the folder). This process then loads the export folder
with ``backend="onnx"``: numpy, tokenizers and onnxruntime are all it uses, as in an embedded service.

    python examples/export_and_serve_onnx.py                          # the packaged dewey-mini, about a minute
    python examples/export_and_serve_onnx.py --model CKPT --out DIR   # DIR must not exist yet
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from runtimes import load

TEXTS = ("served by ONNX Runtime", "a process without torch", "the sky is blue")
HEAVY_MODULES = ("torch", "transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Checkpoint folder (default: the packaged dewey-mini).")
    parser.add_argument("--out", type=Path, help="New export folder (default: one in a fresh temporary folder).")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dewey-onnx-")) / "export"

    # dewey-export runs as a child process: the export needs torch, this process serves without it.
    options = ["onnx", "--out", str(out), *(["--model", str(args.model)] if args.model else [])]
    print("exporting: dewey-export", *options, flush=True)
    if code := subprocess.call([sys.executable, "-m", "dewey_export.cli", *options]):
        sys.exit(code)  # dewey-export has said why
    encoder = load(out, backend="onnx")
    print(f"serving: {encoder}")
    vectors = encoder.encode(list(TEXTS), prompt="query")
    print(f"vectors {vectors.shape} {vectors.dtype}; cosine of the first two texts {vectors[0] @ vectors[1]:.3f}")
    heavy = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY_MODULES)
    print(f"torch or transformers modules imported by the serving process: {heavy or 'none'}")
    print(f"export folder: {out}")


if __name__ == "__main__":
    main()
