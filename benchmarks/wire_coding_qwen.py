"""Bytes per Qwen2.5-VL wire frame at Qwen2.5-VL-3B's published dimensions: raw against coded by the entropy model
of patch grids.

    OMP_NUM_THREADS=1 python benchmarks/wire_coding_qwen.py [--train-crops 8] [--max-features 30000] [--iters 8]

INDICATIVE (random weights): a Qwen2.5-VL AlignedVQ model whose vision tower has the 3B's published dimensions
(`qwen_edge.VISION_3B`: 14-px patches, hidden 1280) but one block, split after that block's first LayerNorm (so
only the patch embedding and that LayerNorm run: the edge's part at the paper's site), and Qwen's own resizing
(`QwenImagePreprocessing` at the published pixel limits). A K = 4096 codebook is k-means-initialised
(`init_codebook`) on the patches of five ``skimage.data`` photos and random crops of them; the entropy model is
fitted (`EntropyModel.fit_patch_grids`) on the same images' indices, each at its own patch grid. Frames are
measured on three other photos resized to 448×448 and 1024×768 (W×H), each frame one image with its geometry
section, without a question. With trained weights the indices, and so the sizes, differ.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from qwen_edge import edge_model  # the 3B tower up to the split block (this folder's edge benchmark)

from transformers_alignedvq import wire
from transformers_alignedvq.entropy import EntropyModel
from transformers_alignedvq.preprocess_qwen import QwenImagePreprocessing
from transformers_alignedvq.wire_geometry import WireGeometry

TRAIN_PHOTOS = ("cat", "hubble_deep_field", "immunohistochemistry", "retina", "chelsea")
TEST_PHOTOS = ("astronaut", "coffee", "rocket")
TEST_SIZES = ((448, 448), (1024, 768))  # W, H: the published dimensions the docs tabulate
K = 4096


def photos(names, crops: int, seed: int):
    """Each photo whole, then ``crops`` random crops of it (random sizes, so random patch grids)."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in names:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        yield photo
        for _ in range(crops):
            width, height = (int(side * rng.uniform(0.4, 1.0)) for side in photo.size)
            left, top = rng.integers(0, photo.size[0] - width + 1), rng.integers(0, photo.size[1] - height + 1)
            yield photo.crop((left, top, left + width, top + height))


def batch(preprocessing: QwenImagePreprocessing, image) -> dict:
    import torch

    pixel_values, grid = preprocessing(image)
    return {"pixel_values": torch.from_numpy(pixel_values), "image_grid_thw": torch.from_numpy(np.asarray(grid))}


def measure(model, preprocessing, entropy: EntropyModel, fingerprint: bytes) -> list[tuple]:
    import skimage.data
    from PIL import Image

    rows = []
    for name in TEST_PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for size in TEST_SIZES:
            inputs = batch(preprocessing, photo.resize(size, Image.BICUBIC))
            indices = model.encode_edge(inputs["pixel_values"], inputs["image_grid_thw"]).numpy().reshape(-1)
            grid = tuple(int(v) for v in inputs["image_grid_thw"][0])
            options = dict(codebook_size=K, codebook_fingerprint=fingerprint, geometry=WireGeometry.patch_grids([grid]))
            raw = wire.encode_frame(indices, **options)
            started = time.perf_counter()
            coded = wire.encode_frame(indices, entropy_model=entropy, **options)
            middle = time.perf_counter()
            frame = wire.decode_frame(coded, entropy_model=entropy, codebook_fingerprint=fingerprint)
            ended = time.perf_counter()
            assert np.array_equal(frame.indices[:, 0], indices)
            rows.append((f"{name} {size[0]}x{size[1]}", grid, indices.size, len(raw), len(coded),
                         8 * len(coded) / indices.size, 1000 * (middle - started), 1000 * (ended - middle)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-crops", type=int, default=8, help="random crops per training photo")
    parser.add_argument("--max-features", type=int, default=30_000, help="patch features k-means clusters")
    parser.add_argument("--iters", type=int, default=8, help="k-means iterations")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = edge_model(0, "ln1")
    preprocessing = QwenImagePreprocessing(max_pixels=12845056)  # the published preprocessor_config.json's limit
    training = [batch(preprocessing, image) for image in photos(TRAIN_PHOTOS, args.train_crops, seed=0)]
    with torch.no_grad():
        model.init_codebook(training, iters=args.iters, max_features=args.max_features)
        sent = [(model.encode_edge(b["pixel_values"], b["image_grid_thw"]).numpy().reshape(-1),
                 tuple(int(v) for v in b["image_grid_thw"][0])) for b in training]
        entropy = EntropyModel.fit_patch_grids(sent, codebook_size=K)
        fingerprint = wire.codebook_fingerprint(model.model.alignedvq.quantizer.codebook)
        patches = sum(indices.size for indices, _ in sent)
        print(f"Qwen2.5-VL patch grids, INDICATIVE (random weights): the 3B tower's patch embedding (14-px patches, "
              f"hidden 1280) split at block 0 ln1, K={K} k-means and entropy model on {patches:,} patches of "
              f"{len(training)} images ({', '.join(TRAIN_PHOTOS)} and crops); {time.perf_counter() - started:.0f} s "
              "to build\n")
        print("| image (W×H) | patch grid (t, h, w) | indices | raw B | coded B | coded bits/index | encode ms | "
              "decode ms |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        rows = measure(model, preprocessing, entropy, fingerprint)
    for name, grid, count, raw, coded, bits, encode_ms, decode_ms in rows:
        print(f"| {name} | {grid} | {count:,} | {raw:,} | {coded:,} | {bits:.2f} | {encode_ms:.0f} | {decode_ms:.0f} |")
    raw_total, coded_total = sum(row[3] for row in rows), sum(row[4] for row in rows)
    print(f"\nall frames: {coded_total:,} coded bytes against {raw_total:,} raw ({coded_total / raw_total:.1%})")


if __name__ == "__main__":
    main()
