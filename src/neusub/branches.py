"""Branch modules: each turns its parameters into one k×k kernel and bias.

A branch's ``kernel(moments, like)`` returns ``(kernel, bias)`` of shape
``((C_out, C_in // groups, kh, kw), (C_out,))`` in the layer's kernel size, *before*
the branch's outer BatchNorm (the layer stacks all outer BNs into one). Sequential
branches (1×1 → BN → k×k / avg-pool) are composed analytically: their inner BN
is an affine map whose training-mode statistics follow from the input's channel
moments (docs/design.md §3), so the branch is one conv with identical values and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from . import fusion
from .recipes import Branch, Geometry


@dataclass
class Moments:
    """Channel statistics of a layer input over all streams, batch and positions.

    The covariance is kept per group of a grouped layer (only the diagonal blocks of the
    full matrix ever enter a grouped composition): ``(G, C/G, C/G)``, ``G = 1`` when dense;
    it is computed on first use, from ``rows``, the input itself as ``(G, C/G, count)``."""

    mean: Tensor  # (C,)
    rows: Tensor  # (G, C/G, count)
    count: int

    @cached_property
    def cov(self) -> Tensor:
        """``(G, C/G, C/G)``, biased, from centred inputs."""
        return _Covariance.apply(self.rows)

    def projected_variance(self, weight: Tensor) -> Tensor:
        """``diag(W Σ Wᵀ)`` for ``weight`` ``(G, M/G, C/G)``: the variance of each output of a
        1×1 conv over the input, ``(M,)``. Through Σ costs ``M·C²/G`` (and Σ itself ``n·C²/G``);
        from the rows ``n·M·C/G``, cheaper when there are fewer rows than channels (an MLP)."""
        groups, outputs, channels = weight.shape
        if self.count * outputs < (self.count + outputs) * channels and "cov" not in self.__dict__:
            centred = weight @ (self.rows - self.rows.mean(2, keepdim=True))  # (G, M/G, n)
            return centred.square().mean(2).flatten()
        return ((weight @ self.cov) * weight).sum(-1).flatten()


class _Covariance(torch.autograd.Function):
    """Biased covariance of each group ``(G, c, L) → (G, c, c)`` from centred values (two-pass).

    Saves only the input (which the layer's conv keeps anyway) and the mean; the
    centred copy is recomputed in backward. The gradient is exact:
    ``∂cov/∂x = (G + Gᵀ)/n · (x − m)`` (the mean's own term sums to zero).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        mean = x.mean(2, keepdim=True)
        centred = x - mean
        ctx.save_for_backward(x, mean)
        return (centred @ centred.transpose(1, 2)) / x.shape[2]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, mean = ctx.saved_tensors
        sym = (grad + grad.transpose(1, 2)) / x.shape[2]
        return sym @ (x - mean)


def input_moments(x: Tensor, groups: int = 1) -> Moments:
    """Moments of ``x``: ``(N, C, H, W)`` (best channels_last) or ``(N, C)`` (rows × features),
    with the covariance of each of ``groups`` channel groups."""
    rows = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() > 2 else x  # a view for channels_last
    flat = rows.T.reshape(groups, x.shape[1] // groups, rows.shape[0])  # (G, C/G, rows)
    return Moments(rows.mean(0), flat, rows.shape[0])


def _conv_weight(out_ch: int, in_per_group: int, kernel: tuple[int, int]) -> nn.Parameter:
    weight = torch.empty(out_ch, in_per_group, *kernel)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
    return nn.Parameter(weight)


class ConvBranch(nn.Module):
    """conv(kh×kw) → [outer BN], centred in the layer's kernel."""

    def __init__(self, spec: Branch, geom: Geometry):
        super().__init__()
        self.groups = geom.groups
        self.weight = _conv_weight(geom.out_channels, geom.in_channels // geom.groups, spec.kernel)

    def kernel(self, moments: Moments | None, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        return fusion.pad_kernel(self.weight, size), self.weight.new_zeros(self.weight.shape[0])


class FixedBranch(nn.Module):
    """Identity or avg-pool → [outer BN]: a constant kernel, no parameters."""

    def __init__(self, spec: Branch, geom: Geometry):
        super().__init__()
        self.kind, self.channels, self.groups = spec.kind, geom.out_channels, geom.groups

    def kernel(self, moments: Moments | None, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        make = fusion.identity_kernel if self.kind == "identity" else fusion.avg_pool_kernel
        return make(self.channels, self.groups, size, like=like), like.new_zeros(self.channels)


class SequentialBranch(nn.Module):
    """1×1 → BN → (k×k conv | avg-pool) → [outer BN], composed into one k×k conv."""

    def __init__(self, spec: Branch, geom: Geometry):
        super().__init__()
        self.groups = geom.groups
        self.to_avg = spec.kind == "conv_avg"
        mid = geom.out_channels if self.to_avg else spec.expand * geom.in_channels
        self.conv1 = _conv_weight(mid, geom.in_channels // geom.groups, (1, 1))
        self.bn1 = nn.BatchNorm2d(mid)
        if not self.to_avg:
            self.conv2 = _conv_weight(geom.out_channels, mid // geom.groups, geom.kernel)

    @property
    def needs_moments(self) -> bool:
        """Whether the inner BN normalises with batch statistics (then it needs the input's moments)."""
        return uses_batch_stats(self.bn1)

    def inner_affine(self, moments: Moments | None) -> tuple[Tensor, Tensor]:
        """The inner BN as ``(scale, shift)``. With ``moments`` (a training forward), what the BN
        itself would use: batch statistics if :func:`uses_batch_stats` (by its own ``training``
        flag, not the layer's), updating its running ones; else, and without moments, running ones."""
        bn = self.bn1
        if moments is None or not uses_batch_stats(bn):
            return running_affine(bn)
        groups = moments.rows.shape[0]  # not .cov: that would compute the covariance
        w1 = self.conv1.reshape(groups, -1, self.conv1.shape[1])  # (G, M/G, C_in/G)
        mean = (w1 @ moments.mean.reshape(groups, -1, 1)).flatten()
        var = moments.projected_variance(w1)  # diag(W₁ Σ W₁ᵀ), group by group
        if bn.training:
            update_running_stats(bn, mean, var, moments.count)
        return fusion.bn_affine(mean, var, bn.weight, bn.bias, bn.eps)

    def kernel(self, moments: Moments | None, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        first = fusion.fold_conv_bn(self.conv1, None, *self.inner_affine(moments))
        if self.to_avg:
            second = fusion.avg_pool_kernel(first[1].numel(), self.groups, size, like=like)
        else:
            second = self.conv2
        return fusion.merge_1x1_kxk(first, (second, like.new_zeros(second.shape[0])), self.groups)


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """``nn.BatchNorm``'s own rule: batch statistics in training mode, or when it keeps none."""
    return bn.training or bn.running_mean is None


def running_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``bn`` in eval mode as ``(scale, shift)``; a BN that keeps no running statistics has none."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{bn} keeps no running statistics (track_running_stats=False), so it has no fixed affine "
            "form to fuse or deploy; build it with track_running_stats=True"
        )
    return fusion.bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


@torch.no_grad()
def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    """What ``F.batch_norm`` does to the running buffers in training mode."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * count / max(count - 1, 1)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)


_BRANCH_TYPES = {
    "conv": ConvBranch,
    "identity": FixedBranch,
    "avg": FixedBranch,
    "conv_kxk": SequentialBranch,
    "conv_avg": SequentialBranch,
}


def make_branch(spec: Branch, geom: Geometry) -> nn.Module:
    return _BRANCH_TYPES[spec.kind](spec, geom)
