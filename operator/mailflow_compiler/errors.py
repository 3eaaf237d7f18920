"""The operator package's exceptions."""

from __future__ import annotations


class MailflowError(Exception):
    """Root of every error raised by :mod:`mailflow_operator`."""


class UsageError(MailflowError, ValueError):
    """The command line asks for something that cannot be done (exit code 2)."""


class CrdError(MailflowError, RuntimeError):
    """The CRD files themselves cannot be loaded: a broken installation, not bad input."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason
