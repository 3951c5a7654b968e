"""Images over the wire for the families whose images vary (LLaVA-NeXT / OneVision tiles, Qwen2.5-VL patch
grids): each image's indices framed with its geometry (`wire_geometry`) as the device sends them, decoded as the
cloud does, and turned into the ``generate`` inputs that replace ``pixel_values``."""

from __future__ import annotations

import numpy as np
import torch

from ..wire import decode_frame, encode_frame
from ..wire_geometry import WireGeometry


def is_family_model(model) -> bool:
    """Whether ``model`` is an AlignedVQ model of a family with per-image geometry (not LLaVA-1.5)."""
    return getattr(getattr(getattr(model, "model", None), "adapter", None), "name", "llava") != "llava"


def _image_frames(model, inputs: dict) -> tuple[np.ndarray, list[WireGeometry], list[int], dict]:
    """The edge's indices of the batch, one geometry and token count per image, and the layout inputs."""
    config = model.config
    device = model.model.alignedvq.quantizer.codebook.device
    if "image_grid_thw" in inputs:
        grids = inputs["image_grid_thw"]
        indices = model.encode_edge(inputs["pixel_values"].to(device), grids.to(device))
        geometries = [WireGeometry.patch_grids([thw]) for thw in grids.tolist()]
        counts = [t * h * w for t, h, w in grids.tolist()]
        return indices.cpu().numpy(), geometries, counts, {"image_grid_thw": grids}
    sizes = inputs["image_sizes"]
    indices = model.encode_edge(inputs["pixel_values"].to(device), sizes.to(device))
    layout = model.frame_geometry(sizes)
    geometries = [WireGeometry.tiled([size], [tiles], [grid])
                  for size, tiles, grid in zip(sizes.tolist(), layout.tiles_per_image, layout.tile_grids)]
    counts = [tiles * config.tokens_per_tile for tiles in layout.tiles_per_image]
    return indices.reshape(-1, *indices.shape[2:]).cpu().numpy(), geometries, counts, {"image_sizes": sizes}


def patch_layout(config) -> tuple[tuple[int, int], bool]:
    """The patch grid and CLS token of one image (LLaVA-1.5) or one tile (LLaVA-NeXT / OneVision), as frames
    record them."""
    from ..edge_config import frame_geometry

    vision = config.vision_config
    if not hasattr(config, "tokens_per_tile"):
        geometry = frame_geometry(vision.image_size, vision.patch_size)
        return geometry["grid"], geometry["has_cls_token"]
    side = vision.image_size // vision.patch_size
    return (side, side), config.tokens_per_tile == side * side + 1


def family_indices_over_the_wire(model, inputs: dict, *, entropy_model=None, fingerprint: bytes | None = None):
    """The ``generate`` inputs the cloud makes from a batch's frames (``image_indices`` and the layout:
    ``image_sizes`` or ``image_grid_thw``), the raw frame bytes per image and the coded ones (``[]`` without an
    ``entropy_model``). ``inputs``: the family processor's output (``pixel_values`` and the layout)."""
    config = model.config
    fingerprint = model.codebook_fingerprint() if fingerprint is None else fingerprint
    options = dict(codebook_size=config.codebook_size, codebook_fingerprint=fingerprint)
    if hasattr(config, "tokens_per_tile"):
        options["grid"], options["has_cls_token"] = patch_layout(config)
    indices, geometries, counts, layout = _image_frames(model, inputs)
    indices = indices.reshape(indices.shape[0], -1)  # (tokens of the batch, codes)
    received, sizes, coded, start = [], [], [], 0
    for geometry, count in zip(geometries, counts):
        rows = indices[start:start + count]
        start += count
        frame = encode_frame(rows, geometry=geometry, **options)
        sizes.append(len(frame))
        if entropy_model is not None:
            coded.append(len(encode_frame(rows, geometry=geometry, entropy_model=entropy_model, **options)))
        decoded = decode_frame(frame, codebook_size=config.codebook_size, codebook_fingerprint=fingerprint,
                               num_tokens=count, codes_per_token=config.codes_per_token)
        received.append(np.asarray(decoded.indices))
    cloud = torch.from_numpy(np.concatenate(received))
    if hasattr(config, "tokens_per_tile"):
        cloud = cloud.reshape(-1, config.tokens_per_tile, config.codes_per_token)
    cloud = cloud[..., 0] if config.codes_per_token == 1 else cloud
    device = model.model.alignedvq.quantizer.codebook.device
    return {"image_indices": cloud.to(device), **{k: v.to(device) for k, v in layout.items()}}, sizes, coded


__all__ = ["family_indices_over_the_wire", "is_family_model", "patch_layout"]
