"""The one exception the CLI turns into a one-line message and exit code 2."""


class CLIError(Exception):
    """A user error: the message names the problem and the fix."""
