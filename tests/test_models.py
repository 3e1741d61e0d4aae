"""Whole models: the deployed network computes the training structure's eval-mode function.

For every model of ``neusub.list_models()``, recipe and connectivity (docs/design.md §2): BN affine
parameters and running statistics are randomised (every BatchNorm: the stacked ``layer.bn``,
the inner ``bn1`` of sequential branches, plain conv-BNs), a few SGD steps are taken, and the
eval-mode output of the training structure must equal the deployed network's (fp64: max
relative error ≤ 1e-9; fp32 on a subset: ≤ 1e-5). The deployed network must have exactly the
parameter count of the same model built with ``recipe="plain", connectivity="block"`` and
deployed, and contain no re-parameterized layer and no stream module; the ResNets (timm's,
converted) come back as timm ResNets with their own BatchNorms, the others with none.

Cost: the full cross product (models × 7 recipes × 3 connectivities) of every model would
take several minutes on 2 cores, so it runs on ``FULL_GRID`` (resnet18, the first MobileOne
variant, the MLP adapters; tiny widths, 32×32 inputs; MobileNet-V1 is built of MobileOne's
plain block and converted the same way). Every other model runs a Latin-square subset: each
recipe once, with the connectivity rotating with the model's index, so that each model sees
every recipe and every connectivity, except ``SAME_BLOCKS`` (the blocks of a model that sees
every recipe, at another depth or width): one case per connectivity. In fp32 each model runs
one of two cases, alternating.

Inputs: images ``(B, 3, 32, 32)`` with ``stem="cifar"`` for conv models; token features
``(B, T, D)`` for the models of ``TOKEN_MODELS``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_bn, small_model
from torch import Tensor, nn

import neusub
from neusub.streams import StreamModule

MODELS = neusub.list_models()
RECIPES = ("plain", "conv2", "repvgg", "acnet", "dbb", "mobileone", "nsnet")
# id: (connectivity, stochastic)
CONNECTIVITIES = {"block": ("block", 0.0), "ns": ("ns", 0.0), "ns-stoch": ("ns", 1.0)}
# extra kwargs; input (B, T, D)
TOKEN_MODELS = {"mlp_adapter": {"in_features": 12}, "linear_adapter": {"in_features": 12}}
TOKENS = 3
WIDTH = 0.125
NUM_CLASSES = 10
TOL64, TOL32 = 1e-9, 1e-5
# bf16 has an 8-bit mantissa: the training structure (stacked branch kernels, N·S pairs summed
# in bf16) and the deployed network (kernels fused in fp64, then rounded once) round differently
# at every layer; a few 1e-2 of relative error over a small network is the expected noise.
TOL_BF16 = 5e-2


def _first(prefix: str) -> list[str]:
    return [name for name in MODELS if name.startswith(prefix)][:1]


FULL_GRID = {"resnet18", *_first("mobileone"), *TOKEN_MODELS}
# Models built of the blocks of one that runs every recipe (resnet18, resnet50, mobileone_s0), at
# other depths and widths: one case per connectivity, the recipes rotating from model to model.
SAME_BLOCKS = {"resnet34", "resnet101", "mobileone_s1", "mobileone_s2", "mobileone_s3"}
FP32_CASES = [("dbb", "ns-stoch"), ("repvgg", "block")]


def _grid() -> list:
    cases = []
    for i, name in enumerate(MODELS):
        for j, recipe in enumerate(RECIPES):
            for k, conn in enumerate(CONNECTIVITIES):
                if name in SAME_BLOCKS:
                    chosen = j == (len(CONNECTIVITIES) * i + k) % len(RECIPES)
                else:
                    chosen = name in FULL_GRID or (i + j) % len(CONNECTIVITIES) == k
                if chosen:
                    cases.append(pytest.param(name, recipe, conn, id=f"{name}-{recipe}-{conn}"))
    return cases


# --------------------------------------------------------------------------- helpers


def model_kwargs(name: str) -> dict:
    kwargs = {"num_classes": NUM_CLASSES, "width_mult": WIDTH}
    if name in TOKEN_MODELS:
        return {**kwargs, **TOKEN_MODELS[name]}
    return {**kwargs, "stem": "cifar"}


def make_input(name: str, batch: int, dtype: torch.dtype = torch.float64) -> Tensor:
    if name in TOKEN_MODELS:
        return torch.randn(batch, TOKENS, TOKEN_MODELS[name]["in_features"], dtype=dtype)
    return torch.randn(batch, 3, 32, 32, dtype=dtype)


def build(name: str, recipe: str, conn: str, dtype: torch.dtype = torch.float64) -> nn.Module | None:
    """The model, or ``None`` when the combination is refused with a clear ``ValueError``."""
    connectivity, stochastic = CONNECTIVITIES[conn]
    try:
        model = neusub.create_model(
            name, recipe=recipe, connectivity=connectivity, stochastic=stochastic, **model_kwargs(name)
        )
    except ValueError as err:
        message = str(err)
        # A refusal must say what was refused; ResNets take every recipe.
        assert recipe in message or name in message, f"unclear refusal: {message}"
        assert not name.startswith(("resnet", "resnext")), f"{name} refused {recipe}/{conn}: {message}"
        return None
    return model.to(dtype)


def train_steps(model: nn.Module, name: str, dtype: torch.dtype, steps: int = 2, batch: int = 3) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        x = make_input(name, batch, dtype)
        target = torch.randint(0, NUM_CLASSES, (batch,))
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def plain_param_count(name: str) -> int:
    model = neusub.create_model(name, recipe="plain", connectivity="block", **model_kwargs(name))
    return n_params(neusub.deploy(model))


def assert_plain(deployed: nn.Module, converted: bool) -> None:
    """No stream module is left; a converted model keeps its own BatchNorms (the original layout)."""
    for path, module in deployed.named_modules():
        if not converted:
            assert not isinstance(module, nn.modules.batchnorm._BatchNorm), f"BatchNorm left at {path}"
        assert not isinstance(module, StreamModule), f"{type(module).__name__} left at {path}"


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def eval_error(model: nn.Module, deployed: nn.Module, x: Tensor) -> float:
    """``max|train − deployed| / max|deployed|``, training structure in eval mode."""
    model.eval()
    with torch.no_grad():
        reference, out = model(x), deployed(x)
    assert reference.shape == out.shape
    assert torch.isfinite(out).all()
    return relative_error(reference, out)


def trained_case(name: str, recipe: str, conn: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = build(name, recipe, conn, dtype)
    if model is None:
        return None
    randomize_bn(model, seed)
    train_steps(model, name, dtype)
    return model


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("name, recipe, conn", _grid())
def test_deployed_equals_training_structure_fp64(name, recipe, conn):
    model = trained_case(name, recipe, conn, torch.float64)
    if model is None:
        return  # refused with a clear ValueError (checked in build)
    deployed = neusub.deploy(model)
    assert_plain(deployed, hasattr(model, "neusub_conversion"))
    assert n_params(deployed) == plain_param_count(name)
    err = eval_error(model, deployed, make_input(name, 4))
    assert err <= TOL64, f"{name} {recipe} {conn}: relative error {err:.2e}"
    # check_equivalence (the library's own measure) agrees
    assert neusub.check_equivalence(model, make_input(name, 2), deployed) <= TOL64


@pytest.mark.parametrize(
    "name, recipe, conn", [(name, *FP32_CASES[i % len(FP32_CASES)]) for i, name in enumerate(MODELS)]
)
def test_deployed_equals_training_structure_fp32(name, recipe, conn):
    model = trained_case(name, recipe, conn, torch.float32, seed=1)
    if model is None:
        return
    err = eval_error(model, neusub.deploy(model), make_input(name, 4, torch.float32))
    assert err <= TOL32, f"{name} {recipe} {conn}: relative error {err:.2e}"


def test_resnets_accept_every_recipe_and_connectivity():
    # The grid treats a ValueError as a legitimate refusal; ResNets must never refuse.
    for recipe in RECIPES:
        for conn in CONNECTIVITIES:
            assert build("resnet18", recipe, conn) is not None


# --------------------------------------------------------------------------- deploy conditions


@pytest.mark.parametrize("name", MODELS)
def test_deploy_exact_before_any_forward(name):
    # the shared untrained model (nsnet, ns, stochastic=1.0, random BatchNorms), in fp64
    model = copy.deepcopy(small_model(name)).double()
    deployed = neusub.deploy(model)  # stream counts are static: no forward needed
    x = torch.randn(3, *model.pretrained_cfg["input_size"], dtype=torch.float64)
    err = eval_error(model, deployed, x)
    assert err <= TOL64, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["resnet18", *_first("mobileone"), *TOKEN_MODELS])
def test_deploy_exact_after_forwards_with_other_batch_sizes(name):
    torch.manual_seed(3)
    model = build(name, "dbb", "ns")
    randomize_bn(model, 3)
    model.train()
    with torch.no_grad():
        for batch in (2, 5, 7):  # the official code would remember the last stream count
            model(make_input(name, batch))
    deployed = neusub.deploy(model)
    assert eval_error(model, deployed, make_input(name, 1)) <= TOL64
    assert eval_error(model, deployed, make_input(name, 6)) <= TOL64


def test_deploy_leaves_model_intact_and_is_repeatable():
    torch.manual_seed(4)
    model = build("resnet18", "nsnet", "ns")
    randomize_bn(model, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = neusub.deploy(model), neusub.deploy(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = make_input("resnet18", 2)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
        assert torch.equal(neusub.deploy(first)(x), first(x))  # deploying a deployed net is a no-op


@pytest.mark.parametrize("name", ["resnet18", "resnet50", *_first("mobilenet"), *TOKEN_MODELS])
def test_bf16(name):
    torch.manual_seed(5)
    model = build(name, "dbb", "ns-stoch", torch.float32)
    randomize_bn(model, 5)
    train_steps(model, name, torch.float32, steps=1)
    model = model.to(torch.bfloat16)
    deployed = neusub.deploy(model)
    assert next(deployed.parameters()).dtype == torch.bfloat16
    err = eval_error(model, deployed, make_input(name, 4, torch.bfloat16))
    assert err <= TOL_BF16, f"{name}: bf16 relative error {err:.2e}"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", *_first("mobilenet"), *_first("mobileone")])
def test_channels_last(name):
    torch.manual_seed(6)
    model = build(name, "nsnet", "ns", torch.float32)
    randomize_bn(model, 6)
    model = model.to(memory_format=torch.channels_last)
    train_steps(model, name, torch.float32, steps=1)
    deployed = neusub.deploy(model).to(memory_format=torch.channels_last)
    x = make_input(name, 3, torch.float32).to(memory_format=torch.channels_last)
    err = eval_error(model, deployed, x)
    assert err <= TOL32, f"{name}: channels_last relative error {err:.2e}"


# --------------------------------------------------------------------------- full-size counts


@pytest.mark.parametrize("name, recipe", [("resnet18", "dbb"), ("resnet50", "dbb")])
def test_full_size_resnet_deploys_to_torchvisions_parameter_count(name, recipe):
    with torch.device("meta"):  # counts only
        model = neusub.create_model(name, recipe=recipe, connectivity="ns")
    deployed = neusub.deploy(model)  # no forward
    assert_plain(deployed, True)
    expected = n_params(getattr(torchvision.models, name)())
    assert n_params(deployed) == expected == {"resnet18": 11_689_512, "resnet50": 25_557_032}[name]


# --------------------------------------------------------------------------- errors


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError) as info:
        neusub.create_model("resnet19")
    message = str(info.value)
    assert "resnet19" in message
    assert all(name in message for name in MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_unexpected_kwarg_is_a_value_error(name):
    with pytest.raises(ValueError, match="no_such_option"):
        neusub.create_model(name, no_such_option=1, **model_kwargs(name))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"recipe": "bogus"}, "bogus"),
        ({"connectivity": "bogus"}, "bogus"),
        ({"stochastic": 1.5}, "stochastic"),
        ({"neural_drop": -0.1}, "neural_drop"),
        ({"act": "bogus"}, "bogus"),
        ({"stem": "bogus"}, "bogus"),
        ({"connectivity": "naive"}, "naive"),  # 4^depth streams: refused, not run
    ],
)
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neusub.create_model("resnet18", width_mult=WIDTH, **kwargs)
