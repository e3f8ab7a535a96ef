"""``dewey-embed``: embed a whole corpus into Parquet shards, resumably, on one machine or on Ray.

Exit codes: 0 every document embedded (or already in OUT); 2 bad usage or input (a missing input path,
an INPUT that is a FIFO or device, a bad --glob, an unusable model or option, an OUT that is not a
dewey-embed output or holds other settings, a precision this machine runs differently, --ray without
Ray installed), with one line; 3 the run finished but some documents failed (listed in OUT/errors.jsonl).
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click

from runtimes.backends import available_backends, backend_for_folder
from runtimes.batching import DEFAULT_MAX_BATCH_TOKENS
from runtimes.config import SINGLE_VECTOR_TYPES, ModelFileError
from runtimes.errors import cli_errors

from .inputs import DEFAULT_MAX_DOCUMENT_BYTES

EXIT_BAD_INPUT = 2
EXIT_SOME_FAILED = 3
# Documents embedded together (the Encoder sorts them by length and batches them under the token
# budget) and written as one shard: what a killed run can lose at most.
DEFAULT_SHARD_SIZE = 256
SPLITTERS = ("tokens", "words", "recursive")
# Devices on which a Ray actor needs a GPU of its own.
GPU_DEVICES = ("cuda", "tensorrt")


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


def _log(message: str) -> None:
    click.echo(message, err=True)


@cli_errors
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output folder: Parquet shards (documents/, chunks/), manifest.json, errors.jsonl. "
                   "Re-running the same command resumes it.")
@click.option("--model", type=click.Path(path_type=Path),
              help="Model folder or Hub id org/name[@revision] (torch; docs/models.md) or dewey-export folder (onnx, "
                   "openvino, trt); default: the packaged dewey-mini.")
@click.option("--backend", type=click.Choice(available_backends()),
              help="Default: the one --model is for (an export folder's manifest says; a model folder: torch).")
@click.option("--device", help="torch: cpu or cuda[:N]; onnx: cpu, cuda[:N] or tensorrt[:N]; trt: cuda[:N].")
@click.option("--mode", type=click.Choice(SINGLE_VECTOR_TYPES),
              help="Document vector: cls, mean or cls_add_mean; default: the model's single_vector_type.")
@click.option("--chunks", is_flag=True,
              help="Late chunking: also one vector per chunk (chunks/), from one pass over the whole document.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=256, show_default=True, help="Tokens per chunk.")
@click.option("--chunk-overlap", type=click.IntRange(min=0), default=64, show_default=True,
              help="Tokens shared by neighbouring chunks.")
@click.option("--splitter", type=click.Choice(SPLITTERS), default="tokens", show_default=True,
              help="tokens: fixed windows; words: windows ending at word boundaries; recursive: paragraph, "
                   "line, sentence, word boundaries.")
@click.option("--prompt", default="passage", show_default=True,
              help='A prompt name of the model (passage, query), a literal prompt, or "" for none.')
@click.option("--text-field", default="text", show_default=True, help="JSONL field / Parquet column of the text.")
@click.option("--id-field", default="id", show_default=True,
              help="JSONL field / Parquet column of the document id; without one: NAME:LINE (JSONL, from 1) "
                   "or NAME:ROW (Parquet, from 0). A text file's id is its NAME: its path relative to the "
                   "INPUT folder (an INPUT file: its file name).")
@click.option("--glob", "globs", multiple=True,
              help="Files to read in an INPUT folder, relative to it (repeatable); default: **/*.txt **/*.md "
                   "**/*.markdown **/*.rst **/*.jsonl **/*.ndjson **/*.parquet.")
@click.option("--follow-symlinks", is_flag=True,
              help="Follow symbolic links in INPUT folders that lead outside them (by default they are "
                   "skipped, and the run says so).")
@click.option("--max-document-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_DOCUMENT_BYTES,
              show_default=True,
              help="Largest document read (a text file, a JSONL line, a Parquet text value); larger ones "
                   "are listed in errors.jsonl unread.")
@click.option("--max-length", type=click.IntRange(min=1),
              help="Tokens per document row, prompt and special tokens included. Without --chunks longer "
                   "documents are cut (truncated_tokens); with --chunks they run in overlapping windows of "
                   "this length and nothing is cut. Default: the model's maximum.")
@click.option("--max-batch-tokens", "--batch-tokens", "batch_tokens", type=click.IntRange(min=1),
              default=DEFAULT_MAX_BATCH_TOKENS, show_default=True,
              help="Padded tokens per forward batch.")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Documents embedded together, sorted by length, and written as one shard.")
@click.option("--overwrite", is_flag=True,
              help="Start over when OUT holds a previous dewey-embed output (also one made with other "
                   "settings). Never removes anything dewey-embed did not write.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on a Ray cluster with Ray Data (pip install 'dewey[ray]'); same output.")
@click.option("--ray-address", help="--ray: the cluster (auto, or HOST:PORT); default: RAY_ADDRESS, else a local Ray.")
@click.option("--workers", type=click.IntRange(min=1),
              help="--ray: Encoder actors; default: one per --worker-cpus CPUs of the cluster (one per GPU on a GPU device).")
@click.option("--worker-cpus", type=click.IntRange(min=1),
              help="--ray: CPUs (threads) of each actor; default 1.")
def main(inputs, out, model, backend, device, mode, chunks, chunk_size, chunk_overlap, splitter, prompt, text_field,
         id_field, globs, follow_symlinks, max_document_bytes, max_length, batch_tokens, shard_size, overwrite, use_ray,
         ray_address, workers, worker_cpus):
    """Embed the documents of INPUT... (text and Markdown files, folders, JSONL and Parquet files) into
    Parquet shards under OUT, with late-chunked chunk vectors under --chunks.

    \b
    Re-running the same command skips the documents already in OUT's complete shards: a killed run
    loses at most the shards it was writing. Bad documents are listed in OUT/errors.jsonl and skipped.
    Exit codes: 0 all documents embedded; 2 bad usage or input (missing INPUT, unusable model or
    option, OUT not usable); 3 finished, but some documents failed (see OUT/errors.jsonl).
    """
    from .inputs import DEFAULT_GLOBS, WINDOW_CHARS, Fields, InputError, Seen, count_documents, input_tables, list_files
    from .pipeline import BatchEmbedder, EmbedOptions, Progress, write_results
    from .shards import ERRORS_FILE, OutputError, open_output, read_manifest

    if not use_ray and (ray_address or workers or worker_cpus):
        raise click.UsageError("--ray-address, --workers and --worker-cpus go with --ray")
    # What earlier runs into OUT listed, so a file keeps its id whatever root names it now.
    previous = None if overwrite or not out.is_dir() else read_manifest(out)
    seen = Seen.from_record(previous.get("seen") if previous else None)
    try:
        files = list_files(inputs, globs or DEFAULT_GLOBS, exclude=out, follow_symlinks=follow_symlinks, seen=seen,
                           log=_log)
    except InputError as exc:
        raise BadInput(str(exc)) from None
    if use_ray:
        from .ray_runner import RayMissing, import_ray

        try:
            import_ray()
        except RayMissing as exc:
            raise BadInput(str(exc)) from None
    if model is None:
        from runtimes import default_model_path

        try:
            model = default_model_path()
        except ModelFileError as exc:
            raise BadInput(str(exc)) from None
    fields = Fields(text=text_field, id=id_field, max_bytes=max_document_bytes)
    if backend is None:
        backend = backend_for_folder(model) if model.is_dir() else "torch"
    try:
        options, settings = _settings(model, backend, EmbedOptions(
            mode=mode, prompt=prompt or None, chunks=chunks, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
            splitter=splitter, max_length=max_length, batch_tokens=batch_tokens,
        ), fields)
    except (ModelFileError, ImportError, ValueError) as exc:
        raise BadInput(str(exc)) from None

    embedder = dict(model=str(model), backend=backend, device=device, options=options, precision=settings["precision"])
    if not use_ray:  # loaded before OUT is touched: a model that does not load leaves no OUT behind
        try:
            batch_embedder = BatchEmbedder(**embedder)
        except (ModelFileError, ImportError, ValueError, RuntimeError) as exc:
            raise BadInput(str(exc)) from None
    try:
        with open_output(out, settings, overwrite, _log, seen=seen.record()) as output:
            if output.done_ids:
                _log(f"Resuming {out}: {len(output.done_ids)} documents in {output.counts['shards']} shards "
                     "are done and will be skipped")
            if use_ray:
                from .ray_runner import ray_results

                gpu = backend == "trt" or (device or "cpu").split(":")[0] in GPU_DEVICES
                worker_cpus = worker_cpus or 1
                workers, results = ray_results(files, fields, {**embedder, "done_ids": output.done_ids}, shard_size,
                                               ray_address, workers, worker_cpus, gpu)
            else:
                batch_embedder.done_ids = output.done_ids
                results = map(batch_embedder, input_tables(files, fields, shard_size, WINDOW_CHARS))
            progress = Progress(count_documents(files))
            try:
                figures = write_results(results, output, progress)
            finally:
                progress.close()
            output.finish({
                "inputs": [str(path) for path in inputs], "files": len(files), "device": device,
                "follow_symlinks": follow_symlinks, "max_document_bytes": max_document_bytes,
                "batch_tokens": batch_tokens, "shard_size": shard_size,
                "ray": {"address": ray_address, "workers": workers, "worker_cpus": worker_cpus} if use_ray else None,
                **figures, "versions": _versions(),
            })
    except OutputError as exc:
        raise BadInput(str(exc)) from None

    rate = figures["tokens"] / figures["seconds"] if figures["seconds"] else 0.0
    _log(f"{figures['embedded']} documents embedded ({figures['tokens']} tokens, {rate:.0f} tokens/s), "
         f"{figures['skipped']} already in {out}, {figures['failed']} failed"
         + (f" (listed in {out / ERRORS_FILE})" if figures["failed"] else ""))
    if figures["failed"]:
        sys.exit(EXIT_SOME_FAILED)


def _settings(model: Path, backend: str, options, fields) -> tuple:
    """The options with the model's default mode filled in, and the settings a resumed run must share:
    the model's files (sha256; an export folder's from its verified manifest), backend, the precision it
    runs in on this machine, the vector options and the id/text fields. Checks the options against the
    model's config and tokenizer (ModelFileError, ValueError) before anything is written."""
    from dataclasses import replace

    from runtimes.config import load_config
    from runtimes.export_format import MANIFEST_FILE, check_export_files, file_table
    from runtimes.model_source import resolve_model
    from runtimes.tokenization import DeweyTokenizer

    from .pipeline import running_precision, token_budget

    if (model / MANIFEST_FILE).exists():
        config, tokenizer_folder = load_config(model), model
    else:  # a model folder of any layout runtimes.load reads (docs/models.md), or a Hub id
        source = resolve_model(model)
        config, tokenizer_folder, model = source.config, source.tokenizer_folder, source.folder
    options = replace(options, mode=options.mode or config.single_vector_type)
    token_budget(config, DeweyTokenizer.from_folder(tokenizer_folder, config), options)
    if (model / MANIFEST_FILE).exists():
        if backend == "torch":
            raise ModelFileError(f"--model {model} is a dewey-export folder; the torch backend reads a checkpoint")
        export = check_export_files(model)
        kind, precision = "export", running_precision(backend, export.precision)
        files = {name: entry["sha256"] for name, entry in export.files.items()}
    else:
        if backend != "torch":
            raise ModelFileError(f"--backend {backend} reads a dewey-export folder, and --model {model} is a "
                                 "checkpoint: export it first (dewey-export --model CHECKPOINT --to onnx --out DIR)")
        kind, precision = "checkpoint", "fp32"  # the torch backend's default, the one dewey-embed runs
        files = {name: entry["sha256"] for name, entry in file_table(model).items()}
    settings = {
        "model": {"path": str(model.resolve()), "kind": kind, "files": files},
        "backend": backend,
        "precision": precision,
        "vector_size": config.vector_size,
        "options": options.identity(),
        "fields": {"text": fields.text, "id": fields.id},
    }
    return options, settings


def _versions() -> dict:
    import pyarrow

    try:
        dewey = version("dewey")
    except PackageNotFoundError:  # running from a source tree that was never installed
        dewey = None
    return {"dewey": dewey, "pyarrow": pyarrow.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
