"""Frozen BatchNorm: every BN follows its own ``training`` flag, inner BNs of composed branches too.

Fine-tuning and detection frameworks (``norm_eval``) put the BatchNorms of a training network
in eval mode. Each BN must then use its running statistics and leave them alone, including the
inner BN of ``1×1 → BN → k×k`` / ``→ avg`` branches, which the fast path composes analytically.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import neusub
from neusub import RepConv2d, StreamBatchNorm2d
from neusub.reference import literal_forward

DTYPE = torch.float64


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _freeze(module: nn.Module, which: str) -> None:
    """``all`` BNs, the ``inner`` BNs of composed branches, or the ``outer`` stacked ones, to eval."""
    for name, bn in module.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            inner = name.endswith("bn1")
            if which == "all" or (which == "inner") == inner:
                bn.eval()


RECIPES_WITH_INNER_BN = ["dbb", "nsnet"]


@pytest.mark.parametrize("which", ["all", "inner", "outer"])
@pytest.mark.parametrize("recipe", RECIPES_WITH_INNER_BN + ["repvgg"])
@pytest.mark.parametrize("stride", [1, 2])
def test_each_bn_follows_its_own_mode_against_the_literal_reference(recipe, which, stride):
    torch.manual_seed(0)
    layer = RepConv2d(4, 6, 3, stride=stride, recipe=recipe, connectivity="ns", in_streams=3).to(DTYPE)
    randomize_bn(layer)
    layer.train()
    _freeze(layer, which)
    literal = copy.deepcopy(layer)
    x = torch.randn(3, 2, 4, 7, 7, dtype=DTYPE) + 0.5
    x_fast, x_literal = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_literal = layer(x_fast), literal_forward(literal, x_literal)
    assert float((out_fast - out_literal).detach().norm() / out_literal.detach().norm()) <= 1e-12
    upstream = torch.randn_like(out_fast)
    (g_fast,) = torch.autograd.grad(out_fast, x_fast, upstream)
    (g_literal,) = torch.autograd.grad(out_literal, x_literal, upstream)
    assert float((g_fast - g_literal).norm() / g_literal.norm()) <= 1e-10
    literal_buffers = dict(literal.named_buffers())
    for name, buffer in layer.named_buffers():
        assert torch.allclose(buffer, literal_buffers[name], rtol=1e-12, atol=1e-14), name
    frozen = [n for n, bn in layer.named_modules() if isinstance(bn, nn.BatchNorm2d) and not bn.training]
    fresh = copy.deepcopy(layer)
    randomize_bn(fresh)
    for name in frozen:  # a frozen BN's running statistics did not move
        bn, initial = layer.get_submodule(name), fresh.get_submodule(name)
        assert torch.equal(bn.running_mean, initial.running_mean), name
        assert torch.equal(bn.num_batches_tracked, initial.num_batches_tracked), name


def test_inner_bn_in_training_mode_inside_an_eval_layer():
    """The opposite case: the layer in eval, one inner BN set to train, uses (and updates) batch stats."""
    torch.manual_seed(1)
    layer = RepConv2d(4, 4, 3, recipe="dbb", connectivity="ns", in_streams=2).to(DTYPE).eval()
    randomize_bn(layer)
    inner = next(bn for name, bn in layer.named_modules() if name.endswith("bn1"))
    inner.train()
    literal = copy.deepcopy(layer)
    x = torch.randn(2, 3, 4, 6, 6, dtype=DTYPE)
    before = inner.running_mean.clone()
    out_fast, out_literal = layer(x), literal_forward(literal, x)
    assert float((out_fast - out_literal).norm() / out_literal.norm()) <= 1e-12
    assert not torch.equal(inner.running_mean, before)


@pytest.mark.parametrize("recipe", neusub.list_recipes())
def test_frozen_bn_makes_the_partition_irrelevant(recipe):
    """With every BN in eval mode (the rest training, shuffling on), any two partitions give the
    same output, equal to the deployed network's (fp64)."""
    torch.manual_seed(0)
    model = neusub.create_model(
        "resnet18",
        recipe=recipe,
        connectivity="ns",
        stochastic=1.0,
        width_mult=0.0625,
        stem="cifar",
        num_classes=5,
    ).to(DTYPE)
    randomize_bn(model)
    model.train()
    _freeze(model, "all")
    x = torch.randn(2, 3, 12, 12, dtype=DTYPE)
    with torch.no_grad():
        first, second = model(x), model(x)  # two draws of every layer's partition
        deployed = neusub.deploy(model)(x)
    scale = deployed.abs().max()
    assert float((first - second).abs().max() / scale) <= 1e-12
    assert float((first - deployed).abs().max() / scale) <= 1e-10
    if recipe != "plain":  # and the partition does matter once the BNs are back in training mode
        model.train()
        assert float((model(x) - model(x)).detach().abs().max() / scale) > 1e-6


def test_stream_batchnorm_follows_its_bn():
    norm = StreamBatchNorm2d(3, in_streams=2).to(DTYPE)
    randomize_bn(norm)
    norm.train()
    norm.bn.eval()
    x = torch.randn(2, 4, 3, 5, 5, dtype=DTYPE)
    before = norm.bn.running_mean.clone()
    out = norm(x)
    assert torch.equal(norm.bn.running_mean, before)
    expected = norm.bn(x.sum(0))  # eval BN on the stream sum
    assert float((out.sum(0) - expected).abs().max()) <= 1e-12


def test_untracked_bn_refuses_to_deploy_with_a_clear_error():
    layer = RepConv2d(4, 4, 3, recipe="dbb")
    branch = layer.branches["1x1_kxk"]
    branch.bn1 = nn.BatchNorm2d(branch.bn1.num_features, track_running_stats=False)
    layer(torch.randn(2, 4, 5, 5))  # trains with batch statistics
    with pytest.raises(ValueError, match=r"keeps no running statistics \(track_running_stats=False\)"):
        neusub.deploy(layer)
