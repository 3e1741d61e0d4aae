"""What NS changes in training, proven: with guided activations, an NS network differs from the
same network under block connectivity only through each branch's BatchNorm statistics (pooled
over the branch's input streams) and its shift (received once per input stream)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neusub
from neusub.analysis import branch_statistics, rep_layers
from neusub.branches import SequentialBranch

SHAPE = (4, 1, 12, 12)


def _pair(recipe: str) -> tuple[nn.Module, nn.Module]:
    """An NS network with stochastic substitution and the block network with the same weights."""
    torch.manual_seed(0)
    ns = neusub.create_model(
        "resnet18",
        recipe=recipe,
        connectivity="ns",
        stochastic=1.0,
        width_mult=0.0625,
        num_classes=5,
        in_chans=1,
    ).double()
    block = neusub.create_model(
        "resnet18", recipe=recipe, connectivity="block", width_mult=0.0625, num_classes=5, in_chans=1
    ).double()
    with torch.no_grad():
        ns.train()
        for _ in range(2):  # BatchNorm statistics of real-looking activations
            ns(torch.randn(*SHAPE, dtype=torch.float64))
        for bn in ns.modules():  # and trained-looking affine parameters
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    block.load_state_dict(ns.state_dict())
    return ns, block


def _freeze_batchnorm(model: nn.Module) -> None:
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.eval()


def _shift_times(bn: nn.BatchNorm2d, streams: int) -> None:
    """Scale the eval-mode shift ``β − μγ/σ`` of ``bn`` by ``streams`` (its scale unchanged)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    bn.bias.copy_(streams * shift + bn.running_mean * scale)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("recipe", ["repvgg", "qarepvgg", "acnet", "dbb", "nsnet", "mobileone"])
def test_with_batchnorm_frozen_the_partition_has_no_effect(recipe: str):
    ns, block = _pair(recipe)
    x = torch.randn(*SHAPE, dtype=torch.float64)
    ns.train()
    _freeze_batchnorm(ns)
    outputs = []
    for seed in (1, 2):  # two different random partitions of every layer
        torch.manual_seed(seed)
        outputs.append(ns(x))
    assert _rel(outputs[0], outputs[1]) <= 1e-12
    with torch.no_grad():
        assert _rel(neusub.deploy(ns)(x), outputs[0]) <= 1e-12
        # the block network with every branch shift (inner BNs included) counted S times
        ns_layers = dict(rep_layers(ns, 1))
        for name, layer in rep_layers(block, 1):
            streams = ns_layers[name].in_streams
            _shift_times(layer.bn, streams)  # qarepvgg's BN after the sum is not a branch's: left as is
            for branch in layer.branches.values():
                if isinstance(branch, SequentialBranch):
                    _shift_times(branch.bn1, streams)
        block.train()
        _freeze_batchnorm(block)
        assert _rel(block(x), outputs[0]) <= 1e-12


class SumStatisticsBatchNorm(nn.BatchNorm2d):
    """A layer's stacked branch BN normalising each pair with the statistics of the stream sum of
    its branch, ``γ (z_s − μ_Σ/S) / σ_Σ + β/S``, instead of statistics pooled over the streams."""

    streams = 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        total = z.reshape(self.streams, -1, *z.shape[1:]).sum(0)
        var, mean = torch.var_mean(total, dim=(0, 2, 3), correction=0)
        scale = (self.weight / torch.sqrt(var + self.eps)).view(-1, 1, 1)
        return (z - (mean / self.streams).view(-1, 1, 1)) * scale + (self.bias / self.streams).view(-1, 1, 1)


@pytest.mark.parametrize("recipe", ["repvgg", "acnet", "conv3"])
def test_training_statistics_are_the_only_difference(recipe: str):
    ns, block = _pair(recipe)
    x = torch.randn(*SHAPE, dtype=torch.float64)
    ns.train()
    block.train()
    with torch.no_grad():
        pooled = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            pooled.append(copy.deepcopy(ns)(x))
        assert _rel(pooled[0], pooled[1]) > 1e-4  # pooled statistics: the partition matters
        for _, layer in rep_layers(ns, 1):
            summed = SumStatisticsBatchNorm(layer.bn.num_features).double()
            summed.load_state_dict(layer.bn.state_dict())
            summed.streams = layer.in_streams
            layer.bn = summed
        outputs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outputs.append(copy.deepcopy(ns)(x))
        assert _rel(outputs[0], outputs[1]) <= 1e-12  # statistics of the sum: no partition effect
        assert _rel(block(x), outputs[0]) <= 1e-12  # and exactly the block network in training mode


def test_branch_statistics_on_a_tiny_model():
    ns, block = _pair("repvgg")
    x = torch.randn(8, 1, 12, 12, dtype=torch.float64)
    before = {k: v.clone() for k, v in ns.state_dict().items()}
    layers = branch_statistics(ns, x, partitions=4)
    assert all(torch.equal(v, ns.state_dict()[k]) for k, v in before.items())  # a copy was measured
    assert [r["layer"] for r in layers] == [name for name, _ in rep_layers(ns, 1)]
    for record in layers:
        ratios = [b["ratio"] for b in record["branches"].values()]
        if record["streams"] == 1:  # one input stream: pooled and summed statistics coincide
            assert all(abs(r - 1.0) <= 1e-12 for r in ratios)
        else:  # var(Σ_s z_s) ≤ S² · pooled var, so never below 1/S (above 1: anti-correlated streams)
            assert all(1.0 / record["streams"] - 1e-9 <= r for r in ratios), record
    assert any(b["spread"] > 0 for r in layers for b in r["branches"].values())  # partitions move it
    for record in branch_statistics(block, x, partitions=2):
        assert all(abs(b["ratio"] - 1.0) <= 1e-12 and b["spread"] == 0 for b in record["branches"].values())
