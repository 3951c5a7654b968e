"""Edge cost per image of the any-resolution families at their published dimensions (random weights, one thread).

* LLaVA-OneVision-0.5B's tower: SigLIP-so400m (1152 wide, 14-px patches) on 384-px tiles, 729 tokens per tile, the
  36 default pinpoints: a 1024x768 photo is a 2x3 grid plus the base view, 7 tiles;
* LLaVA-NeXT's tower: CLIP ViT-L/14-336 (1024 wide), 577 tokens per tile (CLS included), the 5 default pinpoints:
  the same photo is 2x2 plus the base view, 5 tiles.

The photo is `skimage.data.coffee` resized to 1024x768. Each edge runs the tower up to the split site on every
tile, then the codeword search (K = 4096, 12 bits an index), side by side in one run (medians of interleaved
repeats): the PyTorch edge with the exact search, the ONNX edge (`export.tiled_edge`) with the exact and with
the shortlist search (rank 32, 8 candidates), and the numpy + Pillow tiling (`preprocess_tiles`) the device runs
first. The codebook is a k-means one on site features of other photos' tiles (random weights: the timings are real,
the agreement with an fp64 exact search only indicative). Raw bytes: tiles x tokens x 12 bits, before
entropy coding.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/family_edge.py [--site ln1_0] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from edge_encode import SITES, interleaved_medians, onnx_session  # the sibling benchmark: same timing rules
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from transformers_alignedvq import wire
from transformers_alignedvq.export.edge import AlignedVQEdgeEncoder
from transformers_alignedvq.export.edge_onnx import export_onnx
from transformers_alignedvq.export.search import SearchConfig
from transformers_alignedvq.models.llava_alignedvq import split
from transformers_alignedvq.models.llava_alignedvq.quantizer import nearest_codeword
from transformers_alignedvq.preprocess_tiles import TiledPreprocessing

CODEBOOK_SIZE = 4096
ONEVISION_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
FIT_PHOTOS = ("astronaut", "rocket", "chelsea")


def families(blocks: int) -> dict:
    """Published vision configs (all their blocks, as the edge config records them), a random tower with the first
    ``blocks`` blocks (the edge uses no more), and the tiling of the family's image processor."""
    siglip = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384, patch_size=14)
    clip = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
                projection_dim=768)
    return {
        "LLaVA-OneVision-0.5B (SigLIP-so400m, 384 px)": (
            SiglipVisionConfig(num_hidden_layers=26, **siglip),
            lambda: SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=blocks, **siglip)),
            # OneVision-0.5B's processor: squash each tile to 384², bicubic, mean = std = 0.5
            TiledPreprocessing.from_image_processor(
                {"size": {"height": 384, "width": 384}, "resample": 3, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3, "image_grid_pinpoints": ONEVISION_PINPOINTS}),
        ),
        "LLaVA-NeXT (CLIP ViT-L/14-336)": (
            CLIPVisionConfig(num_hidden_layers=24, **clip),
            lambda: CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=blocks, **clip)),
            TiledPreprocessing.for_family("llava_next", 336, NEXT_PINPOINTS),
        ),
    }


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return image.resize(size, resample=Image.BICUBIC) if size else image


def build_edge(vision, tower, layer: int, site: str, fit_tiles: np.ndarray, kmeans_iters: int) -> AlignedVQEdgeEncoder:
    """The per-tile edge with the tower's weights, a DLP with a non-zero gate, and a k-means codebook of site
    features of other photos' tiles."""
    hidden = vision.hidden_size
    settings = dict(split_layer=layer, split_site=site, codebook_size=CODEBOOK_SIZE, codebook_dim=hidden,
                    num_codebooks=1, num_groups=1, use_dlp=True)
    edge = AlignedVQEdgeEncoder(vision, settings)
    tower_state = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
    state = {k: tower_state[k] for k in edge.state_dict() if not k.startswith("alignedvq.")}
    generator = torch.Generator().manual_seed(0)
    state.update({"alignedvq.dlp_in.gate": torch.tensor(0.1), "alignedvq.dlp_in.proj.bias": torch.zeros(hidden),
                  "alignedvq.dlp_in.proj.weight": 0.02 * torch.randn(hidden, hidden, generator=generator),
                  "alignedvq.quantizer.codebook": torch.zeros(1, 1, CODEBOOK_SIZE, hidden)})
    edge.load_state_dict(state)
    with torch.no_grad():
        features = features_of(edge, torch.from_numpy(fit_tiles)).reshape(-1, hidden)
        weight, bias = edge.alignedvq._pre_quantization_affine()
        features = features @ weight.T + bias
        codebook = lloyd(features, kmeans_iters, generator)
        edge.alignedvq.quantizer.codebook.copy_(codebook[None, None])
    return edge.refresh_search().eval()


def lloyd(features: torch.Tensor, iters: int, generator: torch.Generator) -> torch.Tensor:
    """K-means from distinct random features (no k-means++ seeding: its 4,096 sequential passes would take
    longer than the benchmark itself)."""
    centroids = features[torch.randperm(len(features), generator=generator)[:CODEBOOK_SIZE]].clone()
    for _ in range(iters):
        assign = nearest_codeword(features, centroids)
        counts = torch.bincount(assign, minlength=CODEBOOK_SIZE).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, features)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    return centroids


def features_of(edge, tiles: torch.Tensor) -> torch.Tensor:
    settings = edge.settings
    return torch.cat([split.edge_forward(edge, batch, settings["split_layer"], settings["split_site"])
                      for batch in tiles.split(8)])


def measure(label: str, vision, make_tower, tiling: TiledPreprocessing, args, scratch: Path) -> list[dict]:
    layer, site = SITES[args.site]
    torch.manual_seed(0)
    tower = make_tower().eval()
    fit = np.concatenate([tiling(photo(name)).pixels for name in FIT_PHOTOS])
    edge = build_edge(vision, tower, layer, site, fit, args.kmeans_iters)
    del tower
    image = photo(args.photo, (1024, 768))
    tiled = tiling(image)
    tiles = torch.from_numpy(tiled.pixels)
    exact_path = export_onnx(edge, scratch / "exact.onnx")
    reference = fp64_exact(edge, tiles)
    shortlist_edge = build_edge_copy(edge, SearchConfig("shortlist", rank=args.rank, candidates=args.candidates))
    shortlist_path = export_onnx(shortlist_edge, scratch / "shortlist.onnx")
    sessions = {"ONNX, exact": onnx_session(exact_path), "ONNX, shortlist": onnx_session(shortlist_path)}
    feed = {"pixel_values": tiled.pixels}

    def torch_exact():
        with torch.inference_mode():
            return edge(tiles)

    methods = {"tiling (numpy + Pillow)": lambda: tiling(image), "PyTorch, exact": torch_exact}
    methods.update({name: (lambda s=s: s.run(None, feed)[0]) for name, s in sessions.items()})
    medians = interleaved_medians(methods, args.repeats)
    tokens = reference.shape[1]
    indices = tiled.num_tiles * tokens
    raw = wire.raw_payload_bytes(indices, codebook_size=CODEBOOK_SIZE, codes_per_token=1)
    rows = []
    for name, ms in medians.items():
        agreement = None
        if name in sessions:
            agreement = float((sessions[name].run(None, feed)[0] == reference).mean())
        elif name == "PyTorch, exact":
            agreement = float((torch_exact().numpy() == reference).mean())
        rows.append(dict(family=label, site=args.site, method=name, tiles=tiled.num_tiles, grid=list(tiled.grid),
                         tokens_per_tile=tokens, indices=indices, raw_bytes=raw, ms=ms, agreement=agreement))
    return rows


def fp64_exact(edge: AlignedVQEdgeEncoder, tiles: torch.Tensor) -> np.ndarray:
    """The exact search in fp64: what every edge is scored against (fp32 ones may differ on near ties)."""
    with torch.no_grad():
        features = features_of(edge, tiles)
        weight, bias = edge.alignedvq._pre_quantization_affine()
        codebook = edge.alignedvq.quantizer.codebook[0, 0].double()
        mapped = (features.reshape(-1, features.shape[-1]) @ weight.T + bias).double()
        found = torch.cat([torch.cdist(chunk, codebook).argmin(-1) for chunk in mapped.split(1024)])
    return found.reshape(features.shape[:2]).numpy()


def build_edge_copy(edge: AlignedVQEdgeEncoder, search: SearchConfig) -> AlignedVQEdgeEncoder:
    """The same weights with another search (the tables are rebuilt from the codebook)."""
    copy = AlignedVQEdgeEncoder(edge.vision_config, edge.settings, edge.preprocessing, search)
    copy.load_state_dict(edge.state_dict())
    return copy.refresh_search().eval()


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"Random weights, one thread, split at {args.site}, K = {CODEBOOK_SIZE} (12 bits an index), "
        f"`skimage.data.{args.photo}` resized to 1024x768, medians of {args.repeats} interleaved repeats.",
        "",
        "| tower | tiles (grid + base) | tokens/tile | indices | raw bytes | edge | ms/image | agreement with fp64 exact |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        rows_, cols = row["grid"]
        agreement = "" if row["agreement"] is None else f"{100 * row['agreement']:.2f}%"
        lines.append(f"| {row['family']} | {rows_}x{cols} + 1 = {row['tiles']} | {row['tokens_per_tile']} | "
                     f"{row['indices']:,} | {row['raw_bytes']:,} | {row['method']} | {row['ms']:.1f} | {agreement} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="ln1_0", choices=sorted(SITES))
    parser.add_argument("--photo", default="coffee", help="a skimage.data photo, resized to 1024x768")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--kmeans-iters", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, (vision, make_tower, tiling) in families(SITES[args.site][0] + 1).items():
            rows += measure(label, vision, make_tower, tiling, args, Path(scratch))
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
