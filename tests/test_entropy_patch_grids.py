"""Coded frames of patch grids (Qwen2.5-VL): an entropy model fitted on images of varying grids codes each image's
``(t, h, w)`` grid in raster order, its size taken from the frame's geometry section; a model of the other kind, a
damaged payload or an oversized frame is refused with a `WireFormatError`, never sent raw in its place."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from wire_data import QUESTIONS, small_model

from transformers_alignedvq import wire
from transformers_alignedvq.entropy import MAX_CODED_PATCHES, EntropyModel, load_entropy_model
from transformers_alignedvq.entropy_symbols import index_symbols, raster_symbols
from transformers_alignedvq.wire_geometry import WireGeometry

pytest.importorskip("constriction")
FP = wire.codebook_fingerprint(np.arange(12.0).reshape(3, 4))
K = 64
TRAIN_GRIDS = [(1, 4, 6), (1, 8, 8), (1, 2, 12), (1, 6, 4), (1, 10, 6)]


def blocky(grid, seed: int) -> np.ndarray:
    """Indices of one image of patch grid ``(t, h, w)``, raster order: a flat background with a flat rectangle."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(grid[0]):
        h, w = grid[1:]
        image = np.full((h, w), rng.integers(K))
        top, left = rng.integers(0, h), rng.integers(0, w)
        image[top : top + rng.integers(1, h + 1), left : left + rng.integers(1, w + 1)] = rng.integers(K)
        frames.append(image.ravel())
    return np.concatenate(frames)


def patch_model(**kwargs) -> EntropyModel:
    images = [(blocky(grid, seed), grid) for seed, grid in enumerate(TRAIN_GRIDS * 30)]
    return EntropyModel.fit_patch_grids(images, codebook_size=K, questions=QUESTIONS, **kwargs)


MODEL = patch_model()


def coded(indices, grids, model=MODEL, prompt=None) -> bytes:
    return wire.encode_frame(indices, codebook_size=K, codebook_fingerprint=FP, geometry=WireGeometry.patch_grids(grids),
                             entropy_model=model, prompt=prompt)


def test_model_of_patch_grids_has_no_grid_of_its_own(tmp_path):
    assert MODEL.patch_grids and MODEL.grid is None and MODEL.num_tokens is None and not MODEL.has_cls_token
    assert "patch grids" in repr(MODEL) and not small_model().patch_grids
    assert MODEL.to_arrays()["geometry"].tolist() == [K, 0, 0, 0]
    assert load_entropy_model(MODEL.save(tmp_path).parent).model_id == MODEL.model_id
    # The tables are the same whatever the grid: one pass over each image's raster, as a fixed-grid model counts it.
    grid = (1, 6, 6)
    fixed = EntropyModel.fit(np.stack([blocky(grid, s) for s in range(20)]), codebook_size=K, grid=(6, 6),
                             has_cls_token=False)
    same = EntropyModel.fit_patch_grids([(blocky(grid, s), grid) for s in range(20)], codebook_size=K)
    for name in ("rank_probabilities", "escape_probabilities"):
        np.testing.assert_array_equal(fixed.to_arrays()[name], same.to_arrays()[name])


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 32, 32), (1, 54, 74), (1, 2, 194), (1, 1, 1), (2, 6, 8), (1, 97, 3)])
def test_round_trip_for_several_grids(grid):
    indices = blocky(grid, seed=sum(grid))
    for prompt in (None, "what color is the shape?", "¿qué forma?"):
        frame = wire.decode_frame(coded(indices, [grid], prompt=prompt), entropy_model=MODEL, codebook_size=K,
                                  codebook_fingerprint=FP)
        assert frame.entropy_coded and frame.geometry == WireGeometry.patch_grids([grid])
        assert frame.num_tokens == indices.size and frame.grid is None and not frame.has_cls_token
        assert frame.prompt == prompt
        np.testing.assert_array_equal(frame.indices[:, 0], indices)


def test_one_frame_with_two_images_of_different_grids():
    grids = [(1, 8, 8), (1, 4, 12)]
    first, second = blocky(grids[0], 1), blocky(grids[1], 2)
    indices = np.concatenate([first, second])
    data = coded(indices, grids, prompt="what shape is in the image?")
    frame = wire.decode_frame(data, entropy_model=MODEL)
    np.testing.assert_array_equal(frame.indices[:, 0], indices)
    assert frame.geometry.images[1].grid_thw == (1, 4, 12) and frame.prompt == "what shape is in the image?"
    # Each image is coded on its own: its symbols are those it has alone (no neighbour across images).
    rasters = MODEL.rasters(1, grids)
    assert rasters == [(8, 8, False), (4, 12, False)]
    assert raster_symbols(indices.tolist(), rasters) == (index_symbols(first.tolist(), 8, 8, False)
                                                           + index_symbols(second.tolist(), 4, 12, False))
    raw = wire.encode_frame(indices, codebook_size=K, codebook_fingerprint=FP, geometry=WireGeometry.patch_grids(grids))
    assert len(coded(indices, grids)) < len(raw) / 2


def test_several_codes_per_token():
    grids = [(1, 6, 8), (1, 4, 4)]
    images = [(np.stack([blocky(g, s), (blocky(g, s) * 7 + 3) % K], -1), g) for s, g in enumerate(grids * 10)]
    model = EntropyModel.fit_patch_grids(images, codebook_size=K)
    assert model.codes_per_token == 2
    indices = np.concatenate([images[0][0], images[1][0]])
    frame = wire.decode_frame(coded(indices, grids, model=model), entropy_model=model)
    np.testing.assert_array_equal(frame.indices, indices)
    with pytest.raises(wire.WireFormatError, match="codes 2 codes per token, the indices have 1"):
        coded(indices[:, 0], grids, model=model)


def test_a_model_of_the_other_kind_is_refused_on_both_ends():
    fixed = small_model()  # 6x6 + CLS
    grid = (1, 6, 6)
    with pytest.raises(wire.WireFormatError, match="entropy model mismatch: the model codes a fixed 6x6 grid"):
        coded(blocky(grid, 0), [grid], model=fixed)
    with pytest.raises(wire.WireFormatError, match="entropy model mismatch: the model codes patch grids, the frame "
                                                   "carries none"):
        wire.encode_frame(blocky(grid, 0), codebook_size=K, codebook_fingerprint=FP, grid=(6, 6), entropy_model=MODEL)
    with pytest.raises(wire.WireFormatError, match="entropy model mismatch: the model codes patch grids"):
        wire.encode_frame(np.zeros(2 * 36, int), codebook_size=K, codebook_fingerprint=FP, grid=(6, 6),
                          geometry=WireGeometry.tiled([(8, 8)], (2,), ((1, 1),)), entropy_model=MODEL)
    with pytest.raises(wire.WireFormatError, match="codebook size mismatch: entropy model is for K=64, frame uses "
                                                   "K=128"):
        wire.encode_frame(blocky(grid, 0), codebook_size=128, codebook_fingerprint=FP,
                          geometry=WireGeometry.patch_grids([grid]), entropy_model=MODEL)
    # The decoder: another model (by id), and a frame whose geometry contradicts the kind of the model it names.
    data = coded(blocky(grid, 0), [grid])
    with pytest.raises(wire.WireFormatError, match="entropy model mismatch: the frame is coded with entropy model"):
        wire.decode_frame(data, entropy_model=fixed)
    with pytest.raises(wire.WireFormatError, match="entropy model mismatch"):
        wire.decode_frame(data)
    with pytest.raises(wire.WireFormatError, match="codebook size mismatch"):
        wire.decode_frame(data, entropy_model=MODEL, codebook_size=128)
    tiled = _with_section(data, bytes([1, 1, 8, 8, 1, 0, 0]))
    with pytest.raises(wire.WireFormatError, match="invalid geometry: the model codes patch grids, the frame carries "
                                                   "none"):
        wire.decode_frame(tiled, entropy_model=MODEL)


def _with_section(data: bytes, section: bytes) -> bytes:
    """``data`` (a coded frame of one 6x6 patch grid) with another geometry section, the CRC made valid."""
    body = data[:-4]
    old = bytes([2, 1, 1, 6, 6])
    start = 13 + 4
    assert body[start : start + len(old)] == old
    body = body[:start] + section + body[start + len(old) :]
    return body + struct.pack("<I", zlib.crc32(body))


def test_damaged_payloads_are_typed_errors():
    grid = (1, 8, 8)
    indices = blocky(grid, 3)
    data = coded(indices, [grid], prompt="what color is the shape?")
    for cut in range(len(data)):  # every truncation
        with pytest.raises(wire.WireFormatError):
            wire.decode_frame(data[:cut], entropy_model=MODEL)
    body = data[:-4]
    for cut in range(17 + 5, len(body)):  # the payload cut short, the CRC made valid again
        short = body[:cut] + struct.pack("<I", zlib.crc32(body[:cut]))
        try:
            frame = wire.decode_frame(short, entropy_model=MODEL)
        except wire.WireFormatError as exc:
            assert "corrupt" in str(exc) or "unread data" in str(exc) or "prompt" in str(exc)
        else:  # dropping a trailing zero byte of the last word decodes the same frame
            np.testing.assert_array_equal(frame.indices[:, 0], indices)
    rng = np.random.default_rng(0)
    for position in range(17 + 5, len(body)):  # every payload byte changed
        changed = bytearray(body)
        changed[position] ^= int(rng.integers(1, 256))
        try:
            wire.decode_frame(bytes(changed) + struct.pack("<I", zlib.crc32(bytes(changed))), entropy_model=MODEL)
        except wire.WireFormatError:
            pass
    flipped = bytearray(data)
    flipped[-6] ^= 0x40
    with pytest.raises(wire.WireFormatError, match="CRC-32 mismatch"):
        wire.decode_frame(bytes(flipped), entropy_model=MODEL)


def test_the_decoders_work_is_bounded_before_any_data_is_read():
    side = 1 + int(np.sqrt(MAX_CODED_PATCHES))
    with pytest.raises(wire.WireFormatError, match=f"too many patches to code: {side * side} in one frame"):
        coded(np.zeros(side * side, int), [(1, side, side)])
    # A forged header claiming more patches than that: refused at once, whatever the (tiny) payload.
    data = coded(np.zeros(36, int), [(1, 6, 6)])
    forged = _with_section(data, bytes([2, 1, 1]) + bytes([0x81, 0x04]) * 2)  # (1, 513, 513)
    with pytest.raises(wire.WireFormatError, match="invalid geometry: too many patches to code"):
        wire.decode_frame(forged, entropy_model=MODEL)


def test_check_geometry_runs_before_the_payload():
    seen = []

    def check(**header):
        seen.append(header)
        raise wire.WireFormatError("geometry mismatch: refused")

    data = coded(blocky((1, 6, 8), 0), [(1, 6, 8)])
    with pytest.raises(wire.WireFormatError, match="geometry mismatch: refused"):
        wire.decode_frame(_with_payload_damaged(data), entropy_model=MODEL, check_geometry=check)
    assert seen[0]["num_tokens"] == 48 and seen[0]["grid"] is None and seen[0]["geometry"].images[0].tokens == 48


def _with_payload_damaged(data: bytes) -> bytes:
    body = bytearray(data[:-4])
    body[-2] ^= 0xFF
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_fit_rejects_bad_input():
    with pytest.raises(wire.WireFormatError, match=r"image 0: indices must be integers of shape \(24"):
        EntropyModel.fit_patch_grids([(np.zeros(23, int), (1, 4, 6))], codebook_size=K)
    with pytest.raises(wire.WireFormatError, match="image 1: .*the same for every image"):
        EntropyModel.fit_patch_grids([(np.zeros(4, int), (1, 2, 2)), (np.zeros((4, 2), int), (1, 2, 2))],
                                     codebook_size=K)
    with pytest.raises(wire.WireFormatError, match=r"image 0: indices must be in \[0, 64\)"):
        EntropyModel.fit_patch_grids([(np.full(4, K), (1, 2, 2))], codebook_size=K)
    with pytest.raises(wire.WireFormatError, match="positive ints"):
        EntropyModel.fit_patch_grids([(np.zeros(4, int), (0, 2, 2))], codebook_size=K)
    with pytest.raises(wire.WireFormatError, match="at least one image"):
        EntropyModel.fit_patch_grids([], codebook_size=K)
    with pytest.raises(wire.WireFormatError, match="smoothing"):
        EntropyModel.fit_patch_grids([(np.zeros(4, int), (1, 2, 2))], codebook_size=K, smoothing=-1)
