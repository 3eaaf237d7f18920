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


class SettingsError(MailflowRelayError, ValueError):
    """A setting that cannot work (a zero timeout, a negative limit): refused at start."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


def require_positive(owner: object, *names: str, allow_zero: tuple[str, ...] = ()) -> None:
    """Refuse any of ``names`` on ``owner`` below 1 (or below 0 for those in ``allow_zero``)."""
    for name in names:
        value = getattr(owner, name)
        floor = 0 if name in allow_zero else 1e-9
        if value is not None and value < floor:
            kind = "0 or more" if name in allow_zero else "more than 0"
            raise SettingsError(name, f"{value!r}: must be {kind}")
