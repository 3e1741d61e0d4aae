"""The stream rule of every op a network applies to a :class:`~neusub.bundle.Bundle`.

Each rule keeps ``Σ_s out_s == op(Σ_s in_s)``, by the op's class:

- **linear** (conv, linear, average pooling, interpolation, padding, reshapes, indexing,
  concatenation, sums, products with a one-stream factor): every stream on its own; a
  constant term (a bias, a padding value, a one-stream summand) enters as ``c / S``;
- **activations ``act(z) = z · g(z)``** (ReLU, ReLU6 / hardtanh, LeakyReLU, PReLU, SiLU,
  GELU erf and tanh, Hardswish, Mish): guided, stream s → ``x_s · g(Σ x)``;
- **max pooling**: the indices of the stream sum, gathered in every stream;
- **normalisation standing alone** (BatchNorm, LayerNorm, GroupNorm): the statistics of
  the stream sum, stream s → ``γ (x_s − μ/S) / σ + β / S``;
- **dropout**: one mask for all streams;
- **anything else** (a sigmoid gate, softmax, a product of two multi-stream tensors, a
  loss): the op gets the stream sum; the streams merge there (:func:`~neusub.bundle.dispatch`).

Importing this module registers the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from .activations import ACTIVATIONS, REGISTRATION_LISTENERS, clamp_gate
from .bundle import GUIDED, Bundle, Rule, count, merge, merged_call, rule, wrap, write_into

# ---------------------------------------------------------------------- helpers


def _stream_count(values: Any) -> int:
    return max((count(v) for v in tree_leaves(values)), default=1)


def _lifted(x: Tensor, rank: int) -> Tensor:
    """A bundle's streams with singleton dims after the stream axis, to ``rank`` plain dims
    (so that broadcasting aligns them with plain operands of that rank)."""
    inner = x.streams
    missing = rank - (inner.dim() - 1)
    return inner.reshape(inner.shape[0], *([1] * missing), *inner.shape[1:]) if missing > 0 else inner


def _rank(value: Any) -> int:
    return value.dim() if isinstance(value, Tensor) else 0


def _fold(func: Callable, x: Bundle, args: tuple, kwargs: dict) -> Tensor:
    """``func`` on every stream at once, the streams folded into the batch (dim 0)."""
    inner = x.streams
    s, b = inner.shape[:2]
    with torch._C.DisableTorchFunctionSubclass():
        out = func(inner.flatten(0, 1), *args, **kwargs)
    return out.unflatten(0, (s, b))


def _per_stream(func: Callable, args: tuple, kwargs: dict, streams: int) -> Any:
    """``func`` applied to each stream of every bundle argument (one-stream arguments as given),
    with ``torch.vmap`` (a loop when an op has no batching rule)."""
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Bundle)]
    inners = [leaves[i].streams for i in positions]

    def one(*streams: Tensor) -> Any:
        filled = list(leaves)
        for i, stream in zip(positions, streams):
            filled[i] = stream
        a, k = torch.utils._pytree.tree_unflatten(filled, spec)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*a, **k)

    try:
        out = torch.vmap(one)(*inners)
    except Exception:  # no batching rule (or a view vmap cannot express): stream by stream
        results = [one(*(inner[s] for inner in inners)) for s in range(streams)]
        out = (
            tree_map(lambda *xs: torch.stack(xs), *results)
            if isinstance(results[0], (tuple, list))
            else torch.stack(results)
        )
    return tree_map(lambda t: wrap(t) if isinstance(t, Tensor) else t, out)


def _unify(values: list[Any], streams: int) -> list[Any]:
    """Operands of a sum or a concatenation at ``streams`` streams: bundles of another count
    merge to one stream; one-stream operands (tensors, numbers) enter as ``value / S``."""
    out = []
    for value in values:
        if isinstance(value, Bundle) and value.num_streams == streams:
            out.append(value)
            continue
        plain = merge(value)
        out.append(plain / streams if isinstance(plain, (Tensor, int, float)) else plain)
    return out


# ---------------------------------------------------------------------- linear: folded batch

# func -> index of its additive constant (bias / padding value) in the positional arguments
_FOLDED_WITH_BIAS = {
    F.conv1d: 2,
    F.conv2d: 2,
    F.conv3d: 2,
    F.conv_transpose1d: 2,
    F.conv_transpose2d: 2,
    F.conv_transpose3d: 2,
    F.linear: 2,
}
_FOLDED = (
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.interpolate,
    F.upsample,
    F.upsample_bilinear,
    F.upsample_nearest,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.unfold,
    F.fold,
    F.channel_shuffle,
    torch.channel_shuffle,
)


@rule(*_FOLDED_WITH_BIAS)
def _linear_with_bias(func, args, kwargs):
    x, rest = args[0], list(args[1:])
    if not isinstance(x, Bundle) or any(isinstance(a, Bundle) for a in tree_leaves((rest, kwargs))):
        return merged_call(func, args, kwargs, "its weight is a multi-stream tensor")
    s, where = x.num_streams, _FOLDED_WITH_BIAS[func] - 1
    if len(rest) > where and rest[where] is not None:
        rest[where] = rest[where] / s
    elif kwargs.get("bias") is not None:
        kwargs = {**kwargs, "bias": kwargs["bias"] / s}
    return wrap(_fold(func, x, tuple(rest), kwargs))


@rule(*_FOLDED)
def _linear_folded(func, args, kwargs):
    x = args[0]
    if not isinstance(x, Bundle) or any(isinstance(a, Bundle) for a in tree_leaves((args[1:], kwargs))):
        return merged_call(func, args, kwargs, "a multi-stream tensor is not its first argument")
    return wrap(_fold(func, x, args[1:], kwargs))


@rule(F.pad)
def _pad(func, args, kwargs):
    x = args[0]
    if not isinstance(x, Bundle):
        return merged_call(func, args, kwargs, "pads with a multi-stream value")
    names = ("pad", "mode", "value")
    bound = {**dict(zip(names, args[1:])), **kwargs}
    if bound.get("mode", "constant") == "constant" and bound.get("value"):
        bound["value"] = bound["value"] / x.num_streams
    return wrap(_fold(func, x, (), bound))


# ---------------------------------------------------------------------- linear: per stream

# The linear ops whose result may share the input's storage (a view): the bundles on both
# sides are marked ``aliased``, so that an in-place op on either writes the shared streams.
_VIEWS = frozenset(
    {
        torch.flatten,
        Tensor.flatten,
        torch.reshape,
        Tensor.reshape,
        Tensor.view,
        Tensor.view_as,
        torch.permute,
        Tensor.permute,
        torch.transpose,
        Tensor.transpose,
        torch.swapaxes,
        Tensor.swapaxes,
        torch.t,
        Tensor.t,
        torch.squeeze,
        Tensor.squeeze,
        torch.unsqueeze,
        Tensor.unsqueeze,
        torch.movedim,
        Tensor.movedim,
        torch.moveaxis,
        Tensor.moveaxis,
        Tensor.expand,
        Tensor.expand_as,
        torch.narrow,
        Tensor.narrow,
        torch.select,
        Tensor.select,
        torch.unflatten,
        Tensor.unflatten,
        Tensor.__getitem__,
        torch.split,
        Tensor.split,
        torch.chunk,
        Tensor.chunk,
        torch.unbind,
        Tensor.unbind,
        torch.tensor_split,
        Tensor.tensor_split,
        torch.diagonal,
        Tensor.diagonal,
        Tensor.detach,
        torch.detach,
    }
)
_LINEAR = [
    *_VIEWS,
    Tensor.repeat,
    torch.tile,
    Tensor.tile,
    torch.flip,
    Tensor.flip,
    torch.roll,
    Tensor.roll,
    torch.mean,
    Tensor.mean,
    torch.sum,
    Tensor.sum,
    torch.cumsum,
    Tensor.cumsum,
    torch.neg,
    Tensor.neg,
    Tensor.__neg__,
    torch.clone,
    Tensor.clone,
    Tensor.to,
    Tensor.float,
    Tensor.double,
    Tensor.half,
    Tensor.bfloat16,
    Tensor.type,
    Tensor.type_as,
    torch.trace,
    torch.fft.fft,
    torch.fft.rfft,
    torch.fft.ifft,
    torch.fft.fft2,
    torch.fft.rfft2,
    torch.fft.irfft,
    torch.fft.irfft2,
]


@rule(*_LINEAR)
def _linear(func, args, kwargs):
    if isinstance(args[0], Bundle) and func in (Tensor.to, Tensor.type) and _is_memory_format_only(kwargs):
        return wrap(_fold(func, args[0], args[1:], kwargs))
    result = _per_stream(func, args, kwargs, _stream_count((args, kwargs)))
    if func in _VIEWS:
        for bundle in tree_leaves((args[0], result)):
            if isinstance(bundle, Bundle):
                bundle.aliased = True
    return result


def _is_memory_format_only(kwargs: dict) -> bool:
    return "memory_format" in kwargs


@rule(Tensor.contiguous)
def _contiguous(func, args, kwargs):
    return wrap(_fold(func, args[0], args[1:], kwargs))


_MATMUL = (
    torch.matmul,
    Tensor.matmul,
    Tensor.__matmul__,
    Tensor.__rmatmul__,
    torch.mm,
    Tensor.mm,
    torch.bmm,
    Tensor.bmm,
    torch.einsum,
    torch.tensordot,
    F.bilinear,
)


@rule(*_MATMUL)
def _matmul(func, args, kwargs):
    bundles = [a for a in tree_leaves((args, kwargs)) if count(a) > 1]
    if len(bundles) != 1:  # a product of two multi-stream tensors is not linear in either
        return merged_call(func, args, kwargs, "a product of two multi-stream tensors")
    return _per_stream(func, args, kwargs, bundles[0].num_streams)


@rule(torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack, torch.dstack)
def _concatenate(func, args, kwargs):
    tensors, rest = list(args[0]), args[1:]
    streams = _stream_count(tensors)
    if streams == 1:
        return merged_call(func, args, kwargs, "")
    operands = [t if isinstance(t, Bundle) else _repeated(t, streams) for t in _unify(tensors, streams)]
    return _per_stream(func, (operands, *rest), kwargs, streams)


def _repeated(plain: Tensor, streams: int) -> Bundle:
    """A one-stream tensor (already divided by S) as an S-stream bundle of equal streams."""
    return Bundle(plain.unsqueeze(0).expand(streams, *plain.shape))


# ---------------------------------------------------------------------- sums and products

_ADD = {
    torch.add: 1,
    Tensor.add: 1,
    Tensor.__add__: 1,
    Tensor.__radd__: 1,
    torch.sub: -1,
    Tensor.sub: -1,
    Tensor.__sub__: -1,
    torch.subtract: -1,
    Tensor.subtract: -1,
}
_ADD_INPLACE = {Tensor.__iadd__: 1, Tensor.add_: 1, Tensor.__isub__: -1, Tensor.sub_: -1}


def _add(a: Any, b: Any, sign: int, alpha: Any = 1) -> Tensor:
    streams = _stream_count((a, b))
    a, b = _unify([a, b], streams)
    rank = max(_rank(a), _rank(b))
    left = _lifted(a, rank) if isinstance(a, Bundle) else a
    right = _lifted(b, rank) if isinstance(b, Bundle) else b
    factor = sign * alpha
    with torch._C.DisableTorchFunctionSubclass():
        if not isinstance(left, Tensor):  # a number plus a bundle
            return wrap(right * factor + left)
        return wrap(left + right if factor == 1 else torch.add(left, right, alpha=factor))


@rule(*_ADD)
def _sum(func, args, kwargs):
    a, b = args[:2]
    if func is Tensor.__radd__:
        a, b = b, a
    return _add(a, b, _ADD[func], kwargs.get("alpha", args[2] if len(args) > 2 else 1))


@rule(*_ADD_INPLACE)
def _sum_inplace(func, args, kwargs):
    target, other = args[:2]
    return write_into(target, _add(target, other, _ADD_INPLACE[func], kwargs.get("alpha", 1)))


@rule(Tensor.__rsub__, torch.rsub)
def _rsub(func, args, kwargs):
    return _add(args[1], args[0], -1)


_MUL = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.multiply, Tensor.multiply)
_DIV = (
    torch.div,
    Tensor.div,
    Tensor.__truediv__,
    torch.true_divide,
    Tensor.true_divide,
    torch.divide,
    Tensor.divide,
)


def _product(a: Any, b: Any, divide: bool) -> Tensor:
    """``a · b`` (or ``a / b``) with at most one multi-stream operand kept; a second one merges
    (the smaller: a gate, a scale), which is exact: ``Σ_s a_s · Σ_t b_t``."""
    if count(b) > 1 and (divide or count(a) > 1):
        smaller_is_b = divide or b.numel() <= a.numel()
        if smaller_is_b:
            b = merge(b)
        else:
            a = merge(a)
    if count(a) == 1 and count(b) > 1:
        a, b = b, a  # multiplication commutes
    if count(a) == 1:
        with torch._C.DisableTorchFunctionSubclass():
            return merge(a) / merge(b) if divide else merge(a) * merge(b)
    rank = max(_rank(a), _rank(b))
    b = merge(b)  # a one-stream bundle (as a probe marks merged values) is its one stream
    with torch._C.DisableTorchFunctionSubclass():
        inner = _lifted(a, rank)
        return wrap(inner / b if divide else inner * b)


@rule(*_MUL)
def _mul(func, args, kwargs):
    return _product(args[0], args[1], divide=False)


@rule(*_DIV)
def _div(func, args, kwargs):
    if count(args[1]) > 1 or kwargs.get("rounding_mode"):  # 1 / x, floor division: not linear
        return merged_call(func, args, kwargs, "divides by a multi-stream tensor")
    return _product(args[0], args[1], divide=True)


@rule(Tensor.__imul__, Tensor.mul_)
def _mul_inplace(func, args, kwargs):
    return write_into(args[0], _product(args[0], args[1], divide=False))


@rule(Tensor.__itruediv__, Tensor.div_)
def _div_inplace(func, args, kwargs):
    if count(args[1]) > 1:
        return merged_call(func, args, kwargs, "divides by a multi-stream tensor")
    return write_into(args[0], _product(args[0], args[1], divide=True))


@rule(Tensor.__setitem__)
def _setitem(func, args, kwargs):
    target, index, value = args
    if not isinstance(target, Bundle):
        return merged_call(func, args, kwargs, "writes a multi-stream value into a plain tensor")
    (value,) = _unify([value], target.num_streams)
    index = index if isinstance(index, tuple) else (index,)
    with torch._C.DisableTorchFunctionSubclass():  # in place: bundles viewing the target see it
        target.streams[(slice(None), *index)] = value.streams if isinstance(value, Bundle) else value
    return None


# ---------------------------------------------------------------------- guided activations


# Gates of parameterised functions that have no deployed module of their own in the registry.
_RULE_GATES = {
    "prelu": lambda x, z, weight: torch.where(z > 0, x, x * _channel_view(weight, z.dim())),
    "hardtanh": lambda x, z, bounds: clamp_gate(x, z, *bounds),
}


def _channel_view(weight: Tensor, plain_dims: int) -> Tensor:
    """A per-channel parameter ``(C,)`` shaped to broadcast over dim 1 of a plain tensor."""
    return weight.reshape(-1, *([1] * (plain_dims - 2))) if weight.numel() > 1 else weight


def _guided(x: Any, gate: str, arg: Any = 0.0) -> Tensor:
    """Stream s → ``x_s · g(Σ x)`` (``act(x_s)`` when guided activations are off: not exact)."""
    inner = x.streams
    with torch._C.DisableTorchFunctionSubclass():
        apply = ACTIVATIONS[gate].gate if gate in ACTIVATIONS else _RULE_GATES[gate]
        return wrap(apply(inner, inner.sum(0) if GUIDED.get() else inner, arg))


def _activation(
    gate: str,
    arg: Callable[[tuple, dict], Any] = lambda a, k: 0.0,
    inplace_at: int | None = 1,
    always_inplace: bool = False,
) -> Rule:
    """The rule of an activation ``f(x, ..., inplace)``: guided; in place when asked."""

    def apply(func, args, kwargs):
        x = args[0]
        if not isinstance(x, Bundle) or any(isinstance(a, Bundle) for a in tree_leaves((args[1:], kwargs))):
            return merged_call(func, args, kwargs, "a multi-stream activation parameter")
        out = _guided(x, gate, arg(args, kwargs))
        inplace = always_inplace or (
            inplace_at is not None
            and bool(kwargs.get("inplace", args[inplace_at] if len(args) > inplace_at else False))
        )
        return write_into(x, out) if inplace else out

    return apply


def _positional(index: int, name: str, default: Any) -> Callable[[tuple, dict], Any]:
    return lambda args, kwargs: kwargs.get(name, args[index] if len(args) > index else default)


rule(F.relu, torch.relu, Tensor.relu)(_activation("relu"))
rule(torch.relu_, Tensor.relu_, F.relu_)(_activation("relu", always_inplace=True))


def register_activation_rules(name: str) -> None:
    """The guided rule for each ``f(x, inplace=False)`` of registry entry ``name``."""
    for function in ACTIVATIONS[name].functions:
        rule(function)(_activation(name))


for _name in ACTIVATIONS:
    register_activation_rules(_name)
REGISTRATION_LISTENERS.append(register_activation_rules)  # and every activation registered later
rule(F.leaky_relu)(_activation("leaky_relu", _positional(1, "negative_slope", 0.01), inplace_at=2))
rule(F.prelu)(_activation("prelu", _positional(1, "weight", None), inplace_at=None))


@rule(F.gelu)
def _gelu(func, args, kwargs):
    approximate = _positional(1, "approximate", "none")(args, kwargs)
    return _guided(args[0], "gelu_tanh" if approximate == "tanh" else "gelu")


@rule(F.hardtanh)
def _hardtanh(func, args, kwargs):
    low, high = _positional(1, "min_val", -1.0)(args, kwargs), _positional(2, "max_val", 1.0)(args, kwargs)
    if not low <= 0.0 <= high:  # clamp(z) = z · g(z) needs clamp(0) = 0
        return merged_call(func, args, kwargs, f"hardtanh({low}, {high}) is not of the form z·g(z)")
    return _activation("hardtanh", lambda a, k: (low, high), inplace_at=3)(func, args, kwargs)


# ---------------------------------------------------------------------- max pooling


def _max_pool(func, args, kwargs):
    x = args[0]
    return_indices = kwargs.get("return_indices", False)
    kwargs = {**kwargs, "return_indices": True}
    inner = x.streams
    spatial = 1 if "1d" in func.__name__ else 3 if "3d" in func.__name__ else 2
    with torch._C.DisableTorchFunctionSubclass():
        _, index = func(inner.sum(0), *args[1:], **kwargs)
        s, lead = inner.shape[0], inner.shape[1 : inner.dim() - spatial]
        flat = inner.flatten(inner.dim() - spatial)  # (S, *lead, positions)
        picked = flat.gather(-1, index.flatten(index.dim() - spatial).unsqueeze(0).expand(s, *lead, -1))
        out = wrap(picked.view(s, *lead, *index.shape[index.dim() - spatial :]))
    return (out, index) if return_indices else out


for _pool in (
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
):
    rule(_pool)(_max_pool)
for _name in (
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool1d_with_indices",
    "adaptive_max_pool2d_with_indices",
    "adaptive_max_pool3d_with_indices",
):
    if hasattr(F, _name):
        rule(getattr(F, _name))(_max_pool)


# ---------------------------------------------------------------------- normalisation


def _normalised(
    inner: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    shape: tuple = (),
) -> Tensor:
    """Streams ``(S, ...)`` → ``γ (x_s − μ/S) / σ + β/S`` with the statistics of the stream sum,
    as one ``x · a + b`` (autograd keeps the input and the small ``a``, as BatchNorm does);
    ``weight`` and ``bias`` are reshaped to ``shape``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.reshape(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(shape)
    return torch.addcmul(shift / inner.shape[0], inner, scale)


def _bound(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict:
    return {**defaults, **dict(zip(names, args[1:])), **kwargs}


@rule(F.batch_norm)
def _batch_norm(func, args, kwargs):
    names = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = _bound(
        args, kwargs, names, {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    )
    x = args[0]
    if not isinstance(x, Bundle) or any(isinstance(v, Bundle) for v in bound.values()):
        return merged_call(func, args, kwargs, "a multi-stream BatchNorm parameter")
    mean_buffer, var_buffer = bound["running_mean"], bound["running_var"]
    inner = x.streams
    shape = (-1, *([1] * (inner.dim() - 3)))  # over the channels of one stream
    with torch._C.DisableTorchFunctionSubclass():
        if bound["training"] or mean_buffer is None:
            total = inner.sum(0)
            var, mean = torch.var_mean(total, dim=[d for d in range(total.dim()) if d != 1], correction=0)
            if bound["training"] and mean_buffer is not None:  # what F.batch_norm does to the buffers
                n = total.numel() // total.shape[1]
                with torch.no_grad():
                    mean_buffer.lerp_(mean.detach().to(mean_buffer.dtype), bound["momentum"])
                    unbiased = var.detach() * n / max(n - 1, 1)
                    var_buffer.lerp_(unbiased.to(var_buffer.dtype), bound["momentum"])
        else:
            mean, var = mean_buffer, var_buffer
        mean, var = mean.reshape(shape), var.reshape(shape)
        return wrap(_normalised(inner, mean, var, bound["eps"], bound["weight"], bound["bias"], shape))


@rule(F.layer_norm)
def _layer_norm(func, args, kwargs):
    bound = _bound(
        args,
        kwargs,
        ("normalized_shape", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
    )
    x = args[0]
    if not isinstance(x, Bundle) or any(isinstance(v, Bundle) for v in bound.values()):
        return merged_call(func, args, kwargs, "a multi-stream LayerNorm parameter")
    normalized = tuple(bound["normalized_shape"])
    with torch._C.DisableTorchFunctionSubclass():
        dims = tuple(range(-len(normalized), 0))
        var, mean = torch.var_mean(x.streams.sum(0), dim=dims, correction=0, keepdim=True)
        return wrap(
            _normalised(x.streams, mean, var, bound["eps"], bound["weight"], bound["bias"], normalized)
        )


@rule(F.group_norm)
def _group_norm(func, args, kwargs):
    bound = _bound(
        args, kwargs, ("num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}
    )
    x = args[0]
    if not isinstance(x, Bundle) or any(isinstance(v, Bundle) for v in bound.values()):
        return merged_call(func, args, kwargs, "a multi-stream GroupNorm parameter")
    inner = x.streams
    s, b = inner.shape[:2]
    with torch._C.DisableTorchFunctionSubclass():
        grouped = inner.reshape(s, b, bound["num_groups"], -1)
        var, mean = torch.var_mean(grouped.sum(0), dim=-1, correction=0, keepdim=True)
        out = _normalised(grouped, mean, var, bound["eps"]).reshape(inner.shape)
        channels = (-1, *([1] * (inner.dim() - 3)))
        if bound["weight"] is not None:
            out = out * bound["weight"].reshape(channels)
        if bound["bias"] is not None:
            out = out + bound["bias"].reshape(channels) / s
        return wrap(out)


# ---------------------------------------------------------------------- dropout


def _dropout(func, args, kwargs):
    bound = _bound(args, kwargs, ("p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    x = args[0]
    if not bound["training"] or bound["p"] == 0.0:
        return x
    with torch._C.DisableTorchFunctionSubclass():
        ones = x.streams.new_ones(x.streams.shape[1:])
        mask = func(ones, bound["p"], True)  # one mask (with its 1/(1-p)) for every stream
        out = wrap(x.streams * mask)
    return write_into(x, out) if bound["inplace"] else out


for _drop in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
    rule(_drop)(_dropout)


# ---------------------------------------------------------------------- tensors like a bundle

_LIKE = (
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    Tensor.new_zeros,
    Tensor.new_ones,
    Tensor.new_empty,
    Tensor.new_full,
    Tensor.new_tensor,
)


@rule(*_LIKE)
def _like(func, args, kwargs):
    """New tensors shaped like a bundle are plain (one stream): they do not carry its values."""
    return merged_call(func, (args[0].streams[0], *args[1:]), kwargs, "")
