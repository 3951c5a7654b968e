"""Edge-side cost at LLaVA-1.5 scale: CLIP ViT-L/14-336 (random weights), 577 tokens x 1024, K = 4096.

Prints milliseconds per image, measured side by side in one run (medians over repeats, interleaved so
machine noise hits every method alike):

* the whole edge part (embeddings, blocks before the split, split site, input DLP, codeword search);
* the quantization alone: ours (input DLP folded into the codebook), ours without folding (DLP matmul, then
  search), a plain ``torch.cdist(...).argmin()`` after the DLP, and vector-quantize-pytorch's
  ``VectorQuantize`` (eval mode, same codebook) when it is installed.

    python benchmarks/edge_encode.py [--batch 1] [--repeats 7] [--threads N] [--plot out.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from transformers_alignedvq import split
from transformers_alignedvq.alignedvq_layer import AlignedVQLayer
from transformers_alignedvq.quantizer import nearest_codeword


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--split-layer", type=int, default=0)
    parser.add_argument("--split-site", default="ln1", choices=split.SPLIT_SITES)
    parser.add_argument("--plot", default=None, help="write a bar chart to this PNG path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    tower = CLIPVisionModel(vision).eval()
    layer = AlignedVQLayer(1024, args.codebook_size).eval()
    with torch.no_grad():  # a trained DLP has a non-zero gate; folding must handle it
        layer.dlp_in.gate.fill_(0.1)
    pixels = torch.randn(args.batch, 3, 336, 336)
    with torch.no_grad():
        site = split.edge_forward(tower, pixels, args.split_layer, args.split_site)
    flat = site.reshape(-1, 1024)
    codebook = layer.quantizer.codebook[0, 0]

    methods = {}

    def edge_total():
        with torch.no_grad():
            layer.encode(split.edge_forward(tower, pixels, args.split_layer, args.split_site))

    methods["edge part, total (ours)"] = edge_total
    methods["quantize: ours (DLP folded)"] = lambda: layer.encode(site)
    methods["quantize: ours, DLP then search"] = lambda: layer.quantizer.encode(layer.pre_quantization(site))

    def cdist_argmin():
        with torch.no_grad():
            torch.cdist(layer.pre_quantization(flat), codebook).argmin(-1)

    methods["quantize: DLP + torch.cdist().argmin()"] = cdist_argmin
    try:
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=1024, codebook_size=args.codebook_size).eval()
        with torch.no_grad():
            vq._codebook.embed.copy_(codebook.unsqueeze(0))
            vq._codebook.initted.fill_(True)

        def vqp():
            with torch.no_grad():
                vq(layer.pre_quantization(site))

        methods["quantize: DLP + vector-quantize-pytorch"] = vqp
        with torch.no_grad():
            _, theirs, _ = vq(layer.pre_quantization(site))
        agree = float((theirs.reshape(-1) == layer.encode(site).reshape(-1)).float().mean())
    except ImportError:
        agree = None

    with torch.no_grad():
        reference = torch.cdist(layer.pre_quantization(flat).double(), codebook.double()).argmin(-1)
    ours_agree = float((layer.encode(site).reshape(-1) == reference).float().mean())

    for fn in methods.values():  # warm-up
        fn()
    samples = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            samples[name] += timed(fn, 1)

    base = statistics.median(samples["quantize: ours (DLP folded)"])
    print(f"LLaVA-1.5 edge: CLIP ViT-L/14-336, split at block {args.split_layer} {args.split_site}, "
          f"K={args.codebook_size}, batch={args.batch}, threads={torch.get_num_threads()}, repeats={args.repeats}")
    print(f"{'method':44s} {'ms/image':>10s} {'vs ours':>8s}")
    rows = []
    for name, times in samples.items():
        ms = 1000 * statistics.median(times) / args.batch
        ratio = statistics.median(times) / base
        rows.append((name, ms))
        print(f"{name:44s} {ms:10.2f} {ratio:7.2f}x")
    print(f"indices equal to an fp64 exact search: ours {100 * ours_agree:.2f}%"
          + (f", vector-quantize-pytorch agrees with ours on {100 * agree:.2f}%" if agree is not None else ""))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1])
        ax.set_xlabel("ms per image")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
