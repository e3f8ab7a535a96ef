"""The training loop: chunk-alignment distillation of a Dewey student, in one readable function.

Run it in one process, or in several with ``torchrun`` (DistributedDataParallel: gloo on CPU, NCCL on
GPU; each rank trains on its own shard of every epoch). Everything that makes a run is saved in its
checkpoints: the model folder (loadable by ``runtimes.load`` and exportable by ``dewey-export``), the
optimizer, scheduler, step, data position and RNG states, and the resolved config, so a resumed run
continues exactly where the saved one stopped.

Layout of ``out_dir``::

    init/                   the new student, before training (when not started from a checkpoint)
    checkpoints/step-0000200/   model files + training_state.safetensors + training_state.json
                            + train_config.json (the last keep_last)
    final/                  the trained model folder
    metrics.jsonl           one line per log interval: loss terms, lr, grad norm, tokens/s
    teacher_cache.sqlite    teacher vectors (unless teacher_cache says elsewhere)

Training folders are copied between machines and people, so nothing read from one is unpickled: the
training state is tensors in safetensors plus everything else in JSON. Checkpoints and final/ are
written in a staging folder and renamed into place; a run that starts removes what a killed one left.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from runtimes.config import ModelFileError, load_config
from runtimes.files import atomic_path, clean_leftovers, discard_folder, staged_folder
from runtimes.modeling import DeweyModel
from runtimes.tokenization import TOKENIZER_FILE, DeweyTokenizer

from .config import TrainConfig, config_from_dict
from runtimes.corpus import split_documents
from .losses import distillation_loss
from .samples import Sample, SampleBuilder, attach_targets, make_batch, split_into_pieces
from .student import build_student
from .teacher import Teacher

CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
STATE_TENSORS = "training_state.safetensors"  # every tensor of the training state
STATE_JSON = "training_state.json"  # the rest, with references to those tensors by name
LEGACY_STATE = "training_state.pt"  # a pickle, written by older versions: refused, never loaded
STATE_PARTS = ("progress", "optimizer", "scheduler", "projection", "rng")
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
FINAL = "final"
SUMMARY_FILE = "training_summary.json"  # in final/: steps, tokens, time, teacher
# Copied from the folder training starts from into every model folder it writes; tokenizer.json required.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json")
# How the training state's JSON marks what JSON cannot hold: a tensor (by its name in the safetensors
# file), a tuple, and a dict with keys that are not all strings (the optimizer's per-parameter states).
TENSOR_KEY, TUPLE_KEY, DICT_KEY = "__tensor__", "__tuple__", "__dict__"
# Micro-batches are drawn from pools this many batches wide, sorted by length inside the pool, so rows
# of similar length share a batch (less padding) while the order stays random across pools.
SORT_POOL_BATCHES = 16


class Student(nn.Module):
    """The Dewey model plus, when the teacher's width differs, a projection into the teacher's space
    (used in training only, unless ``export_projection``)."""

    def __init__(self, model: DeweyModel, teacher_dim: int):
        super().__init__()
        self.model = model
        self.projection = None
        if model.vector_size != teacher_dim:
            self.projection = nn.Linear(model.vector_size, teacher_dim, bias=False)

    def forward(self, input_ids, attention_mask, span_bounds):
        cls, spans = self.model(input_ids, attention_mask, span_bounds)
        if self.projection is not None:
            cls, spans = self.projection(cls), self.projection(spans)
        return cls, spans


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # next micro-batch of this epoch, on every rank
    tokens: int = 0  # non-padding tokens seen, all ranks
    seconds: float = 0.0  # training time so far, all sessions


# -- distributed ----------------------------------------------------------------------------------


def setup_process(cfg: TrainConfig, device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device). Under torchrun (WORLD_SIZE > 1) the process group is
    started here and each rank takes its own GPU; on CPU the ranks share the cores."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    if device == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(value: float) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


# -- data order -----------------------------------------------------------------------------------


def epoch_batches(examples: list[Sample], cfg: TrainConfig, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches (indices into ``examples``): a seeded permutation, an equal shard per
    rank, length-sorted inside pools; every rank gets the same number of batches, whole optimizer steps."""
    lengths = [len(e.row) for e in examples]
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(lengths))
    per_rank = len(order) // world
    shard = order[rank * per_rank:(rank + 1) * per_rank]
    n_batches = len(shard) // cfg.batch_size
    pool = cfg.batch_size * SORT_POOL_BATCHES
    batches = []
    for start in range(0, n_batches * cfg.batch_size, pool):
        part = shard[start:min(start + pool, n_batches * cfg.batch_size)]
        part = sorted(part.tolist(), key=lambda i: -lengths[i])
        batches.extend(part[i:i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size))
    order = rng.permutation(len(batches))  # pools sorted long-to-short; mix the batches again
    return [batches[i] for i in order[:len(order) // cfg.grad_accum * cfg.grad_accum]]


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# -- checkpoints ----------------------------------------------------------------------------------


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first. Every ``step-N`` folder is a complete one: a checkpoint is
    renamed into place only once written, and renamed away before it is deleted."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name)[1]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(Path(out_dir))
    return found[-1] if found else None


def read_tokenizer_files(source: Path) -> dict[str, bytes]:
    """The tokenizer files of the folder training starts from, read once: that folder may be a
    checkpoint that ``keep_last`` deletes while the run still writes checkpoints that need them."""
    if not (source / TOKENIZER_FILE).is_file():
        raise ModelFileError(f"{source / TOKENIZER_FILE} is missing: training needs the tokenizer of the folder "
                             "it starts from")
    return {name: (source / name).read_bytes() for name in TOKENIZER_FILES if (source / name).is_file()}


def save_model_folder(student: Student, tokenizer_files: dict[str, bytes], folder: Path,
                      export_projection: bool = False) -> None:
    """The model folder: config.json + model.safetensors (+ projection folded in) + tokenizer files."""
    model = student.model
    if export_projection and student.projection is not None:
        model = fold_projection(student)
    model.save_pretrained(folder)
    for name, data in tokenizer_files.items():
        (folder / name).write_bytes(data)


def fold_projection(student: Student) -> DeweyModel:
    """A copy of the model whose head is ``projection @ head``: the teacher-space vectors, exported."""
    import copy

    model = copy.deepcopy(student.model)
    weight = student.projection.weight.detach()
    if model.head is not None:
        weight = weight @ model.head.weight.detach()
    model.head = nn.Linear(model.config.hidden_size, weight.shape[0], bias=False)
    model.head.weight.data.copy_(weight)
    model.config.vector_size = weight.shape[0]
    return model


def _state_to_json(value, name: str, tensors: dict[str, torch.Tensor]):
    """``value`` (nested dicts, lists, tuples, tensors, Python scalars) as JSON; each tensor goes into
    ``tensors`` under ``name``, its path in ``value``, and the JSON keeps a reference to it."""
    def child(key) -> str:
        return f"{name}.{key}" if name else str(key)

    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"training state: two tensors named {name!r}")
        tensors[name] = value.detach().cpu().contiguous()
        return {TENSOR_KEY: name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_state_to_json(item, child(i), tensors) for i, item in enumerate(value)]
        return {TUPLE_KEY: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) for key in value):
            raise TypeError(f"training state: keys of {name or 'the state'} must be str or int")
        if all(isinstance(key, str) for key in value) and not {TENSOR_KEY, TUPLE_KEY, DICT_KEY} & value.keys():
            return {key: _state_to_json(item, child(key), tensors) for key, item in value.items()}
        return {DICT_KEY: [[key, _state_to_json(item, child(key), tensors)] for key, item in value.items()]}
    raise TypeError(f"training state: cannot store a {type(value).__name__} ({name})")


def _state_from_json(value, tensors: dict[str, torch.Tensor]):
    """The inverse of ``_state_to_json``."""
    if isinstance(value, list):
        return [_state_from_json(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {TENSOR_KEY}:
        return tensors[value[TENSOR_KEY]]
    if value.keys() == {TUPLE_KEY}:
        return tuple(_state_from_json(item, tensors) for item in value[TUPLE_KEY])
    if value.keys() == {DICT_KEY}:
        return {key: _state_from_json(item, tensors) for key, item in value[DICT_KEY]}
    return {key: _state_from_json(item, tensors) for key, item in value.items()}


def write_training_state(folder: Path, state: dict) -> None:
    """``state`` as ``training_state.safetensors`` (its tensors) + ``training_state.json`` (the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _state_to_json(state, "", tensors)
    with atomic_path(folder / STATE_TENSORS) as tmp:
        save_file(tensors, tmp)
    with atomic_path(folder / STATE_JSON) as tmp:
        Path(tmp).write_text(json.dumps(tree) + "\n", encoding="utf-8")


def read_training_state(folder: Path) -> dict:
    """The state ``write_training_state`` wrote into ``folder``; ModelFileError, naming the file, when
    it is missing or unreadable. An old pickled ``training_state.pt`` is refused unread."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / STATE_JSON).exists() and (folder / LEGACY_STATE).exists():
        raise ModelFileError(
            f"{folder / LEGACY_STATE} is a pickle (the training state of an older dewey-train) and is not loaded: "
            f"unpickling a file can run any code; start a new run from its model with --init-from {folder}")
    for name in (STATE_TENSORS, STATE_JSON):
        if not (folder / name).is_file():
            raise ModelFileError(f"{folder / name} is missing: {folder} is not a complete checkpoint")
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except SafetensorError as exc:
        raise ModelFileError(f"{folder / STATE_TENSORS} is not a readable safetensors file: {exc}") from exc
    try:
        state = _state_from_json(json.loads((folder / STATE_JSON).read_text(encoding="utf-8")), tensors)
    except (ValueError, KeyError, TypeError) as exc:  # bad JSON, a tensor it names is absent, a bad structure
        raise ModelFileError(f"{folder / STATE_JSON} is not a readable training state: {exc!r}") from exc
    if not isinstance(state, dict) or set(STATE_PARTS) - state.keys():
        raise ModelFileError(f"{folder / STATE_JSON} is not a readable training state: it needs {STATE_PARTS}")
    return state


def _numpy_rng_state() -> tuple:
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return kind, keys.tolist(), position, has_gauss, cached_gaussian


def restore_training_state(state: dict, student: Student, optimizer, scheduler, folder: Path, log) -> Progress:
    """Put a ``read_training_state`` result (of the checkpoint ``folder``) back into the run; returns its
    progress."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if student.projection is not None:
            student.projection.load_state_dict(state["projection"])
        progress = Progress(**state["progress"])
        torch.set_rng_state(state["rng"]["torch"])
        kind, keys, *rest = state["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        random.setstate(state["rng"]["python"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # what the loaders raise for a misfit
        raise ModelFileError(f"{folder / STATE_JSON} does not fit this run: {exc!r}") from exc
    log(f"resumed from {folder}: step {progress.step}, epoch {progress.epoch}, batch {progress.batch}")
    return progress


def save_checkpoint(out_dir: Path, student: Student, tokenizer_files: dict[str, bytes], optimizer, scheduler,
                    progress: Progress, cfg: TrainConfig, rank: int) -> None:
    """Write ``checkpoints/step-N`` in a temporary folder, then rename it into place; prune old ones.
    Every rank calls it: rank 0 writes, the others wait until it is done."""
    if rank == 0:
        root = out_dir / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        with staged_folder(root / f"step-{progress.step:07d}") as tmp:
            save_model_folder(student, tokenizer_files, tmp)
            write_training_state(tmp, {
                "progress": progress.__dict__.copy(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "projection": None if student.projection is None else student.projection.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()},
            })
            (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        for old in checkpoint_dirs(out_dir)[:-cfg.keep_last]:
            discard_folder(old)
    barrier()


def _inside(path: str, folder: str) -> str | None:
    """``path`` relative to ``folder`` when it lies inside it (both as written in one config)."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    return None if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def read_checkpoint_config(checkpoint: Path, overrides: dict | None = None) -> TrainConfig:
    """The config saved with ``checkpoint``, pointed at the run folder that holds the checkpoint now.

    A run folder may have been copied or moved since the config was written: resuming it must write
    into it (checkpoints, final/, metrics and a teacher cache kept inside it), never into the folder
    named in the saved ``out_dir``. Other paths (data, teacher, a cache elsewhere) are inputs, kept.
    """
    checkpoint = Path(checkpoint)
    path = checkpoint / TRAIN_CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: {checkpoint} is not a complete checkpoint")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("it must hold a table of settings")
        run = checkpoint.parent.parent  # <run>/checkpoints/step-N
        cache = raw.get("teacher_cache")
        inside = _inside(cache, raw["out_dir"]) if cache else None
        if inside is not None:
            raw["teacher_cache"] = str(run / inside)
        raw["out_dir"] = str(run)
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return config_from_dict(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path} is not a readable training config: {exc}") from exc


def keep_metrics_until(path: Path, step: int, log) -> None:
    """Drop the records of steps after ``step`` (a resumed run logs them again) and any line a kill cut
    short, so each step appears once."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    if "".join(kept) != text:
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(kept), encoding="utf-8")
        log(f"{path}: kept the {len(kept)} record(s) up to step {step}, dropped "
            f"{len(text.splitlines()) - len(kept)} line(s) after it or cut short")


# -- a run ----------------------------------------------------------------------------------------


def prepare_run_folder(out_dir: Path, rank: int, log) -> None:
    """Create ``out_dir`` and remove what a killed run was writing there: staging folders as large as a
    checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        clean_leftovers(out_dir / CHECKPOINTS, log=log)
        for name in (FINAL, METRICS_FILE):
            clean_leftovers(out_dir, name, log=log)
    barrier()


def load_student(cfg: TrainConfig, resume_from: Path | None, teacher: Teacher, device: str, rank: int,
                 log) -> tuple[Student, DeweyTokenizer, dict[str, bytes]]:
    """The student to train, its tokenizer and tokenizer files, from the folder training starts from:
    the checkpoint resumed, ``init_from``, or a new student written to ``out_dir/init``."""
    if resume_from is not None:
        source = Path(resume_from)
    elif cfg.init_from:
        source = Path(cfg.init_from)
    else:
        source = Path(cfg.out_dir) / "init"
        if rank == 0:
            build_student(cfg.student, teacher.path, source, seed=cfg.seed)
            log(f"new student written to {source}")
        barrier()
    tokenizer_files = read_tokenizer_files(source)
    torch.manual_seed(cfg.seed)
    model = DeweyModel.from_pretrained(source, attention=cfg.attention, device=device).train()
    if cfg.gradient_checkpointing:
        model.backbone.activation_checkpointing_enable({"use_reentrant": False})
    student = Student(model, teacher.dim).to(device)
    return student, DeweyTokenizer.from_folder(source, load_config(source)), tokenizer_files


def prepare_examples(cfg: TrainConfig, tokenizer: DeweyTokenizer, teacher: Teacher, variants: int, rank: int,
                     world: int, log) -> list[list[Sample]]:
    """Examples of every chunking variant with teacher targets. Ranks split the teacher's work (each
    embeds its share into the shared cache), then every rank reads all targets from the cache."""
    train_docs, heldout = split_documents(cfg.data, cfg.heldout_fraction)
    builder = SampleBuilder(tokenizer, cfg, teacher.max_tokens)
    pieces = split_into_pieces(train_docs, tokenizer, builder.budget, cfg.min_text_tokens)
    if not pieces:
        raise ValueError(f"no training text: {len(train_docs)} documents, none with {cfg.min_text_tokens}+ tokens")
    log(f"data: {len(train_docs)} training documents -> {len(pieces)} pieces of <= {builder.budget} tokens, "
        f"{len(heldout)} held out; chunk sizes {cfg.chunk_size_min}..{builder.max_chunk} tokens")
    per_variant = [builder.build(pieces, variant=v) for v in range(variants)]
    mine = [ex for v in per_variant for ex in v][rank::world]
    started = time.time()
    attach_targets(mine, teacher, cfg.whole_text_target, show_progress=(rank == 0))
    barrier()
    log(f"teacher targets: {sum(len(ex.chunk_texts) for v in per_variant for ex in v)} chunks, "
        f"{teacher.forward_texts} texts embedded by this rank, {time.time() - started:.0f} s")
    if world > 1:  # the other ranks' shares, from the cache
        for examples in per_variant:
            attach_targets(examples, teacher, cfg.whole_text_target)
    return per_variant


def count_steps(examples: list[Sample], cfg: TrainConfig, rank: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the run) on ``examples``."""
    steps_per_epoch = len(epoch_batches(examples, cfg, 0, rank, world)) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"too little data for one optimizer step: {len(examples)} examples, {world} rank(s), "
                         f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum}")
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch


def make_optimizer(student: Student, cfg: TrainConfig, total_steps: int):
    """(optimizer, scheduler): the configured AdamW over the trainable parameters, its learning rate
    warmed up and decayed by ``lr_multiplier``."""
    params = [p for p in student.parameters() if p.requires_grad]
    if cfg.optimizer == "stable_adamw":
        from optimi import StableAdamW as optimizer_class
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, total_steps))
    return optimizer, scheduler


class MetricsLog:
    """The window of micro-batches since the last record: their loss terms and tokens. Every
    ``log_every`` steps and at the last step, the window's mean terms, the step's lr and grad norm and
    the tokens/s since the last record become one line of ``metrics.jsonl`` and the window starts
    again. Rank 0 writes (and shows the progress bar); every rank sums its tokens into the record."""

    TERMS = ("loss", "cos_cls", "sim_cls", "cos_chunks", "sim_chunks")

    def __init__(self, path: Path, progress: Progress, total_steps: int, log_every: int, rank: int,
                 show_progress: bool, log):
        self.path, self.total_steps, self.log_every, self.rank = path, total_steps, log_every, rank
        self.bar = None
        if rank == 0:
            keep_metrics_until(path, progress.step, log)
            if show_progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=progress.step, unit="step", desc="train")
        self.start_window()

    def start_window(self) -> None:
        self.sums = dict.fromkeys(self.TERMS, 0.0)
        self.micro_batches, self.tokens, self.started = 0, 0, time.time()

    def add(self, loss: float, terms: dict[str, float], tokens: int) -> None:
        """One micro-batch: its loss, its loss terms and its non-padding tokens."""
        self.sums["loss"] += loss
        for key, value in terms.items():
            self.sums[key] += value
        self.micro_batches += 1
        self.tokens += tokens

    def step_done(self, progress: Progress, lr: float, grad_norm: float) -> None:
        """After optimizer step ``progress.step``; a record also counts its window's tokens in ``progress``."""
        if self.bar is not None:
            self.bar.update(1)
        if progress.step % self.log_every and progress.step != self.total_steps:
            return
        tokens = all_sum(self.tokens)
        elapsed = time.time() - self.started
        progress.tokens += int(tokens)
        record = {"step": progress.step, "epoch": progress.epoch, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "tokens": progress.tokens,
                  "elapsed_s": round(progress.seconds, 1)}
        record.update({key: value / self.micro_batches for key, value in self.sums.items()})
        if self.rank == 0:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.start_window()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_final(folder: Path, student: Student, tokenizer_files: dict[str, bytes], progress: Progress,
                teacher: Teacher, export_projection: bool, rank: int) -> None:
    """``final/``: the trained model folder and ``training_summary.json``, written in a staging folder.
    Every rank calls it: rank 0 writes, the others wait until it is done."""
    if rank == 0:
        with staged_folder(folder) as tmp:
            save_model_folder(student, tokenizer_files, tmp, export_projection)
            (tmp / SUMMARY_FILE).write_text(json.dumps({
                "steps": progress.step, "epochs_started": progress.epoch, "tokens": progress.tokens,
                "train_seconds": round(progress.seconds, 1),
                "tokens_per_s": round(progress.tokens / max(progress.seconds, 1e-9), 1),
                "teacher": teacher.name, "teacher_id": teacher.id,
            }, indent=2) + "\n", encoding="utf-8")
    barrier()


def train(cfg: TrainConfig, resume_from: Path | None = None, device: str = "cpu", log=None,
          show_progress: bool = True, state_out: dict | None = None) -> Path:
    """Train (or resume from the checkpoint ``resume_from``); returns the final model folder.

    ``state_out``, if given, receives the trained ``student`` and ``progress`` (tests, notebooks).
    """
    rank, world, device = setup_process(cfg, device)
    say = (log or (lambda message: print(message, flush=True))) if rank == 0 else (lambda message: None)
    out_dir = Path(cfg.out_dir)
    # Read first: a bad checkpoint fails in a moment, not after the teacher's work.
    saved = read_training_state(resume_from) if resume_from is not None else None
    prepare_run_folder(out_dir, rank, say)
    teacher = Teacher(cfg.teacher, cfg.resolved_teacher_cache(), device=device, batch_size=cfg.teacher_batch_size)
    student, tokenizer, tokenizer_files = load_student(cfg, resume_from, teacher, device, rank, say)
    per_variant = prepare_examples(cfg, tokenizer, teacher, cfg.chunk_variants, rank, world, say)
    steps_per_epoch, total_steps = count_steps(per_variant[0], cfg, rank, world)
    optimizer, scheduler = make_optimizer(student, cfg, total_steps)
    progress = Progress()
    if saved is not None:
        progress = restore_training_state(saved, student, optimizer, scheduler, Path(resume_from), say)
    trained = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    metrics = MetricsLog(out_dir / METRICS_FILE, progress, total_steps, cfg.log_every, rank, show_progress, say)
    say(f"training: {total_steps} steps ({steps_per_epoch} per epoch), {world} rank(s), "
        f"batch {cfg.batch_size} x accum {cfg.grad_accum} x ranks {world}")
    started = time.time() - progress.seconds
    last_saved = progress.step if resume_from is not None else -1
    # With max_steps the epochs go on (cycling the data) until that step; otherwise `epochs` ends it.
    while progress.step < total_steps and (cfg.max_steps or progress.epoch < cfg.epochs):
        examples = per_variant[progress.epoch % len(per_variant)]
        batches = epoch_batches(examples, cfg, progress.epoch, rank, world)
        while progress.batch < len(batches) and progress.step < total_steps:
            batch = [examples[i] for i in batches[progress.batch]]
            ids, mask, bounds, valid, cls_t, chunk_t, n_tokens = make_batch(batch, tokenizer.config.pad_token_id, device)
            last_micro = (progress.batch + 1) % cfg.grad_accum == 0
            with trained.no_sync() if (world > 1 and not last_micro) else nullcontext():
                with autocast:
                    cls, spans = trained(ids, mask, bounds)
                loss, terms = distillation_loss(cls.float(), cls_t, spans.float()[valid], chunk_t,
                                                cfg.cosine_weight, cfg.similarity_weight)
                (loss / cfg.grad_accum).backward()
            progress.batch += 1
            metrics.add(float(loss.detach()), terms, n_tokens)
            if not last_micro:
                continue
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.step += 1
            progress.seconds = time.time() - started
            metrics.step_done(progress, lr, grad_norm)
            if progress.step % cfg.save_every == 0:
                save_checkpoint(out_dir, student, tokenizer_files, optimizer, scheduler, progress, cfg, rank)
                last_saved = progress.step
        if progress.batch >= len(batches):
            progress.epoch, progress.batch = progress.epoch + 1, 0
    metrics.close()
    if last_saved != progress.step:
        save_checkpoint(out_dir, student, tokenizer_files, optimizer, scheduler, progress, cfg, rank)
    write_final(out_dir / FINAL, student, tokenizer_files, progress, teacher, cfg.export_projection, rank)
    say(f"done: {progress.step} steps, {progress.tokens} tokens in {progress.seconds:.0f} s -> {out_dir / FINAL}")
    if state_out is not None:
        state_out.update(student=student, progress=progress)
    return out_dir / FINAL


def batch_loss(student: Student, examples: list[Sample], cfg: TrainConfig, pad_token_id: int) -> float:
    """The loss of a fixed batch, without gradients (tests and diagnostics)."""
    ids, mask, bounds, valid, cls_t, chunk_t, _ = make_batch(examples, pad_token_id, "cpu")
    with torch.no_grad():
        cls, spans = student(ids, mask, bounds)
        loss, _ = distillation_loss(cls, cls_t, spans[valid], chunk_t, cfg.cosine_weight, cfg.similarity_weight)
    return float(loss)
