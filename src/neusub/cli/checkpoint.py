"""Checkpoints: atomic writes, safe loads (``torch.load(weights_only=True)``), clear errors."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import CLIError

FORMAT = "neusub-checkpoint-v1"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` into a temporary file in the same folder, then rename over ``path``;
    on any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_save_json(obj: dict, path: str | Path) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(obj, indent=2).encode()))


def safe_load(path: str | Path, expect: str = FORMAT) -> dict:
    """Load a neusub file without unpickling arbitrary objects; ``CLIError`` when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist; pass the path of a run's last.pt or a run folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or pickles foreign objects
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CLIError(
            f"{path} is not a readable neusub checkpoint ({reason}); it may be truncated or "
            "from another program — use a last.pt written by `neusub train`"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != expect:
        raise CLIError(
            f"{path} is not a {expect} file; use a file written by `neusub train` / `neusub deploy`"
        )
    return obj


def rng_state() -> dict:
    """Every RNG the training loop touches, as weights-only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *map(int, np_state[2:4]),
            float(np_state[4]),
        ],  # fmt: skip
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_lists_to_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _lists_to_python_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
