"""Delivery to MX hosts and named smart hosts, resolved by a real DNS server (NSD).

Each MX host is a real SMTP server on its own loopback address (127.0.0.x) and the
same port, which the deliverer uses as its MX port.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.routing.document import Destination, RecipientMx, SmartHost, TlsPolicy
from mailflow_relay.testing.sink import SmtpSink
from peers import DnsServer, free_port, require
from support import run

MESSAGE = b"Subject: mx\r\n\r\nhello\r\n"

ZONES = {
    "pref.test": [
        "@ MX 10 mx1.pref.test.",
        "@ MX 20 mx2.pref.test.",
        "mx1 A 127.0.0.11",
        "mx2 A 127.0.0.12",
    ],
    "equal.test": [
        "@ MX 10 mx1.equal.test.",
        "@ MX 10 mx2.equal.test.",
        "mx1 A 127.0.0.13",
        "mx2 A 127.0.0.14",
    ],
    "down.test": [
        "@ MX 10 mx1.down.test.",
        "@ MX 20 mx2.down.test.",
        "mx1 A 127.0.0.15",
        "mx2 A 127.0.0.16",
    ],
    "implicit.test": ["@ A 127.0.0.17"],
    "nullmx.test": ["@ MX 0 ."],
    "smarthost.test": ["relay A 127.0.0.18", "pool MX 10 relay.smarthost.test."],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    require("nsd")
    with DnsServer(ZONES, servfail=["broken.test"]) as server:
        yield server


def engine(dns_server: DnsServer, port: int) -> Deliverer:
    return Deliverer(
        DeliverySettings(
            helo_name="relay.test", mx_port=port, connect_timeout=3, command_timeout=10
        ),
        Resolver([dns_server.address], port=dns_server.port, timeout=2),
    )


async def deliver(
    deliverer: Deliverer, recipient: str, destination: Destination | None = None
) -> DeliveryReport:
    return await deliverer.deliver(
        mail_from="a@sender.test",
        recipients=[recipient],
        data=MESSAGE,
        destination=destination or RecipientMx(),
        tls=TlsPolicy(),
        auth=None,
        recipient_domain=recipient.rpartition("@")[2],
    )


def test_mx_hosts_are_tried_by_preference(dns_server: DnsServer) -> None:
    port = free_port()

    async def scenario() -> list[int]:
        async with (
            SmtpSink(host="127.0.0.11", port=port) as mx1,
            SmtpSink(host="127.0.0.12", port=port) as mx2,
        ):
            deliverer = engine(dns_server, port)
            for _ in range(5):
                report = await deliver(deliverer, "b@pref.test")
                assert report.results[0].status is DeliveryStatus.DELIVERED
            return [len(mx1.messages), len(mx2.messages)]

    assert run(scenario) == [5, 0]


def test_a_down_mx_falls_back_to_the_next_preference(dns_server: DnsServer) -> None:
    port = free_port()

    async def scenario() -> tuple[DeliveryReport, int]:
        async with SmtpSink(host="127.0.0.16", port=port) as mx2:
            report = await deliver(engine(dns_server, port), "b@down.test")
            return report, len(mx2.messages)

    report, delivered = run(scenario)
    assert report.results[0].status is DeliveryStatus.DELIVERED
    assert delivered == 1
    assert [a.target for a in report.attempts] == [
        f"mx1.down.test[127.0.0.15]:{port}",
        f"mx2.down.test[127.0.0.16]:{port}",
    ]


def test_equal_preference_mx_hosts_share_the_load(dns_server: DnsServer) -> None:
    port = free_port()

    async def scenario() -> list[int]:
        async with (
            SmtpSink(host="127.0.0.13", port=port) as mx1,
            SmtpSink(host="127.0.0.14", port=port) as mx2,
        ):
            deliverer = engine(dns_server, port)
            for _ in range(30):
                await deliver(deliverer, "b@equal.test")
            return [len(mx1.messages), len(mx2.messages)]

    counts = run(scenario)
    assert sum(counts) == 30
    # Random among equals: both get mail (all 30 on one host has probability 2**-29).
    assert min(counts) > 0


def test_a_domain_without_mx_uses_its_address_as_implicit_mx(dns_server: DnsServer) -> None:
    port = free_port()

    async def scenario() -> int:
        async with SmtpSink(host="127.0.0.17", port=port) as implicit:
            report = await deliver(engine(dns_server, port), "b@implicit.test")
            assert report.results[0].status is DeliveryStatus.DELIVERED
            return len(implicit.messages)

    assert run(scenario) == 1


@pytest.mark.parametrize(
    ("recipient", "status", "code", "text"),
    [
        (
            "b@nullmx.test",
            DeliveryStatus.FAILED,
            556,
            "5.1.10 nullmx.test: the domain publishes a null MX",
        ),
        (
            "b@nowhere.pref.test",
            DeliveryStatus.FAILED,
            550,
            "5.1.2 nowhere.pref.test: domain does not exist",
        ),
        (
            "b@broken.test",
            DeliveryStatus.DEFERRED,
            451,
            "4.4.3 broken.test: MX lookup failed temporarily",
        ),
    ],
    ids=["null-mx-is-permanent", "nxdomain-is-permanent", "servfail-is-temporary"],
)
def test_dns_answers_decide_permanent_or_temporary(
    dns_server: DnsServer, recipient: str, status: DeliveryStatus, code: int, text: str
) -> None:
    report = run(lambda: deliver(engine(dns_server, free_port()), recipient))
    (result,) = report.results
    assert (result.status, result.code) == (status, code)
    assert result.message.startswith(text)


def test_a_smart_host_is_found_by_name(dns_server: DnsServer) -> None:
    port = free_port()

    async def scenario() -> int:
        async with SmtpSink(host="127.0.0.18", port=port) as relay:
            report = await deliver(
                engine(dns_server, 25),
                "b@anywhere.example",
                SmartHost("relay.smarthost.test", port),
            )
            assert report.results[0].status is DeliveryStatus.DELIVERED
            return len(relay.messages)

    assert run(scenario) == 1


def test_a_smart_host_with_mx_true_uses_the_mx_of_its_name(dns_server: DnsServer) -> None:
    port = free_port()

    async def scenario() -> DeliveryReport:
        async with SmtpSink(host="127.0.0.18", port=port):
            return await deliver(
                engine(dns_server, 25),
                "b@anywhere.example",
                SmartHost("pool.smarthost.test", port, mx=True),
            )

    report = run(scenario)
    assert report.results[0].status is DeliveryStatus.DELIVERED
    assert report.server == f"relay.smarthost.test[127.0.0.18]:{port}"


def test_a_smart_host_name_that_does_not_resolve_defers_and_never_bounces(
    dns_server: DnsServer,
) -> None:
    report = run(
        lambda: deliver(
            engine(dns_server, 25), "b@anywhere.example", SmartHost("missing.smarthost.test", 2525)
        )
    )
    assert report.results[0].status is DeliveryStatus.DEFERRED
    assert report.results[0].message.startswith("4.4.3 ")
