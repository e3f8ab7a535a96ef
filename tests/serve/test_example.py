"""examples/serve_openai_client.py runs as a user runs it: it starts its own server, queries it with the
openai client and stops it (exit 0)."""

from __future__ import annotations

import re

from test_examples import run_example, succeeded


def test_serve_openai_client_example(tmp_path):
    out = succeeded(run_example("serve_openai_client.py", "--warmup-tokens", 256, cwd=tmp_path))
    assert "passage vectors (3, 384)" in out
    assert "best: Yeast ferments" in out
    found = re.search(r"late chunking: (\d+) chunk vectors from one pass; document\[a:b\] == chunk text for (\d+) of "
                      r"(\d+) chunks", out)
    assert found and found[1] == found[2] == found[3] and int(found[1]) > 1, out
    assert "dewey-serve stopped with exit code 0" in out
