"""Routing decided once per recipient: at RCPT, at DATA (DKIM) and at delivery, one decision
per routing document; a new document decides again."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from pathlib import Path

import aiosmtplib
import pytest

from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import (
    Connector,
    DefaultAction,
    DefaultRoute,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.routing.memo import DecisionMemo
from mailflow_relay.routing.router import Client, Router
from mailflow_relay.testing.sink import SmtpSink
from support import run, until


def document(port: int, generation: int = 1) -> RoutingDocument:
    connector = Connector(
        ref=ObjectRef("mail", "contoso"),
        generation=generation,
        created="",
        enabled=True,
        recipient_patterns=(DomainPattern.parse("contoso.com"),),
        sender_patterns=(),
        destination=SmartHost("127.0.0.1", port),
        tls=TlsPolicy(),
    )
    return RoutingDocument(
        generation=generation,
        connectors=(connector,),
        default_route=DefaultRoute(DefaultAction.REJECT),
    )


def test_the_same_question_gets_the_decision_already_made() -> None:
    router = Router(document(25))
    client = Client("127.0.0.1", None)
    first = router.route_for("b@contoso.com", "a@fabrikam.com", client)
    assert router.route_for("b@contoso.com", "a@fabrikam.com", client) is first
    # Another sender, client or recipient is another question.
    assert router.route_for("b@contoso.com", "a@fabrikam.com", None) is not first
    assert router.route_for("c@contoso.com", "a@fabrikam.com", client) is not first
    assert (router.decisions.hits, router.decisions.misses) == (1, 3)
    # A new document is a new Router: nothing is carried over.
    assert Router(document(25, 2)).route_for("b@contoso.com", "a@fabrikam.com", client) != first


def test_the_memo_is_bounded_and_forgets_the_oldest_first() -> None:
    memo: DecisionMemo[str, int] = DecisionMemo(limit=2)
    assert [memo.get(k, functools.partial(len, k)) for k in ("a", "bb", "ccc")] == [1, 2, 3]
    assert len(memo) == 2
    assert memo.get("a", lambda: 99) == 99  # forgotten, decided again
    assert memo.get("ccc", lambda: 0) == 3
    with pytest.raises(ValueError, match="at least 1"):
        DecisionMemo(limit=0)


def test_a_malformed_address_is_not_remembered() -> None:
    router = Router(document(25))
    for _ in range(2):
        with pytest.raises(InvalidAddressError):
            router.route_for("no-at-sign", "a@fabrikam.com")
    assert len(router.decisions) == 0


def test_the_relay_routes_a_recipient_once_from_rcpt_to_delivery(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int, int]:
        async with SmtpSink() as destination:
            settings = RelaySettings(
                listener=ListenerSettings(
                    host="127.0.0.1",
                    port=0,
                    hostname="relay.test",
                    accept_from=(ipaddress.ip_network("127.0.0.0/8"),),
                ),
                spool_dir=tmp_path / "spool",
                delivery=DeliverySettings(helo_name="relay.test", connect_timeout=2),
                scheduler_tick=0.05,
                drain_grace=0.5,
            )
            relay = Relay(settings, document(destination.port))
            task = asyncio.create_task(relay.run(), name="test-relay")
            await relay.ready.wait()
            try:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
                ) as client:
                    await client.sendmail(
                        "a@fabrikam.com",
                        ["b@contoso.com", "c@contoso.com"],
                        b"Subject: s\r\n\r\nx\r\n",
                    )
                await until(lambda: destination.messages, what="the delivery")
            finally:
                relay.stop()
                await task
            memo = relay.router.decisions
            return memo.misses, memo.hits, len(destination.messages)

    misses, hits, delivered = run(scenario)
    assert delivered == 1
    # Two recipients decided once each at RCPT; DATA (DKIM), delivery and the queue gauges
    # (which route each waiting recipient to label it) reuse both.
    assert misses == 2
    assert hits >= 4
