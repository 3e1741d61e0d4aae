"""Deep copies of modules: one without its weights (on the meta device, for probes and
estimates that compute nothing), and one that also copies tensors autograd computed."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


def weightless_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the meta device, made without copying any weight."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers(), *_computed_attributes(model)]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        )
    return copy.deepcopy(model, memo)


def module_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also where a module keeps a computed tensor as an attribute
    (legacy ``torch.nn.utils.weight_norm``: its ``weight``, which ``deepcopy`` refuses); the copy
    gets it detached, and recomputes it before its next forward, as the original does."""
    memo = {id(t): t.detach().clone() for t in _computed_attributes(model)}
    return copy.deepcopy(model, memo)


def _computed_attributes(model: nn.Module) -> list[Tensor]:
    """Tensors kept as plain module attributes that autograd computed (not leaves)."""
    return [
        value
        for module in model.modules()
        for value in vars(module).values()
        if isinstance(value, Tensor) and not value.is_leaf
    ]
