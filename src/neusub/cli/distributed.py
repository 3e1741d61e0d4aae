"""DDP for ``neusub train`` under torchrun: which process this is, and keeping ranks identical."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), world, device)


# Two notices of torch's DDP that say nothing to a user of neusub: that find_unused_parameters
# found nothing to skip (a model without composed branches: the flag is set for those that have
# them), and that a gradient's strides differ from its bucket's (1×1 weights whose gradients come
# in another layout; DDP copies them into the bucket all the same).
DDP_NOTICES = (
    r"find_unused_parameters=True was specified in DDP constructor, but did not find any unused",
    r"Grad strides do not match bucket view strides",
)


def wrap(model: nn.Module, env: Dist) -> nn.Module:
    """``model`` in DDP when there are several processes (the module training steps call)."""
    if env.world == 1:
        return model
    for notice in DDP_NOTICES:
        warnings.filterwarnings("ignore", message=notice)
    ids = [env.device.index] if env.device.type == "cuda" else None
    # Inner BN shifts of composed branches get no gradient (it is exactly zero before a
    # training-mode BN, so the fast path leaves them out of the graph): let DDP skip them.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def broadcast_buffers(model: nn.Module, env: Dist) -> None:
    """BN running statistics from rank 0, so every rank holds the same model."""
    if env.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def ranks_identical(model: nn.Module, env: Dist) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (True without DDP)."""
    if env.world == 1:
        return True
    state = torch.cat([t.detach().double().flatten().cpu() for t in model.state_dict().values()])
    gathered = [torch.empty_like(state) for _ in range(env.world)]
    dist.all_gather(gathered, state)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def barrier(env: Dist) -> None:
    if env.world > 1:
        dist.barrier()


def finish(env: Dist) -> None:
    if env.world > 1:
        dist.destroy_process_group()
