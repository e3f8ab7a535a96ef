"""sentence-transformers folders: dewey's vectors against the sentence-transformers package's own.

Tiny random ModernBERT models (hidden 32, 3 layers: one global, two sliding with a 16-token window) are
built with the real sentence-transformers package and saved with ``SentenceTransformer.save``; dewey
loads the folder, exports it to ONNX and OpenVINO, and every backend must give what
``SentenceTransformer(folder).encode`` gives, to 1e-5 in fp32, on texts of 5 to 3,000 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers", reason="the dev extra (sentence-transformers) is not installed")
torch = pytest.importorskip("torch")

import runtimes  # noqa: E402
from runtimes.config import ModelFileError  # noqa: E402
from runtimes.model_source import resolve_model  # noqa: E402

# The bound: fp32 vectors equal to the library that made the model up to rounding.
ST_ATOL = 1e-5
HIDDEN = 32
# Token counts of the texts compared: short, around the 16-token window, padded, and 3,000 tokens.
TEXT_TOKENS = (5, 17, 300, 1200, 3000)
PROMPTS = {"query": "query: ", "document": "passage: "}

# name -> how the model is built: pooling, Dense layers ((out, activation, bias) each), Normalize,
# prompts, include_prompt, default prompt, Matryoshka dimensions.
CONFIGS = {
    "cls": dict(pooling="cls", dense=[], normalize=False),
    "cls-dense-identity-normalize": dict(pooling="cls", dense=[(24, "identity", True)], normalize=True),
    "cls-dense-tanh-prompts": dict(pooling="cls", dense=[(24, "tanh", True)], normalize=True, prompts=True),
    "mean-normalize-prompts-default": dict(pooling="mean", dense=[], normalize=True, prompts=True,
                                           default_prompt="query"),
    "mean-dense-identity-nobias": dict(pooling="mean", dense=[(24, "identity", False)], normalize=False),
    "mean-dense-tanh-exclude-prompt": dict(pooling="mean", dense=[(24, "tanh", True)], normalize=True, prompts=True,
                                           include_prompt=False),
    "mean-two-dense": dict(pooling="mean", dense=[(24, "tanh", True), (16, "identity", True)], normalize=True,
                           prompts=True),
    "matryoshka": dict(pooling="mean", dense=[], normalize=True, prompts=True, matryoshka=[32, 16, 8]),
    "lasttoken-dense-tanh": dict(pooling="lasttoken", dense=[(24, "tanh", True)], normalize=True, prompts=True),
}


@pytest.fixture(scope="session")
def st_tokenizer():
    """The test tokenizer with a [CLS] $A [SEP] post-processor, as transformers tokenizers of BERT-style
    models carry (sentence-transformers tokenizes with special tokens)."""
    from tokenizers.processors import TemplateProcessing

    from runtimes.testing import SPECIAL_TOKENS, build_test_tokenizer

    tokenizer = build_test_tokenizer()
    cls, sep = SPECIAL_TOKENS.index("[CLS]"), SPECIAL_TOKENS.index("[SEP]")
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def make_modernbert_folder(folder: Path, tokenizer, seed: int = 0, max_length: int = 8192) -> Path:
    """A plain transformers ModernBERT folder (ModernBertModel, tokenizer), random weights from ``seed``."""
    from transformers import ModernBertConfig, ModernBertModel

    from runtimes.testing import test_config

    raw = test_config(tokenizer.get_vocab_size(with_added_tokens=True), hidden_size=HIDDEN, vector_size=HIDDEN)
    for key in ("vector_size", "single_vector_type", "prompts", "instruction_tokens"):
        raw.pop(key)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ModernBertModel(ModernBertConfig(**raw)).eval().save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
               "mask_token": "[MASK]", "model_max_length": max_length}
    (folder / "tokenizer_config.json").write_text(json.dumps(special), encoding="utf-8")
    return folder


def make_st_model(folder: Path, base: Path, pooling: str, dense, normalize: bool, prompts: bool = False,
                  include_prompt: bool = True, default_prompt: str | None = None, matryoshka=None,
                  seed: int = 1) -> Path:
    """A sentence-transformers model over the ModernBERT folder ``base``, saved to ``folder``."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    modules = [Transformer(str(base), max_seq_length=4096),
               Pooling(HIDDEN, pooling_mode=pooling, include_prompt=include_prompt)]
    torch.manual_seed(seed)
    width = HIDDEN
    for out, activation, bias in dense:
        function = torch.nn.Tanh() if activation == "tanh" else torch.nn.Identity()
        modules.append(Dense(width, out, bias=bias, activation_function=function))
        width = out
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, prompts=dict(PROMPTS) if prompts else None,
                                default_prompt_name=default_prompt, device="cpu")
    model.save(str(folder))
    if matryoshka:
        # Where sentence-transformers' model card records a MatryoshkaLoss's dimensions.
        card = folder / "README.md"
        loss = {"loss": "MultipleNegativesRankingLoss", "matryoshka_dims": matryoshka,
                "matryoshka_weights": [1] * len(matryoshka), "n_dims_per_step": -1}
        card.write_text(card.read_text(encoding="utf-8") + "\n#### MatryoshkaLoss\n```json\n"
                        + json.dumps(loss, indent=4) + "\n```\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, st_tokenizer):
    return make_modernbert_folder(tmp_path_factory.mktemp("modernbert"), st_tokenizer)


@pytest.fixture(scope="session")
def st_models(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("st-models")
    return {name: make_st_model(root / name, base_model, **spec) for name, spec in CONFIGS.items()}


@pytest.fixture(scope="session")
def texts(st_tokenizer, long_text):
    """One text per length of TEXT_TOKENS (in tokens of the test tokenizer), cut from real text."""
    offsets = st_tokenizer.encode(long_text * 3, add_special_tokens=False).offsets
    out = [(long_text * 3)[: offsets[n - 1][1]] for n in TEXT_TOKENS]
    counts = [len(st_tokenizer.encode(t, add_special_tokens=False).ids) for t in out]
    assert min(counts) >= 5 and max(counts) >= 2900, counts
    return out


def st_reference(folder: Path, texts, **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=8, **kwargs)


def _calls(spec: dict) -> list[tuple[dict, dict]]:
    """(sentence-transformers kwargs, dewey kwargs) pairs to compare for a model."""
    calls = [({}, {})]
    if spec.get("prompts"):
        calls.append(({"prompt_name": "query"}, {"prompt_name": "query"}))
        calls.append(({"prompt_name": "document"}, {"prompt_name": "document"}))
    for dims in spec.get("matryoshka", [])[1:]:
        calls.append(({"truncate_dim": dims, "normalize_embeddings": True, "prompt_name": "query"},
                      {"dimensions": dims, "prompt_name": "query"}))
    return calls


def worst_difference(encoder, folder: Path, spec: dict, texts) -> float:
    worst = 0.0
    for st_kwargs, dewey_kwargs in _calls(spec):
        expected = st_reference(folder, texts, **st_kwargs)
        got = encoder.encode(texts, batch_size=4, **dewey_kwargs)
        assert got.shape == expected.shape, (st_kwargs, got.shape, expected.shape)
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_matches_sentence_transformers(st_models, texts, name):
    encoder = runtimes.load(st_models[name], backend="torch")
    diff = worst_difference(encoder, st_models[name], CONFIGS[name], texts)
    print(f"[st-parity] torch {name}: max abs diff {diff:.3g}")
    assert diff <= ST_ATOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_and_openvino_exports_match_sentence_transformers(st_models, texts, name, tmp_path):
    """The folder exported with the Python export functions (as dewey-export runs them), each graph
    compared with sentence-transformers; the export's own verification against PyTorch passes too."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export
    from dewey_export.openvino_export import OpenVINOTarget

    quiet = dict(log=lambda message: None)
    exports = {
        "onnx": export(st_models[name], tmp_path / "onnx", OnnxTarget(), **quiet),
        "openvino": export(st_models[name], tmp_path / "openvino", OpenVINOTarget(precision="fp32"), **quiet),
    }
    for backend, result in exports.items():
        assert result.passed, result.parity
        encoder = runtimes.load(result.folder, backend=backend)
        diff = worst_difference(encoder, st_models[name], CONFIGS[name], texts)
        print(f"[st-parity] {backend} {name}: max abs diff {diff:.3g}")
        assert diff <= ST_ATOL, (backend, diff)
    model = exports["onnx"].manifest.source["model"]
    assert model["layout"] == "sentence_transformers"
    assert [layer["shape"][0] for layer in model["head"]] == [out for out, _, _ in CONFIGS[name]["dense"]]


def test_description_of_a_sentence_transformers_folder(st_models):
    spec = resolve_model(st_models["mean-two-dense"])
    assert spec.layout == "sentence_transformers"
    assert [(layer.weight, layer.bias, layer.activation) for layer in spec.head] == [
        ("linear.weight", "linear.bias", "tanh"), ("linear.weight", "linear.bias", "identity")]
    assert [layer.file.parent.name for layer in spec.head] == ["2_Dense", "3_Dense"]
    config = spec.config
    assert (config.vector_size, config.single_vector_type, config.mean_tokens) == (16, "mean", "attended")
    assert config.prompts == PROMPTS and config.prompt_style == "prefix" and config.max_seq_length == 4096
    assert config.normalize_embeddings is True
    assert resolve_model(st_models["cls"]).config.normalize_embeddings is False
    assert resolve_model(st_models["mean-dense-tanh-exclude-prompt"]).config.mean_tokens == "after_prompt"
    assert resolve_model(st_models["matryoshka"]).config.matryoshka_dimensions == (32, 16, 8)
    last = resolve_model(st_models["lasttoken-dense-tanh"]).config
    assert (last.single_vector_type, last.mean_tokens) == ("mean", "last")
    assert "head=linear.weight+bias[32->24, tanh], linear.weight+bias[24->16]" in repr(runtimes.load(
        st_models["mean-two-dense"]))


def test_matryoshka_dimensions_are_checked(st_models, texts):
    encoder = runtimes.load(st_models["matryoshka"])
    full = encoder.encode(texts[:2])
    assert encoder.encode(texts[:2], dimensions=32).shape == full.shape
    short = encoder.encode(texts[:2], dimensions=8)
    assert short.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="dimensions=12 is not one this model was trained for"):
        encoder.encode(texts[:2], dimensions=12)
    with pytest.raises(ValueError, match="declares no Matryoshka dimensions"):
        runtimes.load(st_models["cls"]).encode(texts[:1], dimensions=16)


def test_max_seq_length_truncates_as_sentence_transformers_does(st_models, texts, base_model, tmp_path):
    """A model whose max_seq_length (tokenizer_config.json, as sentence-transformers 6 keeps it) is 64
    cuts a 300-token text, with a prompt, exactly where sentence-transformers cuts it."""
    folder = tmp_path / "short"
    make_st_model(folder, base_model, pooling="mean", dense=[], normalize=True, prompts=True)
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_max_length": 64}))
    encoder = runtimes.load(folder)
    assert encoder.config.max_seq_length == 64
    with pytest.warns(runtimes.TruncationWarning):
        got = encoder.encode(texts[:3], prompt_name="query")
    expected = st_reference(folder, texts[:3], prompt_name="query")
    assert np.abs(got - expected).max() <= ST_ATOL


def test_late_chunking_on_a_sentence_transformers_model(st_models, texts):
    """Chunks are means of their own tokens through the Dense chain; the document's vector from the same
    pass is encode's (sentence-transformers' pooling)."""
    encoder = runtimes.load(st_models["mean-dense-tanh-exclude-prompt"])
    doc = encoder.encode_chunks(texts[2], chunk_size=64, chunk_overlap=16, prompt_name="query")
    assert len(doc.vectors) > 3 and doc.vectors.shape[1] == 24
    np.testing.assert_allclose(doc.vector, encoder.encode(texts[2], prompt_name="query"), atol=ST_ATOL)
    assert doc.texts[1] == texts[2][doc.char_spans[1][0]:doc.char_spans[1][1]]
    head = encoder.backend.model.head
    hidden_chunk = encoder.encode_chunks(texts[2], chunk_size=64, chunk_overlap=16, prompt_name="query",
                                         normalize=False)
    assert np.all(np.abs(hidden_chunk.vectors) <= 1.0), "tanh output"
    assert head is not None


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("pooling, reason", [
    ("max", "element-wise maximum"), ("weightedmean", "position-weighted"),
    ("mean_sqrt_len_tokens", "square root of the length"), (["cls", "mean"], "concatenates"),
])
def test_pooling_that_does_not_map_onto_one_pass_is_refused(st_models, tmp_path, pooling, reason):
    import shutil

    folder = Path(shutil.copytree(st_models["cls"], tmp_path / "m"))
    _edit_json(folder / "1_Pooling" / "config.json", pooling_mode=pooling)
    with pytest.raises(ModelFileError, match=reason):
        runtimes.load(folder)


def test_unsupported_modules_and_settings_are_refused(st_models, tmp_path):
    import shutil

    folder = Path(shutil.copytree(st_models["cls-dense-tanh-prompts"], tmp_path / "m"))
    _edit_json(folder / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.ReLU")
    with pytest.raises(ModelFileError, match=r"2_Dense/config\.json: activation .*ReLU"):
        runtimes.load(folder)

    folder = Path(shutil.copytree(st_models["cls"], tmp_path / "m2"))
    _edit_json(folder / "1_Pooling" / "config.json", include_prompt=False)
    with pytest.raises(ModelFileError, match="cls pooling with include_prompt false"):
        runtimes.load(folder)

    folder = Path(shutil.copytree(st_models["cls"], tmp_path / "m3"))
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "custom_code.MyPooling"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelFileError, match=r"module 1 is 'custom_code\.MyPooling'.*never run"):
        runtimes.load(folder)


def test_pickled_dense_weights_are_refused_by_name(st_models, tmp_path):
    import shutil

    folder = Path(shutil.copytree(st_models["cls-dense-tanh-prompts"], tmp_path / "m"))
    (folder / "2_Dense" / "model.safetensors").rename(folder / "2_Dense" / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match=r"2_Dense/pytorch_model\.bin holds pickled weights.*safetensors"):
        runtimes.load(folder)
