"""The exceptions the CLI turns into a one-line message and an exit code."""

from __future__ import annotations

import contextlib
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
