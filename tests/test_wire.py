"""Tests for the AlignedVQ wire format (numpy only; coded frames also need constriction)."""

from __future__ import annotations

import hashlib
import struct
import sys
import timeit
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.wire_data import QUESTIONS, blocky_images, small_model
from transformers_alignedvq import wire
from transformers_alignedvq.entropy import EntropyModel
from transformers_alignedvq.wire import (
    Frame,
    WireFormatError,
    bits_per_index,
    codebook_fingerprint,
    decode_frame,
    encode_frame,
    max_frame_bytes,
    raw_payload_bytes,
)

FP = codebook_fingerprint(np.arange(4096 * 8, dtype=np.float32).reshape(4096, 8))
OTHER_FP = codebook_fingerprint(np.ones((4096, 8), dtype=np.float32))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def recrc(frame: bytes) -> bytes:
    """Replace the trailing CRC so a deliberately edited frame passes the CRC check."""
    body = frame[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def llava_indices(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, size=577)


def llava_frame(**kwargs) -> bytes:
    return encode_frame(
        llava_indices(), codebook_size=4096, codebook_fingerprint=FP, grid=(24, 24),
        has_cls_token=True, **kwargs,
    )


def coded_frame(model: EntropyModel, indices: np.ndarray, **kwargs) -> bytes:
    return encode_frame(indices, codebook_size=model.codebook_size, codebook_fingerprint=FP, entropy_model=model,
                        **kwargs)


def decodes_or_wire_error(data: bytes, **kwargs) -> Frame | None:
    """The fuzzing contract: a Frame or WireFormatError, never any other exception."""
    try:
        return decode_frame(data, **kwargs)
    except WireFormatError:
        return None


def v1_frame(indices: np.ndarray, *, k: int, flags: int = 0, grid=(0, 0), prompt: bytes | None = None,
             payload: bytes | None = None) -> bytes:
    """A version-1 frame built from its documented layout (36-byte header, u32 fields)."""
    table = indices.reshape(len(indices), -1)
    body = (b"AVQF" + bytes([1, flags | (0x04 if prompt is not None else 0), (k - 1).bit_length(), table.shape[1]])
            + struct.pack("<IIHH", k, table.shape[0], *grid) + FP
            + (payload if payload is not None else wire._pack_indices(table.reshape(-1), (k - 1).bit_length())))
    if prompt is not None:
        body += struct.pack("<I", len(prompt)) + prompt
    return body + struct.pack("<I", zlib.crc32(body))


# --------------------------------------------------------------------------- #
# layout and sizes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "k, bits", [(2, 1), (3, 2), (4, 2), (5, 3), (4096, 12), (4097, 13), (2**16, 16), (2**32 - 1, 32)]
)
def test_bits_per_index(k, bits):
    assert bits_per_index(k) == bits


@pytest.mark.parametrize("k", [0, 1, 2**32, -5])
def test_bits_per_index_rejects_bad_sizes(k):
    with pytest.raises(WireFormatError, match="codebook_size"):
        bits_per_index(k)


def test_llava_frame_size_and_fields():
    frame = llava_frame()
    assert raw_payload_bytes(577, codebook_size=4096) == 866  # 577 * 12 bits = 6924 bits
    # 13 fixed bytes, varints K (2 bytes), T (2), C (1), grid 24 x 24 (1 + 1), payload, CRC
    assert len(frame) == 13 + 2 + 2 + 1 + 2 + 866 + 4 == 890
    assert max_frame_bytes(codebook_size=4096, num_tokens=577, grid=(24, 24)) == 890
    assert len(llava_frame(prompt="é" * 100)) == 890 + 2 + 200 == max_frame_bytes(
        codebook_size=4096, num_tokens=577, grid=(24, 24), prompt_bytes=200)
    decoded = decode_frame(frame, codebook_size=4096, codebook_fingerprint=FP, num_tokens=577)
    assert decoded.grid == (24, 24) and decoded.has_cls_token and decoded.version == 2
    assert decoded.num_tokens == 577 and decoded.codes_per_token == 1
    assert decoded.bits_per_index == 12 and decoded.codebook_size == 4096
    assert decoded.payload_bytes == 866 and decoded.frame_bytes == 890 and decoded.overhead_bytes == 24
    assert decoded.fingerprint == FP[:8] and decoded.prompt is None and not decoded.entropy_coded
    assert decoded.model_id is None
    assert decoded.indices.shape == (577, 1) and decoded.indices.dtype == np.int64
    assert not decoded.indices.flags.writeable
    np.testing.assert_array_equal(decoded.indices[:, 0], llava_indices())


def test_golden_layout_built_independently():
    # Rebuild a small frame by hand from the documented layout, not from the module's constants, so a
    # silent layout change fails here.
    indices = np.array([[0xABC, 0x123], [0xFFF, 0x000]])
    prompt = "hi é"
    body = (
        b"AV"
        + bytes([2, 0x01 | 0x02 | 1 << 2, 0])  # version, flags (CLS, grid, prompt mode 1 = UTF-8), coder 0
        + FP[:8]
        + bytes([0x80, 0x20, 2, 2, 1, 1])  # varints K = 4096, T = 2, C = 2, grid 1 x 1
        + bytes([len(prompt.encode())]) + prompt.encode()
        + bytes.fromhex("abc123fff000")  # MSB-first 12-bit stream, row-major
    )
    expected = body + zlib.crc32(body).to_bytes(4, "little")
    frame = encode_frame(
        indices, codebook_size=4096, codebook_fingerprint=FP, prompt=prompt, grid=(1, 1), has_cls_token=True,
    )
    assert frame == expected


def test_bit_packing_padding_and_odd_widths():
    frame = encode_frame(np.array([1, 0, 1]), codebook_size=2, codebook_fingerprint=FP)
    assert frame[16:17] == bytes([0b1010_0000])  # 13 + varints K, T, C
    frame = encode_frame(np.array([4, 3]), codebook_size=5, codebook_fingerprint=FP)
    assert frame[16:17] == bytes([0b100_011_00])


def test_version_1_raw_frames_still_decode():
    indices = np.array([0xABC, 0x123, 0xFFF])
    frame = v1_frame(indices, k=4096, flags=0x02, grid=(1, 2), prompt="hé".encode())
    decoded = decode_frame(frame, codebook_size=4096, codebook_fingerprint=FP, num_tokens=3)
    np.testing.assert_array_equal(decoded.indices[:, 0], indices)
    assert (decoded.version, decoded.prompt, decoded.grid, decoded.has_cls_token) == (1, "hé", (1, 2), True)
    assert decoded.fingerprint == FP and len(frame) == 36 + 5 + 4 + 3 + 4
    with pytest.raises(WireFormatError, match="fingerprint mismatch"):
        decode_frame(frame, codebook_fingerprint=OTHER_FP)
    with pytest.raises(WireFormatError, match="trailing bytes"):
        decode_frame(recrc(frame[:-4] + b"x" + frame[-4:]))


def test_version_1_entropy_frames_are_refused_clearly():
    frame = v1_frame(np.array([1, 2]), k=4096, flags=0x01, payload=bytes(4))
    with pytest.raises(WireFormatError, match="version-1 entropy-coded frames are not supported"):
        decode_frame(frame)


def test_varints_are_canonical_and_32_bit():
    body = b"AV\x02\x00\x00" + FP[:8]
    overlong = body + bytes([0x84, 0x00, 1, 1]) + bytes(1)  # K = 4 written in two bytes
    with pytest.raises(WireFormatError, match="redundant zero byte"):
        decode_frame(recrc(overlong + bytes(4)))
    huge = body + bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 1, 1]) + bytes(1)
    with pytest.raises(WireFormatError, match="32 bits"):
        decode_frame(recrc(huge + bytes(4)))


def test_fingerprint_definition_and_inputs():
    codebook = np.random.default_rng(1).standard_normal((16, 4))
    manual = hashlib.sha256(
        struct.pack("<2I", 16, 4) + codebook.astype("<f4").tobytes()
    ).digest()[:16]
    assert codebook_fingerprint(codebook) == manual  # float64 is rounded to float32 first
    assert codebook_fingerprint(codebook.astype(np.float32)) == manual
    assert codebook_fingerprint(np.asfortranarray(codebook)) == manual
    assert codebook_fingerprint(codebook.tolist()) == manual
    assert codebook_fingerprint(codebook.T) != manual
    assert codebook_fingerprint(codebook.reshape(8, 8)) != manual

    class TensorLike:  # stands in for framework tensors exposing .numpy()
        def numpy(self):
            return codebook

    assert codebook_fingerprint(TensorLike()) == manual
    changed = codebook.copy()
    changed[3, 2] += 1e-3
    assert codebook_fingerprint(changed) != manual
    with pytest.raises(WireFormatError, match="numeric"):
        codebook_fingerprint(np.array(["a", "b"]))


def test_accepts_bytes_like_and_rejects_other_types():
    frame = llava_frame()
    for data in (bytearray(frame), memoryview(frame)):
        assert decode_frame(data).num_tokens == 577
    with pytest.raises(WireFormatError, match="bytes-like"):
        decode_frame(frame.hex())


def test_pack_is_fast_enough_for_the_edge():
    indices = np.random.default_rng(0).integers(0, 4096, size=577)
    per_call = min(timeit.repeat(lambda: wire._pack_indices(indices, 12), number=20, repeat=5)) / 20
    assert per_call < 1e-3, f"packing 577 x 12 bits took {per_call * 1e6:.0f} us"


def test_large_frames_cross_pack_chunks():
    rng = np.random.default_rng(3)
    for k, shape in ((3, (wire._PACK_CHUNK + 13, 2)), (2**32 - 1, (wire._PACK_CHUNK + 5, 1))):
        indices = rng.integers(0, k, size=shape, dtype=np.uint64)
        frame = encode_frame(indices, codebook_size=k, codebook_fingerprint=FP)
        np.testing.assert_array_equal(decode_frame(frame).indices, indices.astype(np.int64))


# --------------------------------------------------------------------------- #
# property-based round trips
# --------------------------------------------------------------------------- #


def _random_indices(data, k: int, max_tokens: int, max_codes: int) -> np.ndarray:
    tokens = data.draw(st.integers(1, max_tokens), label="tokens")
    codes = data.draw(st.integers(1, max_codes), label="codes")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    indices = np.random.default_rng(seed).integers(0, k, size=(tokens, codes))
    # Make sure the extreme values, which exercise every bit, appear.
    indices.flat[0] = k - 1
    if indices.size > 1:
        indices.flat[-1] = 0
    if data.draw(st.booleans(), label="one_dim") and codes == 1:
        return indices[:, 0]
    return indices


@settings(max_examples=120, deadline=None)
@given(
    k=st.one_of(st.integers(2, 2**16), st.sampled_from([2, 3, 4096, 4097, 2**16])),
    prompt=st.none() | st.text(max_size=40),
    data=st.data(),
)
def test_raw_round_trip(k, prompt, data):
    indices = _random_indices(data, k, max_tokens=700, max_codes=4)
    frame = encode_frame(indices, codebook_size=k, codebook_fingerprint=FP, prompt=prompt)
    table = indices.reshape(indices.shape[0], -1)
    payload = raw_payload_bytes(table.shape[0], codebook_size=k, codes_per_token=table.shape[1])
    assert payload == (table.size * bits_per_index(k) + 7) // 8
    prompt_bytes = len(prompt.encode()) if prompt is not None else 0
    assert len(frame) == max_frame_bytes(codebook_size=k, num_tokens=table.shape[0], codes_per_token=table.shape[1],
                                         prompt_bytes=prompt_bytes) + (prompt == "")
    decoded = decode_frame(
        frame, codebook_size=k, codebook_fingerprint=FP, num_tokens=table.shape[0],
        codes_per_token=table.shape[1],
    )
    np.testing.assert_array_equal(decoded.indices, table)
    assert decoded.indices.dtype == np.int64
    assert decoded.prompt == prompt and decoded.grid is None and not decoded.has_cls_token


@settings(max_examples=60, deadline=None)
@given(prompt=st.none() | st.text(max_size=30) | st.sampled_from(QUESTIONS), structured=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_coded_round_trip(prompt, structured, seed):
    pytest.importorskip("constriction")
    model = MODEL
    # Images like the training ones (the case the model compresses) or uniform noise (the case it does not).
    indices = (blocky_images(1, seed=seed)[0] if structured
               else np.random.default_rng(seed).integers(0, 64, size=37))
    frame = coded_frame(model, indices, prompt=prompt, grid=(6, 6), has_cls_token=True)
    decoded = decode_frame(frame, codebook_fingerprint=FP, codebook_size=64, num_tokens=37, entropy_model=model)
    np.testing.assert_array_equal(decoded.indices[:, 0], indices)
    assert decoded.entropy_coded and decoded.model_id == model.model_id and decoded.prompt == prompt
    assert (decoded.grid, decoded.has_cls_token, decoded.version) == ((6, 6), True, 2)
    assert len(frame) <= max_frame_bytes(codebook_size=64, num_tokens=37, entropy_coded=True,
                                         prompt_bytes=len(prompt.encode()) if prompt else 0)
    # The question travels coded only where that is shorter than its UTF-8 section.
    utf8 = 0 if prompt is None else len(prompt.encode()) + len(wire._varint(len(prompt.encode())))
    alone = len(coded_frame(model, indices))
    assert len(frame) <= alone + utf8


def test_coded_frames_compress_structured_indices():
    pytest.importorskip("constriction")
    images = blocky_images(50, seed=99)
    raw = [len(encode_frame(image, codebook_size=64, codebook_fingerprint=FP)) for image in images]
    coded = [len(coded_frame(MODEL, image)) for image in images]
    assert np.mean(coded) < 0.6 * np.mean(raw), (np.mean(coded), np.mean(raw))
    asked = coded_frame(MODEL, images[0], prompt="what color is the shape?")
    assert len(asked) <= len(coded_frame(MODEL, images[0])) + 2  # a training question costs about a byte
    assert decode_frame(asked, entropy_model=MODEL).flags >> wire.PROMPT_SHIFT == wire.PROMPT_CODED


def test_coded_frame_layout():
    pytest.importorskip("constriction")
    frame = coded_frame(MODEL, blocky_images(1)[0], prompt="ünseen ☃")
    assert frame[:5] == b"AV\x02" + bytes([1 << 2, 1])  # UTF-8 prompt (shorter than coding it), coder 1
    assert frame[5:13] == FP[:8] and frame[13:17] == MODEL.model_id
    assert frame[17] == len("ünseen ☃".encode()) and frame[18:18 + frame[17]] == "ünseen ☃".encode()


def test_prompt_is_bounded_by_the_receiver_raw_and_coded():
    pytest.importorskip("constriction")
    image, question = blocky_images(1)[0], "what color is the shape?"
    size = len(question.encode())
    raw = encode_frame(image, codebook_size=64, codebook_fingerprint=FP, prompt=question)
    coded = coded_frame(MODEL, image, prompt=question)
    assert decode_frame(coded, entropy_model=MODEL).flags >> wire.PROMPT_SHIFT == wire.PROMPT_CODED
    for frame in (raw, coded):
        assert decode_frame(frame, entropy_model=MODEL, max_prompt_bytes=size).prompt == question
        with pytest.raises(WireFormatError, match="prompt too long"):
            decode_frame(frame, entropy_model=MODEL, max_prompt_bytes=size - 1)


def test_coded_frame_with_an_empty_payload_is_refused_as_corrupt():
    pytest.importorskip("constriction")
    frame = coded_frame(MODEL, blocky_images(1)[0], prompt="what color is the shape?")
    head = frame[:17]  # prefix + model id: a 21-byte frame once its CRC is on
    empty = head + struct.pack("<I", zlib.crc32(head))
    assert len(empty) == 21
    with pytest.raises(WireFormatError, match="data ended before the last symbol"):
        decode_frame(empty, entropy_model=MODEL)


# --------------------------------------------------------------------------- #
# entropy-model errors
# --------------------------------------------------------------------------- #


def test_coded_frame_needs_the_same_model():
    pytest.importorskip("constriction")
    frame = coded_frame(MODEL, blocky_images(1)[0], prompt="q")
    with pytest.raises(WireFormatError, match="entropy model mismatch.*has none") as info:
        decode_frame(frame)
    assert MODEL.model_id.hex() in str(info.value)
    other = small_model(seed=1)
    with pytest.raises(WireFormatError, match="entropy model mismatch") as info:
        decode_frame(frame, entropy_model=other)
    assert MODEL.model_id.hex() in str(info.value) and other.model_id.hex() in str(info.value)
    with pytest.raises(WireFormatError, match="codebook size mismatch"):
        encode_frame(blocky_images(1)[0], codebook_size=65, codebook_fingerprint=FP, entropy_model=MODEL)
    with pytest.raises(WireFormatError, match="37 tokens x 1 codes"):
        coded_frame(MODEL, np.zeros((37, 2), int))
    with pytest.raises(WireFormatError, match="differs from the entropy model"):
        coded_frame(MODEL, np.zeros(37, int), grid=(4, 9), has_cls_token=True)
    with pytest.raises(WireFormatError, match="EntropyModel"):
        encode_frame(np.zeros(37, int), codebook_size=64, codebook_fingerprint=FP, entropy_model={"p": 1})


def test_missing_constriction_is_a_clear_error_and_raw_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "constriction", None)  # makes `import constriction` fail
    model = EntropyModel(MODEL_ARRAYS)  # a fresh one: no cached constriction tables
    indices = blocky_images(1)[0]
    with pytest.raises(ModuleNotFoundError, match="pip install transformers-alignedvq\\[entropy\\]"):
        encode_frame(indices, codebook_size=64, codebook_fingerprint=FP, entropy_model=model)
    frame = encode_frame(indices, codebook_size=64, codebook_fingerprint=FP)
    np.testing.assert_array_equal(decode_frame(frame, entropy_model=model).indices[:, 0], indices)


# --------------------------------------------------------------------------- #
# named error cases
# --------------------------------------------------------------------------- #


def test_truncated_frame_reports_sizes():
    frame = llava_frame()
    with pytest.raises(WireFormatError, match=r"truncated.*index payload needs at least 890 bytes, got 889"):
        decode_frame(frame[:-1])
    with pytest.raises(WireFormatError, match=r"truncated.*17 bytes, got 10"):
        decode_frame(frame[:10])
    with pytest.raises(WireFormatError, match="truncated"):
        decode_frame(b"")
    with_prompt = llava_frame(prompt="describe the image")
    with pytest.raises(WireFormatError, match="truncated"):
        decode_frame(with_prompt[: 20 + 5])


def test_bad_magic():
    with pytest.raises(WireFormatError, match="bad magic.*not an AlignedVQ frame"):
        decode_frame(b"\x89PNG" + bytes(100))
    with pytest.raises(WireFormatError, match="bad magic"):
        decode_frame(b"AX")
    with pytest.raises(WireFormatError, match="bad magic"):
        decode_frame(b"AVQX" + bytes(40))


def test_unknown_version_flags_coder_and_prompt_mode():
    frame = llava_frame()
    for offset, value, words in ((2, 3, "unsupported wire format version 3"), (3, 0x83, "unknown flag bits 0x80"),
                                 (4, 7, "unsupported coder 7"), (3, 0x03 | 2 << 2, "prompt mode 2 with coder 0"),
                                 (3, 0x03 | 3 << 2, "prompt mode 3")):
        edited = bytearray(frame)
        edited[offset] = value
        with pytest.raises(WireFormatError, match=words):
            decode_frame(recrc(bytes(edited)))


def test_fingerprint_mismatch_names_both_and_explains():
    with pytest.raises(WireFormatError) as info:
        decode_frame(llava_frame(), codebook_fingerprint=OTHER_FP)
    message = str(info.value)
    assert "fingerprint mismatch" in message and "different codebooks" in message
    assert FP[:8].hex() in message and OTHER_FP[:8].hex() in message
    with pytest.raises(WireFormatError, match="16 bytes"):
        decode_frame(llava_frame(), codebook_fingerprint=b"short")


def test_crc_mismatch():
    frame = bytearray(llava_frame())
    frame[100] ^= 0x01
    with pytest.raises(WireFormatError, match="CRC-32 mismatch.*corrupted"):
        decode_frame(bytes(frame))


def test_trailing_bytes():
    with pytest.raises(WireFormatError, match="3 trailing bytes.*expected exactly 890"):
        decode_frame(recrc(llava_frame()[:-4] + b"abc" + bytes(4)))


def test_codebook_size_and_token_count_mismatch():
    frame = llava_frame()
    with pytest.raises(WireFormatError, match="codebook size mismatch.*K=4096.*K=8192"):
        decode_frame(frame, codebook_size=8192)
    with pytest.raises(WireFormatError, match="token count mismatch.*577.*576"):
        decode_frame(frame, num_tokens=576)
    with pytest.raises(WireFormatError, match="codes per token mismatch"):
        decode_frame(frame, codes_per_token=2)


def test_decoded_index_out_of_range():
    # K=5 needs 3 bits, so 5, 6 and 7 are representable but invalid.
    frame = bytearray(encode_frame(np.array([0, 1]), codebook_size=5, codebook_fingerprint=FP))
    frame[16] = 0b000_111_00
    with pytest.raises(WireFormatError, match=r"decoded index out of range: token 1, code 0 is 7.*K=5"):
        decode_frame(recrc(bytes(frame)))


def test_nonzero_padding_bits():
    frame = bytearray(encode_frame(np.array([0, 1]), codebook_size=5, codebook_fingerprint=FP))
    frame[16] |= 0b1
    with pytest.raises(WireFormatError, match="padding"):
        decode_frame(recrc(bytes(frame)))


def test_invalid_utf8_prompt():
    frame = bytearray(llava_frame(prompt="ab"))
    frame[21] = 0xFF  # first prompt byte, after 20 header bytes and the length
    with pytest.raises(WireFormatError, match="not valid UTF-8"):
        decode_frame(recrc(bytes(frame)))


@pytest.mark.parametrize(
    "offset, value, words",
    [
        (17, 0, "codes_per_token is 0"),
        (13, 1, "codebook size 1"),
        (18, 23, "grid 23x24"),
        (3, 0x01, "CLS flag set without a grid"),
    ],
)
def test_inconsistent_header_fields(offset, value, words):
    frame = bytearray(llava_frame())
    frame[offset] = value
    if offset == 13:  # K = 1 in one varint byte: drop its second byte
        del frame[14]
    if offset == 3:  # no grid: drop the two grid bytes
        del frame[18:20]
    with pytest.raises(WireFormatError, match=words):
        decode_frame(recrc(bytes(frame)))


def test_encode_out_of_range_names_position_value_and_k():
    indices = np.zeros((10, 2), dtype=np.int64)
    indices[7, 1] = 4096
    with pytest.raises(WireFormatError, match=r"out of range: token 7, code 1 is 4096.*K=4096"):
        encode_frame(indices, codebook_size=4096, codebook_fingerprint=FP)
    indices[7, 1] = 0
    indices[3, 0] = -2
    with pytest.raises(WireFormatError, match=r"out of range: token 3, code 0 is -2"):
        encode_frame(indices, codebook_size=4096, codebook_fingerprint=FP)


@pytest.mark.parametrize(
    "indices, words",
    [
        (np.zeros(4, dtype=np.float32), "integer dtype"),
        (np.zeros(4, dtype=bool), "integer dtype"),
        (np.zeros((2, 2, 2), dtype=np.int64), "shape"),
        (np.zeros((0,), dtype=np.int64), "tokens"),
        (np.zeros((3, 256), dtype=np.int64), "codes_per_token"),
        (["a", "b"], "integer dtype"),
    ],
)
def test_encode_rejects_bad_indices(indices, words):
    with pytest.raises(WireFormatError, match=words):
        encode_frame(indices, codebook_size=4096, codebook_fingerprint=FP)


def test_encode_rejects_bad_options():
    idx = llava_indices()
    with pytest.raises(WireFormatError, match="codebook_fingerprint"):
        encode_frame(idx, codebook_size=4096, codebook_fingerprint=FP.hex())
    with pytest.raises(WireFormatError, match="codebook_size"):
        encode_frame(idx, codebook_size=4096.0, codebook_fingerprint=FP)
    with pytest.raises(WireFormatError, match="token count does not match the grid"):
        encode_frame(idx, codebook_size=4096, codebook_fingerprint=FP, grid=(24, 24))
    with pytest.raises(WireFormatError, match="needs a grid"):
        encode_frame(idx, codebook_size=4096, codebook_fingerprint=FP, has_cls_token=True)
    with pytest.raises(WireFormatError, match="prompt must be a str"):
        encode_frame(idx, codebook_size=4096, codebook_fingerprint=FP, prompt=b"bytes")
    with pytest.raises(WireFormatError, match="UTF-8"):
        encode_frame(idx, codebook_size=4096, codebook_fingerprint=FP, prompt="\ud800")


# --------------------------------------------------------------------------- #
# fuzzing: decode_frame raises WireFormatError and nothing else
# --------------------------------------------------------------------------- #


def _valid_frames() -> list[tuple[bytes, dict]]:
    frames = [
        (llava_frame(), {}),
        (llava_frame(prompt="What is in the picture? ☃"), {}),
        (encode_frame(np.array([[0, 1, 2], [2, 1, 0]]), codebook_size=3, codebook_fingerprint=FP), {}),
        (v1_frame(np.array([5, 6, 7]), k=4096, prompt=b"q"), {}),
    ]
    try:
        import constriction  # noqa: F401
    except ImportError:
        return frames
    image = blocky_images(1, seed=3)[0]
    frames += [(coded_frame(MODEL, image, prompt=prompt), {"entropy_model": MODEL})
               for prompt in ("what color is the shape?", "a question it has never seen ☃", None)]
    return frames


MODEL = small_model()
MODEL_ARRAYS = MODEL.to_arrays()
VALID_FRAMES = _valid_frames()


@FUZZ
@given(data=st.binary(max_size=2000))
def test_fuzz_random_bytes(data):
    decodes_or_wire_error(data)
    # Also past the magic check, where most of the parsing happens, in each version and coder.
    decodes_or_wire_error(b"AVQF\x01" + data)
    decodes_or_wire_error(b"AV\x02" + data)
    result = decodes_or_wire_error(recrc(b"AV\x02" + data[:1] + b"\x01" + FP[:8] + MODEL.model_id + data[1:]
                                         + bytes(4)), entropy_model=MODEL)
    if result is not None:
        assert result.indices.shape == (37, 1) and np.all(result.indices < 64)


@FUZZ
@given(which=st.integers(0, len(VALID_FRAMES) - 1), data=st.data())
def test_fuzz_mutations_detected(which, data):
    frame, kwargs = VALID_FRAMES[which]
    original = decode_frame(frame, **kwargs)
    mutated = bytearray(frame)
    kind = data.draw(st.sampled_from(["flip", "bytes", "truncate", "extend"]), label="kind")
    if kind == "flip":
        position = data.draw(st.integers(0, len(frame) - 1), label="position")
        mutated[position] = data.draw(st.integers(0, 255), label="value")
    elif kind == "bytes":
        for _ in range(data.draw(st.integers(2, 8), label="count")):
            position = data.draw(st.integers(0, len(frame) - 1), label="position")
            mutated[position] = data.draw(st.integers(0, 255), label="value")
    elif kind == "truncate":
        del mutated[data.draw(st.integers(0, len(frame) - 1), label="length"):]
    else:
        mutated += data.draw(st.binary(min_size=1, max_size=16), label="tail")
    result = decodes_or_wire_error(bytes(mutated), **kwargs)
    if bytes(mutated) == frame:
        assert result is not None
    if result is not None:
        # Only a no-op may decode: CRC-32 catches every burst of <= 32 bits and
        # misses scattered errors with probability 2**-32; length changes never parse.
        assert bytes(mutated) == frame
        np.testing.assert_array_equal(result.indices, original.indices)
        assert result.prompt == original.prompt


@FUZZ
@given(which=st.integers(0, len(VALID_FRAMES) - 1), data=st.data())
def test_fuzz_mutations_with_valid_crc(which, data):
    # Re-signing the CRC reaches the header, payload, prompt and entropy
    # decoders with hostile values; they must still only raise WireFormatError.
    frame, kwargs = VALID_FRAMES[which]
    mutated = bytearray(frame[:-4])
    for _ in range(data.draw(st.integers(1, 4), label="count")):
        position = data.draw(st.integers(0, len(mutated) - 1), label="position")
        mutated[position] = data.draw(st.integers(0, 255), label="value")
    if data.draw(st.booleans(), label="resize"):
        cut = data.draw(st.integers(0, len(mutated)), label="cut")
        mutated = mutated[:cut] + data.draw(st.binary(max_size=8), label="insert") + mutated[cut:]
    candidate = recrc(bytes(mutated) + b"\0\0\0\0")
    assume(candidate != frame)
    result = decodes_or_wire_error(candidate, **kwargs)
    if result is not None:
        assert isinstance(result, Frame)
        assert np.all(result.indices < result.codebook_size) and np.all(result.indices >= 0)
        assert result.indices.shape == (result.num_tokens, result.codes_per_token)
