"""The one error base class of share-cl.

Every error the project raises on bad input or bad state derives from :class:`ShareClError`; its
message names the input at fault and the fix. The ``sharecl`` CLI prints these as one line; any
other exception (a genuine bug) keeps its traceback. It subclasses ``ValueError`` so callers that
already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class ShareClError(ValueError):
    """Base of every user-facing share-cl error: the message names the input at fault and the fix."""
