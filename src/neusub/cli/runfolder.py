"""Run folders: what a folder holds, and one writer at a time.

A *run folder* is one that ``neusub train`` made: it holds ``config.json`` (written first),
once the first checkpoint is written ``last.pt``, and once training ended ``deployed.pt``
(``neusub demo`` adds ``summary.json``). Rules that keep every run safe:

- a folder that is not empty and not a run is never written into (it may hold someone's files);
- one process writes a run folder at a time: an OS lock (``flock``) on the folder itself,
  released by the kernel when the process dies, however it dies;
- nothing deletes a folder it did not create in the same call; the only files removed are
  the temporary files of an interrupted atomic write;
- a finished run is never trained again (``--resume`` would replace its results), whatever
  else is missing from it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import temp_files
from .errors import CLIError, describe_os_error

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second writer is not detected there
    fcntl = None  # type: ignore[assignment]

CONFIG = "config.json"
CHECKPOINT = "last.pt"
METRICS = "metrics.jsonl"
RESULTS = ("deployed.pt", "summary.json")  # written once training ended: the run is finished

# What a folder holds, as far as training is concerned.
ABSENT, EMPTY, STARTED, CHECKPOINTED, FOREIGN = "absent", "empty", "started", "checkpointed", "foreign"
FINISHED = "finished"


def epoch_records(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (``null`` as NaN; unreadable lines skipped)."""
    records = []
    for line in (Path(run_dir) / METRICS).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            records.append({k: float("nan") if v is None else v for k, v in record.items()})
    return records


class RunFolder:
    """The run folder at ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def status(self) -> str:
        """``absent`` / ``empty`` / ``started`` (config, no checkpoint yet) / ``checkpointed`` /
        ``finished`` (training ended: ``deployed.pt`` or ``summary.json``, whatever else is
        missing) / ``foreign`` (a folder or file that ``neusub train`` did not make)."""
        if not self.path.exists():
            return ABSENT
        if not self.path.is_dir():
            return FOREIGN
        ours = self.checkpoint.is_file() or (self.config_file.is_file() and self._config_is_ours())
        if ours and any((self.path / name).is_file() for name in RESULTS):
            return FINISHED
        if self.checkpoint.is_file():
            return CHECKPOINTED
        if self.config_file.is_file():
            return STARTED if ours else FOREIGN
        return EMPTY if not any(self.path.iterdir()) else FOREIGN

    def finished_files(self) -> list[str]:
        """The files that show the run finished (see :data:`RESULTS`)."""
        return [name for name in RESULTS if (self.path / name).is_file()]

    def _config_is_ours(self) -> bool:
        try:
            saved = json.loads(self.config_file.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and {"model", "connectivity", "dataset"} <= set(saved)

    def saved_config(self) -> dict:
        """``config.json`` as a dict (``CLIError`` when it is unreadable)."""
        try:
            saved = json.loads(self.config_file.read_text())
        except (OSError, ValueError) as err:
            raise CLIError(
                f"{self.config_file} cannot be read ({err}); this run cannot be continued"
            ) from None
        if not isinstance(saved, dict):
            raise CLIError(f"{self.config_file} does not hold a neusub config; this run cannot be continued")
        return saved

    def refuse_foreign(self, what: str = "--out") -> None:
        if self.status() == FOREIGN:
            kind = "a file" if not self.path.is_dir() else "a folder that is not a neusub run and not empty"
            raise CLIError(
                f"{what} {self.path} is {kind}; nothing was written there — choose a new or empty folder"
            )

    def create(self) -> bool:
        """Make the folder (and its parents); whether this call made it."""
        if self.path.is_dir():
            return False
        try:
            self.path.mkdir(parents=True)
        except FileExistsError:
            if self.path.is_dir():  # made by someone else meanwhile
                return False
            raise CLIError(
                f"cannot create run folder {self.path}: it is a file; choose another --out"
            ) from None
        except OSError as err:
            raise CLIError(describe_os_error(err, f"create run folder {self.path}")) from None
        return True

    @contextlib.contextmanager
    def locked(self, what: str = "run folder") -> Iterator[RunFolder]:
        """Hold the folder's writer lock (``CLIError`` if another process holds it)."""
        if fcntl is None:
            yield self
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CLIError(
                    f"{what} {self.path} is in use by another neusub process; wait until it ends, "
                    "or choose another --out"
                ) from None
            yield self
        finally:
            os.close(fd)  # releases the lock

    def remove_temp_files(self) -> list[str]:
        """Remove what atomic writes of a killed process left behind (only while locked)."""
        removed = []
        for tmp in temp_files(self.path):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
        return removed
