"""Which queued recipients a ``mailflow queue`` command means, and the route each takes now.

Filters combine with AND: ``--connector`` (the connector that takes the recipient now, by
``namespace/name`` or ``name``; ``default`` for the default route), ``--domain`` (the
recipient's domain), ``--sender`` (the envelope sender, or ``@domain`` for a sender
domain, ``<>`` for bounces) and ``--older-than`` (the message's age in the queue). Routes
come from the routing document the running relay left in the spool folder (or a given
one), so they are the relay's, not a guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mailflow_relay.errors import InvalidAddressError, RoutingDocumentError
from mailflow_relay.routing.document import RoutingDocument
from mailflow_relay.routing.router import Client, Router

__all__ = [
    "DEFAULT_CONNECTOR",
    "QueueFilter",
    "Route",
    "RoutingUnavailableError",
    "load_router",
    "parse_age",
    "route_of",
]

DEFAULT_CONNECTOR = "default"
"""What ``--connector`` and ``queue show`` call the default route (no connector matched)."""

_AGE = re.compile(r"\A([0-9]{1,9})([smhd]?)\Z")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class RoutingUnavailableError(ValueError):
    """No routing document to route with (needed by ``--connector``)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path}: {reason}; the relay leaves its routing document there once it runs, "
            "or pass --routing FILE (routing.json of the relay config Secret)"
        )
        self.path = path
        self.reason = reason


def parse_age(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` as seconds; ValueError saying the format."""
    match = _AGE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an age: a number with s, m, h or d (e.g. 2h)")
    return float(int(match[1]) * _UNIT_SECONDS[match[2]])


def load_router(path: Path) -> Router:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RoutingUnavailableError(path, "no routing document") from None
    except OSError as e:
        raise RoutingUnavailableError(path, f"cannot read it ({e.strerror or e})") from e
    try:
        return Router(RoutingDocument.from_json(text))
    except RoutingDocumentError as e:
        raise RoutingUnavailableError(path, f"not a routing document ({e})") from e


@dataclass(frozen=True)
class Route:
    """Where one recipient goes if it is tried now."""

    connector: str
    """``namespace/name``, or :data:`DEFAULT_CONNECTOR`; empty when the address is invalid."""
    destination: str
    """The destination described, or why there is none (the recipient fails when tried)."""
    tls: str

    def describe(self) -> str:
        if not self.tls:
            return f"{self.connector or '-'}: {self.destination}"
        return f"{self.connector} -> {self.destination} (TLS {self.tls})"


def route_of(router: Router, sender: str, client: str, user: str | None, address: str) -> Route:
    who = None if not client and user is None else Client(client or None, user)
    try:
        decision = router.route_for(address, sender, who)
    except InvalidAddressError as e:
        return Route("", f"invalid address: {e.reason}", "")
    name = DEFAULT_CONNECTOR if decision.connector is None else str(decision.connector.ref)
    if decision.destination is None:
        return Route(name, "no route: fails at the next attempt", "")
    return Route(name, decision.destination.describe(), decision.tls.mode.value)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True)
class QueueFilter:
    connector: str | None = None
    domain: str | None = None
    sender: str | None = None
    older_than: float | None = None
    """Seconds since the message arrived."""

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.connector, self.domain, self.sender, self.older_than))

    def matches_message(self, sender: str, arrival: datetime, now: datetime) -> bool:
        if self.older_than is not None and (now - arrival).total_seconds() < self.older_than:
            return False
        if self.sender is None:
            return True
        wanted = self.sender.strip().lower()
        if wanted in ("<>", ""):
            return sender == ""
        if wanted.startswith("@"):
            return "@" in sender and _domain(sender) == wanted[1:]
        return sender.lower() == wanted

    def matches_recipient(self, address: str, route: Route | None) -> bool:
        if self.domain is not None and _domain(address) != self.domain.strip().lower():
            return False
        if self.connector is None:
            return True
        if route is None:
            return False
        wanted = self.connector.strip()
        return route.connector == wanted or route.connector.rpartition("/")[2] == wanted

    def describe(self) -> Sequence[str]:
        """The filters given, as options (for "nothing matched" messages)."""
        given = [
            ("--connector", self.connector),
            ("--domain", self.domain),
            ("--sender", self.sender),
            ("--older-than", None if self.older_than is None else f"{self.older_than:.0f}s"),
        ]
        return [f"{option} {value}" for option, value in given if value is not None]
