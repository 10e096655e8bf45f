"""Errors of the ``sharecl`` command line and the job schema.

Both derive from :class:`share.errors.ShareClError`, which the CLI prints as one line (exit status 2)
without a traceback; their messages name the input at fault and the fix.
"""

from __future__ import annotations

from share.errors import ShareClError


class CLIError(ShareClError):
    """A command-line usage error: the message names the argument at fault and the fix."""


class JobConfigError(ShareClError):
    """A job file or override is wrong; the message names the key and the fix."""
