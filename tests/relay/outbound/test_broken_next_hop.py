"""A broken or hostile next hop: replies out of protocol never count as a delivery.

Each next hop is a raw socket server on loopback that follows SMTP until one chosen reply,
which it gets wrong: ``250`` (or another code) to ``DATA`` instead of ``354``, a reply line
without a valid code, a line over the client's limit, garbage after the end of data. The
relay's :class:`Deliverer` must never report such a transaction as delivered; a reply with
a valid code is treated by its class (4xx defers, 5xx fails), anything else is a protocol
error that defers, logged as a WARNING without a traceback, on a connection never reused.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.routing.document import SmartHost, TlsPolicy
from support import run

MESSAGE = b"From: a@sender.example\r\nTo: b@contoso.example\r\nSubject: hi\r\n\r\nHello.\r\n"
LONG_LINE = b"250 " + b"x" * 10_000 + b"\r\n"
"""Over aiosmtplib's 8,192-octet reply line limit (RFC 5321 4.5.3.1.5 allows 512)."""


@dataclass
class BrokenHop:
    """A next hop that answers ``at`` (a command verb, or ``"."`` for the end of data)
    with ``reply`` and is correct otherwise. It records whether content was received."""

    at: str
    reply: bytes
    connections: int = 0
    contents: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(b"220 broken.test ESMTP\r\n")
            while line := await asyncio.wait_for(reader.readline(), 10):
                verb = line.decode(errors="replace").strip().split(" ")[0].upper()
                if verb == self.at:
                    writer.write(self.reply)
                elif verb in ("EHLO", "HELO"):
                    writer.write(b"250-broken.test\r\n250 8BITMIME\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    content = bytearray()
                    while (chunk := await asyncio.wait_for(reader.readline(), 10)) not in (
                        b".\r\n",
                        b"",
                    ):
                        content += chunk
                    self.contents.append(bytes(content))
                    writer.write(self.reply if self.at == "." else b"250 2.0.0 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def deliverer() -> Deliverer:
    return Deliverer(
        DeliverySettings(helo_name="relay.test", connect_timeout=5, command_timeout=10),
        Resolver(["127.0.0.1"], port=9, timeout=1),  # never asked: the hop is an address
    )


async def deliver_to(hop: BrokenHop, engine: Deliverer | None = None) -> DeliveryReport:
    server = await asyncio.start_server(hop.handle, "127.0.0.1", 0)
    async with server:
        engine = engine or deliverer()
        try:
            return await engine.deliver(
                mail_from="a@sender.example",
                recipients=("b@contoso.example", "c@contoso.example"),
                data=MESSAGE,
                destination=SmartHost("127.0.0.1", server.sockets[0].getsockname()[1]),
                tls=TlsPolicy(),
                auth=None,
                recipient_domain="contoso.example",
            )
        finally:
            await engine.close()


PROTOCOL_ERRORS = {
    "data-250": ("DATA", b"250 2.0.0 ok, I guess\r\n"),
    "data-251": ("DATA", b"251 2.1.5 will forward\r\n"),
    "data-334": ("DATA", b"334 VXNlcm5hbWU6\r\n"),
    "data-garbage": ("DATA", b"hello there\r\n"),
    "data-short-code": ("DATA", b"25\r\n"),
    "data-out-of-range": ("DATA", b"699 six hundred\r\n"),
    "data-long-line": ("DATA", LONG_LINE),
    "end-of-data-garbage": (".", b"ok thanks\r\n"),
    "end-of-data-long-line": (".", LONG_LINE),
    "end-of-data-354": (".", b"354 more please\r\n"),
    "mail-garbage": ("MAIL", b"garbage\r\n"),
    "rcpt-garbage": ("RCPT", b"\x00\x01\x02\r\n"),
}


@pytest.mark.parametrize(("at", "reply"), PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_a_reply_out_of_protocol_defers_and_is_never_a_delivery(
    at: str, reply: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    hop = BrokenHop(at, reply)
    with caplog.at_level(logging.INFO):
        report = run(lambda: deliver_to(hop))
    assert [r.status for r in report.results] == [DeliveryStatus.DEFERRED] * 2
    assert {r.code for r in report.results} == {451}
    assert all("protocol error" in r.message for r in report.results), report.results
    if at == "DATA":
        assert hop.contents == []  # not one byte of content was sent
    # A WARNING that says what happened, and never an ERROR or a traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any(
        r.levelno == logging.WARNING and "protocol error" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (b"450 4.2.1 try later\r\n", DeliveryStatus.DEFERRED),
        (b"452 4.3.1 full\r\n", DeliveryStatus.DEFERRED),
        (b"554 5.5.1 no valid recipients\r\n", DeliveryStatus.FAILED),
    ],
    ids=["450", "452", "554"],
)
def test_a_refused_data_command_is_treated_by_its_class(
    reply: bytes, status: DeliveryStatus
) -> None:
    hop = BrokenHop("DATA", reply)
    report = run(lambda: deliver_to(hop))
    assert [r.status for r in report.results] == [status] * 2
    assert {r.code for r in report.results} == {int(reply[:3])}
    assert hop.contents == []


def test_a_connection_with_a_protocol_error_is_never_reused() -> None:
    async def scenario() -> tuple[list[DeliveryStatus], int]:
        hop = BrokenHop("DATA", b"250 2.0.0 ok\r\n")
        engine = Deliverer(
            DeliverySettings(helo_name="relay.test", connect_timeout=5, command_timeout=10),
            Resolver(["127.0.0.1"], port=9, timeout=1),
        )
        server = await asyncio.start_server(hop.handle, "127.0.0.1", 0)
        statuses = []
        async with server:
            port = server.sockets[0].getsockname()[1]
            for _ in range(2):
                report = await engine.deliver(
                    mail_from="a@sender.example",
                    recipients=("b@contoso.example",),
                    data=MESSAGE,
                    destination=SmartHost("127.0.0.1", port),
                    tls=TlsPolicy(),
                    auth=None,
                    recipient_domain="contoso.example",
                )
                statuses.append(report.results[0].status)
            await engine.close()
        return statuses, hop.connections

    statuses, connections = run(scenario)
    assert statuses == [DeliveryStatus.DEFERRED, DeliveryStatus.DEFERRED]
    assert connections == 2  # a fresh connection each time: the broken one was closed


def test_a_correct_hop_still_delivers() -> None:
    """The control: the same raw hop with nothing wrong delivers, content and all."""
    hop = BrokenHop("NONE", b"")
    report = run(lambda: deliver_to(hop))
    assert [r.status for r in report.results] == [DeliveryStatus.DELIVERED] * 2
    assert hop.contents == [MESSAGE]
