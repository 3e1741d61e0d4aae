"""Export the deployed network: a ``torchvision.models.ResNet``, or an ONNX file.

Both start from :func:`neusub.deploy`, so what is exported is the plain network that
computes the training structure's eval-mode function.

**torchvision.** neusub's ResNets are timm's, converted; deployed, they are timm ResNets
with the fused kernels in their convs and each fused bias in the BatchNorm after the conv,
kept as an exact identity that adds it (weight 1, running mean 0, running var ``1 − eps``:
in binary floating point ``fl(fl(1 − eps) + eps) == 1``, so the BN is exactly ``x + bias``
in fp32 and fp64). timm's ResNet and torchvision's share their module names, so
:func:`to_torchvision` moves every conv, BatchNorm and the classifier into a
``torchvision.models.ResNet`` of the same block, depths and groups, whose state dict then
loads into torchvision's own builder (for ``width_mult=1``; other widths keep their
channels). In train mode those BNs normalise with batch statistics like any torchvision
ResNet: fine-tuning starts from the fused weights with fresh normalisation.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from .deploy import deploy, non_finite
from .files import first_line, read_regular_file, written_atomically
from .models.resnet import RESNETS
from .onnx_files import check_bounded, non_finite_tensors

__all__ = ["SUPPORTED_TORCHVISION", "OnnxModel", "to_onnx", "to_onnx_int8", "to_torchvision"]

SUPPORTED_TORCHVISION = tuple(RESNETS)
_ONNX_HINT = "pip install neusub[onnx]"


# --------------------------------------------------------------------------- torchvision


def _unsupported(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"to_torchvision: {why} ({type(model).__name__}); supported: neusub ResNets "
        f"{', '.join(SUPPORTED_TORCHVISION)} built with act='relu'"
    )


def resnet_name(model: nn.Module) -> str:
    """Which of :data:`SUPPORTED_TORCHVISION` a (deployed) neusub ResNet is."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    if not isinstance(model, ResNet):
        raise _unsupported(model, "not a neusub ResNet")
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    depths = [len(stage) for stage in stages]
    first = stages[0][0]
    groups = first.conv1.groups if isinstance(first, BasicBlock) else first.conv2.groups
    known = {
        ("BasicBlock", (2, 2, 2, 2), 1): "resnet18",
        ("BasicBlock", (3, 4, 6, 3), 1): "resnet34",
        ("Bottleneck", (3, 4, 6, 3), 1): "resnet50",
        ("Bottleneck", (3, 4, 23, 3), 1): "resnet101",
        ("Bottleneck", (3, 4, 6, 3), 32): "resnext50_32x4d",
    }
    kinds = {BasicBlock: "BasicBlock", Bottleneck: "Bottleneck"}
    kind = next((label for cls, label in kinds.items() if isinstance(first, cls)), "?")
    name = known.get((kind, tuple(depths), groups))
    if name is None:
        raise _unsupported(model, f"unknown ResNet configuration {kind} {depths} groups={groups}")
    return name


def _check_plain_block(block: nn.Module, where: str) -> None:
    for attr in ("act1", "act2", "act3"):
        act = getattr(block, attr, None)
        if act is not None and type(act) is not nn.ReLU:
            raise ValueError(
                f"to_torchvision: torchvision ResNets use ReLU, but {where}.{attr} is "
                f"{type(act).__name__}; build the model with act='relu'"
            )
    for attr in ("se", "aa", "drop_block"):
        extra = getattr(block, attr, None)
        if extra is not None and not isinstance(extra, nn.Identity):
            raise ValueError(
                f"to_torchvision: {where}.{attr} is {type(extra).__name__}; torchvision has none"
            )


def to_torchvision(model: nn.Module):
    """The neusub ResNet ``model`` (training structure or deployed) as a ``torchvision.models.ResNet``.

    Eval-mode outputs equal those of ``model`` in eval mode (same dtype and device). The cifar
    stem becomes ``conv1`` 3×3/1 with ``maxpool = nn.Identity()``. ``model`` is not modified.
    Raises ``ValueError`` for anything that is not a neusub ResNet with ReLU activations.
    """
    import torchvision

    plain = deploy(model)
    name = resnet_name(plain)
    if type(plain.act1) is not nn.ReLU:
        raise ValueError("to_torchvision: torchvision ResNets use ReLU; build the model with act='relu'")
    with torch.device("meta"):  # every module with parameters is replaced below
        tv = getattr(torchvision.models, name)(num_classes=plain.fc.out_features)
    # what is left of these was not mapped (``is_meta`` would not tell: ``model`` may be on the
    # meta device too); the list keeps them alive, so that no new tensor reuses their ids
    placeholders = [*tv.parameters(), *tv.buffers()]
    unmapped = {id(t) for t in placeholders}
    for attr in ("conv1", "bn1", "maxpool", "fc"):
        setattr(tv, attr, copy.deepcopy(getattr(plain, attr)))
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, (ours, theirs) in enumerate(zip(getattr(plain, stage), getattr(tv, stage))):
            _check_plain_block(ours, f"{stage}.{i}")
            for attr in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
                if hasattr(theirs, attr):
                    setattr(theirs, attr, copy.deepcopy(getattr(ours, attr)))
            # other widths than torchvision's may add a shortcut projection (timm's stem keeps 64)
            theirs.downsample = copy.deepcopy(ours.downsample)
    left = [n for n, t in [*tv.named_parameters(), *tv.named_buffers()] if id(t) in unmapped]
    if left:  # a layout this function does not know
        raise ValueError(f"to_torchvision: could not map {', '.join(left[:5])} from {name}")
    return tv.eval()


# --------------------------------------------------------------------------- ONNX


def _require_onnx(check: bool, what: str = "to_onnx") -> None:
    missing = []
    for module in ("onnx", "onnxruntime") if check else ("onnx",):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"{what} needs {' and '.join(missing)}: {_ONNX_HINT}")


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
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Export the deployed form of ``model`` to ONNX at ``path``; returns the path.

    ``input_shape`` is the shape of one example input of the *deployed* network (the plain
    tensor, e.g. ``(1, 3, 224, 224)``); with ``dynamic_batch`` its first axis is dynamic.
    The network is exported in ``dtype`` on the CPU with the TorchScript-based exporter
    (``dynamo=False``: it needs neither ``onnxscript`` nor ``torch.export``). With ``check``,
    onnxruntime runs the file on a random input and the export fails with ``RuntimeError``
    unless its output matches the deployed network's within ``rtol`` (max relative error).
    ``metadata`` is stored in the file's ``metadata_props`` (neusub's CLI keeps the run's
    configuration there, so ``neusub eval`` can evaluate the file).

    The file is written to a temporary file beside ``path`` and renamed into place only when
    everything succeeded: on failure ``path`` is left as it was (absent, or the old file). With
    ``overwrite=False`` an existing ``path`` is left alone (``FileExistsError``). A model with
    NaN or inf weights is refused (``ValueError``): its outputs could not be checked.
    Needs ``onnx`` (and ``onnxruntime`` for ``check``): ``pip install neusub[onnx]``.
    """
    _require_onnx(check)
    import onnx

    path = Path(path)
    plain = deploy(model).to(device="cpu", dtype=dtype)
    bad = non_finite(plain.state_dict())
    if bad:
        raise ValueError(
            f"to_onnx: the model holds NaN or inf (in {bad[0]}); export a model with finite weights"
        )
    example = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(dtype)
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with written_atomically(path, overwrite) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
            torch.onnx.export(
                plain,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes=axes,
            )
        if metadata:
            _set_metadata(tmp, metadata)
        onnx.checker.check_model(str(tmp))
        if check:
            _check_onnxruntime(plain, tmp, example, rtol)
    return path


def _set_metadata(file: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(file))
    onnx.helper.set_model_props(proto, {**read_metadata(proto), **metadata})
    onnx.save(proto, str(file))


def read_metadata(model) -> dict[str, str]:
    """``metadata_props`` of an ONNX model (a ``ModelProto``) as a dict."""
    return {prop.key: prop.value for prop in model.metadata_props}


def _check_onnxruntime(plain: nn.Module, file: Path, example: Tensor, rtol: float) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        expected = plain(example)
    err = _max_relative_error(got, expected)
    if not err <= rtol:
        raise RuntimeError(f"to_onnx: onnxruntime output differs from the deployed network (rel. {err:.2e})")


# --------------------------------------------------------------------------- INT8


def to_onnx_int8(
    float_onnx: str | os.PathLike,
    path: str | os.PathLike,
    calibration: Tensor | Iterable[Tensor],
    *,
    per_channel: bool = True,
    method: str = "minmax",
    overwrite: bool = True,
) -> Path:
    """Static post-training INT8 quantization of a float ONNX file (from :func:`to_onnx`).

    onnxruntime's quantizer in QDQ format: signed INT8 weights (per output channel with
    ``per_channel``) and activations, their ranges calibrated (``method``: ``"minmax"``,
    ``"entropy"`` or ``"percentile"``) on ``calibration`` — a tensor ``(N, *input)`` or batches
    of them, best drawn from the training data. The float file's metadata is kept. Written
    atomically, like :func:`to_onnx`. Needs ``pip install neusub[onnx]``.

    Bad input is a ``ValueError`` naming it: a file :class:`OnnxModel` refuses, one already
    quantized or with NaN / inf weights, calibration that is not finite tensors of the input's
    shape, an output path in no folder, or anything onnxruntime's quantizer refuses.
    """
    _require_onnx(True, "to_onnx_int8")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    source, path = Path(float_onnx), Path(path)
    model = _float_source(source)
    batches = _calibration_batches(calibration, model.input_shape)
    _check_output_path(path, source)
    reader = _Batches(model.input_name, batches)
    with written_atomically(path, overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"  # shapes inferred, graph optimised: as ORT advises
        try:
            quant_pre_process(str(source), str(prepared))
            quantize_static(
                str(prepared),
                str(tmp),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, methods[method]),
            )
            if model.metadata:
                _set_metadata(tmp, model.metadata)
            onnx.checker.check_model(str(tmp))
        except OSError:  # the file system's refusal (a full disk): not the input's fault
            raise
        except Exception as err:  # onnxruntime's and onnx's errors, and the quantizer's assertions
            raise ValueError(f"to_onnx_int8: {source} cannot be quantized ({first_line(err)})") from None
    return path


def _float_source(source: Path) -> OnnxModel:
    """The float ONNX file to quantize, checked."""
    model = OnnxModel(source)
    if model.quantized:
        raise ValueError(f"to_onnx_int8: {source} is quantized already; pass the float file from to_onnx")
    bad = model.non_finite_weights()
    if bad:
        raise ValueError(f"to_onnx_int8: {source} holds NaN or inf (in {bad[0]}); it cannot be calibrated")
    return model


def _calibration_batches(calibration: object, input_shape: tuple) -> list[Tensor]:
    """``calibration`` as a list of non-empty float32 CPU batches of the network's input shape."""
    if isinstance(calibration, Tensor):
        items = [calibration]
    else:
        try:
            items = list(calibration)  # type: ignore[call-overload]
        except TypeError:
            raise ValueError(
                f"calibration must be a tensor or an iterable of tensors, not {type(calibration).__name__}"
            ) from None
    batch, sample = input_shape[0], tuple(input_shape[1:])
    wanted = f"({batch if isinstance(batch, int) else 'N'}, {', '.join(map(str, sample))})"
    batches = []
    for i, item in enumerate(items):
        if not isinstance(item, Tensor):
            raise ValueError(f"calibration batch {i} is of type {type(item).__name__}, not a torch tensor")
        shape = tuple(item.shape)
        if (
            len(shape) != len(input_shape)
            or shape[1:] != sample
            or isinstance(batch, int)
            and len(item) != batch
        ):
            raise ValueError(f"calibration batch {i} has shape {shape}; the network takes {wanted}")
        item = item.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(item).all()):
            raise ValueError(f"calibration batch {i} holds NaN or inf; calibrate on finite inputs")
        if len(item):
            batches.append(item)
    if not batches:
        raise ValueError("to_onnx_int8 needs at least one calibration sample")
    return batches


def _check_output_path(path: Path, source: Path) -> None:
    if not path.parent.is_dir():
        raise ValueError(f"to_onnx_int8: {path.parent} is not a folder; choose a path in an existing folder")
    if path.resolve() == source.resolve():
        raise ValueError(f"to_onnx_int8: {path} is the float file itself; choose another path")


class _Batches:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of tensors."""

    def __init__(self, name: str, batches: list[Tensor]):
        self.name, self.batches = name, iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch.numpy()}


ONNX_MAX_BYTES = 2**31  # protobuf's limit: a file without external data is never larger


class OnnxModel:
    """An ONNX file as a callable ``(B, *input) → outputs`` on tensors, run by onnxruntime (CPU).

    ``metadata`` holds the file's ``metadata_props``; ``input_shape`` the input's shape as the
    file declares it (a symbolic batch axis by its name); ``sample_output_shape`` the first
    output's shape for one sample. The file is read only when it is a regular file of at most
    2 GiB, and loaded only when its cost is bounded (:mod:`neusub.onnx_files`: no loops, sizes
    known before it runs); anything else is a ``ValueError`` naming the file and the problem."""

    def __init__(self, path: str | os.PathLike):
        _require_onnx(True, "running an ONNX file")
        import onnx
        import onnxruntime

        self.path = Path(path)
        data = read_regular_file(self.path, ONNX_MAX_BYTES, "ONNX")
        try:
            self.proto = onnx.load_model_from_string(data)
        except Exception as err:  # protobuf's DecodeError
            raise ValueError(f"{self.path} is not an ONNX model ({first_line(err)})") from None
        shapes = check_bounded(self.proto, str(self.path))
        try:
            self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's InvalidGraph / Fail
            raise ValueError(
                f"{self.path} is not an ONNX model onnxruntime can load ({first_line(err)})"
            ) from None
        first = self.session.get_inputs()[0]
        if first.type != "tensor(float)":
            raise ValueError(
                f"{self.path} takes {first.type} inputs; OnnxModel runs networks of float inputs"
            )
        self.input_name, self.input_shape = first.name, tuple(first.shape)
        self.sample_output_shape = shapes.get(self.session.get_outputs()[0].name)
        self.metadata = read_metadata(self.proto)

    @property
    def quantized(self) -> bool:
        """Whether the graph holds INT8 quantize / dequantize nodes."""
        return any(node.op_type in ("QuantizeLinear", "QLinearConv") for node in self.proto.graph.node)

    def non_finite_weights(self) -> list[str]:
        """The names of the stored floating-point tensors (weights, constants) holding NaN or inf."""
        return non_finite_tensors(self.proto)

    def __call__(self, x: Tensor) -> Tensor:
        feed = {self.input_name: x.detach().to("cpu", torch.float32).numpy()}
        try:
            out = self.session.run(None, feed)[0]
        except Exception as err:  # onnxruntime's InvalidArgument / RuntimeException
            raise ValueError(
                f"{self.path} cannot run on inputs of shape {tuple(x.shape)} ({first_line(err)})"
            ) from None
        return torch.from_numpy(out)
