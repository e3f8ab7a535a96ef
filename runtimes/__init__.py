"""runtimes: one encode API for Dewey models over PyTorch, ONNX Runtime and TensorRT backends.

This package owns everything that must be identical across backends (tokenization, prompts, chunking,
span computation, batching, padding, normalisation, the output modes); a backend owns only the forward
pass. Importing it needs numpy and tokenizers only: torch and the rest load with the backend that
needs them.

    from runtimes import load
    enc = load("path/to/checkpoint", backend="torch")
    vectors = enc.encode(["some text"], mode="mean", prompt="passage")
    docs = enc.encode_chunks(["a long text ..."], chunk_size=256, chunk_overlap=64)
"""

from __future__ import annotations

from pathlib import Path

from .backends import available_backends, backend_for_folder, get_backend_class
from .config import DeweyConfig, load_config
from .encoder import ChunkedDocument, Encoder, TruncationWarning
from .errors import DeweyError, ModelFileError
from .export_format import MANIFEST_FILE, check_export_files
from .tokenization import DeweyTokenizer
from .validation import require_bool

# The packaged default model, dewey-mini (recipes/dewey-mini.toml): used when no model is given.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "dewey-mini"

__all__ = [
    "ChunkedDocument",
    "DEFAULT_MODEL_DIR",
    "DeweyConfig",
    "DeweyError",
    "Encoder",
    "ModelFileError",
    "TruncationWarning",
    "available_backends",
    "default_model_path",
    "load",
]


def default_model_path() -> Path:
    """The folder of the packaged default model, dewey-mini."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ModelFileError(
            f"the packaged default model is missing from {DEFAULT_MODEL_DIR}; reinstall the package or pass a model folder"
        )
    return DEFAULT_MODEL_DIR


def load(path: str | Path | None = None, backend: str | None = None, device=None, dtype=None,
         threads: int | None = None, verify_files: bool = True, head=None, **backend_options) -> Encoder:
    """Load a model into an Encoder running on ``backend``.

    ``path``: a model folder, a Hub id (``org/name`` or ``org/name@revision``, resolved through
    huggingface_hub's cache, runtimes.hub), or an export folder; None: the packaged default model,
    dewey-mini. A model folder (torch backend; export it with ``dewey-export`` for the others) is a
    Dewey checkpoint, a transformers ModernBERT folder, the Dewey release layout or a sentence-transformers
    folder (docs/models.md); its files are read, never executed. ``head``: the head's weight tensors
    (``"proj.weight"``, or several, comma-separated) where their shapes leave a choice.
    ``backend`` None: the one the folder is for (``backends.backend_for_folder``: an export folder's
    manifest says onnx, openvino or trt; a model folder or Hub id is for torch); a backend named here
    wins. ``threads``: the CPU threads of the forward pass, for every backend (None: the CPUs this
    process may use; torch's pool is per process).

    ``dtype`` names a precision in any spelling of ``runtimes.precision``: ``fp32``/``float32``,
    ``bf16``/``bfloat16``, ``fp16``/``float16``, or a torch or numpy dtype.

    backend ``torch``: a model folder or Hub id; device ``cpu`` (default) or ``cuda[:N]``; dtype ``fp32``
    (default) or ``bf16``.
    backend ``onnx``: an export folder (``dewey-export onnx``); device ``cpu`` (default),
    ``cuda[:N]`` or ``tensorrt[:N]`` (ONNX Runtime execution providers); dtype None or the graph's
    precision; options ``providers``, ``session_options``, ``tensorrt_options``.
    backend ``trt``: a ``dewey-export trt`` folder; device ``cuda[:N]``; no dtype (the engine's).
    backend ``openvino``: a ``dewey-export openvino`` folder (CPU); dtype None (bf16 where the CPU has
    BF16 units and the export allows it, else fp32) or ``fp32``; option ``properties``.

    An export folder's files are compared with its manifest before any of them is read: each listed file
    must have its recorded size and sha256, or ModelFileError names it; a folder whose export-time
    checks failed loads with one RuntimeWarning naming them. Hashing reads every file once;
    ``verify_files=False`` keeps only the size check, for hot reloads of a folder already checked.
    """
    from .model_source import resolve_model

    verify_files = require_bool("verify_files", verify_files)
    path = default_model_path() if path is None else path
    export = Path(path).is_dir() and (Path(path) / MANIFEST_FILE).exists()
    backend = (backend_for_folder(Path(path)) if export else "torch") if backend is None else backend
    backend_class = get_backend_class(backend)
    source = None
    if export:
        path = Path(path)
        check_export_files(path, hashes=verify_files).warn_if_failed(path)
        config = load_config(path)
        tokenizer_folder = path
    else:
        source = resolve_model(path, head=head)
        path, config, tokenizer_folder = source.folder, source.config, source.tokenizer_folder
    tokenizer = DeweyTokenizer.from_folder(tokenizer_folder, config)
    engine = backend_class.from_folder(source if backend == "torch" and source else path, device=device,
                                       dtype=dtype, threads=threads, **backend_options)
    if engine.vector_size != config.vector_size:
        raise ModelFileError(
            f"{path}: the {backend} model gives {engine.vector_size}-d vectors but config.json says "
            f"vector_size={config.vector_size}"
        )
    return Encoder(config, tokenizer, engine, source=source)
