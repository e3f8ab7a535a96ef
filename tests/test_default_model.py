"""The packaged default model, dewey-mini: present, within its size budget, Dewey's long-context
settings, loadable with no path, and a model whose vectors mean something."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtimes import DEFAULT_MODEL_DIR, default_model_path, load
from runtimes.config import DEWEY_INSTRUCTION_TOKENS, DEWEY_PROMPTS

pytest.importorskip("torch")


def test_default_model_files_and_settings():
    folder = default_model_path()
    assert folder == DEFAULT_MODEL_DIR
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 25 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == 131072
    # transformers 5 saves the two RoPE bases per layer type
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 73780400.0
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert config["local_attention"] == 128
    assert config["prompts"] == DEWEY_PROMPTS
    assert tuple(config["instruction_tokens"]) == DEWEY_INSTRUCTION_TOKENS
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["teacher"] == "all-MiniLM-L6-v2" and summary["steps"] > 0


def test_load_without_a_path_gives_meaningful_vectors():
    enc = load()
    queries = enc.encode(["how do I parse a JSON string?", "how do I sort a list in place?"], mode="mean")
    passages = enc.encode([
        "json.loads() turns a str holding a JSON document into a Python object.",
        "list.sort() sorts the items of the list in place.",
        "The socket module gives access to the BSD socket interface.",
    ], mode="mean")
    scores = queries @ passages.T
    assert scores.shape == (2, 3)
    assert list(scores.argmax(axis=1)) == [0, 1]
    assert np.all(scores.max(axis=1) - np.sort(scores, axis=1)[:, -2] > 0.1)
