"""Markdown reports: tables of the retrieval and synthetic results, and the full evaluation report."""

from __future__ import annotations


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _with_notes(table: str, notes: list[str]) -> str:
    return table + "".join(["\n\nNotes:"] + [f"\n- {note}" for note in notes] if notes else [])


def _retrieval_report(result: dict) -> str:
    t = result["document_tokens"]
    lines = [
        f"### Long-document retrieval: {result['n_queries']} queries, {result['n_documents']} documents "
        f"(student tokens min/median/max {t['min']}/{t['median']:g}/{t['max']}; "
        f"chunks {result['chunk_size']}/{result['chunk_overlap']}; teacher {result['teacher']})",
        "",
    ]
    metrics = ["ndcg@10", "recall@1"]
    bands = result.get("by_min_tokens", {})
    header = ["method"] + [f"{m} (all)" for m in metrics]
    for band, values in bands.items():
        header += [f"{m} (>{band} tok, {values['n_queries']} q)" for m in metrics]
    rows = []
    for method, values in result["methods"].items():
        row = [method] + [f"{values[m]:.3f}" for m in metrics]
        for band_values in bands.values():
            row += [f"{band_values[method][m]:.3f}" for m in metrics]
        rows.append(row)
    lines.append(_markdown_table(header, rows))
    return _with_notes("\n".join(lines), result["notes"])


def _synthetic_report(result: dict) -> str:
    lines = []
    for name, task in result["tasks"].items():
        lines += [
            f"### Synthetic {name}: accuracy (recall@1 among {result['n_docs']} documents per length; "
            f"chunks {result['chunk_size']}/{result['chunk_overlap']}; teacher {result['teacher']})",
            "",
        ]
        rows = [[method] + [f"{a:.3f}" for a in accuracies] for method, accuracies in task["methods"].items()]
        lines += [_markdown_table(["method"] + [str(length) for length in task["lengths"]], rows), ""]
    return _with_notes("\n".join(lines).rstrip(), result["notes"])


def format_table(results: dict) -> str:
    """Markdown tables of a ``long_document_retrieval`` or ``synthetic_eval`` result, or of a dict of them.

    Retrieval: one row per method, columns ndcg@10 and recall@1. Synthetic: one table per task, one row
    per method, one column per length. Notes (truncation, skipped lengths) follow each table.
    """
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    sections = [results] if "task" in results else [r for r in results.values() if isinstance(r, dict)]
    reports = []
    for result in sections:
        if result.get("task") == "long_document_retrieval":
            reports.append(_retrieval_report(result))
        elif result.get("task") == "synthetic":
            reports.append(_synthetic_report(result))
    if not reports:
        raise ValueError("results hold no long_document_retrieval or synthetic_eval result")
    return "\n\n".join(reports) + "\n"


def format_report(results: dict) -> str:
    """Markdown report of an ``evaluate`` result: held-out data, teacher agreement, then the task tables."""
    lines = [f"# Evaluation of {results['model']} (teacher {results['teacher']})", ""]
    held = results["heldout"]
    lines.append(f"Held-out data: {held['documents']} documents, {held.get('tokens', '?')} tokens "
                 f"(corpus {held['sha256']}, Python {held['python']})")
    agreement = results["agreement"]
    lines.append("")
    if "skipped" in agreement:
        lines.append(f"Teacher agreement: skipped ({agreement['skipped']})")
    else:
        lines.append(f"Teacher agreement over {agreement['documents']} documents / {agreement['chunks']} chunks: "
                     f"CLS cosine {agreement['cls_cosine']:.4f}, chunk cosine {agreement['chunk_cosine']:.4f}")
    lines.append("")
    tables = {k: results[k] for k in ("retrieval", "synthetic") if "skipped" not in results[k]}
    if tables:
        lines.append(format_table(tables))
    for key in ("retrieval", "synthetic"):
        if "skipped" in results[key]:
            lines.append(f"{key}: skipped ({results[key]['skipped']})")
    return "\n".join(lines)
