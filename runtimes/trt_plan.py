"""TensorRT engine planning without TensorRT: optimization profiles and engine metadata.

This module owns what a TensorRT build and the TensorRT backend must agree on, as plain data that can
be tested on a machine with no GPU and no ``tensorrt`` package:

- optimization profiles from length buckets (``parse_buckets``, ``plan_profiles``, ``select_profile``):
  which (batch, sequence, chunks) shapes an engine accepts and which profile serves a given shape;
- the engine's metadata file (``EngineMetadata``, ``engine.json`` beside ``model.plan``) and the check
  that an engine may run on this machine (``check_engine_compatible``).

What only the builder decides (builder flags and fp32 layers by TensorRT version) is in
``dewey_export.trt_precision``. The code that imports ``tensorrt`` (builder and backend) applies these
plans; it makes no choice of its own. Neither torch nor tensorrt is imported here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError
from .export_format import INPUTS
from .precision import PRECISIONS
from .files import atomic_path
from .validation import require_int

ENGINE_FILE = "model.plan"
METADATA_FILE = "engine.json"
METADATA_FORMAT = 1
REBUILD_COMMAND = "dewey-export trt --model CHECKPOINT --out DIR"

# ---------------------------------------------------------------------------------------------------
# Length buckets -> optimization profiles
# ---------------------------------------------------------------------------------------------------

# (max_length, max_batch) per bucket. They come from a token budget of 32,768 padded tokens per call:
# short texts (queries, passages) go in big batches (64 x 512), long documents in small ones (4 x 8,192),
# and from 32k tokens on a document runs alone (batch 1: one row is never split, so a single row may pass
# the budget; 131,072 is Dewey's max_position_embeddings). The same budget idea as runtimes.batching.
DEFAULT_BUCKETS = ((512, 64), (8192, 4), (32768, 1), (131072, 1))
DEFAULT_TOKEN_BUDGET = 32768
# Each chunk span of late chunking covers at least this many tokens of stride, so a row of S tokens has
# at most ceil(S / DEFAULT_CHUNK_STRIDE) + 1 spans (see plan_profiles).
DEFAULT_CHUNK_STRIDE = 32
# The encoder's default chunking (chunk_size 256, chunk_overlap 64) steps 192 tokens: the opt of the
# chunks axis is the span count it gives at a bucket's max length.
OPT_CHUNK_STEP = 256 - 64

_AXES = ("batch", "sequence", "chunks")


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """``"512x64,8192x4,32768x1"`` -> ``[(512, 64), (8192, 4), (32768, 1)]``: comma-separated
    ``MAX_LENGTHxMAX_BATCH`` items (spaces allowed), checked as ``validate_buckets`` does (without the
    model's limits, which ``plan_profiles`` applies)."""
    if not isinstance(text, str):
        raise ValueError(f"buckets must be a string like '512x64,8192x4', got {type(text).__name__}")
    if not text.strip():
        raise ValueError(
            "buckets: empty; expected MAX_LENGTHxMAX_BATCH items separated by commas, e.g. '512x64,8192x4'"
        )
    buckets = []
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            raise ValueError(f"buckets: item {position} is empty in {text!r} (a stray comma?)")
        parts = [part.strip() for part in item.lower().split("x")]
        if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
            raise ValueError(
                f"buckets: item {position} {item!r} is not MAX_LENGTHxMAX_BATCH with two positive integers, "
                "e.g. '8192x4'"
            )
        length, batch = int(parts[0]), int(parts[1])
        if length < 1 or batch < 1:
            raise ValueError(f"buckets: item {position} {item!r}: length and batch must be >= 1")
        buckets.append((length, batch))
    return validate_buckets(buckets)


def format_buckets(buckets) -> str:
    """The inverse of ``parse_buckets``: ``[(512, 64), (8192, 4)]`` -> ``"512x64,8192x4"``."""
    return ",".join(f"{length}x{batch}" for length, batch in validate_buckets(buckets))


def validate_buckets(buckets, max_position_embeddings: int | None = None,
                     token_budget: int | None = None) -> list[tuple[int, int]]:
    """Check a bucket list and return it as a list of ``(max_length, max_batch)`` int tuples.

    Rules: at least one bucket; positive integers; lengths strictly increasing; batches never growing
    as length grows (a longer bucket with a bigger batch would be a bigger bucket, not a longer one);
    no length above ``max_position_embeddings``; no bucket over ``token_budget`` padded tokens
    (``max_length * max_batch``) unless its batch is 1: one row is never split, so a single long
    document may pass the budget. The last bucket may stop below ``max_position_embeddings``: the
    engine then refuses longer inputs at run time (``select_profile`` raises), which is the way to
    cap memory on a small GPU.
    """
    if max_position_embeddings is not None:
        require_int("max_position_embeddings", max_position_embeddings, 1)
    if token_budget is not None:
        require_int("token_budget", token_budget, 1)
    try:
        items = list(buckets)
    except TypeError:
        raise ValueError(f"buckets must be a list of (max_length, max_batch) pairs, got {buckets!r}") from None
    if not items:
        raise ValueError("buckets: the list is empty; give at least one (max_length, max_batch) bucket")
    checked: list[tuple[int, int]] = []
    for index, bucket in enumerate(items):
        try:
            length, batch = bucket
        except (TypeError, ValueError):
            raise ValueError(f"bucket {index} must be a (max_length, max_batch) pair, got {bucket!r}") from None
        require_int(f"bucket {index} max_length", length, 1)
        require_int(f"bucket {index} max_batch", batch, 1)
        if checked:
            prev_length, prev_batch = checked[-1]
            if length <= prev_length:
                raise ValueError(
                    f"bucket lengths must be strictly increasing: bucket {index} ({length}x{batch}) "
                    f"follows {prev_length}x{prev_batch}"
                )
            if batch > prev_batch:
                raise ValueError(
                    f"bucket batches must not grow with length: bucket {index} ({length}x{batch}) has a "
                    f"bigger batch than {prev_length}x{prev_batch}"
                )
        if max_position_embeddings is not None and length > max_position_embeddings:
            raise ValueError(
                f"bucket {index} ({length}x{batch}): max_length {length} is above the model's "
                f"max_position_embeddings ({max_position_embeddings})"
            )
        if token_budget is not None and batch > 1 and length * batch > token_budget:
            raise ValueError(
                f"bucket {index} ({length}x{batch}) holds {length * batch} padded tokens, over the token "
                f"budget of {token_budget}; lower its batch to {max(1, token_budget // length)}"
            )
        checked.append((int(length), int(batch)))
    return checked


def _range(name: str, value) -> tuple[int, int, int]:
    try:
        low, opt, high = value
    except (TypeError, ValueError):
        raise ValueError(f"profile {name} must be a (min, opt, max) triple, got {value!r}") from None
    for label, number in (("min", low), ("opt", opt), ("max", high)):
        require_int(f"profile {name} {label}", number, 1)
    if not low <= opt <= high:
        raise ValueError(f"profile {name} needs min <= opt <= max, got {low}, {opt}, {high}")
    return (int(low), int(opt), int(high))


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: (min, opt, max) of each dynamic axis of the backend contract.

    ``input_ids`` and ``attention_mask`` are [batch, sequence]; ``span_bounds`` is [batch, chunks, 2]
    (``runtimes.export_format.INPUTS``). The three inputs share the batch and sequence ranges by
    construction: ``shapes()`` derives every input's shape from the same axis ranges.
    """

    batch: tuple[int, int, int]
    sequence: tuple[int, int, int]
    chunks: tuple[int, int, int]

    def __post_init__(self):
        for axis in _AXES:
            object.__setattr__(self, axis, _range(axis, getattr(self, axis)))

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input_name: (min_shape, opt_shape, max_shape)}`` for ``IOptimizationProfile.set_shape``."""
        result = {}
        for name, (_dtype, axes) in INPUTS.items():
            dims = []
            for axis in axes:
                if isinstance(axis, int):
                    dims.append((axis, axis, axis))
                elif axis in _AXES:
                    dims.append(getattr(self, axis))
                else:  # pragma: no cover - guards a change of the contract in export_format
                    raise ValueError(f"input {name}: axis {axis!r} has no profile range")
            result[name] = tuple(tuple(dim[i] for dim in dims) for i in range(3))
        return result

    def covers(self, batch: int, seq: int, chunks: int) -> bool:
        return all(low <= value <= high for value, (low, _opt, high)
                   in ((batch, self.batch), (seq, self.sequence), (chunks, self.chunks)))

    def describe(self) -> str:
        return ", ".join(f"{axis} {getattr(self, axis)[0]}..{getattr(self, axis)[2]}" for axis in _AXES)

    def to_dict(self) -> dict:
        return {axis: list(getattr(self, axis)) for axis in _AXES}

    @classmethod
    def from_dict(cls, data) -> Profile:
        if not isinstance(data, dict):
            raise ValueError(f"a profile must be an object with {', '.join(_AXES)}, got {data!r}")
        missing = [axis for axis in _AXES if axis not in data]
        if missing:
            raise ValueError(f"profile is missing {', '.join(missing)}: {data!r}")
        return cls(**{axis: data[axis] for axis in _AXES})


def max_chunks_for(length: int, chunk_stride: int = DEFAULT_CHUNK_STRIDE) -> int:
    """Most chunk spans a row of ``length`` tokens can need when every chunk steps at least
    ``chunk_stride`` tokens: windows start at 0, stride, 2*stride, ... below ``length``, which is
    ceil(length / stride) starts, plus one spare span."""
    return math.ceil(length / chunk_stride) + 1


def plan_profiles(buckets, max_position_embeddings: int, token_budget: int | None = None,
                  chunk_stride: int = DEFAULT_CHUNK_STRIDE) -> list[Profile]:
    """One optimization profile per bucket, in bucket order (smallest first).

    - sequence: contiguous, non-overlapping ranges: profile k covers (bucket k-1's max_length + 1) ..
      bucket k's max_length, the first from 1. Every length up to the last bucket maps to exactly one
      profile. Lengths above the last bucket are refused at run time (``select_profile``).
    - batch: 1 .. max_batch.
    - chunks (the C axis of ``span_bounds``): 1 .. ceil(max_length / chunk_stride) + 1. Late chunking
      with ``chunk_size - chunk_overlap >= chunk_stride`` never needs more spans than that
      (``runtimes.chunking.token_windows`` makes 1 + ceil((n - chunk_size) / step) windows). The
      runtime pads C to at least 1 with empty (0, 0) spans. A request with more spans (a recursive
      splitter making chunks shorter than ``chunk_stride`` on average) is refused with a clear error.
    - opt: TensorRT picks its kernels (tactics) for the opt shape, and the rest of the range runs those
      kernels. We choose opt = the bucket's max length with its max batch: the batcher fills batches
      up to the token budget, so full batches of the longest rows are where the GPU time goes, and
      tuning for small shapes would save microseconds on calls that are latency-bound anyway. The opt
      of C is the span count of the encoder's default chunking (256 / 64, a 192-token step) at the
      bucket's max length, capped by the C range; C only sizes the span pooling and the output head,
      so its opt barely matters.
    """
    require_int("max_position_embeddings", max_position_embeddings, 1)
    require_int("chunk_stride", chunk_stride, 1)
    checked = validate_buckets(buckets, max_position_embeddings, token_budget)
    profiles = []
    low = 1
    for length, batch in checked:
        max_c = max_chunks_for(length, chunk_stride)
        opt_c = min(max_c, max_chunks_for(length, OPT_CHUNK_STEP))
        profiles.append(Profile(batch=(1, batch, batch), sequence=(low, length, length), chunks=(1, opt_c, max_c)))
        low = length + 1
    return profiles


def select_profile(profiles, batch: int, seq: int, chunks: int) -> int:
    """Index of the first (smallest) profile that covers a (batch, seq, chunks) call."""
    profiles = list(profiles)
    if not profiles:
        raise ValueError("the engine has no optimization profiles")
    for index, profile in enumerate(profiles):
        if profile.covers(batch, seq, chunks):
            return index
    ranges = "; ".join(f"profile {i}: {p.describe()}" for i, p in enumerate(profiles))
    raise ValueError(
        f"no optimization profile of the engine covers batch {batch}, sequence {seq}, chunks {chunks} "
        f"({ranges}); use smaller batches, truncate to the longest profile, or rebuild the engine with "
        f"other buckets ({REBUILD_COMMAND} --buckets ...)"
    )


# ---------------------------------------------------------------------------------------------------
# TensorRT versions
# ---------------------------------------------------------------------------------------------------

_VERSION_RE = re.compile(
    r"^\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?"      # major.minor[.patch[.build]]
    r"(?:[.-]?(?:a|b|rc|post|dev)\d*)*"                # pre/post/dev release tags: 10.0.0b6, 11.0.0.post1
    r"(?:\+[0-9A-Za-z.]+)?\s*$"                        # local tag: +cuda12
)


def parse_tensorrt_version(version: str) -> tuple[int, int, int, int]:
    """``"10.14.1.48"`` -> ``(10, 14, 1, 48)``; missing parts are 0 and release tags (``b6``,
    ``.post1``, ``+cuda12``) are dropped: they name packaging, not a different library."""
    match = _VERSION_RE.match(version) if isinstance(version, str) else None
    if match is None:
        raise ValueError(f"cannot read the TensorRT version {version!r}: expected MAJOR.MINOR[.PATCH[.BUILD]]")
    return tuple(int(part or 0) for part in match.groups())


# ---------------------------------------------------------------------------------------------------
# Engine metadata and compatibility
# ---------------------------------------------------------------------------------------------------


class EngineMismatchError(ModelFileError):
    """A TensorRT engine cannot run here: another TensorRT version or GPU built it. ``fields`` names
    the mismatched metadata fields."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


def normalize_compute_capability(value) -> str:
    """``"9.0"``, ``(9, 0)`` -> ``"9.0"`` (what ``torch.cuda.get_device_capability`` and
    ``nvidia-smi --query-gpu=compute_cap`` give)."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(part, int) and not isinstance(part, bool) and part >= 0 for part in value):
        return f"{value[0]}.{value[1]}"
    if isinstance(value, str) and re.fullmatch(r"\d+\.\d+", value.strip()):
        major, minor = value.strip().split(".")
        return f"{int(major)}.{int(minor)}"
    raise ValueError(f"compute_capability must be like '9.0' or (9, 0), got {value!r}")


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class EngineMetadata:
    """``engine.json``: what built ``model.plan`` and what it accepts."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: list[Profile]
    onnx_sha256: str
    version_compatible: bool = False
    created_by: str = ""
    format: int = field(default=METADATA_FORMAT)

    def __post_init__(self):
        parse_tensorrt_version(self.tensorrt_version)
        if not isinstance(self.gpu_name, str) or not self.gpu_name.strip():
            raise ValueError(f"gpu_name must be a non-empty string, got {self.gpu_name!r}")
        self.compute_capability = normalize_compute_capability(self.compute_capability)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        profiles = list(self.profiles) if isinstance(self.profiles, (list, tuple)) else None
        if not profiles or not all(isinstance(p, Profile) for p in profiles):
            raise ValueError(f"profiles must be a non-empty list of Profile, got {self.profiles!r}")
        self.profiles = profiles
        if not isinstance(self.onnx_sha256, str) or not _SHA256_RE.fullmatch(self.onnx_sha256):
            raise ValueError(f"onnx_sha256 must be 64 lowercase hex digits, got {self.onnx_sha256!r}")
        if not isinstance(self.version_compatible, bool):
            raise ValueError(f"version_compatible must be true or false, got {self.version_compatible!r}")
        if not isinstance(self.created_by, str):
            raise ValueError(f"created_by must be a string, got {self.created_by!r}")
        if self.format != METADATA_FORMAT:
            raise ValueError(f"unknown engine metadata format {self.format!r} (this dewey reads {METADATA_FORMAT})")

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "version_compatible": self.version_compatible,
            "onnx_sha256": self.onnx_sha256,
            "created_by": self.created_by,
            "profiles": [profile.to_dict() for profile in self.profiles],
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineMetadata:
        """Parse ``engine.json``; any malformed or missing field raises ValueError naming it. Unknown
        keys are ignored (a newer dewey may add some within the same format)."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{METADATA_FILE} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{METADATA_FILE} must hold a JSON object, got {type(data).__name__}")
        required = ("format", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profiles",
                    "onnx_sha256", "version_compatible", "created_by")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"{METADATA_FILE} is missing {', '.join(missing)}")
        if not isinstance(data["profiles"], list):
            raise ValueError(f"{METADATA_FILE}: profiles must be a list, got {data['profiles']!r}")
        try:
            profiles = [Profile.from_dict(item) for item in data["profiles"]]
            return cls(**{key: data[key] for key in required if key != "profiles"}, profiles=profiles)
        except ValueError as exc:
            raise ValueError(f"{METADATA_FILE}: {exc}") from None

    @classmethod
    def read(cls, folder: str | Path) -> EngineMetadata:
        path = Path(folder) / METADATA_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc}; build the engine with {REBUILD_COMMAND}") from None
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / METADATA_FILE
        with atomic_path(path) as tmp:
            Path(tmp).write_text(self.to_json(), encoding="utf-8")
        return path


def check_engine_compatible(meta: EngineMetadata, tensorrt_version: str, gpu_name: str, compute_capability,
                            *, strict_gpu: bool = False) -> list[str]:
    """Raise ``EngineMismatchError`` if the engine described by ``meta`` cannot run with this TensorRT
    on this GPU; return notes (warnings) for differences that are allowed.

    Rules, from NVIDIA's TensorRT docs ("Version Compatibility" and "Hardware Compatibility" in the
    developer guide, and the support matrix's "Engine Portability"):

    - TensorRT version. "By default, TensorRT engines are compatible only with the version of TensorRT
      used to build them": the same MAJOR.MINOR.PATCH.BUILD (release tags such as ``.post1`` ignored).
      An engine built with ``BuilderFlag.VERSION_COMPATIBLE`` "can run with newer TensorRT versions
      within the same major version" (support matrix 10.x): the same major and a version >= the one that
      built it. TensorRT 11's support matrix also lets a TensorRT 10 version-compatible engine run on an
      11 runtime; we refuse that: dewey builds a different precision plan on 11 (strong typing), and a
      rebuild costs minutes while a subtly different engine costs a silent parity loss.
    - GPU. Without hardware-compatibility mode "engines are not portable across different GPU
      architectures" (support matrix): the compute capability must be equal. A different GPU name with
      the same compute capability (an H100 PCIe running an H100 SXM engine) runs, but the kernels were
      timed on the other card, so it may be slower (TensorRT itself only warns); allowed with a note,
      refused with ``strict_gpu=True``.
    """
    built = parse_tensorrt_version(meta.tensorrt_version)
    here = parse_tensorrt_version(tensorrt_version)
    capability = normalize_compute_capability(compute_capability)
    problems: list[tuple[str, str]] = []
    if meta.version_compatible:
        if here[0] != built[0]:
            problems.append(("tensorrt_version",
                             f"tensorrt_version: the engine was built with TensorRT {meta.tensorrt_version} "
                             f"(version-compatible), this is TensorRT {tensorrt_version}: a version-compatible "
                             f"engine runs only on TensorRT {built[0]}.x, at {meta.tensorrt_version} or newer"))
        elif here < built:
            problems.append(("tensorrt_version",
                             f"tensorrt_version: the engine was built with TensorRT {meta.tensorrt_version} "
                             f"(version-compatible), this is the older TensorRT {tensorrt_version}: it runs only "
                             f"on {meta.tensorrt_version} or a newer {built[0]}.x"))
    elif here != built:
        problems.append(("tensorrt_version",
                         f"tensorrt_version: the engine was built with TensorRT {meta.tensorrt_version}, this is "
                         f"TensorRT {tensorrt_version}: an engine runs only on the TensorRT version that built it "
                         f"(unless built version-compatible)"))
    if capability != meta.compute_capability:
        problems.append(("compute_capability",
                         f"compute_capability: the engine was built for compute capability "
                         f"{meta.compute_capability} ({meta.gpu_name}), this GPU is {capability} ({gpu_name}): "
                         f"engines do not move between GPU architectures"))
    same_gpu = gpu_name.strip().casefold() == meta.gpu_name.strip().casefold()
    if not same_gpu and capability == meta.compute_capability and strict_gpu:
        problems.append(("gpu_name",
                         f"gpu_name: the engine was built on {meta.gpu_name}, this GPU is {gpu_name} (same compute "
                         f"capability {capability}; refused because strict_gpu is set)"))
    if problems:
        fields = tuple(name for name, _ in problems)
        details = "; ".join(text for _, text in problems)
        raise EngineMismatchError(
            f"the TensorRT engine cannot run here: {details}. Rebuild it on this machine: {REBUILD_COMMAND}",
            fields,
        )
    notes = []
    if not same_gpu:
        notes.append(f"the engine was built on {meta.gpu_name} and runs on {gpu_name} (same compute capability "
                     f"{capability}): it works, but its kernels were timed on the other GPU; rebuild here "
                     f"({REBUILD_COMMAND}) for the best speed")
    if meta.version_compatible and here != built:
        notes.append(f"version-compatible engine from TensorRT {meta.tensorrt_version} on {tensorrt_version}: "
                     "it may run slower than an engine built for this version")
    return notes
