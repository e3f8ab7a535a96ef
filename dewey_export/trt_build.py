"""ONNX -> TensorRT engine, written against TensorRT's documented 10.x (10.15.1 and newer) / 11.x Python API.

Every decision is made by plain Python unit-tested without a GPU: profiles, metadata and compatibility
by ``runtimes.trt_plan``, the version floor and network/builder flags by ``trt_precision``, the graph
the parser reads by ``parser_graph``. This module only applies them with the ``tensorrt`` API: Builder
-> strongly typed network -> OnnxParser -> builder config (workspace, flags, optimization profiles,
timing cache) -> build_serialized_network. The output folder holds the gpu-target ONNX export
(``model.onnx``, manifest, tokenizer, config) and, beside it, ``model.plan`` with ``engine.json``, all of
them in the manifest's ``files`` table, and the engine's parity with PyTorch (``tensorrt_parity``). It is
staged and renamed into place (runtimes.files), so a failed or killed build never leaves half a folder,
and only a previous export is replaced (``onnx_export.check_output_folder``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from runtimes.export_format import ONNX_FILE, file_table, sha256_file, write_manifest
from runtimes.files import atomic_path, staged_folder
from runtimes.precision import precision_name
from runtimes.trt_plan import DEFAULT_BUCKETS, ENGINE_FILE, EngineMetadata, parse_buckets, plan_profiles

from .onnx_export import ExportResult, graph_options, load_reference, prepare_output, write_export
from .trt_precision import precision_plan, tensorrt_version_problem
from .verify import check_checkpoint, compare_backends, skipped_report

DEFAULT_WORKSPACE_GIB = 8.0
# The attribute onnx-tensorrt's Attention importer reads (`attrs.get<int64_t>("TRT_decomposable", 0)`,
# passed to IAttention::setDecomposable). Without it IAttention "will try to use a single fused kernel",
# and only a decomposable one "can ... be decomposed to use multiple kernels if no fused kernel support
# found" (TensorRT API reference, IAttention). Our head size is head_dim + 8 (the key-padding lanes of
# runtimes.attention: 24 for the test checkpoint, 72 for dewey-mini), which a fused kernel may not
# cover; decomposable, the build falls back to separate kernels instead of failing (their scores take
# memory quadratic in length: scripts/gpu_check.py's device peak at 32k tokens shows which ran).
DECOMPOSABLE_ATTRIBUTE = "TRT_decomposable"
# The manifest's key for the engine's parity report ("parity" holds the ONNX graph's, not checked here).
ENGINE_PARITY_KEY = "tensorrt_parity"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing, or the TensorRT is too old; the message says which and what to do."""


def tensorrt_status() -> str | None:
    """None when TensorRT can build here; otherwise what is missing and how to install it.

    The version comes first (``trt_precision.MIN_TENSORRT_VERSION``): the CLI and ``build_engine_folder``
    ask before anything is exported, so a TensorRT whose parser would reject the graph costs nothing.
    ``import tensorrt`` working proves nothing about a GPU: ``tensorrt.Builder`` raises without a CUDA
    driver, so the builder is created once to find out.
    """
    try:
        import tensorrt as trt
    except ImportError:
        return ("TensorRT is not installed. On a machine with an NVIDIA GPU: pip install tensorrt-cu12 "
                "(or tensorrt-cu13; the PyPI packages fetch from NVIDIA's index), then run this again. "
                "Without TensorRT, export --to onnx --target gpu and use ONNX Runtime's TensorRT provider.")
    try:
        problem = tensorrt_version_problem(trt.__version__)
    except ValueError as exc:
        return f"cannot tell which TensorRT is installed: {exc}"
    if problem:
        return problem
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # TypeError without a CUDA driver, RuntimeError without a device
        return f"TensorRT {trt.__version__} is installed but cannot start: no usable CUDA GPU or driver ({exc})"
    return None


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(name, compute capability "M.m") of a CUDA device, through torch."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return props.name, f"{props.major}.{props.minor}"


def default_timing_cache(tensorrt_version: str, gpu_name: str) -> Path:
    """A per-user cache file per TensorRT version and GPU: timing results are valid only there."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dewey"
    slug = "".join(c if c.isalnum() else "-" for c in f"{gpu_name}-trt{tensorrt_version}")
    return root / f"timing-{slug}.cache"


@dataclass
class EngineBuildSettings:
    precision: str = "fp16"
    buckets: tuple = DEFAULT_BUCKETS
    token_budget: int | None = None
    workspace_gib: float = DEFAULT_WORKSPACE_GIB
    timing_cache: Path | None = None
    version_compatible: bool = False

    def __post_init__(self):
        self.precision = precision_name(self.precision)  # refused here, not after the ONNX export
        if isinstance(self.buckets, str):
            self.buckets = tuple(parse_buckets(self.buckets))


def build_engine_folder(checkpoint, out, settings: EngineBuildSettings, verify: bool = True, overwrite: bool = False,
                        log=print) -> ExportResult:
    """Checkpoint -> folder with the gpu-target ONNX export and a TensorRT engine built from it.

    With ``verify`` the engine is compared with PyTorch fp32 on the GPU before the folder is published;
    the report is the manifest's ``tensorrt_parity`` (``result.passed``), and a failed one is published
    too, for inspection, as by ``export_onnx``. ``out`` is checked before TensorRT is looked for, so a
    refused ``out`` is reported whether or not TensorRT is here.
    """
    checkpoint, out = check_checkpoint(checkpoint), Path(out).resolve()
    config = checkpoint.config
    prepare_output(checkpoint.folder.resolve(), out, overwrite, log)
    status = tensorrt_status()
    if status:
        raise TensorRTUnavailable(status)
    import tensorrt as trt

    plan = precision_plan(settings.precision, trt.__version__)
    profiles = plan_profiles(settings.buckets, config.max_position_embeddings, settings.token_budget)
    options = graph_options("gpu", precision=plan.precision)  # strongly typed: the graph holds the precision

    with staged_folder(out) as staging:  # made first: an --out that cannot be written fails before the load
        model = load_reference(checkpoint, options.attention, log)
        manifest = write_export(checkpoint, config, model, staging, options, verify=False, log=log)
        _write_engine(trt, staging, plan, profiles, settings, log)
        manifest[ENGINE_PARITY_KEY] = (_verify_engine(model, staging, config, settings.precision, log) if verify
                                       else skipped_report(settings.precision))
        manifest["files"] = file_table(staging)  # now with the engine and its metadata
        write_manifest(staging, manifest)
    log(f"Wrote {out}")
    return ExportResult(out, manifest, parity_key=ENGINE_PARITY_KEY)


def _write_engine(trt, folder: Path, plan, profiles, settings: EngineBuildSettings, log) -> None:
    """``model.plan``, built on this GPU from the folder's ``model.onnx``, and its ``engine.json``."""
    gpu_name, capability = gpu_identity()
    log(f"Building a TensorRT {trt.__version__} {settings.precision} engine on {gpu_name} "
        f"({len(profiles)} profiles: {', '.join(p.describe() for p in profiles)})")
    started = time.perf_counter()
    cache_path = settings.timing_cache or default_timing_cache(trt.__version__, gpu_name)
    engine = _serialize_engine(trt, folder / ONNX_FILE, plan, profiles, settings, cache_path, log)
    with atomic_path(folder / ENGINE_FILE) as tmp:
        Path(tmp).write_bytes(engine)
    log(f"  built in {time.perf_counter() - started:.0f} s ({len(engine) / 1e6:.0f} MB)")
    EngineMetadata(
        tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
        precision=settings.precision, profiles=profiles, onnx_sha256=sha256_file(folder / ONNX_FILE),
        version_compatible=settings.version_compatible, created_by=_dewey_version(),
    ).write(folder)


def _verify_engine(model, folder: Path, config, precision: str, log) -> dict:
    """Parity of the engine in ``folder`` with the fp32 ``model`` on the GPU."""
    from runtimes.backends.torch_backend import TorchBackend
    from runtimes.backends.trt_backend import TensorRTBackend

    log("Verifying the engine against the PyTorch backend (fp32, cuda)")
    return compare_backends(TorchBackend(model, device="cuda"), TensorRTBackend(folder), config, precision, log)


def parser_graph(onnx_path: Path) -> bytes:
    """``model.onnx`` as TensorRT's parser reads it: the same graph with ``TRT_decomposable=1`` on every
    ``Attention`` node (``DECOMPOSABLE_ATTRIBUTE``).

    A serialized copy, never written to the folder: the published ``model.onnx`` stays standard ONNX,
    since ONNX Runtime refuses the graph with the attribute ("Unrecognized attribute: TRT_decomposable").
    External weights are not loaded: the parser finds ``model.onnx.data`` beside ``onnx_path``.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for nodes in [model.graph.node, *(function.node for function in model.functions)]:
        for node in nodes:
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                kept = [a for a in node.attribute if a.name != DECOMPOSABLE_ATTRIBUTE]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute(DECOMPOSABLE_ATTRIBUTE, 1)])
    return model.SerializeToString()


def _serialize_engine(trt, onnx_path: Path, plan, profiles, settings: EngineBuildSettings, cache_path: Path,
                      log) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # The path is where the parser looks for external weights (model.onnx.data beside model.onnx).
    if not parser.parse(parser_graph(onnx_path), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    for name in plan.cleared_builder_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes().items():
            optimization_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization_profile)

    timing_cache = _attach_timing_cache(config, cache_path, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (see the TensorRT log above)")
    if timing_cache is None:
        log("  no timing cache could be attached; none saved")
    else:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_path) as tmp:
            Path(tmp).write_bytes(bytes(timing_cache.serialize()))
        log(f"  timing cache saved to {cache_path}")
    return bytes(serialized)


def _attach_timing_cache(config, cache_path: Path, log):
    """Attach the timing cache saved at ``cache_path`` to the builder ``config``, or a fresh one when there
    is none or TensorRT refuses it, and return the attached cache (None if even a fresh one is refused).

    ``set_timing_cache`` returns False for a cache whose verification header does not match this GPU's
    device properties or this TensorRT. ``ignore_mismatch`` would skip that check, but NVIDIA warns that
    timings from devices with different properties "may lead to functional/performance bugs"
    (ITimingCache.combine); a refused cache must cost its timings, not the build. The builder updates the
    attached cache in place, so the returned object is what is saved after the build (``get_timing_cache``,
    which may answer None, is not read back).
    """
    saved = cache_path.read_bytes() if cache_path.is_file() else b""
    if saved:
        cache = config.create_timing_cache(saved)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        log(f"  timing cache {cache_path} was written for another GPU or TensorRT version; starting a fresh "
            "one (it replaces that file after the build)")
    fresh = config.create_timing_cache(b"")
    return fresh if fresh is not None and config.set_timing_cache(fresh, ignore_mismatch=False) else None


def _dewey_version() -> str:
    from importlib import metadata

    try:
        return f"dewey {metadata.version('dewey')}"
    except metadata.PackageNotFoundError:
        return "dewey"
