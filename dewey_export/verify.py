"""The checks of an export against its source: the checkpoint (its files and their hashes), and parity
between a candidate backend (ONNX Runtime, TensorRT) and the PyTorch reference.

The ONNX exporter, the TensorRT builder and ``dewey-export verify`` all check through here. Comparison
is kept apart from execution: both backends get the same generated inputs through the backend
contract, and only their output arrays are compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes.config import DeweyConfig, ModelFileError
from runtimes.export_format import INT8 as INT8_WEIGHTS
from runtimes.export_format import ExportManifest, sha256_file
from runtimes.model_source import ModelSource, resolve_model
from runtimes.precision import precision_name
from runtimes.tokenization import TOKENIZER_FILE

# fp32 thresholds on the un-normalised vectors: an fp32 graph that computes the same function
# differs from PyTorch only by kernel rounding (~1e-6 on the tiny test model); 1e-4 leaves room for other
# CPUs and ORT graph fusions while catching any real error (a changed weight moves vectors by far more).
FP32_MAX_ABS_DIFF = 1e-4
FP32_MIN_COSINE = 0.99999

# Reduced precision (fp16/bf16 graphs) against fp32: direction only, as for TensorRT's fp16/bf16 engines.
REDUCED_MIN_COSINE = 0.999
# int8 graphs (ONNX dynamic int8, OpenVINO int8 weights or activations): direction only, at the int8 tier's
# floor, which catches a collapse (docs/export.md has the evidence; the quality gate decides on real text).
INT8_MIN_COSINE = 0.99


def check_checkpoint(checkpoint, head=None) -> ModelSource:
    """The model source of ``checkpoint`` (a folder of any layout runtimes.model_source reads, a Hub id,
    or a ModelSource), with its tokenizer; the callers pass it on rather than read it again."""
    if isinstance(checkpoint, (str, Path)) and Path(checkpoint).is_absolute() and not Path(checkpoint).exists():
        raise ModelFileError(f"model folder {checkpoint} does not exist")
    source = resolve_model(checkpoint, head=head)
    if not (source.tokenizer_folder / TOKENIZER_FILE).is_file():
        raise ModelFileError(f"{source.tokenizer_folder} is not a model folder: {TOKENIZER_FILE} is missing")
    return source


def source_hashes(source) -> dict:
    """The sha256 of every file the model source was read from: the manifest's ``source.sha256``."""
    source = resolve_model(source)
    return {name: sha256_file(source.folder / name) for name in source.files}


def check_source(manifest: ExportManifest, checkpoint: Path | None = None) -> tuple[ModelSource, DeweyConfig]:
    """The model an export was made from: ``checkpoint``, or the path its manifest records, read with the
    head the manifest records (``check_checkpoint``) and with the sha256 the manifest records for each
    file. Returns its source and config; a different model is a ModelFileError naming the files that
    differ."""
    checkpoint = Path(checkpoint or manifest.source["path"])
    model = manifest.source.get("model", {})
    head = [layer["weight"] for layer in model.get("head", [])] or None
    source = check_checkpoint(checkpoint, head=head if model.get("layout") in ("checkpoint", "dewey_release") else None)
    recorded = manifest.source["sha256"]
    changed = [name for name, digest in source_hashes(source).items() if digest != recorded.get(name)]
    if changed:
        raise ModelFileError(
            f"{checkpoint} is not the checkpoint this export was made from: {', '.join(changed)} differ "
            "(sha256 in the manifest); pass --model with the original checkpoint"
        )
    return source, source.config


def parity_thresholds(precision) -> dict:
    """Limits for ``compare_backends`` by the candidate's precision (any spelling of runtimes.precision,
    or ``int8``: ``ExportManifest.checked_precision``)."""
    if precision == INT8_WEIGHTS:
        return {"max_abs_diff": None, "min_cosine": INT8_MIN_COSINE}
    if precision_name(precision) == "fp32":
        return {"max_abs_diff": FP32_MAX_ABS_DIFF, "min_cosine": FP32_MIN_COSINE}
    return {"max_abs_diff": None, "min_cosine": REDUCED_MIN_COSINE}


def skipped_report(precision, reason: str | bool = True) -> dict:
    """The parity report of a check that was not run: ``reason`` says why (True: not asked for)."""
    return {"skipped": reason, "thresholds": parity_thresholds(precision)}


# Lengths around the sliding window (128 for Dewey): shorter, equal, longer, and one long row.
PARITY_LENGTHS = (16, 128, 300, 2048)
# A padded batch of mixed lengths, different span counts per row (so rows carry empty padding spans).
PARITY_PADDED_BATCH = (300, 16, 128)


def _row_spans(length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """The text span, a few chunk-like spans of random sizes, and one empty padding span."""
    text = (1, length - 1)
    spans = [text]
    for _ in range(int(rng.integers(1, 4))):
        start = int(rng.integers(1, length - 1))
        end = int(rng.integers(start + 1, length))
        spans.append((start, end))
    return spans + [(0, 0)]


def parity_cases(config, seed: int = 0, lengths=PARITY_LENGTHS, padded_batch=PARITY_PADDED_BATCH):
    """Generated backend inputs: (name, input_ids, attention_mask, span_bounds), lengths capped by the
    model's maximum."""
    rng = np.random.default_rng(seed)
    limit = config.max_position_embeddings

    def batch(row_lengths):
        rows = [min(n, limit) for n in row_lengths]
        spans = [_row_spans(n, rng) for n in rows]
        seq, n_spans = max(rows), max(len(s) for s in spans)
        ids = np.full((len(rows), seq), config.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), seq), dtype=np.int64)
        bounds = np.zeros((len(rows), n_spans, 2), dtype=np.int64)
        for b, (n, row_spans) in enumerate(zip(rows, spans)):
            ids[b, :n] = rng.integers(0, config.vocab_size, n)
            ids[b, 0], ids[b, n - 1] = config.cls_token_id, config.sep_token_id
            mask[b, :n] = 1
            bounds[b, : len(row_spans)] = row_spans
        return ids, mask, bounds

    cases = [(f"batch1_len{min(n, limit)}", *batch([n])) for n in lengths]
    cases.append(("padded_batch_" + "_".join(str(min(n, limit)) for n in padded_batch), *batch(padded_batch)))
    return cases


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-30)


def compare_backends(reference, candidate, config, precision, log=None) -> dict:
    """Run the parity cases of ``config`` through both backends; report the worst max-abs difference and
    cosine against the limits of the candidate's ``precision``.

    Empty spans must be exactly zero in both; they are compared by max-abs only (no cosine of zeros).
    A case whose output shapes differ fails (its ``error`` says how): a wrong answer, not bad input.
    """
    report = {"thresholds": parity_thresholds(precision), "cases": []}
    for name, ids, mask, bounds in parity_cases(config):
        if log:
            log(f"  parity case {name} (batch {ids.shape[0]} x {ids.shape[1]} tokens)")
        ref_cls, ref_spans = reference.forward(ids, mask, bounds)
        cand_cls, cand_spans = candidate.forward(ids, mask, bounds)
        if ref_cls.shape != cand_cls.shape or ref_spans.shape != cand_spans.shape:
            report["cases"].append({"name": name, "shape": list(ids.shape), "max_abs_diff": float("inf"),
                                    "min_cosine": -1.0, "finite": False,
                                    "error": f"output shapes differ: reference {ref_cls.shape}/{ref_spans.shape}, "
                                             f"candidate {cand_cls.shape}/{cand_spans.shape}"})
            continue
        nonempty = bounds[..., 1] > bounds[..., 0]
        diff = max(float(np.abs(ref_cls - cand_cls).max()), float(np.abs(ref_spans - cand_spans).max()))
        cos = min(float(_cosines(ref_cls, cand_cls).min()), float(_cosines(ref_spans[nonempty], cand_spans[nonempty]).min()))
        finite = bool(np.isfinite(cand_cls).all() and np.isfinite(cand_spans).all())
        report["cases"].append(
            {"name": name, "shape": list(ids.shape), "max_abs_diff": diff, "min_cosine": cos, "finite": finite}
        )
    report["max_abs_diff"] = max(c["max_abs_diff"] for c in report["cases"])
    report["min_cosine"] = min(c["min_cosine"] for c in report["cases"])
    report["passed"] = all(_case_passes(c, report["thresholds"]) for c in report["cases"])
    if log:
        log(f"  max abs diff {report['max_abs_diff']:.3g}, min cosine {report['min_cosine']:.8f}: "
            f"{'passed' if report['passed'] else 'FAILED'}")
    return report


def _case_passes(case: dict, thresholds: dict) -> bool:
    limit = thresholds["max_abs_diff"]
    return ("error" not in case and case["finite"] and (limit is None or case["max_abs_diff"] <= limit)
            and case["min_cosine"] >= thresholds["min_cosine"])


def describe_failure(report: dict) -> str:
    limits = report["thresholds"]
    lines = [
        f"{c['name']}: {c['error']}" if "error" in c else
        f"{c['name']}: max abs diff {c['max_abs_diff']:.3g} (limit {limits['max_abs_diff']}), "
        f"min cosine {c['min_cosine']:.7f} (limit {limits['min_cosine']}), finite={c['finite']}"
        for c in report["cases"] if not _case_passes(c, limits)
    ]
    return "parity check failed:\n  " + "\n  ".join(lines)
