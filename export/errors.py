"""The export layer's errors (no heavy imports: the command-line parsers read the formats table)."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be done as asked (a model it cannot trace, a failed check); the message says what to do.

    A ``ValueError`` so the ``zoo`` command reports it as a one-line error (exit status 1).
    """


class ExportArgumentError(ExportError):
    """An export asked for with arguments that cannot work (format, opset, precision): exit status 2."""

    exit_status = 2  # a usage error (zoo.errors.UsageError's protocol, without importing the zoo package)
