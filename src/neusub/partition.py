"""Neural substitution: which (input stream, branch) pairs feed which output stream.

Pairs are numbered ``p = l * N + j`` for input stream ``l`` and branch ``j``. A
partition is a ``(N, S)`` tensor of pair ids: row ``i`` lists the pairs summed
into output stream ``i``. All randomness comes from a torch generator (the
global CPU one by default), so ``torch.manual_seed`` reproduces every draw and
CPU and CUDA runs draw the same partitions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def canonical_partition(streams: int, branches: int) -> Tensor:
    """Without shuffling: output ``i`` = branch ``i`` over every input stream."""
    inputs = torch.arange(streams)
    return inputs[None, :] * branches + torch.arange(branches)[:, None]


def random_partition(streams: int, branches: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random partition of the ``S·N`` pairs into ``N`` groups of ``S``."""
    return torch.randperm(streams * branches, generator=generator).view(branches, streams)


def mixing_matrix(partition: Tensor, streams: int, branches: int) -> Tensor:
    """``(N, S, N)`` 0/1 matrix ``M[i, l, j] = 1`` iff pair ``(l, j)`` feeds output ``i``."""
    matrix = torch.zeros(branches, streams * branches)
    matrix.scatter_(1, partition, 1.0)
    return matrix.view(branches, streams, branches)


def pair_keep_mask(
    batch: int, streams: int, branches: int, p: float, generator: torch.Generator | None = None
) -> Tensor:
    """Neural drop: ``(B, S, N)`` per-sample pair weights, 0 (dropped) or ``1 / (1 - p)``."""
    keep = (torch.rand(batch, streams, branches, generator=generator) >= p).to(torch.float32)
    return keep / (1.0 - p) if p < 1.0 else keep


def draw_mixing(
    batch: int,
    streams: int,
    branches: int,
    stochastic: float,
    neural_drop: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One training forward's mixing weights: ``(N, S, N)``, or ``(B, N, S, N)`` with neural drop.

    With ``0 < stochastic`` a coin ``torch.rand(()) < stochastic`` and a permutation are drawn on
    every call, the coin choosing between it and the canonical partition without reading the
    coin back (torch.compile keeps one graph)."""
    partition = canonical_partition(streams, branches)
    if stochastic > 0:
        shuffle = torch.rand((), generator=generator) < stochastic
        partition = torch.where(shuffle, random_partition(streams, branches, generator), partition)
    matrix = mixing_matrix(partition, streams, branches)
    if neural_drop > 0:
        keep = pair_keep_mask(batch, streams, branches, neural_drop, generator)
        matrix = matrix[None] * keep[:, None]
    return matrix


def _routes(mixing: Tensor) -> tuple[list[tuple[int, int, int]], Tensor | None]:
    """Mixing matrix → ``[(output i, stream l, branch j)]`` and pair weights ``(S, N)`` or
    ``(B, S, N)`` (``None`` for a plain 0/1 partition)."""
    per_sample = mixing.dim() == 4
    out_axis = 1 if per_sample else 0
    if bool(((mixing != 0).sum(out_axis) > 1).any()):
        raise ValueError("mixing matrix is not a partition: a (stream, branch) pair feeds several outputs")
    target = (mixing != 0).sum(0).argmax(0) if per_sample else (mixing != 0).to(torch.uint8).argmax(0)
    streams, branches = target.shape
    routes = [(int(target[l, j]), l, j) for l in range(streams) for j in range(branches)]
    weights = mixing.sum(out_axis)
    return routes, None if not per_sample and bool((weights == 1).all()) else weights


class _PartitionSum(torch.autograd.Function):
    """``out[i] = Σ w_lj · z[l, :, :, j]`` over the pairs routed to output ``i``.

    ``z``: ``(S, B, G, N, C, L)`` → ``(n_out, B, G, C, L)``. Strided reads and in-place adds:
    no permuted copy of ``z`` in forward, one write of ``grad_z`` in backward.
    """

    @staticmethod
    def forward(ctx, z: Tensor, weights: Tensor | None, routes: list, n_out: int) -> Tensor:
        out = z.new_empty(n_out, z.shape[1], z.shape[2], z.shape[4], z.shape[5])
        filled = [False] * n_out
        for i, l, j in routes:
            pair = z[l, :, :, j] if weights is None else z[l, :, :, j] * _weight(weights, l, j)
            out[i].add_(pair) if filled[i] else out[i].copy_(pair)
            filled[i] = True
        for i in (i for i in range(n_out) if not filled[i]):
            out[i].zero_()
        ctx.routes, ctx.z_shape, ctx.weights = routes, z.shape, weights
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_z, weights = grad.new_empty(ctx.z_shape), ctx.weights
        for i, l, j in ctx.routes:
            if weights is None:
                grad_z[l, :, :, j].copy_(grad[i])
            else:
                torch.mul(grad[i], _weight(weights, l, j), out=grad_z[l, :, :, j])
        return grad_z, None, None, None


def _weight(weights: Tensor, l: int, j: int) -> Tensor:
    w = weights[..., l, j]
    return w.view(-1, 1, 1, 1) if w.dim() == 1 else w


def partition_sum(z: Tensor, mixing: Tensor) -> Tensor:
    """Apply a partition's mixing matrix to the pair tensor ``z`` ``(S, B, G, N, C, L)``."""
    if torch.compiler.is_compiling():
        return _gathered_sum(z, mixing)
    routes, weights = _routes(mixing)
    if weights is not None:
        weights = weights.to(device=z.device, dtype=z.dtype)
    return _PartitionSum.apply(z, weights, routes, mixing.shape[-3])


def _gathered_sum(z: Tensor, mixing: Tensor) -> Tensor:
    """:func:`partition_sum` as tensor ops whose shapes do not depend on the draw, for
    torch.compile (which fuses the gather and the sum into one pass over ``z``). The same values:
    each output adds its pairs in the same order (ascending pair id)."""
    streams, branches = z.shape[0], z.shape[3]
    mixing = mixing.to(z.device)
    pattern = (mixing != 0) if mixing.dim() == 3 else (mixing != 0).any(0)  # (N, S, N)
    flat = pattern.reshape(pattern.shape[0], -1).to(torch.uint8)
    pair_ids = flat.argsort(dim=1, descending=True, stable=True)[:, :streams]  # (n_out, S), ascending
    pairs = z[pair_ids // branches, :, :, pair_ids % branches]  # (n_out, S, B, G, C, L)
    if mixing.dim() == 4:  # neural drop: each pair's weight per sample
        weights = mixing.sum(1).reshape(mixing.shape[0], -1)[:, pair_ids]  # (B, n_out, S)
        pairs = pairs * weights.permute(1, 2, 0).reshape(*pair_ids.shape, -1, 1, 1, 1).to(z.dtype)
    return pairs.sum(1)
