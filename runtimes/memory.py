"""Give freed memory back to the system between the layers of a long document (glibc only).

A long document's forward allocates and frees tensors of tens to hundreds of MB, layer after layer.
glibc's malloc serves an allocation above its mmap threshold with its own mapping, returned to the
system on free, but it then raises the threshold to that size (up to 32 MiB): later tensors of that
size land in the heap, which is not returned while anything above them is alive. The process peak
then holds the freed activations of several layers. Fixing the threshold (``mallopt``; also what
``MALLOC_MMAP_THRESHOLD_`` does) keeps every large tensor in a mapping of its own, freed when the
tensor is.

Measured (tiny config, 32,768 tokens, PyTorch backend, 2 threads, peak RSS): 1.08 -> 0.95 GiB.
The ONNX Runtime backend does not use this: it allocates from its own CPU arena (buffer reuse off,
shrunk after each long run), which peaks higher (tiny config, 2 threads: 0.53 against 0.35 GiB at 32k
tokens, 2.10 against 1.18 at 128k) but saves the page faults of fresh mappings, which cost a third
of the time at 8k tokens on the ModernBERT-base shape (runtimes.backends.onnx_backend).

The price is a page fault per 4 KiB of every large tensor, which short batches feel: ModernBERT-base
shape, 8 x 512 tokens, 2 threads, PyTorch 6.45 -> 7.61 s per batch (+18 %); a 4 MiB threshold would
not help (those tensors are 12 MB). So the threshold follows the batch (``tune_for_length``, called by
the PyTorch backend before each forward): rows longer than ``LONG_ROW_TOKENS`` get the 1 MiB threshold;
shorter ones get a fixed 32 MiB, glibc's own ceiling for its moving threshold, so they reuse heap memory
as before. With this policy the same batch ran as fast as with malloc untouched (PyTorch 5.78-6.16
against 5.76-6.16 s, alternating runs).
``DEWEY_MALLOC_TUNING=0`` leaves malloc alone (the setting is process-wide).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from .batching import DEFAULT_LONG_THRESHOLD

# Long rows: allocations of at least this many bytes get a mapping of their own. 1 MiB: small
# allocations keep the fast heap; measured the same peak as 64 KiB (16 MiB gave back a quarter of the
# memory saved).
MMAP_THRESHOLD = 1 << 20
# Short rows: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, where its moving threshold stops anyway.
SHORT_MMAP_THRESHOLD = 32 << 20
# Rows longer than this take MMAP_THRESHOLD: the batching policy's long-row threshold (2048).
LONG_ROW_TOKENS = DEFAULT_LONG_THRESHOLD
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
ENV_SWITCH = "DEWEY_MALLOC_TUNING"


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # absent from musl and other C libraries
        return libc
    except (OSError, AttributeError):
        return None


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; True when it is in effect.

    Does nothing (and returns False) off glibc or when ``DEWEY_MALLOC_TUNING=0``. Safe to call often.
    """
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1)


def threshold_for_length(seq_len: int) -> int:
    """The policy: the mmap threshold for a batch whose rows are ``seq_len`` tokens long."""
    return MMAP_THRESHOLD if seq_len > LONG_ROW_TOKENS else SHORT_MMAP_THRESHOLD


def tune_for_length(seq_len: int) -> bool:
    """Set the threshold for a batch of ``seq_len``-token rows; True when it is in effect."""
    return map_large_allocations(threshold_for_length(seq_len))
