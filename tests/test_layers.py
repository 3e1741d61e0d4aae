"""RepConv2d / RepLinear: every recipe × connectivity × geometry is exact after deployment.

Besides ``check_equivalence`` (training structure in eval mode vs. the deployed
plain layer), each case is compared against the *literal* branch-by-branch
evaluation of :mod:`neusub.reference` (DBB-style BN-and-pad for sequential branches, one
BatchNorm per branch with statistics over all input streams), in training mode (values,
gradients, running statistics) and in eval mode. That guards against the stacked/composed
fast path and the fused kernel agreeing with each other on a wrong function.
"""

from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch
from helpers import randomize_bn, rel_err
from torch import Tensor, nn

import neusub
from neusub import RepConv2d, RepLinear
from neusub.recipes import RECIPES as RECIPE_ENTRIES
from neusub.reference import literal_forward

RECIPES = neusub.list_recipes()
CENTRED = {name for name, entry in RECIPE_ENTRIES.items() if entry.centred}  # odd k, same padding

# id: (connectivity, in_streams, stochastic, neural_drop, 1-stream input given as a 5-D bundle)
CONNECTIVITY = {
    "block": ("block", 1, 0.0, 0.0, False),
    "ns-s1": ("ns", 1, 0.0, 0.0, False),
    "ns-s3": ("ns", 3, 0.0, 0.0, False),
    "ns-stoch-s1": ("ns", 1, 1.0, 0.2, True),
    "ns-stoch-s3": ("ns", 3, 1.0, 0.2, False),
}
# id: (in_channels, out_channels, groups); "dense" has in != out so identity branches drop
CHANNELS = {"dense": (4, 6, 1), "depthwise": (4, 4, 4), "grouped": (4, 4, 2)}
KERNELS = (1, 3, 5)
STRIDE_DILATION = list(itertools.product((1, 2), (1, 2)))
BATCH, SIZE = 2, 7
FP64_TOL, FP32_TOL = 1e-12, 1e-5


# --------------------------------------------------------------------------- helpers


def _batch_norms(layer) -> dict[str, nn.Module]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def check_same_running_stats(layer, literal, skip: tuple[str, ...] = ()) -> None:
    """Every BN's buffers after one training forward equal those the literal forward left
    (which ran ``F.batch_norm`` on each branch: nn.BatchNorm's own update)."""
    expected = _batch_norms(literal)
    for name, bn in _batch_norms(layer).items():
        if name in skip:
            continue
        want = expected[name]
        torch.testing.assert_close(bn.running_mean, want.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, want.running_var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == int(want.num_batches_tracked), name


def exercise_and_check(layer, x: Tensor, exact_training: bool) -> tuple[float, float]:
    """Random BN; one training forward and backward against the literal reference (values,
    gradients, running statistics); 2 more train steps; literal eval check; deploy check.

    Returns the (fp64, fp32) relative errors of ``check_equivalence``.
    """
    layer = layer.double()
    x = x.double()
    randomize_bn(layer)
    layer.train()
    literal = copy.deepcopy(layer)
    x_fast, x_literal = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    expected = literal_forward(literal, x_literal)  # canonical partition, no neural drop
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    out = layer(x_fast)
    assert out.shape == expected.shape
    if exact_training:  # else: random partition / dropped pairs, only BN statistics are fixed
        assert rel_err(out, expected) <= FP64_TOL
    # dropped pairs change the sum that the BN after it (qarepvgg) normalises
    check_same_running_stats(layer, literal, ("post_bn",) if layer.neural_drop > 0 else ())
    (out * weights).sum().backward()
    if exact_training:
        got = {"x": x_fast.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        want = {"x": x_literal.grad, **{n: p.grad for n, p in literal.named_parameters()}}
        # relative to the largest gradient: some are ~0 by BN's scale invariance (cancellation)
        scale = max(float(g.abs().max()) for g in want.values() if g is not None)
        for name, g in got.items():
            if want[name] is None:
                assert g is None or not g.any(), name
            elif g is None:  # left out of the graph by the fast path: exactly zero (inner BN shift)
                assert float(want[name].abs().max()) <= 1e-11 * scale, name
            else:
                assert float((g - want[name]).abs().max()) <= 1e-11 * scale, name
    for _ in range(2):
        layer(x).sum().backward()

    layer.eval()
    with torch.no_grad():
        assert rel_err(layer(x), literal_forward(layer, x)) <= FP64_TOL
    err64 = neusub.check_equivalence(layer, x)
    err32 = neusub.check_equivalence(copy.deepcopy(layer).float(), x.float())
    assert err64 <= FP64_TOL, err64
    assert err32 <= FP32_TOL, err32
    return err64, err32


# --------------------------------------------------------------------------- the grid


def conv_case(recipe, conn_id, channels_id, k, stride, dilation):
    connectivity, streams, stochastic, neural_drop, bundled = CONNECTIVITY[conn_id]
    c_in, c_out, groups = CHANNELS[channels_id]
    layer = RepConv2d(
        c_in,
        c_out,
        k,
        stride,
        dilation=dilation,
        groups=groups,
        recipe=recipe,
        connectivity=connectivity,
        in_streams=streams,
        stochastic=stochastic,
        neural_drop=neural_drop,
    )
    shape = (BATCH, c_in, SIZE, SIZE)
    if connectivity != "block" and (streams > 1 or bundled):
        shape = (streams, *shape)
    return layer, torch.randn(shape, dtype=torch.float64), stochastic == 0 and neural_drop == 0


@pytest.mark.parametrize("channels_id", list(CHANNELS))
@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("conn_id", list(CONNECTIVITY))
@pytest.mark.parametrize("recipe", RECIPES)
def test_conv_grid_exact(recipe, conn_id, k, channels_id):
    for stride, dilation in STRIDE_DILATION:
        torch.manual_seed(zlib.crc32(repr((recipe, conn_id, k, channels_id, stride, dilation)).encode()))
        layer, x, exact_training = conv_case(recipe, conn_id, channels_id, k, stride, dilation)
        exercise_and_check(layer, x, exact_training)


def test_grid_construction_errors_are_exactly_even_kernels_of_centred_recipes():
    """Nothing in the grid raises; adding even kernels raises exactly for the centred recipes."""
    raised = set()
    for recipe, conn_id, channels_id, k, (stride, dilation) in itertools.product(
        RECIPES, CONNECTIVITY, CHANNELS, (*KERNELS, 2, 4), STRIDE_DILATION
    ):
        try:
            conv_case(recipe, conn_id, channels_id, k, stride, dilation)
        except ValueError as err:
            assert "even" in str(err)
            raised.add((recipe, k))
    assert raised == {(r, k) for r in CENTRED for k in (2, 4)}


@pytest.mark.parametrize("recipe", ["plain", "conv2", "conv3"])
def test_even_kernels_for_non_centred_recipes(recipe):
    for k, padding in [(2, 0), (2, 1), (4, 1)]:
        layer = RepConv2d(3, 5, k, padding=padding, recipe=recipe, connectivity="ns")
        exercise_and_check(layer, torch.randn(BATCH, 3, SIZE, SIZE), exact_training=True)


def test_rectangular_kernels_and_asymmetric_stride():
    for recipe in ["repvgg", "acnet+", "dbb", "nsnet", "mobileone"]:
        layer = RepConv2d(4, 6, (3, 5), stride=(1, 2), dilation=(2, 1), recipe=recipe, connectivity="ns")
        exercise_and_check(layer, torch.randn(BATCH, 4, SIZE, SIZE), exact_training=True)


@pytest.mark.parametrize("recipe", ["repvgg", "acnet", "dbb", "mobileone", "nsnet"])
def test_naive_connectivity_conv(recipe):
    for streams, channels_id in [(1, "dense"), (2, "depthwise"), (3, "grouped")]:
        c_in, c_out, groups = CHANNELS[channels_id]
        layer = RepConv2d(
            c_in, c_out, 3, groups=groups, recipe=recipe, connectivity="naive", in_streams=streams
        )
        x = torch.randn(streams, BATCH, c_in, SIZE, SIZE)
        assert layer.out_streams == streams * layer.num_branches
        assert layer(x).shape[0] == layer.out_streams
        exercise_and_check(layer, x, exact_training=True)


def test_mobileone_options():
    for branches in (1, 2, 4):
        layer = RepConv2d(
            4, 4, 3, recipe=neusub.Recipe("mobileone", {"num_conv_branches": branches}), connectivity="ns"
        )
        # k conv branches + scale + identity
        assert layer.num_branches == branches + 2
        exercise_and_check(layer, torch.randn(BATCH, 4, SIZE, SIZE), exact_training=True)


# --------------------------------------------------------------------------- RepLinear

LINEAR_CONNECTIVITY = {
    "block": ("block", 1, 0.0, 0.0),
    "ns": ("ns", 3, 0.0, 0.0),
    "ns-stoch": ("ns", 3, 1.0, 0.2),
    "naive": ("naive", 2, 0.0, 0.0),
}


@pytest.mark.parametrize("tokens", [False, True], ids=["SBD", "SBTD"])
@pytest.mark.parametrize("features", [(4, 4), (4, 6)], ids=["square", "wide"])
@pytest.mark.parametrize("conn_id", list(LINEAR_CONNECTIVITY))
@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_exact(recipe, conn_id, features, tokens):
    connectivity, streams, stochastic, neural_drop = LINEAR_CONNECTIVITY[conn_id]
    torch.manual_seed(len(recipe) + streams)
    layer = RepLinear(*features, recipe, connectivity, streams, stochastic, neural_drop)
    shape = (BATCH, 3, features[0]) if tokens else (BATCH, features[0])
    if connectivity != "block":
        shape = (streams, *shape)
    x = torch.randn(shape)
    out = layer(x)
    extra = 0 if connectivity == "block" else 1
    assert out.shape == (*((layer.out_streams,) if extra else ()), *shape[extra:-1], features[1])
    exercise_and_check(layer, x, exact_training=stochastic == 0 and neural_drop == 0)


@pytest.mark.parametrize("recipe", ["repvgg", "dbb", "nsnet"])
def test_linear_one_stream_bundle(recipe):
    """in_streams=1 with a 1-stream bundle ``(1, B, [T,] D)`` and with a plain ``(B, D)``."""
    for shape in [(1, BATCH, 5, 4), (1, BATCH, 4), (BATCH, 4)]:
        layer = RepLinear(4, 4, recipe, "ns")
        exercise_and_check(layer, torch.randn(shape), exact_training=True)


# --------------------------------------------------------------------------- deploy


def _walk_is_plain(module: nn.Module) -> None:
    from neusub.branches import ConvBranch, FixedBranch, SequentialBranch

    for m in module.modules():
        assert not isinstance(m, nn.modules.batchnorm._BatchNorm), m
        assert not isinstance(m, neusub.StreamModule), m
        assert not isinstance(m, (ConvBranch, FixedBranch, SequentialBranch, nn.ModuleDict)), m


def _trained_layer(recipe, connectivity="ns", streams=2, **kwargs):
    torch.manual_seed(0)
    layer = RepConv2d(4, 4, 3, recipe=recipe, connectivity=connectivity, in_streams=streams, **kwargs)
    randomize_bn(layer)
    x = torch.randn(streams, BATCH, 4, SIZE, SIZE) if connectivity != "block" else torch.randn(BATCH, 4, 7, 7)
    for _ in range(2):
        layer(x).sum().backward()
    return layer, x


@pytest.mark.parametrize("recipe", RECIPES)
def test_deployed_is_one_plain_conv(recipe):
    for connectivity, streams, groups, c_out in [("ns", 2, 1, 6), ("block", 1, 4, 4), ("naive", 3, 2, 4)]:
        layer = RepConv2d(
            4, c_out, 3, 2, groups=groups, recipe=recipe, connectivity=connectivity, in_streams=streams
        )
        deployed = neusub.deploy(layer)
        assert type(deployed) is nn.Conv2d
        reference = nn.Conv2d(4, c_out, 3, 2, 1, groups=groups, bias=True)
        assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in reference.parameters())
        assert (deployed.kernel_size, deployed.stride, deployed.padding, deployed.groups) == (
            reference.kernel_size,
            reference.stride,
            reference.padding,
            reference.groups,
        )
        assert not deployed.training
        _walk_is_plain(deployed)

    lin = neusub.deploy(RepLinear(4, 6, recipe, "ns", in_streams=3))
    assert type(lin) is nn.Linear and lin.bias is not None
    assert sum(p.numel() for p in lin.parameters()) == 4 * 6 + 6


@pytest.mark.parametrize("recipe", ["dbb", "nsnet", "mobileone"])
def test_deploy_leaves_original_untouched_and_trainable(recipe):
    layer, x = _trained_layer(recipe, stochastic=1.0, neural_drop=0.1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    was_training = layer.training
    neusub.deploy(layer)
    neusub.check_equivalence(layer, x)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert layer.training == was_training
    assert isinstance(layer.branches, nn.ModuleDict) and not layer.deployed

    # the original still trains: a step changes its parameters and its output
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.zero_grad()
    (layer(x) ** 2).mean().backward()
    opt.step()
    assert any(not torch.equal(before[name], p) for name, p in layer.named_parameters())
    assert neusub.check_equivalence(layer.double(), x.double()) <= FP64_TOL


@pytest.mark.parametrize("recipe", RECIPES)
def test_deploy_before_any_forward_is_exact(recipe):
    for streams in (1, 3):
        layer = RepConv2d(4, 4, 3, recipe=recipe, connectivity="ns", in_streams=streams).double()
        randomize_bn(layer, seed=streams)
        x = torch.randn(streams, BATCH, 4, SIZE, SIZE, dtype=torch.float64)
        assert all(int(m.num_batches_tracked) == 0 for m in layer.modules() if isinstance(m, nn.BatchNorm2d))
        assert neusub.check_equivalence(layer, x) <= FP64_TOL


@pytest.mark.parametrize("recipe", ["repvgg", "acnet+", "dbb", "nsnet"])
def test_deploy_twice_and_reparameterize(recipe):
    layer, x = _trained_layer(recipe, streams=3)
    layer = layer.double()
    x = x.double()
    first, second = neusub.deploy(layer), neusub.deploy(layer)
    assert first is not second
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    again = neusub.deploy(first)  # deploying a deployed network changes nothing
    assert type(again) is nn.Conv2d
    assert torch.equal(again.weight, first.weight) and torch.equal(again.bias, first.bias)
    inplace = neusub.deploy(copy.deepcopy(layer), inplace=True)
    assert torch.equal(inplace.weight, first.weight)

    plain_x = x.sum(0)
    layer.eval()
    expected = layer(x).sum(0)
    layer.reparameterize()
    assert layer.deployed
    _walk_is_plain(layer.plain)
    out = layer(plain_x)
    assert torch.equal(out, first(plain_x))
    assert rel_err(out, expected) <= FP64_TOL
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.reparameterize()  # idempotent
    assert layer.state_dict().keys() == state.keys()
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    assert torch.equal(layer(plain_x), out)
    assert "in_streams=3" in repr(layer)  # still printable after reparameterize
    assert layer.out_streams == layer.num_branches
    assert type(neusub.deploy(layer)) is nn.Conv2d  # a reparameterized layer deploys to its plain form
    _walk_is_plain(neusub.deploy(layer))


def test_deploy_result_dtype_follows_model():
    layer, x = _trained_layer("dbb")
    assert neusub.deploy(layer).weight.dtype == torch.float32
    assert neusub.deploy(layer.double()).weight.dtype == torch.float64


@pytest.mark.parametrize("recipe", ["dbb", "repvgg", "acnet+", "mobileone", "nsnet"])
@pytest.mark.parametrize("stride", [1, 2])
def test_block_groups_equal_one_stacked_conv(recipe, stride):
    """Block connectivity runs 1×1 branches as 1×1 convs and 1×1→BN→avg as 1×1 + avg-pool;
    values, gradients and running statistics equal the single stacked k×k conv's."""
    torch.manual_seed(0)
    grouped = RepConv2d(4, 4, 3, stride, recipe=recipe, connectivity="block").double()
    randomize_bn(grouped)
    stacked = copy.deepcopy(grouped)
    stacked.block_path = "stacked"
    groups = grouped.block_groups()
    assert groups is not None and (groups["pointwise"] or groups["pool"])
    if recipe == "dbb":
        assert groups == {"kxk": [0, 3], "pointwise": [1], "pool": [2]}
    for _ in range(2):
        x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = grouped(xa), stacked(xb)
        (out_a.square().sum() + out_a.sum()).backward()
        (out_b.square().sum() + out_b.sum()).backward()
        assert rel_err(out_a, out_b) < 1e-12 and rel_err(xa.grad, xb.grad) < 1e-12
    scale = max(p.grad.abs().max() for p in stacked.parameters() if p.grad is not None)
    for (name, pa), (_, pb) in zip(grouped.named_parameters(), stacked.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert (pa.grad - pb.grad).abs().max() < 1e-12 * scale, name
    for (name, ba), (_, bb) in zip(grouped.named_buffers(), stacked.named_buffers()):
        assert torch.equal(ba, bb) if name.endswith("num_batches_tracked") else rel_err(ba, bb) < 1e-12, name
    grouped.eval(), stacked.eval()
    assert rel_err(grouped(x), stacked(x)) < 1e-12


def test_a_registered_recipe_is_a_recipe_everywhere():
    from neusub.recipes import RECIPES, Branch, register_recipe

    def kxk_and_1x3(geom):  # a user's recipe: k×k plus a 1×3 branch, both conv-BN
        return [Branch("kxk", "conv", geom.kernel), Branch("1x3", "conv", (1, 3))]

    register_recipe("kxk_1x3", kxk_and_1x3, centred=True)
    try:
        assert "kxk_1x3" in neusub.list_recipes()
        layer = RepConv2d(4, 4, 3, recipe="kxk_1x3", connectivity="ns", in_streams=2, stochastic=1.0)
        x = torch.randn(2, 2, 4, 7, 7, dtype=torch.float64)
        layer = layer.double()
        layer(x).sum().backward()
        layer.eval()
        assert neusub.check_equivalence(layer, x) <= FP64_TOL
        with pytest.raises(ValueError, match="even"):  # centred: the registry's rule applies
            RepConv2d(4, 4, 2, recipe="kxk_1x3")
    finally:
        del RECIPES["kxk_1x3"]


def test_few_rows_take_the_variance_from_the_rows():
    from neusub.branches import input_moments

    x = torch.randn(6, 12, dtype=torch.float64)  # 6 rows < 12 channels: an MLP's batch
    weight = torch.randn(1, 48, 12, dtype=torch.float64)
    moments = input_moments(x)
    direct = moments.projected_variance(weight)
    assert moments._cov is None  # the covariance was never formed
    through_cov = ((weight @ moments.cov()) * weight).sum(-1).flatten()
    assert torch.allclose(direct, through_cov, rtol=1e-12, atol=0)
    layer = RepLinear(12, 12, recipe="nsnet").double()
    fresh = input_moments(x)
    layer.branches["1x1_4c_kxk"].batch_affine(fresh)
    assert fresh._cov is None


def test_a_convs_many_rows_take_the_variance_through_the_covariance():
    # B·H·W rows ≫ channels: projecting every row would keep (M, n) for backward per branch,
    # the covariance keeps (C, C) once per layer.
    from neusub.branches import input_moments

    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)  # 144 rows, 8 channels
    weight = torch.randn(1, 8, 8, dtype=torch.float64)
    moments = input_moments(x)
    through_cov = moments.projected_variance(weight)
    assert moments._cov is not None
    rows = x.permute(1, 0, 2, 3).reshape(8, -1)
    assert torch.allclose(through_cov, (weight[0] @ rows).var(1, correction=0), rtol=1e-12, atol=0)
