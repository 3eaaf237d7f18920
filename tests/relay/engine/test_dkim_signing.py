"""Which messages the relay signs, with which keys, and what it counts: the in-process relay.

Real sockets (the relay's listener, a loopback sink); the signatures themselves are judged
by independent verifiers in test_dkim_e2e.py. Here: the decisions — opt-out, the mixed
case, not twice, reloads, failures — and their metrics and log lines.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from dkim_peers import KeyPair, ed25519_key, rsa_key
from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.dkim_keys import DkimKey, load_private_key
from mailflow_relay.routing.document import (
    Connector,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.testing.sink import SmtpSink
from support import run, until

RSA = rsa_key()
ED25519 = ed25519_key()
SIGNED = "mailflow_dkim_signing_total"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connector(name: str, domains: list[str], port: int) -> Connector:
    return Connector(
        ref=ObjectRef("mail", name),
        generation=1,
        created="",
        enabled=True,
        recipient_patterns=tuple(DomainPattern.parse(d) for d in domains),
        sender_patterns=(),
        destination=SmartHost("127.0.0.1", port),
        tls=TlsPolicy(),
    )


def settings(tmp_path: Path, **overrides: Any) -> RelaySettings:
    base = RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1",
            port=0,
            hostname="relay.test",
            accept_from=(ipaddress.ip_network("127.0.0.0/8"),),
        ),
        spool_dir=tmp_path / "spool",
        delivery=DeliverySettings(helo_name="relay.test", connect_timeout=2, command_timeout=5),
        retry_initial=5.0,
        scheduler_tick=0.05,
        drain_grace=1.0,
    )
    return replace(base, **overrides)


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run(), name="test-relay")
    await relay.ready.wait()
    try:
        yield relay
    finally:
        relay.stop()
        await task


def metric(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def key(pair: KeyPair, selector: str, domain: str = "contoso.test", **extra: object) -> DkimKey:
    loaded = load_private_key(pair.pem, pair.algorithm)
    base = DkimKey(
        ref=f"mail/{selector}",
        domain=domain,
        selector=selector,
        algorithm=pair.algorithm,
        private_key=loaded.pkcs8,
        fingerprint=loaded.fingerprint,
    )
    return replace(base, **extra)  # type: ignore[arg-type]


def doc(connectors: list[Connector], keys: list[DkimKey], generation: int = 1) -> RoutingDocument:
    return RoutingDocument(
        generation=generation, connectors=tuple(connectors), dkim_keys=tuple(keys)
    )


MESSAGE = b"From: Alice <alice@contoso.test>\r\nTo: bob@dest.test\r\nSubject: hi\r\n\r\nhello\r\n"


async def send(relay: Relay, recipients: list[str], data: bytes = MESSAGE) -> None:
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
    ) as smtp:
        await smtp.sendmail("bounce@contoso.test", recipients, data)


def signatures(data: bytes) -> list[str]:
    """The DKIM-Signature fields of ``data``, unfolded, without white space."""
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    return ["".join(str(v).split()) for v in parsed.get_all("DKIM-Signature") or []]


def test_opt_out_only_when_every_route_opts_out(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        async with SmtpSink() as sink:
            opt_out = replace(
                connector("next-hop-signs", ["partner.test"], sink.port), dkim_sign=False
            )
            signing = connector("all", ["*"], sink.port)
            relay = Relay(settings(tmp_path), doc([opt_out, signing], [key(RSA, "s1")]))
            async with running(relay):
                await send(relay, ["a@partner.test"])  # every route opts out
                await until(lambda: len(sink.messages) == 1)
                await send(relay, ["b@partner.test", "c@dest.test"])  # mixed: signed
                await until(lambda: len(sink.messages) == 3)
                assert metric(relay, SIGNED, domain="contoso.test", selector="s1",
                              outcome="skipped_opt_out") == 1  # fmt: skip
                assert metric(relay, SIGNED, domain="contoso.test", selector="s1",
                              outcome="signed") == 1  # fmt: skip
            return [len(signatures(m.data)) for m in sink.messages]

    counts = run(scenario)
    assert counts[0] == 0
    assert counts[1:] == [1, 1], "the mixed message is stored once, signed, for both routes"


def test_the_default_route_signs_even_beside_an_opting_out_connector(tmp_path: Path) -> None:
    async def scenario() -> int:
        async with SmtpSink() as sink:
            opt_out = replace(connector("partner", ["partner.test"], sink.port), dkim_sign=False)
            # The default route delivers to the recipient's MX; a dead DNS keeps it queued.
            dead_dns = settings(tmp_path, dns_servers=("127.0.0.1",), dns_port=closed_port())
            relay = Relay(dead_dns, doc([opt_out], [key(RSA, "s1")]))
            async with running(relay):
                await send(relay, ["a@partner.test", "b@elsewhere.test"])
                await until(lambda: len(sink.messages) == 1)
                return len(signatures(sink.messages[0].data))

    assert run(scenario) == 1


def test_a_message_is_not_signed_twice_with_the_same_key(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        async with SmtpSink() as sink:
            keys = [key(RSA, "s1"), key(ED25519, "ed1")]
            relay = Relay(settings(tmp_path), doc([connector("all", ["*"], sink.port)], keys))
            async with running(relay):
                await send(relay, ["b@dest.test"])
                await until(lambda: len(sink.messages) == 1)
                once = sink.messages[0].data
                await send(relay, ["b@dest.test"], once)  # through the relay again
                await until(lambda: len(sink.messages) == 2)
                # A stale signature with the same d= and s= does not count: signed afresh.
                stale = once.replace(b"hello", b"changed")
                await send(relay, ["b@dest.test"], stale)
                await until(lambda: len(sink.messages) == 3)
                for selector in ("s1", "ed1"):
                    labels = {"domain": "contoso.test", "selector": selector}
                    assert metric(relay, SIGNED, **labels, outcome="signed") == 2
                    assert metric(relay, SIGNED, **labels, outcome="skipped_already_signed") == 1
            return [len(signatures(m.data)) for m in sink.messages]

    assert run(scenario) == [2, 2, 4]


def test_no_key_no_from_and_a_failing_key_never_lose_the_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailflow_relay.engine.signing")
    # Received cannot be signed (it is the relay's own trace field): dkimpy refuses the key.
    # The compiler and the document reader refuse such a key; built by hand it reaches the signer.
    broken = key(RSA, "broken", signed_headers=("From", "Received"))

    async def scenario() -> list[int]:
        async with SmtpSink() as sink:
            relay = Relay(
                settings(tmp_path),
                doc([connector("all", ["*"], sink.port)], [broken, key(RSA, "s1", "other.test")]),
            )
            async with running(relay):
                await send(relay, ["b@dest.test"])  # From: contoso.test: the broken key
                await send(relay, ["b@dest.test"], MESSAGE.replace(b"contoso", b"unknown"))
                await send(relay, ["b@dest.test"], b"Subject: no from\r\n\r\nx\r\n")
                # dkimpy cannot parse this header block; the message still goes, unsigned.
                unparsable = b"From: a@other.test\r\nno colon here\r\n\r\nx\r\n"
                await send(relay, ["b@dest.test"], unparsable)
                await until(lambda: len(sink.messages) == 4)
                assert metric(relay, SIGNED, domain="contoso.test", selector="broken",
                              outcome="error") == 1  # fmt: skip
                assert metric(relay, SIGNED, domain="other.test", selector="s1",
                              outcome="error") == 1  # fmt: skip
                assert metric(relay, SIGNED, domain="", selector="",
                              outcome="skipped_no_key") == 1  # fmt: skip
                assert metric(relay, SIGNED, domain="", selector="",
                              outcome="skipped_no_from") == 1  # fmt: skip
            return [len(signatures(m.data)) for m in sink.messages]

    assert run(scenario) == [0, 0, 0, 0]
    text = caplog.text
    assert "DKIM error d=other.test s=s1 a=rsa-sha256" in text
    assert "DKIM error d=contoso.test s=broken a=rsa-sha256 key=sha256/" in text
    assert "DKIM skipped_no_key: unsigned: no key for unknown.test" in text
    assert "DKIM skipped_no_from: unsigned: no From: header" in text
    assert RSA.pem_body[:40] not in text


def test_a_reloaded_document_signs_with_its_keys_without_a_restart(tmp_path: Path) -> None:
    async def scenario() -> list[list[str]]:
        async with SmtpSink() as sink:
            route = connector("all", ["*"], sink.port)
            relay = Relay(settings(tmp_path), doc([route], [key(RSA, "s1")]))
            async with running(relay):
                await send(relay, ["b@dest.test"])
                await until(lambda: len(sink.messages) == 1)
                relay.load_document_json(doc([route], [key(ED25519, "ed2")], 2).to_json())
                await send(relay, ["b@dest.test"])
                await until(lambda: len(sink.messages) == 2)
            return [signatures(m.data) for m in sink.messages]

    first, second = run(scenario)
    assert len(first) == 1
    assert "s=s1;" in first[0]
    assert len(second) == 1
    assert "s=ed2;" in second[0]
