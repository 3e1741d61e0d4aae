"""Stream ops (docs/design.md §2): each guided / per-stream op in small NS networks, and unit checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err
from timm.utils.model import reparameterize_model
from torch import Tensor, nn

import neusub
from neusub import (
    GuidedActivation,
    GuidedMaxPool2d,
    PerStream,
    RepConv2d,
    SqueezeExcite,
    StreamAdd,
    StreamBatchNorm2d,
    StreamDropout,
    StreamDropPath,
    StreamGate,
    StreamMerge,
    StreamModule,
    StreamSequential,
)

ACTIVATIONS = ["relu", "leaky_relu", "silu", "gelu", "hardswish"]
PLAIN_ACTS = {
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "silu": F.silu,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
}
FP64_TOL, FP32_TOL = 1e-12, 1e-5


def assert_plain(model: nn.Module) -> None:
    for m in model.modules():
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm), m
        assert not isinstance(m, StreamModule), m


# --------------------------------------------------------------------------- networks

OPS = {
    **{f"act-{a}": (lambda a=a: GuidedActivation(a)) for a in ACTIVATIONS},
    "maxpool": lambda: GuidedMaxPool2d(2),
    "maxpool-3s2p1": lambda: GuidedMaxPool2d(3, 2, 1),
    "se-gate": lambda: StreamGate(SqueezeExcite(8)),
    "dropout": lambda: StreamDropout(0.3),
    "droppath": lambda: StreamDropPath(0.3),
    "batchnorm": lambda: StreamBatchNorm2d(8),
    "avgpool": lambda: PerStream(nn.AvgPool2d(2)),
}


def ns_net(op: nn.Module) -> StreamSequential:
    return StreamSequential(
        RepConv2d(3, 8, 3, recipe="nsnet", connectivity="ns"),
        GuidedActivation("silu"),
        RepConv2d(8, 8, 3, recipe="dbb", connectivity="ns"),
        op,
        RepConv2d(8, 8, 3, recipe="repvgg", connectivity="ns", stochastic=1.0),
        StreamMerge(),
    )


class Residual(nn.Module):
    """Residual adds: two bundles with equal S, and a 1-stream tensor into an S-stream bundle."""

    def __init__(self):
        super().__init__()
        self.stem = RepConv2d(3, 8, 3, recipe="repvgg", connectivity="block")  # plain
        self.a = RepConv2d(8, 8, 3, recipe="dbb", connectivity="ns", neural_drop=0.2)  # 1 → 4
        self.act = GuidedActivation("relu", in_streams=4)
        self.b = RepConv2d(8, 8, 3, recipe="acnet", connectivity="ns", in_streams=4, stochastic=1.0)  # → 3
        self.c = RepConv2d(8, 8, 1, recipe="repvgg", connectivity="ns", in_streams=4)  # 1×1: → 3
        self.add_equal = StreamAdd(3, 3)
        self.add_plain = StreamAdd(3, 1)
        self.act2 = GuidedActivation("gelu", in_streams=3)
        self.merge = StreamMerge(3)

    def forward(self, x: Tensor) -> Tensor:
        stem = self.stem(x)
        h = self.act(self.a(stem))
        h = self.add_equal(self.b(h), self.c(h))
        h = self.add_plain(h, stem)
        return self.merge(self.act2(h))


def _train_then_check(net: nn.Module, x: Tensor, steps: int = 3) -> tuple[float, float]:
    net = net.double()
    x = x.double()
    randomize_bn(net)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    err64 = neusub.check_equivalence(net, x)
    err32 = neusub.check_equivalence(copy.deepcopy(net).float(), x.float())
    assert err64 <= FP64_TOL, err64
    assert err32 <= FP32_TOL, err32
    deployed = neusub.deploy(net)
    assert_plain(deployed)
    assert net.training  # check_equivalence and deploy leave the model's mode alone
    return err64, err32


@pytest.mark.parametrize("op_id", list(OPS))
def test_ns_network_with_op_is_exact(op_id):
    torch.manual_seed(0)
    op = OPS[op_id]()
    net = ns_net(op)
    first, act, second, _, third, merge = net
    assert (first.in_streams, first.out_streams) == (1, 4)
    assert act.in_streams == 4
    assert (second.in_streams, second.out_streams) == (4, 4)
    assert op.in_streams == 4
    assert (third.in_streams, third.out_streams) == (4, 3)
    assert merge.in_streams == 3
    assert net.out_streams == 1
    x = torch.randn(2, 3, 8, 8)
    out = net(x)
    assert out.dim() == 4 and out.shape[:2] == (2, 8)
    _train_then_check(net, x)


def test_residual_network_is_exact():
    torch.manual_seed(1)
    net = Residual()
    assert net.a.out_streams == 4 and net.b.out_streams == 3 and net.c.out_streams == 3
    x = torch.randn(2, 3, 7, 7)
    _train_then_check(net, x)
    deployed = neusub.deploy(net)
    assert isinstance(deployed.add_equal, neusub.Add) and isinstance(deployed.add_plain, neusub.Add)
    assert type(deployed.stem) is nn.Conv2d and type(deployed.a) is nn.Conv2d


def test_stream_sequential_reassigns_stream_counts():
    net = StreamSequential(
        RepConv2d(3, 4, 3, recipe="acnet", connectivity="ns"),  # 3 branches
        GuidedActivation("relu"),
        RepConv2d(4, 4, 3, recipe="nsnet", connectivity="naive"),  # 3 · 4
        PerStream(nn.AdaptiveAvgPool2d(1)),
        PerStream(nn.Flatten()),
        StreamMerge(),
        in_streams=2,
    )
    assert [getattr(m, "in_streams", None) for m in net] == [2, 3, 3, 12, 12, 12]
    assert net.out_streams == 1
    net.set_in_streams(1)
    assert [getattr(m, "in_streams", None) for m in net] == [1, 3, 3, 12, 12, 12]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    net = net.double()
    randomize_bn(net)
    assert net(x).shape == (2, 4)
    assert neusub.check_equivalence(net, x) <= FP64_TOL


def test_timm_reparameterize_model_matches_deploy():
    torch.manual_seed(2)
    net = ns_net(StreamGate(SqueezeExcite(8))).double()
    randomize_bn(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net(x).sum().backward()
    ours = neusub.deploy(net)
    theirs = reparameterize_model(net).eval()
    assert_plain(theirs)
    net.eval()
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(theirs(x), ours(x), rtol=0, atol=1e-14)
        assert rel_err(theirs(x), expected) <= FP64_TOL

    residual = Residual().double()
    randomize_bn(residual, seed=3)
    theirs = reparameterize_model(residual).eval()
    assert_plain(theirs)
    with torch.no_grad():
        assert torch.allclose(theirs(x), neusub.deploy(residual)(x), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- unit checks of §2

S, B, C, H = 3, 2, 8, 6


def _bundle(seed: int = 0) -> Tensor:
    return torch.randn(S, B, C, H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _check_sum_rule(op: StreamModule, reference, x: Tensor) -> None:
    """Σ_s op(x)_s == reference(Σ_s x_s) == fuse(op)(Σ_s x_s)."""
    with torch.no_grad():
        out = op(x)
        assert out.shape[0] == op.out_streams
        expected = reference(x.sum(0))
        assert rel_err(out.sum(0), expected) <= FP64_TOL
        plain = op.fuse().eval()
        assert rel_err(plain(x.sum(0)), expected) <= FP64_TOL


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_guided_activation_sum_rule_and_gradient(act):
    op = GuidedActivation(act, in_streams=S).double().eval()
    x = _bundle()
    _check_sum_rule(op, PLAIN_ACTS[act], x)
    # not the plain activation per stream: the gate comes from the sum
    assert rel_err(op(x), PLAIN_ACTS[act](x)) > 1e-3

    op.train()
    x = x.clone().requires_grad_(True)
    weights = torch.randn(B, C, H, H, dtype=torch.float64)
    (grad_x,) = torch.autograd.grad((op(x).sum(0) * weights).sum(), x)
    z = x.detach().sum(0).requires_grad_(True)
    (grad_z,) = torch.autograd.grad((PLAIN_ACTS[act](z) * weights).sum(), z)
    for s in range(S):  # every stream gets the plain activation's gradient at the sum
        assert rel_err(grad_x[s], grad_z) <= 1e-12


def test_guided_relu_matches_paper_algorithm():
    x = _bundle(1)
    out = GuidedActivation("relu", in_streams=S)(x)
    mask = (x.sum(0) > 0).to(x.dtype)
    assert torch.equal(out, x * mask)


@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), (3, 1, 1)])
def test_guided_maxpool_sum_rule(kernel, stride, padding):
    op = GuidedMaxPool2d(kernel, stride, padding, in_streams=S)
    x = _bundle(2)
    _check_sum_rule(op, lambda z: F.max_pool2d(z, kernel, stride, padding), x)
    # indices from the sum: each output is the stream value at the sum's argmax, not its own max
    own_max = F.max_pool2d(x.flatten(0, 1), kernel, stride, padding).view(S, B, C, *op(x).shape[-2:])
    assert not torch.equal(op(x), own_max)
    assert (op(x) <= own_max).all()


def test_stream_gate_sum_rule():
    torch.manual_seed(3)
    se = SqueezeExcite(C).double()
    op = StreamGate(se, in_streams=S)
    _check_sum_rule(op, lambda z: z * se(z), _bundle(3))


def test_stream_batchnorm_sum_rule_eval_and_train():
    op = StreamBatchNorm2d(C, in_streams=S).double()
    randomize_bn(op, seed=4)
    bn = op.bn
    x = _bundle(4)
    op.eval()
    _check_sum_rule(
        op,
        lambda z: F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps),
        x,
    )
    # training: statistics of the sum, and the same running-stat update as a BatchNorm on the sum
    op.train()
    plain = copy.deepcopy(bn).train()
    out = op(x)
    expected = plain(x.sum(0))
    assert rel_err(out.sum(0), expected) <= FP64_TOL
    torch.testing.assert_close(bn.running_mean, plain.running_mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(bn.running_var, plain.running_var, rtol=1e-13, atol=1e-13)
    assert int(bn.num_batches_tracked) == int(plain.num_batches_tracked) == 1
    assert type(op.fuse()) is nn.Conv2d


@pytest.mark.parametrize("module", [nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()])
def test_per_stream_sum_rule(module):
    _check_sum_rule(PerStream(module, in_streams=S), module, _bundle(5))


def test_stream_add_and_merge_sum_rule():
    a, b = _bundle(6), _bundle(7)
    equal = StreamAdd(S, S)
    assert rel_err(equal(a, b).sum(0), a.sum(0) + b.sum(0)) <= FP64_TOL
    assert torch.equal(equal(a, b), a + b)  # per stream
    one = StreamAdd(S, 1)
    plain = b[0]
    for other in (plain, plain[None]):  # plain tensor or a 1-stream bundle
        out = one(a, other)
        assert rel_err(out.sum(0), a.sum(0) + plain) <= FP64_TOL
        assert rel_err(out - a, (plain / S).expand_as(a)) <= FP64_TOL  # split as x / S
    assert torch.equal(StreamMerge(S)(a), a.sum(0))
    assert torch.equal(neusub.deploy(one)(a.sum(0), plain), a.sum(0) + plain)


def test_stream_dropout_shares_one_mask():
    torch.manual_seed(8)
    op = StreamDropout(0.5, in_streams=S)
    x = _bundle(8).abs() + 0.1  # no zeros: the ratio out / x is the mask
    assert torch.equal(op.eval()(x), x)
    op.train()
    ratio = op(x) / x
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=0, atol=1e-15)
    values = set(ratio.unique().tolist())
    assert values == {0.0, 2.0}
    assert type(op.fuse()) is nn.Dropout


def test_stream_drop_path_shares_one_per_sample_mask():
    torch.manual_seed(9)
    op = StreamDropPath(0.5, in_streams=S)
    x = _bundle(9).abs() + 0.1
    assert torch.equal(op.eval()(x), x)
    op.train()
    seen = set()
    for _ in range(8):
        ratio = op(x) / x
        per_sample = ratio[0, :, 0, 0, 0]
        expected = per_sample.view(1, B, 1, 1, 1).expand_as(ratio)
        assert torch.allclose(ratio, expected, rtol=0, atol=1e-15)  # one value per sample, all streams
        seen.update(per_sample.tolist())
    assert seen == {0.0, 2.0}


@pytest.mark.parametrize(
    "op",
    [
        GuidedMaxPool2d(2),
        StreamGate(SqueezeExcite(C)),
        StreamBatchNorm2d(C),
        StreamDropPath(0.5, plain_dim=4),
    ],
    ids=["maxpool", "gate", "batchnorm", "droppath"],
)
def test_one_stream_ops_keep_plain_tensors_plain(op):
    """With in_streams=1, a plain (B, C, H, W) tensor gives a plain tensor (usable by nn layers)."""
    x = torch.randn(B, C, H, H)
    for mode in (True, False):
        op.train(mode)
        out = op(x)
        assert out.dim() == 4 and out.shape[:2] == (B, C)
        bundled = op(x[None])
        assert bundled.shape == (1, *out.shape)
