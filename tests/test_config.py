"""Model definition and files: the published dewey_en_beta config, save/load, transformers compatibility."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from runtimes import ModelFileError, load
from runtimes.config import DeweyConfig, load_config
from runtimes.modeling import HEAD_KEY, DeweyModel, backbone_config
from runtimes.testing import build_test_tokenizer, make_test_checkpoint
from runtimes.tokenization import DeweyTokenizer

DEWEY_CONFIG = Path(__file__).parent / "data" / "dewey_en_beta_config.json"


@pytest.fixture(scope="module")
def dewey_raw():
    return json.loads(DEWEY_CONFIG.read_text())


def test_dewey_en_beta_config_parses_with_published_values(dewey_raw):
    config = DeweyConfig.from_dict(dewey_raw)
    assert (config.hidden_size, config.vector_size) == (1024, 2048)
    assert config.max_position_embeddings == 131072
    assert config.vocab_size == 50370
    assert (config.cls_token_id, config.sep_token_id, config.pad_token_id) == (50281, 50282, 50283)
    assert config.single_vector_type == "cls_add_mean"

    backbone = backbone_config(dewey_raw)
    assert backbone.rope_parameters["full_attention"]["rope_theta"] == 73780400.0
    assert backbone.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert backbone.layer_types.count("full_attention") == 10
    assert backbone.layer_types.count("sliding_attention") == 18
    assert backbone.sliding_window == 64  # half of local_attention 128
    assert (backbone.num_attention_heads, backbone.intermediate_size) == (16, 2624)


def test_dewey_en_beta_builds_full_size_on_meta_device(dewey_raw):
    """The whole 28-layer model builds; its size matches the ~395M parameters reported for dewey_en_beta."""
    with torch.device("meta"):
        model = DeweyModel(backbone_config(dewey_raw))
    n_params = sum(p.numel() for p in model.parameters())
    assert 390e6 < n_params < 400e6
    assert tuple(model.head.weight.shape) == (2048, 1024)
    assert model.vector_size == 2048
    assert len(model.backbone.layers) == 28


def test_dewey_en_beta_runs_with_fewer_layers(dewey_raw):
    """Every published value but the layer count, with random weights: a forward past the 128-token window."""
    raw = dict(dewey_raw, num_hidden_layers=3)
    torch.manual_seed(0)
    model = DeweyModel(backbone_config(raw)).eval()
    seq = 300
    ids = torch.randint(0, 50000, (1, seq))
    ids[0, 0], ids[0, -1] = 50281, 50282
    spans = torch.tensor([[[1, seq - 1], [1, 129], [0, 0]]])
    with torch.inference_mode():
        cls, pooled = model(ids, torch.ones_like(ids), spans)
        hidden = model.backbone(input_ids=ids).last_hidden_state
    assert cls.shape == (1, 2048) and pooled.shape == (1, 3, 2048)
    assert torch.isfinite(cls).all() and torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled[0, 0], model.head(hidden[0, 1 : seq - 1].mean(0)), atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(pooled[0, 2]) == 0


def test_config_without_prompts_refuses_prompt_names(dewey_raw):
    """A config that defines no prompts must not take "query" as literal text."""
    tokenizer = DeweyTokenizer(build_test_tokenizer(), DeweyConfig.from_dict(dewey_raw))
    with pytest.raises(ValueError, match="no prompt named 'query'"):
        tokenizer.resolve_prompt("query")
    assert tokenizer.resolve_prompt("search_query: ") == "search_query: "


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"single_vector_type": "max"}, "single_vector_type"),
        ({"vector_size": 0}, "vector_size"),
        ({"pad_token_id": 60000}, "outside the vocabulary"),
        ({"prompts": ["query"]}, "prompts"),
    ],
)
def test_bad_config_values_are_named(dewey_raw, change, message):
    raw = {k: v for k, v in {**dewey_raw, **change}.items() if v is not None}
    with pytest.raises(ModelFileError, match=message):
        DeweyConfig.from_dict(raw)


def test_save_load_round_trip_is_exact(checkpoint, tmp_path):
    model = DeweyModel.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path)
    again = DeweyModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "config.json").read_text())["vector_size"] == model.vector_size
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes left temporary files"


def test_backbone_loads_with_plain_transformers(checkpoint):
    """transformers.AutoModel reads our checkpoint's backbone: same weights, same hidden states."""
    from transformers import AutoModel

    ours = DeweyModel.from_pretrained(checkpoint, attention="dense")
    theirs = AutoModel.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    assert type(theirs).__name__ == "ModernBertModel"
    for name, tensor in ours.backbone.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.inference_mode():
        a = ours.backbone(input_ids=ids).last_hidden_state
        b = theirs(input_ids=ids).last_hidden_state
        linear = DeweyModel.from_pretrained(checkpoint).backbone(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Our linear-memory attention computes the same function, up to float rounding.
    torch.testing.assert_close(linear, b, atol=1e-5, rtol=0)


def test_checkpoint_with_prefixed_backbone_keys_loads(checkpoint, tmp_path):
    """Weights saved by a wrapper (keys under "model.") load to the same model."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(checkpoint, tmp_path / "ck"))
    state = load_file(str(folder / "model.safetensors"))
    save_file({(k if k == HEAD_KEY else "model." + k): v for k, v in state.items()}, str(folder / "model.safetensors"))
    text = ["prefixed keys must not change the vectors"]
    np.testing.assert_array_equal(load(folder).encode(text), load(checkpoint).encode(text))


def test_no_head_when_vector_size_equals_hidden(tmp_path):
    folder = make_test_checkpoint(tmp_path, hidden_size=32, vector_size=32)
    model = DeweyModel.from_pretrained(folder)
    assert model.head is None
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert HEAD_KEY not in f.keys()
    vectors = load(folder).encode(["no head", "still works"])
    assert vectors.shape == (2, 32)


def test_test_checkpoints_are_deterministic(tmp_path, checkpoint):
    """The test-model helper gives the same files for the same seed, different weights for another."""
    again = make_test_checkpoint(tmp_path / "a", seed=0)
    other = make_test_checkpoint(tmp_path / "b", seed=1)
    assert (again / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (checkpoint / "model.safetensors").read_bytes()
    assert load_config(again) == load_config(checkpoint)
