"""The deployed network: BatchNorms folded for inference (exact), and fine-tuning the unfolded one.

``neusub.deploy(model, fold_norms=True)`` must compute what ``neusub.deploy(model)`` computes
without a BatchNorm left (every model of the registry in fp64, ≤ 1e-9 relative; the benchmarked
ones also in fp32 from the training structure, ≤ 1e-5), fold only a BN that alone reads a plain
conv's output, and refuse a network it cannot trace. The default deployed network is an
ordinary model of its class: every parameter trains, its BatchNorms work in training mode, and
it behaves exactly as a fresh instance of the class loaded with its state dict.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, randomize_bn, rel_err, small_model
from torch import Tensor, nn

import neusub

MODELS = neusub.list_models()
BENCHMARKED = ["resnet18", "resnet50", "mobilenet_v1", "mobileone_s0"]
BatchNorm = nn.modules.batchnorm._BatchNorm
STEPS = 3


def example(model: nn.Module, batch: int = 3) -> Tensor:
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, *model.pretrained_cfg["input_size"], dtype=dtype)


def norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BatchNorm)]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- fold_norms


@pytest.mark.parametrize("name", MODELS)
def test_fold_norms_computes_the_deployed_network(name):
    model = small_model(name).eval()  # random BatchNorms: each a real affine map
    deployed, x = neusub.deploy(model), example(model)
    if name in BENCHMARKED:  # from the training structure, in fp32
        folded = neusub.deploy(model, fold_norms=True)
        with torch.no_grad():
            assert rel_err(folded(x), deployed(x)) <= 1e-5 and rel_err(folded(x), model(x)) <= 1e-4
    deployed = deployed.double()  # in fp64 (the exactness of the fold alone), from the deployed network
    folded = neusub.deploy(deployed, fold_norms=True)
    assert type(folded) is type(deployed) and not norms(folded)
    removed = sum(2 * bn.num_features for bn in norms(deployed))  # weight and bias of each BN
    assert parameter_count(deployed) - removed <= parameter_count(folded) <= parameter_count(deployed)
    with torch.no_grad():
        assert rel_err(folded(x.double()), deployed(x.double())) <= 1e-9


class _SharedOutput(nn.Module):
    """conv → BN, but the conv's output is also the residual: the BN cannot be folded into it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = (
            nn.Conv2d(3, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.Conv2d(3, 3, 1),
            nn.BatchNorm2d(3),
        )
        self.pre = nn.BatchNorm2d(3)  # reads the input, no conv before it

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(self.pre(x))
        return self.bn(y) + y + self.bn2(self.conv2(y))


def test_fold_norms_folds_only_a_bn_that_alone_reads_a_conv():
    model = _SharedOutput()
    randomize_bn(model)
    folded = neusub.deploy(model, fold_norms=True)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.pre, nn.BatchNorm2d)
    assert isinstance(folded.bn2, nn.Identity) and folded.conv2.bias is not None
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(folded(x), model.eval()(x)) <= 1e-5


def test_fold_norms_leaves_hooked_layers_as_they_are():
    """A hook on the conv or its BatchNorm would see another tensor once the BN is folded."""
    model = _SharedOutput()
    randomize_bn(model)
    seen = []
    model.bn2.register_forward_hook(lambda module, args, out: seen.append(out))
    folded = neusub.deploy(model, fold_norms=True)
    assert isinstance(folded.bn2, nn.BatchNorm2d) and torch.equal(folded.conv2.weight, model.conv2.weight)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert rel_err(folded(x), model.eval()(x)) <= 1e-5
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_fold_norms_refuses_a_network_it_cannot_trace():
    model = _DataDependent()
    with pytest.raises(
        ValueError, match=r"fold_norms: torch.fx cannot trace _DataDependent.*without fold_norms"
    ):
        neusub.deploy(model, fold_norms=True)
    assert isinstance(neusub.deploy(model).bn, nn.BatchNorm2d)  # the default keeps it, exact


# --------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v1", "mlp_adapter"])
def test_the_deployed_network_fine_tunes_as_an_ordinary_model(name):
    deployed = neusub.deploy(small_model(name))
    torch.manual_seed(1)
    fresh = neusub.deploy(neusub.create_model(name, recipe="plain", connectivity="block", **SMALL))
    assert type(fresh) is type(deployed)
    fresh.load_state_dict(deployed.state_dict())  # the class's own layout
    assert all(p.requires_grad for p in deployed.parameters())
    x, y = example(deployed, 8), torch.arange(8) % 5
    statistics = [bn.running_mean.clone() for bn in norms(deployed)]
    losses = []
    for model in (deployed, fresh):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            assert all(p.grad is not None for p in model.parameters())
            optimizer.step()
            losses.append(loss.item())
    assert losses[:STEPS] == losses[STEPS:]  # step for step what the class itself does
    assert losses[STEPS - 1] < losses[0]
    assert all(not torch.equal(s, bn.running_mean) for s, bn in zip(statistics, norms(deployed)))
    with torch.no_grad():
        assert torch.equal(deployed.eval()(x), fresh.eval()(x))
