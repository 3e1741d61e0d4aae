"""The activation registry: one entry per activation ``act(z) = z · g(z)`` that NS can guide.

An entry says everything the rest of the library needs: the gate ``(x, z, arg) → x · g(z)``
(stream ``x_s``, stream sum ``z``; ``arg`` is the op's parameter, e.g. a negative slope), the
deployed module, the torch functions whose stream rule it is (for converted networks, see
:mod:`neusub.stream_rules`) and timm's name for it (for the converted ResNets). Hand-written
models use it through :class:`~neusub.streams.GuidedActivation`. Adding one is
:func:`register_activation`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Gate = Callable[[Tensor, Tensor, Any], Tensor]

# Called with the name of each activation registered from now on. The modules above this one
# that derive something per activation (the stream rules of converted networks) add themselves
# here, so the registry never imports them.
REGISTRATION_LISTENERS: list[Callable[[str], None]] = []


@dataclass(frozen=True)
class Activation:
    gate: Gate  # (stream x_s, stream sum z, arg) → x_s · g(z); elementwise
    deployed: Callable[..., nn.Module]  # called with the negative slope, or with nothing
    functions: tuple[Callable, ...] = ()  # f(x, inplace=False): their stream rule is this gate
    timm: str | None = None  # timm's act_layer name; None: ``deployed`` is passed to timm


def clamp_gate(x: Tensor, z: Tensor, low: float, high: float) -> Tensor:
    """``clamp(z, low, high) = z · g(z)`` for ``low <= 0 <= high``: g is 1 inside, ``high / z``
    above and ``low / z`` below (0 where the bound is 0)."""
    above = torch.where(z > high, high / torch.where(z > high, z, 1.0), 1.0)
    below = torch.where(z < low, low / torch.where(z < low, z, -1.0), 1.0)
    return x * above * below


def _tanh_gelu(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(0.7978845608028654 * (z + 0.044715 * z**3)))


# The piecewise gates use torch.where so that backward keeps a bool mask, not a float gate.
# Functions with more parameters than (x, inplace) get their rules in stream_rules.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(lambda x, z, _: torch.where(z > 0, x, 0.0), nn.ReLU, timm="relu"),
    "leaky_relu": Activation(
        lambda x, z, slope: torch.where(z > 0, x, x * slope), nn.LeakyReLU, timm="leaky_relu"
    ),
    "silu": Activation(lambda x, z, _: x * torch.sigmoid(z), nn.SiLU, (F.silu,), "silu"),
    "gelu": Activation(
        lambda x, z, _: x * (0.5 * (1.0 + torch.erf(z * 0.7071067811865476))), nn.GELU, timm="gelu"
    ),
    "gelu_tanh": Activation(
        lambda x, z, _: x * _tanh_gelu(z), lambda: nn.GELU(approximate="tanh"), timm="gelu_tanh"
    ),
    "hardswish": Activation(
        lambda x, z, _: x * (F.relu6(z + 3.0) / 6.0), nn.Hardswish, (F.hardswish,), "hard_swish"
    ),
    "mish": Activation(lambda x, z, _: x * torch.tanh(F.softplus(z)), nn.Mish, (F.mish,), "mish"),
    "relu6": Activation(lambda x, z, _: clamp_gate(x, z, 0.0, 6.0), nn.ReLU6, (F.relu6,), "relu6"),
}


def list_activations() -> list[str]:
    return list(ACTIVATIONS)


def activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def deployed_module(name: str, negative_slope: float = 0.01) -> nn.Module:
    """The plain module of activation ``name`` (the slope reaches only ``leaky_relu``)."""
    deployed = ACTIVATIONS[name].deployed
    return deployed(negative_slope) if name == "leaky_relu" else deployed()


def timm_act_layer(name: str) -> str | Callable[..., nn.Module]:
    """What timm's ``act_layer=`` takes for activation ``name`` (timm's blocks call it with
    ``inplace=``, which a registered module need not accept)."""
    entry = activation(name)
    return entry.timm if entry.timm is not None else functools.partial(_ignoring_inplace, entry.deployed)


def _ignoring_inplace(deployed: Callable[[], nn.Module], inplace: bool = False) -> nn.Module:
    return deployed()


def register_activation(
    name: str,
    gate: Gate,
    deployed: Callable[..., nn.Module],
    functions: tuple[Callable, ...] = (),
    timm: str | None = None,
) -> None:
    """Add an activation ``act(z) = z · gate(z)``: ``gate(x, z, arg)`` must return ``x · g(z)``
    elementwise; ``functions`` (each ``f(x, inplace=False)``) get its guided stream rule."""
    if name in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is already registered")
    ACTIVATIONS[name] = Activation(gate, deployed, tuple(functions), timm)
    for listener in REGISTRATION_LISTENERS:
        listener(name)
