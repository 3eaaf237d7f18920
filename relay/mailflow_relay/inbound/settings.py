"""The listener's settings, limits and the small helpers every part of the listener shares."""

from __future__ import annotations

import enum
import ipaddress
import re
import resource
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
    "ListenerEvent",
    "ListenerSettings",
    "default_max_connections",
    "is_localhost_name",
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


MAX_CONNECTIONS_CEILING = 1000
"""The derived global session cap never exceeds this: past about a thousand sessions one
event loop answers slowly anyway, and the fleet should scale out (HPA) instead."""

_LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def default_max_connections() -> int:
    """Half the process's soft open-file limit (RLIMIT_NOFILE), at most 1000, at least 8.

    Every client session holds one descriptor; the other half is kept for what the relay
    opens itself: outbound connections (workers and the idle pool), spool files and their
    directory fsyncs, DNS sockets, the HTTP port and the libraries. With the common soft
    limit of 1024 this gives 512 sessions; with 256, 128.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_CEILING
    return max(8, min(MAX_CONNECTIONS_CEILING, soft // 2))


def is_localhost_name(name: str) -> bool:
    """Whether ``name`` is a bare ``localhost`` (which many next hops refuse in EHLO)."""
    return name.rstrip(".").lower() in _LOCALHOST_NAMES


class ListenerEvent(enum.StrEnum):
    """Defensive decisions the listener reports to its owner (who counts them as metrics).

    A closed set, so the metric's label values are bounded whatever clients send; the
    client's address goes into the log line, never into a label.
    """

    CONNECTION_CAP = "max_connections"
    """A connection refused with 421: the global session cap was reached."""
    CLIENT_CAP = "max_connections_per_client"
    """A connection refused with 421: that address already had its share."""
    ACCEPT_ERROR = "accept_error"
    """``accept()`` failed (EMFILE, ENFILE, ENOBUFS): the process ran out of descriptors."""
    AUTH_FAILURE = "auth_failure"
    """One wrong user name or password."""
    AUTH_DELAYED = "auth_delayed"
    """An AUTH attempt held back because its address failed recently."""
    AUTH_DISCONNECT = "auth_disconnect"
    """A session closed after too many AUTH failures."""
    ERROR_DELAYED = "error_delayed"
    """An error reply held back: the session passed the soft error limit."""
    ERROR_DISCONNECT = "error_disconnect"
    """A session closed with 421 at the hard error limit."""
    SMUGGLING = "smuggling"
    """A message refused for a bare CR, a bare LF or a NUL in its content."""


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

    hostname: str = field(default_factory=lambda: socket.getfqdn())
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

    max_hops: int = 50
    """Most ``Received:`` headers a message may carry, counting the one this relay adds;
    more -> 554 5.4.6 at the end of DATA (a mail loop; Postfix ``hopcount_limit``)."""

    allow_open_relay: bool = False
    """Allow an :attr:`accept_from` network of every address (``0.0.0.0/0``, ``::/0``):
    anyone on the Internet may relay. Refused unless this says so (DESIGN.md: an open
    relay must be asked for explicitly); when allowed, the relay warns at start and
    ``mailflow_open_relay`` is 1."""

    @property
    def open_networks(self) -> tuple[IPNetwork, ...]:
        """The :attr:`accept_from` networks that hold every address of their family."""
        return tuple(n for n in self.accept_from if n.prefixlen == 0)

    max_connections: int = field(default_factory=default_max_connections)
    """Simultaneous client sessions in all, well below the open-file limit so that the
    relay keeps descriptors for its own work; more -> 421 4.7.0 and close. Default: half
    the soft RLIMIT_NOFILE, at most 1000 (:func:`default_max_connections`). With an
    ``accept_from`` list, a quarter of it is kept for those networks (the relay's own mail
    hosts): clients from anywhere else may hold at most the other three quarters, so a
    flood from outside cannot lock the mail hosts out."""

    soft_error_limit: int = 10
    """Error replies (4xx/5xx) in one session after which each further error reply is
    delayed, by ``error_sleep`` more each time (Postfix ``smtpd_soft_error_limit``)."""

    hard_error_limit: int = 20
    """Error replies in one session at which the relay sends 421 4.7.0 and closes
    (Postfix ``smtpd_hard_error_limit``). An accepted message resets the count."""

    error_sleep: float = 1.0
    """Seconds added to the delay of each error reply past the soft limit (Postfix
    ``smtpd_error_sleep_time``): the 11th error waits 1 s, the 12th 2 s, ..."""

    max_auth_failures: int = 3
    """Failed AUTH attempts in one session; the last one is followed by 421 4.7.0 and close."""

    auth_failure_delay: float = 1.0
    """Before verifying AUTH from an address that failed recently: this many seconds,
    doubled for each further recent failure, up to :attr:`auth_failure_delay_max`."""

    auth_failure_delay_max: float = 30.0
    """The longest wait before an AUTH attempt is verified."""

    auth_failure_window: float = 900.0
    """Seconds after which an address's AUTH failures are forgotten."""

    auth_failure_addresses: int = 10_000
    """Addresses whose AUTH failures are remembered (oldest forgotten first; IPv6 per /64),
    which bounds the memory an attacker with many addresses can make us use."""

    reuse_port: bool = False
    """Bind with ``SO_REUSEPORT``: several worker processes listen on one port and the kernel
    spreads new connections among them (``mailflow relay --processes``)."""

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
            "max_hops",
            "max_connections",
            "soft_error_limit",
            "hard_error_limit",
            "max_auth_failures",
            "auth_failure_addresses",
        ):
            if getattr(self, name) < 1:
                raise ListenerConfigError(name, "must be at least 1")
        for name in ("command_timeout", "data_timeout", "auth_failure_window"):
            if not getattr(self, name) > 0:
                raise ListenerConfigError(name, "must be a positive number of seconds")
        for name in ("error_sleep", "auth_failure_delay", "auth_failure_delay_max"):
            if not getattr(self, name) >= 0:
                raise ListenerConfigError(name, "must be zero or a positive number of seconds")
        if self.soft_error_limit > self.hard_error_limit:
            raise ListenerConfigError(
                "soft_error_limit", f"must not exceed hard_error_limit ({self.hard_error_limit})"
            )
        if not self.hostname.strip():
            raise ListenerConfigError("hostname", "must not be empty")
        if not 0 <= self.port <= 65535:
            raise ListenerConfigError("port", f"{self.port} is not a TCP port")
        if self.open_networks and not self.allow_open_relay:
            shown = ", ".join(str(n) for n in self.open_networks)
            raise ListenerConfigError(
                "accept_from",
                f"{shown} lets anyone on the Internet relay through this relay (an open "
                "relay); name your mail hosts' networks, or add --allow-open-relay if that "
                "is really what you want",
            )


def printable(text: str, limit: int = 100) -> str:
    """Client-supplied text, safe to put into a reply line or a log message."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]
