"""RFC 2920 edge cases Postfix does not produce, against a scripted next hop on loopback.

The hop offers PIPELINING and answers each command line with the reply the test chose:
``354`` to DATA although every RCPT was refused (the client must send a lone dot, never
the content), replies split across TCP segments or all in one, garbage in the middle of
the group (a protocol error, never a delivery), a hop that hangs up mid-group.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mailflow_relay.envelope import (
    BodyType,
    EnvelopeParameters,
    MailParameters,
    Notify,
    RecipientParameters,
)
from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.outbound.pipelining import dot_stuffed
from mailflow_relay.routing.document import SmartHost, TlsPolicy
from support import run

MESSAGE = b"Subject: hi\r\n\r\n.dot\r\nHello.\r\n"
Reply = Callable[[str], bytes | None]


@dataclass
class ScriptedHop:
    """Answers with ``reply(line)``; None closes the connection. Records what it read."""

    reply: Reply
    split_replies: bool = False
    """Send each reply in its own segment (with a pause) instead of all at once."""
    lines: list[str] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 scripted.test ESMTP\r\n")
            in_data = False
            content = bytearray()
            while line := await asyncio.wait_for(reader.readline(), 10):
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        self.contents.append(bytes(content))
                        writer.write(b"250 2.0.0 queued\r\n")
                    else:
                        content += line
                    continue
                text = line.decode().strip()
                self.lines.append(text)
                verb = text.split(" ")[0].upper()
                if verb == "EHLO":
                    writer.write(
                        b"250-scripted.test\r\n250-PIPELINING\r\n250-DSN\r\n250 8BITMIME\r\n"
                    )
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    answer = self.reply(text)
                    if answer is None:
                        return
                    writer.write(answer)
                    if answer.startswith(b"354"):
                        in_data, content = True, bytearray()
                if self.split_replies:
                    await writer.drain()
                    await asyncio.sleep(0.01)
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


def standard(refuse: frozenset[str] = frozenset(), data: bytes = b"354 go ahead\r\n") -> Reply:
    def reply(line: str) -> bytes | None:
        verb = line.split(" ")[0].upper()
        if verb == "RCPT":
            address = line.split("<")[1].split(">")[0]
            return b"550 5.1.1 no such user\r\n" if address in refuse else b"250 2.1.5 ok\r\n"
        if verb == "DATA":
            return data
        return b"250 2.0.0 ok\r\n"

    return reply


def deliver(
    hop: ScriptedHop, recipients: tuple[str, ...], command_timeout: float = 5
) -> DeliveryReport:
    async def scenario() -> DeliveryReport:
        server = await asyncio.start_server(hop.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        engine = Deliverer(
            DeliverySettings(
                helo_name="relay.test", connect_timeout=5, command_timeout=command_timeout
            ),
            Resolver(["127.0.0.1"], port=9, timeout=1),
        )
        try:
            return await engine.deliver(
                mail_from="a@sender.example",
                recipients=recipients,
                data=MESSAGE,
                destination=SmartHost("127.0.0.1", port),
                tls=TlsPolicy(),
                auth=None,
                recipient_domain="contoso.example",
                parameters=EnvelopeParameters(
                    MailParameters(body=BodyType.EIGHT_BIT_MIME),
                    ((recipients[0], RecipientParameters(notify=frozenset({Notify.FAILURE}))),),
                ),
            )
        finally:
            await engine.close()
            server.close()
            await server.wait_closed()

    return run(scenario)


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "split-segments"])
def test_replies_are_read_in_order_however_they_arrive(split: bool) -> None:
    hop = ScriptedHop(standard(frozenset({"x@contoso.example"})), split_replies=split)
    report = deliver(hop, ("a@contoso.example", "x@contoso.example", "b@contoso.example"))
    assert [(r.status, r.code) for r in report.results] == [
        (DeliveryStatus.DELIVERED, 250),
        (DeliveryStatus.FAILED, 550),
        (DeliveryStatus.DELIVERED, 250),
    ]
    assert hop.lines[1:5] == [
        "MAIL FROM:<a@sender.example> BODY=8BITMIME",
        # ORCPT added for the sender (extensions.py): the hop offers DSN.
        "RCPT TO:<a@contoso.example> NOTIFY=FAILURE ORCPT=rfc822;a@contoso.example",
        "RCPT TO:<x@contoso.example> ORCPT=rfc822;x@contoso.example",
        "RCPT TO:<b@contoso.example> ORCPT=rfc822;b@contoso.example",
    ]
    # On the wire (the hop does not unstuff): the leading dot doubled, as aiosmtplib does.
    assert hop.contents == [b"Subject: hi\r\n\r\n..dot\r\nHello.\r\n"]
    assert dot_stuffed(b"a\n.b") == b"a\r\n..b\r\n.\r\n"


def test_a_354_after_every_rcpt_was_refused_gets_a_lone_dot_never_the_content() -> None:
    hop = ScriptedHop(standard(frozenset({"x@contoso.example", "y@contoso.example"})))
    report = deliver(hop, ("x@contoso.example", "y@contoso.example"))
    assert [(r.status, r.code) for r in report.results] == [(DeliveryStatus.FAILED, 550)] * 2
    assert hop.contents == [b""]  # the empty message: nothing of the content
    assert "RSET" in hop.lines


def test_garbage_in_the_group_is_a_protocol_error_never_a_delivery() -> None:
    def reply(line: str) -> bytes | None:
        if line.startswith("RCPT TO:<b@"):
            return b"garbage\r\n"
        return standard()(line)

    hop = ScriptedHop(reply)
    report = deliver(hop, ("a@contoso.example", "b@contoso.example"))
    assert [r.status for r in report.results] == [DeliveryStatus.DEFERRED] * 2
    assert report.protocol_errors == 1
    assert "4.5.0 protocol error: the reply to RCPT TO" in report.results[0].message
    assert hop.contents == []


def test_a_hop_that_hangs_up_mid_group_defers_every_recipient() -> None:
    def reply(line: str) -> bytes | None:
        return None if line.startswith("RCPT TO:<b@") else standard()(line)

    hop = ScriptedHop(reply)
    report = deliver(hop, ("a@contoso.example", "b@contoso.example"))
    assert [r.status for r in report.results] == [DeliveryStatus.DEFERRED] * 2
    assert report.results[0].message.startswith("4.4.2 connection lost"), report.results[0].message
    assert hop.contents == []


def test_a_250_to_data_is_a_protocol_error_and_no_content_is_sent() -> None:
    hop = ScriptedHop(standard(data=b"250 2.0.0 ok\r\n"))
    report = deliver(hop, ("a@contoso.example",))
    assert [r.status for r in report.results] == [DeliveryStatus.DEFERRED]
    assert report.protocol_errors == 1
    assert hop.contents == []


def test_a_hop_silent_after_the_group_defers_within_the_command_timeout() -> None:
    # MAIL is answered, then nothing: the RCPT reply is waited for command_timeout, no more.
    def reply(line: str) -> bytes | None:
        return b"250 2.1.0 ok\r\n" if line.upper().startswith("MAIL") else b""

    hop = ScriptedHop(reply)
    started = time.monotonic()
    report = deliver(hop, ("a@contoso.example",), command_timeout=0.5)
    waited = time.monotonic() - started
    [result] = report.results
    assert result.status is DeliveryStatus.DEFERRED
    assert "Timed out waiting for server response" in result.message
    assert 0.4 < waited < 3.0, waited
