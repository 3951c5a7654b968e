"""Tests for the AlignedVQ wire format (numpy only; no torch needed)."""

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

from transformers_alignedvq import wire
from transformers_alignedvq.wire import (
    Frame,
    IndexDistribution,
    WireFormatError,
    bits_per_index,
    codebook_fingerprint,
    decode_frame,
    encode_frame,
    frame_overhead_bytes,
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


def skewed_distribution(k: int, codes: int, seed: int = 0) -> IndexDistribution:
    rng = np.random.default_rng(seed)
    counts = rng.zipf(1.5, size=(codes, k)).astype(np.float64)
    return IndexDistribution.from_counts(counts, smoothing=0.5)


def decodes_or_wire_error(data: bytes, **kwargs) -> Frame | None:
    """The fuzzing contract: a Frame or WireFormatError, never any other exception."""
    try:
        return decode_frame(data, **kwargs)
    except WireFormatError:
        return None


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
    assert frame_overhead_bytes() == wire.HEADER_SIZE + wire.CRC_SIZE == 40
    assert len(frame) == 36 + 866 + 4 == 906
    decoded = decode_frame(frame, codebook_size=4096, codebook_fingerprint=FP, num_tokens=577)
    assert decoded.grid == (24, 24) and decoded.has_cls_token
    assert decoded.num_tokens == 577 and decoded.codes_per_token == 1
    assert decoded.bits_per_index == 12 and decoded.codebook_size == 4096
    assert decoded.payload_bytes == 866 and decoded.frame_bytes == 906 and decoded.overhead_bytes == 40
    assert decoded.fingerprint == FP and decoded.prompt is None and not decoded.entropy_coded
    assert decoded.indices.shape == (577, 1) and decoded.indices.dtype == np.int64
    assert not decoded.indices.flags.writeable
    np.testing.assert_array_equal(decoded.indices[:, 0], llava_indices())


def test_golden_layout_built_independently():
    # Rebuild a small frame by hand from the documented layout, not from the
    # module's struct formats, so a silent layout change fails here.
    indices = np.array([[0xABC, 0x123], [0xFFF, 0x000]])
    prompt = "hi é"
    body = (
        b"AVQF"
        + bytes([1, wire.FLAG_PROMPT | wire.FLAG_CLS_TOKEN, 12, 2])
        + (4096).to_bytes(4, "little")
        + (2).to_bytes(4, "little")
        + (1).to_bytes(2, "little")
        + (1).to_bytes(2, "little")
        + FP
        + bytes.fromhex("abc123fff000")  # MSB-first 12-bit stream, row-major
        + len(prompt.encode()).to_bytes(4, "little")
        + prompt.encode()
    )
    expected = body + zlib.crc32(body).to_bytes(4, "little")
    frame = encode_frame(
        indices, codebook_size=4096, codebook_fingerprint=FP, prompt=prompt, grid=(1, 1),
        has_cls_token=True,
    )
    assert frame == expected


def test_bit_packing_padding_and_odd_widths():
    frame = encode_frame(np.array([1, 0, 1]), codebook_size=2, codebook_fingerprint=FP)
    assert frame[36:37] == bytes([0b1010_0000])
    frame = encode_frame(np.array([4, 3]), codebook_size=5, codebook_fingerprint=FP)
    assert frame[36:37] == bytes([0b100_011_00])


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
    assert len(frame) == frame_overhead_bytes(prompt=prompt) + payload
    decoded = decode_frame(
        frame, codebook_size=k, codebook_fingerprint=FP, num_tokens=table.shape[0],
        codes_per_token=table.shape[1],
    )
    np.testing.assert_array_equal(decoded.indices, table)
    assert decoded.indices.dtype == np.int64
    assert decoded.prompt == prompt and decoded.grid is None and not decoded.has_cls_token


@settings(max_examples=60, deadline=None)
@given(
    k=st.one_of(st.integers(2, 2**16), st.sampled_from([2, 4096])),
    prompt=st.none() | st.text(max_size=20),
    skewed=st.booleans(),
    data=st.data(),
)
def test_entropy_round_trip(k, prompt, skewed, data):
    pytest.importorskip("constriction", reason="entropy mode needs `pip install constriction`")
    codes = data.draw(st.integers(1, 3), label="codes")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    model = skewed_distribution(k, codes, seed) if skewed else IndexDistribution.from_counts(
        rng.integers(0, 50, size=(codes, k)), smoothing=1.0
    )
    tokens = data.draw(st.integers(1, 600), label="tokens")
    # Draw from the model (the case it compresses) or uniformly (the case it does not).
    if data.draw(st.booleans(), label="from_model"):
        probs = model.probabilities / model.probabilities.sum(axis=1, keepdims=True)
        indices = np.stack([rng.choice(k, size=tokens, p=row) for row in probs], axis=1)
    else:
        indices = rng.integers(0, k, size=(tokens, codes))
    frame = encode_frame(
        indices, codebook_size=k, codebook_fingerprint=FP, prompt=prompt, entropy_model=model
    )
    decoded = decode_frame(frame, codebook_fingerprint=FP, codebook_size=k, entropy_model=model)
    np.testing.assert_array_equal(decoded.indices, indices)
    assert decoded.entropy_coded and decoded.distribution_id == model.distribution_id
    assert decoded.prompt == prompt
    assert len(frame) == frame_overhead_bytes(prompt=prompt, entropy_coded=True) + decoded.payload_bytes


def test_entropy_mode_compresses_skewed_indices():
    pytest.importorskip("constriction", reason="entropy mode needs `pip install constriction`")
    rng = np.random.default_rng(7)
    training = rng.zipf(1.3, size=200_000) % 4096
    model = IndexDistribution.from_indices(training, codebook_size=4096)
    indices = rng.zipf(1.3, size=577) % 4096
    frame = encode_frame(indices, codebook_size=4096, codebook_fingerprint=FP, entropy_model=model)
    decoded = decode_frame(frame, entropy_model=model)
    np.testing.assert_array_equal(decoded.indices[:, 0], indices)
    assert decoded.payload_bytes < 866
    assert decoded.payload_bytes <= model.ideal_bits(indices) / 8 + 8


# --------------------------------------------------------------------------- #
# IndexDistribution
# --------------------------------------------------------------------------- #


def test_distribution_smoothing_and_serialisation():
    counts = np.zeros((2, 8))
    counts[0, 3] = 100
    model = IndexDistribution.from_counts(counts, smoothing=0.1)
    assert np.all(model.probabilities > 0)
    np.testing.assert_allclose(model.probabilities.sum(axis=1), 1.0)
    assert (model.codes_per_token, model.codebook_size) == (2, 8)
    assert len(model.distribution_id) == wire.DISTRIBUTION_ID_SIZE

    arrays = model.to_arrays(prefix="alignedvq.wire.")
    assert set(arrays) == {"alignedvq.wire.probabilities"}
    restored = IndexDistribution.from_arrays(arrays, prefix="alignedvq.wire.")
    assert restored.distribution_id == model.distribution_id
    assert IndexDistribution.from_arrays(model.to_arrays()).distribution_id == model.distribution_id
    assert IndexDistribution.from_counts(counts, smoothing=0.2).distribution_id != model.distribution_id
    with pytest.raises(WireFormatError, match="key"):
        IndexDistribution.from_arrays({}, prefix="x.")


def test_distribution_safetensors_round_trip(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    model = skewed_distribution(4096, 2)
    path = tmp_path / "dist.safetensors"
    safetensors_numpy.save_file(model.to_arrays(prefix="wire."), str(path))
    restored = IndexDistribution.from_arrays(safetensors_numpy.load_file(str(path)), prefix="wire.")
    assert restored.distribution_id == model.distribution_id


@pytest.mark.parametrize(
    "table, words",
    [
        (np.array([[0.5, 0.0, 0.5]]), "strictly positive"),
        (np.array([[0.5, np.nan, 0.5]]), "finite"),
        (np.ones((2, 2, 2)), "shape"),
        (np.ones((1, 1)), "codebook sizes"),
        (np.ones((256, 4)), "code positions"),
    ],
)
def test_distribution_rejects_bad_tables(table, words):
    with pytest.raises(WireFormatError, match=words):
        IndexDistribution(table)


def test_distribution_rejects_zero_smoothing():
    with pytest.raises(WireFormatError, match="smoothing"):
        IndexDistribution.from_counts(np.ones((1, 4)), smoothing=0)


# --------------------------------------------------------------------------- #
# entropy-mode errors
# --------------------------------------------------------------------------- #


def test_entropy_frame_needs_the_same_distribution():
    pytest.importorskip("constriction", reason="entropy mode needs `pip install constriction`")
    model = skewed_distribution(4096, 1, seed=1)
    frame = encode_frame(llava_indices(), codebook_size=4096, codebook_fingerprint=FP, entropy_model=model)
    with pytest.raises(WireFormatError, match="entropy-coded.*entropy_model"):
        decode_frame(frame)
    other = skewed_distribution(4096, 1, seed=2)
    with pytest.raises(WireFormatError, match="distribution mismatch") as info:
        decode_frame(frame, entropy_model=other)
    assert model.distribution_id.hex() in str(info.value)
    assert other.distribution_id.hex() in str(info.value)
    with pytest.raises(WireFormatError, match="entropy model mismatch"):
        decode_frame(frame, entropy_model=skewed_distribution(4096, 2))
    with pytest.raises(WireFormatError, match="codebook size mismatch"):
        encode_frame(llava_indices(), codebook_size=4097, codebook_fingerprint=FP, entropy_model=model)
    with pytest.raises(WireFormatError, match="code position"):
        encode_frame(np.zeros((5, 2), int), codebook_size=4096, codebook_fingerprint=FP, entropy_model=model)


def test_missing_constriction_is_a_clear_error_and_raw_still_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "constriction", None)  # makes `import constriction` fail
    model = skewed_distribution(16, 1)
    indices = np.arange(16)
    with pytest.raises(ModuleNotFoundError, match="pip install constriction"):
        encode_frame(indices, codebook_size=16, codebook_fingerprint=FP, entropy_model=model)
    frame = encode_frame(indices, codebook_size=16, codebook_fingerprint=FP)
    np.testing.assert_array_equal(decode_frame(frame, entropy_model=model).indices[:, 0], indices)


# --------------------------------------------------------------------------- #
# named error cases
# --------------------------------------------------------------------------- #


def test_truncated_frame_reports_sizes():
    frame = llava_frame()
    with pytest.raises(WireFormatError, match=r"truncated.*expected 906 bytes, got 905"):
        decode_frame(frame[:-1])
    with pytest.raises(WireFormatError, match=r"truncated.*40 bytes, got 10"):
        decode_frame(frame[:10])
    with pytest.raises(WireFormatError, match="truncated"):
        decode_frame(b"")
    with_prompt = llava_frame(prompt="describe the image")
    with pytest.raises(WireFormatError, match="truncated"):
        decode_frame(with_prompt[: 36 + 866 + 2])


def test_bad_magic():
    with pytest.raises(WireFormatError, match="bad magic.*not an AlignedVQ frame"):
        decode_frame(b"\x89PNG" + bytes(100))
    with pytest.raises(WireFormatError, match="bad magic"):
        decode_frame(b"AX")


def test_unknown_version():
    frame = bytearray(llava_frame())
    frame[4] = 2
    with pytest.raises(WireFormatError, match="unsupported wire format version 2"):
        decode_frame(recrc(bytes(frame)))


def test_unknown_flags():
    frame = bytearray(llava_frame())
    frame[5] |= 0x80
    with pytest.raises(WireFormatError, match="unknown flag bits 0x80"):
        decode_frame(recrc(bytes(frame)))


def test_fingerprint_mismatch_names_both_and_explains():
    with pytest.raises(WireFormatError) as info:
        decode_frame(llava_frame(), codebook_fingerprint=OTHER_FP)
    message = str(info.value)
    assert "fingerprint mismatch" in message and "different codebooks" in message
    assert FP.hex() in message and OTHER_FP.hex() in message
    with pytest.raises(WireFormatError, match="16 bytes"):
        decode_frame(llava_frame(), codebook_fingerprint=b"short")


def test_crc_mismatch():
    frame = bytearray(llava_frame())
    frame[100] ^= 0x01
    with pytest.raises(WireFormatError, match="CRC-32 mismatch.*corrupted"):
        decode_frame(bytes(frame))


def test_trailing_bytes():
    with pytest.raises(WireFormatError, match="3 trailing bytes.*expected exactly 906"):
        decode_frame(llava_frame() + b"abc")


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
    frame[36] = 0b000_111_00
    with pytest.raises(WireFormatError, match=r"decoded index out of range: token 1, code 0 is 7.*K=5"):
        decode_frame(recrc(bytes(frame)))


def test_nonzero_padding_bits():
    frame = bytearray(encode_frame(np.array([0, 1]), codebook_size=5, codebook_fingerprint=FP))
    frame[36] |= 0b1
    with pytest.raises(WireFormatError, match="padding"):
        decode_frame(recrc(bytes(frame)))


def test_invalid_utf8_prompt():
    frame = bytearray(llava_frame(prompt="ab"))
    frame[-5] = 0xFF  # last prompt byte
    with pytest.raises(WireFormatError, match="not valid UTF-8"):
        decode_frame(recrc(bytes(frame)))


@pytest.mark.parametrize(
    "offset, value, words",
    [
        (6, 11, "bits_per_index is 11"),
        (7, 0, "codes_per_token is 0"),
        (8, 1, "codebook size 1"),
        (16, 23, "grid 23x24"),
    ],
)
def test_inconsistent_header_fields(offset, value, words):
    frame = bytearray(llava_frame())
    frame[offset] = value
    if offset == 8:
        frame[9] = 0
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
    with pytest.raises(WireFormatError, match="IndexDistribution"):
        encode_frame(idx, codebook_size=4096, codebook_fingerprint=FP, entropy_model={"p": 1})


# --------------------------------------------------------------------------- #
# fuzzing: decode_frame raises WireFormatError and nothing else
# --------------------------------------------------------------------------- #


def _valid_frames() -> list[tuple[bytes, dict]]:
    frames = [
        (llava_frame(), {}),
        (llava_frame(prompt="What is in the picture? ☃"), {}),
        (encode_frame(np.array([[0, 1, 2], [2, 1, 0]]), codebook_size=3, codebook_fingerprint=FP), {}),
    ]
    try:
        import constriction  # noqa: F401
    except ImportError:
        return frames
    model = skewed_distribution(4096, 1, seed=5)
    frames.append(
        (
            encode_frame(
                llava_indices(), codebook_size=4096, codebook_fingerprint=FP, entropy_model=model,
                prompt="q",
            ),
            {"entropy_model": model},
        )
    )
    return frames


VALID_FRAMES = _valid_frames()


@FUZZ
@given(data=st.binary(max_size=2000))
def test_fuzz_random_bytes(data):
    decodes_or_wire_error(data)
    # Also past the magic check, where most of the parsing happens.
    decodes_or_wire_error(b"AVQF\x01" + data)


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
