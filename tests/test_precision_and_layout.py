"""bf16 autocast and channels_last on a training structure: the same step as fp32 / contiguous
(within bf16 / fp32 rounding), and a network trained that way deploys exactly."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

import neusub


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)  # torchvision's, one block a stage


def _model() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return neusub.convert(_plain(), recipe="dbb", stochastic=1.0, example_input=(1, 3, 16, 16))


def _step(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> tuple[float, torch.Tensor]:
    """One training step: (loss, every gradient concatenated)."""
    torch.manual_seed(1)  # the same partitions
    model.train()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return loss.item(), torch.cat(grads)


def _bf16_deviation(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(loss, gradient) relative deviation of a bf16-autocast step from the fp32 step."""
    loss, grads = _step(copy.deepcopy(model), x)
    loss_bf16, grads_bf16 = _step(model, x, autocast=True)
    return abs(loss_bf16 - loss) / loss, float((grads_bf16 - grads).norm() / grads.norm())


def _deploys_exactly(model: nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizer.step()  # the step's gradients applied: the function trained that way
    model.eval()
    with torch.no_grad():
        assert rel_err(neusub.deploy(model)(x), model(x)) < 1e-5


def test_a_bf16_autocast_step_is_the_fp32_step_within_bf16_rounding() -> None:
    """bf16 rounding moves a randomly initialised network's gradients by tens of percent (the
    plain ResNet's own: 23 % here, the training structure's 25 %). 32×32 inputs: at 16×16 (1×1
    maps in the last stage) PyTorch's CPU bf16 backward gave the plain ResNet gradients of 1e9 to
    inf in some runs (torch 2.14.1)."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain_loss, plain_grads = _bf16_deviation(_plain(), x)
    model = _model()
    loss, grads = _bf16_deviation(model, x)
    assert loss < 1e-2 and plain_loss < 1e-2
    assert grads < 2 * plain_grads, (grads, plain_grads)
    _deploys_exactly(model, x)


def test_a_channels_last_step_is_the_contiguous_step() -> None:
    model = _model()
    x = torch.randn(8, 3, 16, 16)
    loss, grads = _step(copy.deepcopy(model), x)
    last = model.to(memory_format=torch.channels_last)
    loss_last, grads_last = _step(last, x.contiguous(memory_format=torch.channels_last))
    assert abs(loss_last - loss) / loss < 1e-5
    assert float((grads_last - grads).abs().max() / grads.abs().max()) < 1e-5
    _deploys_exactly(last, x.contiguous(memory_format=torch.channels_last))
