"""Late chunking: one pass over a long document, one vector per chunk, each chunk traceable to its text.

The document is a page of Python's own documentation (``pydoc_data.topics``, shipped with Python).
``encode_chunks`` reads the whole document once, so every chunk vector has seen its context, then
averages the tokens of each chunk. Its character spans index the original string:
``text[a:b] == doc.texts[j]`` for every chunk ``j``. The question is then answered by the best chunk.

    python examples/late_chunking.py
    python examples/late_chunking.py --topic formatstrings --question "How do I pad a number with zeros?"
"""

from __future__ import annotations

import argparse
import time

from pydoc_data.topics import topics

from runtimes import load

DEFAULT_TOPIC = "specialnames"
DEFAULT_QUESTION = "Which method is called to create a new instance of a class?"
DEFAULT_CHUNK_SIZE = 256  # tokens, with the authors' 256/64 setting
DEFAULT_CHUNK_OVERLAP = 64
PREVIEW_CHARS = 240
TOP_CHUNKS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topic", default=DEFAULT_TOPIC, choices=sorted(topics), metavar="TOPIC",
                        help=f"A pydoc_data.topics page (default: {DEFAULT_TOPIC}).")
    parser.add_argument("--max-chars", type=int, help="Keep only the document's first MAX_CHARS characters.")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="Chunk size in tokens.")
    parser.add_argument("--chunk-overlap", type=int, default=DEFAULT_CHUNK_OVERLAP, help="Overlap in tokens.")
    parser.add_argument("--splitter", default="recursive", choices=("tokens", "words", "recursive"),
                        help="recursive: chunks end at paragraph, line, sentence or word boundaries.")
    args = parser.parse_args()
    if args.max_chars is not None and args.max_chars < 1:
        parser.error("--max-chars must be at least 1")
    text = topics[args.topic][: args.max_chars]

    encoder = load()  # the packaged dewey-mini
    started = time.perf_counter()
    doc = encoder.encode_chunks(text, chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap,
                                splitter=args.splitter, prompt="passage")
    seconds = time.perf_counter() - started
    print(f"document {args.topic!r}: {len(text)} characters, {doc.token_spans[-1][1]} tokens, "
          f"{len(doc.texts)} chunks of up to {args.chunk_size} tokens in one pass ({seconds:.1f} s)")

    exact = sum(text[a:b] == chunk for (a, b), chunk in zip(doc.char_spans, doc.texts))
    print(f"text[a:b] == doc.texts[j] for {exact} of {len(doc.texts)} chunks, (a, b) = doc.char_spans[j]")

    scores = doc.vectors @ encoder.encode(args.question, prompt="query")
    print(f"\nquestion: {args.question}")
    for j in scores.argsort()[::-1][:TOP_CHUNKS]:
        a, b = doc.char_spans[j]
        preview = " ".join(doc.texts[j].split())[:PREVIEW_CHARS]
        print(f"  chunk {j} ({scores[j]:.3f}) text[{a}:{b}]: {preview}")


if __name__ == "__main__":
    main()
