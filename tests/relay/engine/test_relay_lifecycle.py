"""The queue's life in one relay process: retries, bounces, reloads, drain and metrics.

Real sockets throughout (the relay's listener, destination servers on loopback), with
the clock shortened through settings: retries after fractions of a second, a queue
lifetime of a second.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import ipaddress
import itertools
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.queue.spool import RecipientStatus
from mailflow_relay.routing.document import (
    Connector,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.testing.sink import ReceivedMessage, SmtpSink
from support import run, until


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connector(name: str, domains: list[str], port: int, generation: int = 1) -> Connector:
    return Connector(
        ref=ObjectRef("mail", name),
        generation=generation,
        created="",
        enabled=True,
        recipient_patterns=tuple(DomainPattern.parse(d) for d in domains),
        sender_patterns=(),
        destination=SmartHost("127.0.0.1", port),
        tls=TlsPolicy(),
    )


def document(*connectors: Connector, generation: int = 1) -> RoutingDocument:
    return RoutingDocument(generation=generation, connectors=connectors)


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
        retry_initial=0.2,
        retry_max=1.0,
        scheduler_tick=0.05,
        drain_grace=3.0,
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


async def send(
    relay: Relay, recipients: list[str], sender: str = "alice@sender.test", subject: str = "hi"
) -> None:
    body = f"From: {sender}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@sender.test>\r\n\r\nhello\r\n"
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
    ) as smtp:
        await smtp.sendmail(sender, recipients, body.encode())


def metric(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def report_of(message: ReceivedMessage) -> tuple[str, list[dict[str, str]]]:
    parsed = email.message_from_bytes(message.data, policy=email.policy.compat32)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    parts = [p for p in parsed.get_payload() if isinstance(p, email.message.Message)]
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    fields = [dict(block.items()) for block in blocks if isinstance(block, email.message.Message)]
    return str(parsed["Subject"]), fields[1:]


# --- retries --------------------------------------------------------------------------------


def test_deferred_recipients_are_retried_with_exponential_backoff(tmp_path: Path) -> None:
    async def scenario() -> list[float]:
        async with SmtpSink(rcpt_replies={"b@dest.test": "451 4.3.0 try again"}) as sink:
            relay = Relay(
                settings(tmp_path, retry_initial=0.2, retry_max=10),
                document(connector("all", ["*"], sink.port)),
            )
            async with running(relay):
                await send(relay, ["b@dest.test"])
                await until(lambda: len(sink.rcpt_log) >= 4)
            return [t for t, _ in sink.rcpt_log[:4]]

    times = run(scenario)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.2 s, 0.4 s, 0.8 s, plus the delivery itself: never earlier than the backoff, and
    # not much later (the bound is loose for a busy CI machine; doubling is what counts).
    for gap, expected in zip(gaps, [0.2, 0.4, 0.8], strict=True):
        assert expected <= gap < expected + 0.6, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps


def test_the_retry_state_survives_a_restart(tmp_path: Path) -> None:
    port = closed_port()

    async def scenario() -> tuple[list[RecipientStatus], int, int]:
        doc = document(connector("all", ["*"], port))
        relay = Relay(settings(tmp_path, retry_initial=0.3), doc)
        async with running(relay):
            await send(relay, ["b@dest.test"])
            await until(
                lambda: (
                    metric(
                        relay,
                        "mailflow_recipients_deferred_total",
                        connector="mail/all",
                        destination=f"127.0.0.1:{port}",
                        tls_mode="Opportunistic",
                    )
                    >= 1
                )
            )
        states = [r.status for m in relay.spool.scan() for r in m.recipients]
        attempts = relay.spool.scan()[0].recipients[0].attempts
        async with SmtpSink(port=port) as sink:
            again = Relay(settings(tmp_path, retry_initial=0.3), doc)
            async with running(again):
                await until(lambda: len(sink.messages) == 1)
            return states, attempts, len(sink.messages)

    states, attempts, delivered = run(scenario)
    assert states == [RecipientStatus.DEFERRED]
    assert attempts >= 1
    assert delivered == 1


def test_a_dead_destination_does_not_hold_up_other_destinations(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, float]:
        async with SmtpSink() as alive:
            doc = document(
                connector("dead", ["dead.test"], closed_port()),
                connector("alive", ["alive.test"], alive.port),
            )
            relay = Relay(settings(tmp_path, workers=2), doc)
            async with running(relay):
                for i in range(10):
                    await send(relay, [f"x{i}@dead.test"], subject=f"dead{i}")
                started = asyncio.get_running_loop().time()
                await send(relay, ["y@alive.test"], subject="alive")
                await until(lambda: len(alive.messages) == 1)
                return len(alive.messages), asyncio.get_running_loop().time() - started

    delivered, seconds = run(scenario)
    assert delivered == 1
    assert seconds < 3.0


def test_a_queue_run_after_an_outage_respects_the_concurrency_limit(tmp_path: Path) -> None:
    port = closed_port()

    async def scenario() -> tuple[int, int]:
        doc = document(connector("all", ["*"], port))
        relay = Relay(
            settings(
                tmp_path,
                workers=16,
                retry_initial=0.5,
                delivery=DeliverySettings(
                    helo_name="relay.test", max_connections_per_target=2, failures_before_down=1000
                ),
            ),
            doc,
        )
        async with running(relay):
            for i in range(20):
                await send(relay, [f"b{i}@dest.test"], subject=f"m{i}")
            async with SmtpSink(port=port) as sink:
                await until(lambda: len(sink.messages) == 20, within=20)
                return sink.max_sessions, len(sink.messages)

    max_sessions, delivered = run(scenario)
    assert delivered == 20
    assert max_sessions <= 2


# --- bounces ----------------------------------------------------------------------------------


def test_a_5xx_bounces_at_once_with_an_rfc3464_report(tmp_path: Path) -> None:
    async def scenario() -> list[ReceivedMessage]:
        async with SmtpSink(rcpt_replies={"never@dest.test": "550 5.1.1 no such user"}) as sink:
            relay = Relay(settings(tmp_path), document(connector("all", ["*"], sink.port)))
            async with running(relay):
                await send(relay, ["ok@dest.test", "never@dest.test"], subject="original")
                await until(lambda: len(sink.messages) == 2)
                await until(lambda: metric(relay, "mailflow_bounces_total", action="failed") == 1)
            return sink.messages

    messages = run(scenario)
    bounce = next(m for m in messages if m.mail_from == "")
    assert bounce.rcpt_tos == ("alice@sender.test",)
    subject, recipients = report_of(bounce)
    assert subject == "Undelivered Mail Returned to Sender"
    assert recipients == [
        {
            "Final-Recipient": "rfc822; never@dest.test",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; 127.0.0.1",
            "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
            "Last-Attempt-Date": recipients[0]["Last-Attempt-Date"],
        }
    ]
    assert b"Message-ID: <original@sender.test>" in bounce.data
    assert b"hello" not in bounce.data.split(b"text/rfc822-headers")[1]


def test_no_bounce_goes_to_the_null_sender(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, float]:
        async with SmtpSink(rcpt_replies={"never@dest.test": "550 5.1.1 no such user"}) as sink:
            relay = Relay(settings(tmp_path), document(connector("all", ["*"], sink.port)))
            async with running(relay):
                await send(relay, ["never@dest.test"], sender="")
                await until(
                    lambda: (
                        metric(
                            relay,
                            "mailflow_recipients_failed_total",
                            connector="mail/all",
                            destination=f"127.0.0.1:{sink.port}",
                            tls_mode="Opportunistic",
                        )
                        == 1
                    )
                )
                await asyncio.sleep(0.3)
                assert list(relay.spool.directory.glob("*.msg")) == []
            return len(sink.messages), metric(relay, "mailflow_bounces_total", action="failed")

    assert run(scenario) == (0, 0.0)


def test_a_recipient_still_deferred_at_the_queue_lifetime_bounces(tmp_path: Path) -> None:
    async def scenario() -> ReceivedMessage:
        async with SmtpSink() as senders_mx:
            doc = document(
                connector("dest", ["dest.test"], closed_port()),
                connector("back", ["sender.test"], senders_mx.port),
            )
            relay = Relay(settings(tmp_path, queue_lifetime=0.6, retry_initial=0.2), doc)
            async with running(relay):
                await send(relay, ["b@dest.test"])
                await until(lambda: len(senders_mx.messages) == 1)
                await until(lambda: not list(relay.spool.directory.glob("*.msg")))
            return senders_mx.messages[0]

    bounce = run(scenario)
    subject, (recipient,) = report_of(bounce)
    assert subject == "Undelivered Mail Returned to Sender"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "4.4.7"
    assert recipient["Diagnostic-Code"].startswith(
        "smtp; 4.4.7 queue lifetime exceeded; last error: 4.4.1"
    )


def test_a_delay_warning_is_sent_once(tmp_path: Path) -> None:
    async def scenario() -> list[ReceivedMessage]:
        async with SmtpSink() as senders_mx:
            doc = document(
                connector("dest", ["dest.test"], closed_port()),
                connector("back", ["sender.test"], senders_mx.port),
            )
            relay = Relay(
                settings(tmp_path, delay_warning_after=0.2, retry_initial=0.1, retry_max=0.2), doc
            )
            async with running(relay):
                await send(relay, ["b@dest.test"])
                await until(lambda: len(senders_mx.messages) == 1)
                await asyncio.sleep(1.0)  # several more retries: no second warning
            return senders_mx.messages

    (warning,) = run(scenario)
    subject, (recipient,) = report_of(warning)
    assert subject == "Delayed Mail (still being retried)"
    assert recipient["Action"] == "delayed"
    assert "Will-Retry-Until" in recipient


# --- reload -------------------------------------------------------------------------------------


def test_a_reload_during_a_session_changes_routes_without_dropping_it(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int, float]:
        async with SmtpSink() as old, SmtpSink() as new:
            relay = Relay(settings(tmp_path), document(connector("all", ["*"], old.port)))
            async with (
                running(relay),
                aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
                ) as smtp,
            ):
                await smtp.sendmail("a@sender.test", ["b@dest.test"], b"Subject: one\r\n\r\n1\r\n")
                await until(lambda: len(old.messages) == 1)
                relay.load_document(
                    document(connector("all", ["*"], new.port, generation=2), generation=2)
                )
                # The same session goes on after the reload.
                await smtp.sendmail("a@sender.test", ["b@dest.test"], b"Subject: two\r\n\r\n2\r\n")
                await until(lambda: len(new.messages) == 1)
            return len(old.messages), len(new.messages), metric(relay, "mailflow_config_generation")

    assert run(scenario) == (1, 1, 2.0)


def test_a_document_that_fails_to_load_is_refused_and_the_old_one_stays(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, int, float, float]:
        async with SmtpSink() as sink:
            doc = document(connector("all", ["*"], sink.port))
            relay = Relay(settings(tmp_path), doc)
            async with running(relay):
                tampered = doc.to_json().replace(f'"port":{sink.port}', '"port":26')
                loaded = relay.load_document_json(tampered)
                await send(relay, ["b@dest.test"])
                await until(lambda: len(sink.messages) == 1)
            return (
                loaded,
                relay.document.generation,
                metric(relay, "mailflow_config_reloads_total", result="refused"),
                metric(relay, "mailflow_config_generation"),
            )

    assert run(scenario) == (False, 1, 1.0, 1.0)


# --- drain ---------------------------------------------------------------------------------------


def test_stop_lets_an_open_session_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, bool]:
        async with SmtpSink() as sink:
            relay = Relay(settings(tmp_path), document(connector("all", ["*"], sink.port)))
            task = asyncio.create_task(relay.run())
            await relay.ready.wait()
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
            )
            await smtp.connect()
            relay.stop()
            await asyncio.sleep(0.1)
            assert not relay.is_ready
            refused = False
            try:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=2
                ) as late:
                    await late.noop()
            except (aiosmtplib.SMTPException, OSError):
                refused = True
            await smtp.sendmail("a@sender.test", ["b@dest.test"], b"Subject: late\r\n\r\nx\r\n")
            await smtp.quit()
            await task
            return len(sink.messages), refused

    assert run(scenario) == (1, True)


def test_drain_hands_the_queue_to_a_peer_and_each_message_arrives_once(tmp_path: Path) -> None:
    dead = closed_port()

    async def scenario() -> tuple[list[str], float, list[Path]]:
        async with SmtpSink() as destination:
            peer = Relay(
                settings(tmp_path / "peer"), document(connector("all", ["*"], destination.port))
            )
            async with running(peer):
                leaving = Relay(
                    settings(
                        tmp_path / "leaving",
                        handoff=("127.0.0.1", peer.port),
                        drain_grace=0.5,
                        retry_initial=30,
                    ),
                    document(connector("all", ["*"], dead)),
                )
                async with running(leaving):
                    for i in range(8):
                        await send(leaving, [f"b{i}@dest.test"], subject=f"m{i}")
                    await until(
                        lambda: (
                            metric(
                                leaving,
                                "mailflow_recipients_deferred_total",
                                connector="mail/all",
                                destination=f"127.0.0.1:{dead}",
                                tls_mode="Opportunistic",
                            )
                            >= 8
                        )
                    )
                # Leaving the block stopped the relay: drained and handed off.
                await until(lambda: len(destination.messages) >= 8)
                await asyncio.sleep(0.5)  # a duplicate would show up now
            ids = [
                m.data.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
                for m in destination.messages
            ]
            return (
                ids,
                metric(leaving, "mailflow_handoff_messages_total", result="accepted"),
                list(leaving.spool.directory.glob("*.msg")),
            )

    ids, handed, left = run(scenario)
    assert sorted(ids) == sorted(f"<m{i}@sender.test>" for i in range(8))
    assert handed == 8.0
    assert left == []


# --- metrics ---------------------------------------------------------------------------------------


def test_metrics_move_with_the_traffic(tmp_path: Path) -> None:
    async def scenario() -> dict[str, float]:
        async with SmtpSink(rcpt_replies={"later@dest.test": "451 4.3.0 later"}) as sink:
            relay = Relay(
                settings(tmp_path, retry_initial=30), document(connector("all", ["*"], sink.port))
            )
            labels = {
                "connector": "mail/all",
                "destination": f"127.0.0.1:{sink.port}",
                "tls_mode": "Opportunistic",
            }
            async with running(relay):
                await send(relay, ["ok@dest.test", "later@dest.test"])
                await until(
                    lambda: metric(relay, "mailflow_recipients_deferred_total", **labels) == 1
                )
                await asyncio.sleep(0.2)
                text = relay.metrics.render().decode()
                assert "mailflow_delivery_duration_seconds_bucket" in text
                return {
                    "accepted": metric(relay, "mailflow_messages_accepted_total"),
                    "delivered": metric(relay, "mailflow_recipients_delivered_total", **labels),
                    "deferred": metric(relay, "mailflow_recipients_deferred_total", **labels),
                    "queue": metric(relay, "mailflow_queue_messages"),
                    "generation": metric(relay, "mailflow_config_generation"),
                }

    assert run(scenario) == {
        "accepted": 1.0,
        "delivered": 1.0,
        "deferred": 1.0,
        "queue": 1.0,
        "generation": 1.0,
    }


def test_tls_failures_are_counted_by_reason(tmp_path: Path) -> None:
    async def scenario() -> float:
        async with SmtpSink() as sink:  # offers no STARTTLS
            required = replace(
                connector("all", ["*"], sink.port),
                tls=TlsPolicy(mode=TlsPolicy().mode.__class__("TrustedCA")),
            )
            relay = Relay(settings(tmp_path, retry_initial=30), document(required))
            async with running(relay):
                await send(relay, ["b@dest.test"])
                await until(
                    lambda: (
                        metric(
                            relay,
                            "mailflow_tls_failures_total",
                            connector="mail/all",
                            tls_mode="TrustedCA",
                            reason="no_starttls",
                        )
                        == 1
                    )
                )
                return metric(
                    relay,
                    "mailflow_tls_failures_total",
                    connector="mail/all",
                    tls_mode="TrustedCA",
                    reason="no_starttls",
                )

    assert run(scenario) == 1.0


@pytest.mark.parametrize("bad", ["not json", '{"apiVersion": "x"}'])
def test_load_document_json_refuses_garbage(tmp_path: Path, bad: str) -> None:
    relay = Relay(settings(tmp_path), document(connector("all", ["*"], 25)))
    assert relay.load_document_json(bad) is False
    assert metric(relay, "mailflow_config_reloads_total", result="refused") == 1.0
    assert relay.document.generation == 1


# --- regressions from review: nothing stuck, nothing twice --------------------------------------


async def raw_send(port: int, lines: list[bytes], *, abort_after_data: bool = False) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await reader.readline()]
    for line in lines:
        writer.write(line)
        await writer.drain()
        if abort_after_data and line.endswith(b"\r\n.\r\n"):
            writer.transport.abort()
            return replies
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        replies.append(reply)
    writer.close()
    await writer.wait_closed()
    return replies


async def refuses_every_greeting(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        writer.write(b"220 grumpy.test ESMTP\r\n")
        while line := await reader.readline():
            greeting = line[:4].upper() in (b"EHLO", b"HELO")
            writer.write(b"502 5.5.1 go away\r\n" if greeting else b"221 2.0.0 bye\r\n")
            await writer.drain()
    finally:
        writer.close()


def test_a_server_refusing_every_greeting_defers_and_the_other_route_is_delivered_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[int, list[RecipientStatus], int]:
        grumpy = await asyncio.start_server(refuses_every_greeting, "127.0.0.1", 0)
        async with grumpy, SmtpSink() as good:
            doc = document(
                connector("good", ["good.test"], good.port),
                connector("bad", ["bad.test"], grumpy.sockets[0].getsockname()[1]),
            )
            relay = Relay(settings(tmp_path, retry_initial=0.2, retry_max=0.3), doc)
            async with running(relay):
                await send(relay, ["x@good.test", "y@bad.test"])
                await until(lambda: len(good.messages) == 1)
                await asyncio.sleep(1.0)  # several retries of y@bad.test
                (message,) = relay.spool.scan()
            return (
                len(good.messages),
                [r.status for r in message.recipients],
                message.recipient("y@bad.test").attempts,
            )

    delivered, statuses, attempts = run(scenario)
    assert delivered == 1
    assert statuses == [RecipientStatus.DELIVERED, RecipientStatus.DEFERRED]
    assert attempts >= 2  # recorded each time, so backoff and the lifetime apply


def test_a_message_stored_while_the_client_hangs_up_is_still_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailflow_relay.queue.spool import Spool

    original = Spool.store_with_header

    def slow_store(self: Spool, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # a slow fsync: the client gives up before the 250
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Spool, "store_with_header", slow_store)

    async def scenario() -> int:
        async with SmtpSink() as sink:
            relay = Relay(settings(tmp_path), document(connector("all", ["*"], sink.port)))
            async with running(relay):
                lines = [
                    b"EHLO c.test\r\n",
                    b"MAIL FROM:<a@sender.test>\r\n",
                    b"RCPT TO:<b@dest.test>\r\n",
                    b"DATA\r\n",
                    b"Subject: x\r\n\r\nhello\r\n.\r\n",
                ]
                await raw_send(relay.port, lines, abort_after_data=True)
                await until(lambda: len(sink.messages) == 1)
            return len(sink.messages)

    assert run(scenario) == 1


def test_a_partial_hand_off_keeps_only_the_recipients_the_peer_refused(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[tuple[str, ...]], list[tuple[str, RecipientStatus]]]:
        async with SmtpSink(rcpt_replies={"y@dest.test": "452 4.5.3 try later"}) as peer:
            relay = Relay(
                settings(
                    tmp_path, drain_grace=0.3, retry_initial=30, handoff=("127.0.0.1", peer.port)
                ),
                document(connector("all", ["*"], closed_port())),
            )
            async with running(relay):
                await send(relay, ["x@dest.test", "y@dest.test"])
                await until(
                    lambda: (
                        bool(relay.spool.scan())
                        and relay.spool.scan()[0].recipients[0].attempts == 1
                    )
                )
            (left,) = relay.spool.scan()
            return [m.rcpt_tos for m in peer.messages], [
                (r.address, r.status) for r in left.recipients
            ]

    handed, left = run(scenario)
    assert handed == [("x@dest.test",)]
    assert left == [
        ("x@dest.test", RecipientStatus.DELIVERED),
        ("y@dest.test", RecipientStatus.DEFERRED),
    ]


async def slow_data_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A destination that takes its time to answer the end of DATA."""
    try:
        writer.write(b"220 slow.test ESMTP\r\n")
        in_data = False
        while line := await reader.readline():
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    await asyncio.sleep(3)
                    writer.write(b"250 2.0.0 taken\r\n")
            elif line.upper().startswith(b"DATA"):
                in_data = True
                writer.write(b"354 go ahead\r\n")
            elif line.upper().startswith(b"QUIT"):
                writer.write(b"221 2.0.0 bye\r\n")
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
    finally:
        writer.close()


def test_a_delivery_cut_short_by_the_drain_is_handed_off_and_nothing_runs_on(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[int, int, set[str]]:
        handlers: set[asyncio.Task[Any]] = set()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.add(asyncio.current_task())  # type: ignore[arg-type]
            await slow_data_handler(reader, writer)

        slow = await asyncio.start_server(handler, "127.0.0.1", 0)
        async with slow, SmtpSink() as peer:
            relay = Relay(
                settings(tmp_path, drain_grace=0.5, handoff=("127.0.0.1", peer.port)),
                document(connector("all", ["*"], slow.sockets[0].getsockname()[1])),
            )
            async with running(relay):
                await send(relay, ["b@dest.test"])
                await asyncio.sleep(0.3)  # the delivery is waiting for the slow 250
            left = len(relay.spool.scan())
            names = {
                t.get_name()
                for t in asyncio.all_tasks()
                if t.get_name().startswith("mailflow-process")
            }
            # The slow destination is still sleeping on its 250: end it (asyncio's server
            # does not wait for its handlers).
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            return len(peer.messages), left, names

    handed, left, still_running = run(scenario)
    assert handed == 1
    assert left == 0
    assert still_running == set()


def test_addresses_with_control_characters_are_refused(tmp_path: Path) -> None:
    async def scenario() -> list[bytes]:
        async with SmtpSink() as sink:
            relay = Relay(settings(tmp_path), document(connector("all", ["*"], sink.port)))
            async with running(relay):
                return await raw_send(
                    relay.port,
                    [
                        b"EHLO c.test\r\n",
                        b"MAIL FROM:<a\r@sender.test>\r\n",
                        b"MAIL FROM:<a@sender.test>\r\n",
                        b"RCPT TO:<b\r@dest.test>\r\n",
                        b"QUIT\r\n",
                    ],
                )

    replies = run(scenario)
    assert replies[2].startswith(b"501 5.1.7")
    assert replies[3].startswith(b"250")
    assert replies[4].startswith(b"501 5.1.3")
