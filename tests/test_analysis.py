"""neusub.analysis on tiny models: each measure checked against a case with a known answer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import neusub
from neusub import analysis


def tiny_resnet(connectivity: str = "ns", recipe: str = "nsnet") -> nn.Module:
    torch.manual_seed(0)
    return neusub.create_model(
        "resnet18",
        recipe=recipe,
        connectivity=connectivity,
        num_classes=5,
        stem="cifar",
        width_mult=0.125,
        in_chans=1,
    )


def test_branch_similarity_is_one_for_identical_branches_and_lower_otherwise():
    layer = neusub.RepConv2d(4, 6, 3, recipe="conv2", connectivity="ns", in_streams=2).eval()
    x = torch.randn(2, 3, 4, 8, 8)
    (rand,) = analysis.branch_similarity(nn.Sequential(layer), x)
    assert rand["branches"] == 2 and rand["streams"] == 2
    assert rand["branch"] < 0.9 and rand["stream"] < 0.9
    with torch.no_grad():  # the second k×k branch a copy of the first: same pairs, same streams
        branches = list(layer.branches.values())
        branches[1].weight.copy_(branches[0].weight)
    (same,) = analysis.branch_similarity(nn.Sequential(layer), x)
    assert same["branch"] == pytest.approx(1.0, abs=1e-6)
    assert same["stream"] == pytest.approx(1.0, abs=1e-6)


def test_branch_similarity_covers_every_multi_branch_layer():
    x = torch.randn(4, 1, 12, 12)
    block = analysis.branch_similarity(tiny_resnet("block"), x)
    ns = analysis.branch_similarity(tiny_resnet("ns"), x)
    assert [r["layer"] for r in block] == [r["layer"] for r in ns] and len(ns) == 16
    assert all(r["stream"] is None for r in block)
    assert all(-1.0 <= r["stream"] <= 1.0 and -1.0 <= r["branch"] <= 1.0 for r in ns)
    with pytest.raises(ValueError, match="no re-parameterized layer"):
        analysis.branch_similarity(tiny_resnet("block", "plain"), x)


def test_kernel_magnitudes_put_a_centre_only_kernel_in_the_centre():
    layer = neusub.RepConv2d(4, 4, 3, recipe="repvgg")  # k×k, 1×1 and identity
    with torch.no_grad():
        layer.branches["kxk"].weight.zero_()
    stages = analysis.kernel_magnitudes(nn.Sequential(layer))
    fused = torch.tensor(stages["0"]["fused"])
    assert fused.shape == (3, 3) and fused[1, 1] == pytest.approx(1.0) and fused.sum() == pytest.approx(1.0)
    assert torch.tensor(stages["0"]["branches"]["1x1"])[1, 1] == pytest.approx(1.0)

    model_stages = analysis.kernel_magnitudes(tiny_resnet())
    assert list(model_stages) == ["layer1", "layer2", "layer3", "layer4"]
    assert set(model_stages["layer1"]["branches"]) == {"kxk", "1x1", "1x1_2c_kxk", "1x1_4c_kxk"}
    for entry in model_stages.values():
        assert len(entry["layers"]) == 4
        assert sum(map(sum, entry["fused"])) == pytest.approx(1.0)


def test_block_drop_matches_removing_the_block_by_hand():
    plain = neusub.deploy(tiny_resnet()).eval()
    torch.manual_seed(1)
    batches = [(torch.randn(16, 1, 12, 12), torch.randint(0, 5, (16,))) for _ in range(2)]
    # A block whose residual is exactly zero: removing it changes nothing (its input is a ReLU output).
    with torch.no_grad():  # the last BN of the residual branch (an exact affine map) outputs zero
        plain.layer3[1].bn2.weight.zero_()
        plain.layer3[1].bn2.bias.zero_()
    result = analysis.block_drop(plain, batches)
    names = [r["block"] for r in result["blocks"]]
    assert names == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert result["baseline"] == analysis.accuracy(plain, batches)
    by_name = {r["block"]: r for r in result["blocks"]}
    assert by_name["layer3.1"]["drop"] == 0.0
    manual = copy.deepcopy(plain)  # layer1.1 removed by hand
    manual.layer1[1] = nn.Identity()
    assert by_name["layer1.1"]["accuracy"] == analysis.accuracy(manual, batches)
    with pytest.raises(ValueError, match="no residual block"):
        analysis.block_drop(neusub.deploy(neusub.create_model("mobilenet_v1", width_mult=0.25)), batches)


def test_topology_counts():
    result = analysis.topology(tiny_resnet())
    layers = [r for r in result["layers"] if r["branches"] > 1]
    assert len(layers) == 16 and all(r["branches"] == 4 for r in layers)
    first, second = layers[0], layers[1]
    assert first["ns"]["in_streams"] == 1 and first["ns"]["out_streams"] == 4
    assert first["ns"]["log10_partitions"] == pytest.approx(math.log10(24))  # 4! / (1!)^4
    assert second["ns"]["pairs"] == 16 and second["naive"]["in_streams"] == 4
    # (16)! / (4!)^4 ways to route 16 pairs into 4 streams of 4
    assert second["ns"]["log10_partitions"] == pytest.approx(math.log10(63_063_000))
    totals = result["totals"]
    assert totals["paths"] == {"block": 64, "ns": str(4**16), "naive": str(4**16)}
    assert layers[-1]["naive"]["out_streams"] == 4**16
    pairs = totals["pairs_per_forward"]
    assert pairs["block"] < pairs["ns"] < pairs["naive"]
    with pytest.raises(ValueError, match="connectivity='ns'"):
        analysis.topology(tiny_resnet("block"))
