"""INT8 export (static post-training quantization through onnxruntime), ``neusub eval`` of ONNX
files, and the quantization-friendly ``qarepvgg`` recipe."""

from __future__ import annotations

import builtins
import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import cli_fails, tree_digest
from torch import nn

import neusub
from neusub import export
from neusub.cli import main
from neusub.layers import RepConv2d

pytest.importorskip("onnxruntime")

TINY = (  # a tiny digits run: its flags
    "--dataset digits --model resnet18 --width-mult 0.125 --stem cifar --recipe qarepvgg "
    "--connectivity ns --stochastic 1.0 --train-samples 512 --batch-size 64 --opt adamw --lr "
    "3e-3 --warmup-epochs 0 --epochs 3 --quiet"
).split()


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A trained qarepvgg NS run on digits with its float and INT8 ONNX files."""
    run = tmp_path_factory.mktemp("int8") / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "onnx", "--int8", "--calibration-samples", "256"]) == 0
    return run


def test_int8_export_writes_both_files_that_onnxruntime_loads(exported: Path):
    float_file, int8_file = exported / "last.onnx", exported / "last.int8.onnx"
    assert not export.OnnxModel(float_file).quantized
    assert export.OnnxModel(int8_file).quantized
    assert int8_file.stat().st_size < 0.5 * float_file.stat().st_size  # INT8 weights: ~1/4 of the bytes
    for file in (float_file, int8_file):  # the run's configuration travels with the file
        assert json.loads(export.OnnxModel(file).metadata["neusub.config"])["recipe"] == "qarepvgg"


def test_eval_of_float_onnx_equals_eval_of_the_checkpoint(exported: Path, capsys):
    from neusub.cli.commands import load_run_model
    from neusub.cli.data import load_dataset

    assert main(["eval", str(exported)]) == 0
    checkpoint = _json(capsys)
    assert main(["eval", str(exported / "last.onnx")]) == 0
    onnx_eval = _json(capsys)
    assert onnx_eval["model"] == "onnx" and onnx_eval["samples"] == checkpoint["samples"]
    assert onnx_eval["val_acc"] == checkpoint["val_acc"]
    assert onnx_eval["val_loss"] == pytest.approx(checkpoint["val_loss"], rel=1e-5)

    model, cfg, *_ = load_run_model(str(exported))
    _, val_set, _ = load_dataset("digits", None, {}, False, cfg.seed)
    x = torch.stack([val_set[i][0] for i in range(128)])
    with torch.no_grad():
        expected = model(x)
    got = export.OnnxModel(exported / "last.onnx")(x)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_int8_stays_close_to_fp32(exported: Path, capsys):
    from neusub.cli.commands import _calibration_batches, load_run_model

    model, cfg, *_ = load_run_model(str(exported))
    x = torch.cat(_calibration_batches(cfg, 256))  # the data the ranges were calibrated on
    with torch.no_grad():
        expected = neusub.deploy(model)(x)
    got = export.OnnxModel(exported / "last.int8.onnx")(x)
    # 8-bit steps are 1/255 of each calibrated range; ~20 quantized layers add their rounding
    # errors, so a few per cent of the logits' scale, far below what would change most decisions.
    assert float((got - expected).abs().mean() / expected.abs().mean()) <= 0.05
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.95

    assert main(["eval", str(exported)]) == 0
    fp32 = _json(capsys)
    assert main(["eval", str(exported / "last.int8.onnx")]) == 0
    int8 = _json(capsys)
    assert int8["model"] == "onnx-int8" and int8["samples"] == fp32["samples"]
    assert abs(int8["val_acc"] - fp32["val_acc"]) <= 0.05


def test_library_int8_from_a_module(tmp_path: Path):
    torch.manual_seed(0)
    model = neusub.create_model("resnet18", recipe="repvgg", width_mult=0.0625, num_classes=5, in_chans=1)
    calibration = torch.randn(32, 1, 16, 16)
    with torch.no_grad():
        model(calibration)  # BatchNorm statistics of these inputs
    model.eval()
    float_file = export.to_onnx(model, tmp_path / "m.onnx", (1, 1, 16, 16))
    int8_file = export.to_onnx_int8(float_file, tmp_path / "m.int8.onnx", calibration.split(8))
    with torch.no_grad():
        expected = neusub.deploy(model)(calibration)
    got = export.OnnxModel(int8_file)(calibration)
    # untrained, 4-channel layers: one channel's rounding weighs more than in the trained run above
    assert float((got - expected).abs().mean() / expected.abs().mean()) <= 0.1


def test_int8_bad_input(exported: Path, tmp_path: Path, capsys, monkeypatch):
    before = tree_digest(exported)
    export_int8 = ["export", exported, "--format", "onnx", "--int8"]
    out = ["--out", tmp_path / "x.onnx"]
    cli_fails(capsys, [*export_int8, "--calibration-samples", "0", *out], "needs at least 1 sample")
    assert not list(tmp_path.iterdir())
    cli_fails(capsys, ["export", exported, "--format", "torchscript", "--int8"], "--format onnx")
    cli_fails(capsys, export_int8, "already exists")  # the run's last.onnx and last.int8.onnx
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    cli_fails(capsys, ["eval", garbage], "not an ONNX model")
    with pytest.raises(ValueError, match="at least one calibration sample"):
        export.to_onnx_int8(exported / "last.onnx", tmp_path / "y.onnx", torch.empty(0, 1, 8, 8))
    foreign = export.to_onnx(nn.Linear(4, 2), tmp_path / "foreign.onnx", (1, 4))
    cli_fails(capsys, ["eval", foreign], "not written by neusub export")

    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    cli_fails(capsys, ["eval", exported / "last.onnx"], "pip install neusub[onnx]")
    cli_fails(capsys, [*export_int8, "--out", tmp_path / "z.onnx"], "pip install neusub[onnx]")
    assert not (tmp_path / "z.onnx").exists()
    assert tree_digest(exported) == before


# --------------------------------------------------------------------------- qarepvgg


def test_qarepvgg_structure():
    layer = RepConv2d(8, 8, 3, recipe="qarepvgg", connectivity="ns", in_streams=2)
    assert list(layer.branches) == ["kxk", "1x1", "identity"]
    assert layer.bn.num_features == 8  # only the k×k branch has a BatchNorm
    assert isinstance(layer.post_bn, nn.BatchNorm2d) and layer.post_bn.num_features == 8
    strided = RepConv2d(8, 16, 3, stride=2, recipe="qarepvgg")
    assert list(strided.branches) == ["kxk", "1x1"]  # no identity where the shape changes


@pytest.mark.parametrize("connectivity,stochastic", [("block", 0.0), ("ns", 0.0), ("ns", 1.0)])
def test_qarepvgg_network_is_exact_and_deploys_plain(connectivity: str, stochastic: float):
    torch.manual_seed(0)
    model = neusub.create_model(
        "resnet18",
        recipe="qarepvgg",
        connectivity=connectivity,
        stochastic=stochastic,
        width_mult=0.0625,
        num_classes=5,
        in_chans=1,
    ).double()
    x = torch.randn(4, 1, 12, 12, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).logsumexp(1).sum().backward()
        optimizer.step()
    model.eval()
    assert neusub.check_equivalence(model, x) <= 1e-12
    plain = neusub.deploy(model)
    assert not any(isinstance(m, RepConv2d) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())


def test_qarepvgg_convert_inherits_the_original_function():
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=7).double().eval()
    for module in original.modules():  # trained-looking BatchNorms
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    converted = neusub.convert(
        original, recipe="qarepvgg", connectivity="ns", stochastic=1.0, on_merge="ignore"
    )
    with torch.no_grad():
        expected = original(x)
        err = float((converted.eval()(x) - expected).norm() / expected.norm())
    assert err <= 1e-12  # the identity without BN is taken out of branch 0's kernel
    broken = copy.deepcopy(original)
    broken.layer1[0].bn1.weight.data[0] = 0.0
    with pytest.raises(ValueError, match="zero scales"):
        neusub.convert(broken, recipe="qarepvgg", on_merge="ignore")
