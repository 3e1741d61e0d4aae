"""``neusub.convert`` on torchvision, timm and user models: inherit, train, deploy back, exactly.

Every architecture (reduced widths where the constructor allows; fp64): the converted network
in eval mode equals the original before training (``init="inherit"``); after two training
steps with stochastic substitution, ``neusub.deploy`` gives the original class, whose state
dict loads into a fresh instance, with the original parameter count, and whose output equals
the converted network's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize_bn, rel_err
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.densenet import DenseNet
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.vgg import VGG, make_layers

import neusub
from neusub.bundle import Bundle

DTYPE = torch.float64


def _tv_efficientnet_b0() -> nn.Module:
    settings, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return EfficientNet(settings, 0.2, last_channel=last, num_classes=10, stochastic_depth_prob=0.2)


def _tv_vgg11_bn() -> nn.Module:  # VGG-11's layer pattern at 1/16 width, with VGG's classifier shape
    model = VGG(make_layers([4, "M", 8, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"], batch_norm=True))
    model.classifier = nn.Sequential(
        nn.Linear(32 * 49, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 10),
    )
    return model


tv = torchvision.models
MODELS = {
    "tv_resnet18": lambda: tv.resnet18(num_classes=10),
    "tv_resnet50": lambda: tv.resnet50(num_classes=10, width_per_group=16),
    "tv_resnext50_32x4d": lambda: tv.resnext50_32x4d(num_classes=10),
    "tv_mobilenet_v2": lambda: tv.mobilenet_v2(num_classes=10, width_mult=0.25),
    "tv_mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10, width_mult=0.25),
    "tv_efficientnet_b0": _tv_efficientnet_b0,
    "tv_regnet_y_400mf": lambda: RegNet(
        BlockParams.from_init_params(4, 16, 8.0, 2.0, 8, se_ratio=0.25), num_classes=10
    ),
    "tv_densenet121": lambda: DenseNet(8, (2, 2, 2, 2), 16, num_classes=10),
    "tv_vgg11_bn": _tv_vgg11_bn,
    "tv_convnext_tiny": lambda: ConvNeXt(
        [
            CNBlockConfig(16, 32, 1),
            CNBlockConfig(32, 64, 1),
            CNBlockConfig(64, 128, 1),
            CNBlockConfig(128, None, 1),
        ],
        stochastic_depth_prob=0.1,
        num_classes=10,
    ),
    "tv_squeezenet1_1": lambda: tv.squeezenet1_1(num_classes=10),
    "timm_resnet18": lambda: timm.create_model(
        "resnet18", channels=(8, 16, 32, 64), stem_width=8, num_classes=10
    ),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10, drop_path_rate=0.1),
    "timm_mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100", num_classes=10),
    "timm_convnext_atto": lambda: timm.create_model(
        "convnext_atto", dims=(8, 16, 32, 64), num_classes=10, drop_path_rate=0.1
    ),
    "timm_regnety_002": lambda: timm.create_model("regnety_002", num_classes=10),
    "timm_mobilenetv1_100": lambda: timm.create_model("mobilenetv1_100", num_classes=10),
}
SIZE = {"tv_vgg11_bn": 64, "tv_squeezenet1_1": 64, "tv_resnet18": 16, "tv_resnext50_32x4d": 16}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().to(DTYPE)
    randomize_bn(model)
    return model.eval()


def converted_and_trained(
    model: nn.Module, size: int, recipe: str = "dbb", steps: int = 2, **kwargs
) -> nn.Module:
    """Converted, trained ``steps`` SGD steps (fp32, stochastic substitution), returned in fp64 eval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = neusub.convert(
            model.float(), recipe=recipe, stochastic=1.0, example_input=(1, 3, size, size), **kwargs
        )
    model.to(DTYPE)
    converted.train()
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(3, 3, size, size, generator=gen)
        loss = F.cross_entropy(converted(x), torch.arange(3) % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return converted.to(DTYPE).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_inherit_train_deploy_back(name: str):
    original = build(name)
    size = SIZE.get(name, 32)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = neusub.convert(original, recipe="dbb", example_input=(1, 3, size, size))
    assert type(converted) is type(original) and converted is not original
    assert len(converted.neusub_conversion.layers) > 0
    with torch.no_grad():
        out = converted.eval()(x)
        assert type(out) is torch.Tensor  # plain tensors out: the streams live inside
        assert rel_err(out, original(x)) <= 1e-9  # init="inherit": the original function exactly

    trained = converted_and_trained(original, size)
    deployed = neusub.deploy(trained)
    assert type(deployed) is type(original) and not hasattr(deployed, "neusub_conversion")
    fresh = build(name)
    fresh.load_state_dict(deployed.state_dict())  # strict: the original module layout
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in original.parameters())
    with torch.no_grad():
        for batch in (1, 4):
            xb = torch.randn(
                batch, 3, size, size, generator=torch.Generator().manual_seed(batch), dtype=DTYPE
            )
            out = trained(xb)
            assert rel_err(out, deployed(xb)) <= 1e-9 and rel_err(out, fresh(xb)) <= 1e-9
    assert not any(isinstance(m, (neusub.RepConv2d, neusub.RepLinear)) for m in deployed.modules())


@pytest.mark.parametrize("recipe", ["nsnet", "repvgg", "acnet", "conv3", "mobileone"])
def test_every_recipe_through_convert(recipe: str):
    original = build("timm_resnet18")
    trained = converted_and_trained(original, 16, recipe=recipe, steps=1)
    x = torch.randn(2, 3, 16, 16, dtype=DTYPE)
    with torch.no_grad():
        assert rel_err(trained(x), neusub.deploy(trained)(x)) <= 1e-9


def test_fp32_and_deploy_before_any_forward():
    torch.manual_seed(0)
    original = tv.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    randomize_bn(original)
    x = torch.randn(2, 3, 32, 32)
    converted = neusub.convert(original, recipe="nsnet", example_input=(1, 3, 32, 32))
    with torch.no_grad():  # deploy straight after convert: static stream counts
        assert rel_err(neusub.deploy(converted)(x), original(x)) <= 1e-5
    trained = converted_and_trained(original.to(DTYPE), 32, recipe="nsnet").float()
    with torch.no_grad():
        assert rel_err(trained(x), neusub.deploy(trained)(x)) <= 1e-5


class UserNet(nn.Module):
    """A user's network calling functionals: F.relu, torch.cat, x + y, x.mean((2, 3))."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.a(x))
        z = F.relu(self.bn(self.b(y)))
        w = self.c(torch.cat([y, z], 1)) + y
        w = F.max_pool2d(w, 2) * 0.5 - 1.0
        return self.head(w.mean((2, 3)))


def test_user_module_with_functionals():
    torch.manual_seed(0)
    original = UserNet().to(DTYPE).eval()
    randomize_bn(original)
    x = torch.randn(3, 3, 8, 8, dtype=DTYPE)
    converted = neusub.convert(original, recipe="dbb", example_input=(1, 3, 8, 8), on_merge="error")
    layers = {layer.path: layer for layer in converted.neusub_conversion.layers}
    assert set(layers) == {"a", "b"} and layers["b"].norm_path == "bn" and layers["b"].in_streams == 4
    with torch.no_grad():
        assert rel_err(converted.eval()(x), original(x)) <= 1e-9
    trained = converted_and_trained(original, 8)
    deployed = neusub.deploy(trained)
    with torch.no_grad():
        assert rel_err(trained(x), deployed(x)) <= 1e-9
    UserNet().load_state_dict(deployed.state_dict())


def test_layer_policies_and_linears():
    model = UserNet().eval()
    all_convs, _ = neusub.convert(model, layers="all").neusub_conversion.layers, None
    assert [layer.path for layer in all_convs] == ["a", "b", "c"]
    picked = neusub.convert(model, layers=["b"], recipe="repvgg").neusub_conversion.layers
    assert [(layer.path, layer.recipe) for layer in picked] == [("b", "repvgg")]
    by_dict = neusub.convert(model, layers={"a": "acnet", "c": "conv2"}).neusub_conversion.layers
    assert [(layer.path, layer.recipe) for layer in by_dict] == [("a", "acnet"), ("c", "conv2")]
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)).to(DTYPE)
    converted = neusub.convert(mlp, layers="linear", recipe="dbb", example_input=(2, 6))
    assert all(isinstance(converted[i], neusub.RepLinear) for i in (0, 2, 4))
    assert [layer.in_streams for layer in converted.neusub_conversion.layers] == [1, 4, 4]
    x = torch.randn(5, 6, dtype=DTYPE)
    with torch.no_grad():
        assert rel_err(converted.eval()(x), mlp(x)) <= 1e-9
    trained = converted.train()
    trained(x).sum().backward()
    with torch.no_grad():
        assert rel_err(trained.eval()(x), neusub.deploy(trained)(x)) <= 1e-9


def test_paper_policy_reproduces_the_official_parameter_counts():
    """The official NS ResNets (cifar stem, 100 classes): nsnet for every 3×3 conv but the stem,
    four 1×1 branches (conv4) for every 1×1 conv and shortcut. Built on the meta device."""
    counts = {
        "resnet18": 85_748_132,
        "resnet34": 164_383_652,
        "resnet50": 137_001_892,
        "resnext50_32x4d": 97_526_692,
    }
    for name, expected in counts.items():
        with torch.device("meta"):
            model = getattr(tv, name)(num_classes=100)
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        converted = neusub.convert(model, layers="paper", example_input=(1, 3, 32, 32))
        assert sum(p.numel() for p in converted.parameters()) == expected, name
        with torch.device("meta"):  # create_model's backbones take the same policy
            ours = neusub.create_model(name, layers="paper", stem="cifar", num_classes=100)
        assert sum(p.numel() for p in ours.parameters()) == expected, name


def test_timm_model_contract():
    original = timm.create_model("resnet18", channels=(8, 16, 32, 64), stem_width=8, num_classes=10).eval()
    converted = neusub.convert(original, recipe="dbb", example_input=(1, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert (
        converted.pretrained_cfg == original.pretrained_cfg and converted.default_cfg == original.default_cfg
    )
    assert timm.data.resolve_data_config(model=converted)["input_size"] == (3, 224, 224)
    assert (converted.num_classes, converted.num_features) == (10, 64)
    with torch.no_grad():
        features = converted.forward_features(x)
        assert type(features) is torch.Tensor and features.shape == (2, 64, 1, 1)
        assert converted.forward_head(features, pre_logits=True).shape == (2, 64)
        assert torch.allclose(converted.forward_head(features), converted(x), atol=1e-6)
    assert converted.get_classifier() is converted.fc
    converted.reset_classifier(5)
    reference = neusub.deploy(converted)
    with torch.no_grad():
        out = converted(x)
        assert out.shape == (2, 5) and rel_err(out, reference(x)) <= 1e-5
        traced = torch.fx.symbolic_trace(converted)  # FX-traceable: re-parameterized layers are leaves
        assert rel_err(traced(x), out) <= 1e-6
        reparameterized = timm.utils.reparameterize_model(copy.deepcopy(converted))
        assert rel_err(reparameterized(x), reference(x)) <= 1e-5
    features_model = timm.create_model("resnet18", channels=(8, 16, 32, 64), stem_width=8, features_only=True)
    converted_features = neusub.convert(features_model.eval(), recipe="dbb", example_input=(1, 3, 32, 32))
    deployed_features = neusub.deploy(converted_features)
    with torch.no_grad():
        maps = converted_features(x)
        assert [m.shape[1] for m in maps] == converted_features.feature_info.channels()
        assert all(
            type(m) is torch.Tensor and rel_err(m, d) <= 1e-5 for m, d in zip(maps, deployed_features(x))
        )


# ---------------------------------------------------------------------- reports and refusals


def test_merges_are_reported_where_they_cost_streams():
    model = tv.mobilenet_v3_small(num_classes=10, width_mult=0.25).eval()
    converted = neusub.convert(model, example_input=(1, 3, 32, 32))
    report = str(converted.neusub_conversion)
    assert "scale_activation: hardsigmoid" in report  # SE gates are computed from the stream sum
    assert converted.neusub_conversion.starved == []  # and no layer loses its streams to them
    assert all(not op.startswith("aten") for _, op, _ in converted.neusub_conversion.merges)  # `scale * x`

    class Squash(nn.Module):  # a tanh between two re-parameterized convs merges the streams
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    with pytest.warns(
        UserWarning, match=r"1 re-parameterized layer\(s\) after the first get one stream \(b\)"
    ):
        squash = neusub.convert(Squash(), example_input=(1, 3, 8, 8))
    assert squash.neusub_conversion.merges[0][:2] == ("<root>", "tanh")
    with pytest.raises(ValueError, match=r"streams merge at <root> \(tanh: .*on_merge='warn'"):
        neusub.convert(Squash(), example_input=(1, 3, 8, 8), on_merge="error")


def test_refusals_name_the_problem_and_the_way_out():
    model = UserNet()
    even = nn.Sequential(nn.Conv2d(3, 4, 4, padding=1))
    with pytest.raises(ValueError, match=r"layers= selects 0 .*kernel_size=\(4, 4\) is even.*leave it out"):
        neusub.convert(even, layers=["0"], example_input=(1, 3, 8, 8))
    # default: skipped, with the reason; here nothing is left to re-parameterize, which is an error
    with pytest.raises(ValueError, match=r"selects no layer of Sequential.*kernel_size=\(4, 4\) is even"):
        neusub.convert(even, example_input=(1, 3, 8, 8))
    two = nn.Sequential(nn.Conv2d(3, 4, 4, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    skipped = neusub.convert(two, example_input=(1, 3, 8, 8)).neusub_conversion.skipped
    assert skipped[0][0] == "0" and "is even" in skipped[0][1]
    with pytest.raises(ValueError, match=r"unknown layers='convs'"):
        neusub.convert(model, layers="convs")
    with pytest.raises(ValueError, match=r"unknown connectivity 'dense'"):
        neusub.convert(model, connectivity="dense")
    with pytest.raises(ValueError, match=r"probing forward failed at a .*example_input="):
        neusub.convert(model, example_input=(1, 5, 8, 8))  # 5 channels into a 3-channel conv
    converted = neusub.convert(model, example_input=(1, 3, 8, 8))
    with pytest.raises(ValueError, match="already converted; deploy it first"):
        neusub.convert(converted)
    with pytest.raises(ValueError, match=r"init='warm' is invalid"):
        neusub.convert(model, init="warm")


def test_bundles_behave_as_their_sum():
    streams = torch.randn(3, 2, 4, 5, 5, dtype=DTYPE)
    bundle = Bundle(streams)
    total = streams.sum(0)
    assert bundle.shape == total.shape and bundle.dim() == 4 and len(bundle) == 2
    assert torch.equal(torch.tanh(bundle), torch.tanh(total))  # no rule: fed the sum
    for op in (
        lambda t: t.flatten(1),
        lambda t: t.permute(0, 2, 3, 1),
        lambda t: t[:, 1:3],
        lambda t: t * 2 + 1,
        lambda t: F.avg_pool2d(t, 2),
        lambda t: t.mean((2, 3)),
        lambda t: torch.cat([t, t], 1),
        lambda t: F.relu(t),
        lambda t: F.gelu(t),
        lambda t: F.silu(t),
        lambda t: F.hardswish(t),
        lambda t: F.relu6(t),
        lambda t: F.leaky_relu(t, 0.2),
        lambda t: F.mish(t),
        lambda t: F.max_pool2d(t, 3, 2, 1),
        lambda t: F.layer_norm(t, (5,)),
        lambda t: F.group_norm(t, 2),
        lambda t: t.view(2, 4, 25).transpose(1, 2),
        lambda t: F.interpolate(t, scale_factor=2.0),
        lambda t: t.sum(1, keepdim=True) - t,
    ):
        out = op(bundle)
        expected = op(total)
        assert rel_err(out.streams.sum(0) if isinstance(out, Bundle) else out, expected) <= 1e-12


def test_a_bundles_autograd_metadata_is_its_streams():
    """``requires_grad`` / ``grad_fn`` / ``is_leaf`` of a bundle are its streams': tools that hook
    autograd through module outputs (FlopCounterMode's module tracker) see the real graph."""
    from torch.utils.flop_counter import FlopCounterMode

    streams = torch.randn(3, 2, 4, requires_grad=True) * 2
    bundle = Bundle(streams)
    assert bundle.requires_grad and bundle.grad_fn is streams.grad_fn and not bundle.is_leaf
    model = neusub.create_model("resnet18", recipe="conv2", num_classes=10, stem="cifar", width_mult=0.125)
    with FlopCounterMode(display=False) as forward:
        loss = model(torch.randn(2, 3, 8, 8)).sum()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    assert backward.get_total_flops() > forward.get_total_flops() > 0
