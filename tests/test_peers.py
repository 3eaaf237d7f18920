"""The real peers of tests/peers.py work: NSD answers, smtp-sink takes what the clients send.

These are the fixtures' own tests; a peer that is not installed skips them with the reason.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from email.message import EmailMessage

import aiosmtplib
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from peers import (
    DnsServer,
    SmtpSink,
    UnresponsiveDnsServer,
    free_port,
    parse_sink_dump,
    require,
    smtp_source,
    swaks,
)

ZONES = {
    "contoso.test": [
        "@ MX 10 mx1.contoso.test.",
        "@ MX 10 mx2.contoso.test.",
        "@ MX 20 backup.contoso.test.",
        "mx1 A 127.0.0.11",
        "mx2 A 127.0.0.12",
        "backup A 127.0.0.13",
    ],
    "nullmx.test": ["@ MX 0 ."],
    "implicit.test": ["@ A 127.0.0.21"],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONES, servfail=["broken.test"]) as server:
        yield server


@pytest.fixture
def resolver(dns_server: DnsServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.address]
    resolver.port = dns_server.port
    resolver.lifetime = 2.0
    return resolver


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


# --------------------------------------------------------------------------------------- DNS


def test_dns_server_listens_on_loopback(dns_server: DnsServer) -> None:
    assert dns_server.address == "127.0.0.1"
    assert 1024 <= dns_server.port <= 65535


def test_mx_set_with_preferences(resolver: dns.resolver.Resolver) -> None:
    answer = resolver.resolve("contoso.test", "MX")
    records = sorted((rr.preference, rr.exchange.to_text()) for rr in answer)
    assert records == [
        (10, "mx1.contoso.test."),
        (10, "mx2.contoso.test."),
        (20, "backup.contoso.test."),
    ]


def test_a_records(resolver: dns.resolver.Resolver) -> None:
    for name, address in [
        ("mx1.contoso.test", "127.0.0.11"),
        ("mx2.contoso.test", "127.0.0.12"),
        ("backup.contoso.test", "127.0.0.13"),
    ]:
        assert [rr.to_text() for rr in resolver.resolve(name, "A")] == [address]


def test_null_mx(resolver: dns.resolver.Resolver) -> None:
    [record] = list(resolver.resolve("nullmx.test", "MX"))
    assert (record.preference, record.exchange.to_text()) == (0, ".")


def test_implicit_mx_has_no_mx_but_an_address(resolver: dns.resolver.Resolver) -> None:
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("implicit.test", "MX")
    assert [rr.to_text() for rr in resolver.resolve("implicit.test", "A")] == ["127.0.0.21"]


def test_nxdomain_for_a_missing_name(resolver: dns.resolver.Resolver) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("missing.contoso.test", "MX")


def test_servfail_zone(dns_server: DnsServer) -> None:
    query = dns.message.make_query("anything.broken.test.", "MX")
    reply = dns.query.udp(query, dns_server.address, port=dns_server.port, timeout=2)
    assert reply.rcode() == dns.rcode.SERVFAIL
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        dns_server.resolver().resolve("anything.broken.test", "MX")


def test_answers_over_tcp_too(dns_server: DnsServer) -> None:
    query = dns.message.make_query("contoso.test.", "MX")
    reply = dns.query.tcp(query, dns_server.address, port=dns_server.port, timeout=2)
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(reply.answer[0]) == 3


def test_unresponsive_server_times_out() -> None:
    with UnresponsiveDnsServer() as silent:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [silent.address]
        resolver.port = silent.port
        resolver.timeout = resolver.lifetime = 0.3
        with pytest.raises(dns.resolver.LifetimeTimeout):
            resolver.resolve("contoso.test", "MX")


def test_dns_server_stops_on_exit() -> None:
    with DnsServer({"stop.test": ["@ A 127.0.0.1"]}) as server:
        port = server.port
        assert [rr.to_text() for rr in server.resolver().resolve("stop.test", "A")] == ["127.0.0.1"]
    query = dns.message.make_query("stop.test.", "A")
    with pytest.raises((dns.exception.Timeout, ConnectionRefusedError)):
        dns.query.udp(query, "127.0.0.1", port=port, timeout=0.3)


# -------------------------------------------------------------------------------------- SMTP


def test_smtp_source_sends_20_messages_in_2_sessions(sink: SmtpSink) -> None:
    smtp_source(sink.port, count=20, size=1000, sessions=2, reuse=True)
    messages = sink.wait_for(20)
    assert len(messages) == 20
    assert sink.received() == 20
    assert {m.mail_from for m in messages} == {"source@source.test"}
    assert {tuple(m.recipients) for m in messages} == {("rcpt@sink.test",)}
    assert all(len(m.data) > 1000 for m in messages)


def test_swaks_message_arrives_with_its_subject(sink: SmtpSink) -> None:
    swaks(sink.port, "--to", "alice@contoso.test", "--header", "Subject: peers work")
    [message] = sink.wait_for(1)
    assert message.helo == "swaks.test"
    assert message.recipients == ["alice@contoso.test"]
    assert "Subject: peers work\n" in message.text


def test_aiosmtplib_send(sink: SmtpSink) -> None:
    message = EmailMessage()
    message["From"] = "relay@mailflow.test"
    message["To"] = "bob@contoso.test"
    message["Subject"] = "raw aiosmtplib"
    message.set_content("Hello from aiosmtplib.\n.leading dot\n")

    async def send() -> None:
        await aiosmtplib.send(
            message,
            hostname=sink.address,
            port=sink.port,
            start_tls=False,
            recipients=["bob@contoso.test", "carol@contoso.test"],
            timeout=5,
        )

    asyncio.run(send())
    [received] = sink.wait_for(1)
    assert received.mail_from == "relay@mailflow.test"
    assert received.recipients == ["bob@contoso.test", "carol@contoso.test"]
    assert "Subject: raw aiosmtplib\n" in received.text
    assert "\n.leading dot\n" in received.text  # dot-unstuffed


def test_sink_never_offers_starttls(sink: SmtpSink) -> None:
    async def extensions() -> dict[str, str]:
        client = aiosmtplib.SMTP(hostname=sink.address, port=sink.port, start_tls=False, timeout=5)
        await client.connect()
        try:
            await client.ehlo()
            return dict(client.esmtp_extensions)
        finally:
            await client.quit()

    offered = asyncio.run(extensions())
    assert "starttls" not in offered
    assert "pipelining" in offered


def test_sink_hard_rejects_rcpt_with_the_chosen_reply() -> None:
    with SmtpSink(hard_reject=["RCPT"], hard_reply="550 5.1.1 No such user") as sink:
        result = swaks(sink.port, check=False)
        assert result.returncode != 0
        assert "550 5.1.1 No such user" in result.stdout

        source = smtp_source(sink.port, check=False)
        assert source.returncode != 0
        assert "550 5.1.1 No such user" in source.stderr + source.stdout
        assert sink.messages() == []


def test_sink_soft_rejects_data() -> None:
    with SmtpSink(soft_reject=["DATA"], soft_reply="451 4.3.0 Try again later") as sink:

        async def send() -> None:
            await aiosmtplib.send(
                "Subject: x\r\n\r\nbody\r\n",
                sender="a@source.test",
                recipients=["b@contoso.test"],
                hostname=sink.address,
                port=sink.port,
                start_tls=False,
                timeout=5,
            )

        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            asyncio.run(send())
        assert refused.value.code == 451
        assert sink.messages() == []


def test_parse_sink_dump_ignores_an_unfinished_dump() -> None:
    assert parse_sink_dump(b"") is None
    assert parse_sink_dump(b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\n") is None


# ----------------------------------------------------------------------------------- helpers


def test_free_port_is_free_for_tcp_and_udp() -> None:
    port = free_port()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        tcp.bind(("127.0.0.1", port))
        udp.bind(("127.0.0.1", port))


def test_require_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed: run `make test` as root"):
        require("mailflow-no-such-tool")


def test_require_fails_in_ci_instead_of_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: mailflow-no-such-tool"):
        require("mailflow-no-such-tool")
