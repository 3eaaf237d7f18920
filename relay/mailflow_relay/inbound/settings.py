"""The listener's settings, limits and the small helpers every part of the listener shares."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from mailflow_relay.errors import MailflowRelayError

__all__ = [
    "ABORT_SETTLE_SECONDS",
    "AUTH_VERIFICATIONS_AT_ONCE",
    "COMMAND_LINE_LIMIT",
    "CONTROL_CHARACTERS",
    "NO_SUCH_USER_HASH",
    "SIZE_PARAMETER_ALLOWANCE",
    "IPAddress",
    "IPNetwork",
    "ListenerConfigError",
    "ListenerSettings",
    "printable",
]

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

COMMAND_LINE_LIMIT = 512
"""RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF."""
SIZE_PARAMETER_ALLOWANCE = 26
"""RFC 1870: a server offering SIZE accepts MAIL lines 26 octets longer."""
AUTH_VERIFICATIONS_AT_ONCE = 4
"""scrypt verifications running in parallel (each takes tens of ms and ~16 MiB)."""
ABORT_SETTLE_SECONDS = 5.0
"""After aborting transports, how long to wait for their sessions to notice."""

# A stored hash in the right format that matches no password: unknown users cost the
# same time as known ones, so AUTH failures do not reveal which user names exist.
NO_SUCH_USER_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="


class ListenerConfigError(MailflowRelayError, ValueError):
    """Listener settings that cannot work (a key without a certificate, a zero limit)."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


@dataclass(frozen=True)
class ListenerSettings:
    """Everything the listener needs to know; immutable, replaced as a whole on reload."""

    host: str = "127.0.0.1"
    """Address to bind (``0.0.0.0`` or ``::`` for every interface)."""

    port: int = 2525
    """TCP port to bind; 0 picks a free one (read it back from :attr:`SmtpListener.port`)."""

    hostname: str = field(default_factory=socket.getfqdn)
    """Our name: in the 220 greeting, the EHLO reply and the ``by`` clause of ``Received:``."""

    accept_from: tuple[IPNetwork, ...] = ()
    """Client networks allowed to relay without AUTH. Empty: only authenticated clients."""

    users: Mapping[str, str] = field(default_factory=dict)
    """SMTP AUTH users: user name -> password hash (:func:`passwords.hash_password`).
    Empty: AUTH is not offered."""

    tls_cert_file: Path | None = None
    """PEM certificate chain for STARTTLS. None (with no key): a self-signed certificate
    for :attr:`hostname` is generated at start and kept in memory only."""

    tls_key_file: Path | None = None
    """PEM private key matching :attr:`tls_cert_file`."""

    max_message_size: int = 25 * 1024 * 1024
    """Largest message in octets: advertised with SIZE (RFC 1870), larger -> 552 5.3.4."""

    max_recipients: int = 100
    """Recipients per message; more -> 452 4.5.3 (RFC 5321 4.5.3.1.10: at least 100)."""

    max_line_length: int = 1000
    """Longest text line in DATA, including CRLF, not counting a transparency dot
    (RFC 5321 4.5.3.1.6); longer -> 500 5.6.0."""

    command_timeout: float = 300.0
    """Seconds to wait for the next command (RFC 5321 4.5.3.2.7: at least 5 minutes);
    also bounds the ``on_message`` callback. Then 421 4.4.2 and close."""

    data_timeout: float = 600.0
    """Seconds allowed for the whole message content, from the 354 reply to the final dot
    (a client dripping one line every few minutes cannot hold a session forever)."""

    max_connections_per_client: int = 20
    """Simultaneous connections from one client address; more -> 421 4.7.0 and close."""

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ListenerConfigError(
                "tls_cert_file/tls_key_file", "give both a certificate and its key, or neither"
            )
        for name in (
            "max_message_size",
            "max_recipients",
            "max_line_length",
            "max_connections_per_client",
        ):
            if getattr(self, name) < 1:
                raise ListenerConfigError(name, "must be at least 1")
        for name in ("command_timeout", "data_timeout"):
            if not getattr(self, name) > 0:
                raise ListenerConfigError(name, "must be a positive number of seconds")
        if not 0 <= self.port <= 65535:
            raise ListenerConfigError("port", f"{self.port} is not a TCP port")


def printable(text: str, limit: int = 100) -> str:
    """Client-supplied text, safe to put into a reply line or a log message."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]
