"""recompute=True (backward re-runs the stacked conv) gives the same step as the default path."""

import copy

import pytest
import torch
from helpers import randomize_bn

import neusub
from neusub import RepConv2d, RepLinear


def _step(model: torch.nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # same stochastic partitions and neural-drop masks in both models
    out = model(x)
    (out.square().mean() + out.sum()).backward()
    return out


def _assert_same_step(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, tol: float) -> None:
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = _step(a, xa, 1), _step(b, xb, 1)
    torch.testing.assert_close(out_b, out_a, rtol=tol, atol=tol * out_a.abs().max().item())
    torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol * xa.grad.abs().max().item())
    scale = max(p.grad.abs().max().item() for p in a.parameters() if p.grad is not None)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:  # near-cancelling gradients (inner BN γ) compared on the layer's scale
            torch.testing.assert_close(pb.grad, pa.grad, rtol=tol, atol=tol * scale, msg=name)
    for (name, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(bb, ba, rtol=tol, atol=tol * ba.abs().max().item(), msg=name)


@pytest.mark.parametrize("recipe", ["nsnet", "dbb", "repvgg", "acnet"])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_recompute_matches_default_path(recipe: str, layer: str) -> None:
    torch.manual_seed(0)
    if layer == "conv":
        a = RepConv2d(
            6, 8, 3, 2, recipe=recipe, connectivity="ns", in_streams=3, stochastic=1.0, neural_drop=0.2
        )
        x = torch.randn(3, 4, 6, 7, 7, dtype=torch.float64)
    else:
        a = RepLinear(6, 8, recipe=recipe, connectivity="ns", in_streams=3, stochastic=1.0)
        x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    a = a.double()
    randomize_bn(a)
    b = copy.deepcopy(a)
    b.recompute = True
    for _ in range(2):  # running statistics after more than one update
        _assert_same_step(a, b, x, 1e-10)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=1e-12, atol=0)


def test_recompute_model_and_deploy() -> None:
    torch.manual_seed(0)
    kw = dict(recipe="dbb", connectivity="ns", stochastic=1.0, num_classes=5, stem="cifar", width_mult=0.125)
    a = neusub.create_model("resnet18", **kw)
    b = neusub.create_model("resnet18", recompute=True, **kw)
    b.load_state_dict(a.state_dict())
    assert neusub.set_recompute(b, True) == 16 and "recompute=True" in repr(b)  # the 16 3×3 convs
    x = torch.randn(4, 3, 16, 16)
    _assert_same_step(a, b, x, 1e-5)
    b.eval()
    err = neusub.check_equivalence(b, x)
    assert err < 1e-5


def test_recompute_under_autocast() -> None:
    torch.manual_seed(0)
    a = RepConv2d(6, 8, 3, recipe="nsnet", connectivity="ns", in_streams=3, stochastic=1.0)
    b = copy.deepcopy(a)
    b.recompute = True
    x = torch.randn(3, 4, 6, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, out_b = _step(a, x, 0), _step(b, x, 0)
    assert out_b.dtype == out_a.dtype == torch.bfloat16
    torch.testing.assert_close(out_b, out_a, rtol=1e-2, atol=1e-2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.grad is None:  # inner BN shifts: a per-channel constant before a training BN
            assert pb.grad is None
        else:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-2, atol=1e-2 * pa.grad.abs().max().item())


def test_recompute_rejects_single_value_per_channel() -> None:
    layer = RepLinear(4, 4, recipe="repvgg", recompute=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4))
