"""The Dewey release layout: DeweyV1 config with auto_map, backbone under ``model.``, a projection head with a
bias under a name of its own, found by shape; checked against transformers' ModernBertModel plus the head
by hand. The folder's ``modeling_dewey_v1.py`` would write a marker file if it ever ran, and an audit
hook records every file Python opens: no ``.py`` (nor pickled weights) in a model folder is opened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import runtimes  # noqa: E402
from runtimes.config import DEWEY_PROMPTS, ModelFileError  # noqa: E402
from runtimes.model_source import resolve_model  # noqa: E402

RELEASE_ATOL = 1e-5
HIDDEN, VECTOR = 32, 48
HEAD = "projection"
MARKER_NAME = "MODELING_CODE_RAN"

# Files opened by Python while ``opened_files`` is active (sys.audit "open" events: open(), io.open_code
# used by imports, Path.read_text). Audit hooks cannot be removed, so this one is switched on and off.
_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def opened_files():
    """Collect the paths Python opens inside the block."""
    global _OPENED
    _OPENED = []
    found = _OPENED
    try:
        yield found
    finally:
        _OPENED = None


def assert_never_opened(paths: list[str], folder: Path, suffixes=(".py", ".bin", ".pyc")) -> None:
    inside = [p for p in paths if str(Path(p).resolve()).startswith(str(folder.resolve())) and p.endswith(suffixes)]
    assert not inside, f"opened from the model folder: {inside}"


def make_release_folder(folder: Path, marker: Path, seed: int = 0, extra_heads=()) -> tuple[Path, dict]:
    """A folder shaped like the dewey_en_beta release; returns it and the tensors written."""
    from safetensors.torch import save_file
    from transformers import ModernBertConfig, ModernBertModel

    from runtimes.testing import build_test_tokenizer, test_config

    tokenizer = build_test_tokenizer()
    raw = test_config(tokenizer.get_vocab_size(with_added_tokens=True), hidden_size=HIDDEN, vector_size=HIDDEN)
    for key in ("vector_size", "single_vector_type", "prompts"):
        raw.pop(key)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    backbone = ModernBertModel(ModernBertConfig(**raw)).eval()
    state = {f"model.{k}": v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    for name in (HEAD, *extra_heads):
        state[f"{name}.weight"] = torch.randn(VECTOR, HIDDEN, generator=generator) * 0.3
        state[f"{name}.bias"] = torch.randn(VECTOR, generator=generator) * 0.3
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**raw, "architectures": ["DeweyV1"], "model_type": "dewey_v1",
              "auto_map": {"AutoConfig": "modeling_dewey_v1.DeweyV1Config", "AutoModel": "modeling_dewey_v1.DeweyV1"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "modeling_dewey_v1.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n\n\nclass DeweyV1:\n    pass\n",
        encoding="utf-8",
    )
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": DEWEY_PROMPTS}), encoding="utf-8")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder, state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    marker = root / MARKER_NAME
    folder, state = make_release_folder(root / "dewey_en_beta", marker)
    return folder, state, marker


def by_hand(folder: Path, state: dict, text: str, prompt: str):
    """cls and mean (text tokens only) of transformers' ModernBertModel, then the head, in float64."""
    from tokenizers import Tokenizer
    from transformers import ModernBertConfig, ModernBertModel

    raw = json.loads((folder / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type")}
    model = ModernBertModel(ModernBertConfig(**raw)).eval()
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    text_ids = tokenizer.encode(text, add_special_tokens=False).ids
    ids = [raw["cls_token_id"], *prompt_ids, *text_ids, raw["sep_token_id"]]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
    weight, bias = state[f"{HEAD}.weight"].double(), state[f"{HEAD}.bias"].double()
    start = 1 + len(prompt_ids)
    cls = hidden[0] @ weight.T + bias
    mean = hidden[start: start + len(text_ids)].mean(0) @ weight.T + bias
    return cls.numpy(), mean.numpy()


def test_release_layout_matches_modernbert_plus_head_by_hand(release, long_text):
    folder, state, marker = release
    with opened_files() as opened:
        encoder = runtimes.load(folder)
    assert any(p.endswith("config.json") for p in opened), "the audit hook sees the files that are read"
    assert_never_opened(opened, folder)
    assert not marker.exists()
    source = encoder.source
    assert source.layout == "dewey_release" and source.backbone_prefix == "model."
    assert [(h.weight, h.bias) for h in source.head] == [(f"{HEAD}.weight", f"{HEAD}.bias")]
    assert "head=projection.weight+bias[32->48]" in repr(encoder)
    assert encoder.config.prompts == DEWEY_PROMPTS and encoder.vector_size == VECTOR
    worst = {"cls": 0.0, "mean": 0.0, "cls_add_mean": 0.0}
    for text in ("Short text.", long_text[:300], long_text[:4000]):
        cls, mean = by_hand(folder, state, text, DEWEY_PROMPTS["query"])
        expected = {"cls": cls, "mean": mean,
                    "cls_add_mean": cls / np.linalg.norm(cls) + mean / np.linalg.norm(mean)}
        expected["cls_add_mean"] /= np.linalg.norm(expected["cls_add_mean"])
        for mode in worst:
            got = encoder.encode(text, mode=mode, prompt_name="query", normalize=mode == "cls_add_mean")
            worst[mode] = max(worst[mode], float(np.abs(got - expected[mode]).max()))
    print(f"[release] max abs diff against ModernBertModel + head by hand: {worst}")
    assert max(worst.values()) <= RELEASE_ATOL
    assert not marker.exists()


def test_release_export_records_the_head_and_never_runs_its_code(release, tmp_path):
    pytest.importorskip("onnxruntime")
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export
    from dewey_export.verify import check_source

    folder, _, marker = release
    with opened_files() as opened:
        result = export(folder, tmp_path / "onnx", OnnxTarget(), log=lambda message: None)
    assert_never_opened(opened, folder)
    assert not marker.exists()
    assert result.passed
    model = result.manifest.source["model"]
    assert model["layout"] == "dewey_release"
    assert model["head"] == [{"file": "model.safetensors", "weight": f"{HEAD}.weight", "bias": f"{HEAD}.bias",
                              "shape": [VECTOR, HIDDEN], "activation": "identity"}]
    assert "modeling_dewey_v1.py" not in result.manifest.source["sha256"]
    exported = json.loads((result.folder / "config.json").read_text())
    assert exported["architectures"] == ["ModernBertModel"] and "auto_map" not in exported
    assert not (result.folder / "modeling_dewey_v1.py").exists()
    texts = ["a query", "Candidate documents about the datamodel " * 40]
    torch_vectors = runtimes.load(folder).encode(texts, prompt_name="passage")
    onnx_vectors = runtimes.load(result.folder, backend="onnx").encode(texts, prompt_name="passage")
    assert np.abs(torch_vectors - onnx_vectors).max() <= RELEASE_ATOL
    source, _ = check_source(result.manifest)  # dewey-export verify reads the recorded head again
    assert source.head[0].weight == f"{HEAD}.weight"


def test_ambiguous_heads_are_listed_and_chosen_by_name(tmp_path):
    marker = tmp_path / MARKER_NAME
    folder, state = make_release_folder(tmp_path / "two-heads", marker, extra_heads=("other_proj",))[0], None
    with pytest.raises(ModelFileError) as caught:
        runtimes.load(folder)
    message = str(caught.value)
    assert "2 projection head chain(s)" in message
    assert "projection.weight [48, 32]" in message and "other_proj.weight [48, 32]" in message
    assert "--head NAME[,NAME]" in message and "head=" in message
    first = runtimes.load(folder, head="projection")
    second = runtimes.load(folder, head="other_proj.weight")
    assert [h.weight for h in second.source.head] == ["other_proj.weight"]
    assert np.abs(first.encode("text") - second.encode("text")).max() > 1e-3
    with pytest.raises(ModelFileError, match="head tensor.*'missing.weight'"):
        runtimes.load(folder, head="missing")
    assert not marker.exists()


def test_no_head_candidate_with_a_declared_vector_size_is_refused(release, tmp_path):
    folder = Path(shutil.copytree(release[0], tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vector_size": 64}))
    with pytest.raises(ModelFileError, match=r"head 32 -> 64, and no chain.*projection\.weight \[48, 32\]"):
        resolve_model(folder)


def test_pickled_weights_only_are_refused_and_never_opened(release, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(release[0] / "config.json", folder / "config.json")
    shutil.copy(release[0] / "tokenizer.json", folder / "tokenizer.json")
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with opened_files() as opened, pytest.raises(ModelFileError, match=r"pytorch_model\.bin holds pickled weights"):
        runtimes.load(folder)
    assert_never_opened(opened, folder)


def test_masked_lm_checkpoints_ignore_their_mlm_head(tmp_path, checkpoint):
    """A ModernBertForMaskedLM folder: backbone under model., an MLM head that is not a projection."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(checkpoint, tmp_path / "mlm"))
    state = load_file(str(folder / "model.safetensors"))
    state.pop("dewey_head.weight")
    state = {f"model.{k}": v for k, v in state.items()}
    state["head.dense.weight"] = torch.zeros(32, 32)
    state["decoder.weight"] = torch.zeros(1024, 32)
    state["decoder.bias"] = torch.zeros(1024)
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["ModernBertForMaskedLM"], vector_size=32)
    (folder / "config.json").write_text(json.dumps(config))
    source = resolve_model(folder)
    assert source.head == () and source.config.vector_size == 32 and source.backbone_prefix == "model."
    assert runtimes.load(folder).encode("text").shape == (32,)
