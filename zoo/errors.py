"""The error a user fixes by changing the command: the ``zoo`` command exits with status 2 for these.

Everything else a user can meet (a missing file, an entry not built, corrupted weights) is a runtime
error: one line too, exit status 1.
"""

from __future__ import annotations


class UsageError(ValueError):
    """An argument, name, config key or value that cannot work; the message says what to give instead.

    Errors say their own exit status (``exit_status``), so packages the ``zoo`` command runs can raise
    usage errors of their own (``serving.cli.UsageError``) without importing this module.
    """

    exit_status = 2
