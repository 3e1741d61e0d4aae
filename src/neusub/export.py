"""Export the deployed network: a ``torchvision.models.ResNet``, or an ONNX file.

Both start from :func:`neusub.deploy`, so what is exported is the plain network that
computes the training structure's eval-mode function.

**BatchNorm in** :func:`to_torchvision`. torchvision's ResNet has bias-free convs,
each followed by a BatchNorm (``bn1``, ``bn2``, ``bn3``, ``downsample[1]``). The deployed
network has one conv *with* bias per position. Each pair is written as

- conv ``weight`` = the fused kernel, no conv bias;
- BN ``weight`` = 1, ``bias`` = the fused bias, ``running_mean`` = 0,
  ``running_var`` = ``1 - eps`` (computed in the parameter dtype), ``eps`` unchanged (1e-5).

In eval mode BN computes ``(x - 0) / sqrt((1 - eps) + eps) * 1 + bias``; in binary floating
point with round-to-nearest ``fl(fl(1 - eps) + eps) == 1`` exactly (the rounding error of
``1 - eps`` is at most half an ulp below 1, which rounds back to 1), so the BN is exactly
``x + bias`` in fp32 and fp64: the torchvision model equals the deployed network up to the
order in which conv and bias are added. ``eps`` keeps torchvision's default, so the state
dict also loads exactly into a freshly built ``torchvision.models.resnet18(num_classes=...)``
(for ``width_mult=1``). In bf16 ``1 - eps`` rounds to 1 and the BN scales by
``1/sqrt(1 + 1e-5)`` (a relative change of 5e-6, far below bf16 resolution).
In train mode these BNs normalise with batch statistics like any torchvision ResNet:
fine-tuning starts from the fused weights with fresh normalisation.

``width_mult`` is supported: the torchvision model is built with the standard
block/layers/groups and every conv, BN and the classifier are then replaced by modules of
the neusub model's widths (for ``width_mult=1`` they are the standard ones).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .deploy import deploy
from .models.resnet import RESNETS, BasicBlock, Bottleneck, ResNet

__all__ = ["SUPPORTED_TORCHVISION", "to_onnx", "to_torchvision"]

SUPPORTED_TORCHVISION = tuple(RESNETS)
_ONNX_HINT = "pip install neusub[onnx]"


# --------------------------------------------------------------------------- torchvision


def _unsupported(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"to_torchvision: {why} ({type(model).__name__}); supported: neusub ResNets "
        f"{', '.join(SUPPORTED_TORCHVISION)} built with act='relu'"
    )


def resnet_name(model: nn.Module) -> str:
    """Which of :data:`SUPPORTED_TORCHVISION` a neusub ResNet is (from its blocks and groups)."""
    if not isinstance(model, ResNet):
        raise _unsupported(model, "not a neusub ResNet")
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    block = type(stages[0][0])
    depths = [len(stage) for stage in stages]
    conv2 = stages[0][0].conv2
    groups = conv2.geom.groups if hasattr(conv2, "geom") else conv2.groups
    for name, (kind, layers, extra) in RESNETS.items():
        if kind is block and layers == depths and extra.get("groups", 1) == groups:
            return name
    raise _unsupported(model, f"unknown ResNet configuration {block.__name__} {depths} groups={groups}")


def _plain_conv(conv: nn.Module, where: str) -> nn.Conv2d:
    """A bias-free copy of a deployed conv (its bias goes to the BN that follows)."""
    if type(conv) is not nn.Conv2d:
        raise ValueError(
            f"to_torchvision: expected a deployed nn.Conv2d at {where}, got {type(conv).__name__}"
        )
    w = conv.weight
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=False, device=w.device, dtype=w.dtype,
    )  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(w)
    return out


def _bias_bn(conv: nn.Conv2d) -> nn.BatchNorm2d:
    """A BatchNorm that is exactly ``x + conv.bias`` in eval mode (see the module docstring)."""
    c, w = conv.out_channels, conv.weight
    bn = nn.BatchNorm2d(c, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bias = conv.bias if conv.bias is not None else torch.zeros(c, device=w.device, dtype=w.dtype)
        bn.bias.copy_(bias)
        bn.running_mean.zero_()
        bn.running_var.copy_(torch.ones(c, device=w.device, dtype=w.dtype) - bn.eps)
    return bn.eval()


def _check_relu(module: nn.Module, where: str) -> None:
    if type(module) is not nn.ReLU:
        raise ValueError(
            f"to_torchvision: torchvision ResNets use ReLU, but {where} is {type(module).__name__}; "
            "build the model with act='relu'"
        )


def _check_identity(module: nn.Module, where: str) -> None:
    if not isinstance(module, nn.Identity):
        raise ValueError(f"to_torchvision: expected an identity at {where} after deploy, got {module}")


def to_torchvision(model: nn.Module):
    """The neusub ResNet ``model`` (training structure or deployed) as a ``torchvision.models.ResNet``.

    Eval-mode outputs equal those of ``model`` in eval mode (same dtype and device). The cifar
    stem becomes ``conv1`` 3×3/1 with ``maxpool = nn.Identity()``. ``model`` is not modified.
    Raises ``ValueError`` for anything that is not a neusub ResNet with ReLU activations.
    """
    import torchvision

    name = resnet_name(model)
    plain = deploy(model)
    block_kind, layers, extra = RESNETS[name]
    tv_block = {
        BasicBlock: torchvision.models.resnet.BasicBlock,
        Bottleneck: torchvision.models.resnet.Bottleneck,
    }[block_kind]
    with torch.device("meta"):  # every module with parameters is replaced below
        tv = torchvision.models.ResNet(
            tv_block, layers, num_classes=plain.fc.out_features,
            groups=extra.get("groups", 1), width_per_group=extra.get("base_width", 64),
        )  # fmt: skip

    tv.conv1, tv.bn1 = _plain_conv(plain.conv1, "conv1"), _bias_bn(plain.conv1)
    _check_relu(plain.act1, "act1")
    if isinstance(plain.maxpool, nn.Identity):
        tv.maxpool = nn.Identity()
    else:
        pool = plain.maxpool
        tv.maxpool = nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding)
    convs = ("conv1", "conv2") if block_kind is BasicBlock else ("conv1", "conv2", "conv3")
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, (ours, theirs) in enumerate(zip(getattr(plain, stage), getattr(tv, stage))):
            where = f"{stage}.{i}"
            for j, conv_name in enumerate(convs, start=1):
                conv = getattr(ours, conv_name)
                setattr(theirs, conv_name, _plain_conv(conv, f"{where}.{conv_name}"))
                setattr(theirs, f"bn{j}", _bias_bn(conv))
            for act in ("act1", "act2", "act_out"):
                if hasattr(ours, act):
                    _check_relu(getattr(ours, act), f"{where}.{act}")
            _check_identity(ours.shortcut, f"{where}.shortcut")
            _check_identity(ours.drop_path, f"{where}.drop_path")
            if isinstance(ours.downsample, nn.Identity):
                theirs.downsample = None
            else:
                down = ours.downsample
                theirs.downsample = nn.Sequential(_plain_conv(down, f"{where}.downsample"), _bias_bn(down))
            theirs.stride = theirs.conv2.stride[0]
    fc = plain.fc
    tv.fc = nn.Linear(fc.in_features, fc.out_features, device=fc.weight.device, dtype=fc.weight.dtype)
    with torch.no_grad():
        tv.fc.weight.copy_(fc.weight)
        tv.fc.bias.copy_(fc.bias)
    tv.inplanes = fc.in_features
    left = [n for n, t in [*tv.named_parameters(), *tv.named_buffers()] if t.is_meta]
    if left:  # a torchvision layout this function does not know
        raise ValueError(f"to_torchvision: could not map {', '.join(left[:5])} from {name}")
    return tv.eval()


# --------------------------------------------------------------------------- ONNX


def _require_onnx(check: bool) -> None:
    missing = []
    for module in ("onnx", "onnxruntime") if check else ("onnx",):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"to_onnx needs {' and '.join(missing)}: {_ONNX_HINT}")


def _max_relative_error(actual, expected) -> float:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual, dtype=torch.float64)
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((actual - expected).abs().max() / scale)


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    opset: int = 17,
    *,
    dtype: torch.dtype = torch.float32,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
) -> Path:
    """Export the deployed form of ``model`` to ONNX at ``path``; returns the path.

    ``input_shape`` is the shape of one example input of the *deployed* network (the plain
    tensor, e.g. ``(1, 3, 224, 224)``); with ``dynamic_batch`` its first axis is dynamic.
    The network is exported in ``dtype`` on the CPU with the TorchScript-based exporter
    (``dynamo=False``: it needs neither ``onnxscript`` nor ``torch.export``). With ``check``,
    onnxruntime runs the file on a random input and the export fails with ``RuntimeError``
    unless its output matches the deployed network's within ``rtol`` (max relative error).

    The file is written to a temporary file beside ``path`` and renamed into place only when
    everything succeeded: on failure ``path`` is left as it was (absent, or the old file).
    Needs ``onnx`` (and ``onnxruntime`` for ``check``): ``pip install neusub[onnx]``.
    """
    _require_onnx(check)
    import onnx

    path = Path(path)
    plain = deploy(model).to(device="cpu", dtype=dtype)
    example = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(dtype)
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            torch.onnx.export(
                plain, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["output"], dynamic_axes=axes,
            )  # fmt: skip
        onnx.checker.check_model(str(tmp))
        if check:
            _check_onnxruntime(plain, tmp, example, rtol)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _check_onnxruntime(plain: nn.Module, file: Path, example: Tensor, rtol: float) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        expected = plain(example)
    err = _max_relative_error(got, expected)
    if not err <= rtol:
        raise RuntimeError(f"to_onnx: onnxruntime output differs from the deployed network (rel. {err:.2e})")
