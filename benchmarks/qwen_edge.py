"""Qwen2.5-VL edge cost at Qwen2.5-VL-3B's vision dimensions (random weights), one thread: PyTorch and ONNX.

The tower is Qwen2.5-VL-3B's ViT as published (hidden 1280, 16 heads, gated-SiLU MLP 3420, 14-px patches with 2
temporal slots, windows of 112 px, full attention in blocks 7, 15, 23, 31; Transformers' ``Qwen2_5_VLVisionConfig``
defaults are the 7B's hidden size, so the values are written out here), built only up to the split block since
the edge runs nothing after it. The codebook has K = 4096 codewords drawn from the site features of the two
photos (a k-means fit would not change the timings: the search is exhaustive).

For each site and photo (two ``skimage.data`` photos resized to 448x448 and 1024x768, W x H, then Qwen's own
``smart_resize``), the table gives the median over ``--repeats`` runs of

* ``preprocess``: `QwenImagePreprocessing` (resize, normalise, patches), numpy + Pillow;
* ``PyTorch``: ``model.encode_edge(pixel_values, image_grid_thw)`` (the stock windowed blocks, the AlignedVQ
  layer's own search);
* ``ONNX``: `qwen_edge_runtime` on the same patches (window layout in numpy + the exported graph with the exact
  folded search);

the share of patches whose indices agree between the two, and the raw bytes per image at 12 bits an index
(before entropy coding). The random weights make the arithmetic real; nothing here measures accuracy.

    OMP_NUM_THREADS=1 python benchmarks/qwen_edge.py [--sites patch_0 ln1_0 mlp_0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from transformers_alignedvq.export.qwen_edge_onnx import export_qwen_edge
from transformers_alignedvq.models.family import from_vlm
from transformers_alignedvq.preprocess_qwen import QwenImagePreprocessing
from transformers_alignedvq.qwen_edge_runtime import load_qwen_edge

# Qwen2.5-VL-3B-Instruct's vision_config (config.json on the Hub).
VISION_3B = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048,
                 hidden_act="silu")
SITES = {"patch_0": (0, "patch"), "input_0": (0, "input"), "ln1_0": (0, "ln1"), "mlp_0": (0, "mlp"),
         "mlp_6": (6, "mlp")}
PHOTOS = (("astronaut", (448, 448)), ("coffee", (1024, 768)))  # skimage.data name, (W, H)
CODEBOOK_SIZE = 4096
CODEBOOK_PHOTOS = ("hubble_deep_field", "rocket", "chelsea")  # at their own sizes; never timed


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def photos() -> list[tuple[str, Image.Image]]:
    return [(f"{w}x{h}", photo(name).resize((w, h), Image.BICUBIC)) for name, (w, h) in PHOTOS]


def edge_model(split_layer: int, site: str):
    """A Qwen2.5-VL AlignedVQ model with the 3B tower up to the split block and a tiny language model."""
    vision = dict(VISION_3B, depth=split_layer + 1)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6})
    torch.manual_seed(0)
    base = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text)).eval()
    return from_vlm(base, split_layer=split_layer, split_site=site, codebook_size=CODEBOOK_SIZE).eval()


@torch.no_grad()
def set_codebook(model, preprocessing) -> None:
    """K distinct codewords drawn from the site features of other photos, through the layer's input side (DLP).
    Distinct, so that the agreement column counts rounding differences, not ties between equal codewords."""
    layer = model.model.alignedvq
    batches = [map(torch.from_numpy, preprocessing(photo(name))) for name in CODEBOOK_PHOTOS]
    features = torch.unique(torch.cat([model.model.edge_features(*batch) for batch in batches]), dim=0)
    rows = features[torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(0))[:CODEBOOK_SIZE]]
    weight, bias = layer._pre_quantization_affine()
    layer.quantizer.codebook[0, 0] = torch.addmm(bias, rows.float(), weight.T)


def timed(function, repeats: int) -> tuple[float, object]:
    result = function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), result


def run_site(name: str, images, repeats: int) -> list[dict]:
    split_layer, site = SITES[name]
    model = edge_model(split_layer, site)
    preprocessing = QwenImagePreprocessing(max_pixels=12845056)  # the published preprocessor_config.json's limit
    batches = [tuple(map(torch.from_numpy, preprocessing(image))) for _, image in images]
    set_codebook(model, preprocessing)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        export_qwen_edge(model, folder, preprocessing=preprocessing)
        runtime = load_qwen_edge(folder, threads=1)
        for (label, image), (pixel_values, grid) in zip(images, batches, strict=True):
            pre_ms, (patches, edge_grid) = timed(lambda image=image: preprocessing.edge_patches(image), repeats)
            with torch.no_grad():
                torch_ms, expected = timed(lambda p=pixel_values, g=grid: model.encode_edge(p, g), repeats)
            onnx_ms, got = timed(lambda p=patches, g=edge_grid: runtime.encode_patches(p, g), repeats)
            count = int(np.prod(edge_grid))
            rows.append(dict(site=name, image=label, grid=edge_grid, patches=count, pre_ms=pre_ms, torch_ms=torch_ms,
                             onnx_ms=onnx_ms, agree=float((expected.numpy() == got).mean()),
                             raw_bytes=math.ceil(count * math.log2(CODEBOOK_SIZE) / 8)))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| site | image (W×H) | grid (t, h, w) | patches | preprocess ms | PyTorch ms | ONNX ms | indices agree "
             "| raw bytes (K=4096) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['site']} | {r['image']} | {r['grid']} | {r['patches']:,} | {r['pre_ms']:.0f} | "
                     f"{r['torch_ms']:.0f} | {r['onnx_ms']:.0f} | {100 * r['agree']:.2f}% | {r['raw_bytes']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", default=["patch_0", "ln1_0", "mlp_0"], choices=sorted(SITES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = photos()
    rows = [row for name in args.sites for row in run_site(name, images, args.repeats)]
    print(table(rows))


if __name__ == "__main__":
    main()
