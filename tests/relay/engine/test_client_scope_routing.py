"""A client-scoped connector in the running relay: at RCPT and at delivery, by the client.

The compliance server hands mail back from its own address; the relay must route it by
that address at RCPT (the default route may reject) and later, from the spool, at delivery.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import aiosmtplib

from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import (
    ClientScope,
    Connector,
    DefaultAction,
    DefaultRoute,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.testing.sink import SmtpSink
from support import run, until

COMPLIANCE = "127.0.0.2"


def test_only_the_scoped_client_gets_the_route_at_rcpt_and_at_delivery(tmp_path: Path) -> None:
    async def scenario() -> tuple[aiosmtplib.SMTPResponse, int]:
        async with SmtpSink() as internet:
            scoped = Connector(
                ref=ObjectRef("mail", "direct-after-compliance"),
                generation=1,
                created="",
                enabled=True,
                recipient_patterns=(DomainPattern.parse("*"),),
                sender_patterns=(),
                destination=SmartHost("127.0.0.1", internet.port),
                tls=TlsPolicy(),
                clients=ClientScope((ipaddress.ip_network(f"{COMPLIANCE}/32"),)),
            )
            document = RoutingDocument(
                generation=1,
                connectors=(scoped,),
                default_route=DefaultRoute(DefaultAction.REJECT),
            )
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
            relay = Relay(settings, document)
            task = asyncio.create_task(relay.run(), name="test-relay")
            await relay.ready.wait()
            try:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
                ) as host:
                    await host.mail("a@contoso.com")
                    refused = await host.execute_command(b"RCPT", b"TO:<b@example.org>")
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=relay.port,
                    source_address=(COMPLIANCE, 0),
                    start_tls=False,
                    timeout=10,
                ) as compliance:
                    await compliance.sendmail(
                        "a@contoso.com", ["b@example.org"], b"Subject: s\r\n\r\nx\r\n"
                    )
                await until(lambda: internet.messages, what="the delivery")
            finally:
                relay.stop()
                await task
            return refused, len(internet.messages)

    refused, delivered = run(scenario)
    # From a mail host (127.0.0.1) nothing routes it and the default route rejects...
    assert refused.code == 550
    assert "No route" in refused.message
    # ...from the compliance server's address the scoped connector takes it.
    assert delivered == 1
