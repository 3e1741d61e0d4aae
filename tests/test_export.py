"""Export: torchvision ResNets, ONNX files, timm registration and ``reparameterize_model``."""

from __future__ import annotations

import os
import sys

import pytest
import timm
import torch
import torchvision
from helpers import randomize_bn, small_model
from timm.utils.model import reparameterize_model
from torch import Tensor, nn

import neusub
from neusub.export import SUPPORTED_TORCHVISION, to_onnx, to_torchvision

TOL64, TOL32 = 1e-9, 1e-5
WIDTH = 0.25


def train_step(model: nn.Module, x: Tensor, num_classes: int) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, num_classes, (x.shape[0],)))
    loss.backward()
    opt.step()


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def trained_resnet(name: str, stem: str, dtype: torch.dtype, width: float = WIDTH, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"recipe": "dbb", "connectivity": "ns", "stochastic": 1.0, **kwargs}
    model = neusub.create_model(name, num_classes=10, stem=stem, width_mult=width, **kwargs).to(dtype)
    randomize_bn(model)
    train_step(model, torch.randn(3, 3, 32, 32, dtype=dtype), 10)
    return model.eval()


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["fp64", "fp32"])
def test_to_torchvision_round_trip(name, stem, dtype, tol):
    model = trained_resnet(name, stem, dtype)
    tv = to_torchvision(model)
    assert isinstance(tv, torchvision.models.ResNet)
    assert not tv.training
    expected_block = (
        torchvision.models.resnet.BasicBlock if name == "resnet18" else torchvision.models.resnet.Bottleneck
    )
    assert isinstance(tv.layer1[0], expected_block)
    assert tv.conv1.kernel_size == ((3, 3) if stem == "cifar" else (7, 7))
    assert isinstance(tv.maxpool, nn.Identity if stem == "cifar" else nn.MaxPool2d)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        out, reference, deployed = tv(x), model(x), neusub.deploy(model)(x)
    assert out.dtype == dtype
    assert relative_error(out, reference) <= tol
    # the BN-carried bias is exact: only the order of conv and bias additions differs
    assert relative_error(out, deployed) <= (1e-13 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_torchvision_bn_is_an_exact_bias(dtype):
    """The BN after each re-parameterized conv carries its fused bias as an exact identity."""
    model = trained_resnet("resnet18", "cifar", dtype)
    tv = to_torchvision(model)
    absorbed = [layer.norm_path for layer in model.neusub_conversion.layers]
    assert len(absorbed) == 2 * 8  # two per block; the stem and the shortcuts stay plain conv-BNs
    for path in absorbed:
        bn = tv.get_submodule(path)
        assert bn.eps == 1e-5  # torchvision's default: the state dict loads into a fresh model
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var + bn.eps, torch.ones_like(bn.running_var))
    for conv in (m for m in tv.modules() if isinstance(m, nn.Conv2d)):
        assert conv.bias is None


def test_to_torchvision_full_width_loads_into_torchvision_builder():
    model = trained_resnet("resnet18", "imagenet", torch.float32, width=1.0, recipe="repvgg")
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(to_torchvision(model).state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(fresh(x), model(x)) <= TOL32


@pytest.mark.parametrize("name", SUPPORTED_TORCHVISION)
def test_to_torchvision_every_supported_resnet(name):
    model = trained_resnet(name, "cifar", torch.float64, width=0.125)
    tv = to_torchvision(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(tv(x), model(x)) <= TOL64


def test_to_torchvision_leaves_the_model_untouched():
    model = trained_resnet("resnet18", "cifar", torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    to_torchvision(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, neusub.RepConv2d) for m in model.modules())  # still the training structure
    # an already deployed model (neusub.deploy or timm's reparameterize_model) converts the same
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = to_torchvision(model)(x)
        assert torch.equal(to_torchvision(neusub.deploy(model))(x), expected)
        assert torch.equal(to_torchvision(reparameterize_model(model))(x), expected)


@pytest.mark.parametrize("name", [n for n in neusub.list_models() if n not in SUPPORTED_TORCHVISION])
def test_to_torchvision_refuses_other_models(name):
    with pytest.raises(ValueError, match="resnet18.*resnet50"):
        to_torchvision(small_model(name))


def test_to_torchvision_refuses_non_relu_and_foreign_models():
    model = neusub.create_model("resnet18", num_classes=10, width_mult=0.125, act="silu")
    with pytest.raises(ValueError, match="ReLU"):
        to_torchvision(model)
    with pytest.raises(ValueError, match="resnet18"):
        to_torchvision(torchvision.models.resnet18())


# --------------------------------------------------------------------------- ONNX


def _onnx_models() -> list:
    """One model of each family (cost: an export takes about a second)."""
    families, picked = set(), []
    for name in sorted(neusub.list_models(), key=lambda n: (len(n), n)):
        family = name.rstrip("0123456789").split("_")[0].rstrip("0123456789")
        if family not in families:
            families.add(family)
            picked.append(name)
    return picked


def _small_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name.endswith("_adapter"):
        model = neusub.create_model(name, num_classes=10, width_mult=0.125, in_features=8)
        shape = (2, 5, 8)
    else:
        model = neusub.create_model(name, num_classes=10, width_mult=0.125, stem="cifar")
        shape = (2, 3, 32, 32)
    randomize_bn(model)
    return model.eval(), shape


@pytest.mark.parametrize("name", _onnx_models())
def test_to_onnx_matches_onnxruntime(name, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, shape = _small_model(name)
    path = to_onnx(model, tmp_path / "model.onnx", shape)
    assert path == tmp_path / "model.onnx" and path.is_file()
    assert os.listdir(tmp_path) == ["model.onnx"]  # no temporary file left behind
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, *shape[1:])  # another batch size: the batch axis is dynamic
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert relative_error(got, model(x)) <= TOL32


def test_to_onnx_failure_leaves_no_file(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, _ = _small_model("resnet18")
    target = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError):
        to_onnx(model, target, (1, 5, 32, 32))  # 5 channels into a 3-channel stem
    assert os.listdir(tmp_path) == []
    # an existing file survives a failed export unchanged
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        to_onnx(model, target, (1, 5, 32, 32))
    assert os.listdir(tmp_path) == ["model.onnx"] and target.read_bytes() == b"previous"


def test_to_onnx_half_written_file_is_removed(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")

    def broken_export(module, args, f, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"\x08\x07partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    model, shape = _small_model("resnet18")
    with pytest.raises(OSError, match="disk full"):
        to_onnx(model, tmp_path / "model.onnx", shape)
    assert os.listdir(tmp_path) == []


def test_to_onnx_without_onnx_asks_for_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    model, shape = _small_model("resnet18")
    with pytest.raises(ImportError, match=r"pip install neusub\[onnx\]"):
        to_onnx(model, tmp_path / "model.onnx", shape)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- timm


def test_timm_create_and_reparameterize_model():
    model = timm.create_model("neusub_resnet18", recipe="dbb", connectivity="ns", num_classes=10)
    assert model.fc.out_features == 10 and model.layer1[0].conv1.connectivity == "ns"
    randomize_bn(model)
    model.eval()
    timm_plain = reparameterize_model(model).eval()
    ours = neusub.deploy(model)
    assert not any(isinstance(m, neusub.RepConv2d) for m in [*timm_plain.modules(), *ours.modules()])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = timm_plain(x)
        assert relative_error(out, ours(x)) <= TOL32
        assert relative_error(out, model(x)) <= TOL32
        # and deploy after timm's in-place fuse still gives the original layout
        assert relative_error(neusub.deploy(timm_plain)(x), out) <= TOL32


@pytest.mark.parametrize("name, channels", [("resnet18", [16, 64]), ("mobilenet_v1", [32, 128])])
def test_timm_features_only_with_out_indices(name, channels):
    # (the rest of timm's contract, on every model: test_timm_contract.py)
    features = timm.create_model(f"neusub_{name}", features_only=True, out_indices=(2, 4), width_mult=0.125)
    x = torch.randn(1, 3, 64, 64)
    deployed = neusub.deploy(features.eval())
    with torch.no_grad():
        maps = features(x)
        assert [m.shape[1] for m in maps] == features.feature_info.channels() == channels
        assert all(relative_error(a, b) <= TOL32 for a, b in zip(maps, deployed(x)))
