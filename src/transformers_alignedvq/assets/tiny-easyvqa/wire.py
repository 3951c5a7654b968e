"""Binary wire format for AlignedVQ edge-to-cloud frames.

The edge device runs the first layers of the vision encoder, vector-quantizes
each image token and sends only the codebook indices.  This module turns those
indices (plus an optional text prompt) into one self-describing, CRC-protected
byte string and back.  It depends on ``numpy`` only, so it can run on small
edge devices; the optional entropy-coded mode additionally needs
``constriction`` (``pip install constriction``).

Frame layout (format version 1)
===============================

All multi-byte integers are **little-endian**.  Offsets are in bytes.

Fixed header, 36 bytes::

    off  size  type      field
    0    4     bytes     magic, always b"AVQF" ("AlignedVQ Frame")
    4    1     u8        format version, currently 1
    5    1     u8        flags (bit 0: entropy-coded payload,
                                bit 1: token 0 is a CLS token,
                                bit 2: a prompt section is present;
                                bits 3-7 are reserved and must be 0)
    6    1     u8        bits_per_index b = ceil(log2 K)  (1..32)
    7    1     u8        codes_per_token C (residual depth x groups, 1..255)
    8    4     u32       codebook_size K (2 .. 2**32 - 1)
    12   4     u32       num_tokens T (>= 1), including the CLS token if any
    16   2     u16       grid_h, patch rows    (0 together with grid_w: no grid)
    18   2     u16       grid_w, patch columns
    20   16    bytes     codebook fingerprint, see ``codebook_fingerprint``

When a grid is given, ``T == grid_h * grid_w + (1 if CLS flag else 0)``; the
CLS token, if present, is token 0 (CLIP order).  LLaVA-1.5 (CLIP ViT-L/14 at
336 px) is ``grid 24 x 24 + CLS = 577 tokens``.

Entropy extension, 12 bytes, present only when flag bit 0 is set::

    36   8     bytes     distribution id (``IndexDistribution.distribution_id``)
    44   4     u32       entropy payload length P in bytes (multiple of 4)

Index payload, immediately after the header (and extension, if any):

* raw mode: ``ceil(T * C * b / 8)`` bytes.  Indices are taken in row-major
  order (token 0 code 0, token 0 code 1, ..., token 1 code 0, ...), each one
  written as exactly ``b`` bits, most significant bit first, into a big-endian
  bit stream (bit 7 of byte 0 is the first bit).  The final byte is padded with
  zero bits; non-zero padding is rejected.
* entropy mode: ``P`` bytes, a sequence of little-endian u32 words produced by
  ``constriction``'s ANS coder (``constriction.stream.stack.AnsCoder``,
  ``Categorical(..., perfect=False)`` models).  Code position 0 of all tokens is
  decoded first, then code position 1, and so on, each position with its own
  probability table.

Prompt section, present only when flag bit 2 is set::

    +0   4     u32       prompt length L in bytes
    +4   L     bytes     prompt, UTF-8 (strict; no BOM is added or removed)

Trailer::

    +0   4     u32       CRC-32 (``zlib.crc32``) of every preceding byte

A frame is exactly this long: trailing bytes are an error, so frames must be
delimited by the transport (one frame per HTTP body / message).

Every malformed frame or invalid argument raises ``WireFormatError`` (a
``ValueError``) with a message saying what is wrong; ``decode_frame`` raises
nothing else for any byte string.  Using the entropy mode without
``constriction`` installed raises ``ModuleNotFoundError`` naming the package.
"""

from __future__ import annotations

import hashlib
import math
import operator
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CRC_SIZE",
    "DISTRIBUTION_ID_SIZE",
    "ENTROPY_EXTENSION_SIZE",
    "FINGERPRINT_SIZE",
    "FLAG_CLS_TOKEN",
    "FLAG_ENTROPY_CODED",
    "FLAG_PROMPT",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CODEBOOK_SIZE",
    "MAX_CODES_PER_TOKEN",
    "MAX_ENTROPY_CODEBOOK_SIZE",
    "MAX_ENTROPY_SYMBOLS",
    "Frame",
    "IndexDistribution",
    "WireFormatError",
    "bits_per_index",
    "codebook_fingerprint",
    "decode_frame",
    "encode_frame",
    "frame_overhead_bytes",
    "raw_payload_bytes",
]

MAGIC = b"AVQF"
FORMAT_VERSION = 1

FLAG_ENTROPY_CODED = 0x01
FLAG_CLS_TOKEN = 0x02
FLAG_PROMPT = 0x04
_KNOWN_FLAGS = FLAG_ENTROPY_CODED | FLAG_CLS_TOKEN | FLAG_PROMPT

_HEADER = struct.Struct("<4sBBBBIIHH16s")
_ENTROPY_EXTENSION = struct.Struct("<8sI")
_U32 = struct.Struct("<I")

HEADER_SIZE = _HEADER.size  # 36
ENTROPY_EXTENSION_SIZE = _ENTROPY_EXTENSION.size  # 12
PROMPT_LENGTH_SIZE = _U32.size
CRC_SIZE = _U32.size
FINGERPRINT_SIZE = 16
DISTRIBUTION_ID_SIZE = 8

MAX_CODEBOOK_SIZE = 2**32 - 1
MAX_CODES_PER_TOKEN = 255
MAX_TOKENS = 2**32 - 1
MAX_GRID_SIDE = 2**16 - 1
# constriction's default ANS coder quantizes probabilities to 24 bits, so every
# symbol must keep at least one quantum; 2**20 leaves room for a useful model.
MAX_ENTROPY_CODEBOOK_SIZE = 2**20
# The entropy payload length does not bound the number of decoded symbols (a
# near-certain symbol costs almost no bits), so a hostile header could make the
# decoder allocate without limit.  4M codes (32 MiB of int64) is thousands of
# LLaVA images per frame.
MAX_ENTROPY_SYMBOLS = 2**22

_DISTRIBUTION_DOMAIN = b"AVQ index distribution v1\x00"


class WireFormatError(ValueError):
    """A frame, or an argument used to build or check one, is invalid."""


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _to_numpy(value: Any, what: str) -> np.ndarray:
    """Convert numpy arrays, torch-like tensors and array-likes without importing torch."""
    if isinstance(value, np.ndarray):
        return value
    try:
        if hasattr(value, "detach") and hasattr(value, "cpu"):
            # torch.Tensor: .numpy() refuses tensors that need grad, live on an
            # accelerator or are bfloat16, so normalise those first.
            tensor = value.detach().cpu()
            if str(getattr(tensor, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
                tensor = tensor.float()
            return np.asarray(tensor.numpy())
        if hasattr(value, "numpy") and not hasattr(value, "__array__"):
            return np.asarray(value.numpy())
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad argument
        raise WireFormatError(f"{what} could not be converted to a numpy array: {exc}") from exc


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise WireFormatError(f"{what} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise WireFormatError(f"{what} must be an integer, got {type(value).__name__}") from None


def _as_fingerprint(value: Any, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise WireFormatError(
            f"{what} must be {FINGERPRINT_SIZE} bytes, got {type(value).__name__}; "
            "compute it with codebook_fingerprint(codebook)"
        )
    raw = bytes(value)
    if len(raw) != FINGERPRINT_SIZE:
        raise WireFormatError(
            f"{what} must be exactly {FINGERPRINT_SIZE} bytes, got {len(raw)}; "
            "compute it with codebook_fingerprint(codebook)"
        )
    return raw


def bits_per_index(codebook_size: int) -> int:
    """Bits needed per raw index, ``ceil(log2(codebook_size))`` (12 for K=4096)."""
    k = _as_int(codebook_size, "codebook_size")
    if not 2 <= k <= MAX_CODEBOOK_SIZE:
        raise WireFormatError(
            f"codebook_size must be in [2, {MAX_CODEBOOK_SIZE}], got {k}"
        )
    return (k - 1).bit_length()


def raw_payload_bytes(num_tokens: int, *, codebook_size: int, codes_per_token: int = 1) -> int:
    """Size of the raw (bit-packed) index payload: ``ceil(T * C * b / 8)``."""
    total_bits = _as_int(num_tokens, "num_tokens") * _as_int(codes_per_token, "codes_per_token")
    return (total_bits * bits_per_index(codebook_size) + 7) // 8


def frame_overhead_bytes(*, prompt: str | None = None, entropy_coded: bool = False) -> int:
    """Bytes of a frame that are not index payload: header, extension, prompt section, CRC."""
    size = HEADER_SIZE + CRC_SIZE
    if entropy_coded:
        size += ENTROPY_EXTENSION_SIZE
    if prompt is not None:
        size += PROMPT_LENGTH_SIZE + len(_encode_prompt(prompt))
    return size


def codebook_fingerprint(codebook: Any) -> bytes:
    """First 16 bytes of SHA-256 over the canonical serialisation of ``codebook``.

    The canonical form is the shape as little-endian u32 values, one per
    dimension, followed by the values as float32 little-endian, C order.
    Accepts numpy arrays, torch tensors (any device or dtype) and array-likes.
    Edge and cloud must hold bit-identical codebooks (after float32 rounding)
    to produce equal fingerprints.
    """
    array = _to_numpy(codebook, "codebook")
    if array.dtype.kind not in "fiub":
        raise WireFormatError(f"codebook must be numeric, got dtype {array.dtype}")
    if any(dim > 0xFFFFFFFF for dim in array.shape):
        raise WireFormatError(f"codebook dimension too large for the fingerprint: {array.shape}")
    canonical = np.ascontiguousarray(array, dtype="<f4")
    digest = hashlib.sha256()
    digest.update(struct.pack(f"<{canonical.ndim}I", *canonical.shape))
    digest.update(canonical.tobytes())
    return digest.digest()[:FINGERPRINT_SIZE]


def _encode_prompt(prompt: str) -> bytes:
    if not isinstance(prompt, str):
        raise WireFormatError(f"prompt must be a str or None, got {type(prompt).__name__}")
    try:
        return prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WireFormatError(f"prompt cannot be encoded as UTF-8: {exc}") from exc


# Chunking bounds the temporary bit-plane arrays (32 bytes per index) on large
# frames; the chunk length is a multiple of 8 so every chunk starts on a byte
# boundary of the bit stream.  A LLaVA frame (577 indices) is a single chunk.
_PACK_CHUNK = 1 << 16


def _pack_chunk(words: np.ndarray, bits: int) -> bytes:
    # Expand each index to its 32 big-endian bits, keep the low `bits` columns
    # and let packbits concatenate them: no Python loop over indices.
    bitplanes = np.unpackbits(words.view(np.uint8).reshape(-1, 4), axis=1)
    return np.packbits(bitplanes[:, 32 - bits :]).tobytes()


def _pack_indices(flat: np.ndarray, bits: int) -> bytes:
    words = np.ascontiguousarray(flat, dtype=">u4")
    if words.size <= _PACK_CHUNK:
        return _pack_chunk(words, bits)
    return b"".join(
        _pack_chunk(words[start : start + _PACK_CHUNK], bits)
        for start in range(0, words.size, _PACK_CHUNK)
    )


def _unpack_indices(payload: bytes, count: int, bits: int) -> np.ndarray:
    raw = np.frombuffer(payload, dtype=np.uint8)
    used_bits = count * bits
    if used_bits % 8 and raw[-1] & ((1 << (8 - used_bits % 8)) - 1):
        raise WireFormatError(
            "raw index payload has non-zero padding bits after the last index; the frame is corrupt"
        )
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _PACK_CHUNK):
        n = min(_PACK_CHUNK, count - start)
        first_byte = start * bits // 8
        stream = np.unpackbits(raw[first_byte : first_byte + (n * bits + 7) // 8])
        bitplanes = np.zeros((n, 32), dtype=np.uint8)
        bitplanes[:, 32 - bits :] = stream[: n * bits].reshape(n, bits)
        out[start : start + n] = np.packbits(bitplanes, axis=1).view(">u4").reshape(n)
    return out


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the entropy-coded wire mode needs the 'constriction' package; install it with "
            "`pip install constriction` (or `pip install transformers-alignedvq[entropy]`), "
            "or send raw frames (entropy_model=None)",
            name="constriction",
        ) from exc
    return constriction


# --------------------------------------------------------------------------- #
# entropy model
# --------------------------------------------------------------------------- #


class IndexDistribution:
    """Static per-code-position probability tables for the entropy-coded mode.

    ``probabilities`` has shape ``(codes_per_token, codebook_size)``; row ``c``
    models the indices at code position ``c`` of every token.  All entries must
    be finite and strictly positive, so every index stays encodable.  The
    tables are stored as float64 and identified on the wire by
    ``distribution_id``; they are not renormalised after loading, since that
    would change the id.
    """

    __slots__ = ("_probabilities", "_distribution_id", "_models")

    ARRAY_KEY = "probabilities"

    def __init__(self, probabilities: Any) -> None:
        table = _to_numpy(probabilities, "probabilities")
        if table.dtype.kind not in "fiu":
            raise WireFormatError(f"probabilities must be numeric, got dtype {table.dtype}")
        if table.ndim == 1:
            table = table[None, :]
        if table.ndim != 2:
            raise WireFormatError(
                f"probabilities must have shape (codes_per_token, codebook_size), got {table.shape}"
            )
        codes, k = table.shape
        if not 1 <= codes <= MAX_CODES_PER_TOKEN:
            raise WireFormatError(
                f"probabilities has {codes} code positions; expected 1..{MAX_CODES_PER_TOKEN}"
            )
        if not 2 <= k <= MAX_ENTROPY_CODEBOOK_SIZE:
            raise WireFormatError(
                f"entropy coding supports codebook sizes 2..{MAX_ENTROPY_CODEBOOK_SIZE}, got {k}"
            )
        table = np.array(table, dtype=np.float64, order="C")
        if not np.all(np.isfinite(table)) or not np.all(table > 0):
            raise WireFormatError(
                "probabilities must be finite and strictly positive (use additive smoothing)"
            )
        table.setflags(write=False)
        self._probabilities = table
        digest = hashlib.sha256(_DISTRIBUTION_DOMAIN)
        digest.update(struct.pack("<II", codes, k))
        digest.update(table.astype("<f8", copy=False).tobytes())
        self._distribution_id = digest.digest()[:DISTRIBUTION_ID_SIZE]
        self._models: list[Any] | None = None

    @classmethod
    def from_counts(cls, counts: Any, *, smoothing: float = 1.0) -> IndexDistribution:
        """Estimate ``(counts + smoothing) / sum`` per code position; ``smoothing`` must be > 0."""
        table = _to_numpy(counts, "counts")
        if table.dtype.kind not in "fiu":
            raise WireFormatError(f"counts must be numeric, got dtype {table.dtype}")
        table = np.asarray(table, dtype=np.float64)
        if not np.all(np.isfinite(table)) or np.any(table < 0):
            raise WireFormatError("counts must be finite and non-negative")
        try:
            alpha = float(smoothing)
        except (TypeError, ValueError):
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise WireFormatError(
                f"smoothing must be a positive finite number so no index gets probability 0, got {smoothing!r}"
            )
        smoothed = table + alpha
        return cls(smoothed / smoothed.sum(axis=-1, keepdims=True))

    @classmethod
    def from_indices(
        cls, indices: Any, *, codebook_size: int, smoothing: float = 1.0
    ) -> IndexDistribution:
        """Count indices of shape ``(N,)`` or ``(N, codes_per_token)`` and smooth them."""
        k = _as_int(codebook_size, "codebook_size")
        if not 2 <= k <= MAX_ENTROPY_CODEBOOK_SIZE:
            raise WireFormatError(
                f"entropy coding supports codebook sizes 2..{MAX_ENTROPY_CODEBOOK_SIZE}, got {k}"
            )
        table = _validate_indices(indices, k)
        counts = np.stack([np.bincount(col, minlength=k) for col in table.T])
        return cls.from_counts(counts, smoothing=smoothing)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], *, prefix: str = "") -> IndexDistribution:
        """Rebuild from the mapping written by ``to_arrays`` (e.g. a safetensors state dict)."""
        key = prefix + cls.ARRAY_KEY
        if key not in arrays:
            raise WireFormatError(f"no entropy-model table under key {key!r}")
        return cls(arrays[key])

    def to_arrays(self, *, prefix: str = "") -> dict[str, np.ndarray]:
        """``{prefix + "probabilities": float64 (codes_per_token, codebook_size)}``."""
        return {prefix + self.ARRAY_KEY: self._probabilities.copy()}

    @property
    def probabilities(self) -> np.ndarray:
        return self._probabilities

    @property
    def codebook_size(self) -> int:
        return int(self._probabilities.shape[1])

    @property
    def codes_per_token(self) -> int:
        return int(self._probabilities.shape[0])

    @property
    def distribution_id(self) -> bytes:
        """First 8 bytes of SHA-256 over a domain tag, ``<u32 C, u32 K>`` and the float64 LE tables."""
        return self._distribution_id

    def ideal_bits(self, indices: Any) -> float:
        """Shannon code length of ``indices`` under this model, in bits (ANS gets within a few bytes)."""
        table = _validate_indices(indices, self.codebook_size)
        self._check_codes(table.shape[1])
        normalised = self._probabilities / self._probabilities.sum(axis=1, keepdims=True)
        picked = normalised[np.arange(table.shape[1])[None, :], table]
        return float(-np.log2(picked).sum())

    def __repr__(self) -> str:
        return (
            f"IndexDistribution(codes_per_token={self.codes_per_token}, "
            f"codebook_size={self.codebook_size}, id={self._distribution_id.hex()})"
        )

    def _check_codes(self, codes_per_token: int) -> None:
        if codes_per_token != self.codes_per_token:
            raise WireFormatError(
                f"entropy model has {self.codes_per_token} code position(s) per token but the "
                f"indices have {codes_per_token}"
            )

    def _coding_models(self) -> list[Any]:
        # Built lazily (needs constriction) and cached: construction is the
        # expensive part, coding 577 symbols is tens of microseconds.
        if self._models is None:
            categorical = _constriction().stream.model.Categorical
            # perfect=False is pinned explicitly: encoder and decoder must agree
            # on it, and constriction's default changed between releases.
            self._models = [categorical(row, perfect=False) for row in self._probabilities]
        return self._models

    def _encode_payload(self, table: np.ndarray) -> bytes:
        models = self._coding_models()
        coder = _constriction().stream.stack.AnsCoder()
        # ANS is a stack: push the last code position first so the decoder pops
        # position 0 first.
        for position in reversed(range(table.shape[1])):
            coder.encode_reverse(
                np.ascontiguousarray(table[:, position], dtype=np.int32), models[position]
            )
        return np.asarray(coder.get_compressed(), dtype="<u4").tobytes()

    def _decode_payload(self, payload: bytes, num_tokens: int) -> np.ndarray:
        models = self._coding_models()
        stack = _constriction().stream.stack
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            coder = stack.AnsCoder(words)
            columns = [coder.decode(model, num_tokens) for model in models]
            leftover = not coder.is_empty()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - pyo3 maps Rust panics to a BaseException
            raise WireFormatError(f"entropy-coded payload is corrupt: {exc}") from None
        if leftover:
            raise WireFormatError(
                "entropy-coded payload has unread data after the last index; the frame is corrupt "
                "or was encoded with a different constriction version"
            )
        return np.stack(columns, axis=1).astype(np.int64)


# --------------------------------------------------------------------------- #
# frames
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class Frame:
    """A decoded frame.  ``indices`` is read-only, shape ``(num_tokens, codes_per_token)``, int64."""

    indices: np.ndarray
    codebook_size: int
    bits_per_index: int
    codes_per_token: int
    num_tokens: int
    grid: tuple[int, int] | None
    has_cls_token: bool
    prompt: str | None
    fingerprint: bytes
    entropy_coded: bool
    distribution_id: bytes | None
    version: int
    flags: int
    payload_bytes: int
    frame_bytes: int

    @property
    def overhead_bytes(self) -> int:
        return self.frame_bytes - self.payload_bytes


def _validate_indices(indices: Any, codebook_size: int) -> np.ndarray:
    array = _to_numpy(indices, "indices")
    if array.dtype.kind not in "iu":
        raise WireFormatError(
            f"indices must have an integer dtype, got {array.dtype}; codebook indices are "
            "whole numbers, cast with .astype(np.int64)"
        )
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise WireFormatError(
            f"indices must have shape (num_tokens,) or (num_tokens, codes_per_token), got {array.shape}"
        )
    num_tokens, codes = array.shape
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise WireFormatError(f"indices must contain 1..{MAX_TOKENS} tokens, got {num_tokens}")
    if not 1 <= codes <= MAX_CODES_PER_TOKEN:
        raise WireFormatError(
            f"codes_per_token must be in 1..{MAX_CODES_PER_TOKEN}, got {codes}"
        )
    negative = np.flatnonzero(array < 0) if array.dtype.kind == "i" else np.empty(0, np.intp)
    if negative.size:
        token, code = divmod(int(negative[0]), codes)
        raise WireFormatError(
            f"index out of range: token {token}, code {code} is {int(array[token, code])}, "
            f"indices must be in [0, {codebook_size})"
        )
    too_big = np.flatnonzero(array >= codebook_size)
    if too_big.size:
        token, code = divmod(int(too_big[0]), codes)
        raise WireFormatError(
            f"index out of range: token {token}, code {code} is {int(array[token, code])}, "
            f"but codebook size K={codebook_size} (valid indices are 0..{codebook_size - 1})"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def _grid_fields(grid: Any, has_cls_token: Any, num_tokens: int) -> tuple[int, int]:
    if not isinstance(has_cls_token, bool):
        raise WireFormatError(f"has_cls_token must be a bool, got {type(has_cls_token).__name__}")
    if grid is None:
        if has_cls_token:
            raise WireFormatError("has_cls_token=True needs a grid=(height, width)")
        return 0, 0
    try:
        height, width = grid
    except (TypeError, ValueError):
        raise WireFormatError(f"grid must be a (height, width) pair, got {grid!r}") from None
    height, width = _as_int(height, "grid height"), _as_int(width, "grid width")
    if not (1 <= height <= MAX_GRID_SIDE and 1 <= width <= MAX_GRID_SIDE):
        raise WireFormatError(f"grid sides must be in 1..{MAX_GRID_SIDE}, got {height}x{width}")
    expected = height * width + int(has_cls_token)
    if expected != num_tokens:
        cls_note = " + 1 CLS" if has_cls_token else ""
        raise WireFormatError(
            f"token count does not match the grid: {height}x{width}{cls_note} = {expected} "
            f"tokens, but indices have {num_tokens}"
        )
    return height, width


def encode_frame(
    indices: Any,
    *,
    codebook_size: int,
    codebook_fingerprint: bytes,
    prompt: str | None = None,
    entropy_model: IndexDistribution | None = None,
    grid: tuple[int, int] | None = None,
    has_cls_token: bool = False,
) -> bytes:
    """Serialise codebook indices into one frame.

    ``indices``: integer array of shape ``(num_tokens,)`` or
    ``(num_tokens, codes_per_token)`` with values in ``[0, codebook_size)``.
    ``grid``/``has_cls_token`` optionally record the patch layout, e.g.
    ``grid=(24, 24), has_cls_token=True`` for LLaVA-1.5's 577 tokens.  With an
    ``entropy_model`` the payload is ANS-coded (lossless), otherwise bit-packed.
    """
    k = _as_int(codebook_size, "codebook_size")
    bits = bits_per_index(k)
    fingerprint = _as_fingerprint(codebook_fingerprint, "codebook_fingerprint")
    table = _validate_indices(indices, k)
    num_tokens, codes = table.shape
    grid_h, grid_w = _grid_fields(grid, has_cls_token, num_tokens)

    flags = FLAG_CLS_TOKEN if has_cls_token else 0
    if entropy_model is not None:
        if not isinstance(entropy_model, IndexDistribution):
            raise WireFormatError(
                f"entropy_model must be an IndexDistribution or None, got {type(entropy_model).__name__}"
            )
        if entropy_model.codebook_size != k:
            raise WireFormatError(
                f"codebook size mismatch: entropy model is for K={entropy_model.codebook_size}, "
                f"frame uses K={k}"
            )
        entropy_model._check_codes(codes)
        if num_tokens * codes > MAX_ENTROPY_SYMBOLS:
            raise WireFormatError(
                f"{num_tokens * codes} codes exceed the entropy-mode limit of {MAX_ENTROPY_SYMBOLS} "
                "per frame; split the frame or use raw mode"
            )
        flags |= FLAG_ENTROPY_CODED
    prompt_bytes = None
    if prompt is not None:
        prompt_bytes = _encode_prompt(prompt)
        if len(prompt_bytes) > 0xFFFFFFFF:
            raise WireFormatError("prompt is longer than 2**32 - 1 bytes")
        flags |= FLAG_PROMPT

    parts = [
        _HEADER.pack(
            MAGIC, FORMAT_VERSION, flags, bits, codes, k, num_tokens, grid_h, grid_w, fingerprint
        )
    ]
    if entropy_model is not None:
        payload = entropy_model._encode_payload(table)
        parts.append(_ENTROPY_EXTENSION.pack(entropy_model.distribution_id, len(payload)))
    else:
        payload = _pack_indices(table.reshape(-1), bits)
    parts.append(payload)
    if prompt_bytes is not None:
        parts.append(_U32.pack(len(prompt_bytes)))
        parts.append(prompt_bytes)
    body = b"".join(parts)
    return body + _U32.pack(zlib.crc32(body))


def _truncated(needed: int, got: int, what: str) -> WireFormatError:
    return WireFormatError(
        f"frame truncated: {what} needs at least {needed} bytes, got {got}; "
        "the transport cut the frame short"
    )


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    codebook_size: int | None = None,
    codebook_fingerprint: bytes | None = None,
    num_tokens: int | None = None,
    codes_per_token: int | None = None,
    entropy_model: IndexDistribution | None = None,
) -> Frame:
    """Parse and verify one frame.

    Each keyword that is not ``None`` is an expectation of the receiving model
    and is checked against the header.  ``entropy_model`` is required for
    entropy-coded frames and must be the distribution the edge used.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"frame must be bytes-like, got {type(data).__name__}")
    try:
        buf = bytes(data)
    except (TypeError, ValueError, BufferError) as exc:
        raise WireFormatError(f"frame buffer could not be read: {exc}") from None
    size = len(buf)

    if buf[: len(MAGIC)] != MAGIC[: min(size, len(MAGIC))]:
        raise WireFormatError(
            f"bad magic {buf[:4]!r}: expected {MAGIC!r}; this is not an AlignedVQ frame"
        )
    fixed = HEADER_SIZE + CRC_SIZE
    if size < fixed:
        raise _truncated(fixed, size, "the fixed header and CRC")
    (_, version, flags, bits, codes, k, tokens, grid_h, grid_w, fingerprint) = _HEADER.unpack_from(buf)

    if version != FORMAT_VERSION:
        raise WireFormatError(
            f"unsupported wire format version {version}; this decoder reads version "
            f"{FORMAT_VERSION}, update transformers-alignedvq on the older side"
        )
    if flags & ~_KNOWN_FLAGS:
        raise WireFormatError(
            f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x} set (flags 0x{flags:02x}); "
            "the frame was written by a newer encoder or is corrupt"
        )
    if k < 2:
        raise WireFormatError(f"invalid header: codebook size {k}, must be at least 2")
    if bits != (k - 1).bit_length():
        raise WireFormatError(
            f"invalid header: bits_per_index is {bits} but codebook size K={k} needs "
            f"{(k - 1).bit_length()}"
        )
    if codes == 0:
        raise WireFormatError("invalid header: codes_per_token is 0")
    if tokens == 0:
        raise WireFormatError("invalid header: num_tokens is 0")
    has_cls = bool(flags & FLAG_CLS_TOKEN)
    if (grid_h == 0) != (grid_w == 0):
        raise WireFormatError(f"invalid header: grid {grid_h}x{grid_w} has exactly one zero side")
    if grid_h == 0 and has_cls:
        raise WireFormatError("invalid header: CLS flag set without a grid")
    if grid_h and grid_h * grid_w + int(has_cls) != tokens:
        raise WireFormatError(
            f"invalid header: grid {grid_h}x{grid_w}{' + CLS' if has_cls else ''} does not "
            f"give num_tokens={tokens}"
        )

    entropy_coded = bool(flags & FLAG_ENTROPY_CODED)
    offset = HEADER_SIZE
    distribution_id = None
    if entropy_coded:
        if size < offset + ENTROPY_EXTENSION_SIZE + CRC_SIZE:
            raise _truncated(offset + ENTROPY_EXTENSION_SIZE + CRC_SIZE, size, "the entropy header")
        distribution_id, payload_len = _ENTROPY_EXTENSION.unpack_from(buf, offset)
        offset += ENTROPY_EXTENSION_SIZE
        if payload_len % 4:
            raise WireFormatError(
                f"invalid header: entropy payload length {payload_len} is not a multiple of 4"
            )
        if k > MAX_ENTROPY_CODEBOOK_SIZE:
            raise WireFormatError(
                f"invalid header: entropy-coded frame with K={k} > {MAX_ENTROPY_CODEBOOK_SIZE}"
            )
        if tokens * codes > MAX_ENTROPY_SYMBOLS:
            raise WireFormatError(
                f"invalid header: entropy-coded frame claims {tokens * codes} codes, more than "
                f"the limit of {MAX_ENTROPY_SYMBOLS}"
            )
    else:
        payload_len = (tokens * codes * bits + 7) // 8
    payload_start = offset
    offset += payload_len

    has_prompt = bool(flags & FLAG_PROMPT)
    prompt_len = 0
    if has_prompt:
        if size < offset + PROMPT_LENGTH_SIZE + CRC_SIZE:
            raise _truncated(
                offset + PROMPT_LENGTH_SIZE + CRC_SIZE, size, "the index payload and prompt length"
            )
        (prompt_len,) = _U32.unpack_from(buf, offset)
        offset += PROMPT_LENGTH_SIZE
    prompt_start = offset
    offset += prompt_len
    total = offset + CRC_SIZE
    if size < total:
        raise WireFormatError(
            f"frame truncated: expected {total} bytes, got {size}; the transport cut the frame short"
        )
    if size > total:
        raise WireFormatError(
            f"{size - total} trailing bytes after the CRC: expected exactly {total} bytes, got "
            f"{size}; send exactly one frame per message"
        )
    (stored_crc,) = _U32.unpack_from(buf, offset)
    computed_crc = zlib.crc32(memoryview(buf)[:offset])
    if stored_crc != computed_crc:
        raise WireFormatError(
            f"CRC-32 mismatch: stored 0x{stored_crc:08x}, computed 0x{computed_crc:08x}; the "
            "frame was corrupted in transit"
        )

    if codebook_fingerprint is not None:
        expected_fp = _as_fingerprint(codebook_fingerprint, "expected codebook_fingerprint")
        if expected_fp != fingerprint:
            raise WireFormatError(
                f"codebook fingerprint mismatch: frame has {fingerprint.hex()}, this model has "
                f"{expected_fp.hex()}; the edge and the cloud use different codebooks, deploy the "
                "same checkpoint on both"
            )
    if codebook_size is not None:
        expected_k = _as_int(codebook_size, "expected codebook_size")
        if expected_k != k:
            raise WireFormatError(
                f"codebook size mismatch: frame uses K={k}, this model expects K={expected_k}"
            )
    if num_tokens is not None:
        expected_tokens = _as_int(num_tokens, "expected num_tokens")
        if expected_tokens != tokens:
            raise WireFormatError(
                f"token count mismatch: frame has {tokens} tokens, this model expects "
                f"{expected_tokens} per image; check the vision tower / image resolution"
            )
    if codes_per_token is not None:
        expected_codes = _as_int(codes_per_token, "expected codes_per_token")
        if expected_codes != codes:
            raise WireFormatError(
                f"codes per token mismatch: frame has {codes}, this model expects {expected_codes}"
            )

    payload = buf[payload_start : payload_start + payload_len]
    if entropy_coded:
        if entropy_model is None:
            raise WireFormatError(
                f"frame is entropy-coded with distribution {distribution_id.hex()}; pass the "
                "matching entropy_model=IndexDistribution to decode it"
            )
        if not isinstance(entropy_model, IndexDistribution):
            raise WireFormatError(
                f"entropy_model must be an IndexDistribution, got {type(entropy_model).__name__}"
            )
        if entropy_model.codebook_size != k or entropy_model.codes_per_token != codes:
            raise WireFormatError(
                f"entropy model mismatch: model is for K={entropy_model.codebook_size} x "
                f"{entropy_model.codes_per_token} code(s), frame has K={k} x {codes}"
            )
        if entropy_model.distribution_id != distribution_id:
            raise WireFormatError(
                f"entropy distribution mismatch: frame was coded with {distribution_id.hex()}, "
                f"this side has {entropy_model.distribution_id.hex()}; edge and cloud must load "
                "the same index distribution"
            )
        table = entropy_model._decode_payload(payload, tokens)
    else:
        table = _unpack_indices(payload, tokens * codes, bits).reshape(tokens, codes)

    too_big = np.flatnonzero(table >= k)
    if too_big.size:
        token, code = divmod(int(too_big[0]), codes)
        raise WireFormatError(
            f"decoded index out of range: token {token}, code {code} is {int(table[token, code])}, "
            f"but codebook size K={k}"
        )
    table.setflags(write=False)

    prompt = None
    if has_prompt:
        try:
            prompt = buf[prompt_start : prompt_start + prompt_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireFormatError(f"prompt is not valid UTF-8: {exc}") from None

    return Frame(
        indices=table,
        codebook_size=k,
        bits_per_index=bits,
        codes_per_token=codes,
        num_tokens=tokens,
        grid=(grid_h, grid_w) if grid_h else None,
        has_cls_token=has_cls,
        prompt=prompt,
        fingerprint=fingerprint,
        entropy_coded=entropy_coded,
        distribution_id=distribution_id,
        version=version,
        flags=flags,
        payload_bytes=payload_len,
        frame_bytes=total,
    )
