"""MTA-STS (RFC 8461) against NSD for the TXT records and a real HTTPS server for the policies.

The HTTPS server has a certificate from the test CA for every ``mta-sts.<domain>`` name and
answers by the Host header; the MX hosts are real SMTP servers with STARTTLS on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailflow_cli.resolve import lines_for
from mailflow_relay.outbound.dane import Dane
from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.outbound.mta_sts import (
    MtaSts,
    StsMode,
    StsPolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
)
from mailflow_relay.outbound.tls_policy import TlsFailure
from mailflow_relay.outbound.tlsrpt import TlsReportStore, build_report
from mailflow_relay.routing.document import MtaStsMode, RecipientMx, TlsMode, TlsPolicy
from mailflow_relay.testing.sink import SmtpSink
from peers import DnsServer, free_port, require
from pki import CertificateAuthority, Issued, Pki
from support import run
from tlsrpt_schema import validate_report

MESSAGE = b"Subject: sts\r\n\r\nhello\r\n"


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


@dataclass
class PolicyServer:
    """HTTPS on 127.0.0.51: the policy of each domain by Host, or a given raw response."""

    cert: Issued
    port: int
    responses: dict[str, bytes] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None

    def serve(self, domain: str, body: str, *, status: str = "200 OK", extra: str = "") -> None:
        data = body.encode()
        self.responses[f"mta-sts.{domain}"] = (
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        ).encode() + data

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            host = ""
            for line in head.decode("latin-1").split("\r\n"):
                if line.lower().startswith("host:"):
                    host = line.partition(":")[2].strip()
            self.requests.append(host)
            writer.write(self.responses.get(host, b"HTTP/1.1 404 Not Found\r\n\r\n"))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def __aenter__(self) -> PolicyServer:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert.cert_file, self.cert.key_file)
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.51", self.port, ssl=context
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


DOMAINS = ("sts.test", "wrongmx.test", "testing.test", "redirect.test", "huge.test", "html.test")


@dataclass
class World:
    dns: DnsServer
    ca: CertificateAuthority
    ca_file: Path
    policy_cert: Issued
    mx_cert: dict[str, Issued]
    smtp_port: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require("nsd")
    folder = tmp_path_factory.mktemp("sts-pki")
    pki = Pki(folder)
    ca = pki.ca("MTA-STS Test CA")
    ca_file = folder / "ca.pem"
    ca_file.write_text(ca.pem)
    policy_cert = ca.issue(*(f"mta-sts.{d}" for d in DOMAINS))
    zones: dict[str, list[str]] = {}
    mx_cert: dict[str, Issued] = {}
    for i, domain in enumerate(DOMAINS):
        zones[domain] = [
            f'_mta-sts TXT "v=STSv1; id=2026{i}"',
            "mta-sts A 127.0.0.51",
            f"@ MX 10 mx.{domain}.",
            f"mx A 127.0.0.{60 + i}",
        ]
        mx_cert[domain] = ca.issue(f"mx.{domain}")
    zones["nopolicy.test"] = ["@ MX 10 mx.nopolicy.test.", "mx A 127.0.0.70"]
    with DnsServer(zones) as dns:
        yield World(dns, ca, ca_file, policy_cert, mx_cert, free_port())


def deliverer(world: World, https_port: int, cache: Path | None = None) -> Deliverer:
    resolver = Resolver([world.dns.address], port=world.dns.port, timeout=2)
    sts = MtaSts(resolver, https_port=https_port, cafile=str(world.ca_file), cache_file=cache)
    return Deliverer(
        DeliverySettings(
            helo_name="relay.test", mx_port=world.smtp_port, connect_timeout=3, command_timeout=10
        ),
        resolver,
        dane=Dane(None, sts),
    )


STS = TlsPolicy(TlsMode.OPPORTUNISTIC, mta_sts=MtaStsMode.OPPORTUNISTIC)


def deliver_to(
    world: World, domain: str, index: int, policies: dict[str, str]
) -> tuple[DeliveryReport, SmtpSink, PolicyServer]:
    https_port = free_port()

    async def scenario() -> tuple[DeliveryReport, SmtpSink, PolicyServer]:
        server = PolicyServer(world.policy_cert, https_port)
        for name, text in policies.items():
            server.serve(name, text)
        cert = world.mx_cert[domain]
        async with (
            server,
            SmtpSink(
                host=f"127.0.0.{60 + index}",
                port=world.smtp_port,
                cert_file=cert.cert_file,
                key_file=cert.key_file,
            ) as sink,
        ):
            engine = deliverer(world, https_port)
            try:
                report = await engine.deliver(
                    mail_from="a@sender.test",
                    recipients=[f"b@{domain}"],
                    data=MESSAGE,
                    destination=RecipientMx(),
                    tls=STS,
                    auth=None,
                    recipient_domain=domain,
                )
            finally:
                await engine.close()
            return report, sink, server

    return run(scenario)


def test_enforce_with_a_listed_mx_delivers_verified(world: World) -> None:
    report, sink, server = deliver_to(
        world, "sts.test", 0, {"sts.test": policy_text("enforce", "mx.sts.test")}
    )
    assert [(r.policy_type, r.result_type) for r in report.policy_results] == [("sts", None)]
    assert report.results[0].status is DeliveryStatus.DELIVERED, report.results
    assert report.verified  # Opportunistic connector, made NameMatch(mx host) by the policy
    assert sink.last_server_name == "mx.sts.test"
    assert server.requests == ["mta-sts.sts.test"]


def test_enforce_with_a_non_matching_mx_defers(world: World) -> None:
    report, sink, _ = deliver_to(
        world, "wrongmx.test", 1, {"wrongmx.test": policy_text("enforce", "*.elsewhere.test")}
    )
    assert report.results[0].status is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.STS_MX_MISMATCH
    assert sink.connections == 0


def test_testing_mode_delivers_despite_a_non_matching_mx(world: World) -> None:
    report, sink, _ = deliver_to(
        world, "testing.test", 2, {"testing.test": policy_text("testing", "other.testing.test")}
    )
    assert report.results[0].status is DeliveryStatus.DELIVERED
    assert not report.verified
    assert sink.messages
    # ... and reported: what enforce would have refused, in an RFC 8460 report.
    (result,) = report.policy_results
    assert (result.policy_type, result.result_type, result.failure_reason_code) == (
        "sts",
        "validation-failure",
        "mx-not-in-policy",
    )
    assert "mode: testing" in result.policy_strings
    store = TlsReportStore()
    store.record(result)
    start = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    validate_report(
        build_report(
            organization="Mailflow tests",
            contact="mailto:tlsrpt@relay.test",
            report_id="r1",
            start=start,
            end=start + datetime.timedelta(days=1),
            policies=store.take("testing.test"),
        )
    )


# --- fetching ---------------------------------------------------------------------------------


def fetch(world: World, server_setup: dict[str, bytes], domain: str) -> str:
    https_port = free_port()

    async def scenario() -> str:
        server = PolicyServer(world.policy_cert, https_port)
        server.responses.update(server_setup)
        async with server:
            resolver = Resolver([world.dns.address], port=world.dns.port, timeout=2)
            sts = MtaSts(resolver, https_port=https_port, cafile=str(world.ca_file), timeout=3)
            try:
                policy = await sts.policy(domain)
            except StsPolicyError as e:
                return e.result_type
            return policy.mode.value if policy else "none found"

    return run(scenario)


def test_a_redirect_is_never_followed(world: World) -> None:
    response = (
        b"HTTP/1.1 301 Moved\r\nLocation: https://mta-sts.sts.test/\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
    )
    assert fetch(world, {"mta-sts.redirect.test": response}, "redirect.test") == (
        "sts-policy-fetch-error"
    )


def test_a_policy_over_64_kib_is_refused(world: World) -> None:
    body = policy_text("enforce", "mx.huge.test") + "x: " + "y" * 70_000 + "\r\n"
    data = body.encode()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )
    assert fetch(world, {"mta-sts.huge.test": response}, "huge.test") == "sts-policy-fetch-error"


def test_a_policy_that_is_not_text_plain_is_refused(world: World) -> None:
    data = policy_text("enforce", "mx.html.test").encode()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )
    assert fetch(world, {"mta-sts.html.test": response}, "html.test") == "sts-policy-fetch-error"


def test_a_policy_host_with_an_untrusted_certificate_is_refused(world: World, pki: Pki) -> None:
    https_port = free_port()
    stranger = pki.ca("Not the test CA").issue("mta-sts.sts.test")

    async def scenario() -> str:
        server = PolicyServer(stranger, https_port)
        server.serve("sts.test", policy_text("enforce", "mx.sts.test"))
        async with server:
            resolver = Resolver([world.dns.address], port=world.dns.port, timeout=2)
            sts = MtaSts(resolver, https_port=https_port, cafile=str(world.ca_file), timeout=3)
            with pytest.raises(StsPolicyError) as raised:
                await sts.policy("sts.test")
            return raised.value.result_type

    assert run(scenario) == "sts-webpki-invalid"


def test_a_domain_without_a_txt_record_has_no_policy(world: World) -> None:
    assert fetch(world, {}, "nopolicy.test") == "none found"


def test_the_cache_persists_refreshes_on_a_new_id_and_before_expiry(
    world: World, tmp_path: Path
) -> None:
    https_port = free_port()
    cache = tmp_path / "sts.json"
    now = [1_000_000.0]

    async def scenario() -> list[int]:
        server = PolicyServer(world.policy_cert, https_port)
        server.serve("sts.test", policy_text("enforce", "mx.sts.test", max_age=1000))
        fetches = []
        async with server:
            resolver = Resolver([world.dns.address], port=world.dns.port, timeout=2)

            def sts() -> MtaSts:
                return MtaSts(
                    resolver,
                    https_port=https_port,
                    cafile=str(world.ca_file),
                    cache_file=cache,
                    clock=lambda: now[0],
                )

            first = sts()
            await first.policy("sts.test")
            await first.policy("sts.test")
            fetches.append(len(server.requests))  # cached: 1
            restarted = sts()
            await restarted.policy("sts.test")
            fetches.append(len(server.requests))  # persisted across a restart: still 1
            now[0] += 600  # past half of max_age: fetched again before it expires
            await restarted.policy("sts.test")
            fetches.append(len(server.requests))
            # A new id in DNS makes the next use fetch again.
            cached = restarted._cache["sts.test"]
            restarted._cache["sts.test"] = type(cached)(**{**cached.__dict__, "id": "old"})
            await restarted.policy("sts.test")
            fetches.append(len(server.requests))
        return fetches

    assert run(scenario) == [1, 1, 2, 3]


# --- parsing, offline ----------------------------------------------------------------------------


def test_a_policy_is_parsed_as_rfc_8461_says() -> None:
    policy = parse_policy("x.test", "1", policy_text("enforce", "mx.x.test", "*.y.test"), 0.0)
    assert policy.mode is StsMode.ENFORCE
    assert policy.mx == ("mx.x.test", "*.y.test")
    assert policy.max_age == 86400


@pytest.mark.parametrize(
    "text",
    [
        "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 99999999999\n",
        "version: STSv1\nmode: enforce\nmx: a.test\n",
        "not a policy",
    ],
)
def test_malformed_policies_are_invalid(text: str) -> None:
    with pytest.raises(StsPolicyError) as raised:
        parse_policy("x.test", "1", text, 0.0)
    assert raised.value.result_type == "sts-policy-invalid"


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.x.test", "MX.x.test.", True),
        ("*.x.test", "mx.x.test", True),
        ("*.x.test", "a.mx.x.test", False),
        ("*.x.test", "x.test", False),
        ("mx.x.test", "mx2.x.test", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=abc123"], "abc123"),
        (["v=STSv1; id=abc123", "v=STSv1; id=def"], None),  # two records: no policy
        (["v=STSv1; id=not-alnum"], None),
        (["something else"], None),
    ],
)
def test_txt_discovery(texts: list[str], expected: str | None) -> None:
    assert parse_txt("x.test", texts) == expected


def test_explain_resolve_shows_the_mta_sts_policy_that_would_apply(world: World) -> None:
    https_port = free_port()

    async def scenario() -> list[str]:
        server = PolicyServer(world.policy_cert, https_port)
        server.serve("sts.test", policy_text("enforce", "mx.sts.test"))
        server.serve("wrongmx.test", policy_text("enforce", "*.elsewhere.test"))
        async with server:
            resolver = Resolver([world.dns.address], port=world.dns.port, timeout=2)
            sts = MtaSts(resolver, https_port=https_port, cafile=str(world.ca_file), timeout=3)
            lines: list[str] = []
            for domain in ("sts.test", "wrongmx.test"):
                lines += await lines_for(resolver, Dane(None, sts), RecipientMx(), STS, domain, 25)
            return lines

    lines = run(scenario)
    assert (
        "  mta-sts      mx.sts.test:25: enforce (TLS checks: NameMatch, certificateName mx.sts.test, connector CA bundle)"
        in lines
    )
    assert any(
        line.startswith("  dane         mx.wrongmx.test:25: failed: MTA-STS policy")
        for line in lines
    )
    assert "  mta-sts      mx.wrongmx.test:25: enforce-mismatch (TLS checks: the mode's)" in lines
