"""A finished, passed export folder -> a complete Triton Inference Server model repository (a packager,
not an export target: it builds nothing, and refuses a folder whose any report failed).

Two models, both with complete configs (the server's auto-complete is never needed):

- ``dewey_graph``: the graph itself, ``platform: "onnxruntime_onnx"`` with the export's ``model.onnx``
  (cpu or gpu form) or ``platform: "tensorrt_plan"`` with a ``dewey-export trt`` folder's ``model.plan``. Its
  inputs and outputs are the backend contract of runtimes.export_format, as the export's manifest records
  them; batches are merged by the server's dynamic batcher up to ``max_batch_size`` rows.
- ``dewey_text``: a Python-backend model (dewey_export/triton_model.py) taking UTF-8 texts and returning
  vectors, or chunk vectors with character spans; it runs the Encoder's own code and reaches the graph
  through BLS requests. Its version folder holds a copy of ``runtimes`` and the model's config and
  tokenizer, so the repository needs nothing from dewey at serving time.

Beside them: ``README.md`` (server command line, container, client example) and ``dewey_triton.json``,
which records what was written and marks the folder as a dewey repository (what ``overwrite`` may replace).
The repository is written into a staging folder and renamed into place (runtimes.files), like an export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import runtimes
from runtimes.batching import DEFAULT_MAX_BATCH_TOKENS
from runtimes.config import load_config
from runtimes.errors import BadInputError, ExportError, ModelFileError, VerificationFailed
from runtimes.export_format import (
    MANIFEST_FILE,
    ONNX_FILE,
    ExportManifest,
    check_export_files,
    contract_tensors,
    sha256_file,
)
from runtimes.files import clean_leftovers, staged_folder
from runtimes.trt_plan import ENGINE_FILE, EngineMetadata
from runtimes.validation import require_int

from .pipeline import COPIED_FILES, check_output_folder, written_by_us

GRAPH_MODEL = "dewey_graph"
TEXT_MODEL = "dewey_text"
MODEL_VERSION = "1"
REPOSITORY_MANIFEST = "dewey_triton.json"
# 2: "source" records the export's path and its manifest's sha256 (1: a path only).
REPOSITORY_FORMAT = 2
# Engine -> (Triton platform, the file the platform loads from the version folder).
ENGINES = {"onnx": ("onnxruntime_onnx", ONNX_FILE), "trt": ("tensorrt_plan", ENGINE_FILE)}
# The NGC container of Triton 2.51, the server release the tests load these repositories into. Its Python
# stub is Python 3.10 with numpy 1.x, on which runtimes runs (tested by tests/test_triton.py).
TRITON_CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"
# What the text model's environment needs beyond the container: runtimes' own dependencies, numpy < 2
# because the Python stub of these releases returns empty FP32 outputs and crashes on BYTES inputs with
# numpy 2.
STUB_REQUIREMENTS = ("numpy<2", "tokenizers>=0.23,<0.24", "semantic-text-splitter>=0.33,<0.34")
# An ONNX graph's rows per batch come from the token budget: as many rows as fit at this length, a short
# passage. Longer rows are batched by the text model within the budget itself (runtimes.batching).
SHORT_ROW_TOKENS = 128
# How long the dynamic batcher waits for more requests to merge: a few ms, small next to a forward pass.
MAX_QUEUE_DELAY_US = 2000
# Folder of the text model's version folder holding config.json and the tokenizer (triton_model.MODEL_FILES).
MODEL_FILES = "model_files"
# Triton's data type of each element type of the backend contract (runtimes.export_format).
_TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}
# Triton's max_batch_size and dims are int32 (model_config.proto); a larger token budget would write a
# config the server refuses.
INT32_MAX = 2**31 - 1
# What a repository holds at its top: what a leftover of an interrupted write may hold to be removed.
REPOSITORY_NAMES = frozenset({GRAPH_MODEL, TEXT_MODEL, "README.md", REPOSITORY_MANIFEST})
# The text model's outputs: name -> (Triton type, dims after the batch axis; "vector_size" is D).
TEXT_OUTPUTS = {
    "vectors": ("TYPE_FP32", ["vector_size"]),
    "chunk_vectors": ("TYPE_FP32", [-1, "vector_size"]),
    "chunk_spans": ("TYPE_INT64", [-1, 2]),
    "chunk_count": ("TYPE_INT64", [1]),
}


def write_triton_repository(source, out, engine: str = "onnx", instances: int = 1,
                            max_batch_tokens: int | None = None, overwrite: bool = False, log=print) -> Path:
    """Write the Triton model repository of the export folder ``source`` to the folder ``out``; returns
    ``out``.

    source: a ``dewey-export onnx`` folder, or a ``dewey-export trt`` folder for ``engine="trt"`` (its
    ONNX graph also serves with ``engine="onnx"``); its files must match its manifest and every report
    in it must have passed (a failed one is a VerificationFailed naming it). A checkpoint is refused:
    export it first. instances: instances of each model (``instance_group``; CPU for a cpu-form graph,
    GPU otherwise). max_batch_tokens: padded tokens per graph batch (default runtimes.batching's, 16384;
    with a TensorRT engine, its profiles' largest batch); it sets the graph's ``max_batch_size`` and the
    text model's batches. ``out`` may replace only a previous repository or export, and only with
    ``overwrite``.
    """
    if engine not in ENGINES:
        raise ExportError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    instances = require_int("instances", instances, 1)
    if max_batch_tokens is not None:
        max_batch_tokens = require_int("max_batch_tokens", max_batch_tokens, 1)
        if max_batch_tokens > INT32_MAX:
            raise BadInputError(f"max_batch_tokens {max_batch_tokens} is above Triton's int32 limit {INT32_MAX}")
    source, out = Path(source).resolve(), Path(out).resolve()
    if not source.is_dir():
        raise ModelFileError(f"{source} is not a folder (expected a dewey export folder)")
    if not (source / MANIFEST_FILE).is_file():
        raise ModelFileError(f"{source} is not a dewey export folder (no {MANIFEST_FILE}); export the checkpoint "
                             f"first: dewey-export {'trt' if engine == 'trt' else 'onnx'} --model {source} --out DIR")
    manifest = check_export_files(source)
    if manifest.failed:
        raise VerificationFailed(f"{source} failed its {', '.join(manifest.failed)} check(s) (see {MANIFEST_FILE}); "
                                 "only a passed export is packaged")
    layout = repository_layout(source, manifest, engine, instances, max_batch_tokens)
    clean_leftovers(out.parent, out.name, log=log, owned=written_by_us(REPOSITORY_NAMES))
    check_repository_output(source, out, overwrite)
    with staged_folder(out) as staging:
        lay_out_repository(source, staging, layout)
    log(f"Wrote the Triton model repository {out} ({GRAPH_MODEL}: {layout['platform']}, "
        f"max_batch_size {layout['max_batch_size']}; {TEXT_MODEL}: python)")
    return out


def check_repository_output(source: Path, out: Path, overwrite: bool) -> None:
    """``check_output_folder``'s rules, with a previous repository (its ``dewey_triton.json``) counting as
    previous output: replaced only with ``overwrite``, and never when the source lies inside it."""
    if not (out / REPOSITORY_MANIFEST).is_file():
        check_output_folder(source, out, overwrite)
        return
    if not overwrite:
        raise ExportError(f"{out} already holds a Triton repository; pass overwrite (--overwrite) to replace it")
    if out == source or out in source.parents:
        raise ExportError(f"--out {out} contains the source {source}; choose another folder")


def repository_layout(export: Path, manifest: ExportManifest, engine: str, instances: int,
                      max_batch_tokens: int | None) -> dict:
    """Everything the configs say, derived from the export folder: platform, I/O, batching, instances."""
    platform, graph_file = ENGINES[engine]
    if not (export / graph_file).is_file():
        raise ExportError(f"{export} has no {graph_file}: engine {engine!r} needs a dewey-export "
                          f"{'trt' if engine == 'trt' else 'onnx'} folder")
    if engine == "trt":
        profiles = EngineMetadata.read(export).profiles
        max_batch_size = max(profile.batch[2] for profile in profiles)
        budget = max(profile.batch[2] * profile.sequence[2] for profile in profiles)
    else:
        budget = DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
        max_batch_size = max(1, budget // SHORT_ROW_TOKENS)
    gpu = engine == "trt" or manifest.target == "gpu"
    return {
        "engine": engine,
        "platform": platform,
        "graph_file": graph_file,
        "vector_size": load_config(export).vector_size,
        # The configs are written from the contract itself, never from strings of the manifest (which
        # read_manifest has checked against it): nothing a manifest holds reaches config.pbtxt.
        **contract_tensors(),
        "max_batch_size": max_batch_size,
        "max_batch_tokens": budget if max_batch_tokens is None else min(budget, max_batch_tokens),
        "instances": instances,
        "kind": "KIND_GPU" if gpu else "KIND_CPU",
        "precision": manifest.precision,
        "target": manifest.target,
    }


def lay_out_repository(export: Path, folder: Path, layout: dict) -> None:
    """Write both models, the README and dewey_triton.json into the empty ``folder``."""
    graph_version = folder / GRAPH_MODEL / MODEL_VERSION
    graph_version.mkdir(parents=True)
    for name in (layout["graph_file"], f"{layout['graph_file']}.data"):  # .data: an external-weights graph
        if (export / name).is_file():
            shutil.copy2(export / name, graph_version / name)
    (folder / GRAPH_MODEL / "config.pbtxt").write_text(graph_config(layout), encoding="utf-8")

    text_version = folder / TEXT_MODEL / MODEL_VERSION
    text_version.mkdir(parents=True)
    shutil.copy2(Path(__file__).with_name("triton_model.py"), text_version / "model.py")
    shutil.copytree(Path(runtimes.__file__).parent, text_version / "runtimes",
                    ignore=shutil.ignore_patterns("__pycache__", "models"))  # models: the packaged weights
    (text_version / MODEL_FILES).mkdir()
    for name in COPIED_FILES:
        if (export / name).is_file():
            shutil.copy2(export / name, text_version / MODEL_FILES / name)
    (folder / TEXT_MODEL / "config.pbtxt").write_text(text_config(layout), encoding="utf-8")

    (folder / "README.md").write_text(repository_readme(layout), encoding="utf-8")
    record = {"format": REPOSITORY_FORMAT, "source": {"path": str(export),
                                                      "manifest_sha256": sha256_file(export / MANIFEST_FILE)},
              "models": [GRAPH_MODEL, TEXT_MODEL],
              "container": TRITON_CONTAINER, **{k: v for k, v in layout.items() if k not in ("inputs", "outputs")}}
    (folder / REPOSITORY_MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def tensor_entries(tensors: dict, vector_size: int) -> str:
    """config.pbtxt entries of the contract's tensors ``{name: {"type", "axes"}}``: the batch axis is
    Triton's (max_batch_size), named axes are variable (-1) and ``vector_size`` is D."""
    entries = []
    for name, spec in tensors.items():
        axes = spec["axes"]
        if axes[0] != "batch":
            raise ExportError(f"tensor {name} has no leading batch axis ({axes}); Triton cannot batch it")
        dims = [vector_size if a == "vector_size" else a if isinstance(a, int) else -1 for a in axes[1:]]
        entries.append(tensor_entry(name, _TRITON_TYPES[spec["type"]], dims))
    return ",\n".join(entries)


def tensor_entry(name: str, data_type: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(str(d) for d in dims)} ] }}'


def graph_config(layout: dict) -> str:
    batch = layout["max_batch_size"]
    return f"""name: "{GRAPH_MODEL}"
platform: "{layout['platform']}"
max_batch_size: {batch}
input [
{tensor_entries(layout['inputs'], layout['vector_size'])}
]
output [
{tensor_entries(layout['outputs'], layout['vector_size'])}
]
dynamic_batching {{
  preferred_batch_size: [ {batch} ]
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
instance_group [ {{ count: {layout['instances']} kind: {layout['kind']} }} ]
"""


def text_config(layout: dict) -> str:
    outputs = ",\n".join(tensor_entry(name, data_type, [layout["vector_size"] if d == "vector_size" else d
                                                        for d in dims])
                         for name, (data_type, dims) in TEXT_OUTPUTS.items())
    settings = {"graph_model": GRAPH_MODEL, "graph_max_batch_size": layout["max_batch_size"],
                "max_batch_tokens": layout["max_batch_tokens"]}
    parameters = ",\n".join(f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
                            for key, value in settings.items())
    return f"""name: "{TEXT_MODEL}"
backend: "python"
max_batch_size: {layout['max_batch_size']}
input [
{tensor_entry("text", "TYPE_STRING", [1])}
]
output [
{outputs}
]
dynamic_batching {{
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
instance_group [ {{ count: {layout['instances']} kind: KIND_CPU }} ]
parameters [
{parameters}
]
"""


def repository_readme(layout: dict) -> str:
    gpus = " --gpus all" if layout["kind"] == "KIND_GPU" else ""
    requirements = " ".join(f"'{r}'" for r in STUB_REQUIREMENTS)
    return f"""# Dewey model repository for Triton Inference Server

Written by `dewey-export triton` (engine `{layout['engine']}`, {layout['precision']}, target
`{layout['target']}`). Configs are complete: the server needs no auto-complete.

| model | backend | input | output |
| --- | --- | --- | --- |
| `{GRAPH_MODEL}` | `{layout['platform']}`, max_batch_size {layout['max_batch_size']}, dynamic batching | `input_ids`, `attention_mask` INT64 [B, S]; `span_bounds` INT64 [B, C, 2] | `cls` FP32 [B, {layout['vector_size']}]; `spans` FP32 [B, C, {layout['vector_size']}] |
| `{TEXT_MODEL}` | `python` (dewey's Encoder, calls `{GRAPH_MODEL}` through BLS) | `text` BYTES [N, 1] | `vectors` FP32 [N, {layout['vector_size']}]; with `mode=chunks`: `chunk_vectors`, `chunk_spans`, `chunk_count` |

Request parameters of `{TEXT_MODEL}`: `mode` (`cls`, `mean`, `cls_add_mean`, `chunks`), `prompt` (a
prompt name such as `query`, or a literal prompt), and with `mode=chunks`: `chunk_size`, `chunk_overlap`,
`splitter` (`tokens`, `words`, `recursive`). Character spans index each text; chunks beyond a text's
`chunk_count` are padding.

## Serve

Target container: `{TRITON_CONTAINER}` (Triton 2.51). The text model's Python environment needs
runtimes' dependencies, with numpy below 2 (the Python stub returns empty FP32 outputs with numpy 2):

```bash
docker run --rm{gpus} -p 8000:8000 -p 8001:8001 -p 8002:8002 -v "$PWD":/models {TRITON_CONTAINER} \\
  bash -c "pip install {requirements} && tritonserver --model-repository=/models"
```

Ready when `curl -s localhost:8000/v2/health/ready` answers 200.

## Query (tritonclient HTTP)

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
texts = np.array([["first text"], ["second text"]], dtype=object)
text = httpclient.InferInput("text", texts.shape, "BYTES")
text.set_data_from_numpy(texts)
result = client.infer("{TEXT_MODEL}", [text], parameters={{"prompt": "query"}},
                      outputs=[httpclient.InferRequestedOutput("vectors")])
vectors = result.as_numpy("vectors")  # float32 [2, {layout['vector_size']}], L2-normalised

chunks = client.infer("{TEXT_MODEL}", [text], parameters={{"mode": "chunks", "chunk_size": 256, "chunk_overlap": 64}},
                      outputs=[httpclient.InferRequestedOutput(name) for name in ("chunk_vectors", "chunk_spans", "chunk_count")])
```
"""
