"""What a delivery writes to the log (issue 11, point 10): names, sizes and TLS that are true.

One relay in this process, real sockets and certificates; the log read through caplog.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosmtplib
import pytest

from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import (
    Balancing,
    Connector,
    Destination,
    ObjectRef,
    ProfilePool,
    RoutingDocument,
    ServerAddress,
    SmartHost,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.testing.sink import SmtpSink
from pki import Pki
from support import run, until


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_with(
    tmp_path: Path, destination: Destination, tls: TlsPolicy | None = None, **extra: object
) -> Relay:
    connector = Connector(
        ref=ObjectRef("mail", "c"),
        generation=1,
        created="",
        enabled=True,
        recipient_patterns=(DomainPattern.parse("*"),),
        sender_patterns=(),
        destination=destination,
        tls=tls or TlsPolicy(),
    )
    settings = RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1",
            port=0,
            hostname="relay.test",
            accept_from=(ipaddress.ip_network("127.0.0.0/8"),),
        ),
        spool_dir=tmp_path / "spool",
        delivery=DeliverySettings(helo_name="relay.test", connect_timeout=2, command_timeout=5),
        retry_initial=30.0,
        scheduler_tick=0.05,
        drain_grace=0.5,
        **extra,  # type: ignore[arg-type]
    )
    return Relay(settings, RoutingDocument(generation=1, connectors=(connector,)))


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run(), name="test-relay")
    await relay.ready.wait()
    try:
        yield relay
    finally:
        relay.stop()
        await task


async def send(relay: Relay) -> None:
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
    ) as client:
        await client.sendmail("a@sender.test", ["b@dest.test"], b"Subject: s\r\n\r\nbody\r\n")


def lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    """Mailflow's own lines (aiosmtpd's protocol trace echoes the client's SIZE= too)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("mailflow") and needle in r.getMessage()
    ]


def test_each_pool_server_tried_gets_its_own_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = closed_port()
    caplog.set_level(logging.DEBUG)  # the attempt lines are DEBUG, the recipient line INFO

    async def scenario() -> int:
        async with SmtpSink() as live:
            pool = ProfilePool(
                profile=ObjectRef("mail", "pool"),
                servers=(ServerAddress("127.0.0.1", dead), ServerAddress("127.0.0.1", live.port)),
                balancing=Balancing.FAILOVER,
            )
            async with running(relay_with(tmp_path, pool)) as relay:
                await send(relay)
                await until(lambda: live.messages)
                await until(lambda: lines(caplog, "status=delivered"))
            return live.port

    port = run(scenario)
    attempts = lines(caplog, ": attempt ")
    assert len(attempts) == 2, attempts
    assert f"attempt 1/2 connector=mail/c server=127.0.0.1:{dead}: " in attempts[0]
    assert f"attempt 2/2 connector=mail/c server=127.0.0.1:{port}: " in attempts[1]
    # One size per message: the queued line's, nowhere else.
    assert len(lines(caplog, "size=")) == 1
    assert not lines(caplog, "octets")


def test_a_failed_certificate_check_is_not_logged_as_tls_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = Pki(tmp_path)
    ca = pki.ca()
    wrong = ca.issue("other.example")
    caplog.set_level(logging.INFO)
    tls = TlsPolicy(TlsMode.NAME_MATCH, certificate_name="right.example", ca_bundle=ca.pem)

    async def scenario() -> None:
        async with SmtpSink(cert_file=wrong.cert_file, key_file=wrong.key_file) as server:
            destination = SmartHost("127.0.0.1", server.port)
            async with running(relay_with(tmp_path, destination, tls)) as relay:
                await send(relay)
                await until(lambda: lines(caplog, "status=deferred"))

    run(scenario)
    (line,) = lines(caplog, "status=deferred")
    assert "tls=failed(name_mismatch)" in line
    assert "tls=none" not in line


def test_no_server_reached_is_a_dash_not_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        # A name that only a DNS server could resolve, and the DNS server is not there.
        relay = relay_with(
            tmp_path,
            SmartHost("mail.nowhere.test", 25),
            dns_servers=("127.0.0.1",),
            dns_port=closed_port(),
        )
        async with running(relay):
            await send(relay)
            await until(lambda: lines(caplog, "status=deferred"), within=30)

    run(scenario, within=60)
    (line,) = lines(caplog, "status=deferred")
    assert "server=None" not in line
    assert re.search(r" server=- ", line), line
