"""timm's model contract, checked on every model of neusub's registry: the tests are
parametrised from ``neusub.list_models()``, so a newly registered model is checked as it stands.

What timm's own models offer and timm's tools use: a ``pretrained_cfg`` / ``default_cfg`` in
the model and in timm's registry (input, interpolation, normalisation, the first conv and the
classifier, named as in the state dict, and no weights), ``num_classes``, ``num_features``,
``forward_features``, ``forward_head(pre_logits=)``, ``get_classifier``, ``reset_classifier``
(to another size, to none, without pooling), ``features_only=True`` with ``feature_info``,
``forward_intermediates``, ``set_grad_checkpointing``, FX tracing and feature extraction
(``torch.fx.symbolic_trace``, torchvision's and timm's ``create_feature_extractor``) with plain
tensor outputs equal to eager bit for bit, and ``timm.utils.reparameterize_model``.

Every model is built once by ``timm.create_model("neusub_<name>")`` at width 1/8 with the CIFAR
stem (``helpers.small_model``: 32² images; the adapters take ``(B, 512)`` features) and fed the
input its pretrained_cfg names.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import SMALL, rel_err, small_model
from timm.models import create_feature_extractor as timm_feature_extractor
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

import neusub
from neusub.fx import plain as fx_plain
from neusub.models import LayerFactory, StagedClassifier

MODELS = neusub.list_models()
# One model per code path (a converted timm ResNet; a StagedClassifier, whose features model is a
# FeatureNet: MobileNet-V1 and MobileOne; the adapters' TrunkAndHead): where a check runs the
# same code for the others, it runs on these alone.
REPRESENTATIVES = ("resnet18", "mobilenet_v1", "mlp_adapter")
TOL32 = 1e-5


def example(model: nn.Module, batch: int = 2) -> Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


def is_image(model: nn.Module) -> bool:
    return len(model.pretrained_cfg["input_size"]) == 3


def paths(cfg_value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (cfg_value,) if isinstance(cfg_value, str) else tuple(cfg_value)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg(name):
    model = small_model(name)
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg and cfg["architecture"] == f"neusub_{name}"
    assert not (cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("file")), (
        "neusub's models have no pretrained weights"
    )
    assert timm.list_models(f"neusub_{name}") == [f"neusub_{name}"]
    registered = timm.models.get_pretrained_cfg(f"neusub_{name}")
    assert registered.interpolation == cfg["interpolation"] and registered.mean == cfg["mean"]
    assert len(cfg["input_size"]) in (1, 3) and cfg["std"] and cfg["first_conv"]
    state = model.state_dict()
    for path in (*paths(cfg["first_conv"]), *paths(cfg["classifier"])):
        assert f"{path}.weight" in state, path
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.get_classifier().out_features == model.num_classes == 5
    if is_image(model):
        assert timm.data.resolve_data_config(model=model)["input_size"] == cfg["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(f"neusub_{name}", pretrained=True, **SMALL)


@pytest.mark.parametrize("name", MODELS)
def test_head_classifier_and_reparameterize_model(name):
    model = copy.deepcopy(small_model(name)).eval()  # its classifier is replaced below
    x = example(model)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model(x)
        assert type(features) is type(pre_logits) is type(logits) is Tensor
        if is_image(model):  # unpooled (B, C, h, w) at the cfg's pool size
            assert features.shape == (2, model.num_features, *model.pretrained_cfg["pool_size"])
        else:
            assert features.shape == (2, model.num_features)
        assert pre_logits.shape == (2, model.head_hidden_size) and logits.shape == (2, 5)
        assert rel_err(model.forward_head(features), logits) <= TOL32
        model.reset_classifier(0)  # no classifier: forward gives the pooled features
        assert model.num_classes == 0 and rel_err(model(x), pre_logits) <= TOL32
        if is_image(model):  # no pooling either: forward gives the feature map
            model.reset_classifier(0, "")
            assert rel_err(model(x), features) <= TOL32
        model.reset_classifier(3, "avg" if is_image(model) else None)
        assert model.get_classifier().out_features == model.num_classes == 3
        out = model(x)
        assert rel_err(neusub.deploy(model)(x), out) <= TOL32
        # timm's own deploy step: the network neusub.deploy gives (the model is not used after)
        assert rel_err(timm.utils.reparameterize_model(model, inplace=True)(x), out) <= TOL32


@pytest.mark.parametrize("name", MODELS)
def test_features_only_and_intermediates(name):
    classifier = small_model(name).eval()
    if not classifier.feature_info:  # no stages nor blocks: refused, naming why
        with pytest.raises(ValueError, match="no feature points"):
            small_model(name, features_only=True)
        return
    model = small_model(name, features_only=True).eval()
    info = model.feature_info
    x = example(model)
    with torch.no_grad():
        maps = model(x)
        deployed = neusub.deploy(model)(x) if name in REPRESENTATIVES else maps
    assert len(maps) == len(info.channels()) == len(deployed) >= 2
    for out, channels, reduction, plain in zip(maps, info.channels(), info.reduction(), deployed):
        assert type(out) is Tensor and rel_err(plain, out) <= TOL32
        if is_image(model):
            assert out.shape == (2, channels, 32 // reduction, 32 // reduction)
        else:
            assert out.shape == (2, channels)
    with torch.no_grad():
        final, intermediates = classifier.forward_intermediates(x)
        assert torch.equal(final, classifier.forward_features(x))
        assert all(type(t) is Tensor for t in intermediates)
        assert [t.shape[1] for t in intermediates] == [f["num_chs"] for f in classifier.feature_info]
        last_two = classifier.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:]))


@pytest.mark.parametrize("name", MODELS)
def test_fx_tracing_and_feature_extraction(name):
    model = small_model(name).eval()
    x = example(model)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)(x)
        assert type(traced) is Tensor and torch.equal(traced, out)
        points = [f["module"] for f in model.feature_info]
        nodes = {point: point for point in points}
        extracted = create_feature_extractor(model, return_nodes={**nodes, "fc": "logits"})(x)
        timm_extracted = timm_feature_extractor(model, return_nodes=nodes)(x)
        intermediates = model.forward_intermediates(x, intermediates_only=True) if points else []
    assert type(extracted["logits"]) is Tensor and torch.equal(extracted["logits"], out)
    for point, eager in zip(points, intermediates):
        assert type(extracted[point]) is type(timm_extracted[point]) is Tensor
        assert torch.equal(extracted[point], eager) and torch.equal(timm_extracted[point], eager)


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_changes_nothing(name):
    model = small_model(name).train()
    if name not in REPRESENTATIVES:  # the same code as its representative's: the switch alone
        model.set_grad_checkpointing(True)
        assert model.grad_checkpointing
        model.set_grad_checkpointing(False)
        return
    x = example(model)
    state = copy.deepcopy(model.state_dict())

    def step() -> tuple[Tensor, dict[str, Tensor]]:
        model.load_state_dict(state)
        model.zero_grad()
        torch.manual_seed(1)  # the stochastic partitions: checkpointing replays the same draws
        out = model(x)
        out.square().mean().backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    try:
        out, grads = step()
        model.set_grad_checkpointing(True)
        out_ckpt, grads_ckpt = step()
    finally:  # the shared model as it was: statistics, no grads, no checkpointing
        model.set_grad_checkpointing(False)
        model.load_state_dict(state)
        model.zero_grad()
    assert torch.equal(out, out_ckpt) and grads.keys() == grads_ckpt.keys() and grads
    assert all(rel_err(grads_ckpt[n], grads[n]) <= TOL32 for n in grads if grads[n].abs().max() > 0)


# --------------------------------------------------------------------------- registration


class _Plain(nn.Sequential):
    """A plain network without timm's model API."""

    def __init__(self, num_classes: int = 10, **unused):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, num_classes)
        )


def test_a_registered_model_without_timms_api_is_refused():
    neusub.register_model(
        "no_api_net", lambda f, **kw: f.convert(_Plain(**kw), "kxk", (1, 3, 8, 8)), "repvgg"
    )
    with pytest.raises(ValueError, match=r"no_api_net.*forward_features.*StagedClassifier"):
        neusub.create_model("no_api_net")


class _Tiny(StagedClassifier):
    def __init__(self, num_classes: int = 10, act: str = "relu", **unused):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()))
        self.feature_info = [{"num_chs": 8, "reduction": 1, "module": "stem"}]
        self.feature_info.append({"num_chs": 8, "reduction": 2, "module": "stages.0"})
        self.init_head(8, num_classes, "avg", 0.0)


def test_a_staged_classifier_registered_later_has_the_contract():
    def build(f: LayerFactory, **kwargs) -> nn.Module:
        return f.convert(_Tiny(act=f.act, **kwargs), "kxk", (1, 3, 8, 8))

    neusub.register_model("tiny_staged", build, "dbb", {"first_conv": "stem.0", "input_size": (3, 8, 8)})
    model = small_model("tiny_staged").eval()
    assert model.pretrained_cfg["first_conv"] != "stem.0"  # re-parameterized: named by its branches
    assert all(f"{p}.weight" in model.state_dict() for p in paths(model.pretrained_cfg["first_conv"]))
    x = example(model)
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))
        maps = small_model("tiny_staged", features_only=True)(x)
    assert [m.shape[1:] for m in maps] == [(8, 8, 8), (8, 4, 4)]


# --------------------------------------------------------------------------- FX around converted models


class _Wrapper(nn.Module):
    """A plain root holding a converted model: its graph must merge where the model's forward does."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.scale = body, nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.body(x)) * 2


def test_fx_merges_a_converted_submodule_where_its_forward_does():
    root = _Wrapper(small_model("resnet18")).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = torch.fx.symbolic_trace(root)
    assert any(node.target is fx_plain for node in graph.graph.nodes)
    with torch.no_grad():
        assert torch.equal(graph(x), root(x))


def test_fx_refuses_a_model_converted_without_guided_activations():
    model = neusub.create_model("resnet18", guided=False, **SMALL)
    with pytest.raises(ValueError, match="guided=False.*neusub.deploy"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match="guided=False"):
        torch.fx.symbolic_trace(_Wrapper(model))
