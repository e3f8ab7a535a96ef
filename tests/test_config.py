"""Model definition and files: the published dewey_en_beta config, save/load, transformers compatibility."""

from __future__ import annotations

import json
import re
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


# -- impossible checkpoints: ModelFileError naming the file and the key --------------------------------


@pytest.fixture
def broken(checkpoint, tmp_path):
    """A private copy of the test checkpoint to break."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ck"))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0}, r"num_attention_heads must be >= 1, got 0"),
        ({"num_attention_heads": True}, r"num_attention_heads must be an integer, got bool"),
        ({"num_hidden_layers": -1}, r"num_hidden_layers must be >= 1, got -1"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers must be >= 1, got 0"),
        ({"intermediate_size": 0}, r"intermediate_size must be >= 1, got 0"),
        ({"hidden_size": 33}, r"hidden_size 33 is not divisible by num_attention_heads 2"),
        ({"hidden_size": 32.0}, r"hidden_size must be an integer, got float"),
        ({"norm_eps": "x"}, r"norm_eps must be a number, got str 'x'"),
        ({"norm_eps": -1e-5}, r"norm_eps must be a finite number > 0"),
        ({"norm_eps": float("nan")}, r"norm_eps must be a finite number > 0, got nan"),
        ({"global_rope_theta": 0}, r"global_rope_theta must be a finite number > 0"),
        ({"rope_parameters": {"full_attention": {"rope_theta": -1.0}}},
         r"rope_parameters\.full_attention\.rope_theta must be a finite number > 0"),
        ({"global_attn_every_n_layers": 0}, r"global_attn_every_n_layers must be >= 1, got 0"),
        ({"global_attn_every_n_layers": -2}, r"global_attn_every_n_layers must be >= 1, got -2"),
        ({"local_attention": 0}, r"local_attention must be >= 2, got 0"),
        ({"local_attention": -4}, r"local_attention must be >= 2, got -4"),
        ({"local_attention": 7}, r"local_attention must be even .*got 7"),
        ({"layer_types": ["full_attention"]}, r"layer_types has 1 entries for num_hidden_layers 3"),
        ({"layer_types": ["full_attention", "global", "sliding_attention"]}, r"layer_types must be a list of"),
        ({"hidden_activation": 3}, r"Validation error for field 'hidden_activation'"),  # transformers' check
        ({"hidden_activation": "bogus"}, r"hidden_activation 'bogus' is not an activation transformers knows"),
        ({"instruction_tokens": "<|START_INSTRUCTION|>"}, r"'instruction_tokens' must be a list of strings"),
        ({"max_position_embeddings": 0}, r"max_position_embeddings must be >= 1, got 0"),
    ],
)
def test_impossible_config_values_are_named(broken, change, message):
    """Each impossible value raises ModelFileError naming config.json and the key at load, instead of
    a ZeroDivisionError deep in transformers or a model that loads and silently computes otherwise."""
    _edit_config(broken, **change)
    with pytest.raises(ModelFileError, match=rf"ck/config\.json: {message}"):
        load(broken)


def test_structure_check_accepts_the_published_config(dewey_raw):
    """check_backbone_fields (plain Python, in runtimes.config) passes dewey_en_beta's values and names
    the source it is given."""
    from runtimes.config import check_backbone_fields

    check_backbone_fields(dewey_raw, "published")
    with pytest.raises(ModelFileError, match=r"published: num_attention_heads must be >= 1"):
        check_backbone_fields({**dewey_raw, "num_attention_heads": 0}, "published")


def _rewrite_weight(folder: Path, key: str, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[key] = change(state[key])
    save_file(state, str(path), metadata={"format": "pt"})


def _poison(value):
    def change(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[tensor.numel() // 2] = value
        return tensor
    return change


@pytest.mark.parametrize(
    "key, change, message",
    [
        ("layers.1.attn.Wqkv.weight", _poison(float("nan")), r"holds 1 NaN or infinite values"),
        ("embeddings.tok_embeddings.weight", _poison(float("inf")), r"holds 1 NaN or infinite values"),
        (HEAD_KEY, _poison(-float("inf")), r"holds 1 NaN or infinite values"),
        ("layers.0.mlp.Wo.weight", lambda t: (t * 100).to(torch.int32), r"holds torch\.int32 values, not floats"),
        ("final_norm.weight", lambda t: t > 0, r"holds torch\.bool values, not floats"),
    ],
)
def test_bad_weight_values_are_named(broken, key, change, message):
    """NaN/inf and non-float weights raise ModelFileError naming model.safetensors and the key as the
    file spells it; without the check they load (cast or copied) and every vector comes out NaN or wrong."""
    _rewrite_weight(broken, key, change)
    with pytest.raises(ModelFileError, match=rf"ck/model\.safetensors: {re.escape(key)} {message}"):
        load(broken)


def test_large_finite_weights_load(broken):
    """The cheap finite check (a float32 sum) does not refuse finite weights whose sum overflows."""
    _rewrite_weight(broken, "final_norm.weight", lambda t: torch.full_like(t, 3e38))
    DeweyModel.from_pretrained(broken)


def test_dewey_export_exits_2_on_nan_weights(broken, tmp_path):
    """dewey-export reports a NaN checkpoint as bad input (exit 2) naming the file and the key."""
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    from click.testing import CliRunner

    from dewey_export.cli import EXIT_BAD_INPUT, main

    _rewrite_weight(broken, "layers.1.attn.Wqkv.weight", _poison(float("nan")))
    result = CliRunner().invoke(main, ["onnx", "--model", str(broken), "--out", str(tmp_path / "out")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "layers.1.attn.Wqkv.weight holds 1 NaN" in result.output
