"""``dewey-train``: train, resume and evaluate Dewey students; report the built-in corpus.

Every hyperparameter lives in a config file (TOML, YAML or JSON; see ``recipes/dewey-mini.toml`` and
``dewey_train/config.py`` for each key); options given here override it. Run several processes with
``torchrun --nproc-per-node N -m dewey_train.cli train ...``.

Exit codes (runtimes.errors): 0 done, 1 failed, 2 bad usage or input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtimes.corpus import DEFAULT_HELDOUT_FRACTION
from runtimes.errors import cli_errors

from .config import parse_override, read_train_config


def _overrides(pairs, **named) -> dict:
    overrides = dict(parse_override(p) for p in pairs)
    overrides.update({k: v for k, v in named.items() if v is not None})
    return overrides


def _fail(message: str, code: int = 2):
    click.echo("error: " + " ".join(line.strip() for line in message.splitlines()), err=True)
    sys.exit(code)


@cli_errors
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Chunk-alignment distillation of Dewey long-context embedding students."""


_SET_HELP = "Override any config key: --set lr=5e-4 --set student.hidden_size=128 (value read as TOML). Repeatable."


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file (.toml, .yaml, .json).")
@click.option("--out", "out_dir", help="Output folder (config key out_dir).")
@click.option("--data", multiple=True, help="Training text: files, folders, *.jsonl or 'stdlib'. Repeatable.")
@click.option("--teacher", help="'minilm' (default, offline) or a sentence-transformers model folder.")
@click.option("--init-from", help="Start from this Dewey checkpoint instead of a new student.")
@click.option("--epochs", type=int, help="Epochs over the training pieces.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, help="Documents per micro-batch, per rank.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Recompute activations.")
@click.option("--seed", type=int, help="Seed of the data order, chunking and initialisation.")
@click.option("--set", "pairs", multiple=True, help=_SET_HELP)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (under torchrun: cuda).")
@click.option("--resume/--no-resume", default=False, help="Continue from the latest checkpoint in --out if there is one.")
def train(config_path, out_dir, data, teacher, init_from, epochs, max_steps, batch_size, grad_accum, lr, bf16,
          gradient_checkpointing, seed, pairs, device, resume):
    """Train a student; writes checkpoints, metrics.jsonl and final/ under the output folder."""
    from .trainer import latest_checkpoint, read_checkpoint_config

    try:
        overrides = _overrides(pairs, out_dir=out_dir, data=list(data) or None, teacher=teacher, init_from=init_from,
                               epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                               lr=lr, bf16=bf16, gradient_checkpointing=gradient_checkpointing, seed=seed)
        cfg = read_train_config(config_path, overrides)
        checkpoint = latest_checkpoint(cfg.out_dir) if resume else None
        if checkpoint is None and not resume and any(Path(cfg.out_dir, "checkpoints").glob("step-*")):
            _fail(f"{cfg.out_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
        if checkpoint is not None:
            cfg = read_checkpoint_config(checkpoint, _overrides((), max_steps=max_steps, epochs=epochs))
    except (ValueError, FileNotFoundError, ImportError) as exc:
        _fail(str(exc))
    click.echo(str(_run_training(cfg, checkpoint, device)))


def _run_training(cfg, checkpoint, device) -> Path:
    """Train; a missing or corrupt model, tokenizer or training-state file is bad input (exit 2)."""
    from runtimes.config import ModelFileError

    from .trainer import train as run_training

    try:
        return run_training(cfg, resume_from=checkpoint, device=device)
    except ModelFileError as exc:
        _fail(str(exc))


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--epochs", type=int, help="Raise the number of epochs.")
@click.option("--max-steps", type=int, help="Raise the step limit.")
@click.option("--device", default="cpu", show_default=True)
def resume(out_dir, epochs, max_steps, device):
    """Continue the run in OUT_DIR from its latest checkpoint, exactly (same config, data position, RNG).

    Everything is written into OUT_DIR, also when the run was copied or moved there from elsewhere."""
    from .trainer import latest_checkpoint, read_checkpoint_config

    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        _fail(f"{out_dir} has no checkpoint to resume from (looked in {Path(out_dir) / 'checkpoints'})")
    try:
        cfg = read_checkpoint_config(checkpoint, _overrides((), max_steps=max_steps, epochs=epochs))
    except ValueError as exc:
        _fail(str(exc))
    click.echo(str(_run_training(cfg, checkpoint, device)))


@main.command("eval")
@click.option("--model", "model_path", type=click.Path(file_okay=False, exists=True), help="Student model folder (default: the packaged dewey-mini).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Training config: its data, held-out fraction, teacher and chunking.")
@click.option("--data", multiple=True, help="Override the data sources (held-out part is evaluated).")
@click.option("--teacher", help="Teacher for targets and baselines (default from config: minilm).")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--queries", type=int, default=200, show_default=True, help="Retrieval queries.")
@click.option("--synthetic-docs", type=int, default=20, show_default=True, help="Candidates per length in passkey/needle.")
@click.option("--max-synthetic-length", type=int, default=32768, show_default=True, help="Longest synthetic document, tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "pairs", multiple=True, help=_SET_HELP)
def evaluate_command(model_path, config_path, data, teacher, out_json, queries, synthetic_docs, max_synthetic_length,
                     seed, pairs):
    """Teacher agreement, long-document retrieval and passkey/needle tasks on held-out data."""
    from .evaluation import evaluate, format_report

    try:
        cfg = read_train_config(config_path, _overrides(pairs, data=list(data) or None, teacher=teacher))
    except (ValueError, FileNotFoundError, ImportError) as exc:
        _fail(str(exc))
    if model_path is None:
        from runtimes import default_model_path

        model_path = default_model_path()
    results = evaluate(model_path, cfg, n_queries=queries, synthetic_docs=synthetic_docs,
                       max_synthetic_length=max_synthetic_length, seed=seed)
    click.echo(format_report(results))
    if out_json:
        from runtimes.files import atomic_path

        with atomic_path(out_json) as tmp:
            Path(tmp).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {out_json}")


@main.command()
@click.option("--data", multiple=True, default=("stdlib",), show_default=True, help="Sources to report.")
@click.option("--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION, show_default=True)
def corpus(data, heldout_fraction):
    """Size of a corpus (documents, characters, teacher-tokenizer tokens) and its train/held-out split."""
    from runtimes.corpus import corpus_stats, split_documents
    from runtimes.tokenization import read_tokenizer_file

    from .teacher import resolve_teacher_path

    tokenizer = read_tokenizer_file(resolve_teacher_path("minilm") / "tokenizer.json")

    def count(texts):
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    try:
        train_docs, heldout = split_documents(list(data), heldout_fraction)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    click.echo(json.dumps({"train": corpus_stats(train_docs, count), "heldout": corpus_stats(heldout, count)}, indent=2))


if __name__ == "__main__":
    main()
