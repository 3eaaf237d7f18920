"""What waits in the spool, by the route it takes now, and why deliveries are deferred.

The gauges answer "what is stuck where" without reading logs: ``mailflow_queue_depth`` and
``mailflow_queue_oldest_age_seconds`` by connector and destination, ``mailflow_queue_held``
(recipients on hold), and ``mailflow_deferrals_total`` by reason class.

Labels stay bounded by the configuration, never by the traffic or a pool's current
members: the connector is its ``namespace/name``, the destination a stable name (a smart
host's ``host:port``, a profile's ``profile:namespace/name``, ``recipient-mx``), and the
reason class comes from a closed set (:data:`REASON_CLASSES`), never from reply text.

Routes are decided when a message's states change and again when a routing document comes
into force, not at every scrape: routing a large queue each second would cost more than
the deliveries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from prometheus_client import Gauge

from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.queue.spool import SpooledMessage
from mailflow_relay.routing.document import Destination, ProfilePool, RecipientMx, SmartHost
from mailflow_relay.routing.router import Client, Router

__all__ = ["REASON_CLASSES", "QueueView", "destination_label", "reason_class"]

DEFAULT_ROUTE_LABEL: Final = "(default route)"
"""The connector label of the default route (as the delivery counters name it)."""

_ENHANCED: Final = re.compile(r"\b4\.([0-9]{1,3})\.([0-9]{1,3})\b")
_NETWORK: Final = {"0": "connection", "1": "connection", "2": "connection", "3": "dns", "4": "dns"}
"""X.4.Y (network and routing, RFC 3463) in detail: where most deferrals come from."""
_BY_SUBJECT: Final = {
    "1": "address",
    "2": "mailbox",
    "3": "system",
    "4": "network",
    "5": "protocol",
    "6": "content",
    "7": "security",
}
_SPECIAL: Final = {
    "3.0": "internal",  # this relay's own error (internal error, the bounce not spooled)
    "3.5": "connector_not_ready",
    "7.5": "tls",
}
REASON_CLASSES: Final = frozenset(
    {*_NETWORK.values(), *_BY_SUBJECT.values(), *_SPECIAL.values(), "remote_reply"}
)
"""Every value ``mailflow_deferrals_total{reason_class}`` can take."""


def reason_class(reason: str) -> str:
    """The class of a deferral from its enhanced status code (RFC 3463), if any: this
    relay's own reasons always carry one, a next hop's reply may not (``remote_reply``)."""
    match = _ENHANCED.search(reason)
    if match is None:
        return "remote_reply"
    subject, detail = match[1], match[2]
    special = _SPECIAL.get(f"{subject}.{detail}")
    if special is not None:
        return special
    if subject == "4":
        return _NETWORK.get(detail, "network")
    return _BY_SUBJECT.get(subject, "remote_reply")


def destination_label(destination: Destination | None) -> str:
    """A destination's stable name: the same whatever servers a pool has right now."""
    if isinstance(destination, SmartHost):
        return (
            f"mx:{destination.host}" if destination.mx else f"{destination.host}:{destination.port}"
        )
    if isinstance(destination, ProfilePool):
        return f"profile:{destination.profile}"
    if isinstance(destination, RecipientMx):
        return "recipient-mx"
    return "none"


@dataclass(frozen=True)
class _Entry:
    arrival: datetime
    routes: tuple[tuple[str, str], ...]
    """(connector, destination) of each recipient still to deliver, not on hold."""
    held: int
    message: SpooledMessage = field(repr=False, compare=False)


@dataclass
class QueueView:
    """The spool's pending recipients by route, for the gauges (one per relay)."""

    depth: Gauge
    oldest: Gauge
    held: Gauge
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def track(self, message: SpooledMessage, router: Router) -> None:
        """Record where ``message``'s recipients go now (after any change of their states)."""
        if message.is_final:
            self._entries.pop(message.queue_id, None)
            return
        # Only the envelope is kept: the body is not needed to route again.
        envelope = SpooledMessage(
            queue_id=message.queue_id,
            sender=message.sender,
            recipients=message.recipients,
            received=message.received,
            size=message.size,
            body=b"",
            client=message.client,
            user=message.user,
            arrived=message.arrived,
        )
        self._entries[message.queue_id] = _Entry(
            arrival=message.arrival,
            routes=_routes(envelope, router),
            held=sum(1 for r in message.pending if r.held),
            message=envelope,
        )

    def reroute(self, router: Router) -> None:
        """A new routing document: every waiting recipient's route again."""
        for entry in list(self._entries.values()):
            self.track(entry.message, router)

    def publish(self, queued: dict[str, datetime], now: datetime) -> None:
        """Set the gauges; messages no longer ``queued`` (delivered, removed) are dropped."""
        for queue_id in [q for q in self._entries if q not in queued]:
            del self._entries[queue_id]
        depth: dict[tuple[str, str], int] = {}
        oldest: dict[tuple[str, str], datetime] = {}
        for entry in self._entries.values():
            for route in entry.routes:
                depth[route] = depth.get(route, 0) + 1
                if route not in oldest or entry.arrival < oldest[route]:
                    oldest[route] = entry.arrival
        # Cleared first: a route nothing waits for any more disappears instead of staying at
        # its last value. The scrape runs on the same event loop, so it never sees the gap.
        self.depth.clear()
        self.oldest.clear()
        for route, count in depth.items():
            self.depth.labels(*route).set(count)
            self.oldest.labels(*route).set(max(0.0, (now - oldest[route]).total_seconds()))
        self.held.set(sum(entry.held for entry in self._entries.values()))


def _routes(message: SpooledMessage, router: Router) -> tuple[tuple[str, str], ...]:
    client = (
        None
        if not message.client and message.user is None
        else Client(message.client or None, message.user)
    )
    routes = []
    for state in message.pending:
        if state.held:
            continue
        try:
            decision = router.route_for(state.address, message.sender, client)
        except InvalidAddressError:
            routes.append((DEFAULT_ROUTE_LABEL, "none"))
            continue
        name = DEFAULT_ROUTE_LABEL if decision.connector is None else str(decision.connector.ref)
        routes.append((name, destination_label(decision.destination)))
    return tuple(routes)
