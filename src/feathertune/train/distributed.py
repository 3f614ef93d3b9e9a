"""One process or many: the little the loop needs to know about torchrun.

Under `torchrun --nproc_per_node=N`, RANK/WORLD_SIZE/LOCAL_RANK are set; the backend is gloo on
the CPU and NCCL on GPUs. Without them everything here is a no-op, so the loop has one code path.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup() -> Processes:
    """Join the process group if torchrun started us; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Processes(rank=rank, world=world, device=device)


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()


def sum_across(procs: Processes, values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over all processes (for logging: loss, tokens)."""
    if not procs.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=procs.device if procs.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(procs: Processes, flag: bool) -> bool:
    """Rank 0's decision, seen by every process (e.g. 'stop: the loss is not finite')."""
    if not procs.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=procs.device if procs.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def teardown(procs: Processes) -> None:
    if procs.distributed and dist.is_initialized():
        dist.destroy_process_group()
