"""Deploy a training structure to a plain network, and measure that they agree."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping

import torch
import torch.fx
from torch import Tensor, nn

from .batchnorm import is_batchnorm_act, is_plain_batchnorm, running_affine
from .fusion import fold_conv_bn


def to_plain(module: nn.Module) -> nn.Module:
    """Replace every module that has ``fuse()`` by its plain form (in place below the root).

    Returns the module itself, or its plain replacement when the root has ``fuse()``.
    """
    if getattr(module, "deployed", False):  # already reparameterize()d in place
        return module.plain
    if hasattr(module, "fuse"):
        return module.fuse()
    for name, child in module.named_children():
        plain = to_plain(child)
        if plain is not child:
            setattr(module, name, plain)
    return module


def deploy(model: nn.Module, inplace: bool = False, fold_norms: bool = False) -> nn.Module:
    """The eval-mode plain network equal to ``model``'s training structure.

    No branch or stream logic is left; it takes the ordinary tensor (the sum of the streams
    the training structure takes). A deep copy unless ``inplace``; exact before any forward,
    idempotent, on any device and dtype. A model made by :func:`neusub.convert` comes back as
    its input's class and module layout, BatchNorms included: its state dict loads into that
    class, and it trains on as an ordinary model.

    ``fold_norms=True``: for inference, every BatchNorm that alone reads a conv's output is
    folded into that conv (see :func:`fold_batch_norms`): the class stays, the state dict
    layout does not.
    """
    conversion = getattr(model, "neusub_conversion", None)
    if conversion is not None:  # made by neusub.convert, whose report knows how to undo it
        plain = conversion.deploy(model)
    else:
        if not inplace:
            model = copy.deepcopy(model)
        with torch.no_grad():
            plain = to_plain(model).eval()
    return fold_batch_norms(plain) if fold_norms else plain


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _NormsAsLeaves(torch.fx.Tracer):
    """Traces BatchNorm subclasses (timm's BatchNormAct2d) as one call, as torch's own BNs."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        leaf = isinstance(module, nn.modules.batchnorm._BatchNorm)
        return leaf or super().is_leaf_module(module, qualified_name)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """A plain conv (not a subclass: its forward could transform the weight) and a BatchNorm
    with running statistics over its output channels, neither hooked (a hook on either would
    see another tensor, or none, once the BatchNorm is inside the conv)."""
    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in (conv, norm))
    return (
        type(conv) in _CONVS
        and is_plain_batchnorm(norm)
        and not hooked
        and norm.running_mean is not None
        and norm.num_features == conv.out_channels
    )


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> nn.Module:
    """``model`` (in place, eval mode) with every BatchNorm that alone reads the output of a
    ``nn.Conv{1,2,3}d`` folded into it: the conv's kernel scaled per output channel and its
    bias set (``fusion.fold_conv_bn``); the BN replaced by an ``nn.Identity`` (timm's
    ``BatchNormAct2d`` by its dropout and activation). The same function at inference, fewer
    layers; training it again would train without those BNs. The data flow is read from a
    ``torch.fx`` trace; a model that cannot be traced is refused with a ``ValueError``.
    Returns ``model``."""
    model.eval()
    try:
        graph = _NormsAsLeaves().trace(model)
    except Exception as err:  # any failure of symbolic tracing: data-dependent Python, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(
            f"fold_norms: torch.fx cannot trace {type(model).__name__} ({first}), so which conv feeds "
            "which BatchNorm is unknown; deploy without fold_norms (exact, BatchNorms kept)"
        ) from None
    calls = [node for node in graph.nodes if node.op == "call_module"]
    uses = Counter(id(model.get_submodule(node.target)) for node in calls)
    for node in calls:
        norm, source = model.get_submodule(node.target), node.args[0] if len(node.args) == 1 else None
        if node.kwargs or not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv = model.get_submodule(source.target)
        once = uses[id(conv)] == uses[id(norm)] == 1 and len(source.users) == 1
        if not (once and _foldable(conv, norm)):
            continue
        kernel, bias = fold_conv_bn(conv.weight, conv.bias, *running_affine(norm))
        conv.weight = nn.Parameter(kernel.to(conv.weight.dtype), conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), conv.weight.requires_grad)
        rest = nn.Sequential(norm.drop, norm.act) if is_batchnorm_act(norm) else nn.Identity()
        _replace(model, node.target, rest)
    return model


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def non_finite(state: Mapping[str, object]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold NaN or inf."""
    return [
        name
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _input_is_bundle(model: nn.Module, x: Tensor) -> bool:
    """Whether the training structure's input ``x`` is a bundle ``(S, B, ...)``.

    Always with ``in_streams > 1``; with one stream, the first layer tells by its
    ``is_plain`` where it declares a plain shape (a 1-stream bundle ``(1, B, ...)`` and a plain
    ``(B, ...)`` are both accepted there); else the input is taken as plain.
    """
    if getattr(model, "in_streams", 1) > 1:
        return True
    first = next(iter(model), None) if isinstance(model, nn.Sequential) else model
    return getattr(first, "plain_dim", None) is not None and not first.is_plain(x)


def _sum_streams(x: Tensor, like: Tensor) -> Tensor:
    """The training output (or input) as the deployed network sees it: streams summed."""
    return x.sum(0) if x.dim() == like.dim() + 1 else x


@torch.no_grad()
def check_equivalence(model: nn.Module, example_input: Tensor, deployed: nn.Module | None = None) -> float:
    """Max relative error ``max|train − deployed| / max|deployed|`` in eval mode.

    ``example_input`` is what the training structure takes; the deployed network
    gets its stream sum when it is a bundle (always with ``in_streams > 1``; a
    1-stream bundle ``(1, B, ...)`` is recognised by the first layer's ``is_plain``).
    A ``ValueError`` when the input or either output is not finite (the error would be NaN).
    """
    if not bool(torch.isfinite(example_input).all()):
        raise ValueError("check_equivalence: example_input holds NaN or inf; pass finite values")
    deployed = deploy(model) if deployed is None else deployed
    was_training = model.training
    model.eval()
    try:
        reference = model(example_input)
    finally:
        model.train(was_training)
    plain_input = example_input.sum(0) if _input_is_bundle(model, example_input) else example_input
    out = deployed(plain_input)
    reference = _sum_streams(reference, out)
    for name, tensor in (("training structure", reference), ("deployed network", out)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"check_equivalence: the {name}'s output holds NaN or inf on a finite input; "
                "its weights or statistics are not finite (did training diverge?)"
            )
    scale = out.abs().max().clamp_min(torch.finfo(out.dtype).tiny)
    return float((reference - out).abs().max() / scale)
