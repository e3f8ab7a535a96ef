"""ONNX -> TensorRT engine, written against TensorRT's documented 10.x / 11.x Python API.

Every decision is made by plain Python unit-tested without a GPU: profiles, metadata and compatibility
by ``runtimes.trt_plan``, precision flags and fp32 layers by ``trt_precision``. This module only applies
them with the ``tensorrt`` API: Builder -> network (strongly typed on 11) -> OnnxParser -> builder
config (workspace, flags, optimization profiles, timing cache) -> build_serialized_network. The output
folder holds the gpu-target ONNX export (``model.onnx``, manifest, tokenizer, config) and, beside it,
``model.plan`` with ``engine.json``, all of them in the manifest's ``files`` table, and the engine's
parity with PyTorch (``tensorrt_parity``). It is staged and renamed into place (runtimes.files), so a
failed or killed build never leaves half a folder, and only a previous export is replaced
(``onnx_export.check_output_folder``).
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
from .trt_precision import precision_plan
from .verify import check_checkpoint, compare_backends, skipped_report

DEFAULT_WORKSPACE_GIB = 8.0
# The manifest's key for the engine's parity report ("parity" holds the ONNX graph's, not checked here).
ENGINE_PARITY_KEY = "tensorrt_parity"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says which and how to get it."""


def tensorrt_status() -> str | None:
    """None when TensorRT can build here; otherwise what is missing and how to install it.

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
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    config = check_checkpoint(checkpoint)
    prepare_output(checkpoint, out, overwrite, log)
    status = tensorrt_status()
    if status:
        raise TensorRTUnavailable(status)
    import tensorrt as trt

    plan = precision_plan(settings.precision, trt.__version__)
    profiles = plan_profiles(settings.buckets, config.max_position_embeddings, settings.token_budget)
    options = graph_options("gpu", precision=plan.graph_precision)

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


def _serialize_engine(trt, onnx_path: Path, plan, profiles, settings: EngineBuildSettings, cache_path: Path,
                      log) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_builder_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    _pin_fp32_layers(trt, network, plan.fp32_layers)
    for profile in profiles:
        optimization_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes().items():
            optimization_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization_profile)

    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (see the TensorRT log above)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_path) as tmp:
        Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))
    log(f"  timing cache saved to {cache_path}")
    return bytes(serialized)


def _pin_fp32_layers(trt, network, kinds: tuple[str, ...]) -> None:
    """Run the layers of the ``tensorrt.LayerType`` names ``kinds`` in fp32, outputs included (weak
    typing; OBEY_PRECISION_CONSTRAINTS enforces it). Kinds this TensorRT does not know are skipped:
    LayerType grows between versions."""
    pinned = {getattr(trt.LayerType, kind) for kind in kinds if hasattr(trt.LayerType, kind)}
    floats = {trt.float32, trt.float16, trt.bfloat16}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in pinned:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                if layer.get_output(output).dtype in floats:
                    layer.set_output_type(output, trt.float32)


def _dewey_version() -> str:
    from importlib import metadata

    try:
        return f"dewey {metadata.version('dewey')}"
    except metadata.PackageNotFoundError:
        return "dewey"
