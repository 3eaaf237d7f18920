"""The SMTP listener on real loopback sockets, with real STARTTLS.

aiosmtplib is the well-behaved client; raw ``asyncio`` streams play the abusive one
(smuggled end-of-data sequences, bare CR, overlong lines, too many connections).
pytest-asyncio is not installed: each test runs its scenario with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import email
import email.policy
import email.utils
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiosmtplib
import pytest
from cryptography import x509

from mailflow_relay.inbound.listener import (
    AcceptedMessage,
    ListenerConfigError,
    ListenerSettings,
    RecipientCheck,
    SmtpListener,
)
from mailflow_relay.inbound.passwords import hash_password, verify_password
from support import run, until

if TYPE_CHECKING:
    from pki import Issued, Pki


HOSTNAME = "relay.test"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
ELSEWHERE = ipaddress.ip_network("192.0.2.0/24")  # TEST-NET-1: excludes our 127.0.0.1
PASSWORD = "correct horse battery staple"
USERS = {"alice": hash_password(PASSWORD)}
MESSAGE = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: Bob <bob@recipient.example>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"body\r\n"
)
BASE = ListenerSettings(
    host="127.0.0.1",
    port=0,
    hostname=HOSTNAME,
    accept_from=(LOOPBACK,),
    command_timeout=10.0,
    data_timeout=10.0,
)
IO_TIMEOUT = 5.0


def settings(**overrides: Any) -> ListenerSettings:
    return dataclasses.replace(BASE, **overrides)


class Inbox:
    """The on_message callback: records messages, hands out queue ids, fails on demand."""

    def __init__(self) -> None:
        self.messages: list[AcceptedMessage] = []
        self.failures_to_come = 0
        self.calls = 0

    async def __call__(self, message: AcceptedMessage) -> str:
        self.calls += 1
        if self.failures_to_come:
            self.failures_to_come -= 1
            raise OSError("spool disk full")
        self.messages.append(message)
        return f"Q{len(self.messages):04d}"


@contextlib.asynccontextmanager
async def serving(
    config: ListenerSettings, inbox: Inbox, check: RecipientCheck | None = None
) -> AsyncIterator[SmtpListener]:
    listener = SmtpListener(config, inbox, check)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop(grace=2.0)


class RawClient:
    """An SMTP client that sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its lines' text joined by newlines."""
        lines = []
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                line = await self.reader.readline()
                assert line.endswith(b"\r\n"), f"connection closed mid-reply: {line!r}"
                lines.append(line[4:-2].decode())
                if line[3:4] == b" ":
                    return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: bytes) -> tuple[int, str]:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        async with asyncio.timeout(IO_TIMEOUT):
            return await self.reader.read()

    async def transaction(self, rcpts: int = 1) -> None:
        assert (await self.command(b"MAIL FROM:<alice@sender.example>"))[0] == 250
        for n in range(rcpts):
            assert (await self.command(b"RCPT TO:<bob%d@recipient.example>" % n))[0] == 250
        assert (await self.command(b"DATA"))[0] == 354


@contextlib.asynccontextmanager
async def raw_connection(port: int, *, ehlo: bool = True) -> AsyncIterator[RawClient]:
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    try:
        code, banner = await client.reply()
        assert code == 220, banner
        if ehlo:
            assert (await client.command(b"EHLO client.test"))[0] == 250
        yield client
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def smtp_client(port: int) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=IO_TIMEOUT)


def trusting(ca: Issued) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert_file))


# -- accepting and relaying ------------------------------------------------------------


def test_message_from_an_allow_listed_address_reaches_the_callback_exactly() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with serving(settings(), inbox) as listener, smtp_client(listener.port) as client:
            errors, reply = await client.sendmail(
                "alice@sender.example",
                ["bob@recipient.example", "carol@recipient.example"],
                MESSAGE,
            )
            assert errors == {}
            assert reply == "2.0.0 OK: queued as Q0001"
        [message] = inbox.messages
        assert message.data == MESSAGE  # CRLF kept, the transparency dot removed
        assert message.mail_from == "alice@sender.example"
        assert message.rcpt_tos == ("bob@recipient.example", "carol@recipient.example")
        assert message.client_address == "127.0.0.1"
        assert message.authenticated_user is None
        assert message.tls is False
        assert message.esmtp is True
        assert message.received_by == HOSTNAME

    run(scenario)


def test_null_sender_is_an_empty_mail_from() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with serving(settings(), inbox) as listener, raw_connection(listener.port) as client:
            assert (await client.command(b"MAIL FROM:<>"))[0] == 250
            assert (await client.command(b"RCPT TO:<bob@recipient.example>"))[0] == 250
            assert (await client.command(b"DATA"))[0] == 354
            assert (await client.command(b"Subject: bounce\r\n\r\nbody\r\n."))[0] == 250
        assert inbox.messages[0].mail_from == ""

    run(scenario)


def test_client_outside_the_allow_list_is_denied_relaying_at_rcpt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        inbox = Inbox()
        config = settings(accept_from=(ELSEWHERE,))
        async with serving(config, inbox) as listener, smtp_client(listener.port) as client:
            await client.mail("alice@sender.example")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await client.rcpt("bob@recipient.example")
            assert refused.value.code == 550
            assert refused.value.message == "5.7.1 Relaying denied"
            response = await client.execute_command(b"DATA")
            assert response.code == 503
        assert inbox.calls == 0

    caplog.set_level(logging.INFO, logger="mailflow_relay.inbound.listener")
    run(scenario)
    assert any("Relaying denied" in record.getMessage() for record in caplog.records)


def test_empty_allow_list_and_no_users_relays_for_nobody() -> None:
    async def scenario() -> None:
        async with (
            serving(settings(accept_from=()), Inbox()) as listener,
            raw_connection(listener.port) as client,
        ):
            assert (await client.command(b"MAIL FROM:<a@sender.example>"))[0] == 250
            code, text = await client.command(b"RCPT TO:<b@recipient.example>")
            assert (code, text) == (550, "5.7.1 Relaying denied")

    run(scenario)


def test_check_recipient_may_refuse_a_recipient_with_its_own_reply() -> None:
    def check(sender: str, recipient: str, client: str, user: str | None) -> tuple[int, str] | None:
        assert sender == "alice@sender.example"
        assert (client, user) == ("127.0.0.1", None)
        if recipient.startswith("nobody@"):
            return 550, "5.1.1 No such recipient\r\nX-Injected: yes"
        return None

    async def scenario() -> None:
        inbox = Inbox()
        async with (
            serving(settings(), inbox, check) as listener,
            raw_connection(listener.port) as client,
        ):
            assert (await client.command(b"MAIL FROM:<alice@sender.example>"))[0] == 250
            refused = await client.command(b"RCPT TO:<nobody@recipient.example>")
            assert refused == (550, "5.1.1 No such recipient??X-Injected: yes")
            assert (await client.command(b"RCPT TO:<bob@recipient.example>"))[0] == 250
            assert (await client.command(b"DATA"))[0] == 354
            assert (await client.command(b"Subject: x\r\n\r\ny\r\n."))[0] == 250
        assert inbox.messages[0].rcpt_tos == ("bob@recipient.example",)

    run(scenario)


# -- STARTTLS and AUTH -----------------------------------------------------------------


def test_auth_is_refused_before_starttls_and_not_advertised() -> None:
    async def scenario() -> None:
        config = settings(accept_from=(ELSEWHERE,), users=USERS)
        async with serving(config, Inbox()) as listener, smtp_client(listener.port) as client:
            await client.ehlo()
            assert client.supports_extension("starttls")
            assert not client.supports_extension("auth")
            blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
            response = await client.execute_command(b"AUTH", b"PLAIN", blob)
            assert response.code == 538
            assert response.message.startswith("5.7.11 Encryption required")

    run(scenario)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_after_starttls_lets_a_client_outside_the_allow_list_relay(
    mechanism: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    ca = pki.ca()
    leaf = ca.issue(HOSTNAME)

    async def scenario() -> None:
        inbox = Inbox()
        config = settings(
            accept_from=(ELSEWHERE,),
            users=USERS,
            tls_cert_file=leaf.cert_file,
            tls_key_file=leaf.key_file,
        )
        async with serving(config, inbox) as listener, smtp_client(listener.port) as client:
            await client.ehlo()
            await client.starttls(server_hostname=HOSTNAME, tls_context=trusting(ca.issued))
            await client.ehlo()
            assert client.server_auth_methods == ["login", "plain"]
            login = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            response = await login("alice", PASSWORD)
            assert response.code == 235
            errors, reply = await client.sendmail(
                "alice@sender.example", ["bob@recipient.example"], MESSAGE
            )
            assert (errors, reply) == ({}, "2.0.0 OK: queued as Q0001")
        [message] = inbox.messages
        assert message.authenticated_user == "alice"
        assert message.tls is True
        assert b"with ESMTPSA id Q0001" in message.with_received("Q0001")

    caplog.set_level(logging.DEBUG)
    run(scenario)
    assert any(f"AUTH {mechanism} succeeded" in r.getMessage() for r in caplog.records)
    # aiosmtpd's own deprecation warning for login_data, once per AUTH (issue 11, point 10).
    assert "login_data is deprecated" not in caplog.text
    assert PASSWORD not in caplog.text
    assert base64.b64encode(PASSWORD.encode()).decode() not in caplog.text


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong password"), ("mallory", PASSWORD)])
def test_bad_credentials_get_535_and_still_no_relaying(
    user: str, password: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    leaf = pki.self_signed(HOSTNAME)

    async def scenario() -> None:
        config = settings(
            accept_from=(ELSEWHERE,),
            users=USERS,
            tls_cert_file=leaf.cert_file,
            tls_key_file=leaf.key_file,
        )
        async with serving(config, Inbox()) as listener, smtp_client(listener.port) as client:
            await client.starttls(server_hostname=HOSTNAME, tls_context=trusting(leaf))
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await client.auth_plain(user, password)
            assert failed.value.code == 535
            assert failed.value.message.startswith("5.7.8")
            await client.mail("alice@sender.example")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await client.rcpt("bob@recipient.example")
            assert refused.value.code == 550

    caplog.set_level(logging.DEBUG)
    run(scenario)
    assert any("AUTH PLAIN failed for user" in r.getMessage() for r in caplog.records)
    assert password not in caplog.text


def test_without_a_certificate_starttls_uses_a_generated_self_signed_one() -> None:
    async def scenario() -> None:
        async with serving(settings(), Inbox()) as listener, smtp_client(listener.port) as client:
            await client.starttls(validate_certs=False)
            assert client.transport is not None
            ssl_object = client.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True)
            certificate = x509.load_der_x509_certificate(der)
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert names.value.get_values_for_type(x509.DNSName) == [HOSTNAME]
            await client.ehlo()
            assert not client.supports_extension("auth")  # no users configured
            errors, _ = await client.sendmail("a@sender.example", ["b@r.example"], MESSAGE)
            assert errors == {}

    run(scenario)


# -- SMTP smuggling ----------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<ceo@victim.example>\r\n"
    b"RCPT TO:<target@recipient.example>\r\n"
    b"DATA\r\n"
    b"From: ceo@victim.example\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"pay the invoice\r\n"
)


@pytest.mark.parametrize(
    "fake_end_of_data",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CRLF"],
)
def test_smuggled_end_of_data_is_refused_and_nothing_is_smuggled(fake_end_of_data: bytes) -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with serving(settings(), inbox) as listener, raw_connection(listener.port) as client:
            await client.transaction()
            await client.send(
                b"Subject: first\r\n\r\nhello" + fake_end_of_data + SMUGGLED + b".\r\n"
            )
            code, text = await client.reply()
            assert code == 550
            assert text == (
                "5.6.0 Message contains bare LF or CR; refused (SMTP smuggling protection)"
            )
            # The next reply answers our QUIT: none answers a smuggled command.
            assert await client.command(b"QUIT") == (221, "2.0.0 Bye")
            assert await client.rest() == b""
        assert inbox.calls == 0

    run(scenario)


def test_bare_cr_is_refused_and_the_session_goes_on() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with serving(settings(), inbox) as listener, raw_connection(listener.port) as client:
            await client.transaction()
            code, text = await client.command(b"Subject: x\r\n\r\nbare\rcarriage return\r\n.")
            assert code == 550
            assert "bare LF or CR" in text
            await client.transaction()
            code, _ = await client.command(b"Subject: x\r\n\r\nclean\r\n.")
            assert code == 250
        assert [m.data for m in inbox.messages] == [b"Subject: x\r\n\r\nclean\r\n"]

    run(scenario)


# -- limits -----------------------------------------------------------------------------


def test_size_is_advertised_and_enforced_at_mail_and_after_data() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        config = settings(max_message_size=1000)
        async with serving(config, inbox) as listener:
            async with smtp_client(listener.port) as client:
                await client.ehlo()
                assert client.esmtp_extensions["size"] == "1000"
            async with raw_connection(listener.port) as client:
                code, text = await client.command(b"MAIL FROM:<a@sender.example> SIZE=1001")
                assert code == 552
                assert text.startswith("5.3.4 ")
                await client.transaction()
                code, text = await client.command(
                    b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 20 + b"."
                )
                assert code == 552
                assert text == "5.3.4 Message size exceeds fixed maximum message size (1000 octets)"
        assert inbox.calls == 0

    run(scenario)


def test_too_many_recipients_get_452_and_the_rest_are_delivered() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with (
            serving(settings(max_recipients=2), inbox) as listener,
            raw_connection(listener.port) as client,
        ):
            assert (await client.command(b"MAIL FROM:<a@sender.example>"))[0] == 250
            for n in range(2):
                assert (await client.command(b"RCPT TO:<r%d@recipient.example>" % n))[0] == 250
            code, text = await client.command(b"RCPT TO:<r2@recipient.example>")
            assert (code, text) == (452, "4.5.3 Too many recipients")
            assert (await client.command(b"DATA"))[0] == 354
            assert (await client.command(b"Subject: x\r\n\r\ny\r\n."))[0] == 250
        assert inbox.messages[0].rcpt_tos == ("r0@recipient.example", "r1@recipient.example")

    run(scenario)


@pytest.mark.parametrize(
    ("line", "accepted"),
    [
        (b"x" * 998, True),  # 1000 octets with CRLF: the RFC 5321 maximum
        (b".." + b"x" * 997, True),  # the transparency dot does not count
        (b"x" * 999, False),
        (b"x" * 100_000, False),  # longer than any buffer
    ],
    ids=["1000", "1000+dot", "1001", "100002"],
)
def test_text_lines_longer_than_1000_octets_are_refused(line: bytes, accepted: bool) -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with serving(settings(), inbox) as listener, raw_connection(listener.port) as client:
            await client.transaction()
            code, text = await client.command(b"Subject: x\r\n\r\n" + line + b"\r\nend\r\n.")
            if accepted:
                assert code == 250
            else:
                assert code == 500
                assert text.startswith("5.6.0 Line too long")
            # Either way the session goes on.
            await client.transaction()
            assert (await client.command(b"Subject: y\r\n\r\nshort\r\n."))[0] == 250
        assert len(inbox.messages) == (2 if accepted else 1)

    run(scenario)


def test_connections_beyond_the_per_client_limit_get_421() -> None:
    async def scenario() -> None:
        config = settings(max_connections_per_client=2)
        async with (
            serving(config, Inbox()) as listener,
            raw_connection(listener.port),
            raw_connection(listener.port) as second,
        ):
            assert listener.active_sessions == 2
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            try:
                async with asyncio.timeout(IO_TIMEOUT):
                    refusal = await reader.read()
                assert refusal.startswith(b"421 4.7.0 Too many connections")
            finally:
                writer.close()
                await writer.wait_closed()
            assert (await second.command(b"QUIT"))[0] == 221
            await until(lambda: listener.active_sessions == 1)
            async with raw_connection(listener.port) as third:
                assert (await third.command(b"NOOP"))[0] == 250

    run(scenario)


def test_idle_client_is_timed_out_with_421() -> None:
    async def scenario() -> None:
        async with (
            serving(settings(command_timeout=0.3), Inbox()) as listener,
            raw_connection(listener.port) as client,
        ):
            assert (await client.rest()).startswith(b"421 4.4.2 ")
            await until(lambda: listener.active_sessions == 0)

    run(scenario)


def test_slow_data_is_timed_out_and_not_handed_over() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with (
            serving(settings(data_timeout=0.3), inbox) as listener,
            raw_connection(listener.port) as client,
        ):
            await client.transaction()
            await client.send(b"Subject: slow\r\n\r\nand never finished\r\n")
            assert (await client.rest()).startswith(b"421 4.4.2 ")
        assert inbox.calls == 0

    run(scenario)


# -- the callback ----------------------------------------------------------------------


def test_failing_callback_gets_451_and_the_session_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        inbox = Inbox()
        inbox.failures_to_come = 1
        async with serving(settings(), inbox) as listener, smtp_client(listener.port) as client:
            with pytest.raises(aiosmtplib.SMTPDataError) as failed:
                await client.sendmail("a@sender.example", ["b@recipient.example"], MESSAGE)
            assert failed.value.code == 451
            assert failed.value.message.startswith("4.3.0 ")
            assert "spool disk full" not in failed.value.message
            errors, reply = await client.sendmail(
                "a@sender.example", ["b@recipient.example"], MESSAGE
            )
            assert (errors, reply) == ({}, "2.0.0 OK: queued as Q0001")
        assert inbox.calls == 2

    caplog.set_level(logging.ERROR, logger="mailflow_relay.inbound.listener")
    run(scenario)
    assert "on_message callback failed" in caplog.text


# -- the Received header -----------------------------------------------------------------

HOSTILE_HELO = "evil.example\r\nX-Injected: yes\x00\x1b(\\;"


def _parse_received(data: bytes) -> tuple[email.message.EmailMessage, str]:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    received = parsed.get_all("Received")
    assert received is not None
    assert len(received) == 1
    return parsed, str(received[0])


def test_received_header_cannot_be_injected_into() -> None:
    now = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    message = AcceptedMessage(
        mail_from="a@sender.example>\r\nBcc: <victim@x.example",
        rcpt_tos=("bob@recipient.example\nX-Also: no",),
        data=MESSAGE,
        client_address="127.0.0.1",
        helo=HOSTILE_HELO,
        authenticated_user="alice\r\nX-User: no",
        tls=True,
        esmtp=True,
        received_by=HOSTNAME,
    )
    stamped = message.with_received("Q1\r\nX-Id: no", now=now)
    header, _, rest = stamped.partition(b"\r\nFrom: ")
    assert rest
    assert stamped.endswith(MESSAGE)
    # One header: the first line, then only tab-indented continuation lines, all printable.
    first, *continuations = header.split(b"\r\n")
    assert first.startswith(b"Received: from evil.example??X-Injected:?yes")
    for line in [first, *continuations]:
        assert all(0x20 <= byte < 0x7F or byte == 0x09 for byte in line), line
    assert all(line.startswith(b"\t") for line in continuations)
    parsed, received = _parse_received(stamped)
    assert list(parsed.keys()) == ["Received", "From", "To", "Subject"]
    assert "by relay.test with ESMTPSA id Q1??X-Id:?no" in received
    assert email.utils.parsedate_to_datetime(received.rsplit(";", 1)[1].strip()) == now


def test_received_header_through_the_wire_with_a_hostile_helo() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        async with (
            serving(settings(), inbox) as listener,
            raw_connection(listener.port, ehlo=False) as client,
        ):
            # The command line ends at the final CRLF; the bare CR stays in the argument.
            greeting = b"EHLO " + HOSTILE_HELO.replace("\r\n", "\r").encode()
            assert (await client.command(greeting))[0] == 250
            await client.transaction()
            assert (await client.command(b"Subject: x\r\n\r\ny\r\n."))[0] == 250
        [message] = inbox.messages
        assert "\r" in message.helo
        parsed, received = _parse_received(message.with_received("Q0001"))
        assert list(parsed.keys()) == ["Received", "Subject"]
        assert received.startswith("from evil.example?X-Injected:?yes")
        assert "with ESMTP id Q0001" in received
        assert "for <bob0@recipient.example>" in received

    run(scenario)


# -- shutdown ----------------------------------------------------------------------------


def test_stop_refuses_new_connections_while_an_open_session_finishes_its_message() -> None:
    async def scenario() -> None:
        inbox = Inbox()
        listener = SmtpListener(settings(), inbox)
        await listener.start()
        port = listener.port
        try:
            async with raw_connection(port) as client, asyncio.TaskGroup() as tasks:
                await client.transaction()
                stopping = tasks.create_task(listener.stop(grace=5.0), name="stop listener")
                await until(lambda: not listener.accepting)
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection("127.0.0.1", port)
                assert not stopping.done()
                assert (await client.command(b"Subject: x\r\n\r\nlast one\r\n."))[0] == 250
                assert (await client.command(b"QUIT"))[0] == 221
                async with asyncio.timeout(IO_TIMEOUT):
                    await stopping
        finally:
            await listener.stop(grace=0)
        assert listener.active_sessions == 0
        assert [m.data for m in inbox.messages] == [b"Subject: x\r\n\r\nlast one\r\n"]

    run(scenario)


def test_stop_aborts_sessions_still_open_after_the_grace_period() -> None:
    async def scenario() -> None:
        async with (
            serving(settings(), Inbox()) as listener,
            raw_connection(listener.port) as client,
        ):
            await client.transaction()
            await listener.stop(grace=0.2)
            assert listener.active_sessions == 0
            assert await client.rest() == b""

    run(scenario)


# -- settings and passwords ----------------------------------------------------------------


def test_a_key_without_a_certificate_is_a_configuration_error(pki: Pki) -> None:
    leaf = pki.self_signed(HOSTNAME)
    with pytest.raises(ListenerConfigError, match="both a certificate and its key"):
        settings(tls_key_file=leaf.key_file)


def test_password_hashes_verify_only_the_right_password() -> None:
    hashed = hash_password("s3cret")
    assert hashed.startswith("scrypt$16384$8$1$")
    assert hashed != hash_password("s3cret")  # random salt
    assert verify_password("s3cret", hashed)
    assert not verify_password("s3cret ", hashed)


@pytest.mark.parametrize(
    "hashed",
    [
        "",
        "plain-text-password",
        "bcrypt$1$2$3$AAAA$AAAA",
        "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # n not a power of two
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # n absurdly large
        "scrypt$16384$8$1$not base64!$" + "A" * 44,
    ],
)
def test_malformed_hashes_never_match_and_are_logged(
    hashed: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert not verify_password("anything", hashed)
    assert "Malformed password hash" in caplog.text
