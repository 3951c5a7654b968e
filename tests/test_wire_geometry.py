"""Frames with geometry (`wire_geometry`): tiles and grids per image, coded tile by tile, bad layouts refused by
name; frames without the section unchanged, byte for byte."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
from wire_data import blocky_images, small_model

from transformers_alignedvq import wire
from transformers_alignedvq.entropy_symbols import index_symbols
from transformers_alignedvq.wire_geometry import (
    MAX_FRAME_TILES,
    PatchGridImage,
    TiledImage,
    WireGeometry,
    max_section_bytes,
)

FP = wire.codebook_fingerprint(np.arange(12.0).reshape(3, 4))
# A landscape photo (2x2 grid + base view) and a square one (1x1 + base), 16 tokens (4x4 patches) per tile.
TWO_IMAGES = WireGeometry.tiled([(20, 30), (16, 16)], (5, 2), ((2, 2), (1, 1)))


def _varints(*values: int) -> bytes:
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _raw_frame(section: bytes, *, k: int = 16, tokens: int, payload: bytes | None = None, grid=None) -> bytes:
    """A raw frame built by hand from the documented layout, with a valid CRC (geometry flag 0x10)."""
    flags = 0x10 | (0x02 if grid else 0)
    head = struct.pack("<2sBBB8s", b"AV", 2, flags, 0, FP[:8]) + _varints(k, tokens, 1)
    head += _varints(*grid) if grid else b""
    body = head + section + (payload if payload is not None else bytes((tokens * 4 + 7) // 8))
    return body + struct.pack("<I", zlib.crc32(body))


def test_frames_without_geometry_are_byte_identical_to_before():
    """Digests of a LLaVA-1.5 raw frame and a coded frame written by the encoder before geometry existed."""
    rng = np.random.default_rng(7)
    raw = wire.encode_frame(rng.integers(0, 4096, 577), codebook_size=4096, codebook_fingerprint=FP, grid=(24, 24),
                            has_cls_token=True, prompt="What is shown?")
    coded = wire.encode_frame(blocky_images(1, seed=3)[0], codebook_size=64, codebook_fingerprint=FP, grid=(6, 6),
                              has_cls_token=True, prompt="what color is the shape?", entropy_model=small_model())
    assert (len(raw), hashlib.sha256(raw).hexdigest()[:32]) == (905, "5f36918c2ee382e01c82ce5138be76ab")
    assert (len(coded), hashlib.sha256(coded).hexdigest()[:32]) == (28, "c4eb2ab256b02acd858a94ee67a497d6")
    for data, model in ((raw, None), (coded, small_model())):
        frame = wire.decode_frame(data, codebook_fingerprint=FP, entropy_model=model)
        assert frame.geometry is None and frame.flags & 0x10 == 0


@pytest.mark.parametrize("grid", [None, (4, 4)])
def test_raw_tiled_round_trip(grid):
    indices = np.random.default_rng(0).integers(0, 16, (7 * 16, 2))
    data = wire.encode_frame(indices, codebook_size=16, codebook_fingerprint=FP, grid=grid, geometry=TWO_IMAGES,
                             prompt="what?")
    frame = wire.decode_frame(data, codebook_size=16, codebook_fingerprint=FP, num_tokens=112, codes_per_token=2)
    assert frame.geometry == TWO_IMAGES and frame.grid == grid and frame.prompt == "what?"
    np.testing.assert_array_equal(frame.indices, indices)
    assert frame.geometry.image_sizes == [(20, 30), (16, 16)] and frame.geometry.tiles_per_image == (5, 2)
    assert frame.geometry.tile_grids == ((2, 2), (1, 1)) and frame.geometry.num_tiles == 7
    # The section costs its varints: kind, count, then 5 per image (here one byte each).
    plain = wire.encode_frame(indices, codebook_size=16, codebook_fingerprint=FP, grid=None, prompt="what?")
    assert len(data) - len(plain) == 2 + 2 * 5 + (2 if grid else 0)


def test_tiles_with_a_cls_token_and_base_view_only_images():
    """LLaVA-NeXT's tiles carry CLS (4x4 + 1); a OneVision multi-image prompt sends base views only (0x0 grid)."""
    geometry = WireGeometry.tiled([(336, 336), (10, 700)], (1, 1), ((0, 0), (0, 0)))
    indices = np.arange(2 * 17) % 16
    data = wire.encode_frame(indices, codebook_size=16, codebook_fingerprint=FP, grid=(4, 4), has_cls_token=True,
                             geometry=geometry)
    frame = wire.decode_frame(data)
    assert frame.geometry == geometry and frame.has_cls_token and frame.grid == (4, 4)
    with pytest.raises(wire.WireFormatError, match=r"token count does not match the grid: 4x4 \+ 1 CLS = 17"):
        wire.encode_frame(indices[:32], codebook_size=16, codebook_fingerprint=FP, grid=(4, 4), has_cls_token=True,
                          geometry=geometry)


def test_patch_grid_round_trip():
    """Room for variable patch grids (t, h, w) per image, e.g. Qwen2.5-VL's image_grid_thw."""
    geometry = WireGeometry.patch_grids([(1, 4, 6), (1, 2, 2)])
    indices = np.arange(28) % 16
    frame = wire.decode_frame(wire.encode_frame(indices, codebook_size=16, codebook_fingerprint=FP, geometry=geometry))
    assert frame.geometry == geometry and frame.geometry.images[0].tokens == 24 and frame.grid is None
    with pytest.raises(wire.WireFormatError, match="invalid geometry: the patch grids make 28 tokens, the frame has 27"):
        wire.encode_frame(indices[:27], codebook_size=16, codebook_fingerprint=FP, geometry=geometry)
    with pytest.raises(wire.WireFormatError, match="records no grid"):
        wire.encode_frame(indices, codebook_size=16, codebook_fingerprint=FP, geometry=geometry, grid=(4, 7))
    with pytest.raises(wire.WireFormatError, match="entropy model mismatch: the model codes a fixed 6x6 grid, the "
                                                   "frame carries patch grids"):
        wire.encode_frame(indices, codebook_size=64, codebook_fingerprint=FP, geometry=geometry,
                          entropy_model=small_model())


def test_context_model_stays_inside_each_tile():
    """A tile's symbols (its neighbours, its recent values) are those it would have alone."""
    tiles = blocky_images(3, seed=5)
    joined = index_symbols(tiles.reshape(-1).tolist(), 6, 6, True, tiles=3)
    alone = [symbol for tile in tiles for symbol in index_symbols(tile.tolist(), 6, 6, True)]
    assert joined == alone


def test_coded_tiled_round_trip_and_gain():
    model = small_model()
    geometry = WireGeometry.tiled([(40, 20), (8, 8)], (3, 2), ((2, 1), (1, 1)))
    indices = blocky_images(5, seed=9).reshape(-1)
    for prompt in (None, "what color is the shape?"):
        data = wire.encode_frame(indices, codebook_size=64, codebook_fingerprint=FP, grid=(6, 6), has_cls_token=True,
                                 geometry=geometry, prompt=prompt, entropy_model=model)
        frame = wire.decode_frame(data, codebook_fingerprint=FP, entropy_model=model, codebook_size=64)
        assert frame.entropy_coded and frame.geometry == geometry and frame.num_tokens == 5 * 37
        assert frame.prompt == prompt and frame.grid == (6, 6) and frame.has_cls_token
        np.testing.assert_array_equal(frame.indices[:, 0], indices)
    raw = wire.encode_frame(indices, codebook_size=64, codebook_fingerprint=FP, geometry=geometry)
    assert len(data) < len(raw) / 2
    with pytest.raises(wire.WireFormatError, match="entropy model codes 37 tokens"):
        wire.encode_frame(indices[:-1], codebook_size=64, codebook_fingerprint=FP, entropy_model=model,
                          geometry=WireGeometry.tiled([(8, 8)], (1,), ((0, 0),)))


def test_check_geometry_runs_before_the_payload():
    seen = []

    def check(**header):
        seen.append(header)
        raise wire.WireFormatError("geometry mismatch: refused")

    model = small_model()
    data = wire.encode_frame(blocky_images(2).reshape(-1), codebook_size=64, codebook_fingerprint=FP,
                             entropy_model=model, geometry=WireGeometry.tiled([(9, 9)], (2,), ((1, 1),)))
    corrupt = bytearray(data[:-4])
    corrupt[-3] ^= 0xFF  # a payload that would not decode: the check must come first
    corrupt = bytes(corrupt) + struct.pack("<I", zlib.crc32(bytes(corrupt)))
    with pytest.raises(wire.WireFormatError, match="geometry mismatch: refused"):
        wire.decode_frame(corrupt, entropy_model=model, check_geometry=check)
    assert seen[0]["geometry"].num_tiles == 2 and seen[0]["num_tokens"] == 74 and seen[0]["grid"] == (6, 6)


@pytest.mark.parametrize("section, tokens, grid, message", [
    (_varints(1, 1, 20, 30, 4, 2, 2), 80, None, r"image 0: 4 tiles do not add up to a 2x2 grid plus the base view"),
    (_varints(1, 1, 20, 30, 5, 2, 0), 80, None, r"image 0: tile grid 2x0 needs both sides"),
    (_varints(1, 1, 0, 30, 1, 0, 0), 16, None, r"image 0: image size 0x30"),
    (_varints(1, 1, 20, 30, 5, 2, 2), 81, None, r"81 tokens do not divide into 5 tiles"),
    (_varints(1, 1, 20, 30, 5, 2, 2), 85, (4, 4), r"grid 4x4 does not give num_tokens=17"),
    (_varints(3, 1), 16, None, r"unknown geometry kind 3"),
    (_varints(1, 0), 16, None, r"a frame holds 1..64 images, got 0"),
    (_varints(1, 65), 16, None, r"a frame holds 1..64 images, got 65"),
    (_varints(1, 8, *[2048, 2048, 37, 6, 6] * 8), 16, None, r"too many tiles: more than 256"),
    (_varints(2, 1, 1, 4, 4), 15, None, r"the patch grids make 16 tokens, the frame has 15"),
    (_varints(2, 1, 1, 4, 4), 16, (4, 4), r"a frame of patch grids records no grid"),
    (_varints(2, 1, 0, 4, 4), 16, None, r"image 0: patch grid 0x4x4"),
])
def test_bad_geometry_is_refused_by_name(section, tokens, grid, message):
    with pytest.raises(wire.WireFormatError, match=message):
        wire.decode_frame(_raw_frame(section, tokens=tokens, grid=grid))


def test_truncated_geometry_names_the_field():
    section = _varints(1, 2, 20, 30, 5, 2, 2, 16, 16, 2, 1, 1)
    frame = _raw_frame(section, tokens=112)
    header = 13 + 3  # prefix, then K, T, C
    for cut, field in ((header + 1, "image count"), (header + 4, "image 0 tile count"),
                       (header + 8, "image 1 width")):
        body = frame[:cut]
        with pytest.raises(wire.WireFormatError, match=f"frame truncated: {field} needs at least"):
            wire.decode_frame(body + struct.pack("<I", zlib.crc32(body)))


def test_tile_cap_holds_when_building_too():
    with pytest.raises(wire.WireFormatError, match=f"too many tiles: 259 in one frame, at most {MAX_FRAME_TILES}"):
        WireGeometry.tiled([(2048, 2048)] * 7, (37,) * 7, ((6, 6),) * 7)
    with pytest.raises(wire.WireFormatError, match="image sizes, 1 tile counts"):
        WireGeometry.tiled([(1, 1), (2, 2)], (1,), ((0, 0),))
    with pytest.raises(wire.WireFormatError, match="all TiledImage or all PatchGridImage"):
        WireGeometry((TiledImage((1, 1), 1, (0, 0)), PatchGridImage((1, 1, 1))))
    with pytest.raises(wire.WireFormatError, match="geometry must be a WireGeometry"):
        wire.encode_frame(np.zeros(4, int), codebook_size=16, codebook_fingerprint=FP, geometry={"tiles": 1})


def test_section_bound_covers_the_largest_sections():
    biggest = WireGeometry.tiled([(65535, 65535)] * 6, (37,) * 6, ((6, 6),) * 6)
    data = wire.encode_frame(np.zeros(6 * 37, int), codebook_size=16, codebook_fingerprint=FP, geometry=biggest)
    plain = wire.encode_frame(np.zeros(6 * 37, int), codebook_size=16, codebook_fingerprint=FP)
    assert len(data) - len(plain) <= max_section_bytes(images=6)
    grids = WireGeometry.patch_grids([(1, 1, 65535)] * 3)
    data = wire.encode_frame(np.zeros(3 * 65535, int), codebook_size=16, codebook_fingerprint=FP, geometry=grids)
    plain = wire.encode_frame(np.zeros(3 * 65535, int), codebook_size=16, codebook_fingerprint=FP)
    assert len(data) - len(plain) <= max_section_bytes(2, images=3)


def test_fuzzed_geometry_frames_raise_only_wire_errors():
    """Every byte of a tiled frame (raw and coded) flipped, CRC fixed, and every truncation: a Frame or a
    WireFormatError, nothing else."""
    model = small_model()
    geometry = WireGeometry.tiled([(40, 20)], (3,), ((2, 1),))
    frames = [wire.encode_frame(blocky_images(3).reshape(-1), codebook_size=64, codebook_fingerprint=FP,
                                geometry=geometry, grid=(6, 6), has_cls_token=True, prompt="hi", entropy_model=m)
              for m in (None, model)]
    rng = np.random.default_rng(1)
    for data in frames:
        for position in range(len(data) - 4):
            for value in rng.integers(0, 256, 3):
                body = bytearray(data[:-4])
                body[position] = value
                mutated = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
                try:
                    wire.decode_frame(mutated, entropy_model=model)
                except wire.WireFormatError:
                    pass
        for cut in range(len(data)):
            with pytest.raises(wire.WireFormatError):
                wire.decode_frame(data[:cut], entropy_model=model)


def test_image_digest_binds_each_images_layout():
    """A kept image is named by its indices and its layout (size or patch grid): two images that share indices but
    not their layout are different images to the cloud, and a fixed-size image keeps its plain digest."""
    from transformers_alignedvq.wire_followup import image_digest

    indices = np.arange(32).reshape(32, 1) % 16
    tiled = [WireGeometry.tiled([size], [2], [(1, 1)]).images[0] for size in ((20, 30), (30, 20))]
    grids = [WireGeometry.patch_grids([grid]).images[0] for grid in ((1, 4, 8), (1, 8, 4))]
    assert [image.layout for image in tiled + grids] == [(20, 30), (30, 20), (1, 4, 8), (1, 8, 4)]
    digests = {image_digest(indices, FP, image.layout) for image in tiled + grids} | {image_digest(indices, FP)}
    assert len(digests) == 5
    assert image_digest(indices, FP, None) == image_digest(indices, FP)
