"""dewey_embed: ``dewey-embed``, a whole corpus to Parquet shards of Dewey vectors, resumably.

This package owns the corpus side of embedding: reading inputs into documents (``inputs``), the one
per-batch function that embeds a window of documents and the loop that writes its results
(``pipeline``), the output folder with its manifest, atomic shards and resumption rules (``shards``),
the command line (``cli``) and the scale-out of the same per-batch function on Ray Data
(``ray_runner``). Everything about the vectors themselves (tokenization, prompts, late chunking,
batching inside a window) stays in ``runtimes``: dewey-embed only calls ``Encoder.encode`` and
``Encoder.encode_chunks``.
"""
