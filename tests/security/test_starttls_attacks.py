"""STARTTLS under attack, both ways: downgrade of the relay's outbound hop, and injection.

Outbound: the relay's next hop is a man in the middle on loopback (``Mitm``). It speaks
SMTP itself and attacks the upgrade: it strips STARTTLS from the EHLO reply, answers
STARTTLS with 454, breaks the handshake, answers EHLO with 502 (so the relay falls back to
HELO, which has no STARTTLS), or completes the handshake with the attacker's self-signed
certificate or with a certificate a trusted CA issued for another name. It records every
byte it reads in plaintext (before any TLS) and every byte it decrypts.

The matrix, per DESIGN.md's TLS table:
* every required mode (all but Opportunistic): zero bytes of the message body in
  plaintext on the wire, whatever the attack;
* only where the mode's checks allow that certificate does the attacker read the body:
  SelfSigned without pins takes any certificate, TrustedCA takes any name from a trusted
  CA; pinned SelfSigned, DomainMatch and NameMatch never;
* Opportunistic may deliver (in plaintext if it must): that is its definition.

Injection: commands pipelined after STARTTLS in the same packet (``STARTTLS\\r\\nMAIL…``)
are discarded by the listener, and a next hop that appends a forged reply to its
``220`` cannot make the relay read it as an answer under TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib

from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import (
    Connector,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from pki import Pki
from smtpraw import raw_connection, serving, settings
from support import run, until

BODY_MARKER = b"the-secret-body-7f3a9c"
LEGIT_NAME = "mx.legit.test"


class Attack(enum.Enum):
    STRIP = "strip"
    REFUSE_454 = "454"
    BREAK_HANDSHAKE = "break"
    EHLO_502 = "ehlo502"
    SELF_SIGNED_CERT = "selfsigned"
    WRONG_NAME_CERT = "wrongname"
    INJECT_AFTER_220 = "inject"


@dataclass
class Mitm:
    """An SMTP server that attacks the STARTTLS upgrade and records what it could read."""

    attack: Attack
    tls_context: ssl.SSLContext | None
    plaintext: bytearray = field(default_factory=bytearray)
    decrypted: bytearray = field(default_factory=bytearray)
    commands_under_tls: list[bytes] = field(default_factory=list)
    sessions_ended: int = 0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _ehlo_reply(self, tls: bool) -> bytes:
        offer = not tls and self.attack is not Attack.STRIP
        lines = [b"250-mx.attacker.test", b"250-PIPELINING", b"250-8BITMIME"]
        if offer:
            lines.append(b"250-STARTTLS")
        lines.append(b"250 SIZE 10000000")
        return b"\r\n".join(lines) + b"\r\n"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(20):
                await self._dialogue(reader, writer)
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self.sessions_ended += 1
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await writer.wait_closed()

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        writer.write(b"220 mx.attacker.test ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                return
            (self.decrypted if tls else self.plaintext).extend(line)
            if tls:
                self.commands_under_tls.append(line.split(b" ", 1)[0].strip().upper())
            verb = line[:4].upper()
            if verb == b"EHLO":
                if self.attack is Attack.EHLO_502 and not tls:
                    writer.write(b"502 5.5.2 Error: command not recognized\r\n")
                else:
                    writer.write(self._ehlo_reply(tls))
            elif verb == b"HELO":
                writer.write(b"250 mx.attacker.test\r\n")
            elif verb == b"STAR":
                if not await self._starttls(reader, writer):
                    return
                tls = True
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                content = await reader.readuntil(b"\r\n.\r\n")
                (self.decrypted if tls else self.plaintext).extend(content)
                writer.write(b"250 2.0.0 accepted by the attacker\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:  # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 2.0.0 OK\r\n")
            await writer.drain()

    async def _starttls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if self.attack is Attack.REFUSE_454:
            writer.write(b"454 4.7.0 TLS not available\r\n")
            await writer.drain()
            return True  # go on in plaintext, if the client dares
        if self.attack is Attack.BREAK_HANDSHAKE:
            writer.write(b"220 2.0.0 Ready to start TLS\r\n\x15\x03\x03\x00\x02\x02\x28garbage")
            await writer.drain()
            return False
        if self.attack is Attack.INJECT_AFTER_220:
            # A forged reply after the 220, in the same segment: a client that keeps it
            # would read it as the answer to its EHLO under TLS.
            writer.write(b"220 2.0.0 Ready to start TLS\r\n554 5.7.0 injected reply\r\n")
        else:
            writer.write(b"220 2.0.0 Ready to start TLS\r\n")
        await writer.drain()
        assert self.tls_context is not None
        await writer.start_tls(self.tls_context)
        return True


def _server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


@dataclass(frozen=True)
class Mode:
    name: str
    policy: TlsPolicy
    accepts_self_signed: bool = False
    accepts_wrong_name: bool = False


def _modes(pki: Pki) -> tuple[list[Mode], dict[Attack, ssl.SSLContext]]:
    ca = pki.ca()
    legit = ca.issue(LEGIT_NAME)
    attacker_self_signed = pki.self_signed(LEGIT_NAME)
    attacker_wrong_name = ca.issue("mx.attacker.test")
    modes = [
        Mode("Opportunistic", TlsPolicy(), accepts_self_signed=True, accepts_wrong_name=True),
        Mode(
            "SelfSigned",
            TlsPolicy(mode=TlsMode.SELF_SIGNED),
            accepts_self_signed=True,
            accepts_wrong_name=True,
        ),
        Mode(
            "SelfSigned-pinned",
            TlsPolicy(mode=TlsMode.SELF_SIGNED, pinned_fingerprints=(legit.cert_pin,)),
        ),
        Mode(
            "TrustedCA",
            TlsPolicy(mode=TlsMode.TRUSTED_CA, ca_bundle=ca.pem),
            accepts_wrong_name=True,  # by definition: a trusted issuer, any name
        ),
        Mode("DomainMatch", TlsPolicy(mode=TlsMode.DOMAIN_MATCH, ca_bundle=ca.pem)),
        Mode(
            "NameMatch",
            TlsPolicy(mode=TlsMode.NAME_MATCH, ca_bundle=ca.pem, certificate_name=LEGIT_NAME),
        ),
    ]
    contexts = {
        Attack.SELF_SIGNED_CERT: _server_context(
            attacker_self_signed.cert_file, attacker_self_signed.key_file
        ),
        Attack.WRONG_NAME_CERT: _server_context(
            attacker_wrong_name.cert_file, attacker_wrong_name.key_file
        ),
        Attack.INJECT_AFTER_220: _server_context(
            attacker_self_signed.cert_file, attacker_self_signed.key_file
        ),
    }
    return modes, contexts


def _relay_settings(tmp_path: Path) -> RelaySettings:
    import ipaddress

    return RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1",
            port=0,
            hostname="relay.test",
            accept_from=(ipaddress.ip_network("127.0.0.1/32"),),
        ),
        spool_dir=tmp_path / "spool",
        delivery=DeliverySettings(helo_name="relay.test", connect_timeout=2, command_timeout=5),
        retry_initial=0.3,
        retry_max=1.0,
        drain_grace=2.0,
    )


def _connector(domain: str, port: int, policy: TlsPolicy) -> Connector:
    return Connector(
        ref=ObjectRef("mail", domain.split(".")[0]),
        generation=1,
        created="",
        enabled=True,
        recipient_patterns=(DomainPattern.parse(domain),),
        sender_patterns=(),
        destination=SmartHost("127.0.0.1", port),
        tls=policy,
    )


@contextlib.asynccontextmanager
async def _running(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run(), name="mitm-test-relay")
    await relay.ready.wait()
    try:
        yield relay
    finally:
        relay.stop()
        await task


DOWNGRADES = [Attack.STRIP, Attack.REFUSE_454, Attack.BREAK_HANDSHAKE, Attack.EHLO_502]
CERTIFICATES = [Attack.SELF_SIGNED_CERT, Attack.WRONG_NAME_CERT]


def test_required_tls_modes_send_no_plaintext_body_through_a_starttls_mitm(
    tmp_path: Path, pki: Pki
) -> None:
    modes, contexts = _modes(pki)

    async def scenario() -> dict[tuple[str, Attack], Mitm]:
        mitms: dict[tuple[str, Attack], Mitm] = {}
        for mode in modes:
            for attack in DOWNGRADES + CERTIFICATES:
                mitm = Mitm(attack, contexts.get(attack))
                await mitm.start()
                mitms[(mode.name, attack)] = mitm
        connectors = tuple(
            _connector(f"{name.lower()}-{attack.value}.test", mitm.port, policy)
            for (name, attack), mitm in mitms.items()
            for policy in [next(m.policy for m in modes if m.name == name)]
        )
        relay = Relay(
            _relay_settings(tmp_path), RoutingDocument(generation=1, connectors=connectors)
        )
        try:
            async with _running(relay):
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
                ) as smtp:
                    for name, attack in mitms:
                        body = b"Subject: %s\r\n\r\n%s\r\n" % (attack.value.encode(), BODY_MARKER)
                        await smtp.sendmail(
                            "alice@sender.test", [f"bob@{name.lower()}-{attack.value}.test"], body
                        )
                # Every attacker has seen the relay come and go at least twice (a retry).
                await until(
                    lambda: all(
                        m.sessions_ended >= 2 or BODY_MARKER in m.decrypted + m.plaintext
                        for m in mitms.values()
                    ),
                    within=40,
                    what="every MITM to see the relay twice, or the message",
                )
        finally:
            for mitm in mitms.values():
                await mitm.stop()
        return mitms

    mitms = run(scenario, within=120)
    outcome = {}
    for mode in modes:
        for attack in DOWNGRADES + CERTIFICATES:
            mitm = mitms[(mode.name, attack)]
            outcome[(mode.name, attack.value)] = (
                BODY_MARKER in mitm.plaintext,
                BODY_MARKER in mitm.decrypted,
            )
    for mode in modes:
        for attack in DOWNGRADES + CERTIFICATES:
            in_plaintext, decrypted = outcome[(mode.name, attack.value)]
            if mode.name == "Opportunistic":
                continue  # may deliver, in plaintext if it must
            assert not in_plaintext, (mode.name, attack, outcome)
            allowed = (attack is Attack.SELF_SIGNED_CERT and mode.accepts_self_signed) or (
                attack is Attack.WRONG_NAME_CERT and mode.accepts_wrong_name
            )
            assert decrypted == allowed, (mode.name, attack, outcome)
    # Opportunistic does deliver through every downgrade: the matrix can tell both apart.
    assert all(
        outcome[("Opportunistic", a.value)][0]
        for a in (Attack.STRIP, Attack.REFUSE_454, Attack.EHLO_502)
    ), outcome


def test_a_forged_reply_after_the_220_is_not_read_as_an_answer_under_tls(
    tmp_path: Path, pki: Pki
) -> None:
    # The next hop (or a MITM before the handshake) appends "554 injected" to its 220. A
    # client that kept it would fail its EHLO under TLS; the relay must discard it.
    _, contexts = _modes(pki)

    async def scenario() -> Mitm:
        mitm = Mitm(Attack.INJECT_AFTER_220, contexts[Attack.INJECT_AFTER_220])
        await mitm.start()
        connectors = (_connector("inject.test", mitm.port, TlsPolicy(mode=TlsMode.SELF_SIGNED)),)
        relay = Relay(
            _relay_settings(tmp_path), RoutingDocument(generation=1, connectors=connectors)
        )
        try:
            async with _running(relay):
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
                ) as smtp:
                    await smtp.sendmail(
                        "alice@sender.test",
                        ["bob@inject.test"],
                        b"Subject: x\r\n\r\n" + BODY_MARKER,
                    )
                await until(
                    lambda: BODY_MARKER in mitm.decrypted or mitm.sessions_ended >= 2, within=20
                )
        finally:
            await mitm.stop()
        return mitm

    mitm = run(scenario)
    assert BODY_MARKER in mitm.decrypted
    assert mitm.commands_under_tls[:3] == [b"EHLO", b"MAIL", b"RCPT"], mitm.commands_under_tls


def _no_verify() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_commands_pipelined_after_starttls_are_discarded_by_the_listener() -> None:
    # RFC 3207 4.2 / CVE-2011-0411: what a client sent in plaintext after STARTTLS, in the
    # same packet, must not be executed as if it came under TLS.
    async def scenario() -> tuple[tuple[int, str], tuple[int, str], list[Any]]:
        from smtpraw import Inbox

        inbox = Inbox()
        async with serving(settings(), inbox) as listener, raw_connection(listener.port) as client:
            await client.send(
                b"STARTTLS\r\nMAIL FROM:<injected@attacker.example>\r\n"
                b"RCPT TO:<victim@recipient.example>\r\n"
            )
            assert (await client.reply())[0] == 220
            async with asyncio.timeout(5):
                await client.writer.start_tls(_no_verify())
            ehlo = await client.command(b"EHLO client.test")
            # Had the injected MAIL been kept, this RCPT would be accepted (250), not 503.
            rcpt = await client.command(b"RCPT TO:<victim@recipient.example>")
        return ehlo, rcpt, inbox.messages

    ehlo, rcpt, messages = run(scenario)
    assert ehlo[0] == 250
    assert "STARTTLS" not in ehlo[1]
    assert rcpt[0] == 503, rcpt
    assert messages == []


def test_the_matrix_covers_every_tls_mode(pki: Pki) -> None:
    modes, _ = _modes(pki)
    assert {m.policy.mode for m in modes} == set(TlsMode)
