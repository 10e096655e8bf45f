"""Errors the ``sharecl`` command line shows as one line (exit status 2), without a traceback."""


class CLIError(Exception):
    """A user-facing error; its message names the input at fault and the fix."""
