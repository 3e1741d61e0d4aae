"""Files neusub writes and reads.

Writing: a file appears complete under its name, or not at all (:func:`written_atomically`), and
Ctrl-C / SIGTERM wait until it is complete (:func:`signals_deferred`). Reading: a file is read
only when it is a regular file of a size this machine can hold (:func:`check_regular_file`), so a
path that names a FIFO, a device (``/dev/zero``) or a sparse giant neither hangs nor fills memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"  # ``.<name>.<random>.tmp`` beside the target, while it is being written


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed to ``path`` only if the block
    succeeds, removed otherwise (``path`` is then left as it was). With ``overwrite=False`` an
    existing ``path`` is never replaced, even one another process wrote meanwhile:
    ``FileExistsError`` then, and the temporary file is removed."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # what open() gives: mkstemp makes the file private (0600)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _publish_new(tmp: Path, path: Path) -> None:
    """``tmp`` under the name ``path``, which must not exist: a hard link fails atomically when it does."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "it already exists", str(path)) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # no hard links here (FAT, some network file systems): reserve the name, then replace it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back until the block ends, then deliver them.

    A file being written is finished first: an exception raised inside a C++ writer (torch's
    zip writer calls back into Python) would surface as a ``RuntimeError`` instead of the
    interrupt. Only the main thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed outside Python, cannot be restored
            previous[signum] = handler
            signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:  # the first one, to the handler it was meant for
            signal.raise_signal(received[0])


# ---------------------------------------------------------------------- reading

_KINDS = {
    stat.S_ISDIR: "a folder",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def memory_bytes() -> float:
    """This machine's physical memory in bytes (``inf`` where the OS does not say)."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def _gigabytes(size: float) -> str:
    return f"{size / 1e9:.3g} GB"


def check_regular_file(path: str | os.PathLike, limit: float, what: str) -> int:
    """The size of ``path``, a regular file (symbolic links followed) of at most ``limit``
    bytes; ``ValueError`` naming what it is otherwise. Nothing is opened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} does not exist; check the path") from None
    except OSError as err:
        raise ValueError(f"{what} file {path} cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS.items() if test(info.st_mode)), "something else")
        raise ValueError(f"{path} is {kind}, not a regular file; nothing was read — pass the {what} file")
    if info.st_size > limit:
        raise ValueError(
            f"{path} is {_gigabytes(info.st_size)}, over the {_gigabytes(limit)} allowed for {what} files "
            "here; it was not read — check that it is the file you meant"
        )
    return info.st_size


def read_regular_file(path: str | os.PathLike, limit: float, what: str) -> bytes:
    """The bytes of ``path`` once :func:`check_regular_file` accepts it, checked again on the
    opened file (it cannot be swapped for a FIFO or a device in between)."""
    check_regular_file(path, limit, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO would not block open()
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise ValueError(f"{path} changed while it was opened; pass a regular {what} file")
        data = handle.read(int(min(limit, info.st_size)) + 1)
    if len(data) > info.st_size:  # grew meanwhile
        raise ValueError(f"{path} changed while it was read; pass a {what} file no one is writing")
    return data


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
