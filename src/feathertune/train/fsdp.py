"""`train.distributed: fsdp`: one model sharded across the torchrun processes (PyTorch's FSDP2), for
bases too big to copy onto every device as DDP does.

`shard(model)` applies `torch.distributed.fsdp.fully_shard` bottom-up; each group it makes is
all-gathered in one collective before its forward, freed after it, and its gradients are
reduce-scattered after its backward:

    for each decoder block (the classes transformers names in `_no_split_modules`):
        fully_shard(block)      the block's frozen base and the adapter's tensors on it
    fully_shard(model)          embeddings, head, and what adapters hold outside the blocks

A group may hold frozen and trainable tensors: FSDP2 reduce-scatters only the tensors that have a
gradient (the adapter's), and it requires one dtype of the trainable ones, which an adapter
attached to a model has. Giving the adapter groups of its own (`fully_shard([q_proj, k_proj, …])`
inside a block) was tried and dropped: FSDP's hooks on those layers change the order in which
autograd adds up the gradients of the input they share, so the adapter then differs from one
process's in the last bits (~4e-8) where per-block groups give the identical file. The average
over processes of the reduce-scatter is DDP's all-reduce's, so the loop scales the loss the same
way under both.

A 4-bit (QLoRA) base shards too: its codes are stored in a float dtype (quant.quantize's
quant_storage, bitsandbytes' advice for FSDP) and its Linear4bit keeps the quantization state on
the layer, where its forward finds it again after FSDP has swapped the weight for a plain one.

Every process holds 1/world of each parameter, as a DTensor shard. Checkpoints and the adapter
file hold full tensors, the same files as one process writes: `gathered(model)` all-gathers the
parameters (every process must enter it), `full_optimizer_state` the optimizer's moments, and on
resume `placed(param, full)` cuts a full tensor back to this process's shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(model: nn.Module) -> nn.Module:
    """Shard `model` in place across the default process group; returns it.

    Call it after the adapter is attached and before the optimizer is built: FSDP2 replaces every
    parameter by a new DTensor one.
    """
    for block in decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes transformers will not split across devices
    (`_no_split_modules`, e.g. LlamaDecoderLayer), else the entries of its longest nn.ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside, every sharded parameter is a full tensor again (save_adapter, the checkpoint's
    tensors); afterwards the shards are back. A collective: every process enters it. Nothing to
    do for a model that is not sharded."""
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in groups:
        module.unshard()
    try:
        yield
    finally:
        for module in groups:
            module.reshard()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with each sharded tensor (AdamW's moments) gathered whole, in the
    same order on every process (a collective: all of them call it)."""
    saved = optimizer.state_dict()
    state = {index: {key: _full(value) for key, value in values.items()} for index, values in saved["state"].items()}
    return {**saved, "state": state}


def placed(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` as `like` holds it: this process's shard of it where `like` is a DTensor, else itself."""
    if not isinstance(like, DTensor):
        return full
    # Every process read the same file: each keeps its own piece, nothing is sent.
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def placed_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A state_dict of full tensors (what a checkpoint holds) with each tensor that has its
    parameter's shape placed like that parameter, ready for `optimizer.load_state_dict`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        param = params[int(index)]
        state[index] = {key: placed(param, value) if _shaped_like(value, param) else value
                        for key, value in values.items()}
    return {**saved, "state": state}


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _shaped_like(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape)
