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
    """One training forward's mixing weights: ``(N, S, N)``, or ``(B, N, S, N)`` with neural drop."""
    shuffle = stochastic > 0 and bool(torch.rand((), generator=generator) < stochastic)
    partition = (
        random_partition(streams, branches, generator) if shuffle else canonical_partition(streams, branches)
    )
    matrix = mixing_matrix(partition, streams, branches)
    if neural_drop > 0:
        keep = pair_keep_mask(batch, streams, branches, neural_drop, generator)
        matrix = matrix[None] * keep[:, None]
    return matrix
