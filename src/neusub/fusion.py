"""Fusion math: small pure functions on tensors, no modules.

Conventions: a conv kernel has shape ``(C_out, C_in // groups, kh, kw)``; a
"branch" in eval mode is a pair ``(kernel, bias)`` with ``bias`` of shape
``(C_out,)``. Every helper tensor is made on the dtype and device of its input,
so the functions work unchanged in fp64, bf16 and on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

Kernel = tuple[Tensor, Tensor]  # (kernel, bias)


def bn_affine(
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """BatchNorm as a per-channel affine map ``y = scale * x + shift``; all ``(C,)``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def fold_conv_bn(kernel: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor) -> Kernel:
    """Conv (``kernel``, optional ``bias``) followed by a per-channel affine map.

    ``kernel``: ``(C_out, ...)``; ``scale``, ``shift``: ``(C_out,)``. Also used for
    Linear + BatchNorm1d, whose weight is ``(D_out, D_in)``.
    """
    shape = (-1,) + (1,) * (kernel.dim() - 1)
    fused_bias = shift if bias is None else bias * scale + shift
    return kernel * scale.reshape(shape), fused_bias


def pad_kernel(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad a ``(.., kh, kw)`` kernel to the centre of ``size`` (1×1, 1×k, k×1 → k×k).

    Exact when the small conv's padding is the large conv's padding minus
    ``dilation * (size - small) // 2`` per axis, i.e. both are "same"-centred.
    """
    dh, dw = size[0] - kernel.shape[-2], size[1] - kernel.shape[-1]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(
            f"cannot centre a {tuple(kernel.shape[-2:])} kernel in {tuple(size)}: "
            "the difference of sizes must be even and non-negative"
        )
    return torch.nn.functional.pad(kernel, (dw // 2, dw // 2, dh // 2, dh // 2))


def sum_branches(branches: list[Kernel]) -> Kernel:
    """Parallel branches on the same input: kernels and biases add."""
    kernels, biases = zip(*branches)
    return torch.stack(kernels).sum(0), torch.stack(biases).sum(0)


def identity_kernel(channels: int, groups: int, size: tuple[int, int], *, like: Tensor) -> Tensor:
    """``(C, C // groups, kh, kw)`` kernel whose grouped conv is the identity."""
    per_group = channels // groups
    kernel = like.new_zeros(channels, per_group, *size)
    rows = torch.arange(channels, device=like.device)
    kernel[rows, rows % per_group, size[0] // 2, size[1] // 2] = 1
    return kernel


def avg_pool_kernel(channels: int, groups: int, size: tuple[int, int], *, like: Tensor) -> Tensor:
    """Average pooling (``count_include_pad=True``) as a ``(C, C // groups, kh, kw)`` kernel."""
    per_group = channels // groups
    kernel = like.new_zeros(channels, per_group, *size)
    rows = torch.arange(channels, device=like.device)
    kernel[rows, rows % per_group] = 1.0 / (size[0] * size[1])
    return kernel


def merge_1x1_kxk(first: Kernel, second: Kernel, groups: int) -> Kernel:
    """Sequential 1×1 → k×k (both with ``groups``) as one k×k conv, group by group.

    ``first``: ``((M, C_in/g, 1, 1), (M,))``; ``second``: ``((C_out, M/g, kh, kw), (C_out,))``.
    The k×k conv is assumed to see ``first``'s bias in its zero-padded border
    (DBB's BN-and-pad), which makes the merge exact at every output position.
    """
    k1, b1 = first
    k2, b2 = second
    c_out, m = k2.shape[0], k1.shape[0]
    grouped1 = k1.reshape(groups, m // groups, k1.shape[1])  # (g, M/g, C_in/g)
    grouped2 = k2.reshape(groups, c_out // groups, m // groups, *k2.shape[2:])  # (g, C_out/g, M/g, kh, kw)
    kernel = _ComposeKernels.apply(grouped2, grouped1).reshape(c_out, k1.shape[1], *k2.shape[2:])
    bias = b2 + torch.einsum("gomhw,gm->go", grouped2, b1.reshape(groups, -1)).reshape(c_out)
    return kernel, bias


class _ComposeKernels(torch.autograd.Function):
    """``einsum("gomhw,gmi->goihw")`` that saves its two inputs, not the permuted copies
    einsum's own backward keeps (up to 4608×2048 floats per layer of a ResNet)."""

    @staticmethod
    def forward(ctx, second: Tensor, first: Tensor) -> Tensor:
        ctx.save_for_backward(second, first)
        return torch.einsum("gomhw,gmi->goihw", second, first)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        second, first = ctx.saved_tensors
        grad_second = torch.einsum("goihw,gmi->gomhw", grad, first) if ctx.needs_input_grad[0] else None
        grad_first = torch.einsum("goihw,gomhw->gmi", grad, second) if ctx.needs_input_grad[1] else None
        return grad_second, grad_first
