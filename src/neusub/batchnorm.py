"""BatchNorm bookkeeping: which statistics a BN uses, and every hand-made update of its
running buffers.

The training path often computes a BN's batch statistics itself (an inner BN from the
input's moments, a stream-sum BN, a recomputed BN) or runs the BN without a per-channel
constant that cannot change its output. These functions keep the running buffers exactly
what ``nn.BatchNorm``'s own forward would leave; nothing else in the library writes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fusion

BatchNorm = nn.modules.batchnorm._BatchNorm


def is_batchnorm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d followed by its own ``drop`` and ``act`` modules
    (told by name: timm is optional for the layers)."""
    return type(module).__name__ == "BatchNormAct2d" and hasattr(module, "act") and hasattr(module, "drop")


def is_plain_batchnorm(module: nn.Module) -> bool:
    """torch's own ``BatchNorm{1,2,3}d`` (not a subclass, whose forward may differ) or timm's
    ``BatchNormAct2d``: a BatchNorm whose running affine map is what it computes in eval."""
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or is_batchnorm_act(module)


def uses_batch_stats(bn: BatchNorm) -> bool:
    """``nn.BatchNorm``'s own rule: batch statistics in training mode, or when it keeps none."""
    return bn.training or bn.running_mean is None


def updates_running_stats(bn: BatchNorm) -> bool:
    """Whether a forward of ``bn`` writes its running buffers (training mode, buffers kept)."""
    return bn.training and bn.track_running_stats and bn.running_mean is not None


def running_affine(bn: BatchNorm) -> tuple[Tensor, Tensor]:
    """``bn`` in eval mode as ``(scale, shift)``; a BN that keeps no running statistics has none."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{bn} keeps no running statistics (track_running_stats=False), so it has no fixed affine "
            "form to fuse or deploy; build it with track_running_stats=True"
        )
    return fusion.bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def rate_of_batch(bn: BatchNorm, ahead: int = 0) -> float:
    """The rate at which batch ``num_batches_tracked + ahead`` enters the running statistics:
    ``momentum``, or ``1 / number`` (a cumulative average) when ``momentum`` is None."""
    if bn.momentum is not None:  # the counter is not read: torch.compile keeps one graph
        return bn.momentum
    return 1.0 / (float(bn.num_batches_tracked) + ahead)


@torch.no_grad()
def count_batch(bn: BatchNorm) -> float | None:
    """Count one training batch (``num_batches_tracked += 1``, as the BN's forward does) and
    return its rate (:func:`rate_of_batch`); None, counting nothing, where the forward updates
    nothing."""
    if not updates_running_stats(bn):
        return None
    bn.num_batches_tracked.add_(1)
    return rate_of_batch(bn)


@torch.no_grad()
def update_running_stats(bn: BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    """What a training-mode forward does to the buffers, from batch statistics computed
    elsewhere: ``mean``, biased ``var`` ``(C,)`` over ``count`` values per channel."""
    rate = count_batch(bn)
    if rate is None:
        return
    unbiased = var * count / max(count - 1, 1)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), rate)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), rate)


@torch.no_grad()
def leave_constant_out(bn: BatchNorm, constant: Tensor) -> bool:
    """Whether the next forward may be ``bn(y)`` instead of ``bn(y + constant)`` (``constant``
    per channel), preparing the running mean for it; False, changing nothing, where the
    caller must add the constant (eval mode; the first batch of a cumulative average).

    A BN with batch statistics removes a per-channel constant from its output (the gradient
    to it is exactly zero), so the training path leaves a bias out of the large tensor it
    normalises; only the running mean, ``(1 − r)·m + r·mean``, would have seen it. The shift
    ``r/(1 − r)·constant`` is made before the forward, not ``r·constant`` after it: the BN's
    backward reads the buffers it was given, and an in-place change after it would fail there."""
    if not updates_running_stats(bn):
        return uses_batch_stats(bn)  # batch statistics and nothing recorded: it cannot matter
    rate = rate_of_batch(bn, ahead=1)
    if rate >= 1.0:
        return False
    bn.running_mean.add_(constant.detach().to(bn.running_mean.dtype), alpha=rate / (1.0 - rate))
    return True


def batch_norm_of_channels(
    bn: BatchNorm, y: Tensor, index: Tensor, constant: Tensor, rate: float | None
) -> Tensor:
    """``bn`` restricted to its channels ``index`` on ``y + constant`` (``y``: ``(B, len(index),
    ...)``, ``constant`` per channel), where a batch is normalised in parts: the batch is
    counted once for all of them (``rate`` from :func:`count_batch`, None: nothing to record)."""
    weight = bn.weight[index] if bn.weight is not None else None
    shift = bn.bias[index] if bn.bias is not None else None
    if not uses_batch_stats(bn):
        y = y + constant.to(y.dtype).reshape(-1, *[1] * (y.dim() - 2))
        mean, var = bn.running_mean[index], bn.running_var[index]
        return F.batch_norm(y, mean, var, weight, shift, False, 0.0, bn.eps)
    if rate is None:
        return F.batch_norm(y, None, None, weight, shift, True, 0.0, bn.eps)
    mean, var = bn.running_mean[index], bn.running_var[index]
    out = F.batch_norm(y, mean, var, weight, shift, True, rate, bn.eps)  # updates the copies
    with torch.no_grad():  # the constant left out of y only moves the mean (see above)
        bn.running_mean[index] = mean + rate * constant.detach().to(mean.dtype)
        bn.running_var[index] = var
    return out
