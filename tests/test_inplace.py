"""In-place ops on a converted network's streams: each one has an exact stream rule, or it runs on
the stream sum and the result is written back into the bundle, so that later code sees the
mutation whether or not it uses the op's return value (fp64: converted == original, deployed ==
trained)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

import neusub

DTYPE = torch.float64

OPS = {
    "clamp_": lambda y: y.clamp_(min=0.1),
    "masked_fill_": lambda y: y.masked_fill_(y > 0.2, 0.2),
    "zero_": lambda y: y.zero_(),
    "fill_": lambda y: y.fill_(0.3),
    "copy_": lambda y: y.copy_(y * 0.5 - 0.1),
    "tanh_": lambda y: y.tanh_(),
    "sigmoid_": lambda y: y.sigmoid_(),
    "exp_": lambda y: y.exp_(),
    "abs_": lambda y: y.abs_(),
    "pow_": lambda y: y.pow_(2),
    "relu_": lambda y: y.relu_(),
    "add_": lambda y: y.add_(0.25),
    "mul_": lambda y: y.mul_(-2.0),
    "iadd": lambda y: y.__iadd__(1.5),
    "F.elu(inplace=True)": lambda y: F.elu(y, inplace=True),
    "nn.ELU(inplace=True)": nn.ELU(inplace=True),  # passes inplace by position
    "nn.Hardsigmoid(inplace=True)": nn.Hardsigmoid(inplace=True),
    "nn.ReLU6(inplace=True)": nn.ReLU6(inplace=True),
}


class InPlace(nn.Module):
    """conv → op (in place) → conv → head; ``use_result``: go on with what the op returns."""

    def __init__(self, op, use_result: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)
        self.op, self.use_result = op, use_result

    def forward(self, x):
        y = self.a(x)
        returned = self.op(y)
        if self.use_result:
            y = returned
        return self.head(self.b(y).mean((2, 3)))


def _train(model: nn.Module, steps: int = 2) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8, generator=gen, dtype=DTYPE)), torch.arange(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("use_result", [False, True], ids=["result discarded", "result used"])
@pytest.mark.parametrize("name", list(OPS))
def test_in_place_op_on_streams_is_exact(name: str, use_result: bool) -> None:
    torch.manual_seed(0)
    model = InPlace(OPS[name], use_result).to(DTYPE).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = neusub.convert(model, recipe="dbb", layers="all", example_input=(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    converted.eval()
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) < 1e-12
    _train(converted)
    converted.eval()
    with torch.no_grad():
        assert rel_err(neusub.deploy(converted)(x), converted(x)) < 1e-9


def test_rule_less_in_place_ops_are_reported_as_merges() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = neusub.convert(InPlace(OPS["tanh_"], False), recipe="dbb", layers="all")
    merges = converted.neusub_conversion.merges
    assert any(op == "tanh_" and "in place" in why for _, op, why in merges), merges


def test_in_place_ops_reach_the_views_of_a_bundle_and_their_base() -> None:
    """``v = y[:, :2]`` shares y's values: an in-place op on either changes both, as in PyTorch."""
    from neusub.bundle import Bundle

    torch.manual_seed(0)
    y = Bundle(torch.randn(3, 2, 4, dtype=DTYPE))
    plain = y.streams.sum(0).clone()
    view = y[:, :2]
    y.clamp_(min=0.0)  # no stream rule: on the sum, written back into the shared streams
    plain.clamp_(min=0.0)
    assert torch.equal(view.streams.sum(0), plain[:, :2])
    y[:, 2:].relu_()  # a stream rule, on a view: the base sees it
    view.mul_(2.0)
    plain[:, 2:].relu_()
    plain[:, :2].mul_(2.0)
    assert torch.allclose(y.streams.sum(0), plain, rtol=0, atol=1e-12)


def test_storage_changing_methods_are_refused_on_a_bundle() -> None:
    from neusub.bundle import Bundle

    y = Bundle(torch.randn(3, 2, 4))
    with pytest.raises(TypeError, match="resize_ is not supported on a multi-stream tensor"):
        y.resize_(2, 2)
