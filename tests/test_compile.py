"""``torch.compile`` of a training structure computes the eager function.

Through Dynamo and AOTAutograd (``backend="aot_eager"``: the graphs torch.compile builds, run by
eager kernels) a training step is bit for bit the eager one: loss, every gradient, the running
statistics, stochastic partitions included (drawn from torch's RNG as eager draws them). Inductor
generates its own kernels, whose fp32 rounding differs from eager's; in fp64 it agrees to 1e-12.
A graph break while streams are live is refused with a clear error, never computed differently.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn
from torchvision.models.resnet import BasicBlock

import neusub


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict, list]:
    """One training step's loss, gradients (by parameter name) and buffers afterwards."""
    torch.manual_seed(seed)  # the partitions of both runs are drawn from the same RNG state
    model.train()
    model.zero_grad()
    loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    named = model.named_parameters()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in named if p.grad is not None}
    return loss.detach(), grads, [b.clone() for b in model.buffers()]


def _assert_same_steps(model: nn.Module, batches: list[torch.Tensor], **compile_args) -> None:
    eager, compiled = model, torch.compile(copy.deepcopy(model), **compile_args)
    for seed, x in enumerate(batches):
        loss, grads, buffers = _step(eager, x, seed)
        loss_c, grads_c, buffers_c = _step(compiled, x, seed)
        assert torch.equal(loss, loss_c), (loss, loss_c)
        assert grads.keys() == grads_c.keys()
        assert all(torch.equal(grads[k], grads_c[k]) for k in grads)
        assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_c))


def _quiet_convert(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return neusub.convert(model, **kwargs)


def _small_resnet() -> nn.Module:
    """torchvision's basic blocks (in-place ReLUs, residual adds, a strided 1×1 shortcut) at a
    width a test can afford; the benchmark counts the graphs of the full-size networks."""
    shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2, downsample=shortcut),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_a_converted_resnet_trains_identically_compiled_in_one_graph() -> None:
    """A converted network of torchvision's ResNet blocks: the path of every converted network,
    create_model's ResNets (timm's, converted) included."""
    torch.manual_seed(0)
    model = _quiet_convert(_small_resnet(), recipe="nsnet", stochastic=1.0, example_input=(1, 3, 16, 16))
    batch = [torch.randn(4, 3, 16, 16)]
    _assert_same_steps(model, batch, backend="aot_eager", fullgraph=True, dynamic=False)


def _small_net() -> nn.Module:
    return neusub.StreamSequential(
        neusub.RepConv2d(3, 8, 3, recipe="dbb", connectivity="ns", stochastic=1.0),
        neusub.GuidedActivation("silu"),
        neusub.GuidedMaxPool2d(2),
        neusub.StreamMerge(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_changing_batch_sizes_recompile_with_symbolic_shapes() -> None:
    """The default ``dynamic`` setting recompiles with symbolic shapes at the second batch size."""
    torch.manual_seed(0)
    batches = [torch.randn(batch, 3, 8, 8) for batch in (4, 3, 5)]
    _assert_same_steps(_small_net(), batches, backend="aot_eager")


def test_inductor_agrees_in_fp64() -> None:
    """Inductor's own kernels for one NS layer (stacked conv, BatchNorm, the partition's gather):
    fp64, so that their rounding stays far below the tolerance."""
    torch.manual_seed(0)
    model = neusub.StreamSequential(
        neusub.RepConv2d(3, 4, 3, recipe="dbb", connectivity="ns", stochastic=1.0),
        neusub.StreamMerge(),
        nn.Flatten(),
        nn.Linear(256, 10),
    ).double()
    eager, compiled = model, torch.compile(copy.deepcopy(model), dynamic=False)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch._inductor.config.fallback_random = True  # inductor draws the partitions as eager does
    try:
        loss, grads, buffers = _step(eager, x, 0)
        loss_c, grads_c, buffers_c = _step(compiled, x, 0)
    finally:
        torch._inductor.config.fallback_random = False
    assert rel_err(loss_c, loss) < 1e-12
    assert max(rel_err(grads_c[k], grads[k]) for k in grads) < 1e-10
    assert max(rel_err(b, a) for a, b in zip(buffers, buffers_c) if a.is_floating_point()) < 1e-12


def test_the_deployed_network_compiles() -> None:
    deployed = neusub.deploy(_small_net())  # a plain module
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(torch.compile(deployed, backend="aot_eager", fullgraph=True)(x), deployed(x))


class _InPlaceOnViews(nn.Module):
    """In-place ops on views of a converted conv's output: with and without a stream rule."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        y = self.a(x)
        y[:, :3].clamp_(min=0.1)  # no stream rule: on the sum, written back through the view
        y[:, 3:].relu_()
        y += 0.5
        return self.head(self.b(y).mean((2, 3)))


def test_in_place_ops_compile_to_the_eager_step() -> None:
    model = _quiet_convert(_InPlaceOnViews(), recipe="dbb", layers="all", example_input=(1, 3, 8, 8))
    _assert_same_steps(model, [torch.randn(4, 3, 8, 8)], backend="aot_eager", fullgraph=True)


class _Breaks(nn.Module):
    """A graph break (``torch._dynamo.graph_break``) between two converted convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.head(F.relu(self.b(x)).mean((2, 3)))


def test_a_graph_break_while_streams_are_live_is_refused() -> None:
    model = _quiet_convert(_Breaks(), recipe="dbb", example_input=(1, 3, 8, 8))
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(RuntimeError, match="several graphs while streams were live.*remove the graph break"):
        compiled(torch.randn(2, 3, 8, 8))
