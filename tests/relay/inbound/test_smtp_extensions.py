"""The listener's ESMTP extensions (issue 16, inbound side), over real loopback sockets.

The EHLO answer is asserted line for line; MAIL and RCPT parameters (SMTPUTF8, BODY, DSN,
REQUIRETLS) are checked for what is kept and for the exact refusals; swaks is the
pipelining client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailflow_relay.envelope import (
    BodyType,
    EnvelopeParameters,
    MailParameters,
    Notify,
    RecipientParameters,
    Ret,
    xtext_decode,
    xtext_encode,
)
from mailflow_relay.inbound.commands import CommandRefused, parse_mail, parse_rcpt
from mailflow_relay.inbound.listener import AcceptedMessage, ListenerSettings, SmtpListener
from mailflow_relay.inbound.passwords import hash_password
from mailflow_relay.queue.spool import Spool
from peers import swaks
from support import run

HOSTNAME = "relay.test"
SIZE = 10_240_000
BASE = ListenerSettings(
    host="127.0.0.1",
    port=0,
    hostname=HOSTNAME,
    accept_from=(ipaddress.ip_network("127.0.0.0/8"),),
    command_timeout=10.0,
    data_timeout=10.0,
    max_message_size=SIZE,
)
IO_TIMEOUT = 5.0


class Inbox:
    def __init__(self) -> None:
        self.messages: list[AcceptedMessage] = []

    async def __call__(self, message: AcceptedMessage) -> str:
        self.messages.append(message)
        return f"Q{len(self.messages):04d}"


@contextlib.asynccontextmanager
async def serving(inbox: Inbox, **overrides: Any) -> AsyncIterator[SmtpListener]:
    listener = SmtpListener(dataclasses.replace(BASE, **overrides), inbox, None)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop(grace=2.0)


async def exchange(port: int, lines: list[bytes], *, pipelined: bool = False) -> list[bytes]:
    """Send each line (all in one write when ``pipelined``); the first line of each reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[bytes] = []
    try:
        async with asyncio.timeout(IO_TIMEOUT):

            async def reply() -> bytes:
                first = b""
                while True:
                    line = await reader.readline()
                    assert line.endswith(b"\r\n"), f"connection closed mid-reply: {line!r}"
                    first = first or line
                    if line[3:4] == b" ":
                        return first

            await reply()  # greeting
            if pipelined:
                writer.write(b"".join(lines))
                await writer.drain()
                replies = [await reply() for _ in lines]
            else:
                for line in lines:
                    writer.write(line)
                    await writer.drain()
                    replies.append(await reply())
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return replies


# --- EHLO -------------------------------------------------------------------------------


def test_ehlo_answer_is_exact_before_and_after_starttls() -> None:
    async def scenario() -> tuple[str, str]:
        async with serving(Inbox()) as listener:
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=listener.port, start_tls=False, validate_certs=False
            )
            await smtp.connect(timeout=IO_TIMEOUT)
            try:
                plain = (await smtp.ehlo(hostname="client.test")).message
                await smtp.starttls()
                secure = (await smtp.ehlo(hostname="client.test")).message
            finally:
                await smtp.quit()
            return plain, secure

    plain, secure = run(scenario)
    common = ["PIPELINING", f"SIZE {SIZE}", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "DSN"]
    assert plain.split("\n") == [HOSTNAME, *common, "STARTTLS", "HELP"]
    assert secure.split("\n") == [HOSTNAME, *common, "REQUIRETLS", "HELP"]


def test_ehlo_offers_auth_only_under_tls_when_users_are_configured() -> None:
    async def scenario() -> tuple[str, str]:
        users = {"alice": hash_password("correct horse battery staple")}
        async with serving(Inbox(), users=users) as listener:
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=listener.port, start_tls=False, validate_certs=False
            )
            await smtp.connect(timeout=IO_TIMEOUT)
            try:
                plain = (await smtp.ehlo(hostname="client.test")).message
                await smtp.starttls()
                secure = (await smtp.ehlo(hostname="client.test")).message
            finally:
                await smtp.quit()
            return plain, secure

    plain, secure = run(scenario)
    assert "AUTH" not in plain
    assert secure.split("\n")[-3:] == ["REQUIRETLS", "AUTH LOGIN PLAIN", "HELP"]


def test_every_reply_but_greeting_and_ehlo_carries_an_enhanced_code() -> None:
    async def scenario() -> list[bytes]:
        async with serving(Inbox()) as listener:
            return await exchange(
                listener.port,
                [b"HELO c.test\r\n", b"NOOP\r\n", b"RSET\r\n", b"FOO\r\n", b"QUIT\r\n"],
            )

    assert run(scenario) == [
        f"250 {HOSTNAME}\r\n".encode(),
        b"250 2.0.0 OK\r\n",
        b"250 2.0.0 OK\r\n",
        b'500 5.5.2 Error: command "FOO" not recognized\r\n',
        b"221 2.0.0 Bye\r\n",
    ]


# --- SMTPUTF8 and parameters kept -------------------------------------------------------


def test_utf8_addresses_need_smtputf8_and_are_kept_with_every_dsn_parameter() -> None:
    async def scenario() -> tuple[list[bytes], Inbox]:
        inbox = Inbox()
        async with serving(inbox) as listener:
            replies = await exchange(
                listener.port,
                [
                    b"EHLO client.test\r\n",
                    "MAIL FROM:<jürgen@exämple.test>\r\n".encode(),
                    "MAIL FROM:<jürgen@exämple.test> SMTPUTF8 BODY=8BITMIME RET=HDRS"
                    " ENVID=Id+2Bx.1\r\n".encode(),
                    "RCPT TO:<zoë@bücher.test> NOTIFY=SUCCESS,DELAY"
                    " ORCPT=rfc822;Zoe+40B.test\r\n".encode(),
                    b"RCPT TO:<bob@dest.test> NOTIFY=never\r\n",
                    b"RCPT TO:<carol@dest.test>\r\n",
                    b"DATA\r\n",
                    "Subject: Grüße\r\n\r\nHällo\r\n.\r\n".encode(),
                    b"QUIT\r\n",
                ],
            )
        return replies, inbox

    replies, inbox = run(scenario)
    assert replies[1] == b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"
    assert [r[:3] for r in replies[2:8]] == [b"250", b"250", b"250", b"250", b"354", b"250"]
    (message,) = inbox.messages
    assert message.mail_from == "jürgen@exämple.test"
    assert message.rcpt_tos == ("zoë@bücher.test", "bob@dest.test", "carol@dest.test")
    assert message.parameters == EnvelopeParameters(
        MailParameters(body=BodyType.EIGHT_BIT_MIME, smtputf8=True, ret=Ret.HDRS, envid="Id+x.1"),
        (
            (
                "zoë@bücher.test",
                RecipientParameters(
                    frozenset({Notify.SUCCESS, Notify.DELAY}), ("rfc822", "Zoe@B.test")
                ),
            ),
            ("bob@dest.test", RecipientParameters(frozenset({Notify.NEVER}))),
        ),
    )
    assert b"with UTF8SMTP id Q0001" in message.with_received("Q0001")


def test_parameters_survive_the_spool_and_old_records_load_without_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    parameters = EnvelopeParameters(
        MailParameters(smtputf8=True, ret=Ret.FULL, envid="e1", requiretls=True),
        (("b@x.test", RecipientParameters(frozenset({Notify.FAILURE}), ("utf-8", "b@ü.test"))),),
    )
    stored = spool.store_with_header(
        "a@x.test", ["b@x.test"], lambda _: b"x\r\n", parameters=parameters
    )
    assert spool.load(stored.queue_id).parameters == parameters
    spool.close()
    # Without parameters, a record carries no trace of them (records of older relays look
    # the same, and load the same).
    plain_spool = Spool(tmp_path / "plain")
    plain = plain_spool.store("a@x.test", ["c@x.test"], b"y\r\n")
    assert plain_spool.load(plain.queue_id).parameters == EnvelopeParameters()
    segments = list((tmp_path / "plain").glob("seg-*.msg"))
    assert segments
    assert all(b"parameters" not in segment.read_bytes() for segment in segments)
    plain_spool.close()


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ([b"MAIL FROM:<a@x.test> FOO=1"], b"555 5.5.4 Unsupported option: FOO"),
        ([b"MAIL FROM:<a@x.test> REQUIRETLS"], b"555 5.5.4 Unsupported option: REQUIRETLS"),
        ([b"MAIL FROM:<a@x.test> BODY=BINARYMIME"], b"501 5.5.4 BODY can only be 7BIT or 8BITMIME"),
        ([b"MAIL FROM:<a@x.test> RET=ALL"], b"501 5.5.4 Bad RET parameter syntax: FULL or HDRS"),
        ([b"MAIL FROM:<a@x.test> ENVID=a+zz"], b"501 5.5.4 Bad ENVID parameter syntax"),
        ([b"MAIL FROM:<a@x.test> SMTPUTF8=yes"], b"501 5.5.4 SMTPUTF8 takes no value"),
        ([b"MAIL FROM:<a@x.test> SIZE=1 SIZE=2"], b"501 5.5.4 Duplicate parameter: SIZE"),
        ([b"MAIL FROM:<a..b@x.test>"], b"501 5.1.7 Bad sender address syntax"),
        ([b"MAIL FROM:<a@x.test>junk"], b"501 5.5.4 Syntax: MAIL FROM:<address> [SP <parameters>]"),
        ([b"MAIL FROM:<a@x.test>\xff"], b"500 5.5.2 Error: bad UTF-8 syntax"),
        (
            [b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@x.test> NOTIFY=NEVER,SUCCESS"],
            b"501 5.5.4 Bad NOTIFY parameter syntax: NEVER, or SUCCESS, FAILURE, DELAY",
        ),
        (
            [b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@x.test> ORCPT=rfc822"],
            b"501 5.5.4 Bad ORCPT parameter syntax",
        ),
        (
            [b"MAIL FROM:<a@x.test>", "RCPT TO:<jürgen@x.test>".encode()],
            b"553 5.6.7 Must declare SMTPUTF8 to send unicode address",
        ),
        (
            [b"MAIL FROM:<a@x.test>", b"MAIL FROM:<a@x.test>"],
            b"503 5.5.1 Error: nested MAIL command",
        ),
        ([b"RCPT TO:<b@x.test>"], b"503 5.5.1 Error: need MAIL command"),
    ],
)
def test_bad_parameters_and_paths_get_precise_enhanced_replies(
    lines: list[bytes], reply: bytes
) -> None:
    async def scenario() -> list[bytes]:
        async with serving(Inbox()) as listener:
            return await exchange(
                listener.port, [b"EHLO c.test\r\n", *(line + b"\r\n" for line in lines)]
            )

    assert run(scenario)[-1] == reply + b"\r\n"


def test_body_7bit_with_8bit_content_is_refused_at_data_and_8bitmime_is_accepted() -> None:
    async def scenario() -> tuple[list[bytes], Inbox]:
        inbox = Inbox()
        async with serving(inbox) as listener:
            content = "Subject: x\r\n\r\nK\u00f6ln\r\n.\r\n".encode()
            replies = await exchange(
                listener.port,
                [
                    b"EHLO c.test\r\n",
                    b"MAIL FROM:<a@x.test> BODY=7BIT\r\n",
                    b"RCPT TO:<b@x.test>\r\n",
                    b"DATA\r\n",
                    content,
                    b"MAIL FROM:<a@x.test> BODY=8BITMIME\r\n",
                    b"RCPT TO:<b@x.test>\r\n",
                    b"DATA\r\n",
                    content,
                ],
            )
        return replies, inbox

    replies, inbox = run(scenario)
    assert replies[4] == b"550 5.6.1 Message contains 8-bit data but was declared BODY=7BIT\r\n"
    assert replies[8].startswith(b"250 2.0.0 OK: queued as")
    assert len(inbox.messages) == 1
    assert inbox.messages[0].parameters.mail.body is BodyType.EIGHT_BIT_MIME


def test_requiretls_is_accepted_only_under_tls() -> None:
    async def scenario() -> Inbox:
        inbox = Inbox()
        async with serving(inbox) as listener:
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=listener.port, start_tls=True, validate_certs=False
            )
            async with smtp:
                await smtp.sendmail(
                    "a@x.test",
                    ["b@x.test"],
                    b"Subject: x\r\n\r\nx\r\n",
                    mail_options=["REQUIRETLS"],
                )
        return inbox

    inbox = run(scenario)
    assert inbox.messages[0].parameters.mail.requiretls is True


# --- PIPELINING -----------------------------------------------------------------------------


def test_a_pipelined_burst_is_answered_in_order() -> None:
    async def scenario() -> list[bytes]:
        async with serving(Inbox()) as listener:
            await exchange(listener.port, [b"EHLO c.test\r\n"])
            return await exchange(
                listener.port,
                [
                    b"EHLO c.test\r\n",
                    b"MAIL FROM:<a@x.test>\r\n",
                    b"RCPT TO:<b@x.test>\r\n",
                    b"RCPT TO:<bad..c@x.test>\r\n",
                    b"RCPT TO:<d@x.test> NOTIFY=FAILURE\r\n",
                    b"DATA\r\n",
                ],
                pipelined=True,
            )

    replies = run(scenario)
    assert [r[:9] for r in replies] == [
        b"250-relay",
        b"250 2.1.0",
        b"250 2.1.5",
        b"501 5.1.3",
        b"250 2.1.5",
        b"354 End d",
    ]


def test_swaks_pipelining_client_delivers() -> None:
    async def scenario() -> tuple[str, Inbox]:
        inbox = Inbox()
        async with serving(inbox) as listener:
            result = await asyncio.to_thread(
                swaks,
                listener.port,
                "--pipeline",
                "--to",
                "b@x.test,c@x.test",
                "--header",
                "Subject: pipelined",
            )
        return result.stdout, inbox

    transcript, inbox = run(scenario)
    assert "250-PIPELINING" in transcript
    assert len(inbox.messages) == 1
    assert inbox.messages[0].rcpt_tos == ("b@x.test", "c@x.test")


# --- the parser on its own ----------------------------------------------------------------


def test_source_routes_quoted_local_parts_and_literals_parse() -> None:
    command = parse_rcpt(
        'TO:<@a.test,@b.test:"x y>"@[IPv6:2001:db8::1]>', esmtp=True, smtputf8=False
    )
    assert command.address == '"x y>"@[IPv6:2001:db8::1]'
    assert parse_mail("FROM:<>", esmtp=True, tls=False).address == ""
    assert parse_mail("FROM: bare@x.test SIZE=12", esmtp=True, tls=False).size == 12
    with pytest.raises(CommandRefused, match=r"5\.5\.4"):
        parse_mail("FROM:<a@x.test> SIZE=1", esmtp=False, tls=False)
    with pytest.raises(CommandRefused, match=r"5\.1\.3"):
        parse_rcpt("TO:<b@-x.test>", esmtp=True, smtputf8=False)
    with pytest.raises(CommandRefused, match=r"5\.1\.3"):
        parse_rcpt("TO:<" + "l" * 65 + "@x.test>", esmtp=True, smtputf8=False)


def test_xtext_round_trips_and_refuses_bad_escapes() -> None:
    for value in ["plain", "a+b=c d", "ünï", "x\x01"]:
        encoded = xtext_encode(value)
        assert encoded.isascii()
        assert xtext_decode(encoded) == value
    for bad in ["a+2b", "a+", "a=b", "a b"]:
        with pytest.raises(ValueError, match="xtext"):
            xtext_decode(bad)


def test_an_invalid_utf8_argument_echoed_by_aiosmtpd_does_not_break_the_reply() -> None:
    async def scenario() -> list[bytes]:
        async with serving(Inbox()) as listener:
            return await exchange(
                listener.port, [b"EHLO c.test\r\n", b"VRFY @\xc0\r\n", b"NOOP\r\n"]
            )

    replies = run(scenario)
    assert replies[1].startswith(b"502 5.5.1 Could not VRFY @?")
    assert replies[2] == b"250 2.0.0 OK\r\n"
