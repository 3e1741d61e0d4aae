"""Writing a run's files: atomic writes (a file is complete or absent), JSON, RNG state.

Reading them back is :mod:`neusub.saved`."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..files import TEMP_SUFFIX, signals_deferred, written_atomically
from .errors import CLIError, describe_os_error


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


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """A file system's refusal while ``path`` is written (a full disk, a name taken meanwhile)
    as a one-line ``CLIError`` that names ``path``."""
    path = Path(path)
    try:
        yield
    except FileExistsError:
        raise CLIError(
            f"{path} already exists (another process wrote it meanwhile); nothing was overwritten — "
            "choose another output path"
        ) from None
    except (OSError, RuntimeError) as err:
        if _is_disk_full(err):
            kept = f"; {path.name} was left as it was" if path.exists() else ""
            raise CLIError(
                f"the disk is full: {path} could not be written{kept}; free some space "
                "(or choose another --out) and run the command again"
            ) from None
        if isinstance(err, OSError):
            raise CLIError(describe_os_error(err, f"write {path}")) from None
        raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], overwrite: bool = True) -> None:
    """``write(handle)`` into a temporary file in the same folder, then rename over ``path``;
    on any failure the temporary file is removed and ``path`` is left as it was. Ctrl-C and
    SIGTERM wait until the file is complete (or removed). ``overwrite=False``: an existing
    ``path`` is refused, even one that appeared while this was writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path), signals_deferred():
        with written_atomically(path, overwrite) as tmp, open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_save(obj: Any, path: str | Path, overwrite: bool = True) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: torch.save(obj, handle), overwrite)


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
