"""The quality table of every int8 export, through the export pipeline's own checks, in one run.

    python bench/int8_quality.py                                  # the packaged dewey-mini
    python bench/int8_quality.py --model CKPT --variants onnx-int8,openvino-int8-full

Each variant is exported with ``dewey-export``'s pipeline (parity on random token ids, the quality
gate's int8 tier on real text: the built-in held-out documents and the documents of about 512, 2k and
8k tokens, 200 sentence queries; the int8 execution check with its speed against fp32 on this
machine), and its figures are printed: parity min cosine, the gate's min and mean cosine, top-1
agreement, nDCG@10 drop, the speed ratio, and the verdict with what failed. Variants: ``onnx-int8``
(ONNX Runtime dynamic int8), ``openvino-int8`` (int8 weights), ``openvino-int8-full`` (int8 activations
too; ``openvino-int8-full-a0.5`` etc. choose SmoothQuant's alpha, ``-nosq`` turns it off). Not a test:
speeds depend on the machine and its load; docs/export.md records the table with the command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("onnx-int8", "openvino-int8", "openvino-int8-full")


def target_of(variant: str):
    from dewey_export import quantize
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.openvino_export import OpenVINOTarget

    if variant == "onnx-int8":
        return OnnxTarget(precision="int8")
    if variant == "openvino-int8":
        return OpenVINOTarget(precision="int8", quantization="weights")
    if variant.startswith("openvino-int8-full"):
        suffix = variant.removeprefix("openvino-int8-full")
        if suffix == "-nosq":
            quantize.SMOOTH_QUANT_ALPHA = -1.0
        elif suffix.startswith("-a"):
            quantize.SMOOTH_QUANT_ALPHA = float(suffix[2:])
        return OpenVINOTarget(precision="int8", quantization="full")
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)} (full: -aALPHA, -nosq)")


def row(variant: str, manifest) -> str:
    parity, gate, int8 = (manifest.reports.get(k, {}) for k in ("parity", "gate", "int8"))
    speed = int8.get("speed", {})
    failed = ", ".join(f"{name}: {', '.join(report.get('failed', [])) or 'cases'}" for name, report in
                       manifest.reports.items() if report.get("passed") is False)
    ndcg = gate.get("ndcg@10", {})
    nan = float("nan")
    return (f"| {variant} | {parity.get('min_cosine', nan):.5f} | {gate.get('min_cosine', nan):.5f} | "
            f"{gate.get('mean_cosine', float('nan')):.6f} | {gate.get('top1_agreement', float('nan')):.1%} | "
            f"{ndcg.get('drop', float('nan')):+.4f} | {speed.get('speedup', float('nan')):.2f} | "
            f"{'passed' if manifest.passed else 'refused (' + failed + ')'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the packaged dewey-mini)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import runtimes
    from dewey_export.pipeline import export
    from runtimes.cpu_features import describe_cpu

    model = args.model or runtimes.default_model_path()
    cpu = describe_cpu()
    print(f"CPU: {cpu['name']}; features: {', '.join(cpu['features'])}; model: {model}\n")
    print("| variant | parity min cos | gate min cos | gate mean cos | top-1 | nDCG@10 drop | speed vs fp32 | "
          "verdict |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for variant in args.variants.split(","):
        target = target_of(variant)
        with tempfile.TemporaryDirectory() as tmp:
            result = export(model, Path(tmp) / variant, target, log=lambda message: None)
            print(row(variant, result.manifest), flush=True)


if __name__ == "__main__":
    main()
