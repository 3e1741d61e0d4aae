"""What training a multi-branch structure costs against the plain network it deploys to.

Counted, not timed: the parameters of both networks, and the FLOPs of the convolutions and
matrix products of one forward of each on meta tensors (nothing is computed), so the estimate
follows from the recipes' branches and the layers' stream counts. A backward costs about twice
its forward in both networks, so the forward's multiple is a training step's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .copies import weightless_copy
from .deploy import deploy


@dataclass(frozen=True)
class TrainingCost:
    """Parameters and forward FLOPs of a training structure and of its plain network."""

    params_training: int
    params_plain: int
    flops_plain: float  # per sample
    flops_per_sample: float  # of the training structure
    flops_per_step: float  # of the training structure whatever the batch: composing branch kernels

    def multiple(self, batch: int) -> float:
        """Training FLOPs of a step of ``batch`` samples over the plain network's."""
        return (self.flops_per_sample + self.flops_per_step / batch) / max(self.flops_plain, 1.0)

    def describe(self, batch: int) -> str:
        """The parameter counts and the FLOPs multiple at ``batch``, in words."""
        return (
            f"{_count(self.params_training)} parameters ({_count(self.params_plain)} deployed); a training "
            f"step ≈ {self.multiple(batch):.1f}× the plain network's FLOPs at batch {batch}"
        )


def training_cost(model: nn.Module, sample_shape: Sequence[int]) -> TrainingCost:
    """:class:`TrainingCost` of the training structure ``model`` (made by ``neusub.convert`` or
    ``neusub.create_model``) against ``neusub.deploy(model)``, for inputs of ``sample_shape``
    (one sample, e.g. ``(3, 32, 32)``). Runs three forwards on meta tensors; no weight is read."""
    shadow = weightless_copy(model)  # the forwards below compute nothing and read no weight
    # Two batch sizes separate what a step computes per sample from what it computes once
    # (the kernels of composed sequential branches).
    small, large = (_forward_flops(shadow.train(), (batch, *sample_shape)) for batch in (2, 4))
    per_sample = (large - small) / 2
    params_training = sum(p.numel() for p in model.parameters())
    plain = deploy(shadow, inplace=True).eval()  # the shadow is done with: fuse it in place
    return TrainingCost(
        params_training=params_training,
        params_plain=sum(p.numel() for p in plain.parameters()),
        flops_plain=_forward_flops(plain, (1, *sample_shape)),
        flops_per_sample=per_sample,
        flops_per_step=max(small - 2 * per_sample, 0.0),
    )


class _FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the ops torch has a formula for (``torch.utils.flop_counter``)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def _forward_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of ``model`` (on the meta device) on an input of ``shape``."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    counter = _FlopCount()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), counter:  # partitions draw from the RNG
        model(torch.empty(shape, device="meta", dtype=dtype))
    return counter.flops


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
