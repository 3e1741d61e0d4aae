"""The files neusub writes, read back as models: ``neusub.load`` and what it is made of.

Each file is a ``torch.save`` archive of a dict with a ``format`` key, the run's settings
(``config``: option values by name, as ``neusub train`` takes them), the shape of its data
(``info``: ``num_classes``, ``in_chans``, ``input_shape``, ``kind``) and the weights. Reading
checks every member's CRC-32 first (``torch.load`` does not: a flipped byte inside a tensor
would load silently) and never unpickles arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import inspect
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .deploy import deploy, non_finite
from .files import check_regular_file, first_line, memory_bytes

CHECKPOINT_FORMAT = "neusub-checkpoint-v1"  # a run's last.pt: training structure, optimizer, RNGs
DEPLOYED_FORMAT = "neusub-deployed-v1"  # deployed.pt: the plain network
TORCHVISION_FORMAT = "neusub-torchvision-v1"  # `export --format torchvision`: a torchvision ResNet
MODEL_FORMATS = (CHECKPOINT_FORMAT, DEPLOYED_FORMAT, TORCHVISION_FORMAT)
WEIGHTS_KEY = {CHECKPOINT_FORMAT: "model", DEPLOYED_FORMAT: "state_dict", TORCHVISION_FORMAT: "state_dict"}

# create_model's options are settings of the same name, except these (keyword → setting)
RENAMED_MODEL_OPTIONS = {"drop_path_rate": "drop_path"}
DATA_MODEL_OPTIONS = ("name", "num_classes", "kwargs")  # given by the data, not by a setting


class SavedFileError(ValueError):
    """A file that is not a readable neusub file, or that does not fit the model it describes."""


@dataclass
class DataInfo:
    """The shape of the data a model is built for (saved with it as ``info``)."""

    num_classes: int
    in_chans: int
    input_shape: tuple[int, ...]  # one sample
    kind: str  # "image" or "features"


def info_dict(info: DataInfo) -> dict:
    return {
        "num_classes": info.num_classes,
        "in_chans": info.in_chans,
        "input_shape": list(info.input_shape),
        "kind": info.kind,
    }


def info_from_dict(values: object, where: str) -> DataInfo:
    """A ``DataInfo`` from a saved file, its values checked (a crafted file cannot ask for absurd sizes)."""
    try:
        num_classes, in_chans, shape, kind = (
            values[k] for k in ("num_classes", "in_chans", "input_shape", "kind")
        )
        shape = tuple(shape)
    except (KeyError, TypeError) as err:
        raise SavedFileError(
            f"{where} is malformed ({err!r}); use a file written by `neusub train`"
        ) from None
    sizes = [num_classes, in_chans, *shape]
    integers = all(isinstance(v, int) and not isinstance(v, bool) for v in sizes)
    if (
        kind not in ("image", "features")
        or not 1 <= len(shape) <= 3
        or not integers
        or not 1 <= num_classes <= 1_000_000
        or not all(1 <= v <= 65_536 for v in sizes[1:])
    ):
        raise SavedFileError(
            f"{where} describes impossible data ({values!r}); use a file written by `neusub train`"
        )
    return DataInfo(num_classes, in_chans, shape, kind)


def verify_archive(path: str | os.PathLike) -> None:
    """Check every member of a ``torch.save`` zip archive against its stored CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            compressed = [m.filename for m in archive.infolist() if m.compress_type != zipfile.ZIP_STORED]
            bad = None if compressed else archive.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as err:
        raise SavedFileError(
            f"{path} is not a readable neusub checkpoint ({err}); it may be truncated or from another "
            "program — use a file written by `neusub train` / `neusub deploy`"
        ) from None
    if compressed:  # torch.save stores members as they are: a compressed one could expand without bound
        raise SavedFileError(
            f"{path} holds compressed members ({compressed[0]!r}); torch.save never writes those — "
            "use a file written by `neusub train` / `neusub deploy`"
        )
    if bad is not None:
        raise SavedFileError(
            f"{path} is corrupt: its member {bad!r} fails its checksum (a changed byte on disk); "
            "restore it from a copy, or resume from an earlier checkpoint"
        )


def read(path: str | os.PathLike, expect: str | tuple[str, ...] = CHECKPOINT_FORMAT) -> dict:
    """The dict saved at ``path``, a neusub file of format ``expect`` (one or several)."""
    path = Path(path)
    expect = (expect,) if isinstance(expect, str) else expect
    if not path.exists():
        raise SavedFileError(
            f"checkpoint {path} does not exist; pass the path of a run's last.pt or a run folder"
        )
    try:  # a FIFO or a device is never opened; a file larger than memory cannot be loaded
        check_regular_file(path, memory_bytes(), "checkpoint")
    except ValueError as err:
        raise SavedFileError(str(err)) from None
    verify_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or pickles foreign objects
        reason = first_line(err)
        raise SavedFileError(
            f"{path} is not a readable neusub checkpoint ({reason}); it may be truncated or "
            "from another program — use a last.pt written by `neusub train`"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") not in expect:
        raise SavedFileError(
            f"{path} is not a {' or '.join(expect)} file; "
            "use a file written by `neusub train` / `neusub deploy`"
        )
    return obj


def model_options(settings: Mapping | object) -> dict:
    """``create_model``'s keyword options, read from ``settings`` by their names (create_model's
    signature is their one declaration): a mapping (a saved file's settings; one it lacks takes
    create_model's default) or an object with every option as an attribute (a ``TrainConfig``)."""
    from .models import create_model

    names = [n for n in inspect.signature(create_model).parameters if n not in DATA_MODEL_OPTIONS]
    keys = {name: RENAMED_MODEL_OPTIONS.get(name, name) for name in names}
    if isinstance(settings, Mapping):
        return {name: settings[key] for name, key in keys.items() if key in settings}
    return {name: getattr(settings, key) for name, key in keys.items()}


def build_model(settings: Mapping | object, info: DataInfo) -> nn.Module:
    """The training structure a run's ``settings`` describe, for data of shape ``info``.

    ``ValueError`` names what cannot be built (an option of the wrong kind, absurd sizes)."""
    from .models import create_model

    name = settings["model"] if isinstance(settings, Mapping) else settings.model
    kwargs = {**model_options(settings), "num_classes": info.num_classes}
    kwargs["in_features" if info.kind == "features" else "in_chans"] = info.in_chans
    try:
        return create_model(name, **kwargs)
    except (RuntimeError, MemoryError, OverflowError) as err:  # allocation of absurd sizes
        reason = first_line(err, 120)
        raise ValueError(
            f"model {name!r} at width_mult={kwargs.get('width_mult', 1.0)} with {info.num_classes} classes "
            f"cannot be built ({reason}); use a smaller width_mult (--width-mult)"
        ) from None


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _misfits(own: Mapping[str, torch.Tensor], state: object, where: str) -> list[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` (empty: it fits).
    ``own`` may live on the meta device: only its keys and shapes are read."""
    if not isinstance(state, dict):
        raise SavedFileError(
            f"{where} holds no state dict; use a file written by `neusub train` / `neusub deploy`"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    # a broadcast view (stride 0) claims elements that are not in the file: it could pass for any size
    unstored = [
        k
        for k, t in state.items()
        if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > t.untyped_storage().nbytes()
    ]
    kinds = {
        "missing": missing,
        "unexpected": unexpected,
        "of another shape": reshaped,
        "with elements not stored (broadcast views)": unstored,
    }
    return [f"{len(keys)} {what} ({_few(keys)})" for what, keys in kinds.items() if keys]


def _does_not_fit(where: str, parts: list[str]) -> SavedFileError:
    return SavedFileError(
        f"{where} does not fit the model its config describes: keys {'; '.join(parts)}; "
        "it was made with other settings (another recipe or model?) or changed after it was written"
    )


def load_weights(model: nn.Module, state: object, where: str) -> None:
    """``model.load_state_dict(state)``, or a :class:`SavedFileError` naming the keys that do not fit."""
    parts = _misfits(model.state_dict(), state, where)
    if not parts:
        try:
            model.load_state_dict(state)
            return
        except (RuntimeError, TypeError, ValueError) as err:
            parts = [str(err).strip().splitlines()[-1][:160]]
    raise _does_not_fit(where, parts)


def refuse_non_finite(state: Mapping[str, object], where: str) -> None:
    """``SavedFileError`` when ``state`` holds NaN or inf: what such a network outputs is meaningless."""
    names = non_finite(state)
    if names:
        raise SavedFileError(
            f"{where} holds non-finite weights (NaN or inf in {_few(names)}); its outputs would be "
            "meaningless, so it is refused — use a checkpoint from before training diverged "
            "(`neusub train` writes only finite ones)"
        )


def settings_of(saved: dict, file: str | os.PathLike) -> tuple[dict, DataInfo]:
    """``(settings, info)`` a saved file was written with, the info checked."""
    for key in ("config", "info"):
        if key not in saved:
            raise SavedFileError(f"{file} lacks {key!r}; it was not written by neusub (or was changed)")
    return saved["config"], info_from_dict(saved["info"], f"{file}: info")


def _structure(file_format: str, settings: Mapping | object, info: DataInfo) -> nn.Module:
    """The (untrained) network a file of ``file_format`` holds the weights of."""
    model = build_model(settings, info)
    if file_format == DEPLOYED_FORMAT:
        return deploy(model)
    if file_format == TORCHVISION_FORMAT:
        from .export import to_torchvision

        return to_torchvision(model)  # the layout; the weights come from the file
    return model


def model_from(saved: dict, settings: Mapping | object, info: DataInfo, where: str) -> nn.Module:
    """The model a file of :data:`MODEL_FORMATS` holds, in eval mode: the structure its format
    names, built from ``settings`` and ``info``, with the file's weights.

    The structure is first built on the meta device (shapes, no memory) and compared with the
    stored weights: settings that ask for sizes the file does not hold are refused before any
    memory is taken, so a small crafted file cannot make this build a huge network."""
    key = WEIGHTS_KEY[saved["format"]]
    if key not in saved:
        raise SavedFileError(f"{where} lacks {key!r}; it was not written by neusub (or was changed)")
    with torch.device("meta"):
        skeleton = _structure(saved["format"], settings, info)
    parts = _misfits(skeleton.state_dict(), saved[key], where)
    if parts:
        raise _does_not_fit(where, parts)
    model = _structure(saved["format"], settings, info)
    load_weights(model, saved[key], where)
    return model.eval()


def load(path: str | os.PathLike) -> nn.Module:
    """The model saved at ``path``, in eval mode, rebuilt from the settings stored with it:

    - a run folder or its ``last.pt`` → the training structure (``neusub.deploy`` it to ship);
    - ``deployed.pt`` (``neusub train`` / ``neusub deploy``) → the deployed plain network;
    - ``last.tv.pt`` (``neusub export --format torchvision``) → the ``torchvision.models.ResNet``;
    - an ``.onnx`` file (``neusub export --format onnx``) → :class:`neusub.export.OnnxModel`,
      a callable on tensors run by onnxruntime.

    Anything else raises ``ValueError`` naming the file and the problem: a path that is not a
    regular file (a FIFO, ``/dev/zero``) is never opened, and settings that ask for sizes the
    stored weights do not have are refused before the network is built (:func:`model_from`).
    Weights are loaded as stored, NaN or inf included (the command line refuses those).
    """
    if Path(path).suffix == ".onnx":
        from .export import OnnxModel

        return OnnxModel(path)  # type: ignore[return-value]
    file = Path(path) / "last.pt" if Path(path).is_dir() else Path(path)
    saved = read(file, MODEL_FORMATS)
    settings, info = settings_of(saved, file)
    try:
        return model_from(saved, settings, info, str(file))
    except SavedFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # settings a crafted file makes up
        raise SavedFileError(f"{file} holds settings no model can be built from ({err})") from None
