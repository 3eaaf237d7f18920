"""Counting hops: only ``Received:`` fields of the header section count (inbound/hops.py)."""

from __future__ import annotations

from mailflow_relay.inbound.hops import count_hops, hop_refusal


def message(hops: int, body: bytes = b"x\r\n") -> bytes:
    received = b"".join(
        b"Received: from a by b; Mon, 1 Dec 2026 00:00:00 +0000\r\n" for _ in range(hops)
    )
    return received + b"Subject: s\r\n\r\n" + body


def test_received_fields_of_the_header_section_are_counted_in_any_case() -> None:
    assert count_hops(message(3)) == 3
    assert count_hops(b"RECEIVED: x\r\nreceived: y\r\nSubject: s\r\n\r\nbody\r\n") == 2
    assert count_hops(b"Subject: no hops\r\n\r\n") == 0


def test_a_forwarded_message_in_the_body_is_not_a_hop() -> None:
    assert count_hops(message(1, body=b"Received: from inner\r\nReceived: again\r\n")) == 1
    assert count_hops(b"\r\nReceived: only in a body\r\n") == 0


def test_the_limit_counts_the_header_this_relay_adds_like_postfix() -> None:
    assert hop_refusal(message(49), 50) is None  # 50 with ours: at the limit, accepted
    refusal = hop_refusal(message(50), 50)
    assert refusal is not None
    assert refusal.startswith("554 5.4.6 ")
