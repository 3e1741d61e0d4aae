"""Checkpoints: atomic writes, safe loads (``torch.load(weights_only=True)``), clear errors."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..files import TEMP_SUFFIX, written_atomically
from .errors import CLIError

FORMAT = "neusub-checkpoint-v1"


def temp_files(folder: Path) -> list[Path]:
    """The temporary files :func:`atomic_write` leaves behind when its process is killed."""
    return sorted(p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file())


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC, also when torch's zip writer reports it as ``RuntimeError: [enforce fail ...]``."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` into a temporary file in the same folder, then rename over ``path``;
    on any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with written_atomically(path) as tmp, open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as err:
        if _is_disk_full(err):
            kept = f"; {path.name} was left as it was" if path.exists() else ""
            raise CLIError(
                f"the disk is full: {path} could not be written{kept}; free some space "
                "(or choose another --out) and run the command again"
            ) from None
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def finite_json(obj: Any, indent: int | None = None) -> str:
    """JSON that parses everywhere: non-finite floats (NaN, ±inf) become ``null``."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(v) for key, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def atomic_save_json(obj: dict, path: str | Path) -> None:
    atomic_write(path, lambda handle: handle.write(finite_json(obj, indent=2).encode()))


def verify_archive(path: Path) -> None:
    """Check every member of a checkpoint's zip archive against its stored CRC-32.

    ``torch.load`` does not: a flipped byte inside a tensor would load silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as err:
        raise CLIError(
            f"{path} is not a readable neusub checkpoint ({err}); it may be truncated or from another "
            "program — use a file written by `neusub train` / `neusub deploy`"
        ) from None
    if bad is not None:
        raise CLIError(
            f"{path} is corrupt: its member {bad!r} fails its checksum (a changed byte on disk); "
            "restore it from a copy, or resume from an earlier checkpoint"
        )


def safe_load(path: str | Path, expect: str | tuple[str, ...] = FORMAT) -> dict:
    """Load a neusub file of format ``expect`` (one or several) without unpickling arbitrary
    objects, after checking its checksums; ``CLIError`` when it is not one."""
    path = Path(path)
    expect = (expect,) if isinstance(expect, str) else expect
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist; pass the path of a run's last.pt or a run folder")
    verify_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or pickles foreign objects
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CLIError(
            f"{path} is not a readable neusub checkpoint ({reason}); it may be truncated or "
            "from another program — use a last.pt written by `neusub train`"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") not in expect:
        raise CLIError(
            f"{path} is not a {' or '.join(expect)} file; "
            "use a file written by `neusub train` / `neusub deploy`"
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
        ],
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
