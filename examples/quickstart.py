"""End to end on one machine: a LLaVA (tiny, random weights unless you pass --base) split by AlignedVQ.

    python examples/quickstart.py                                   # tiny random LLaVA, runs in seconds
    python examples/quickstart.py --base llava-hf/llava-1.5-7b-hf   # the real model (needs the Hub and a GPU)

Steps: convert the LLaVA, k-means the codebook on calibration images, run the edge part, put the indices in a
wire frame, decode the frame as the cloud would, and generate from the indices. The answer from indices must
equal the answer from pixels: that is the split being exact.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from transformers_alignedvq import LlavaAlignedVQForConditionalGeneration
from transformers_alignedvq.wire import decode_frame, encode_frame


def tiny_llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=112, patch_size=14)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=255, image_seq_length=64)
    return LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="LLaVA checkpoint (Hub id or folder); default: tiny random")
    parser.add_argument("--codebook-size", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)

    llava = tiny_llava() if args.base is None else args.base
    model = LlavaAlignedVQForConditionalGeneration.from_llava(llava, codebook_size=args.codebook_size).eval()
    config = model.config
    size = config.vision_config.image_size
    calibration = [torch.randn(8, 3, size, size) for _ in range(4)]
    print(f"k-means on {model.init_codebook(calibration, iters=10)} site features -> {config.codebook_size} codewords")

    pixels = torch.randn(1, 3, size, size)
    indices = model.encode_edge(pixels)  # the edge: (1, num_image_tokens) integers
    grid = size // config.vision_config.patch_size
    frame = encode_frame(indices[0].numpy(), codebook_size=config.codebook_size,
                         codebook_fingerprint=model.codebook_fingerprint(), grid=(grid, grid), has_cls_token=True)
    raw_bytes = indices.shape[1] * config.vision_config.hidden_size * 2
    print(f"edge: {indices.shape[1]} tokens -> frame of {len(frame)} bytes "
          f"(fp16 features would be {raw_bytes} bytes: {raw_bytes / len(frame):.0f}x smaller)")

    received = decode_frame(frame, codebook_size=config.codebook_size,
                            codebook_fingerprint=model.codebook_fingerprint(), num_tokens=config.num_image_tokens)
    cloud_indices = torch.from_numpy(np.array(received.indices[:, 0])).unsqueeze(0)  # frames are read-only
    assert torch.equal(cloud_indices, indices)

    image_tokens = (grid * grid) if config.vision_feature_select_strategy == "default" else grid * grid + 1
    prompt = torch.cat([torch.full((1, image_tokens), config.image_token_id), torch.tensor([[1, 2, 3]])], dim=1)
    gen = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    from_indices = model.generate(image_indices=cloud_indices, **gen)[0, prompt.shape[1]:]
    from_pixels = model.generate(pixel_values=pixels, **gen)[0, prompt.shape[1]:]
    print(f"cloud: tokens generated from indices {from_indices.tolist()}")
    print(f"       tokens generated from pixels  {from_pixels.tolist()} -> identical: {torch.equal(from_indices, from_pixels)}")


if __name__ == "__main__":
    main()
