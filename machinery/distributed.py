"""torchrun set-up, DDP / FSDP2 wrapping, and a teardown that cannot deadlock."""
import os

import torch
import torch.distributed as dist

from machinery import backbones


def setup():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: one process per GPU (NCCL), or gloo on the CPU.
    -> (ddp, rank, world, local rank, device)."""
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, local, device


def distribute(model, ddp, local, device, fsdp=False, grad_checkpointing=False):
    """Gradient checkpointing, then FSDP2 (fsdp) or DDP. -> (the module to call, trained params)."""
    if grad_checkpointing:
        backbones.checkpoint_activations(model.backbone)
    if fsdp and ddp:  # FSDP2: shard each decoder layer, then the rest; parameters become DTensors.
        # Sharding moves each piece to this rank's device as it goes: no GPU ever holds the whole model.
        from torch.distributed.fsdp import fully_shard
        for layer in model.base_model().language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        net = model
    else:
        model.to(device)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if device.type == "cuda" else None, find_unused_parameters=True) if ddp else model
    return net, [p for p in model.parameters() if p.requires_grad]   # after sharding (FSDP replaces them)


def barrier(ddp):
    if ddp:
        dist.barrier()


def mean_over_ranks(x, ddp):
    """x summed over ranks, divided by their number (the logged loss of the global batch)."""
    if ddp:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def teardown():
    """The caller must have dropped every reference to DDP (its reducer) first: destroy_process_group
    then shuts gloo down with the GIL released. Freed last (at exit) the reducer holds the group's
    last reference, and gloo's teardown can deadlock on the GIL."""
    dist.barrier()
    dist.destroy_process_group()
