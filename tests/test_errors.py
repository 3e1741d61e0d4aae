"""Bad input: a ValueError that names the problem and what is allowed."""

from __future__ import annotations

import re

import pytest
import torch

import neusub
from neusub import (
    GuidedActivation,
    Recipe,
    RepConv2d,
    RepLinear,
    StreamAdd,
    StreamDropout,
    StreamDropPath,
    StreamMerge,
    StreamSequential,
)
from neusub.recipes import RECIPES

CENTRED = [name for name, entry in RECIPES.items() if entry.centred]


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "make",
    [
        lambda: RepConv2d(4, 4, 3, recipe="bogus"),
        lambda: RepLinear(4, 4, recipe="bogus"),
        lambda: RepConv2d(4, 4, 3, recipe=Recipe("bogus")),
    ],
)
def test_unknown_recipe_lists_recipes(make):
    with pytest.raises(ValueError, match=r"unknown recipe 'bogus'; choose one of ") as info:
        make()
    for name in neusub.list_recipes():
        assert name in str(info.value)


def test_recipe_of_wrong_type():
    with pytest.raises(ValueError, match=r"recipe must be a name or a neusub\.Recipe, got int"):
        RepConv2d(4, 4, 3, recipe=3)


def test_unknown_recipe_option():
    with pytest.raises(ValueError, match=r"recipe 'dbb': bad options \{'bogus': 1\}"):
        RepConv2d(4, 4, 3, recipe=Recipe("dbb", {"bogus": 1}))


@pytest.mark.parametrize("layer", [RepConv2d, RepLinear])
def test_unknown_connectivity_lists_choices(layer):
    args = (4, 4, 3) if layer is RepConv2d else (4, 4)
    with pytest.raises(ValueError, match=r"unknown connectivity 'dense'; choose one of block, ns, naive"):
        layer(*args, recipe="repvgg", connectivity="dense")


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; choose one of ") as info:
        GuidedActivation("tanh")
    for name in neusub.list_activations():
        assert name in str(info.value)
    assert set(neusub.list_activations()) >= {"relu", "leaky_relu", "silu", "gelu", "hardswish"}


def test_mobileone_needs_a_conv_branch():
    for bad in (0, -1, 1.5):
        with pytest.raises(
            ValueError, match=rf"num_conv_branches={re.escape(repr(bad))} is invalid; use an integer >= 1"
        ):
            RepConv2d(4, 4, 3, recipe=Recipe("mobileone", {"num_conv_branches": bad}))
    assert RepConv2d(4, 4, 3, recipe=Recipe("mobileone", {"num_conv_branches": 1})).num_branches == 3


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("recipe", CENTRED)
def test_even_kernel_refused_by_centred_recipes(recipe):
    with pytest.raises(
        ValueError, match=rf"recipe '{re.escape(recipe)}': kernel_size=\(4, 4\) is even.*odd sizes"
    ):
        RepConv2d(4, 4, 4, recipe=recipe)
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 2\) is even"):
        RepConv2d(4, 4, (3, 2), recipe=recipe)


@pytest.mark.parametrize("recipe", ["plain", "conv2"])
def test_even_kernel_works_for_plain_recipes(recipe):
    layer = RepConv2d(3, 4, 2, recipe=recipe, connectivity="ns").double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert layer(x).shape == (layer.num_branches, 2, 4, 5, 5)
    layer(x).sum().backward()
    assert neusub.check_equivalence(layer, x) <= 1e-12


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"groups=4 must divide in_channels=4 and out_channels=6"):
        RepConv2d(4, 6, 3, groups=4, recipe="repvgg")
    with pytest.raises(ValueError, match=r"groups=3 must divide in_channels=4"):
        RepConv2d(4, 6, 3, groups=3, recipe="plain")


@pytest.mark.parametrize("recipe", CENTRED)
def test_non_same_padding_refused_by_centred_recipes(recipe):
    with pytest.raises(
        ValueError,
        match=r"padding=\(0, 0\) cannot be fused; this recipe needs 'same' padding "
        r".* = \(1, 1\) \(pass padding=None\)",
    ):
        RepConv2d(4, 4, 3, padding=0, recipe=recipe)
    with pytest.raises(ValueError, match=r"'same' padding .* = \(2, 2\)"):
        RepConv2d(4, 4, 3, padding=1, dilation=2, recipe=recipe)
    assert RepConv2d(4, 4, 3, padding=2, dilation=2, recipe=recipe).geom.padding == (2, 2)


def test_non_same_padding_fine_for_plain():
    layer = RepConv2d(3, 4, 3, padding=0, recipe="conv3").double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert layer(x).shape == (2, 4, 4, 4)
    assert neusub.check_equivalence(layer, x) <= 1e-12


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kernel_size": 0}, r"kernel_size=\(0, 0\) must be >= 1"),
        ({"stride": 0}, r"stride=\(0, 0\) must be >= 1"),
        ({"dilation": 0}, r"dilation=\(0, 0\) must be >= 1"),
        ({"padding": -1}, r"padding=\(-1, -1\) must be >= 0"),
        ({"kernel_size": "3"}, r"kernel_size='3' must be an int or a pair of ints"),
        ({"kernel_size": (3, 3, 3)}, r"kernel_size=\(3, 3, 3\) must be an int or a pair of ints"),
        ({"out_channels": 0}, r"out_channels=0 must be >= 1"),
    ],
)
def test_bad_shape_arguments(kwargs, message):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "recipe": "plain", **kwargs}
    with pytest.raises(ValueError, match=message):
        RepConv2d(**args)


# --------------------------------------------------------------------------- probabilities


@pytest.mark.parametrize("name", ["stochastic", "neural_drop"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_probabilities_outside_unit_interval(name, value):
    pattern = rf"{name}={re.escape(repr(value))} is out of range; use a probability in \[0, 1\]"
    with pytest.raises(ValueError, match=pattern):
        RepConv2d(4, 4, 3, recipe="dbb", connectivity="ns", **{name: value})
    with pytest.raises(ValueError, match=pattern):
        RepLinear(4, 4, "dbb", "ns", **{name: value})
    for ok in (0.0, 1.0):  # the ends are allowed
        RepConv2d(4, 4, 3, recipe="dbb", connectivity="ns", **{name: ok})


def test_dropout_probabilities():
    with pytest.raises(ValueError, match=r"p=1\.5 is out of range; use a probability in \[0, 1\]"):
        StreamDropout(1.5)
    with pytest.raises(ValueError, match=r"drop_path=-0\.5 is out of range; use a probability in \[0, 1\]"):
        StreamDropPath(-0.5)


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_invalid_stream_counts(bad):
    pattern = rf"in_streams={re.escape(repr(bad))} is invalid; use an integer >= 1"
    with pytest.raises(ValueError, match=pattern):
        RepConv2d(4, 4, 3, recipe="dbb", connectivity="ns", in_streams=bad)
    with pytest.raises(ValueError, match=pattern):
        GuidedActivation("relu", in_streams=bad)
    with pytest.raises(ValueError, match=pattern):
        StreamSequential(GuidedActivation("relu"), in_streams=bad)


def test_bundle_with_wrong_stream_count():
    layer = RepConv2d(4, 4, 3, recipe="dbb", connectivity="ns", in_streams=2)
    with pytest.raises(ValueError, match=r"built for in_streams=2 but got 3 streams.*matching in_streams"):
        layer(torch.randn(3, 2, 4, 7, 7))
    with pytest.raises(
        ValueError, match=r"expects a bundle \(S=2, \.\.\.\) of 5 dims, got shape \(2, 4, 7, 7\)"
    ):
        layer(torch.randn(2, 4, 7, 7))  # a plain tensor needs in_streams=1
    lin = RepLinear(4, 4, "dbb", "ns", in_streams=2)
    with pytest.raises(ValueError, match=r"built for in_streams=2 but got 3 streams"):
        lin(torch.randn(3, 2, 4))
    act = GuidedActivation("relu", in_streams=3)
    with pytest.raises(ValueError, match=r"built for in_streams=3 but got 2 streams"):
        act(torch.randn(2, 2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"built for in_streams=3 but got 2 streams"):
        StreamMerge(3)(torch.randn(2, 2, 4))


def test_wrong_channel_or_feature_count():
    layer = RepConv2d(4, 4, 3, recipe="dbb", connectivity="ns", in_streams=2)
    with pytest.raises(
        ValueError, match=r"RepConv2d expects 4 input channels at dim 2, got shape \(2, 2, 5, 7, 7\)"
    ):
        layer(torch.randn(2, 2, 5, 7, 7))
    with pytest.raises(ValueError, match=r"RepConv2d expects 4 input channels"):
        RepConv2d(4, 4, 3, recipe="repvgg")(torch.randn(2, 3, 7, 7))
    with pytest.raises(ValueError, match=r"RepLinear expects 4 features at dim -1, got shape \(2, 3, 5\)"):
        RepLinear(4, 4, "dbb", "ns", in_streams=2)(torch.randn(2, 3, 5))


def test_input_smaller_than_kernel():
    with pytest.raises(
        ValueError,
        match=r"input \(2, 2\) is smaller than the \(dilated\) kernel \(5, 5\) with padding \(0, 0\)",
    ):
        RepConv2d(4, 4, 5, padding=0, recipe="plain")(torch.randn(1, 4, 2, 2))


def test_naive_connectivity_refused_past_4096_streams():
    with pytest.raises(
        ValueError,
        match=r"connectivity='naive' would make 6000 streams \(in_streams=2000 × 3 branches\), "
        r"over the limit of 4096; use connectivity='ns'",
    ):
        RepConv2d(4, 4, 3, recipe="repvgg", connectivity="naive", in_streams=2000)
    # 4^6 = 4096 streams is the limit; a seventh nsnet (4-branch) layer goes past it
    layers = [RepConv2d(2, 2, 1, recipe="nsnet", connectivity="naive") for _ in range(7)]
    assert StreamSequential(*layers[:6]).out_streams == 4096
    with pytest.raises(ValueError, match=r"would make 16384 streams \(in_streams=4096 × 4 branches\)"):
        StreamSequential(*layers)


def test_block_connectivity_needs_one_stream():
    pattern = (
        r"connectivity='block' takes a plain tensor \(in_streams=1\), got in_streams=2.*connectivity='ns'"
    )
    with pytest.raises(ValueError, match=pattern):
        RepConv2d(4, 4, 3, recipe="repvgg", connectivity="block", in_streams=2)
    with pytest.raises(
        ValueError, match=r"connectivity='block' takes a plain tensor \(in_streams=1\), got in_streams=3"
    ):
        StreamSequential(  # acnet: 3 branches → 3 streams into a block layer
            RepConv2d(4, 4, 3, recipe="acnet", connectivity="ns"),
            RepConv2d(4, 4, 3, recipe="repvgg", connectivity="block"),
        )
    # merged first, it is fine
    StreamSequential(
        RepConv2d(4, 4, 3, recipe="acnet", connectivity="ns"),
        StreamMerge(),
        RepConv2d(4, 4, 3, recipe="repvgg", connectivity="block"),
    )


def test_stream_add_with_incompatible_stream_counts():
    with pytest.raises(
        ValueError, match=r"StreamAdd cannot add 2 streams to 3; the operands need equal stream counts"
    ):
        StreamAdd(3, 2)
    add = StreamAdd(3, 3)
    with pytest.raises(ValueError, match=r"StreamAdd cannot add 3 streams to 4"):
        add.set_in_streams(4)
    assert (add.in_streams, add.other_streams) == (3, 3)  # a refused count changes nothing
    one = StreamAdd(3, 1)
    with pytest.raises(
        ValueError, match=r"other_streams=1 but the second operand has 3 streams.*other_streams=3"
    ):
        one(torch.randn(3, 2, 4), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match=r"built for in_streams=3 but got 2 streams"):
        add(torch.randn(3, 2, 4), torch.randn(2, 2, 4))
