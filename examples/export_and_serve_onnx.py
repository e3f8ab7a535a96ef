"""Export a Dewey checkpoint to ONNX, then serve it with ONNX Runtime in a process that never imports torch.

The export runs ``dewey-export --to onnx`` in a child process (it needs torch: it traces the model and
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


def export(model: Path | None, out: Path) -> None:
    """``dewey-export [--model MODEL] --to onnx --out OUT``; exits with its code if it fails."""
    command = [sys.executable, "-m", "dewey_export.cli", "--to", "onnx", "--out", str(out)]
    if model is not None:
        command += ["--model", str(model)]
    print("exporting:", "dewey-export", *command[3:], flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        print(f"dewey-export failed with exit code {result.returncode}", file=sys.stderr)
        sys.exit(result.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Checkpoint folder (default: the packaged dewey-mini).")
    parser.add_argument("--out", type=Path, help="New export folder (default: one in a fresh temporary folder).")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dewey-onnx-")) / "export"

    export(args.model, out)
    encoder = load(out, backend="onnx")
    print(f"serving: {encoder}")
    vectors = encoder.encode(list(TEXTS), prompt="query")
    print(f"vectors {vectors.shape} {vectors.dtype}; cosine of the first two texts {vectors[0] @ vectors[1]:.3f}")
    heavy = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY_MODULES)
    print(f"torch or transformers modules imported by the serving process: {heavy or 'none'}")
    print(f"export folder: {out}")


if __name__ == "__main__":
    main()
