"""The relay's exceptions: one root, each error carrying the fields a caller needs."""

from __future__ import annotations


class MailflowRelayError(Exception):
    """Root of every error raised by :mod:`mailflow_relay`."""


class InvalidDomainError(MailflowRelayError, ValueError):
    """A domain or domain pattern that cannot be used for routing."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"{text!r}: {reason}")
        self.text = text
        self.reason = reason


class InvalidAddressError(MailflowRelayError, ValueError):
    """An envelope address that has no usable domain part."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address!r}: {reason}")
        self.address = address
        self.reason = reason


class RoutingDocumentError(MailflowRelayError, ValueError):
    """A routing document that cannot be loaded; the previous one stays in force."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason
