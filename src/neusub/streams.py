"""Stream bundles and the ops that keep the invariant (docs/design.md §2) exact on them.

A *bundle* is one tensor with the stream axis first: ``(S, B, ...)``. Every op
here satisfies, in eval mode, ``Σ_s out_s == plain_op(Σ_s in_s)``, and has a
plain deployed form returned by ``fuse()`` (timm's fuse protocol), used by
:func:`neusub.deploy` and by ``reparameterize()`` (in place, idempotent).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ACTIVATIONS, activation, deployed_module
from .batchnorm import running_affine, update_running_stats, uses_batch_stats
from .deploy import to_plain
from .fusion import bn_affine

MAX_NAIVE_STREAMS = 4096


def is_proxy(x: object) -> bool:
    """Whether ``x`` is a torch.fx ``Proxy`` (symbolic tracing in progress)."""
    return isinstance(x, torch.fx.Proxy)


def check_streams(value: object, what: str = "in_streams") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what}={value!r} is invalid; use an integer >= 1")
    return value


def check_probability(value: float, what: str) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what}={value!r} is out of range; use a probability in [0, 1]")
    return float(value)


class StreamModule(nn.Module):
    """Base of every training-structure module with a plain deployed form.

    Subclasses implement ``forward_streams`` (training structure) and ``fuse()``
    (a new plain module computing the same function of the stream sum).
    """

    in_streams: int = 1
    # "Plain tensor or bundle?", decided by is_plain alone: with one input stream, a tensor of
    # ``plain_dim`` dims (4 for ``(B, C, H, W)``) is a plain tensor, taken as one stream, and
    # the output is plain too. None: inputs are bundles ``(S, B, ...)`` (elementwise modules
    # with one stream take either).
    plain_dim: int | None = None

    def is_plain(self, x: Tensor) -> bool:
        """Whether ``x`` is a plain tensor rather than a stream bundle ``(S, B, ...)``."""
        return self.in_streams == 1 and self.plain_dim is not None and x.dim() == self.plain_dim

    @property
    def out_streams(self) -> int:
        return self.in_streams

    def set_in_streams(self, streams: int) -> int:
        """Set the static input stream count; returns ``out_streams``."""
        self.in_streams = check_streams(streams)
        return self.out_streams

    @property
    def deployed(self) -> bool:
        return "plain" in self._modules

    def forward(self, *args: Tensor) -> Tensor:
        if self.deployed:
            return self.plain(*args)
        if is_proxy(args[0]):  # torch.fx traces a stream module as one leaf call
            tracer = args[0].tracer
            if getattr(self, "bundle_io", False):  # hands out bundles: the graph must merge them
                from .fx import trace_bundles

                trace_bundles(tracer)
            return tracer.create_proxy("call_module", tracer.path_of_module(self), args, {})
        return self.forward_streams(*args)

    def forward_streams(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def fuse(self) -> nn.Module:
        raise NotImplementedError

    def reparameterize(self) -> None:
        """Switch to the deployed form in place (idempotent)."""
        if self.deployed:
            return
        plain = self.fuse()
        self._parameters.clear()
        self._buffers.clear()
        self._modules.clear()
        self.plain = plain

    def _bundle(self, x: Tensor) -> Tensor:
        """``x`` as a bundle of ``in_streams`` streams (a plain tensor as one), checked."""
        if self.is_plain(x):
            return x.unsqueeze(0)
        if self.plain_dim is not None and x.dim() != self.plain_dim + 1:
            raise ValueError(
                f"{type(self).__name__} expects a bundle (S={self.in_streams}, ...) of "
                f"{self.plain_dim + 1} dims, got shape {tuple(x.shape)}"
            )
        return self._check_stream_count(x)

    def _check_stream_count(self, x: Tensor) -> Tensor:
        if x.shape[0] != self.in_streams:
            raise ValueError(
                f"{type(self).__name__} was built for in_streams={self.in_streams} but got "
                f"{x.shape[0]} streams (input shape {tuple(x.shape)}); pass a bundle with the "
                "stream axis first or build the layer with the matching in_streams"
            )
        return x

    def extra_repr(self) -> str:
        return f"in_streams={self.in_streams}, out_streams={self.out_streams}"


# --------------------------------------------------------------------------- guided ops


class GuidedActivation(StreamModule):
    """Guided activation (paper Alg. 2): stream s → ``x_s · g(Σ_s x_s)``.

    Exact for every ``act(z) = z · g(z)`` of :mod:`neusub.activations` (relu, relu6,
    leaky_relu, silu, gelu erf and tanh, hardswish, mish, and any registered one).
    Input: a bundle ``(S, B, ...)``; with ``in_streams == 1`` any tensor.
    ``guided=False`` is the paper's ablation: every stream activated on its own,
    ``act(x_s)``. The deployed ``act(Σ_s x_s)`` then differs from the training network.
    """

    def __init__(
        self, act: str = "relu", in_streams: int = 1, negative_slope: float = 0.01, guided: bool = True
    ):
        super().__init__()
        activation(act)  # an unknown name is an error here, not at the first forward
        self.act, self.negative_slope, self.guided = act, negative_slope, guided
        self.in_streams = check_streams(in_streams)

    def forward_streams(self, x: Tensor) -> Tensor:
        if self.in_streams == 1 or not self.guided:  # nothing to guide: act(x) = x · g(x)
            return ACTIVATIONS[self.act].gate(x, x, self.negative_slope)
        x = self._bundle(x)
        return ACTIVATIONS[self.act].gate(x, x.sum(0), self.negative_slope)

    def fuse(self) -> nn.Module:
        if not self.guided and self.in_streams > 1:
            warnings.warn(
                f"GuidedActivation(guided=False) over {self.in_streams} streams deploys to act(Σ x_s), "
                "which differs from the training network's per-stream act(x_s); use guided=True for "
                "an exact deploy",
                stacklevel=2,
            )
        return deployed_module(self.act, self.negative_slope)

    def extra_repr(self) -> str:
        return f"{self.act!r}, " + ("guided=False, " if not self.guided else "") + super().extra_repr()


class GuidedMaxPool2d(StreamModule):
    """Max-pool whose indices come from the stream sum, gathered in every stream."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0, in_streams: int = 1):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride or kernel_size, padding
        self.in_streams = check_streams(in_streams)

    plain_dim = 4

    def forward_streams(self, x: Tensor) -> Tensor:
        if self.is_plain(x):  # a plain tensor stays plain
            return self.forward_streams(x[None])[0]
        x = self._bundle(x)
        _, index = F.max_pool2d(x.sum(0), self.kernel_size, self.stride, self.padding, return_indices=True)
        s, b, c = x.shape[:3]
        flat_index = index.flatten(2).unsqueeze(0).expand(s, -1, -1, -1)
        out = x.flatten(3).gather(3, flat_index)
        return out.view(s, b, c, *index.shape[2:])

    def fuse(self) -> nn.Module:
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding)


class Gate(nn.Module):
    """Plain ``x · gate(x)`` (e.g. squeeze-excite); the deployed form of :class:`StreamGate`."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class SqueezeExcite(nn.Module):
    """Plain squeeze-excite gate: ``(B, C, H, W) → (B, C, 1, 1)`` in (0, 1)."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        hidden = max(1, int(round(channels * rd_ratio)))
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.act = act()
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class StreamGate(StreamModule):
    """Gate computed once from the stream sum, applied to every stream (SE, attention gates)."""

    def __init__(self, gate: nn.Module, in_streams: int = 1):
        super().__init__()
        self.gate = gate
        self.in_streams = check_streams(in_streams)

    plain_dim = 4

    def forward_streams(self, x: Tensor) -> Tensor:
        if self.is_plain(x):  # a plain tensor stays plain
            return x * self.gate(x)
        x = self._bundle(x)
        return x * self.gate(x.sum(0))

    def fuse(self) -> nn.Module:
        return Gate(self.gate)


class StreamDropout(StreamModule):
    """Dropout with one mask shared by all streams."""

    def __init__(self, p: float = 0.5, in_streams: int = 1):
        super().__init__()
        self.p = check_probability(p, "p")
        self.in_streams = check_streams(in_streams)

    def forward_streams(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        one_stream = self._bundle(x)[0] if self.in_streams > 1 else x
        return x * F.dropout(torch.ones_like(one_stream), self.p, training=True)

    def fuse(self) -> nn.Module:
        return nn.Dropout(self.p)


class StreamDropPath(StreamModule):
    """Drop-path (stochastic depth): one per-sample mask shared by all streams.

    Input: a bundle ``(S, B, ...)``; a tensor of ``plain_dim`` dims (e.g. 4 for
    ``(B, C, H, W)``) is taken as one plain stream when ``in_streams == 1``.
    """

    def __init__(self, p: float = 0.0, in_streams: int = 1, plain_dim: int | None = None):
        super().__init__()
        self.p = check_probability(p, "drop_path")
        self.in_streams = check_streams(in_streams)
        self.plain_dim = plain_dim

    def forward_streams(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        bundle = self._bundle(x)
        keep = bundle.new_empty((1, bundle.shape[1]) + (1,) * (bundle.dim() - 2)).bernoulli_(1.0 - self.p)
        out = bundle * (keep / (1.0 - self.p) if self.p < 1.0 else keep)
        return out.view_as(x)

    def fuse(self) -> nn.Module:
        return nn.Identity()


def sum_batch_norm(streams: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``bn`` on streams ``(S, B, C, ...)`` with the statistics of their sum: stream s gets
    ``γ (x_s − μ/S) / σ + β/S``, so the streams sum to ``bn(Σ_s x_s)`` (running statistics
    updated as ``bn`` would update them; a frozen BN uses its running ones)."""
    if uses_batch_stats(bn):
        total = streams.sum(0)
        var, mean = torch.var_mean(total, dim=[d for d in range(total.dim()) if d != 1], correction=0)
        update_running_stats(bn, mean, var, total.numel() // total.shape[1])
        scale, shift = bn_affine(mean, var, bn.weight, bn.bias, bn.eps)
    else:
        scale, shift = running_affine(bn)
    shape = (-1,) + (1,) * (streams.dim() - 3)
    return torch.addcmul((shift / streams.shape[0]).view(shape), streams, scale.view(shape))


class StreamBatchNorm2d(StreamModule):
    """BatchNorm with statistics of the stream sum; stream s gets ``γ(x_s − μ/S)/σ + β/S``.

    Deployed as a depthwise 1×1 conv with bias (no BatchNorm left).
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, in_streams: int = 1
    ):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)
        self.in_streams = check_streams(in_streams)

    plain_dim = 4

    def forward_streams(self, x: Tensor) -> Tensor:
        if self.is_plain(x):  # a plain tensor stays plain
            return self.forward_streams(x[None])[0]
        return sum_batch_norm(self._bundle(x), self.bn)

    def fuse(self) -> nn.Module:
        bn = self.bn
        scale, shift = running_affine(bn)
        conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True)
        conv.to(device=scale.device, dtype=scale.dtype)
        with torch.no_grad():
            conv.weight.copy_(scale.view(-1, 1, 1, 1))
            conv.bias.copy_(shift)
        return conv


class PerStream(StreamModule):
    """Apply a *linear, bias-free* module (avg-pool, flatten, ...) to every stream."""

    def __init__(self, module: nn.Module, in_streams: int = 1):
        super().__init__()
        self.module = module
        self.in_streams = check_streams(in_streams)

    def forward_streams(self, x: Tensor) -> Tensor:
        x = self._bundle(x)
        out = self.module(x.reshape(-1, *x.shape[2:]))
        return out.reshape(x.shape[0], x.shape[1], *out.shape[1:])

    def fuse(self) -> nn.Module:
        return self.module


class Add(nn.Module):
    """Plain ``a + b``; the deployed form of :class:`StreamAdd`."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class StreamAdd(StreamModule):
    """Residual add of two bundles with equal S, or of a 1-stream tensor into an S-stream bundle.

    ``in_streams`` is the count of the first operand; ``other_streams`` of the second
    (1 or ``in_streams``); a 1-stream operand is split as ``x / S`` into each stream.
    """

    def __init__(self, in_streams: int = 1, other_streams: int | None = None):
        super().__init__()
        self.in_streams, self.other_streams = self._check(in_streams, other_streams or in_streams)

    @staticmethod
    def _check(streams: int, other_streams: int) -> tuple[int, int]:
        streams = check_streams(streams)
        other_streams = check_streams(other_streams, "other_streams")
        if other_streams not in (1, streams):
            raise ValueError(
                f"StreamAdd cannot add {other_streams} streams to {streams}; "
                "the operands need equal stream counts, or one of them a single stream"
            )
        return streams, other_streams

    def set_in_streams(self, streams: int, other_streams: int | None = None) -> int:
        # validate first: a refused count leaves the module unchanged
        self.in_streams, self.other_streams = self._check(streams, other_streams or self.other_streams)
        return self.out_streams

    def forward_streams(self, a: Tensor, b: Tensor) -> Tensor:
        if self.in_streams == 1:
            return a + b
        a = self._bundle(a)
        if self.other_streams == 1:
            if b.dim() == a.dim() and b.shape[0] != 1:
                raise ValueError(
                    f"StreamAdd was built with other_streams=1 but the second operand has "
                    f"{b.shape[0]} streams (shape {tuple(b.shape)}); pass a plain tensor or a "
                    f"1-stream bundle, or build it with other_streams={self.in_streams}"
                )
            plain = b[0] if b.dim() == a.dim() else b
            return a + plain / self.in_streams
        return a + self._bundle(b)

    def fuse(self) -> nn.Module:
        return Add()


class StreamMerge(StreamModule):
    """Sum the streams: bundle ``(S, B, ...)`` → plain ``(B, ...)`` (the head).

    With ``plain_dim`` set, a tensor of that many dims is already plain and passes through.
    """

    def __init__(self, in_streams: int = 1, plain_dim: int | None = None):
        super().__init__()
        self.in_streams = check_streams(in_streams)
        self.plain_dim = plain_dim

    @property
    def out_streams(self) -> int:
        return 1

    def forward_streams(self, x: Tensor) -> Tensor:
        if self.is_plain(x):
            return x
        return self._bundle(x).sum(0)

    def fuse(self) -> nn.Module:
        return nn.Identity()


class StreamSequential(nn.Sequential):
    """``nn.Sequential`` that carries stream counts from layer to layer at construction.

    Each child with ``set_in_streams`` gets the running count; plain modules pass
    the count through unchanged. ``out_streams`` is what the last child emits.
    """

    def __init__(self, *modules: nn.Module, in_streams: int = 1):
        super().__init__(*modules)
        self.set_in_streams(in_streams)

    def set_in_streams(self, streams: int) -> int:
        self.in_streams = streams = check_streams(streams)
        for module in self:
            if hasattr(module, "set_in_streams"):
                streams = module.set_in_streams(streams)
        self.out_streams = streams
        return streams

    def fuse(self) -> nn.Module:
        return nn.Sequential(*(to_plain(m) for m in self))
