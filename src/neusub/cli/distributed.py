"""DDP for ``neusub train`` under torchrun: which process this is, and keeping ranks identical."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..copies import weightless_copy


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


# torch's DDP compares a gradient's strides with its bucket's exactly, also in dimensions of size
# 1, where strides say nothing about the layout: the gradient of a 1×1 kernel computed from a
# channels_last input, [C, 1, C, C] against [C, 1, 1, 1], is laid out exactly like its bucket
# (pytorch/pytorch#157862). Only that case is ignored; any other stride mismatch is still shown.
SPURIOUS_STRIDES = (
    r"Grad strides do not match bucket view strides[\s\S]*"
    r"grad\.sizes\(\) = \[\d+, (\d+), 1, 1\], strides\(\) = \[\1, 1, \1, \1\]"
)


def wrap(model: nn.Module, env: Dist, find_unused: bool) -> nn.Module:
    """``model`` in DDP when there are several processes (the module training steps call).
    ``find_unused``: whether some parameter gets no gradient (:func:`ungraded_parameters`); DDP
    then looks for them at every step, and warns when told to look where there are none."""
    if env.world == 1:
        return model
    warnings.filterwarnings("ignore", message=SPURIOUS_STRIDES, category=UserWarning)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def ungraded_parameters(model: nn.Module, sample_shape: Sequence[int]) -> list[str]:
    """The parameters a training step leaves without a gradient, found by one forward and
    backward of a weightless copy on meta tensors: e.g. the inner BN shifts of composed branches
    (exactly zero before a training-mode BN, the fast path leaves them out of the graph). Where
    the dry run fails (a module without meta kernels), every parameter is assumed to be at risk."""
    shadow = weightless_copy(model).train()
    dtype = next((p.dtype for p in shadow.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.random.fork_rng(devices=[]):  # the partitions draw from the RNG
            shadow(torch.empty((2, *sample_shape), device="meta", dtype=dtype)).sum().backward()
    except Exception:  # a dry run only: find_unused_parameters is then set to be safe
        return [name for name, _ in shadow.named_parameters()]
    return [name for name, p in shadow.named_parameters() if p.requires_grad and p.grad is None]


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
