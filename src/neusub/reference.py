"""A literal, slow, obviously-correct forward of :class:`~neusub.layers.RepConv2d` and
:class:`~neusub.layers.RepLinear` (the one reference implementation of the project).

:func:`literal_forward` evaluates a layer the straightforward way, like the
official code and the DBB/ACNet/RepVGG/MobileOne repositories do: every branch on
its own, with its own small kernel, for every input stream; sequential branches
as ``1×1 conv → BN → pad with the BN's zero-input value → k×k conv (or avg-pool)``;
each branch's outer BatchNorm over all S streams of that branch together; then the
``N·S`` pairs are partitioned into output streams. Nothing is composed
analytically, stacked into one conv or mixed by an einsum.

It reads the *same* parameters and buffers as the layer it is given (no copies):
gradients flow into the layer's parameters, and in training mode the layer's
running statistics are updated exactly as ``nn.BatchNorm2d`` would update them.
A RepLinear is evaluated as the same branches on ``(rows, D, 1, 1)`` (recipes at k = 1).
It is the ground truth for the tests of the fast path and the baseline of
``benchmarks/layer.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import RepConv2d, RepLinear, _RepLayer
from .partition import canonical_partition, mixing_matrix
from .recipes import Branch, build_branches

__all__ = ["literal_forward", "branch_channels", "avg_pool", "pad_with"]


# --------------------------------------------------------------------------- BatchNorm


def _start_batch(bn: nn.modules.batchnorm._BatchNorm, training: bool) -> float:
    """What ``nn.BatchNorm2d.forward`` does before normalising: count the batch and
    return the exponential-average factor (``1 / num_batches_tracked`` when momentum is None)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def _batch_norm(
    bn: nn.modules.batchnorm._BatchNorm,
    x: Tensor,
    training: bool,
    momentum: float,
    channels: Tensor | None = None,
) -> Tensor:
    """``F.batch_norm`` with ``bn``'s parameters and buffers, restricted to ``channels``.

    In training mode the batch statistics are those of ``x`` and the running buffers
    (of the selected channels) are updated in place, as ``nn.BatchNorm2d`` does.
    """

    def pick(t: Tensor | None) -> Tensor | None:
        return t if t is None or channels is None else t[channels]

    use_batch_stats = training or bn.running_mean is None
    # nn.BatchNorm's rule: the running buffers are used in eval and updated in training if tracked
    track = (bn.track_running_stats or not training) and bn.running_mean is not None
    running_mean = pick(bn.running_mean) if track else None
    running_var = pick(bn.running_var) if track else None
    if channels is not None and running_mean is not None:  # indexing copied them
        running_mean, running_var = running_mean.clone(), running_var.clone()
    out = F.batch_norm(
        x, running_mean, running_var, pick(bn.weight), pick(bn.bias), use_batch_stats, momentum, bn.eps
    )
    if channels is not None and use_batch_stats and running_mean is not None:
        with torch.no_grad():  # write the updated slices back into the layer's buffers
            bn.running_mean[channels] = running_mean
            bn.running_var[channels] = running_var
    return out


def _value_at_zero(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, training: bool) -> Tensor:
    """``BN(0)`` per channel, with the statistics ``bn`` uses for ``x`` (batch or running)."""
    if training or bn.running_mean is None:
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    value = (0.0 - mean) / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        value = value * bn.weight
    if bn.bias is not None:
        value = value + bn.bias
    return value


def branch_channels(layer: RepConv2d, branch: int) -> Tensor:
    """Indices of ``layer.bn``'s channels that belong to ``branch`` (in output-channel order).

    The stacked BatchNorm orders its ``N·C_out`` channels as ``(groups, branch, C_out // groups)``,
    leaving out those of branches without BN (``layer.normed_channels`` lists the kept ones).
    """
    groups, n, c_out = layer.geom.groups, layer.num_branches, layer.geom.out_channels
    per_group = c_out // groups
    full = torch.tensor([(g * n + branch) * per_group + c for g in range(groups) for c in range(per_group)])
    if layer.normed_channels is not None:
        full = torch.searchsorted(layer.normed_channels.cpu(), full)
    return full.to(layer.bn.weight.device if layer.bn.weight is not None else None)


def _post_norm(layer: RepConv2d, out: Tensor, training: bool) -> Tensor:
    """The BatchNorm after the branch sum on streams ``(S', B, C, H, W)``, written out: the
    statistics of the stream sum; stream s gets ``γ (y_s − μ/S') / σ + β/S'``."""
    bn = layer.post_bn
    momentum = _start_batch(bn, training)
    total = out.sum(0)
    if training or bn.running_mean is None:
        mean, var = total.mean((0, 2, 3)), total.var((0, 2, 3), unbiased=False)
        _batch_norm(bn, total, training, momentum)  # updates the running statistics
    else:
        mean, var = bn.running_mean, bn.running_var
    view = (-1, 1, 1)
    scale = bn.weight.view(view) / torch.sqrt(var.view(view) + bn.eps)
    return (out - mean.view(view) / out.shape[0]) * scale + bn.bias.view(view) / out.shape[0]


# --------------------------------------------------------------------------- branch pieces


def avg_pool(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """Average pooling with ``count_include_pad=True``; a fixed averaging conv when dilated."""
    if dilation in (1, (1, 1)):
        return F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True)
    channels = x.shape[1]
    weight = x.new_full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]))
    return F.conv2d(x, weight, None, stride, padding, dilation, groups=channels)


def pad_with(x: Tensor, value: Tensor, padding) -> Tensor:
    """Pad ``x`` (B, C, H, W) by ``padding`` with the per-channel ``value`` (DBB's BN-and-pad)."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    b, c, h, w = x.shape
    out = value.reshape(1, c, 1, 1).expand(b, c, h + 2 * ph, w + 2 * pw).clone()
    out[:, :, ph : ph + h, pw : pw + w] = x
    return out


def _branch_outputs(layer: RepConv2d, spec: Branch, module: nn.Module, streams: list[Tensor]) -> list[Tensor]:
    """One branch, before its outer BN, on every input stream: a list of S tensors."""
    g = layer.geom
    if spec.kind == "conv":
        # own small kernel, centred in the layer's kernel by its own padding
        padding = tuple(
            p - d * (k - s) // 2 for p, d, k, s in zip(g.padding, g.dilation, g.kernel, spec.kernel)
        )
        return [F.conv2d(x, module.weight, None, g.stride, padding, g.dilation, g.groups) for x in streams]
    if spec.kind == "identity":
        return list(streams)
    if spec.kind == "avg":
        return [avg_pool(x, g.kernel, g.stride, g.padding, g.dilation) for x in streams]
    if spec.kind in ("conv_kxk", "conv_avg"):
        firsts = [F.conv2d(x, module.conv1, None, 1, 0, 1, g.groups) for x in streams]
        # inner BN: statistics over all S streams together (one batch), running stats updated
        together = torch.cat(firsts, 0)
        training = module.bn1.training  # each BN by its own mode, as nn.BatchNorm2d
        momentum = _start_batch(module.bn1, training)
        normed = _batch_norm(module.bn1, together, training, momentum)
        fill = _value_at_zero(module.bn1, together, training)
        outs = []
        for chunk in normed.split([t.shape[0] for t in firsts], 0):
            padded = pad_with(chunk, fill, g.padding)
            if spec.kind == "conv_kxk":
                outs.append(F.conv2d(padded, module.conv2, None, g.stride, 0, g.dilation, g.groups))
            else:
                outs.append(avg_pool(padded, g.kernel, g.stride, (0, 0), g.dilation))
        return outs
    raise ValueError(f"literal_forward: unknown branch kind {spec.kind!r}")


# --------------------------------------------------------------------------- partition


def _as_partition(mixing: Tensor, streams: int, branches: int) -> Tensor | None:
    """Pair ids ``(N, S)`` if ``mixing`` is a 0/1 partition of the ``N·S`` pairs, else None."""
    if mixing.dim() != 3:
        return None
    flat = mixing.reshape(branches, streams * branches)
    if not bool(((flat == 0) | (flat == 1)).all()):
        return None
    if not bool((flat.sum(1) == streams).all() and (flat.sum(0) == 1).all()):
        return None
    return torch.stack([row.nonzero().flatten() for row in flat])


def _connect_ns(pairs: list[list[Tensor]], mixing: Tensor) -> Tensor:
    """``pairs[src][j]`` (B, C, H, W) → ``(N, B, C, H, W)``: output i = Σ pairs mixed into i."""
    s, n = len(pairs), len(pairs[0])
    stacked = torch.stack([pairs[src][j] for src in range(s) for j in range(n)])  # pair id src·N + j
    partition = _as_partition(mixing, s, n)
    if partition is not None:  # gather each group's S pairs and sum them
        grouped = stacked[partition.flatten().to(stacked.device)]
        return grouped.reshape(n, s, *stacked.shape[1:]).sum(1)
    # weighted mixing (e.g. neural drop): weights (N, S, N) or per sample (B, N, S, N)
    weights = mixing.to(device=stacked.device, dtype=stacked.dtype)
    outputs = []
    for i in range(n):
        total = torch.zeros_like(stacked[0])
        for p in range(s * n):
            src, j = divmod(p, n)
            if weights.dim() == 3:
                total = total + weights[i, src, j] * stacked[p]
            else:
                total = total + weights[:, i, src, j].reshape(-1, 1, 1, 1) * stacked[p]
        outputs.append(total)
    return torch.stack(outputs)


# --------------------------------------------------------------------------- forward


def literal_forward(layer: _RepLayer, x: Tensor, mixing: Tensor | None = None) -> Tensor:
    """The output of ``layer`` on ``x``, computed branch by branch and stream by stream.

    ``x``: a bundle ``(S, B, C, H, W)`` with ``S == layer.in_streams`` (a plain
    ``(B, C, H, W)`` tensor is one stream); for a RepLinear ``(S, B, [T,] D)`` or plain.
    Every BatchNorm follows its own ``training`` flag (a frozen BN uses its running
    statistics). Returns what ``layer(x)`` returns for its connectivity:

    - ``"ns"``: ``(N, B, C', H', W')``, output i = sum of the S pairs that ``mixing``
      sends to it. ``mixing`` is ``(N, S, N)`` with ``mixing[i, l, j] = 1`` iff pair
      (stream l, branch j) feeds output i (see :mod:`neusub.partition`), or per-sample
      weights ``(B, N, S, N)`` (neural drop); ``None`` is the canonical partition
      (output i = branch i over every stream), which is what the layer uses in eval
      mode and when ``stochastic == neural_drop == 0``.
    - ``"block"``: ``(B, C', H', W')``, the sum of every branch (S = 1).
    - ``"naive"``: ``(S·N, B, C', H', W')``, every pair, pair id ``l·N + j``.
    """
    if not isinstance(layer, _RepLayer):
        raise TypeError(f"literal_forward takes a RepConv2d or RepLinear, got {type(layer).__name__}")
    if layer.deployed:
        raise ValueError("literal_forward needs the training structure; the layer is already deployed")
    if layer.is_plain(x):
        x = x.unsqueeze(0)
    if isinstance(layer, RepLinear):  # (S, B, [T,] D) → (S, rows, D, 1, 1), and back
        out = _literal_conv_forward(layer, x.reshape(x.shape[0], -1, x.shape[-1], 1, 1), mixing)
        out = out.reshape(-1, *x.shape[1:-1], layer.geom.out_channels)
        return out[0] if layer.connectivity == "block" else out
    return _literal_conv_forward(layer, x, mixing)


def _literal_conv_forward(layer: _RepLayer, x: Tensor, mixing: Tensor | None) -> Tensor:
    if x.dim() != 5 or x.shape[0] != layer.in_streams or x.shape[2] != layer.geom.in_channels:
        raise ValueError(
            f"literal_forward: expected a bundle (S={layer.in_streams}, B, {layer.geom.in_channels}, H, W), "
            f"got shape {tuple(x.shape)}"
        )
    specs = build_branches(layer.recipe, layer.geom)
    modules = list(layer.branches.values())
    if [spec.name for spec in specs] != list(layer.branches):
        raise ValueError("literal_forward: the layer's branches do not match its recipe")
    streams = list(x.unbind(0))
    n, s = len(specs), len(streams)
    training = layer.bn.training

    # pairs[src][j] = outer_bn_j(branch_j(x_src)), outer BN statistics over the S streams of branch j
    pairs: list[list[Tensor | None]] = [[None] * n for _ in range(s)]
    momentum = _start_batch(layer.bn, training)
    for j, (spec, module) in enumerate(zip(specs, modules)):
        outs = _branch_outputs(layer, spec, module, streams)
        if not spec.norm:  # enters the sum as it is
            for src, out in enumerate(outs):
                pairs[src][j] = out
            continue
        together = torch.cat(outs, 0)
        normed = _batch_norm(layer.bn, together, training, momentum, branch_channels(layer, j))
        for src, chunk in enumerate(normed.split([o.shape[0] for o in outs], 0)):
            pairs[src][j] = chunk

    if layer.connectivity == "block":
        if s != 1:
            raise ValueError("connectivity='block' takes one stream")
        out = torch.stack(pairs[0]).sum(0, keepdim=True)
    elif layer.connectivity == "naive":
        out = torch.stack([pairs[src][j] for src in range(s) for j in range(n)])
    else:
        if mixing is None:
            mixing = mixing_matrix(canonical_partition(s, n), s, n)
        if mixing.shape[-3:] != (n, s, n) or mixing.dim() not in (3, 4):
            raise ValueError(f"literal_forward: mixing must be (N, S, N) = {(n, s, n)} or (B, N, S, N)")
        out = _connect_ns(pairs, mixing)
    if layer.post_bn is not None:
        out = _post_norm(layer, out, layer.post_bn.training)
    return out[0] if layer.connectivity == "block" else out
