"""A hand-off keeps the message's age and client, and only a peer may say so.

Two relays in this process, real sockets: the leaving relay hands its queue to the peer
on stop (engine/handoff.py), with the X-Mailflow-Origin trace header (engine/origin.py).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib

from mailflow_relay.engine.origin import take_origin
from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.envelope import (
    BodyType,
    EnvelopeParameters,
    MailParameters,
    Notify,
    RecipientParameters,
    Ret,
)
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import (
    Connector,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.testing.sink import SmtpSink
from support import run, until

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def document(**routes: tuple[list[str], int]) -> RoutingDocument:
    return RoutingDocument(
        generation=1,
        connectors=tuple(
            Connector(
                ref=ObjectRef("mail", name),
                generation=1,
                created="",
                enabled=True,
                recipient_patterns=tuple(DomainPattern.parse(d) for d in domains),
                sender_patterns=(),
                destination=SmartHost("127.0.0.1", port),
                tls=TlsPolicy(),
            )
            for name, (domains, port) in routes.items()
        ),
    )


def settings(folder: Path, **overrides: Any) -> RelaySettings:
    base = RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1", port=0, hostname="relay.test", accept_from=(LOOPBACK,)
        ),
        spool_dir=folder / "spool",
        delivery=DeliverySettings(helo_name="relay.test", connect_timeout=2, command_timeout=5),
        retry_initial=30.0,
        scheduler_tick=0.05,
        drain_grace=0.5,
    )
    return replace(base, **overrides)


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run(), name="test-relay")
    await relay.ready.wait()
    try:
        yield relay
    finally:
        relay.stop()
        await task


async def send(port: int, body: bytes) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as c:
        await c.sendmail("alice@sender.test", ["bob@dest.test"], body)


def metric(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


BODY = b"From: alice@sender.test\r\nSubject: old news\r\n\r\nhello\r\n"


def test_a_handed_off_message_keeps_its_queue_lifetime_and_arrival_date(tmp_path: Path) -> None:
    dead = closed_port()

    async def scenario() -> tuple[datetime, datetime, bytes, float]:
        async with SmtpSink() as senders:
            # The peer bounces what is older than one second; its first attempt fails and
            # the next would be in 30 s, so only the age the message brings can bounce it.
            peer = Relay(
                settings(tmp_path / "peer", queue_lifetime=1.0, handoff_peers=(LOOPBACK,)),
                document(dest=(["dest.test"], dead), senders=(["sender.test"], senders.port)),
            )
            async with running(peer):
                leaving = Relay(
                    settings(tmp_path / "leaving", handoff=("127.0.0.1", peer.port)),
                    document(dest=(["dest.test"], dead)),
                )
                async with running(leaving):
                    await send(leaving.port, BODY)
                    (waiting,) = await until(lambda: leaving.spool.scan(repair=False))
                    await asyncio.sleep(1.5)  # the message ages on the leaving relay
                handed_at = datetime.now(UTC)
                (dsn,) = await until(lambda: senders.messages, within=15, what="the bounce")
            return (
                waiting.received,
                handed_at,
                dsn.data,
                metric(peer, "mailflow_handoff_origins_total", result="trusted"),
            )

    arrived, handed_at, dsn, trusted = run(scenario)
    assert trusted == 1.0
    text = dsn.decode()
    (line,) = [x for x in text.splitlines() if x.startswith("Arrival-Date: ")]
    arrival = email.utils.parsedate_to_datetime(line.removeprefix("Arrival-Date: "))
    # The arrival on the first relay, not the hand-off 1.5 s later.
    assert abs(arrival - arrived) < timedelta(seconds=1)
    assert handed_at - arrival > timedelta(seconds=1)
    assert "Action: failed" in text
    assert "X-Mailflow-Origin" not in text


def test_an_origin_header_from_a_client_that_is_not_a_peer_is_removed_unread(
    tmp_path: Path,
) -> None:
    forged = (
        b"X-Mailflow-Origin: arrival=2000-01-01T00:00:00+00:00; client=192.0.2.25; user=-\r\n"
        + BODY
    )

    async def scenario() -> tuple[bytes, float, float]:
        async with SmtpSink() as destination:
            relay = Relay(
                settings(tmp_path, queue_lifetime=60.0),  # no handoff_peers: nobody trusted
                document(dest=(["dest.test"], destination.port)),
            )
            async with running(relay):
                await send(relay.port, forged)
                (message,) = await until(lambda: destination.messages, what="the delivery")
            return (
                message.data,
                metric(relay, "mailflow_handoff_origins_total", result="ignored"),
                metric(relay, "mailflow_handoff_origins_total", result="trusted"),
            )

    data, ignored, trusted = run(scenario)
    # Delivered (a trusted year-2000 arrival would have bounced it), without the header.
    assert b"X-Mailflow-Origin" not in data
    assert b"Subject: old news" in data
    assert (ignored, trusted) == (1.0, 0.0)


def test_only_the_first_origin_line_from_a_peer_counts_and_every_copy_is_removed() -> None:
    top = b"X-Mailflow-Origin: arrival=2026-01-02T03:04:05+00:00; client=192.0.2.25; user=c%40x\r\n"
    smuggled = b"x-mailflow-origin: arrival=2000-01-01T00:00:00+00:00;\r\n client=10.9.9.9\r\n"
    data = (
        top + b"Received: from a\r\n" + smuggled + b"Subject: s\r\n\r\nX-Mailflow-Origin: body\r\n"
    )
    stripped, origin = take_origin(data, "127.0.0.1", [LOOPBACK])
    assert stripped == b"Received: from a\r\nSubject: s\r\n\r\nX-Mailflow-Origin: body\r\n"
    assert origin is not None
    assert origin.arrival == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (origin.client, origin.user) == ("192.0.2.25", "c@x")
    # Not first: removed, not honoured.
    stripped, origin = take_origin(
        b"Subject: s\r\n" + top + b"\r\nbody\r\n", "127.0.0.1", [LOOPBACK]
    )
    assert origin is None
    assert stripped == b"Subject: s\r\n\r\nbody\r\n"
    # Not a peer: removed, not honoured.
    assert take_origin(data, "10.0.0.1", [LOOPBACK])[1] is None


def test_a_handed_off_message_keeps_its_client_for_a_client_scoped_route(tmp_path: Path) -> None:
    from mailflow_relay.routing.document import ClientScope, DefaultAction, DefaultRoute

    compliance = "127.0.0.2"
    dead = closed_port()

    def scoped(port: int) -> RoutingDocument:
        # Only mail from the compliance server has a route; the default route rejects.
        plain = document(dest=(["dest.test"], port))
        (connector,) = plain.connectors
        scope = ClientScope((ipaddress.ip_network(f"{compliance}/32"),))
        return RoutingDocument(
            generation=1,
            connectors=(replace(connector, clients=scope),),
            default_route=DefaultRoute(DefaultAction.REJECT),
        )

    async def scenario() -> tuple[int, str]:
        async with SmtpSink() as destination:
            peer = Relay(
                settings(tmp_path / "peer", handoff_peers=(LOOPBACK,)), scoped(destination.port)
            )
            async with running(peer):
                leaving = Relay(
                    settings(tmp_path / "leaving", handoff=("127.0.0.1", peer.port)), scoped(dead)
                )
                async with running(leaving):
                    async with aiosmtplib.SMTP(
                        hostname="127.0.0.1",
                        port=leaving.port,
                        source_address=(compliance, 0),
                        start_tls=False,
                        timeout=10,
                    ) as client:
                        await client.sendmail("alice@sender.test", ["bob@dest.test"], BODY)
                    await until(lambda: leaving.spool.scan(repair=False))
                # Handed off from 127.0.0.1, yet routed as the compliance server's mail.
                (message,) = await until(lambda: destination.messages, what="the delivery")
            return len(destination.messages), message.mail_from

    count, sender = run(scenario)
    assert (count, sender) == (1, "alice@sender.test")


def test_a_handed_off_message_keeps_every_esmtp_parameter_its_sender_gave(tmp_path: Path) -> None:
    """SMTPUTF8, BODY, RET, ENVID, NOTIFY, ORCPT as ESMTP parameters, REQUIRETLS (which a
    plaintext hand-off cannot carry as one) in the origin header."""
    dead = closed_port()

    async def scenario() -> EnvelopeParameters:
        peer = Relay(
            settings(tmp_path / "peer", handoff_peers=(LOOPBACK,)),
            document(dest=(["*"], dead)),
        )
        async with running(peer):
            leaving = Relay(
                settings(tmp_path / "leaving", handoff=("127.0.0.1", peer.port)),
                document(dest=(["*"], dead)),
            )
            async with running(leaving):
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=leaving.port,
                    start_tls=True,
                    validate_certs=False,
                    timeout=10,
                ) as smtp:
                    await smtp.mail(
                        "jürgen@sender.test",
                        options=[
                            "SMTPUTF8",
                            "BODY=8BITMIME",
                            "RET=HDRS",
                            "ENVID=e+2B1",
                            "REQUIRETLS",
                        ],
                        encoding="utf-8",
                    )
                    await smtp.rcpt(
                        "zoë@dest.test",
                        options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;zoe+40old.test"],
                        encoding="utf-8",
                    )
                    await smtp.rcpt("carl@dest.test", encoding="utf-8")
                    await smtp.data("Subject: Grüße\r\n\r\nhallo\r\n".encode())
                await until(lambda: leaving.spool.scan(repair=False))
            (taken,) = await until(lambda: peer.spool.scan(repair=False), what="the hand-off")
            return taken.parameters

    parameters = run(scenario)
    assert parameters == EnvelopeParameters(
        MailParameters(
            body=BodyType.EIGHT_BIT_MIME, smtputf8=True, ret=Ret.HDRS, envid="e+1", requiretls=True
        ),
        (
            (
                "zoë@dest.test",
                RecipientParameters(
                    frozenset({Notify.FAILURE, Notify.DELAY}), ("rfc822", "zoe@old.test")
                ),
            ),
        ),
    )
