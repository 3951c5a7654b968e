"""Follow-up questions about an image the cloud already holds: a few bytes instead of the image's frame.

After answering a frame, the server keeps its decoded indices for a while (`image_cache`) under the image's
digest, which both sides compute from the indices alone (`image_digest`). A follow-up names that digest and
carries only the question (numpy and the standard library; coding the question needs an `EntropyModel`)::

    off  size  field
    0    1     kind: b"q" the question is coded under the entropy model, b"Q" it is UTF-8 (a frame starts
               with b"A")
    1    8     image digest
    9    ...   the question: UTF-8, or `EntropyModel.encode_question`
    -4   4     CRC-32 (``zlib.crc32``, little-endian) of the entropy model's 4-byte id (coded questions only)
               followed by every preceding byte

The entropy model's id is in the CRC but not on the wire: a question coded under another model fails the CRC
check instead of decoding to another question. With the bundled model a follow-up is 13 bytes plus the coded
question (a few bytes for questions like the training ones). A server that no longer holds the image answers 409
``image_not_cached``; the client then sends the whole frame again.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .entropy import EntropyModel
from .errors import WireFormatError

CODED, UTF8 = b"q", b"Q"
DIGEST_SIZE = 8
_HEAD = struct.Struct("<1s8s")
_CRC = struct.Struct("<I")


def image_digest(indices, fingerprint: bytes, layout=None) -> bytes:
    """The 8-byte digest of an image's indices ``(tokens[, codes_per_token])`` under the codebook with
    ``fingerprint``: what a follow-up names the image by. An image whose indices alone do not say how to read
    them is bound to its ``layout`` (`wire_geometry`'s ``layout`` of the image: a tiled image's ``(height,
    width)``, as two sizes can share a tiling and indices but not their un-padding; a patch grid ``(t, h, w)``,
    as one patch count has several grids); None for a fixed-size image."""
    table = np.asarray(indices)
    if table.ndim == 1:
        table = table[:, None]
    body = np.ascontiguousarray(table, dtype="<u4").tobytes()
    digest = hashlib.sha256(b"alignedvq-image\0" + bytes(fingerprint)[:8] + struct.pack("<II", *table.shape) + body
                            ).digest()[:DIGEST_SIZE]
    if layout is None:
        return digest
    layout = tuple(int(v) for v in layout)
    return hashlib.sha256(b"alignedvq-tiled-image\0" + digest + struct.pack(f"<{len(layout)}I", *layout)
                          ).digest()[:DIGEST_SIZE]


def is_followup(data: bytes) -> bool:
    return bytes(data[:1]) in (CODED, UTF8)


def _crc(entropy_model: EntropyModel | None, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(entropy_model.model_id) if entropy_model is not None else 0)


def encode_followup(digest: bytes, question: str, *, entropy_model: EntropyModel | None = None) -> bytes:
    """A follow-up asking ``question`` about the image with ``digest``; coded when ``entropy_model`` is given
    and that is shorter than its UTF-8."""
    if len(digest) != DIGEST_SIZE:
        raise WireFormatError(f"an image digest has {DIGEST_SIZE} bytes, got {len(digest)}")
    if not isinstance(question, str) or not question:
        raise WireFormatError("a follow-up needs a non-empty question")
    text = question.encode("utf-8")
    coded = entropy_model.encode_question(question) if entropy_model is not None and len(text) <= 4096 else None
    is_coded = coded is not None and len(coded) < len(text)
    body = _HEAD.pack(CODED if is_coded else UTF8, bytes(digest)) + (coded if is_coded else text)
    return body + _CRC.pack(_crc(entropy_model if is_coded else None, body))


@dataclass(frozen=True)
class Followup:
    digest: bytes
    question: str
    coded: bool


def decode_followup(data: bytes, *, entropy_model: EntropyModel | None = None,
                    max_prompt_bytes: int = 4096) -> Followup:
    """Parse and check a follow-up; `WireFormatError` (a ``ValueError``) for anything malformed."""
    data = bytes(data)
    if len(data) < _HEAD.size + _CRC.size:
        raise WireFormatError(f"follow-up truncated: needs at least {_HEAD.size + _CRC.size} bytes, got {len(data)}")
    kind, digest = _HEAD.unpack_from(data)
    if kind not in (CODED, UTF8):
        raise WireFormatError(f"not a follow-up: it starts with {kind!r}, not {CODED!r} or {UTF8!r}")
    body, (stored,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    coded = kind == CODED
    if coded and entropy_model is None:
        raise WireFormatError("entropy model mismatch: the follow-up's question is coded and this side has no "
                              "entropy model")
    if _crc(entropy_model if coded else None, body) != stored:
        raise WireFormatError("CRC-32 mismatch: the follow-up was corrupted in transit"
                              + (", or its question was coded under another entropy model" if coded else ""))
    payload = body[_HEAD.size:]
    if coded:
        question = entropy_model.decode_question(payload, max_question_bytes=max_prompt_bytes)
    else:
        if len(payload) > max_prompt_bytes:
            raise WireFormatError(f"prompt too long: {len(payload)} bytes, this side takes at most {max_prompt_bytes}")
        try:
            question = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireFormatError(f"prompt is not valid UTF-8: {exc}") from None
    return Followup(digest=digest, question=question, coded=coded)


__all__ = ["DIGEST_SIZE", "Followup", "decode_followup", "encode_followup", "image_digest", "is_followup"]
