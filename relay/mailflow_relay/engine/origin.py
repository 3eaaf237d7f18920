"""A message's origin across a hand-off: when it arrived and who submitted it.

A draining relay hands its queue to a peer over SMTP (:mod:`.handoff`). To the peer that
is a new message: without more, its queue lifetime starts again (a message deferred for
four days gets five more), the DSN's ``Arrival-Date`` is the hand-off's, and the client
scope (``spec.clients``) sees the draining relay instead of the compliance server.

So the hand-off prepends one trace header, the way ``Received:`` carries trace data::

    X-Mailflow-Origin: arrival=2026-12-01T21:04:05.123456+00:00; client=192.0.2.25; user=-

(with ``; requiretls=yes`` for a message submitted with REQUIRETLS: the hand-off is
plaintext, where a peer does not take the ESMTP parameter, and the flag must not be lost)

and the receiving relay honours it **only from its peers** (``RelaySettings.handoff_peers``,
the relays' own network): anyone else could claim an old arrival (to have mail bounce at
once) or the compliance server's address (to skip compliance). From everyone the header
is removed before the message is stored, so it never leaves the fleet and a later relay
cannot be fooled by a copy that went out and came back. A header rather than an ESMTP
parameter because aiosmtplib, aiosmtpd and the spool all carry a message's headers
unchanged, and the hand-off needs nothing from the peer's EHLO.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mailflow_relay.inbound.settings import IPNetwork
from mailflow_relay.queue.spool import SpooledMessage

__all__ = ["ORIGIN_HEADER", "Origin", "is_peer", "origin_header", "take_origin"]

ORIGIN_HEADER = b"X-Mailflow-Origin"
_FIELD = re.compile(rb"(?i)x-mailflow-origin[ \t]*:")


@dataclass(frozen=True)
class Origin:
    arrival: datetime
    client: str
    """"" when unknown (a bounce the first relay wrote)."""
    user: str | None
    requiretls: bool = False
    """The sender asked for REQUIRETLS (RFC 8689)."""


def origin_header(message: SpooledMessage) -> bytes:
    """The header line a hand-off prepends to ``message``'s body."""
    user = "-" if message.user is None else urllib.parse.quote(message.user, safe="")
    client = message.client or "-"
    return (
        ORIGIN_HEADER
        + f": arrival={message.arrival.isoformat()}; client={client}; user={user}".encode()
        + (b"; requiretls=yes" if message.parameters.mail.requiretls else b"")
        + b"\r\n"
    )


def take_origin(
    data: bytes, client: str, peers: Sequence[IPNetwork]
) -> tuple[bytes, Origin | None]:
    """``data`` without any origin header, and the origin if the client is a peer.

    Only the first header line of the header section counts (the one the hand-off put
    there); more of them, or one from a client that is not a peer, are removed unread.
    """
    end = data.find(b"\r\n\r\n")
    header_end = len(data) if end < 0 else end + 2
    lines = data[:header_end].split(b"\r\n")
    kept: list[bytes] = []
    found: list[bytes] = []
    skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue  # a folded continuation of a removed field
        skipping = _FIELD.match(line) is not None
        (found if skipping else kept).append(line)
    if not found:
        return data, None
    stripped = b"\r\n".join(kept) + data[header_end:]
    origin = _parse(found[0]) if lines and found[0] == lines[0] and is_peer(client, peers) else None
    return stripped, origin


def is_peer(client: str, peers: Sequence[IPNetwork]) -> bool:
    """Whether ``client`` (an address as text) is in one of the peer relays' networks."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in network for network in peers)


def _parse(line: bytes) -> Origin | None:
    _, _, value = line.decode("ascii", "replace").partition(":")
    fields = dict(part.strip().partition("=")[::2] for part in value.split(";") if "=" in part)
    try:
        arrival = datetime.fromisoformat(fields["arrival"])
    except (KeyError, ValueError):
        return None
    if arrival.tzinfo is None:
        return None
    client = fields.get("client", "-")
    user = fields.get("user", "-")
    return Origin(
        arrival=arrival,
        client="" if client == "-" else client,
        user=None if user == "-" else urllib.parse.unquote(user),
        requiretls=fields.get("requiretls") == "yes",
    )
