"""Delivery to Postfix's smtpd: pipelining on and off, refusals, implicit TLS (wrapper mode).

The next hop is a private Postfix instance on loopback (:mod:`postfix_smtpd`) that relays
what it accepts to Postfix's smtp-sink. Between the relay's :class:`Deliverer` and smtpd a
small TCP proxy records what the client wrote, chunk by chunk: a pipelined transaction
arrives as one chunk holding MAIL, every RCPT and DATA; a sequential one never holds two
commands. Postfix itself checks the other direction: with PIPELINING not offered and
``smtpd_forbid_unauth_pipelining = yes`` a client that pipelines anyway is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailflow_operator.probes import ServerProbe, probe_server
from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.outbound.pipelining import PipelinedSteps
from mailflow_relay.routing.document import (
    Balancing,
    ObjectRef,
    ProfilePool,
    ServerAddress,
    SmartHost,
    TlsMode,
    TlsPolicy,
)
from peers import LOCALHOST, SmtpSink
from pki import Issued, Pki
from postfix_smtpd import PostfixSmtpd
from support import run

DOMAIN = "contoso.example"
HOST = "mx.contoso.example"
SENDER = "a@sender.example"
MESSAGE = b"From: a@sender.example\r\nTo: b@contoso.example\r\nSubject: hi\r\n\r\n.Hello.\r\n"
OK = ("one@contoso.example", "two@contoso.example")
REFUSED = "refused@contoso.example"
LATER = "later@contoso.example"
PLAIN = TlsPolicy(TlsMode.OPPORTUNISTIC)


def access_settings(smtpd: PostfixSmtpd) -> dict[str, str]:
    recipients = smtpd.table(
        "recipients", {REFUSED: "REJECT no such user", LATER: "450 4.2.0 mailbox busy"}
    )
    senders = smtpd.table("senders", {"refused@sender.example": "REJECT sender refused"})
    return {
        "smtpd_recipient_restrictions": f"check_recipient_access {recipients}, permit_mynetworks",
        "smtpd_sender_restrictions": f"check_sender_access {senders}",
        # Refuse MAIL FROM at MAIL, not at the first RCPT (Postfix's default).
        "smtpd_delay_reject": "no",
    }


def postfix(sink: SmtpSink, **settings: str) -> Iterator[PostfixSmtpd]:
    smtpd = PostfixSmtpd(relay_port=sink.port, settings={})
    smtpd.settings.update(access_settings(smtpd))
    smtpd.settings.update(settings)
    with smtpd:
        yield smtpd


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture(scope="module")
def pipelining(sink: SmtpSink) -> Iterator[PostfixSmtpd]:
    yield from postfix(sink)


@pytest.fixture(scope="module")
def sequential(sink: SmtpSink) -> Iterator[PostfixSmtpd]:
    yield from postfix(
        sink, smtpd_discard_ehlo_keywords="pipelining", smtpd_forbid_unauth_pipelining="yes"
    )


@dataclass
class RecordingProxy:
    """127.0.0.1:port → smtpd; records every chunk the client wrote, per connection."""

    upstream: int
    port: int = 0
    connections: list[list[bytes]] = field(default_factory=list)
    _handlers: list[asyncio.Future[None]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handlers.append(done)
        chunks: list[bytes] = []
        self.connections.append(chunks)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(LOCALHOST, self.upstream), 5
            )
            async with asyncio.timeout(30), asyncio.TaskGroup() as group:
                group.create_task(self._pump(reader, up_writer, chunks))
                group.create_task(self._pump(up_reader, writer, None))
        except* (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            done.set_result(None)

    @staticmethod
    async def _pump(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: list[bytes] | None
    ) -> None:
        try:
            while data := await source.read(65536):
                if record is not None:
                    record.append(data)
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def finished(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self._handlers), 10)

    def commands(self) -> list[list[bytes]]:
        """Per chunk the client wrote (message content left out), the command verbs in it."""
        verbs = []
        for chunks in self.connections:
            for chunk in chunks:
                lines = [line.split(b" ")[0].split(b":")[0].upper() for line in chunk.splitlines()]
                verbs.append([v for v in lines if v in {b"MAIL", b"RCPT", b"DATA", b"RSET"}])
        return [v for v in verbs if v]


def deliverer(**settings: object) -> Deliverer:
    return Deliverer(
        DeliverySettings(helo_name="relay.test", connect_timeout=5, command_timeout=10, **settings),  # type: ignore[arg-type]
        Resolver(["127.0.0.1"], port=9, timeout=1),  # never asked: the tests use addresses
    )


async def deliver(
    engine: Deliverer,
    port: int,
    recipients: tuple[str, ...],
    *,
    sender: str = SENDER,
    tls: TlsPolicy = PLAIN,
    implicit_tls: bool = False,
) -> DeliveryReport:
    return await engine.deliver(
        mail_from=sender,
        recipients=recipients,
        data=MESSAGE,
        destination=SmartHost(LOCALHOST, port, implicit_tls=implicit_tls),
        tls=tls,
        auth=None,
        recipient_domain=DOMAIN,
    )


def through_proxy(
    smtpd: PostfixSmtpd, *messages: tuple[str, tuple[str, ...]], **settings: object
) -> tuple[list[DeliveryReport], RecordingProxy]:
    """Deliver ``(sender, recipients)`` messages one after the other on one Deliverer."""

    async def scenario() -> tuple[list[DeliveryReport], RecordingProxy]:
        proxy = RecordingProxy(smtpd.port)
        server = await asyncio.start_server(proxy.handle, LOCALHOST, 0)
        proxy.port = server.sockets[0].getsockname()[1]
        engine = deliverer(**settings)
        try:
            reports = [
                await deliver(engine, proxy.port, recipients, sender=sender)
                for sender, recipients in messages
            ]
        finally:
            await engine.close()
            server.close()
            await server.wait_closed()
        await proxy.finished()
        return reports, proxy

    return run(scenario)


def outcomes(report: DeliveryReport) -> list[tuple[str, DeliveryStatus, int]]:
    return [(r.recipient, r.status, r.code) for r in report.results]


EXPECTED = [
    (OK[0], DeliveryStatus.DELIVERED, 250),
    (REFUSED, DeliveryStatus.FAILED, 554),
    (LATER, DeliveryStatus.DEFERRED, 450),
    (OK[1], DeliveryStatus.DELIVERED, 250),
]
RECIPIENTS = tuple(r for r, _, _ in EXPECTED)


def test_a_pipelined_transaction_writes_mail_every_rcpt_and_data_at_once(
    pipelining: PostfixSmtpd, sink: SmtpSink
) -> None:
    before = len(sink.messages())
    (report,), proxy = through_proxy(pipelining, (SENDER, RECIPIENTS))
    assert outcomes(report) == EXPECTED
    assert "Recipient address rejected: no such user" in report.results[1].message
    assert proxy.commands() == [[b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"RCPT", b"DATA"]]
    messages = sink.wait_for(before + 1)
    relayed = messages[-1]
    assert sorted(relayed.recipients) == sorted(OK)
    assert b".Hello." in relayed.data  # the leading dot was stuffed, and unstuffed by smtpd


def test_without_pipelining_each_command_waits_for_its_reply(
    sequential: PostfixSmtpd, sink: SmtpSink
) -> None:
    before = len(sink.messages())
    (report,), proxy = through_proxy(sequential, (SENDER, RECIPIENTS))
    assert outcomes(report) == EXPECTED
    assert proxy.commands() == [[b"MAIL"], [b"RCPT"], [b"RCPT"], [b"RCPT"], [b"RCPT"], [b"DATA"]]
    sink.wait_for(before + 1)
    assert "improper command pipelining" not in sequential.log_tail(100_000)


def test_pipelining_can_be_turned_off(pipelining: PostfixSmtpd) -> None:
    (report,), proxy = through_proxy(pipelining, (SENDER, OK), pipelining=False)
    assert [r.status for r in report.results] == [DeliveryStatus.DELIVERED] * 2
    assert proxy.commands() == [[b"MAIL"], [b"RCPT"], [b"RCPT"], [b"DATA"]]


@pytest.mark.parametrize("hop", ["pipelining", "sequential"])
def test_a_refused_sender_fails_every_recipient_and_the_connection_serves_the_next_message(
    hop: str, request: pytest.FixtureRequest
) -> None:
    smtpd: PostfixSmtpd = request.getfixturevalue(hop)
    refused, accepted = through_proxy(
        smtpd, ("refused@sender.example", OK), (SENDER, OK[:1]), idle_connections_per_target=2
    )[0]
    assert [(r.status, r.code) for r in refused.results] == [(DeliveryStatus.FAILED, 554)] * 2
    assert "sender refused" in refused.results[0].message
    assert outcomes(accepted) == [(OK[0], DeliveryStatus.DELIVERED, 250)]


@pytest.mark.parametrize("hop", ["pipelining", "sequential"])
def test_every_recipient_refused_leaves_the_connection_in_step_for_the_next_message(
    hop: str, request: pytest.FixtureRequest
) -> None:
    smtpd: PostfixSmtpd = request.getfixturevalue(hop)
    (refused, accepted), proxy = through_proxy(
        smtpd, (SENDER, (REFUSED, LATER)), (SENDER, OK), idle_connections_per_target=2
    )
    assert outcomes(refused) == [
        (REFUSED, DeliveryStatus.FAILED, 554),
        (LATER, DeliveryStatus.DEFERRED, 450),
    ]
    assert [r.status for r in accepted.results] == [DeliveryStatus.DELIVERED] * 2
    assert len(proxy.connections) == 1  # reused, after DATA's "554 no valid recipients"
    if hop == "pipelining":
        # RFC 2920: DATA went with the group and was answered (554), then RSET.
        assert proxy.commands()[:2] == [[b"MAIL", b"RCPT", b"RCPT", b"DATA"], [b"RSET"]]


# --- implicit TLS: smtpd in wrapper mode, as on port 465 ------------------------------------


@dataclass(frozen=True)
class WrapperHop:
    smtpd: PostfixSmtpd
    certificate: Issued
    ca_pem: str
    other_ca_pem: str


@pytest.fixture(scope="module")
def wrapper(sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WrapperHop]:
    folder: Path = tmp_path_factory.mktemp("pki")
    folder.chmod(0o755)
    pki = Pki(folder)
    ca = pki.ca()
    certificate = ca.issue(HOST)
    for path in (certificate.cert_file, certificate.key_file):
        path.chmod(0o644)
    settings = {
        "smtpd_tls_wrappermode": "yes",
        "smtpd_tls_security_level": "encrypt",
        "smtpd_tls_cert_file": str(certificate.cert_file),
        "smtpd_tls_key_file": str(certificate.key_file),
    }
    for smtpd in postfix(sink, **settings):
        yield WrapperHop(smtpd, certificate, ca.pem, pki.ca("Somebody Else's CA").pem)


def policies(hop: WrapperHop) -> dict[str, TlsPolicy]:
    return {
        "opportunistic": PLAIN,
        "trusted_ca": TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=hop.ca_pem),
        "domain_match": TlsPolicy(TlsMode.DOMAIN_MATCH, ca_bundle=hop.ca_pem),
        "name_match": TlsPolicy(TlsMode.NAME_MATCH, certificate_name=HOST, ca_bundle=hop.ca_pem),
        "pinned": TlsPolicy(TlsMode.SELF_SIGNED, pinned_fingerprints=(hop.certificate.key_pin,)),
        "untrusted": TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=hop.other_ca_pem),
        "wrong_name": TlsPolicy(
            TlsMode.NAME_MATCH, certificate_name="mail.fabrikam.example", ca_bundle=hop.ca_pem
        ),
        "wrong_pin": TlsPolicy(TlsMode.SELF_SIGNED, pinned_fingerprints=("sha256/" + "0" * 64,)),
    }


@pytest.mark.parametrize(
    ("policy", "failure"),
    [
        ("opportunistic", None),
        ("trusted_ca", None),
        ("domain_match", None),
        ("name_match", None),
        ("pinned", None),
        ("untrusted", "untrusted"),
        ("wrong_name", "name_mismatch"),
        ("wrong_pin", "pin_mismatch"),
    ],
)
def test_implicit_tls_applies_the_connectors_tls_mode_to_the_handshake(
    wrapper: WrapperHop, policy: str, failure: str | None
) -> None:
    tls = policies(wrapper)[policy]

    async def scenario() -> DeliveryReport:
        engine = deliverer()
        try:
            return await deliver(engine, wrapper.smtpd.port, OK[:1], tls=tls, implicit_tls=True)
        finally:
            await engine.close()

    report = run(scenario)
    (result,) = report.results
    if failure is None:
        assert (result.status, result.code) == (DeliveryStatus.DELIVERED, 250), result.message
        assert report.tls_version in ("TLSv1.2", "TLSv1.3")
        assert report.certificate is not None
        assert report.certificate.sha256 in wrapper.certificate.cert_pin
        assert report.verified is (policy != "opportunistic")
    else:
        assert result.status is DeliveryStatus.DEFERRED
        assert result.message.startswith("4.7.5 "), result.message
        assert report.tls_failure is not None
        assert report.tls_failure.value == failure


@pytest.fixture(scope="module")
def starttls(sink: SmtpSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WrapperHop]:
    folder: Path = tmp_path_factory.mktemp("pki-starttls")
    folder.chmod(0o755)
    pki = Pki(folder)
    ca = pki.ca()
    certificate = ca.issue(HOST)
    settings = {
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(certificate.cert_file),
        "smtpd_tls_key_file": str(certificate.key_file),
    }
    for smtpd in postfix(sink, **settings):
        yield WrapperHop(smtpd, certificate, ca.pem, pki.ca("Somebody Else's CA").pem)


def test_pipelining_after_starttls_delivers_over_the_verified_session(
    starttls: WrapperHop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The TLS transport hides the commands from a proxy: count the pipelined groups instead.
    groups: list[int] = []
    enter = PipelinedSteps.__aenter__

    async def counted(self: PipelinedSteps) -> PipelinedSteps:
        groups.append(self._commands)
        return await enter(self)

    monkeypatch.setattr(PipelinedSteps, "__aenter__", counted)
    tls = TlsPolicy(TlsMode.NAME_MATCH, certificate_name=HOST, ca_bundle=starttls.ca_pem)

    async def scenario() -> list[DeliveryReport]:
        engine = deliverer(idle_connections_per_target=2)
        try:
            return [
                await deliver(engine, starttls.smtpd.port, recipients, tls=tls)
                for recipients in (RECIPIENTS, OK)
            ]
        finally:
            await engine.close()

    first, second = run(scenario)
    assert outcomes(first) == EXPECTED
    assert [r.status for r in second.results] == [DeliveryStatus.DELIVERED] * 2
    assert first.tls_version in ("TLSv1.2", "TLSv1.3")
    assert first.verified
    assert second.verified  # the reused connection keeps its verified session
    assert groups == [len(RECIPIENTS) + 2, len(OK) + 2]


def test_without_implicit_tls_a_wrapper_mode_hop_never_greets(wrapper: WrapperHop) -> None:
    async def scenario() -> DeliveryReport:
        engine = Deliverer(
            DeliverySettings(helo_name="relay.test", connect_timeout=1, command_timeout=2),
            Resolver(["127.0.0.1"], port=9, timeout=1),
        )
        try:
            return await deliver(engine, wrapper.smtpd.port, OK[:1], tls=PLAIN)
        finally:
            await engine.close()

    (result,) = run(scenario).results
    assert result.status is DeliveryStatus.DEFERRED
    assert result.message.startswith("4.4.1 cannot connect"), result.message


def test_implicit_tls_to_a_plaintext_hop_is_a_handshake_failure(pipelining: PostfixSmtpd) -> None:
    async def scenario() -> DeliveryReport:
        engine = deliverer()
        try:
            return await deliver(engine, pipelining.port, OK[:1], implicit_tls=True)
        finally:
            await engine.close()

    report = run(scenario)
    (result,) = report.results
    assert result.status is DeliveryStatus.DEFERRED
    assert report.tls_failure is not None
    assert report.tls_failure.value == "handshake"


@pytest.mark.parametrize(("policy", "verified"), [("trusted_ca", True), ("wrong_name", False)])
def test_the_operators_probe_speaks_implicit_tls_too(
    wrapper: WrapperHop, policy: str, verified: bool
) -> None:
    async def scenario() -> ServerProbe:
        return await probe_server(
            ServerAddress(LOCALHOST, wrapper.smtpd.port),
            policies(wrapper)[policy],
            DOMAIN,
            step_timeout=5,
            implicit_tls=True,
        )

    probe = run(scenario)
    assert probe.reachable, probe.message
    assert probe.tls_ok is verified, probe.tls_message
    assert probe.tls_reason == ("Verified" if verified else "NameMismatch"), probe.tls_reason


def test_a_profile_server_with_implicit_tls_is_reached_with_tls_on_connect(
    wrapper: WrapperHop, pipelining: PostfixSmtpd
) -> None:
    pool = ProfilePool(
        ObjectRef("mail", "pool"),
        (
            ServerAddress(LOCALHOST, wrapper.smtpd.port, implicit_tls=True),
            ServerAddress(LOCALHOST, pipelining.port),
        ),
        Balancing.FAILOVER,
    )
    tls = TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=wrapper.ca_pem)

    async def scenario() -> DeliveryReport:
        engine = deliverer()
        try:
            return await engine.deliver(
                mail_from=SENDER,
                recipients=OK[:1],
                data=MESSAGE,
                destination=pool,
                tls=tls,
                auth=None,
                recipient_domain=DOMAIN,
            )
        finally:
            await engine.close()

    report = run(scenario)
    assert [r.status for r in report.results] == [DeliveryStatus.DELIVERED]
    assert report.server == f"{LOCALHOST}:{wrapper.smtpd.port}"
    assert report.verified
