"""Loop detection: count the message's ``Received:`` headers, as every MTA does.

A connector that points back at the relay (or two relays that point at each other) would
pass one message round for ever, one ``Received:`` header longer each time (RFC 5321
6.3: "a simple and effective way of detecting loops ... is to count the number of
Received: header fields"). Postfix bounces past ``hopcount_limit = 50``; so does this
relay: a message whose headers, with the ``Received:`` this relay would add, hold more
than :attr:`ListenerSettings.max_hops` of them is refused at the end of DATA with
``554 5.4.6`` (RFC 3463: routing loop detected). The client — in a loop, this very relay's
delivery side — takes the 5xx as final and bounces the message to its sender with 5.4.6.
Only the header section counts: a forwarded message in the body is not a hop.
"""

from __future__ import annotations

__all__ = ["count_hops", "hop_refusal"]

LOOP_REPLY = "554 5.4.6 Too many hops ({hops} Received: headers, limit {limit}): mail loop?"


def count_hops(data: bytes) -> int:
    """``Received:`` header fields in the header section of ``data`` (CRLF line ends)."""
    end = data.find(b"\r\n\r\n")
    headers = data if end < 0 else data[: end + 2]
    if data.startswith(b"\r\n"):
        return 0  # no header section at all
    return sum(1 for line in headers.split(b"\r\n") if line[:9].lower() == b"received:")


def hop_refusal(data: bytes, limit: int) -> str | None:
    """The reply that refuses ``data`` as looping, or None; counts the header we add."""
    hops = count_hops(data) + 1
    if hops > limit:
        return LOOP_REPLY.format(hops=hops, limit=limit)
    return None
