"""Deploy a training structure to a plain network, and measure that they agree."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn


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


def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The eval-mode plain network equal to ``model``'s training structure.

    No BatchNorm, branch or stream logic is left; it takes the ordinary tensor
    (the sum of the streams the training structure takes). A deep copy unless
    ``inplace``; exact before any forward, idempotent, on any device and dtype. A model
    made by :func:`neusub.convert` comes back as its input's class and module layout.
    """
    conversion = getattr(model, "neusub_conversion", None)
    if conversion is not None:  # made by neusub.convert, whose report knows how to undo it
        return conversion.deploy(model)
    if not inplace:
        model = copy.deepcopy(model)
    with torch.no_grad():
        return to_plain(model).eval()


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
