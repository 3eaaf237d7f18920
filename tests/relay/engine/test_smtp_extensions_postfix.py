"""Issue 16 end to end: the relay delivering to Postfix's smtpd with each extension on and off.

Two private Postfix instances on loopback (bench/postfix_instance.py) are the next hops:
``full`` offers SMTPUTF8, 8BITMIME and DSN (Postfix's defaults), ``bare`` offers none of
them (``smtpd_discard_ehlo_keywords``, ``smtputf8_enable = no``). Both relay on to one
smtp-sink, whose dumps show what Postfix received from us (the MAIL and RCPT parameters
Postfix passed on, the content); bounces from the relay go the same way (the sender's
domain routes to Postfix too). Postfix refuses ``never@dest.test`` (550) and defers
``later@dest.test`` (450) at RCPT.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import ipaddress
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailflow_relay.engine.relay import DeliveryEvent, Relay, RelaySettings
from mailflow_relay.envelope import (
    BodyType,
    EnvelopeParameters,
    MailParameters,
    Notify,
    RecipientParameters,
    Ret,
)
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.queue.spool import SpooledMessage
from mailflow_relay.routing.document import (
    Connector,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from peers import SinkMessage, SmtpSink, free_port, require
from pki import Pki
from support import run, until

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from postfix_instance import PostfixInstance, main_cf, master_cf

RECIPIENT_ACCESS = (
    "inline:{ {never@dest.test=550 5.1.1 no such user}, {later@dest.test=450 4.2.0 try later} }"
)
COMMON = {
    "smtpd_recipient_restrictions": f"check_recipient_access {RECIPIENT_ACCESS}, permit_mynetworks, reject",
    "maximal_queue_lifetime": "1h",
}
BARE = {
    **COMMON,
    "smtpd_discard_ehlo_keywords": "dsn, 8bitmime, smtputf8",
    "smtputf8_enable": "no",
}


class PostfixDestination(PostfixInstance):
    """A private Postfix instance with extra main.cf settings."""

    def __init__(self, folder: Path, *, port: int, relay_port: int, settings: Mapping[str, str]):
        super().__init__(folder, port=port, relay_port=relay_port)
        self.settings = dict(settings)

    def start(self) -> None:
        # As PostfixInstance.start, with our settings after the defaults (the last one wins).
        self.folder.mkdir(exist_ok=True)
        self.config_directory.mkdir(parents=True, exist_ok=True)
        for name in ("queue", "data"):
            (self.folder / name).mkdir(exist_ok=True)
        self.folder.chmod(0o755)
        (self.folder / "data").chmod(0o700)
        import os
        import pwd

        os.chown(self.folder / "data", pwd.getpwnam("postfix").pw_uid, -1)
        base = main_cf(self.folder, relay_port=self.relay_port, connection_reuse=True, tls=False)
        extra = "".join(f"{name} = {value}\n" for name, value in self.settings.items())
        kept = [
            line
            for line in base.splitlines(keepends=True)
            if line.split(" =")[0] not in self.settings
        ]
        (self.config_directory / "main.cf").write_text("".join(kept) + extra)
        (self.config_directory / "master.cf").write_text(master_cf(self.port))
        self._postfix("check")
        self._postfix("start")
        self._started = True


class Peers:
    def __init__(self, sink: SmtpSink, full: PostfixDestination, bare: PostfixDestination):
        self.sink = sink
        self.full = full
        self.bare = bare

    def dumps(self, token: str) -> list[SinkMessage]:
        return [m for m in self.sink.messages() if token.encode() in m.data]


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    require("postfix")
    # Not under pytest's tmp_path: its parent is private to root, and Postfix's daemons
    # (user postfix) must reach their data folder.
    with SmtpSink() as sink, tempfile.TemporaryDirectory(prefix="mailflow-postfix-") as folder:
        Path(folder).chmod(0o755)
        full = PostfixDestination(
            Path(folder) / "full",
            port=free_port(),
            relay_port=sink.port,
            settings=COMMON,
        )
        bare = PostfixDestination(
            Path(folder) / "bare",
            port=free_port(),
            relay_port=sink.port,
            settings=BARE,
        )
        with full, bare:
            yield Peers(sink, full, bare)


def relay_for(
    tmp_path: Path,
    port: int,
    events: list[DeliveryEvent],
    *,
    tls: TlsPolicy | None = None,
    listener: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Relay:
    connector = Connector(
        ref=ObjectRef("mail", "postfix"),
        generation=1,
        created="",
        enabled=True,
        recipient_patterns=(DomainPattern.parse("*"),),
        sender_patterns=(),
        destination=SmartHost("127.0.0.1", port),
        tls=tls or TlsPolicy(),
    )
    settings = RelaySettings(
        listener=ListenerSettings(
            **{
                "host": "127.0.0.1",
                "port": 0,
                "hostname": "relay.test",
                "accept_from": (ipaddress.ip_network("127.0.0.0/8"),),
                **(listener or {}),
            }
        ),
        spool_dir=tmp_path / "spool",
        delivery=DeliverySettings(helo_name="relay.test", connect_timeout=5, command_timeout=10),
        retry_initial=0.3,
        retry_max=1.0,
        scheduler_tick=0.05,
        drain_grace=3.0,
        **overrides,
    )
    return Relay(
        settings,
        RoutingDocument(generation=1, connectors=(connector,)),
        on_delivery=events.append,
    )


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run(), name="test-relay")
    await relay.ready.wait()
    try:
        yield relay
    finally:
        relay.stop()
        await task


async def submit(
    relay: Relay,
    recipients: list[tuple[str, list[str]]],
    body: bytes,
    *,
    sender: str = "alice@sender.test",
    mail_options: list[str] | None = None,
) -> None:
    """One transaction to the relay, with per-recipient RCPT parameters."""
    encoding = "utf-8" if "SMTPUTF8" in (mail_options or []) else "ascii"
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
    ) as smtp:
        await smtp.mail(sender, options=mail_options or [], encoding=encoding)
        for recipient, options in recipients:
            await smtp.rcpt(recipient, options=options, encoding=encoding)
        await smtp.data(body)


def message(token: str, body: str = "hello", headers: str = "") -> bytes:
    return (
        f"From: alice@sender.test\r\nSubject: {token}\r\nMessage-ID: <{token}@sender.test>\r\n"
        f"{headers}\r\n{body}\r\n"
    ).encode()


def metric(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def dumps(peers: Peers, token: str, count: int, within: float = 20.0) -> list[SinkMessage]:
    deadline = time.monotonic() + within
    while True:
        found = await asyncio.to_thread(peers.dumps, token)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


def report(dump: SinkMessage) -> tuple[email.message.Message, list[dict[str, str]], list[str]]:
    """The DSN in a sink dump: the message, its per-message+per-recipient fields, part types."""
    data = dump.data.replace(b"\n", b"\r\n")
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    parts = [p for p in parsed.get_payload() if isinstance(p, email.message.Message)]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    fields = [dict(block.items()) for block in blocks if isinstance(block, email.message.Message)]
    return parsed, fields, [p.get_content_type() for p in parts]


def ours(found: list[SinkMessage]) -> list[SinkMessage]:
    """The relay's own reports among the dumps (Postfix may report too)."""
    return [m for m in found if m.mail_from == "" and b"Reporting-MTA: dns; relay.test" in m.data]


def token() -> str:
    return f"t{secrets.token_hex(6)}"


# --- SMTPUTF8 -----------------------------------------------------------------------------


def test_smtputf8_is_passed_to_a_hop_that_offers_it(peers: Peers, tmp_path: Path) -> None:
    events: list[DeliveryEvent] = []
    mark = token()

    async def scenario() -> None:
        relay = relay_for(tmp_path, peers.full.port, events)
        async with running(relay):
            await submit(
                relay,
                [("jürgen@exämple.test", [])],
                message(mark, headers="To: Jürgen <jürgen@exämple.test>\r\n"),
                mail_options=["SMTPUTF8"],
            )
            await until(lambda: len(events) == 1, within=20)
            # Postfix (smtputf8_enable) takes a UTF-8 recipient only after MAIL … SMTPUTF8.
            await until(lambda: "to=<jürgen@exämple.test>" in peers.full.log_tail(200_000))

    run(scenario)
    (result,) = events[0].report.results
    assert result.status.value == "delivered", result
    assert events[0].report.extension_decisions == ()


def test_smtputf8_to_a_hop_without_it_sends_a_labels_or_bounces_5_6_7(
    peers: Peers, tmp_path: Path
) -> None:
    events: list[DeliveryEvent] = []
    mark = token()

    async def scenario() -> tuple[list[SinkMessage], Relay]:
        relay = relay_for(tmp_path, peers.bare.port, events)
        async with running(relay):
            await submit(relay, [("bob@bücher.test", [])], message(mark), mail_options=["SMTPUTF8"])
            await submit(
                relay, [("jürgen@dest.test", [])], message(mark), mail_options=["SMTPUTF8"]
            )
            found = await dumps(peers, mark, 2)
            return found, relay

    found, relay = run(scenario)
    delivered = [m for m in found if m.mail_from == "alice@sender.test"]
    assert [m.recipients for m in delivered] == [["bob@xn--bcher-kva.test"]]
    (bounce,) = ours(found)
    _, fields, _ = report(bounce)
    assert fields[1]["Final-Recipient"] == "utf-8; j\\x{FC}rgen@dest.test"  # RFC 6533 §3
    assert fields[1]["Status"] == "5.6.7"
    assert "SMTPUTF8 is required, but was not offered by host" in fields[1]["Diagnostic-Code"]
    assert metric(relay, "mailflow_extension_decisions_total", decision="a-labels") == 1
    assert metric(relay, "mailflow_extension_decisions_total", decision="5.6.7") == 1


# --- 8BITMIME -------------------------------------------------------------------------------

EIGHT_BIT = "Gr\u00fc\u00dfe aus K\u00f6ln"


def test_8bit_body_goes_as_is_with_body_8bitmime_to_a_hop_that_offers_it(
    peers: Peers, tmp_path: Path
) -> None:
    events: list[DeliveryEvent] = []
    mark = token()

    async def scenario() -> list[SinkMessage]:
        relay = relay_for(tmp_path, peers.full.port, events)
        async with running(relay):
            await submit(
                relay,
                [("bob@dest.test", [])],
                message(mark, EIGHT_BIT),
                mail_options=["BODY=8BITMIME"],
            )
            return await dumps(peers, mark, 1)

    (dump,) = run(scenario)
    assert "BODY=8BITMIME" in dump.mail_args
    assert EIGHT_BIT.encode() in dump.data


def test_8bit_body_to_a_7bit_hop_is_converted_or_bounced_5_6_3_when_signed(
    peers: Peers, tmp_path: Path
) -> None:
    events: list[DeliveryEvent] = []
    mark = token()
    mime = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    signed = "DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=s1; h=from; bh=x; b=y\r\n"

    async def scenario() -> list[SinkMessage]:
        relay = relay_for(tmp_path, peers.bare.port, events)
        async with running(relay):
            await submit(
                relay,
                [("plain@dest.test", [])],
                message(mark, EIGHT_BIT, mime),
                mail_options=["BODY=8BITMIME"],
            )
            await submit(
                relay,
                [("signed@dest.test", [])],
                message(mark, EIGHT_BIT, signed + mime),
                mail_options=["BODY=8BITMIME"],
            )
            return await dumps(peers, mark, 2)

    found = run(scenario)
    (converted,) = [m for m in found if m.recipients == ["plain@dest.test"]]
    assert "BODY=8BITMIME" not in converted.mail_args
    assert converted.data.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable" in converted.data
    assert b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln" in converted.data
    (bounce,) = ours(found)
    _, fields, _ = report(bounce)
    assert fields[1]["Final-Recipient"] == "rfc822; signed@dest.test"
    assert fields[1]["Status"] == "5.6.3"


# --- DSN ------------------------------------------------------------------------------------


def test_dsn_parameters_are_passed_to_a_hop_that_offers_dsn(peers: Peers, tmp_path: Path) -> None:
    events: list[DeliveryEvent] = []
    mark = token()

    async def scenario() -> list[SinkMessage]:
        relay = relay_for(tmp_path, peers.full.port, events)
        async with running(relay):
            await submit(
                relay,
                [
                    ("bob@dest.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob+2Bx@Dest.test"]),
                    ("carol@dest.test", []),
                ],
                message(mark),
                mail_options=["RET=HDRS", "ENVID=Env+2B1"],
            )
            await until(lambda: len(events) == 1, within=20)
            found = await dumps(peers, mark, 1)
            await asyncio.sleep(0.5)  # a relayed report from us would come now
            return found + ours(await dumps(peers, mark, 2, within=0))

    found = run(scenario)
    assert events[0].report.dsn is True
    (dump,) = found  # the message only: Postfix took NOTIFY over, no report from us
    # smtp-sink offers DSN, so Postfix passed on what it got from us.
    assert "RET=HDRS" in dump.mail_args
    assert "ENVID=Env+2B1" in dump.mail_args
    rcpt_args = [line for line in dump.raw.decode().split("\n") if line.startswith("X-Rcpt-Args")]
    assert rcpt_args == [
        "X-Rcpt-Args: <bob@dest.test> ORCPT=rfc822;Bob+2Bx@Dest.test NOTIFY=SUCCESS,FAILURE",
        # RFC 3461 §6.2.1: the relay names the recipient it was given when the sender did not.
        "X-Rcpt-Args: <carol@dest.test> ORCPT=rfc822;carol@dest.test",
    ]


def test_notify_success_to_a_hop_without_dsn_gets_a_relayed_report(
    peers: Peers, tmp_path: Path
) -> None:
    events: list[DeliveryEvent] = []
    mark = token()

    async def scenario() -> tuple[list[SinkMessage], Relay]:
        relay = relay_for(tmp_path, peers.bare.port, events)
        async with running(relay):
            await submit(
                relay,
                [
                    ("bob@dest.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;bob+40old.test"]),
                    ("carol@dest.test", []),
                ],
                message(mark),
                mail_options=["ENVID=e-42"],
            )
            return await dumps(peers, mark, 2), relay

    found, relay = run(scenario)
    (delivered,) = [m for m in found if m.mail_from == "alice@sender.test"]
    assert "NOTIFY" not in delivered.raw.decode(errors="replace")
    (relayed,) = ours(found)
    parsed, fields, _ = report(relayed)
    assert parsed["Subject"] == "Successful Mail Delivery Report"
    assert fields[0]["Original-Envelope-Id"] == "e-42"
    assert len(fields) == 2  # bob only: carol did not ask
    assert fields[1]["Final-Recipient"] == "rfc822; bob@dest.test"
    assert fields[1]["Original-Recipient"] == "rfc822; bob@old.test"
    assert fields[1]["Action"] == "relayed"
    assert fields[1]["Status"] == "2.0.0"
    assert fields[1]["Remote-MTA"] == "dns; 127.0.0.1"
    assert metric(relay, "mailflow_bounces_total", action="relayed") == 1


def test_notify_never_sends_no_bounce_and_failure_does(peers: Peers, tmp_path: Path) -> None:
    events: list[DeliveryEvent] = []
    silent, loud = token(), token()

    async def scenario() -> tuple[list[SinkMessage], list[SinkMessage], Relay]:
        relay = relay_for(tmp_path, peers.bare.port, events)
        async with running(relay):
            await submit(relay, [("never@dest.test", ["NOTIFY=NEVER"])], message(silent))
            await submit(relay, [("never@dest.test", ["NOTIFY=FAILURE"])], message(loud))
            await until(lambda: len(events) >= 2, within=20)
            found_loud = await dumps(peers, loud, 1)
            return await dumps(peers, silent, 1, within=1), found_loud, relay

    found_silent, found_loud, relay = run(scenario)
    assert ours(found_silent) == []
    assert metric(relay, "mailflow_notifications_suppressed_total", action="failed") == 1
    (bounce,) = ours(found_loud)
    _, fields, _ = report(bounce)
    assert fields[1]["Status"] == "5.1.1"
    assert fields[1]["Remote-MTA"] == "dns; 127.0.0.1"


def test_notify_delay_asks_for_a_delay_warning_and_failure_alone_does_not(
    peers: Peers, tmp_path: Path
) -> None:
    events: list[DeliveryEvent] = []
    wanted, unwanted = token(), token()

    async def scenario() -> tuple[list[SinkMessage], list[SinkMessage], Relay]:
        relay = relay_for(tmp_path, peers.bare.port, events, delay_warning_after=0.5)
        async with running(relay):
            await submit(relay, [("later@dest.test", ["NOTIFY=DELAY"])], message(wanted))
            await submit(relay, [("later@dest.test", ["NOTIFY=FAILURE"])], message(unwanted))
            found = await dumps(peers, wanted, 1)
            await until(
                lambda: (
                    metric(relay, "mailflow_notifications_suppressed_total", action="delayed") >= 1
                ),
                within=20,
            )
            return found, await dumps(peers, unwanted, 1, within=0), relay

    found, found_unwanted, _ = run(scenario)
    (warning,) = ours(found)
    parsed, fields, _ = report(warning)
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    assert fields[1]["Action"] == "delayed"
    assert fields[1]["Status"] == "4.2.0"
    assert ours(found_unwanted) == []


def test_ret_hdrs_returns_the_headers_and_ret_full_the_message(
    peers: Peers, tmp_path: Path
) -> None:
    events: list[DeliveryEvent] = []
    headers_only, full = token(), token()

    async def scenario() -> tuple[list[SinkMessage], list[SinkMessage]]:
        relay = relay_for(tmp_path, peers.bare.port, events)
        async with running(relay):
            await submit(
                relay,
                [("never@dest.test", [])],
                message(headers_only, "body-hdrs"),
                mail_options=["RET=HDRS"],
            )
            await submit(
                relay,
                [("never@dest.test", [])],
                message(full, "body-full"),
                mail_options=["RET=FULL"],
            )
            return await dumps(peers, headers_only, 1), await dumps(peers, full, 1)

    found_headers, found_full = run(scenario)
    (bounce_headers,) = ours(found_headers)
    _, _, types = report(bounce_headers)
    assert types[2] == "text/rfc822-headers"
    assert b"body-hdrs" not in bounce_headers.data
    (bounce_full,) = ours(found_full)
    _, _, types = report(bounce_full)
    assert types[2] == "message/rfc822"
    assert b"body-full" in bounce_full.data


# --- REQUIRETLS -----------------------------------------------------------------------------


def test_requiretls_to_a_hop_without_verified_tls_bounces_5_7_30(
    peers: Peers, tmp_path: Path
) -> None:
    events: list[DeliveryEvent] = []
    mark = token()

    async def scenario() -> tuple[list[SinkMessage], Relay]:
        relay = relay_for(tmp_path, peers.full.port, events)
        async with running(relay):
            async with aiosmtplib.SMTP(
                hostname="127.0.0.1",
                port=relay.port,
                start_tls=True,
                validate_certs=False,
                timeout=10,
            ) as smtp:
                await smtp.sendmail(
                    "alice@sender.test",
                    ["bob@dest.test"],
                    message(mark),
                    mail_options=["REQUIRETLS"],
                )
            return await dumps(peers, mark, 1), relay

    found, relay = run(scenario)
    assert [m for m in found if m.mail_from == "alice@sender.test"] == []
    (bounce,) = ours(found)
    _, fields, _ = report(bounce)
    assert fields[1]["Status"] == "5.7.30"
    assert "REQUIRETLS" in fields[1]["Diagnostic-Code"]
    assert metric(relay, "mailflow_extension_decisions_total", decision="5.7.30") == 1


def test_requiretls_goes_on_over_verified_tls_to_a_hop_that_offers_it(
    tmp_path: Path, pki: Pki
) -> None:
    """Relay A delivers (TrustedCA, a certificate from the test CA) to relay B, which
    offers REQUIRETLS after STARTTLS and stores the message with the flag."""
    ca = pki.ca()
    leaf = ca.issue("relay-b.test")
    events: list[DeliveryEvent] = []
    mark = token()

    async def scenario() -> list[SpooledMessage]:
        # B keeps what it gets (its next hop is a closed port: deferred, never bounced).
        relay_b = relay_for(
            tmp_path / "b",
            free_port(),
            [],
            listener={"tls_cert_file": leaf.cert_file, "tls_key_file": leaf.key_file},
        )
        async with running(relay_b):
            relay_a = relay_for(
                tmp_path / "a",
                relay_b.port,
                events,
                tls=TlsPolicy(mode=TlsMode.TRUSTED_CA, ca_bundle=ca.pem),
            )
            async with running(relay_a):
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=relay_a.port,
                    start_tls=True,
                    validate_certs=False,
                    timeout=10,
                ) as smtp:
                    await smtp.sendmail(
                        "alice@sender.test",
                        ["bob@dest.test"],
                        message(mark),
                        mail_options=["REQUIRETLS"],
                    )
                await until(lambda: len(events) == 1, within=20)
            # scan() reads envelopes only; load() brings the body.
            waiting = await asyncio.to_thread(relay_b.spool.scan)
            return [await asyncio.to_thread(relay_b.spool.load, m.queue_id) for m in waiting]

    stored = run(scenario)
    (result,) = events[0].report.results
    assert result.status.value == "delivered", result
    assert events[0].report.verified is True
    (kept,) = stored
    assert kept.parameters.mail.requiretls is True
    assert mark.encode() in kept.body


# --- Postfix as the submitting client ---------------------------------------------------------


def test_postfix_smtp_client_submits_dsn_smtputf8_and_8bitmime_parameters(tmp_path: Path) -> None:
    """Postfix's sendmail -N/-R/-V (and a UTF-8 recipient) into a private Postfix whose
    relayhost is the relay: what Postfix's smtp client sends, the relay parses and stores."""
    relay_port = free_port()
    events: list[DeliveryEvent] = []
    mark = token()
    with tempfile.TemporaryDirectory(prefix="mailflow-postfix-") as folder:
        Path(folder).chmod(0o755)
        submitter = PostfixDestination(
            Path(folder) / "client", port=free_port(), relay_port=relay_port, settings={}
        )

        async def scenario() -> list[SpooledMessage]:
            # The relay keeps what it gets: its own next hop is a closed port.
            relay = relay_for(tmp_path, free_port(), events, listener={"port": relay_port})
            async with running(relay):
                body = message(
                    mark,
                    EIGHT_BIT,
                    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
                )
                await asyncio.to_thread(
                    subprocess.run,
                    [
                        "/usr/sbin/sendmail",
                        "-C",
                        str(submitter.config_directory),
                        "-N",
                        "success,delay",
                        "-R",
                        "hdrs",
                        "-V",
                        "env-" + mark,
                        "-f",
                        "alice@sender.test",
                        "zoë@bücher.test",
                    ],
                    input=body.replace(b"\r\n", b"\n"),
                    check=True,
                    timeout=30,
                )
                return await until(
                    lambda: relay.spool.scan(repair=False),
                    within=30,
                    what="the message from Postfix",
                )

        with submitter:
            (stored,) = run(scenario, within=60)
    assert stored.recipients[0].address == "zoë@bücher.test"
    assert stored.parameters == EnvelopeParameters(
        MailParameters(
            body=BodyType.EIGHT_BIT_MIME, smtputf8=True, ret=Ret.HDRS, envid="env-" + mark
        ),
        (
            (
                "zoë@bücher.test",
                RecipientParameters(
                    frozenset({Notify.SUCCESS, Notify.DELAY}), ("utf-8", "zoë@bücher.test")
                ),
            ),
        ),
    )
