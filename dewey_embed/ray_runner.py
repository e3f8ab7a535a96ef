"""dewey-embed on a Ray cluster: the one-machine run's per-batch function, as Ray Data stages.

    read   ray.data.from_items(input files) -> map_batches(inputs.input_tables of each file)
    embed  map_batches(pipeline.BatchEmbedder): an actor pool, one Encoder per actor (--workers)
    write  the driver takes the result tables (iter_batches) and writes them as shards

Ray Data hands work to the actors a block at a time, and a read task makes one block of each input
file (up to Ray Data's target block size, 128 MiB): so the work spreads over the actors file by file,
and a corpus meant for many workers should come in at least as many files. The actors embed their
blocks in windows of --shard-size documents, and the driver cuts the results into shards of that size.

The driver writes, with the same OutputFolder as a one-machine run, for two reasons: OUT is a path on
the machine that runs dewey-embed (a task writing to it would write on whichever node it ran on), and
the shard writer is the one place that keeps the resumption rules (atomic shards, ids met once). Each
actor gets the ids already in OUT and passes their rows through unembedded, so a resumed run on Ray
skips them as a one-machine run does. The input files and the model folder must be readable at the
same path on every node (a shared filesystem), as for any Ray Data read.

Ray is an optional extra (``pip install 'dewey[ray]'``), imported only here and only for ``--ray``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from .inputs import READ_ROWS, Fields, InputFile, input_tables
from .pipeline import BatchEmbedder

RAY_INSTALL = "pip install 'dewey[ray]'"
# Read tasks at most: enough for the actors never to wait on a read, few enough to schedule cheaply
# (one task per file for a million small files would cost more than reading them).
MAX_READ_TASKS = 1024
# Reading is light next to embedding: read tasks reserve no CPU, so actors holding every CPU of the
# cluster never starve them (which would stall the pipeline).
READ_TASK_CPUS = 0


class RayMissing(Exception):
    """--ray was asked for, but Ray Data is not installed."""


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library is a part of ray[data], not of every ray install)
    except ImportError as exc:
        raise RayMissing(f"--ray needs Ray Data, which is not installed: {RAY_INSTALL}") from exc
    return ray


def read_files(batch: pa.Table, fields: Fields) -> Iterator[pa.Table]:
    """The read stage: the document rows of the files named in ``batch``, streamed in tables."""
    for path, name in zip(batch["path"].to_pylist(), batch["name"].to_pylist()):
        yield from input_tables([InputFile(Path(path), name)], fields, READ_ROWS)


def ray_results(files: list[InputFile], fields: Fields, embedder: dict, shard_size: int, address: str | None,
                workers: int | None, worker_cpus: int, gpu: bool) -> tuple[int, Iterator[pa.Table]]:
    """Join (or start) the cluster and plan the run: the number of actors, and the result tables
    (pipeline.result_schema) of all ``files``, computed as they are consumed. ``embedder``: the
    BatchEmbedder's arguments. ``address`` None: the cluster of RAY_ADDRESS, else a new local one (or the
    one this process already joined). ``workers`` None: one actor per ``worker_cpus`` CPUs of the cluster,
    or per GPU with ``gpu``."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # dewey-embed's own bars count documents
    if workers is None:
        resources = ray.cluster_resources()
        workers = max(1, int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1)) // worker_cpus)
    dataset = ray.data.from_items([{"path": str(file.path), "name": file.name} for file in files],
                                  override_num_blocks=min(len(files), MAX_READ_TASKS))
    dataset = dataset.map_batches(read_files, fn_kwargs={"fields": fields}, batch_size=1, batch_format="pyarrow",
                                  num_cpus=READ_TASK_CPUS)
    dataset = dataset.map_batches(
        BatchEmbedder, fn_constructor_kwargs={**embedder, "threads": worker_cpus}, batch_size=shard_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=worker_cpus,
        num_gpus=1 if gpu else 0,
    )
    # A block holds what one task made (up to Ray Data's block size): cut into windows again here, so
    # shards have --shard-size rows as on one machine.
    return workers, dataset.iter_batches(batch_size=shard_size, batch_format="pyarrow")
