"""The exceptions the CLI turns into a one-line message and an exit code."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class CLIError(Exception):
    """A user error: the message names the problem and the fix (exit code 2)."""


@contextlib.contextmanager
def library_refusals() -> Iterator[None]:
    """The library's refusals inside the block (``ValueError``, its message names the fix) as ``CLIError``."""
    try:
        yield
    except ValueError as err:
        raise CLIError(str(err)) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the same clean-up runs."""


class Stopped(Exception):
    """A run stopped by a signal, after saying what was kept and how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message, exit_code)  # both in args: it crosses process boundaries (pickle)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return str(self.args[0])


def stop_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's exit code for the signal: 128 + SIGTERM (15) or SIGINT (2)."""
    return 143 if isinstance(interrupt, Terminated) else 130


def describe_os_error(err: OSError, doing: str) -> str:
    """``cannot <doing> (<reason>)``, with the usual way out for the common reasons."""
    reason = err.strerror or str(err)
    hint = {
        errno.ENAMETOOLONG: "use a shorter name",
        errno.EROFS: "it is on a read-only file system; choose a writable place",
        errno.EACCES: "you may not write there; choose a writable place",
        errno.EPERM: "you may not write there; choose a writable place",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a part of the path is a file, not a folder",
        errno.ENOSPC: "the disk is full; free some space",
        errno.ENOENT: "a part of the path does not exist and cannot be created there",
    }.get(err.errno, "choose another place")
    where = f" {err.filename}" if err.filename and str(err.filename) not in doing else ""
    return f"cannot {doing}{where} ({reason}): {hint}"
