"""DNS faults on the way to the recipient's MX: temporary ones defer, permanent ones bounce.

NSD serves the zones on loopback (a zone that answers SERVFAIL included); a port that
never answers stands for a resolver that times out. The relay delivers to the recipient's
MX; bounces for the sender's domain go to a sink of their own.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from faults import connector, document, need_tool, relay_settings, running, send, summary
from mailflow_relay.engine.relay import Relay
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.queue.spool import RecipientStatus, SpooledMessage
from mailflow_relay.routing.document import RecipientMx
from mailflow_relay.testing.sink import SmtpSink
from peers import DnsServer, UnresponsiveDnsServer
from support import run, until

ZONES = {
    "good.test": ["@ MX 10 mx.good.test.", "mx A 127.0.0.1"],
    "nullmx.test": ["@ MX 0 ."],
}


def mx_relay(tmp_path: Path, dns_port: int, mx_port: int, bounce_port: int) -> Relay:
    return Relay(
        relay_settings(
            tmp_path / "spool",
            dns_servers=("127.0.0.1",),
            dns_port=dns_port,
            delivery=DeliverySettings(
                helo_name="relay.test", mx_port=mx_port, connect_timeout=2, command_timeout=5
            ),
        ),
        document(
            connector("bounces", ["sender.test"], bounce_port),
            connector("mx", ["*"], 0, destination=RecipientMx()),
        ),
    )


def test_servfail_defers_while_nxdomain_and_null_mx_bounce(tmp_path: Path) -> None:
    need_tool("nsd")

    async def scenario() -> tuple[int, list[bytes], SpooledMessage, float]:
        started = time.monotonic()
        with DnsServer(ZONES, servfail=["broken.test"]) as dns:
            async with SmtpSink() as mx, SmtpSink() as bounces:
                relay = mx_relay(tmp_path, dns.port, mx.port, bounces.port)
                async with running(relay):
                    await send(
                        relay.port,
                        ["a@good.test", "b@nullmx.test", "c@nosuch.good.test", "d@broken.test"],
                    )
                    await until(lambda: mx.messages and bounces.messages, what="mail and bounce")
                    await asyncio.sleep(1.5)  # retries of d@broken.test
                    (message,) = relay.spool.scan()
                return (
                    len(mx.messages),
                    [m.data for m in bounces.messages],
                    message,
                    time.monotonic() - started,
                )

    delivered, bounced, message, seconds = run(scenario, within=60)
    summary("dns servfail/nxdomain/null-mx", messages=1, recipients=4, seconds=f"{seconds:.1f}")
    assert delivered == 1
    assert len(bounced) == 1  # one report for the two permanent failures
    assert b"b@nullmx.test" in bounced[0]
    assert b"c@nosuch.good.test" in bounced[0]
    assert b"d@broken.test" not in bounced[0]
    states = {r.address: r for r in message.recipients}
    assert states["a@good.test"].status is RecipientStatus.DELIVERED
    assert states["b@nullmx.test"].last_reply_code == 556
    assert states["c@nosuch.good.test"].status is RecipientStatus.FAILED
    broken = states["d@broken.test"]
    assert broken.status is RecipientStatus.DEFERRED
    assert broken.attempts >= 2


def test_a_dns_timeout_defers_and_never_bounces(tmp_path: Path) -> None:
    async def scenario() -> tuple[SpooledMessage, int, float]:
        started = time.monotonic()
        with UnresponsiveDnsServer() as dns:
            async with SmtpSink() as mx, SmtpSink() as bounces:
                relay = mx_relay(tmp_path, dns.port, mx.port, bounces.port)
                async with running(relay):
                    await send(relay.port, ["x@timeout.test"])
                    await until(
                        lambda: relay.spool.scan()[0].recipients[0].attempts >= 1,
                        within=30,
                        what="the first attempt recorded",
                    )
                    (message,) = relay.spool.scan()
                return message, len(bounces.messages) + len(mx.messages), time.monotonic() - started

    message, sent, seconds = run(scenario, within=60)
    summary("dns timeout", messages=1, seconds=f"{seconds:.1f}")
    (state,) = message.recipients
    assert state.status is RecipientStatus.DEFERRED
    assert state.last_reply_code is not None
    assert 400 <= state.last_reply_code < 500
    assert sent == 0
