"""Evaluation of Dewey students against their teacher (``dewey-train eval``).

- ``retrieval``: the four scoring methods (student single / multi-vector, teacher truncated / on the
  student's chunks) and the long-document retrieval task, queries drawn from the documents'
  sentences (the queries and the metrics, nDCG@k and recall@k, live in the torch-free
  ``runtimes.evaluation``);
- ``synthetic``: LongEmbed-style passkey and needle documents of set token lengths, built offline, and
  the accuracy of every method on them;
- ``report``: markdown tables of those results and the full evaluation report;
- ``run``: ``evaluate``, teacher agreement, retrieval and synthetic tasks on a config's held-out data.
"""

from .report import format_report
from .run import evaluate

__all__ = ["evaluate", "format_report"]
