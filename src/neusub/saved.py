"""``neusub.load``: a file written by neusub's command line, back as a model."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def load(path: str | os.PathLike) -> nn.Module:
    """The model saved at ``path``, in eval mode, rebuilt from the settings stored with it:

    - a run folder or its ``last.pt`` → the training structure (``neusub.deploy`` it to ship);
    - ``deployed.pt`` (``neusub train`` / ``neusub deploy``) → the deployed plain network;
    - ``last.tv.pt`` (``neusub export --format torchvision``) → the ``torchvision.models.ResNet``;
    - an ``.onnx`` file (``neusub export --format onnx``) → :class:`neusub.export.OnnxModel`,
      a callable on tensors run by onnxruntime.

    Anything else raises ``ValueError`` naming the file and the problem.
    """
    from .cli.commands import load_run_model
    from .cli.errors import CLIError

    if Path(path).suffix == ".onnx":
        from .export import OnnxModel

        return OnnxModel(path)  # type: ignore[return-value]
    try:
        return load_run_model(str(path))[0]
    except CLIError as err:
        raise ValueError(str(err)) from None
