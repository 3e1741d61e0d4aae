"""The fast RepConv2d training path against the literal reference (fp64).

For each geometry two deep copies of one layer (randomised BN affine parameters and
running statistics) are run: the fast path ``layer(x)`` and ``literal_forward``.
Both see the same partition: the canonical one, or a fixed mixing returned by a
monkeypatched ``neusub.layers.draw_mixing`` (random partitions, neural-drop weights).
Checked: (a) training outputs, (b) gradients of the input and of every parameter for a
random upstream gradient, (c) running statistics of inner and outer BNs after three
training forwards, (d) eval outputs after that. Gradients that are exactly zero (inner BN
shifts, cancelled by the training-mode outer BN) or O(eps) are compared with a floor
relative to the layer's largest gradient, see ``_check_forward_and_grads``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import neusub.layers
from neusub import Recipe, RepConv2d
from neusub.partition import (
    canonical_partition,
    mixing_matrix,
    pair_keep_mask,
    random_partition,
)
from neusub.reference import branch_channels, literal_forward

DTYPE = torch.float64
BATCH, HEIGHT, WIDTH = 3, 7, 6
OUT_TOL = 1e-12
GRAD_TOL = 1e-10
ZERO_TOL = 1e-13  # floor, relative to the largest gradient of the layer (see below)


@dataclass(frozen=True)
class Case:
    recipe: str
    in_ch: int = 4
    out_ch: int = 4
    groups: int = 1
    stride: int = 1
    streams: int = 1
    kernel: int | tuple[int, int] = 3
    dilation: int = 1
    connectivity: str = "ns"
    momentum: float | None = 0.1
    options: dict = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        opts = "".join(f"-{k}{v}" for k, v in self.options.items())
        return (
            f"{self.recipe}{opts}-{self.in_ch}to{self.out_ch}-g{self.groups}-s{self.stride}-S{self.streams}"
            f"-k{self.kernel}-d{self.dilation}-{self.connectivity}-m{self.momentum}"
        )


def _core_cases() -> list[Case]:
    cases = []
    for recipe in ("dbb", "nsnet", "repvgg", "qarepvgg", "acnet", "mobileone"):
        strides = (1, 2) if recipe in ("dbb", "nsnet", "repvgg", "qarepvgg") else (1,)
        for groups in (1, 4):  # dense and depthwise (4 channels)
            for stride in strides:
                for streams in (1, 4):
                    cases.append(Case(recipe, groups=groups, stride=stride, streams=streams))
    return cases


CORE = _core_cases()
EXTRA = [
    Case("dbb", in_ch=4, out_ch=6, groups=2, streams=4),  # grouped, not depthwise
    Case("nsnet", in_ch=4, out_ch=6, groups=2, stride=2, streams=4),
    Case("dbb", groups=4, streams=4, dilation=2),  # dilated avg branch
    Case("nsnet", stride=2, streams=4, dilation=2),  # dilated 1×1 → BN → avg
    Case("nsnet", in_ch=3, out_ch=5, streams=4, kernel=5),
    Case("acnet", streams=4, kernel=(3, 5)),  # non-square: per-axis padding
    Case("acnet", streams=4, kernel=(3, 5), dilation=2),  # 1×k, k×1 centred in a dilated kernel
    Case("repvgg", groups=4, streams=4, dilation=2),
    Case("acnet", streams=4, kernel=5, groups=4),
    Case("mobileone", groups=4, streams=4, options={"num_conv_branches": 3}),
    Case("nsnet", stride=2, streams=4, momentum=None),  # cumulative running averages
    Case("dbb", streams=4, momentum=None),
]
CONNECTIVITY = [
    Case("dbb", connectivity="block"),
    Case("nsnet", stride=2, connectivity="block"),
    Case("nsnet", streams=2, connectivity="naive"),
    Case("repvgg", groups=4, streams=2, connectivity="naive"),
    Case("qarepvgg", connectivity="block"),
    Case("qarepvgg", streams=2, connectivity="naive"),
]


def make_layer(case: Case, stochastic: float, seed: int = 0) -> RepConv2d:
    torch.manual_seed(seed)
    recipe = Recipe(case.recipe, case.options) if case.options else case.recipe
    layer = RepConv2d(
        case.in_ch,
        case.out_ch,
        case.kernel,
        stride=case.stride,
        dilation=case.dilation,
        groups=case.groups,
        recipe=recipe,
        connectivity=case.connectivity,
        in_streams=case.streams,
        stochastic=stochastic,
    ).to(DTYPE)
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = case.momentum
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(int(torch.randint(0, 5, ())))
    return layer.train()


def make_input(case: Case, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.streams, BATCH, case.in_ch, HEIGHT, WIDTH, generator=gen, dtype=DTYPE)
    return x + torch.randn(case.in_ch, 1, 1, generator=gen, dtype=DTYPE)  # non-zero channel means


def make_mixing(case: Case, num_branches: int, mode: str, seed: int) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(1000 + seed)
    s, n = case.streams, num_branches
    if mode == "canonical":
        return None
    matrix = mixing_matrix(random_partition(s, n, gen), s, n)
    if mode == "drop":  # neural drop: per-sample pair weights (B, N, S, N)
        matrix = matrix[None] * pair_keep_mask(BATCH, s, n, 0.3, gen)[:, None]
    return matrix.to(DTYPE)


class FixedMixing:
    """Stands in for ``neusub.layers.draw_mixing``: returns the queued mixings in order."""

    def __init__(self) -> None:
        self.queue: list[torch.Tensor] = []
        self.calls = 0

    def __call__(self, batch, streams, branches, stochastic, neural_drop, generator=None):
        self.calls += 1
        return self.queue.pop(0)


@pytest.fixture
def fixed_mixing(monkeypatch) -> FixedMixing:
    fake = FixedMixing()
    monkeypatch.setattr(neusub.layers, "draw_mixing", fake)
    return fake


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).detach().norm() / scale.detach())


def make_pair(case: Case, mode: str) -> tuple[RepConv2d, RepConv2d]:
    """A layer for the fast path and an identical deep copy for the literal forward."""
    fast = make_layer(case, stochastic=0.0 if mode == "canonical" else 1.0)
    return fast, copy.deepcopy(fast)


def forward_both(fast, literal, case, mode, fixed, x, seed, x_literal=None):
    """One training (or eval) forward of each side on the same mixing."""
    mixing = make_mixing(case, fast.num_branches, mode, seed)
    calls = fixed.calls
    if mixing is not None:
        fixed.queue.append(mixing)
    out_fast = fast(x[0] if case.connectivity == "block" else x)
    out_literal = literal_forward(literal, x if x_literal is None else x_literal, mixing)
    if mixing is not None:
        assert fixed.calls == calls + 1, "the fast path did not draw the (patched) mixing"
    return out_fast, out_literal


# --------------------------------------------------------------------------- (a) + (b)


def _check_forward_and_grads(case: Case, mode: str, fixed: FixedMixing) -> None:
    fast, literal = make_pair(case, mode)
    x = make_input(case, seed=1)
    x_fast, x_literal = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_literal = forward_both(fast, literal, case, mode, fixed, x_fast, 0, x_literal)
    assert out_fast.shape == out_literal.shape
    assert rel_err(out_fast, out_literal) <= OUT_TOL

    upstream = torch.randn(out_fast.shape, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    names = [name for name, _ in fast.named_parameters()]
    assert names == [name for name, _ in literal.named_parameters()]
    assert {"bn.weight", "bn.bias"} <= set(names)
    inputs = [x_fast, *fast.parameters()]
    # The fast path leaves inner BN shifts out of the training graph (their gradient is exactly
    # zero: a per-channel constant before a training-mode BN), so autograd reports them unused.
    grads_fast = [
        torch.zeros_like(t) if g is None else g
        for t, g in zip(inputs, torch.autograd.grad(out_fast, inputs, upstream, allow_unused=True))
    ]
    grads_literal = torch.autograd.grad(out_literal, [x_literal, *literal.parameters()], upstream)
    # Relative error per gradient, with a floor at ZERO_TOL × the largest gradient: some
    # gradients are exactly 0 (inner BN shifts) or O(eps) (a depthwise 1×1 in front of a
    # training-mode BN is a per-channel scale the BN nearly cancels), i.e. sums of O(1)
    # terms that cancel, where round-off alone gives a large *relative* error.
    scale = max(float(g.norm()) for g in grads_literal)
    for name, g_fast, g_literal in zip(["x", *names], grads_fast, grads_literal):
        diff = float((g_fast - g_literal).norm())
        if name.endswith("bn1.bias"):
            # An inner BN's shift moves its whole padded output (border too: BN-and-pad) by a
            # constant per channel; the k×k conv / avg-pool makes that a constant per output
            # channel, which the training-mode outer BN removes. The exact gradient is 0.
            for side, grad in (("fast", g_fast), ("literal", g_literal)):
                assert float(grad.norm()) <= ZERO_TOL * scale, f"{case} {mode}: {side} d/d{name} != 0"
            continue
        assert g_literal.abs().max() > 0, f"no gradient reached {name} in the literal forward"
        bound = GRAD_TOL * float(g_literal.norm()) + ZERO_TOL * scale
        assert diff <= bound, f"{case} {mode}: gradient of {name} differs by {diff:.2e} (bound {bound:.2e})"


@pytest.mark.parametrize("mode", ["canonical", "random"])
@pytest.mark.parametrize("case", CORE, ids=str)
def test_forward_and_gradients(case: Case, mode: str, fixed_mixing: FixedMixing) -> None:
    _check_forward_and_grads(case, mode, fixed_mixing)


@pytest.mark.parametrize("mode", ["random", "drop"])
@pytest.mark.parametrize("case", EXTRA, ids=str)
def test_forward_and_gradients_extra(case: Case, mode: str, fixed_mixing: FixedMixing) -> None:
    _check_forward_and_grads(case, mode, fixed_mixing)


@pytest.mark.parametrize("case", CONNECTIVITY, ids=str)
def test_forward_and_gradients_connectivity(case: Case, fixed_mixing: FixedMixing) -> None:
    _check_forward_and_grads(case, "canonical", fixed_mixing)


# --------------------------------------------------------------------------- (c) + (d)


def _check_running_stats_and_eval(case: Case, mode: str, fixed: FixedMixing) -> None:
    fast, literal = make_pair(case, mode)
    for step in range(3):
        x = make_input(case, seed=10 + step)
        out_fast, out_literal = forward_both(fast, literal, case, mode, fixed, x, seed=step)
        assert rel_err(out_fast, out_literal) <= OUT_TOL
    buffers_literal = dict(literal.named_buffers())
    inner = [name for name in buffers_literal if "bn1" in name]
    assert ("bn1" in str(literal)) == bool(inner)
    for name, buf_fast in fast.named_buffers():
        buf_literal = buffers_literal[name]
        if not buf_fast.is_floating_point():  # batch counts, channel indices
            assert torch.equal(buf_fast, buf_literal), name
        else:
            err = rel_err(buf_fast, buf_literal)
            assert err <= OUT_TOL, f"{case}: running buffer {name} differs by {err:.2e}"
    # the buffers really moved away from their initial values
    initial = dict(make_layer(case, stochastic=0.0).named_buffers())
    for name in ("bn.running_mean", "bn.running_var", *inner):
        if not name.endswith("num_batches_tracked"):
            assert not torch.equal(initial[name], buffers_literal[name]), name

    fast.eval()
    literal.eval()
    frozen = {name: buf.clone() for name, buf in literal.named_buffers()}
    x = make_input(case, seed=99)
    with torch.no_grad():
        out_fast = fast(x[0] if case.connectivity == "block" else x)
        out_literal = literal_forward(literal, x)
    assert out_fast.shape == out_literal.shape
    assert rel_err(out_fast, out_literal) <= OUT_TOL
    for name, buf in literal.named_buffers():  # eval mode leaves the running statistics alone
        assert torch.equal(buf, frozen[name]), name


@pytest.mark.parametrize("case", CORE + EXTRA, ids=str)
def test_running_stats_and_eval(case: Case, fixed_mixing: FixedMixing) -> None:
    _check_running_stats_and_eval(case, "random", fixed_mixing)


@pytest.mark.parametrize("case", CONNECTIVITY, ids=str)
def test_running_stats_and_eval_connectivity(case: Case, fixed_mixing: FixedMixing) -> None:
    _check_running_stats_and_eval(case, "canonical", fixed_mixing)


# --------------------------------------------------------------------------- the reference itself


def test_literal_uses_the_layers_own_parameters() -> None:
    case = Case("nsnet", stride=2, streams=4)
    layer = make_layer(case, stochastic=1.0)
    before = {name: buf.clone() for name, buf in layer.named_buffers()}
    x = make_input(case, seed=3)
    mixing = make_mixing(case, layer.num_branches, "random", seed=0)
    literal_forward(layer, x, mixing).square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
    for name, buf in layer.named_buffers():
        assert not torch.equal(buf, before[name]), f"{name} was not updated in place"


def test_a_different_partition_is_detected(fixed_mixing: FixedMixing) -> None:
    case = Case("dbb", streams=4)
    fast, literal = make_pair(case, "random")
    x = make_input(case, seed=5)
    fixed_mixing.queue.append(make_mixing(case, fast.num_branches, "random", seed=0))
    out_fast = fast(x)
    other = make_mixing(case, fast.num_branches, "random", seed=1)
    assert rel_err(literal_forward(literal, x, other), out_fast) > 1e-3


def test_canonical_mixing_equals_none() -> None:
    case = Case("acnet", streams=4)
    layer = make_layer(case, stochastic=0.0).eval()
    x = make_input(case, seed=2)
    canonical = mixing_matrix(canonical_partition(4, layer.num_branches), 4, layer.num_branches)
    assert torch.equal(literal_forward(layer, x), literal_forward(layer, x, canonical))


def test_branch_channels_follow_the_stacked_bn_order() -> None:
    layer = make_layer(Case("dbb", in_ch=4, out_ch=6, groups=2), stochastic=0.0)
    order = layer._split(torch.arange(layer.bn.num_features))
    for j in range(layer.num_branches):
        assert torch.equal(branch_channels(layer, j), order[j])


def test_bad_inputs_are_refused() -> None:
    layer = make_layer(Case("repvgg", streams=2), stochastic=0.0)
    with pytest.raises(ValueError, match="bundle"):
        literal_forward(layer, torch.randn(3, BATCH, 4, HEIGHT, WIDTH, dtype=DTYPE))
    with pytest.raises(ValueError, match="mixing"):
        literal_forward(layer, torch.randn(2, BATCH, 4, HEIGHT, WIDTH, dtype=DTYPE), torch.eye(3))
    with pytest.raises(TypeError):
        literal_forward(nn.Conv2d(4, 4, 3), torch.randn(1, BATCH, 4, HEIGHT, WIDTH))
