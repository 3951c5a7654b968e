"""Binary wire format for AlignedVQ edge-to-cloud frames.

The edge device runs the first layers of the vision encoder, vector-quantizes each image token and sends
only the codebook indices. This module turns those indices (plus an optional question) into one
self-describing, CRC-protected byte string and back. It depends on ``numpy`` only, so it runs on small edge
devices; coded frames (coder 1) additionally need ``constriction`` and an `entropy.EntropyModel`.

Frame layout, version 2 (the layout, byte by byte, with examples: ``docs/wire-format.md``)::

    off  size  field
    0    2     magic b"AV"
    2    1     version, 2
    3    1     flags: bit 0 token 0 is a CLS token (coder 0), bit 1 grid recorded (coder 0),
                      bits 2-3 prompt: 0 none, 1 UTF-8 section, 2 coded in the payload (coder 1);
                      bit 4 geometry section (`wire_geometry`); bits 5-7 reserved, 0
    4    1     coder: 0 raw bit-packed indices, 1 context-model ANS (`entropy.EntropyModel`)
    5    8     codebook fingerprint: the first 8 bytes of `codebook_fingerprint`
    13   ...   coder 0: varints K, T, C, then grid height and width if flag bit 1
               coder 1: 4-byte id of the entropy model; K, T, C and the grid are the model's
    ...        geometry section if flag bit 4: images, tiles and grids (`wire_geometry`)
    ...        prompt section if prompt mode 1: varint L, then L bytes of UTF-8
    ...        payload: coder 0: ceil(T * C * b / 8) bytes, b = ceil(log2 K), MSB-first bit stream;
                        coder 1: every byte up to the CRC
    -4   4     CRC-32 (``zlib.crc32``, little-endian) of every preceding byte

Varints are unsigned LEB128 (7 bits per byte, low bits first, at most 5 bytes, no redundant zero bytes).
Version-1 frames (``b"AVQF"``, 36-byte header) with raw payloads still decode; version-1 entropy-coded
frames are refused with a message saying so.

Every malformed frame or invalid argument raises ``WireFormatError`` (a ``ValueError``) with a message
saying what is wrong; ``decode_frame`` raises nothing else for any byte string. Coding without
``constriction`` installed raises ``ModuleNotFoundError`` naming the package.

Encoding and decoding stay in one module, past 500 lines: they are two readings of one byte layout, which must
change together (and together with ``docs/wire-format.md``).
"""

from __future__ import annotations

import hashlib
import operator
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .entropy import MODEL_ID_SIZE, EntropyModel
from .errors import WireFormatError
from .wire_geometry import KIND_PATCHES, WireGeometry, _varint, frame_fields, read_section, tokens_per_tile

__all__ = [
    "CODER_CONTEXT_MODEL",
    "CODER_RAW",
    "CRC_SIZE",
    "FINGERPRINT_SIZE",
    "FORMAT_VERSION",
    "FRAME_MEDIA_TYPE",
    "MAGIC",
    "WIRE_FINGERPRINT_SIZE",
    "EntropyModel",
    "Frame",
    "WireFormatError",
    "WireGeometry",
    "bits_per_index",
    "codebook_fingerprint",
    "decode_frame",
    "encode_frame",
    "max_frame_bytes",
    "raw_payload_bytes",
]

MAGIC = b"AV"
# The Content-Type of a frame sent over HTTP (the client sends it, the server requires it).
FRAME_MEDIA_TYPE = "application/octet-stream"
FORMAT_VERSION = 2
CODER_RAW = 0
CODER_CONTEXT_MODEL = 1

FLAG_CLS_TOKEN = 0x01
FLAG_GRID = 0x02
PROMPT_SHIFT = 2
PROMPT_NONE, PROMPT_UTF8, PROMPT_CODED = 0, 1, 2
FLAG_GEOMETRY = 0x10
_KNOWN_FLAGS = FLAG_CLS_TOKEN | FLAG_GRID | 0x3 << PROMPT_SHIFT | FLAG_GEOMETRY

_PREFIX = struct.Struct("<2sBBB8s")  # magic, version, flags, coder, fingerprint
_U32 = struct.Struct("<I")
CRC_SIZE = _U32.size
FINGERPRINT_SIZE = 16  # what `codebook_fingerprint` returns
WIRE_FINGERPRINT_SIZE = 8  # what a version-2 frame carries: collision odds in docs/wire-format.md
MAX_VARINT_BYTES = 5

MAX_CODEBOOK_SIZE = 2**32 - 1
MAX_CODES_PER_TOKEN = 255
MAX_TOKENS = 2**32 - 1
MAX_GRID_SIDE = 2**16 - 1
# Every coded symbol keeps at least one 2**-24 quantum of constriction's fixed-point tables, so it costs at
# most 3 bytes; the coder's final state adds at most 8.
_MAX_SYMBOL_BYTES = 3
_MAX_CODER_TAIL = 8

# Version 1 (decoded only): b"AVQF", u8 version, u8 flags, u8 bits, u8 codes, u32 K, u32 T, u16 grid_h,
# u16 grid_w, 16-byte fingerprint; flags 0x01 entropy-coded, 0x02 CLS, 0x04 prompt (u32 length + UTF-8).
_V1_MAGIC = b"AVQF"
_V1_HEADER = struct.Struct("<4sBBBBIIHH16s")
_V1_FLAG_ENTROPY, _V1_FLAG_CLS, _V1_FLAG_PROMPT = 0x01, 0x02, 0x04


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


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def max_frame_bytes(*, codebook_size: int, num_tokens: int, codes_per_token: int = 1,
                    grid: tuple[int, int] | None = None, prompt_bytes: int = 0, entropy_coded: bool = False) -> int:
    """The largest valid frame for these settings and a UTF-8 prompt of ``prompt_bytes`` bytes (0: none).

    A raw frame (coder 0) with that grid and prompt is exactly this long; with ``entropy_coded`` the bound
    also covers coded frames (any payload the coder can produce, the prompt coded or UTF-8), for sizing a
    server's request limit.
    """
    k, tokens, codes = (_as_int(v, name) for v, name in ((codebook_size, "codebook_size"),
                        (num_tokens, "num_tokens"), (codes_per_token, "codes_per_token")))
    prompt = _as_int(prompt_bytes, "prompt_bytes")
    utf8 = _varint_bytes(prompt) + prompt if prompt else 0
    sides = sum(_varint_bytes(_as_int(side, "grid side")) for side in grid) if grid is not None else 0
    raw = (_PREFIX.size + _varint_bytes(k) + _varint_bytes(tokens) + _varint_bytes(codes) + sides + utf8
           + raw_payload_bytes(tokens, codebook_size=k, codes_per_token=codes) + CRC_SIZE)
    if not entropy_coded:
        return raw
    # Two symbols per token at most (rank, escaped index); a coded question at most three per byte + 1.
    symbols = 2 * tokens * codes + (3 * prompt + 1 if prompt else 0)
    coded = _PREFIX.size + MODEL_ID_SIZE + utf8 + _MAX_SYMBOL_BYTES * symbols + _MAX_CODER_TAIL + CRC_SIZE
    return max(raw, coded)


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


# --------------------------------------------------------------------------- #
# frames
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class Frame:
    """A decoded frame. ``indices`` is read-only, shape ``(num_tokens, codes_per_token)``, int64.

    ``fingerprint`` is what the frame carries (8 bytes in version 2, 16 in version 1); ``model_id`` names
    the entropy model of a coded frame (None for raw ones). ``geometry`` is the frame's images and tiles
    (`wire_geometry.WireGeometry`), None for a one-image frame without that section; with it, ``grid`` and
    ``has_cls_token`` describe one tile.
    """

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
    model_id: bytes | None
    version: int
    flags: int
    payload_bytes: int
    frame_bytes: int
    geometry: WireGeometry | None = None

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


def _patch_grids(geometry: WireGeometry | None) -> list[tuple[int, int, int]] | None:
    """The images' patch grids of a kind-2 section, which a model of patch grids codes; None otherwise."""
    if geometry is None or geometry.kind != KIND_PATCHES:
        return None
    return [image.grid_thw for image in geometry.images]


def _check_model(entropy_model: Any, k: int, num_tokens: int, codes: int, grid: Any, has_cls_token: bool,
                 grids: list | None) -> None:
    if not isinstance(entropy_model, EntropyModel):
        raise WireFormatError(
            f"entropy_model must be an EntropyModel or None, got {type(entropy_model).__name__}")
    if entropy_model.codebook_size != k:
        raise WireFormatError(f"codebook size mismatch: entropy model is for K={entropy_model.codebook_size}, "
                              f"frame uses K={k}")
    if entropy_model.patch_grids or grids is not None:  # the kinds must match; the grids are the frame's
        entropy_model.rasters(1, grids)
        if codes != entropy_model.codes_per_token:
            raise WireFormatError(f"the entropy model codes {entropy_model.codes_per_token} codes per token, the "
                                  f"indices have {codes}; send raw frames (entropy_model=None)")
        return
    if (num_tokens, codes) != (entropy_model.num_tokens, entropy_model.codes_per_token):
        raise WireFormatError(f"the entropy model codes {entropy_model.num_tokens} tokens x "
                              f"{entropy_model.codes_per_token} codes, the indices have {num_tokens} x {codes}; "
                              "send raw frames (entropy_model=None)")
    if grid is not None and (tuple(grid), has_cls_token) != (entropy_model.grid, entropy_model.has_cls_token):
        raise WireFormatError(f"grid {tuple(grid)} (CLS {has_cls_token}) differs from the entropy model's "
                              f"{entropy_model.grid} (CLS {entropy_model.has_cls_token})")


def encode_frame(
    indices: Any,
    *,
    codebook_size: int,
    codebook_fingerprint: bytes,
    prompt: str | None = None,
    entropy_model: EntropyModel | None = None,
    grid: tuple[int, int] | None = None,
    has_cls_token: bool = False,
    geometry: WireGeometry | None = None,
) -> bytes:
    """Serialise codebook indices (and a prompt) into one version-2 frame.

    ``indices``: integer array of shape ``(num_tokens,)`` or ``(num_tokens, codes_per_token)`` with values
    in ``[0, codebook_size)``. ``grid``/``has_cls_token`` optionally record the patch layout, e.g.
    ``grid=(24, 24), has_cls_token=True`` for LLaVA-1.5's 577 tokens. With an ``entropy_model`` the
    indices are coded (lossless) under it, and so is the prompt when that is shorter than its UTF-8;
    otherwise the indices are bit-packed. ``geometry`` (`wire_geometry.WireGeometry`) records the images and
    tiles of an any-resolution frame (indices of all tiles in order; ``grid``/``has_cls_token`` are then one
    tile's) or the patch grids of a variable-grid one; a coded frame codes each tile on its own, and each image
    of patch grids on its own, under a model fitted on patch grids (`EntropyModel.fit_patch_grids`).
    """
    k = _as_int(codebook_size, "codebook_size")
    bits = bits_per_index(k)
    fingerprint = _as_fingerprint(codebook_fingerprint, "codebook_fingerprint")[:WIRE_FINGERPRINT_SIZE]
    table = _validate_indices(indices, k)
    num_tokens, codes = table.shape
    section, tiles, unit_tokens = frame_fields(geometry, num_tokens, grid, has_cls_token)
    grid_h, grid_w = _grid_fields(grid, has_cls_token, unit_tokens)
    prompt_bytes = None if prompt is None else _encode_prompt(prompt)
    utf8_section = b"" if prompt_bytes is None else _varint(len(prompt_bytes)) + prompt_bytes
    prompt_mode = PROMPT_NONE if prompt is None else PROMPT_UTF8
    if entropy_model is None:
        flags = (FLAG_CLS_TOKEN if has_cls_token else 0) | (FLAG_GRID if grid_h else 0)
        fields = _varint(k) + _varint(num_tokens) + _varint(codes)
        if grid_h:
            fields += _varint(grid_h) + _varint(grid_w)
        body = fields + section + utf8_section + _pack_indices(table.reshape(-1), bits)
        coder = CODER_RAW
    else:
        grids = _patch_grids(geometry)
        _check_model(entropy_model, k, unit_tokens, codes, grid, has_cls_token, grids)
        alone, with_prompt = entropy_model.encode_payload(table, prompt, tiles=1 if grids else tiles, grids=grids)
        if with_prompt is not None and len(with_prompt) < len(alone) + len(utf8_section):
            body, prompt_mode = entropy_model.model_id + section + with_prompt, PROMPT_CODED
        else:
            body = entropy_model.model_id + section + utf8_section + alone
        flags, coder = 0, CODER_CONTEXT_MODEL
    flags |= FLAG_GEOMETRY if section else 0
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, flags | prompt_mode << PROMPT_SHIFT, coder, fingerprint)
    frame = head + body
    return frame + _U32.pack(zlib.crc32(frame))


# --------------------------------------------------------------------------- #
# decoding
# --------------------------------------------------------------------------- #


@dataclass
class _Header:
    """What a frame's header says, before its payload is decoded."""

    version: int
    flags: int
    fingerprint: bytes
    coder: int
    codebook_size: int = 0
    num_tokens: int = 0
    codes_per_token: int = 1
    grid: tuple[int, int] | None = None
    has_cls_token: bool = False
    model_id: bytes | None = None
    prompt_mode: int = PROMPT_NONE
    prompt: bytes | None = None
    payload: bytes = b""
    geometry: WireGeometry | None = None


class _Reader:
    """Reads a frame body front to back; running past the end is a truncation error."""

    def __init__(self, buf: bytes, start: int):
        self.buf, self.offset, self.end = buf, start, len(buf) - CRC_SIZE

    def take(self, count: int, what: str) -> bytes:
        if self.offset + count > self.end:
            raise _truncated(self.offset + count + CRC_SIZE, self.end + CRC_SIZE, what)
        chunk = self.buf[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def varint(self, what: str) -> int:
        value = 0
        for shift in range(0, 7 * MAX_VARINT_BYTES, 7):
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and shift:
                    raise WireFormatError(f"invalid header: {what} has a redundant zero byte")
                if value > 0xFFFFFFFF:
                    break
                return value
        raise WireFormatError(f"invalid header: {what} does not fit in 32 bits")

    def check_consumed(self) -> None:
        if self.offset != self.end:
            raise WireFormatError(
                f"{self.end - self.offset} trailing bytes after the CRC: expected exactly {self.offset + CRC_SIZE} "
                f"bytes, got {self.end + CRC_SIZE}; send exactly one frame per message"
            )


def _truncated(needed: int, got: int, what: str) -> WireFormatError:
    return WireFormatError(
        f"frame truncated: {what} needs at least {needed} bytes, got {got}; the transport cut the frame short"
    )


def _check_crc(buf: bytes) -> None:
    (stored,) = _U32.unpack_from(buf, len(buf) - CRC_SIZE)
    computed = zlib.crc32(memoryview(buf)[: len(buf) - CRC_SIZE])
    if stored != computed:
        raise WireFormatError(
            f"CRC-32 mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}; the frame was corrupted in transit"
        )


def _raw_geometry(header: _Header) -> None:
    k, tokens, codes = header.codebook_size, header.num_tokens, header.codes_per_token
    if k < 2:
        raise WireFormatError(f"invalid header: codebook size {k}, must be at least 2")
    if not 1 <= codes <= MAX_CODES_PER_TOKEN:
        raise WireFormatError(f"invalid header: codes_per_token is {codes}, must be 1..{MAX_CODES_PER_TOKEN}")
    if tokens == 0:
        raise WireFormatError("invalid header: num_tokens is 0")
    if header.geometry is not None:  # a recorded grid is then one tile's
        tokens = tokens_per_tile(header.geometry, tokens)
        if tokens is None and (header.grid is not None or header.has_cls_token):
            raise WireFormatError("invalid geometry: a frame of patch grids records no grid or CLS token")
    if header.grid is None:
        if header.has_cls_token:
            raise WireFormatError("invalid header: CLS flag set without a grid")
        return
    grid_h, grid_w = header.grid
    if not (1 <= grid_h <= MAX_GRID_SIDE and 1 <= grid_w <= MAX_GRID_SIDE):
        raise WireFormatError(f"invalid header: grid {grid_h}x{grid_w} needs sides in 1..{MAX_GRID_SIDE}")
    if grid_h * grid_w + int(header.has_cls_token) != tokens:
        raise WireFormatError(
            f"invalid header: grid {grid_h}x{grid_w}{' + CLS' if header.has_cls_token else ''} does not give "
            f"num_tokens={tokens}"
        )


def _parse_v2(buf: bytes) -> _Header:
    if len(buf) < _PREFIX.size + CRC_SIZE:
        raise _truncated(_PREFIX.size + CRC_SIZE, len(buf), "the header and CRC")
    _, version, flags, coder, fingerprint = _PREFIX.unpack_from(buf)
    if version != FORMAT_VERSION:
        raise WireFormatError(
            f"unsupported wire format version {version}; this decoder reads versions 1 and {FORMAT_VERSION}, "
            "update transformers-alignedvq on the older side"
        )
    if flags & ~_KNOWN_FLAGS:
        raise WireFormatError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x} set (flags 0x{flags:02x}); "
                              "the frame was written by a newer encoder or is corrupt")
    if coder not in (CODER_RAW, CODER_CONTEXT_MODEL):
        raise WireFormatError(f"unsupported coder {coder}: this decoder knows 0 (raw) and 1 (context model); "
                              "update transformers-alignedvq on the older side")
    header = _Header(version=version, flags=flags, fingerprint=fingerprint, coder=coder,
                     has_cls_token=bool(flags & FLAG_CLS_TOKEN), prompt_mode=flags >> PROMPT_SHIFT & 0x3)
    if header.prompt_mode == 3 or (header.prompt_mode == PROMPT_CODED and coder != CODER_CONTEXT_MODEL):
        raise WireFormatError(f"invalid header: prompt mode {header.prompt_mode} with coder {coder}")
    reader = _Reader(buf, _PREFIX.size)
    if coder == CODER_RAW:
        header.codebook_size = reader.varint("codebook size")
        header.num_tokens = reader.varint("token count")
        header.codes_per_token = reader.varint("codes per token")
        if flags & FLAG_GRID:
            header.grid = (reader.varint("grid height"), reader.varint("grid width"))
        header.geometry = read_section(reader) if flags & FLAG_GEOMETRY else None
        _raw_geometry(header)
    else:
        if flags & (FLAG_CLS_TOKEN | FLAG_GRID):
            raise WireFormatError("invalid header: grid/CLS flags set in a coded frame (the model implies them)")
        header.model_id = reader.take(MODEL_ID_SIZE, "the entropy model id")
        header.geometry = read_section(reader) if flags & FLAG_GEOMETRY else None
    if header.prompt_mode == PROMPT_UTF8:
        header.prompt = reader.take(reader.varint("prompt length"), "the prompt")
    if coder == CODER_RAW:
        size = raw_payload_bytes(header.num_tokens, codebook_size=header.codebook_size,
                                 codes_per_token=header.codes_per_token)
        header.payload = reader.take(size, "the index payload")
        reader.check_consumed()
    else:
        header.payload = reader.take(reader.end - reader.offset, "the payload")
    return header


def _parse_v1(buf: bytes) -> _Header:
    fixed = _V1_HEADER.size + CRC_SIZE
    if len(buf) < fixed:
        raise _truncated(fixed, len(buf), "the version-1 header and CRC")
    _, version, flags, bits, codes, k, tokens, grid_h, grid_w, fingerprint = _V1_HEADER.unpack_from(buf)
    if version != 1:
        raise WireFormatError(f"unsupported wire format version {version}; this decoder reads versions 1 and "
                              f"{FORMAT_VERSION}")
    if flags & _V1_FLAG_ENTROPY:
        raise WireFormatError("version-1 entropy-coded frames are not supported; this decoder reads version-1 "
                              "raw frames and version-2 frames, update transformers-alignedvq on the edge")
    if flags & ~(_V1_FLAG_CLS | _V1_FLAG_PROMPT):
        raise WireFormatError(f"unknown flag bits 0x{flags & ~0x07:02x} set (flags 0x{flags:02x})")
    if (grid_h == 0) != (grid_w == 0):
        raise WireFormatError(f"invalid header: grid {grid_h}x{grid_w} has exactly one zero side")
    header = _Header(version=1, flags=flags, fingerprint=fingerprint, coder=CODER_RAW, codebook_size=k,
                     num_tokens=tokens, codes_per_token=codes, grid=(grid_h, grid_w) if grid_h else None,
                     has_cls_token=bool(flags & _V1_FLAG_CLS))
    _raw_geometry(header)
    if bits != (k - 1).bit_length():
        raise WireFormatError(f"invalid header: bits_per_index is {bits} but codebook size K={k} needs "
                              f"{(k - 1).bit_length()}")
    reader = _Reader(buf, _V1_HEADER.size)
    header.payload = reader.take(raw_payload_bytes(tokens, codebook_size=k, codes_per_token=codes),
                                 "the index payload")
    if flags & _V1_FLAG_PROMPT:
        header.prompt_mode = PROMPT_UTF8
        header.prompt = reader.take(_U32.unpack(reader.take(4, "the prompt length"))[0], "the prompt")
    reader.check_consumed()
    return header


def _check_fingerprint(header: _Header, expected: bytes | None) -> None:
    if expected is None:
        return
    ours = _as_fingerprint(expected, "expected codebook_fingerprint")[: len(header.fingerprint)]
    if ours != header.fingerprint:
        raise WireFormatError(
            f"codebook fingerprint mismatch: frame has {header.fingerprint.hex()}, this model has {ours.hex()}; "
            "the edge and the cloud use different codebooks, deploy the same checkpoint on both"
        )


def _check_geometry(header: _Header, expected: dict[str, Any]) -> None:
    checks = (("codebook_size", header.codebook_size, "codebook size mismatch: frame uses K={}, this model "
               "expects K={}"),
              ("num_tokens", header.num_tokens, "token count mismatch: frame has {} tokens, this model expects "
               "{} per image; check the vision tower / image resolution"),
              ("codes_per_token", header.codes_per_token, "codes per token mismatch: frame has {}, this model "
               "expects {}"))
    for name, value, message in checks:
        if expected[name] is not None and _as_int(expected[name], f"expected {name}") != value:
            raise WireFormatError(message.format(value, expected[name]))


def _model_for(header: _Header, entropy_model: Any) -> EntropyModel:
    if entropy_model is None:
        raise WireFormatError(
            f"entropy model mismatch: the frame is coded with entropy model {header.model_id.hex()} and this "
            "side has none; load the checkpoint's entropy model (entropy_model=...)"
        )
    if not isinstance(entropy_model, EntropyModel):
        raise WireFormatError(f"entropy_model must be an EntropyModel, got {type(entropy_model).__name__}")
    if entropy_model.model_id != header.model_id:
        raise WireFormatError(
            f"entropy model mismatch: the frame is coded with entropy model {header.model_id.hex()}, this side "
            f"has {entropy_model.model_id.hex()}; edge and cloud must load the same entropy model"
        )
    grids = _patch_grids(header.geometry)
    if grids is not None or entropy_model.patch_grids:
        # The same model id with the other kind of frame: the frame contradicts its model (an encoder refuses it).
        try:
            entropy_model.rasters(1, grids)
        except WireFormatError as exc:
            raise WireFormatError(f"invalid geometry: {str(exc).removeprefix('entropy model mismatch: ')}") from None
    header.codebook_size, header.codes_per_token = entropy_model.codebook_size, entropy_model.codes_per_token
    if grids is not None:
        header.num_tokens = sum(image.tokens for image in header.geometry.images)
        return entropy_model
    tiles = 1 if header.geometry is None else header.geometry.num_tiles
    header.num_tokens = entropy_model.num_tokens * tiles
    header.grid, header.has_cls_token = entropy_model.grid, entropy_model.has_cls_token
    return entropy_model


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    codebook_size: int | None = None,
    codebook_fingerprint: bytes | None = None,
    num_tokens: int | None = None,
    codes_per_token: int | None = None,
    entropy_model: EntropyModel | None = None,
    max_prompt_bytes: int | None = None,
    check_geometry: Callable[..., None] | None = None,
) -> Frame:
    """Parse and verify one frame (version 2, or a raw version-1 frame).

    Each keyword that is not ``None`` is an expectation of the receiving model and is checked against the
    header. ``entropy_model`` is required for coded frames and must be the one the edge used.
    ``max_prompt_bytes`` refuses a longer prompt (UTF-8 bytes) before decoding it, and stops a coded one as
    soon as it exceeds that. ``check_geometry(geometry=, num_tokens=, grid=, has_cls_token=)`` is called with
    the header's layout before the payload is decoded (a server refuses images its model cannot take there). The work done is bounded by the frame's length (raw) or by the entropy model and
    ``max_prompt_bytes`` (coded), whatever the header claims.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"frame must be bytes-like, got {type(data).__name__}")
    try:
        buf = bytes(data)
    except (TypeError, ValueError, BufferError) as exc:
        raise WireFormatError(f"frame buffer could not be read: {exc}") from None
    version_1 = buf[2:3] == _V1_MAGIC[2:3]  # a version-2 frame has its version byte there
    magic = _V1_MAGIC if version_1 else MAGIC
    if buf[: len(magic)] != magic[: len(buf)]:
        raise WireFormatError(f"bad magic {buf[:4]!r}: expected {MAGIC!r}; this is not an AlignedVQ frame")
    header = _parse_v1(buf) if version_1 else _parse_v2(buf)
    _check_crc(buf)
    _check_fingerprint(header, codebook_fingerprint)
    model = _model_for(header, entropy_model) if header.coder == CODER_CONTEXT_MODEL else None
    _check_geometry(header, {"codebook_size": codebook_size, "num_tokens": num_tokens,
                             "codes_per_token": codes_per_token})
    if check_geometry is not None:
        check_geometry(geometry=header.geometry, num_tokens=header.num_tokens, grid=header.grid,
                       has_cls_token=header.has_cls_token)
    bits = (header.codebook_size - 1).bit_length()
    prompt_bytes = header.prompt
    if max_prompt_bytes is not None and prompt_bytes is not None and len(prompt_bytes) > max_prompt_bytes:
        raise WireFormatError(f"prompt too long: {len(prompt_bytes)} bytes, this side takes at most "
                              f"{max_prompt_bytes}")
    if model is None:
        table = _unpack_indices(header.payload, header.num_tokens * header.codes_per_token, bits)
        table = table.reshape(header.num_tokens, header.codes_per_token)
    else:
        limit = {} if max_prompt_bytes is None else {"max_question_bytes": max_prompt_bytes}
        grids = _patch_grids(header.geometry)
        tiles = 1 if header.geometry is None or grids else header.geometry.num_tiles
        tokens, coded_prompt = model.decode_payload(header.payload, with_question=header.prompt_mode == PROMPT_CODED,
                                                    tiles=tiles, grids=grids, **limit)
        table = tokens.reshape(len(tokens), -1)
        if coded_prompt is not None:
            prompt_bytes = coded_prompt.encode("utf-8")
    too_big = np.flatnonzero(table >= header.codebook_size)
    if too_big.size:
        token, code = divmod(int(too_big[0]), header.codes_per_token)
        raise WireFormatError(f"decoded index out of range: token {token}, code {code} is "
                              f"{int(table[token, code])}, but codebook size K={header.codebook_size}")
    table.setflags(write=False)
    try:
        prompt = None if prompt_bytes is None else prompt_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"prompt is not valid UTF-8: {exc}") from None
    return Frame(
        indices=table, codebook_size=header.codebook_size, bits_per_index=bits,
        codes_per_token=header.codes_per_token, num_tokens=header.num_tokens, grid=header.grid,
        has_cls_token=header.has_cls_token, prompt=prompt, fingerprint=header.fingerprint,
        entropy_coded=model is not None, model_id=header.model_id, version=header.version, flags=header.flags,
        payload_bytes=len(header.payload), frame_bytes=len(buf), geometry=header.geometry,
    )
