"""Training-mode ``BatchNorm(op(x, W))`` that keeps only ``x`` and ``W`` for backward.

The stacked conv of an NS layer has ``N·S`` times the channels of one stream, and a
normal BatchNorm saves that output for its backward: it is the largest tensor a
training step keeps (docs/design.md §3). Here backward runs ``op`` again instead, which
costs one more forward conv per layer and saves that tensor. Gradients and
running statistics are those of ``nn.BatchNorm`` in training mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .batchnorm import update_running_stats

Op = Callable[[Tensor, Tensor], Tensor]


class _RecomputedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gamma, beta, op: Op, eps: float):
        y = op(x, weight)
        dims = [d for d in range(y.dim()) if d != 1]
        # Statistics in fp32 at least, as BatchNorm accumulates them (y is bf16 under AMP).
        stat_dtype = torch.promote_types(y.dtype, torch.float32)
        var, mean = torch.var_mean(y.to(stat_dtype), dim=dims, correction=0)
        invstd = torch.rsqrt(var + eps)
        # Eval-mode BN with the batch's own statistics is the training-mode output.
        out = torch.batch_norm(y, gamma, beta, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        ctx.save_for_backward(x, weight, gamma, mean, invstd)
        ctx.op, ctx.eps, ctx.compute_dtype, ctx.has_beta = op, eps, y.dtype, beta is not None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_var):
        x, weight, gamma, mean, invstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(need_x)
            w_leaf = weight.detach().requires_grad_(need_w)
            # The forward ran under the caller's autocast; cast the same way explicitly.
            with torch.autocast(x.device.type, enabled=False):
                y = ctx.op(x_leaf.to(ctx.compute_dtype), w_leaf.to(ctx.compute_dtype))
        grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(memory_format=_memory_format(y)),
            y.detach(),
            gamma,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [True, gamma is not None, ctx.has_beta],
        )
        leaves = [t for t, need in ((x_leaf, need_x), (w_leaf, need_w)) if need]
        grads = iter(torch.autograd.grad(y, leaves, grad_y.to(y.dtype)) if leaves else ())
        grad_x = next(grads) if need_x else None
        grad_w = next(grads) if need_w else None
        return grad_x, grad_w, grad_gamma, grad_beta, None, None


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def recomputed_batch_norm(op: Op, x: Tensor, weight: Tensor, bias: Tensor | None, bn: nn.Module) -> Tensor:
    """``bn(op(x, weight) + bias)`` for a BatchNorm in training mode, saving only ``x`` and ``weight``.

    ``op(x, weight) -> (rows, C, ...)``. The per-channel ``bias`` cannot change a
    training-mode BN's output; it only enters the running mean.
    """
    out, mean, var = _RecomputedBatchNorm.apply(x, weight, bn.weight, bn.bias, op, bn.eps)
    count = out.numel() // out.shape[1]
    if count < 2:
        raise ValueError(
            f"BatchNorm in training needs more than 1 value per channel, got output shape {tuple(out.shape)}"
        )
    update_running_stats(bn, mean if bias is None else mean + bias.detach(), var, count)
    return out
