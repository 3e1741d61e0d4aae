"""Branch kinds: modules that each turn their parameters into one k×k kernel and bias.

A branch's ``kernel(like, size)`` returns ``(kernel, bias)`` of shape
``((C_out, C_in // groups, kh, kw), (C_out,))`` in kernel size ``size``, *before* the
branch's outer BatchNorm (the layer stacks all outer BNs into one). Sequential branches
(1×1 → BN → k×k / avg-pool) are composed analytically: their inner BN is an affine map
whose training-mode statistics follow from the input's channel moments (docs/design.md
§3), so the branch is one conv with identical values and gradients; in a training forward
the layer asks for ``kernel_for_batch(moments, ...)``, which also records those statistics.

Each kind is one entry of :data:`BRANCH_KINDS` (``Branch.kind`` → class); a new kind is a
:class:`BranchModule` subclass and :func:`register_branch_kind`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import fusion
from .batchnorm import running_affine, update_running_stats, uses_batch_stats
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
    _cov: Tensor | None = None  # computed once, by the first branch that needs it

    def cov(self) -> Tensor:
        """``(G, C/G, C/G)``, biased, from centred inputs."""
        # a plain attribute, not functools.cached_property: its lock stops torch.compile
        if self._cov is None:
            self._cov = _Covariance.apply(self.rows)
        return self._cov

    def projected_variance(self, weight: Tensor) -> Tensor:
        """``diag(W Σ Wᵀ)`` for ``weight`` ``(G, M/G, C/G)``: the variance of each output of a
        1×1 conv over the input, ``(M,)``. Through Σ costs ``M·C²/G`` per branch (and Σ itself
        ``n·C²/G``, once per layer), and keeps only ``C²/G`` for backward; from the ``n`` rows it
        costs ``n·M·C/G`` and keeps ``n·(M + C)/G``. The rows win on both only when there are
        fewer of them than channels (an MLP's small batch); a conv's ``B·H·W`` rows go through Σ."""
        channels = weight.shape[-1]
        if self.count < channels and self._cov is None:
            centred = weight @ (self.rows - self.rows.mean(2, keepdim=True))  # (G, M/G, n)
            return centred.square().mean(2).flatten()
        return ((weight @ self.cov()) * weight).sum(-1).flatten()


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


class BranchModule(nn.Module):
    """What a branch kind provides; built as ``cls(spec: Branch, geom: Geometry)``."""

    # Whether kernel_for_batch needs the channel moments of the layer input (an inner BN
    # that normalises with batch statistics); computing them costs a pass over the input.
    needs_moments: bool = False

    def kernel(self, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        """``(kernel (C_out, C_in/g, *size), bias (C_out,))`` with any inner BN in eval form;
        made in ``like``'s dtype and device."""
        raise NotImplementedError

    def kernel_for_batch(self, moments: Moments | None, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        """The kernel of a training forward over a batch with channel ``moments``: an inner BN
        normalises as it would in this forward and, in training mode, records the batch in
        its running statistics (as ``nn.BatchNorm``'s forward does). Default: :meth:`kernel`."""
        return self.kernel(like, size)

    def block_group(self, geom: Geometry) -> str:
        """How block connectivity runs the branch at its own cost (see ``RepConv2d.block_groups``):
        ``"pointwise"``: its kernel at size 1×1, as a 1×1 conv; ``"pool"``: that 1×1 conv, then
        the layer's avg-pool; ``"kxk"``: the full kernel."""
        return "kxk"


class ConvBranch(BranchModule):
    """conv(kh×kw) → [outer BN], centred in the layer's kernel."""

    def __init__(self, spec: Branch, geom: Geometry):
        super().__init__()
        self.groups = geom.groups
        self.weight = _conv_weight(geom.out_channels, geom.in_channels // geom.groups, spec.kernel)

    def kernel(self, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        return fusion.pad_kernel(self.weight, size), self.weight.new_zeros(self.weight.shape[0])

    def block_group(self, geom: Geometry) -> str:
        return "pointwise" if self.weight.shape[2:] == (1, 1) else "kxk"


class FixedBranch(BranchModule):
    """Identity or avg-pool → [outer BN]: a constant kernel, no parameters."""

    def __init__(self, spec: Branch, geom: Geometry):
        super().__init__()
        self.kind, self.channels, self.groups = spec.kind, geom.out_channels, geom.groups

    def kernel(self, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        make = fusion.identity_kernel if self.kind == "identity" else fusion.avg_pool_kernel
        return make(self.channels, self.groups, size, like=like), like.new_zeros(self.channels)

    def block_group(self, geom: Geometry) -> str:
        return "pointwise" if self.kind == "identity" else "kxk"


class SequentialBranch(BranchModule):
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

    def batch_affine(self, moments: Moments) -> tuple[Tensor, Tensor]:
        """The inner BN as ``(scale, shift)`` in a training forward over input ``moments``: what
        the BN itself would use, batch statistics if :func:`uses_batch_stats` (by its own
        ``training`` flag, not the layer's), which it then records in its running ones (in
        training mode); else its running statistics."""
        bn = self.bn1
        if not uses_batch_stats(bn):
            return running_affine(bn)
        groups = moments.rows.shape[0]  # not .cov(): that would compute the covariance
        w1 = self.conv1.reshape(groups, -1, self.conv1.shape[1])  # (G, M/G, C_in/G)
        mean = (w1 @ moments.mean.reshape(groups, -1, 1)).flatten()
        var = moments.projected_variance(w1)  # diag(W₁ Σ W₁ᵀ), group by group
        update_running_stats(bn, mean, var, moments.count)
        return fusion.bn_affine(mean, var, bn.weight, bn.bias, bn.eps)

    def kernel(self, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        return self._composed(running_affine(self.bn1), like, size)

    def kernel_for_batch(self, moments: Moments | None, like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        inner = running_affine(self.bn1) if moments is None else self.batch_affine(moments)
        return self._composed(inner, like, size)

    def block_group(self, geom: Geometry) -> str:
        return "pool" if self.to_avg and geom.dilation == (1, 1) else "kxk"

    def _composed(self, inner: tuple[Tensor, Tensor], like: Tensor, size: tuple[int, int]) -> fusion.Kernel:
        first = fusion.fold_conv_bn(self.conv1, None, *inner)
        if self.to_avg:
            second = fusion.avg_pool_kernel(first[1].numel(), self.groups, size, like=like)
        else:
            second = self.conv2
        return fusion.merge_1x1_kxk(first, (second, like.new_zeros(second.shape[0])), self.groups)


# ``Branch.kind`` → the module that implements it (the kinds are described at recipes.Branch)
BRANCH_KINDS: dict[str, type[BranchModule]] = {
    "conv": ConvBranch,
    "identity": FixedBranch,
    "avg": FixedBranch,
    "conv_kxk": SequentialBranch,
    "conv_avg": SequentialBranch,
}


def register_branch_kind(kind: str, module: type[BranchModule]) -> None:
    """Add a branch kind: recipes may then list ``Branch(name, kind, ...)``."""
    if kind in BRANCH_KINDS:
        raise ValueError(f"branch kind {kind!r} is already registered")
    BRANCH_KINDS[kind] = module


def make_branch(spec: Branch, geom: Geometry) -> BranchModule:
    if spec.kind not in BRANCH_KINDS:
        raise ValueError(
            f"branch {spec.name!r}: unknown kind {spec.kind!r}; choose one of {', '.join(BRANCH_KINDS)}"
        )
    return BRANCH_KINDS[spec.kind](spec, geom)
