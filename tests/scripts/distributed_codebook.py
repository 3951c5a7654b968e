"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): trains a tiny AlignedVQ model with different data on
each rank and checks that the EMA codebooks stay identical, and that the quantizer's distributed EMA step
equals a single-process step on the union of the batches."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import IMAGE_SIZE, NUM_PATCHES, prompt_ids, tiny_alignedvq  # noqa: E402
from transformers_alignedvq.models.llava_alignedvq.quantizer import VectorQuantizer  # noqa: E402


def gathered(tensor):
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    # 1. a real training loop, no DDP wrapper: only the quantizer's own synchronisation keeps codebooks equal
    model = tiny_alignedvq(seed=0, codebook_size=8, dead_code_threshold=0.5, ema_decay=0.8)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank sees different images
    ids = prompt_ids()
    labels = ids.clone()
    labels[:, :NUM_PATCHES] = -100
    start = model.model.alignedvq.quantizer.codebook.clone()
    for _ in range(6):
        pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * (1 + rank)
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    quantizer = model.model.alignedvq.quantizer
    assert not torch.equal(quantizer.codebook, start), "training must move the codebook"
    for name in ("codebook", "cluster_size", "embed_sum"):
        copies = gathered(getattr(quantizer, name))
        assert all(torch.equal(copies[0], c) for c in copies[1:]), f"{name} differs across ranks"

    # 2. distributed EMA == single-process EMA on the concatenated batch
    torch.manual_seed(0)
    q = VectorQuantizer(6, 5, num_codebooks=2, num_groups=2, ema_decay=0.7, dead_code_threshold=0.0).train()
    data = torch.randn(2, 40, 6, generator=torch.Generator().manual_seed(7))
    q(data[rank])
    torch.manual_seed(0)
    single = VectorQuantizer(6, 5, num_codebooks=2, num_groups=2, ema_decay=0.7, dead_code_threshold=0.0)
    # run the single-process reference outside the process group
    dist_state = dist.is_initialized
    dist.is_initialized = lambda: False
    try:
        single.train()(data.reshape(-1, 6))
    finally:
        dist.is_initialized = dist_state
    torch.testing.assert_close(q.codebook, single.codebook, atol=1e-5, rtol=1e-5)
    if rank == 0:
        print("codebooks identical on", dist.get_world_size(), "ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
