"""dewey-embed --ray on a local Ray cluster (2 CPUs, no dashboard, 127.0.0.1 only) started and stopped
by the test in a child process with a time limit: the same rows as the one-machine run, and a resumed
run on Ray skips what a one-machine run already wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'dewey[ray]')")
pq = pytest.importorskip("pyarrow.parquet")

FP32_ATOL = 1e-5
RAY_TIMEOUT_S = 240
RAY_CPUS = 2
# Ray picks the machine's network address for its node unless told otherwise; the node, its workers
# and their connections must stay on the loopback interface. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes
# Ray's own address lookups answer 127.0.0.1, which _node_ip_address alone does not do for all of them.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

# The child process: one local Ray, every dewey-embed run of the test in it, Ray stopped at the end.
RAY_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from dewey_embed.cli import main

    ray.init(num_cpus={cpus}, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        for args in json.loads(sys.argv[1]):
            try:
                main(args, standalone_mode=False)
            except SystemExit as exc:
                if exc.code:
                    raise
    finally:
        ray.shutdown()
""").format(cpus=RAY_CPUS)


def run_on_ray(runs: list[list[str]], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RAY_SCRIPT, json.dumps(runs)], env={**env, **RAY_ENV},
                          capture_output=True, text=True, timeout=RAY_TIMEOUT_S)


def test_ray_gives_the_rows_of_the_single_process_run(corpus, checkpoint, embed, read_output, tmp_path,
                                                      subprocess_env):
    folder, texts = corpus
    options = ["--model", str(checkpoint), "--chunks", "--chunk-size", "64", "--chunk-overlap", "16",
               "--shard-size", "3"]
    single = tmp_path / "single"
    assert embed(folder, "--out", single, *options).exit_code == 0

    # A resumed run: part of the corpus embedded on one machine first, the rest by Ray.
    resumed = tmp_path / "resumed"
    first_part = folder / "notes"
    assert embed(first_part, "--out", resumed, *options).exit_code == 0
    already = pq.read_table(resumed / "documents").num_rows

    on_ray = tmp_path / "ray"
    ray_options = [*options, "--ray", "--workers", str(RAY_CPUS)]
    result = run_on_ray([[str(folder), "--out", str(on_ray), *ray_options],
                         [str(folder), "--out", str(resumed), *ray_options]], subprocess_env)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]

    reference_documents, reference_chunks = read_output(single)
    reference_manifest = json.loads((single / "manifest.json").read_text())
    # The first part of the resumed run was named from its own folder, and keeps those names.
    renamed = {doc_id: doc_id.removeprefix("notes/") for doc_id in texts}
    for out, names in ((on_ray, {doc_id: doc_id for doc_id in texts}), (resumed, renamed)):
        ids = pq.read_table(out / "documents")["id"].to_pylist()
        assert sorted(ids) == sorted(names.values()), f"{out.name}: a document is missing or duplicated"
        documents, chunks = read_output(out)
        for doc_id, reference in reference_documents.items():
            row = documents[names[doc_id]]
            assert (row["source"], row["n_tokens"], row["truncated_tokens"]) == \
                (reference["source"], reference["n_tokens"], reference["truncated_tokens"])
            assert np.abs(row["vector"] - reference["vector"]).max() <= FP32_ATOL
            assert [(c["char_start"], c["char_end"], c["text"]) for c in chunks[names[doc_id]]] == \
                [(c["char_start"], c["char_end"], c["text"]) for c in reference_chunks[doc_id]]
            assert np.abs(np.stack([c["vector"] for c in chunks[names[doc_id]]])
                          - np.stack([c["vector"] for c in reference_chunks[doc_id]])).max() <= FP32_ATOL
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["settings"] == reference_manifest["settings"]
        assert manifest["counts"]["shards"] > 2, "Ray's windows were not split: one actor did all the work"
        for count in ("documents", "chunks", "tokens"):  # shards differ: Ray forms its own windows
            assert manifest["counts"][count] == reference_manifest["counts"][count]
        assert manifest["last_run"]["ray"]["workers"] == RAY_CPUS
    resumed_run = json.loads((resumed / "manifest.json").read_text())["last_run"]
    assert (resumed_run["skipped"], resumed_run["embedded"]) == (already, len(texts) - already)
