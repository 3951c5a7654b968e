"""The cloud's memory of recent images: decoded indices by image digest, so a follow-up question
(`wire_followup`) needs no second frame.

Bounded in entries and in bytes (least recently used first out), and scoped: with API keys on, each key sees
only the images sent with it (the scope is a digest of the key); without keys, all clients share one scope.
Indices are kept in the narrowest integer type that holds the codebook (2 bytes for K <= 32768): 1.2 KB for
LLaVA-1.5's 577 tokens, so the default 4096 entries stay under 5 MB with that model.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

DEFAULT_ENTRIES = 4096
DEFAULT_BYTES = 64 * 2**20
ENTRY_OVERHEAD = 200  # bytes of bookkeeping per entry (key tuple, array header), counted in the bound


def scope_of(authorization: str | None) -> bytes:
    """The cache scope of a request: a digest of its bearer token (already checked), or b"" without one."""
    if not authorization:
        return b""
    return hashlib.sha256(authorization.strip().encode("latin-1")).digest()[:16]


class ImageCache:
    """Thread-safe LRU of ``(scope, digest) -> indices (tokens, codes_per_token)`` and the image's layout
    (`wire_geometry`: a tiled image's size, a Qwen2.5-VL patch grid; None for LLaVA-1.5)."""

    def __init__(self, *, max_entries: int = DEFAULT_ENTRIES, max_bytes: int = DEFAULT_BYTES):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"need max_entries >= 1 and max_bytes >= 1; got {max_entries}, {max_bytes}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[bytes, bytes], tuple[np.ndarray, tuple | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(entry: tuple[np.ndarray, tuple | None]) -> int:
        return entry[0].nbytes + ENTRY_OVERHEAD

    def put(self, scope: bytes, digest: bytes, indices: np.ndarray, codebook_size: int,
            layout: tuple[int, ...] | None = None) -> None:
        dtype = np.int16 if codebook_size <= 2**15 else np.int32
        array = np.ascontiguousarray(indices, dtype=dtype)
        array.setflags(write=False)
        entry, key = (array, layout), (scope, digest)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= self._size(old)
            self._entries[key] = entry
            self.bytes += self._size(entry)
            while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= self._size(evicted)

    def get(self, scope: bytes, digest: bytes) -> np.ndarray | None:
        entry = self.lookup(scope, digest)
        return None if entry is None else entry[0]

    def lookup(self, scope: bytes, digest: bytes) -> tuple[np.ndarray, tuple[int, ...] | None] | None:
        """``(indices, layout or None)`` of a kept image, or None."""
        with self._lock:
            entry = self._entries.get((scope, digest))
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end((scope, digest))
            self.hits += 1
            return entry


__all__ = ["ImageCache", "scope_of"]
