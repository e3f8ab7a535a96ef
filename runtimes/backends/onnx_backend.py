"""ONNX Runtime backend: imports numpy and onnxruntime only (plus the standard library).

Providers: CPU by default; CUDA or TensorRT execution providers when asked for. A provider that was
asked for but could not be created raises: onnxruntime-gpu falls back to the CPU silently, so the
session's actual providers are checked after it is created.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import ModelFileError
from ..errors import MissingDependencyError
from ..export_format import ONNX_FILE, check_graph_io, read_manifest
from ..memory import LONG_ROW_TOKENS
from ..precision import precision_name
from ..trt_plan import Profile
from . import contract_inputs

class ProviderUnavailableError(MissingDependencyError, RuntimeError):
    """An execution provider that was asked for is missing from, or failed to start in, onnxruntime."""


# ONNX Runtime's run option that returns the CPU arena's free chunks to the system at the end of a run.
SHRINK_ARENA = "memory.enable_memory_arena_shrinkage"
# How ONNX Runtime spells the element types of runtimes.export_format.
_ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 CPU quota.

    ``os.cpu_count()`` counts the host's CPUs, which in a container oversubscribes the quota.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def tensorrt_provider_options(profile=None, engine_cache_path=None, fp16: bool = False) -> dict:
    """Options of ONNX Runtime's TensorRT execution provider for one session.

    ``profile``: one optimization profile (a ``runtimes.trt_plan.Profile``, e.g. one of ``plan_profiles``'s,
    the length buckets of ``dewey-export trt``). One per session: the provider builds every profile
    it is given, but its execution context stays on profile 0, so inputs of the other profiles fail
    (described by the provider's own fix, microsoft/onnxruntime pull request 31624). For several buckets,
    load one session per bucket and send each batch to the session whose profile covers it.

    ``engine_cache_path``: engine and timing caches (a build takes minutes; the cache makes the next start
    instant).

    ``fp16``: keep False and give the session the ``--precision fp16`` (or bf16) gpu graph. The provider
    creates a strongly typed network unless fp16 or int8 is enabled; with ``trt_fp16_enable`` it builds
    weakly typed, free to run the graph's fp32 rotary angles and softmax in fp16 (positions above 65,504
    overflow), pinning nothing but its optional LayerNorm fallback.
    """
    if profile is not None and not isinstance(profile, Profile):
        raise ValueError(
            f"profile must be one runtimes.trt_plan.Profile, got {type(profile).__name__}: ONNX Runtime's TensorRT "
            "provider runs only the first profile of a session, so load one session per length bucket"
        )
    options = {"trt_fp16_enable": bool(fp16)}
    if engine_cache_path is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(engine_cache_path),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(engine_cache_path))
    if profile is not None:
        for which, key in ((0, "trt_profile_min_shapes"), (1, "trt_profile_opt_shapes"), (2, "trt_profile_max_shapes")):
            options[key] = ",".join(
                f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.shapes().items()
            )
    return options


def providers_for(device, tensorrt_options: dict | None = None) -> list:
    """Execution providers for a device name: ``cpu``, ``cuda[:N]``, ``tensorrt[:N]`` (TensorRT with CUDA
    for the nodes TensorRT does not take)."""
    device = "cpu" if device is None else str(device)
    kind, _, index = device.partition(":")
    if index and not index.isdigit():
        raise ValueError(f"device index must be a number, got {device!r}")
    options = {"device_id": int(index or 0)}
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        return [("CUDAExecutionProvider", options)]
    if kind == "tensorrt":
        return [("TensorrtExecutionProvider", {**options, **(tensorrt_options or {})}),
                ("CUDAExecutionProvider", options)]
    raise ValueError(f"device must be 'cpu', 'cuda[:N]' or 'tensorrt[:N]' for the onnx backend, got {device!r}")


def default_session_options(threads: int | None = None):
    """The session options the backend uses unless given others (``threads`` None: the CPUs this process
    may use); a profiler or a caller with one setting to change starts from these."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    # Memory of a long document (runtimes.memory tells the story for malloc; the measurements are in
    # docs/benchmarks.md, "Decisions in the code"). ONNX Runtime's CPU arena stays on: it hands freed
    # blocks to later tensors of any size, where without it every large tensor is a fresh mapping the
    # kernel must fault in and zero (a third slower at 8k tokens). Buffer reuse is off: the planner keeps
    # a freed buffer for a later tensor of the same size, and on a long document those gaps span layers
    # (twice the peak memory for the same speed). After a run over long rows the arena gives its free
    # chunks back (``forward``), so the next document starts from the weights again instead of growing.
    options.enable_mem_reuse = False
    return options


class OnnxBackend:
    name = "onnx"

    def __init__(self, model_path: str | Path, providers=None, threads: int | None = None, session_options=None):
        import onnxruntime as ort

        model_path = Path(model_path)
        if not model_path.is_file():
            raise ModelFileError(f"{model_path} does not exist")
        providers = list(providers or ["CPUExecutionProvider"])
        wanted = [p[0] if isinstance(p, tuple) else p for p in providers]
        missing = [p for p in wanted if p not in ort.get_available_providers()]
        if missing:
            raise ProviderUnavailableError(
                f"ONNX Runtime provider(s) {missing} are not available in this onnxruntime "
                f"(available: {ort.get_available_providers()}); for GPUs install onnxruntime-gpu "
                "instead of onnxruntime (never both)"
            )
        if session_options is None:
            session_options = default_session_options(threads)
        self.session_options = session_options
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelFileError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        active = self.session.get_providers()
        if active[0] != wanted[0]:
            raise ProviderUnavailableError(
                f"ONNX Runtime was asked for {wanted[0]} but the session runs on {active}: the provider "
                "failed to initialise (check the CUDA/cuDNN/TensorRT libraries); not falling back silently"
            )
        self.providers = active
        # Only a session that has the CPU arena may be asked to shrink it (ONNX Runtime refuses otherwise).
        self._shrink_arena = None
        if active[0] == "CPUExecutionProvider" and session_options.enable_cpu_mem_arena:
            self._shrink_arena = ort.RunOptions()
            self._shrink_arena.add_run_config_entry(SHRINK_ARENA, "cpu:0")
        self._check_io(model_path)
        self.vector_size = int(self.session.get_outputs()[0].shape[-1])

    def _check_io(self, model_path: Path) -> None:
        check_graph_io(model_path, {i.name: i.type for i in self.session.get_inputs()},
                       {o.name: o.type for o in self.session.get_outputs()}, _ORT_TYPES)

    @classmethod
    def from_folder(cls, folder: str | Path, device=None, dtype=None, threads: int | None = None,
                    **options) -> "OnnxBackend":
        """The graph of an export folder; ``runtimes.load`` has compared the folder's files with the
        manifest before this reads anything. ``dtype``, when given, must name the graph's precision (in
        any spelling of runtimes.precision). ``options``: ``providers``, ``tensorrt_options``,
        ``session_options`` (whose own thread count then wins over ``threads``)."""
        folder = Path(folder)
        if not (folder / ONNX_FILE).is_file():
            raise ModelFileError(
                f"{folder} has no {ONNX_FILE}; export the checkpoint first: "
                f"dewey-export onnx --model {folder} --out EXPORT_DIR"
            )
        manifest = read_manifest(folder)
        if manifest.quantized:
            from ..cpu_features import warn_int8_once

            warn_int8_once("int8 ONNX export")
        if dtype is not None and precision_name(dtype) != manifest.precision:
            raise ValueError(
                f"{folder} holds a graph of precision {manifest.precision}; the onnx backend runs the "
                f"precision a graph was exported in, so dtype={dtype!r} cannot be honoured"
            )
        providers = options.pop("providers", None) or providers_for(device, options.pop("tensorrt_options", None))
        return cls(folder / ONNX_FILE, providers=providers, threads=threads, **options)

    def __repr__(self) -> str:
        return f"OnnxBackend(providers={self.providers}, threads={self.session_options.intra_op_num_threads})"

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, span_bounds: np.ndarray):
        long_rows = np.shape(input_ids)[-1] > LONG_ROW_TOKENS
        cls, spans = self.session.run(["cls", "spans"], contract_inputs(input_ids, attention_mask, span_bounds),
                                      self._shrink_arena if long_rows else None)
        return cls, spans
