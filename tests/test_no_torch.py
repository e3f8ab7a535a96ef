"""The runtime's shared layer works where torch and transformers are not installed.

An embedded service has numpy, tokenizers and onnxruntime only. Each check runs in a fresh interpreter
whose import system refuses torch, transformers and safetensors, as if they were not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_HEAVY_IMPORTS = textwrap.dedent(
    """
    import sys
    BLOCKED = ("torch", "transformers", "safetensors")
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, Block())
    """
)


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    script = BLOCK_HEAVY_IMPORTS + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks_torch():
    """Guard for the guard: inside the subprocess, importing torch fails."""
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_encoder_runs_end_to_end_without_torch(checkpoint):
    """Import, tokenization, prompts, chunking, batching and pooling modes, with a pure-numpy forward."""
    result = run_without_torch(
        f"""
        import numpy as np
        import runtimes
        from runtimes.config import load_config
        from runtimes.tokenization import DeweyTokenizer

        class MeanEmbeddingBackend:
            # A numpy forward keeping the contract: cls = embedding of token 0, spans = span means.
            name = "numpy"
            def __init__(self, vocab, dim):
                self.table = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)
                self.vector_size = dim
            def forward(self, input_ids, attention_mask, span_bounds):
                h = self.table[input_ids]
                spans = np.zeros(span_bounds.shape[:2] + (h.shape[-1],), np.float32)
                for b, row in enumerate(span_bounds):
                    for c, (s, e) in enumerate(row):
                        if e > s:
                            spans[b, c] = h[b, s:e].mean(0)
                return h[:, 0], spans

        folder = {str(checkpoint)!r}
        config = load_config(folder)
        enc = runtimes.Encoder(config, DeweyTokenizer.from_folder(folder, config),
                               MeanEmbeddingBackend(config.vocab_size, config.vector_size))
        vecs = enc.encode(["first text", "a second, longer text " * 20], prompt="query", mode="cls_add_mean")
        assert vecs.shape == (2, config.vector_size), vecs.shape
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
        docs = enc.encode_chunks(["Paragraph one.\\n\\nParagraph two is here. " * 30], chunk_size=32,
                                 chunk_overlap=8, splitter="recursive")
        assert len(docs[0].vectors) > 1
        docs = enc.encode_chunks(["Paragraph one.\\n\\nParagraph two is here. " * 30], chunk_size=32, chunk_overlap=8)
        assert len(docs[0].vectors) > 1
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "safetensors"))
        assert not heavy, heavy
        print("OK")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_torch_backend_without_torch_says_what_to_install(checkpoint):
    result = run_without_torch(
        f"""
        import runtimes
        try:
            runtimes.load({str(checkpoint)!r}, backend="torch")
        except ImportError as exc:
            print("MESSAGE:", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "backend 'torch' needs the package 'torch'" in result.stdout
    assert "pip install 'dewey[torch]'" in result.stdout
