"""dewey_train: chunk-alignment distillation of Dewey students.

- ``data``: text sources, the built-in stdlib corpus, the stable train / held-out split;
- ``samples``: pieces, seeded training chunks (``encode_chunks``' own, from ``runtimes.chunking``) and
  teacher targets, and ``make_batch``, which pads samples into tensors;
- ``teacher``: a sentence-transformers teacher behind an SQLite vector cache;
- ``losses``: cosine and similarity-matrix losses; ``trainer``: the loop, DDP, checkpoints, resume;
- ``evaluation``: teacher agreement, metrics, long-document retrieval, passkey / needle tasks and
  their markdown report (``dewey-train eval``);
- ``cli``: ``dewey-train``; ``package``: copy a trained model into the package as the default model.

It imports ``runtimes`` for the model definition, the chunkers and span pooling; ``runtimes`` never
imports it.
"""
