"""Bytes per tiled wire frame (LLaVA-OneVision geometry): raw against coded by the tile-aware context model.

    OMP_NUM_THREADS=1 python benchmarks/wire_coding_tiled.py [--train-crops 8] [--max-features 30000] [--iters 8]

INDICATIVE (random weights): a LLaVA-OneVision AlignedVQ model whose SigLIP tower has the published tile
geometry (384-px tiles, 14-px patches: 729 tokens per tile, width 1152) but one block, split after that block's
first LayerNorm (so only the patch embedding and that LayerNorm run: the edge's part at the paper's site), and
OneVision's own image processor with its 36 default pinpoints. A K = 4096 codebook is k-means-initialised
(`init_codebook`) on the tiles of five ``skimage.data`` photos and random crops of them; the entropy model is
fitted on the same tiles' indices (one row per tile). Frames are measured on three other photos at their own
size and downscaled, each frame one image with its geometry section, without a question. With trained weights
the indices, and so the sizes, differ.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from transformers_alignedvq import wire
from transformers_alignedvq.entropy import EntropyModel
from transformers_alignedvq.wire_geometry import WireGeometry

TRAIN_PHOTOS = ("cat", "hubble_deep_field", "immunohistochemistry", "retina", "chelsea")
TEST_PHOTOS = ("astronaut", "coffee", "rocket")
TEST_SCALES = (1.0, 0.6)
K = 4096


def build_model():
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from transformers_alignedvq import from_vlm

    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=1, num_attention_heads=16, image_size=384, patch_size=14),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
    )
    torch.manual_seed(0)
    return from_vlm(LlavaOnevisionForConditionalGeneration(config).eval(), split_layer=0, split_site="ln1",
                    codebook_size=K).eval()


def photos(names, crops: int, seed: int):
    """Each photo whole, then ``crops`` random crops of it (random sizes, so random tilings)."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in names:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        yield name, photo
        for _ in range(crops):
            width, height = (int(side * rng.uniform(0.4, 1.0)) for side in photo.size)
            left, top = rng.integers(0, photo.size[0] - width + 1), rng.integers(0, photo.size[1] - height + 1)
            yield name, photo.crop((left, top, left + width, top + height))


def batch(processor, image) -> dict:
    inputs = processor(images=image, return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}


def measure(model, processor, entropy: EntropyModel, fingerprint: bytes) -> list[tuple]:
    import skimage.data
    from PIL import Image

    rows = []
    for name in TEST_PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for scale in TEST_SCALES:
            image = photo.resize((round(photo.size[0] * scale), round(photo.size[1] * scale)), Image.BICUBIC)
            inputs = batch(processor, image)
            indices = model.encode_edge(inputs["pixel_values"], inputs["image_sizes"]).numpy()
            geometry = model.frame_geometry(inputs["image_sizes"])
            layout = WireGeometry.tiled(inputs["image_sizes"], geometry.tiles_per_image, geometry.tile_grids)
            options = dict(codebook_size=K, codebook_fingerprint=fingerprint, geometry=layout, grid=(27, 27))
            raw = wire.encode_frame(indices.reshape(-1), **options)
            started = time.perf_counter()
            coded = wire.encode_frame(indices.reshape(-1), entropy_model=entropy, **options)
            middle = time.perf_counter()
            frame = wire.decode_frame(coded, entropy_model=entropy, codebook_fingerprint=fingerprint)
            ended = time.perf_counter()
            assert np.array_equal(frame.indices[:, 0], indices.reshape(-1))
            grid = layout.images[0].grid
            rows.append((f"{name} {image.size[0]}x{image.size[1]}", f"{grid[0]}x{grid[1]} + 1 = {layout.num_tiles}",
                         indices.size, len(raw), len(coded), 8 * len(coded) / indices.size,
                         1000 * (middle - started), 1000 * (ended - middle)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-crops", type=int, default=8, help="random crops per training photo")
    parser.add_argument("--max-features", type=int, default=30_000, help="token features k-means clusters")
    parser.add_argument("--iters", type=int, default=8, help="k-means iterations")
    args = parser.parse_args(argv)
    import torch
    from transformers import LlavaOnevisionImageProcessor

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = build_model()
    processor = LlavaOnevisionImageProcessor()  # 384-px tiles, the 36 default pinpoints
    training = [batch(processor, image) for _, image in photos(TRAIN_PHOTOS, args.train_crops, seed=0)]
    with torch.no_grad():
        model.init_codebook(training, iters=args.iters, max_features=args.max_features)
        tiles = np.concatenate([model.encode_edge(b["pixel_values"], b["image_sizes"]).numpy() for b in training])
    entropy = EntropyModel.fit(tiles, codebook_size=K, grid=(27, 27), has_cls_token=False)
    fingerprint = wire.codebook_fingerprint(model.model.alignedvq.quantizer.codebook)
    print(f"LLaVA-OneVision tiles, INDICATIVE (random weights): SigLIP 384/14 (729 tokens per tile) split at block 0 "
          f"ln1, K={K} k-means and entropy model on {len(tiles)} tiles of {len(training)} images "
          f"({', '.join(TRAIN_PHOTOS)} and crops); {time.perf_counter() - started:.0f} s to build\n")
    print("| image (W×H) | tiles (grid + base) | indices | raw B | coded B | coded bits/index | encode ms | decode ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = measure(model, processor, entropy, fingerprint)
    for name, tiling, count, raw, coded, bits, encode_ms, decode_ms in rows:
        print(f"| {name} | {tiling} | {count:,} | {raw:,} | {coded:,} | {bits:.2f} | {encode_ms:.0f} | {decode_ms:.0f} |")
    raw_total, coded_total = sum(row[3] for row in rows), sum(row[4] for row in rows)
    print(f"\nall frames: {coded_total:,} coded bytes against {raw_total:,} raw ({coded_total / raw_total:.1%})")


if __name__ == "__main__":
    main()
