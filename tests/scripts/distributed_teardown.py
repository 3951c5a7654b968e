"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): the finetune's teardown, many times over. Each round sets up
a group, trains a DDP module a step, leaves an all-gather of Python-owned tensors in flight, leaves the group as
the finetune does (`leave_process_group`), then frees the DDP module, whose reducer holds the group's last
reference. With a plain barrier instead (`--plain`), this deadlocks within 20 rounds here."""

import os
import sys

import torch
import torch.distributed as dist

from transformers_alignedvq.training.finetune import leave_process_group


def plain_leave() -> None:
    dist.barrier()
    dist.destroy_process_group()


def main(rounds: int, leave) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1, world, rank == 0)
    torch.set_num_threads(1)
    for i in range(rounds):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"round{i}", store), rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        dist.all_gather([torch.empty(3) for _ in range(world)], torch.randn(3), async_op=True)
        leave()
        del model
    print(f"rank {rank}: {rounds} teardowns", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), plain_leave if "--plain" in sys.argv else leave_process_group)
