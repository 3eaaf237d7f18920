"""Delivery on real sockets: the TLS matrix, profiles, replies, credentials.

Destinations are real SMTP servers (aiosmtpd) on loopback with certificates made by
the tests; the client side is the relay's own :class:`Deliverer`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.routing.document import (
    Balancing,
    Destination,
    ObjectRef,
    ProfilePool,
    ServerAddress,
    SmartHost,
    SmtpCredentials,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.testing.sink import SmtpSink
from support import run

if TYPE_CHECKING:
    from pki import Issued, Pki

HOST = "mx.contoso.example"
DOMAIN = "contoso.example"
MESSAGE = b"From: a@sender.example\r\nTo: b@contoso.example\r\nSubject: hello\r\n\r\nHello.\r\n"


def deliverer(**settings: object) -> Deliverer:
    return Deliverer(
        DeliverySettings(helo_name="relay.test", connect_timeout=5, command_timeout=10, **settings),  # type: ignore[arg-type]
        Resolver(["127.0.0.1"], port=9, timeout=1),  # never asked: the tests use addresses
    )


async def send(
    engine: Deliverer,
    destination: Destination,
    tls: TlsPolicy,
    recipients: tuple[str, ...] = ("b@contoso.example",),
    auth: SmtpCredentials | None = None,
) -> DeliveryReport:
    return await engine.deliver(
        mail_from="a@sender.example",
        recipients=recipients,
        data=MESSAGE,
        destination=destination,
        tls=tls,
        auth=auth,
        recipient_domain=DOMAIN,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the TLS matrix ------------------------------------------------------------------------

SERVERS = (
    "no_starttls",
    "self_signed",
    "untrusted_ca",
    "expired",
    "wrong_name",
    "valid",
    "pinned_cert",
    "pinned_key",
)
TLS, PLAIN, DEFER = "delivered over TLS", "delivered in plaintext", "deferred"
MATRIX = {
    TlsMode.OPPORTUNISTIC: (PLAIN, TLS, TLS, TLS, TLS, TLS, TLS, TLS),
    TlsMode.SELF_SIGNED: (DEFER, TLS, TLS, TLS, TLS, TLS, TLS, TLS),
    TlsMode.TRUSTED_CA: (DEFER, DEFER, DEFER, DEFER, TLS, TLS, DEFER, DEFER),
    TlsMode.DOMAIN_MATCH: (DEFER, DEFER, DEFER, DEFER, DEFER, TLS, DEFER, DEFER),
    TlsMode.NAME_MATCH: (DEFER, DEFER, DEFER, DEFER, DEFER, TLS, DEFER, DEFER),
}
EXPECTED_FAILURE = {
    "no_starttls": "no_starttls",
    "self_signed": "untrusted",
    "untrusted_ca": "untrusted",
    "expired": "expired",
    "wrong_name": "name_mismatch",
    "pinned_cert": "untrusted",
    "pinned_key": "untrusted",
}


def server_certificate(pki: Pki, kind: str) -> tuple[Issued | None, str]:
    """The certificate for a kind of server, and the CA bundle that the connector trusts."""
    ca = pki.ca()
    certificates: dict[str, Issued | None] = {
        "no_starttls": None,
        "self_signed": pki.self_signed(HOST),
        "untrusted_ca": pki.ca("Somebody Else's CA").issue(HOST),
        "expired": ca.issue(HOST, expired=True),
        "wrong_name": ca.issue("mail.fabrikam.example"),
        "valid": ca.issue(HOST),
        "pinned_cert": pki.self_signed(HOST),
        "pinned_key": pki.self_signed(HOST),
    }
    return certificates[kind], ca.pem


@pytest.mark.parametrize(
    ("mode", "server", "expected"),
    [(m, s, o) for m, row in MATRIX.items() for s, o in zip(SERVERS, row, strict=True)],
    ids=[f"{m.value}-{s}" for m in MATRIX for s in SERVERS],
)
def test_tls_matrix(pki: Pki, mode: TlsMode, server: str, expected: str) -> None:
    certificate, ca_pem = server_certificate(pki, server)
    pins: tuple[str, ...] = ()
    if mode is TlsMode.SELF_SIGNED and certificate is not None and server.startswith("pinned"):
        pins = (certificate.cert_pin,) if server == "pinned_cert" else (certificate.key_pin,)
    policy = TlsPolicy(
        mode=mode,
        certificate_name=HOST if mode is TlsMode.NAME_MATCH else None,
        ca_bundle=ca_pem if mode.verifies_chain else None,
        pinned_fingerprints=pins,
    )

    async def scenario() -> tuple[DeliveryReport, SmtpSink]:
        sink = SmtpSink(
            cert_file=certificate.cert_file if certificate else None,
            key_file=certificate.key_file if certificate else None,
        )
        async with sink:
            report = await send(deliverer(), SmartHost("127.0.0.1", sink.port), policy)
        return report, sink

    report, sink = run(scenario)
    status = report.results[0].status
    if expected == DEFER:
        assert status is DeliveryStatus.DEFERRED
        assert sink.messages == []
        assert report.tls_failure is not None
        assert report.tls_failure.value == EXPECTED_FAILURE[server]
        assert report.results[0].message.startswith("4.7.5 ")
    else:
        assert status is DeliveryStatus.DELIVERED
        (received,) = sink.messages
        assert received.data == MESSAGE
        assert received.tls is (expected == TLS)
        assert (report.tls_version is not None) is (expected == TLS)
        # Only modes that check something call the certificate verified.
        assert report.verified is (expected == TLS and (mode.verifies_chain or bool(pins)))


def test_a_wrong_pin_defers_self_signed(pki: Pki) -> None:
    certificate = pki.self_signed(HOST)
    other = pki.self_signed(HOST)
    policy = TlsPolicy(TlsMode.SELF_SIGNED, pinned_fingerprints=(other.cert_pin, other.key_pin))

    async def scenario() -> tuple[DeliveryReport, SmtpSink]:
        async with SmtpSink(cert_file=certificate.cert_file, key_file=certificate.key_file) as sink:
            return await send(deliverer(), SmartHost("127.0.0.1", sink.port), policy), sink

    report, sink = run(scenario)
    assert report.results[0].status is DeliveryStatus.DEFERRED
    assert report.tls_failure is not None
    assert report.tls_failure.value == "pin_mismatch"
    assert sink.messages == []


def test_sni_carries_the_recipient_domain_for_domain_match(pki: Pki) -> None:
    ca = pki.ca()
    certificate = ca.issue(HOST)
    policy = TlsPolicy(TlsMode.DOMAIN_MATCH, ca_bundle=ca.pem)

    async def scenario() -> SmtpSink:
        async with SmtpSink(cert_file=certificate.cert_file, key_file=certificate.key_file) as sink:
            await send(deliverer(), SmartHost("127.0.0.1", sink.port), policy)
            return sink

    assert run(scenario).messages[0].server_name == DOMAIN


# --- replies -----------------------------------------------------------------------------


def test_each_recipient_gets_its_own_outcome() -> None:
    async def scenario() -> DeliveryReport:
        sink = SmtpSink(
            rcpt_replies={
                "later@contoso.example": "450 4.2.0 mailbox busy",
                "never@contoso.example": "550 5.1.1 no such user",
            }
        )
        async with sink:
            return await send(
                deliverer(),
                SmartHost("127.0.0.1", sink.port),
                TlsPolicy(),
                ("ok@contoso.example", "later@contoso.example", "never@contoso.example"),
            )

    report = run(scenario)
    assert [(r.recipient, r.status, r.code) for r in report.results] == [
        ("ok@contoso.example", DeliveryStatus.DELIVERED, 250),
        ("later@contoso.example", DeliveryStatus.DEFERRED, 450),
        ("never@contoso.example", DeliveryStatus.FAILED, 550),
    ]
    assert report.results[2].message == "550 5.1.1 no such user"


def test_a_5xx_after_data_fails_every_accepted_recipient() -> None:
    async def scenario() -> DeliveryReport:
        async with SmtpSink(data_reply="554 5.7.1 content rejected") as sink:
            return await send(
                deliverer(),
                SmartHost("127.0.0.1", sink.port),
                TlsPolicy(),
                ("a@contoso.example", "b@contoso.example"),
            )

    report = run(scenario)
    assert {r.status for r in report.results} == {DeliveryStatus.FAILED}
    assert report.results[0].message == "554 5.7.1 content rejected"


def test_an_unreachable_smart_host_defers() -> None:
    report = run(lambda: send(deliverer(), SmartHost("127.0.0.1", closed_port()), TlsPolicy()))
    assert report.results[0].status is DeliveryStatus.DEFERRED
    assert report.results[0].message.startswith("4.4.1 cannot connect")


# --- profiles ----------------------------------------------------------------------------


def pool(ports: list[int], balancing: Balancing = Balancing.ROUND_ROBIN) -> ProfilePool:
    return ProfilePool(
        ObjectRef("mail", "pool"), tuple(ServerAddress("127.0.0.1", p) for p in ports), balancing
    )


def test_round_robin_spreads_messages_across_the_servers() -> None:
    async def scenario() -> list[int]:
        sinks = [SmtpSink(), SmtpSink(), SmtpSink()]
        for sink in sinks:
            await sink.start()
        try:
            engine = deliverer()
            destination = pool([s.port for s in sinks])
            for _ in range(9):
                report = await send(engine, destination, TlsPolicy())
                assert report.results[0].status is DeliveryStatus.DELIVERED
            return [len(s.messages) for s in sinks]
        finally:
            for sink in sinks:
                await sink.stop()

    assert run(scenario) == [3, 3, 3]


def test_round_robin_fails_over_when_a_server_is_down() -> None:
    async def scenario() -> tuple[list[int], list[DeliveryReport]]:
        async with SmtpSink() as first, SmtpSink() as third:
            engine = deliverer()
            destination = pool([first.port, closed_port(), third.port])
            reports = [await send(engine, destination, TlsPolicy()) for _ in range(6)]
            return [len(first.messages), len(third.messages)], reports

    counts, reports = run(scenario)
    assert all(r.results[0].status is DeliveryStatus.DELIVERED for r in reports)
    assert sum(counts) == 6
    assert min(counts) >= 2
    # The dead server was tried (and failed over from) at least once.
    assert any(a.outcome.startswith("4.4.1 cannot connect") for r in reports for a in r.attempts)


def test_a_server_that_keeps_failing_is_skipped_for_a_while() -> None:
    async def scenario() -> list[DeliveryReport]:
        async with SmtpSink() as alive:
            engine = deliverer(failures_before_down=2, down_for=60)
            destination = pool([closed_port(), alive.port], Balancing.FAILOVER)
            return [await send(engine, destination, TlsPolicy()) for _ in range(4)]

    reports = run(scenario)
    assert [len(r.attempts) for r in reports] == [2, 2, 1, 1]


def test_failover_balancing_uses_the_listed_order() -> None:
    async def scenario() -> list[int]:
        async with SmtpSink() as primary, SmtpSink() as backup:
            engine = deliverer()
            for _ in range(4):
                await send(
                    engine, pool([primary.port, backup.port], Balancing.FAILOVER), TlsPolicy()
                )
            return [len(primary.messages), len(backup.messages)]

    assert run(scenario) == [4, 0]


def test_a_4xx_recipient_is_offered_to_the_next_server_of_the_profile() -> None:
    async def scenario() -> tuple[DeliveryReport, list[int]]:
        async with (
            SmtpSink(rcpt_replies={"b@contoso.example": "451 4.3.0 greylisted"}) as first,
            SmtpSink() as second,
        ):
            report = await send(
                deliverer(), pool([first.port, second.port], Balancing.FAILOVER), TlsPolicy()
            )
            return report, [len(first.messages), len(second.messages)]

    report, counts = run(scenario)
    assert report.results[0].status is DeliveryStatus.DELIVERED
    assert counts == [0, 1]


# --- credentials -------------------------------------------------------------------------


def test_credentials_are_sent_over_tls(pki: Pki) -> None:
    ca = pki.ca()
    certificate = ca.issue(HOST)
    policy = TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=ca.pem)

    async def scenario() -> SmtpSink:
        async with SmtpSink(
            cert_file=certificate.cert_file,
            key_file=certificate.key_file,
            users={"relay": "s3cret"},
        ) as sink:
            report = await send(
                deliverer(),
                SmartHost("127.0.0.1", sink.port),
                policy,
                auth=SmtpCredentials("relay", "s3cret"),
            )
            assert report.results[0].status is DeliveryStatus.DELIVERED
            return sink

    assert run(scenario).messages[0].authenticated_as == "relay"


def test_credentials_are_never_sent_without_tls() -> None:
    async def scenario() -> tuple[DeliveryReport, SmtpSink]:
        async with SmtpSink(users={"relay": "s3cret"}) as sink:
            report = await send(
                deliverer(),
                SmartHost("127.0.0.1", sink.port),
                TlsPolicy(),
                auth=SmtpCredentials("relay", "s3cret"),
            )
            return report, sink

    report, sink = run(scenario)
    assert report.results[0].status is DeliveryStatus.DEFERRED
    assert "only sent over TLS" in report.results[0].message
    assert sink.messages == []


def test_refused_credentials_defer_and_never_bounce(pki: Pki) -> None:
    ca = pki.ca()
    certificate = ca.issue(HOST)
    policy = TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=ca.pem)

    async def scenario() -> DeliveryReport:
        async with SmtpSink(
            cert_file=certificate.cert_file,
            key_file=certificate.key_file,
            users={"relay": "s3cret"},
        ) as sink:
            return await send(
                deliverer(),
                SmartHost("127.0.0.1", sink.port),
                policy,
                auth=SmtpCredentials("relay", "wrong"),
            )

    report = run(scenario)
    assert report.results[0].status is DeliveryStatus.DEFERRED
    assert report.results[0].message.startswith("4.7.8 authentication failed: 535")
    assert "wrong" not in report.results[0].message


# --- connection reuse ------------------------------------------------------------------------


def reusing(**settings: object) -> Deliverer:
    return deliverer(idle_connections_per_target=2, **settings)


def test_connections_are_reused_for_the_next_message_to_the_same_server() -> None:
    async def scenario() -> tuple[int, int, int]:
        async with SmtpSink() as sink:
            engine = reusing()
            for _ in range(5):
                report = await send(engine, SmartHost("127.0.0.1", sink.port), TlsPolicy())
                assert report.results[0].status is DeliveryStatus.DELIVERED
            open_before_close = sink.sessions
            await engine.close()
            await asyncio.sleep(0.1)
            return sink.connections, len(sink.messages), open_before_close - sink.sessions

    connections, delivered, closed = run(scenario)
    assert (connections, delivered, closed) == (1, 5, 1)


def test_a_reused_connection_keeps_its_verified_tls(pki: Pki) -> None:
    ca = pki.ca()
    certificate = ca.issue(HOST)
    policy = TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=ca.pem)

    async def scenario() -> tuple[list[DeliveryReport], int]:
        async with SmtpSink(cert_file=certificate.cert_file, key_file=certificate.key_file) as sink:
            engine = reusing()
            reports = [
                await send(engine, SmartHost("127.0.0.1", sink.port), policy) for _ in range(3)
            ]
            await engine.close()
            return reports, sink.connections

    reports, connections = run(scenario)
    assert connections == 1
    assert all(r.tls_version is not None and r.verified for r in reports)


def test_connections_are_not_shared_between_different_tls_policies(pki: Pki) -> None:
    ca = pki.ca()
    certificate = ca.issue(HOST)

    async def scenario() -> int:
        async with SmtpSink(cert_file=certificate.cert_file, key_file=certificate.key_file) as sink:
            engine = reusing()
            await send(engine, SmartHost("127.0.0.1", sink.port), TlsPolicy())
            await send(
                engine,
                SmartHost("127.0.0.1", sink.port),
                TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=ca.pem),
            )
            await engine.close()
            return sink.connections

    assert run(scenario) == 2


def test_an_idle_connection_the_server_closed_is_replaced_transparently() -> None:
    async def scenario() -> tuple[DeliveryReport, int]:
        sink = SmtpSink()
        await sink.start()
        port = sink.port
        engine = reusing()
        await send(engine, SmartHost("127.0.0.1", port), TlsPolicy())
        await sink.stop()  # the idle connection dies with the server
        async with SmtpSink(port=port) as again:
            report = await send(engine, SmartHost("127.0.0.1", port), TlsPolicy())
            await engine.close()
            return report, len(again.messages)

    report, delivered = run(scenario)
    assert report.results[0].status is DeliveryStatus.DELIVERED
    assert delivered == 1


def test_idle_connections_are_closed_after_their_idle_time() -> None:
    async def scenario() -> tuple[int, int]:
        async with SmtpSink() as sink:
            engine = reusing(idle_connection_seconds=0.1)
            await send(engine, SmartHost("127.0.0.1", sink.port), TlsPolicy())
            await asyncio.sleep(0.3)
            await send(engine, SmartHost("127.0.0.1", sink.port), TlsPolicy())
            await engine.close()
            return sink.connections, len(sink.messages)

    assert run(scenario) == (2, 2)


def strict_hop(
    mode: str,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A next hop that keeps the transaction open after refusing DATA (as RFC 5321 allows
    and Postfix does), or closes with 421 at the second MAIL of a connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transaction, mails = False, 0
        try:
            writer.write(b"220 hop ESMTP\r\n")
            while line := await reader.readline():
                command = line.decode().strip().upper()
                if command.startswith(("EHLO", "HELO")):
                    writer.write(b"250 hop\r\n")
                elif command.startswith("MAIL"):
                    mails += 1
                    if mode == "421" and mails > 1:
                        writer.write(b"421 4.7.0 too many messages on this connection\r\n")
                        return
                    writer.write(
                        b"503 5.5.1 nested MAIL command\r\n" if transaction else b"250 2.1.0 ok\r\n"
                    )
                    transaction = True
                elif command.startswith("RCPT"):
                    writer.write(b"250 2.1.5 ok\r\n")
                elif command == "DATA" and mode == "data" and mails == 1:
                    writer.write(
                        b"451 4.3.0 try DATA again later\r\n"
                    )  # the transaction stays open
                elif command == "DATA":
                    writer.write(b"354 go\r\n")
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    transaction = False
                    writer.write(b"250 2.0.0 queued\r\n")
                elif command == "RSET":
                    transaction = False
                    writer.write(b"250 2.0.0 ok\r\n")
                elif command == "QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                await writer.drain()
        finally:
            writer.close()

    return handle


@pytest.mark.parametrize("mode", ["data", "421"])
def test_a_reused_connection_never_spoils_the_next_message(mode: str) -> None:
    async def scenario() -> list[DeliveryStatus]:
        server = await asyncio.start_server(strict_hop(mode), "127.0.0.1", 0)
        async with server:
            engine = reusing()
            port = server.sockets[0].getsockname()[1]
            first = await send(engine, SmartHost("127.0.0.1", port), TlsPolicy())
            second = await send(engine, SmartHost("127.0.0.1", port), TlsPolicy())
            await engine.close()
            return [first.results[0].status, second.results[0].status]

    expected = DeliveryStatus.DEFERRED if mode == "data" else DeliveryStatus.DELIVERED
    assert run(scenario) == [expected, DeliveryStatus.DELIVERED]


def test_a_connection_whose_data_was_refused_is_reset_before_the_next_message() -> None:
    async def scenario() -> tuple[list[DeliveryStatus], int]:
        async with SmtpSink(data_reply="451 4.3.0 try DATA again later") as sink:
            engine = reusing()
            first = await send(engine, SmartHost("127.0.0.1", sink.port), TlsPolicy())
            sink.data_reply = None
            second = await send(engine, SmartHost("127.0.0.1", sink.port), TlsPolicy())
            await engine.close()
            return [first.results[0].status, second.results[0].status], len(sink.messages)

    statuses, delivered = run(scenario)
    assert statuses == [DeliveryStatus.DEFERRED, DeliveryStatus.DELIVERED]
    assert delivered == 1
