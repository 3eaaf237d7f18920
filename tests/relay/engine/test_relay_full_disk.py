"""A full spool disk: no recipient is delivered twice, and new mail hears 452 4.3.1.

The spool is a small tmpfs mounted by the test (root only), filled by a file the test
writes until the file system has no room left, and emptied by deleting that file.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiosmtplib
import pytest

from faults import SmallFilesystem, connector, document, fill, metric, relay_settings, running, send
from mailflow_relay.engine.relay import Relay
from mailflow_relay.queue.spool import RecipientStatus, Spool
from mailflow_relay.testing.sink import SmtpSink
from support import run, until

FS_SIZE = 4 * 1024 * 1024
BODY = b"From: alice@sender.test\r\nSubject: mixed\r\nMessage-ID: <mixed@sender.test>\r\n\r\nhi\r\n"


@pytest.mark.parametrize("refusal", ["451 4.2.0 try later", "550 5.1.1 no such user"])
def test_a_mixed_outcome_on_a_full_disk_delivers_the_delivered_recipient_once(
    refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A delivered, b refused; the state file (451) or the bounce (550) cannot be written.

    Before: a was delivered again on every retry (10 copies in 10 s in the attack; 6 in
    this test's 3 s). After: once, and the outcomes reach the spool once there is room."""

    async def scenario() -> tuple[int, int, float, list[RecipientStatus] | None, int]:
        with SmallFilesystem(FS_SIZE) as fs:
            spool_dir = fs.path / "spool"
            Spool(spool_dir).store("alice@sender.test", ["a@good.test", "b@bad.test"], BODY)
            filler = fs.path / "filler"
            fill(filler)
            async with SmtpSink(rcpt_replies={"b@bad.test": refusal}) as sink:
                relay = Relay(
                    relay_settings(spool_dir, spool_min_free=0, spool_write_backoff=0.2),
                    document(connector("all", ["*"], sink.port)),
                )
                async with running(relay):
                    await until(lambda: sink.messages, what="the first delivery")
                    await asyncio.sleep(3.0)  # several retries while the disk is full
                    copies_while_full = len(sink.messages)
                    failures = metric(
                        relay,
                        "mailflow_spool_write_failures_total",
                        what="state" if refusal.startswith("4") else "bounce",
                    )
                    filler.unlink()
                    if refusal.startswith("4"):
                        await until(
                            lambda: (
                                relay.spool.load(relay.spool.scan()[0].queue_id)
                                .recipient("a@good.test")
                                .status
                                is RecipientStatus.DELIVERED
                            ),
                            what="the outcomes written once there is room",
                        )
                        (message,) = relay.spool.scan()
                        statuses: list[RecipientStatus] | None = [
                            r.status for r in message.recipients
                        ]
                    else:
                        # The bounce is spooled and sent, then the message is removed.
                        await until(lambda: len(sink.messages) == 2, what="the bounce")
                        await until(lambda: not list(spool_dir.glob("*.msg")), what="removal")
                        statuses = None
                    await asyncio.sleep(0.5)
                    to_a = sum("a@good.test" in m.rcpt_tos for m in sink.messages)
                    unrecorded = metric(relay, "mailflow_spool_unrecorded_outcomes")
                return copies_while_full, to_a, failures, statuses, int(unrecorded)

    with caplog.at_level(logging.INFO):
        copies_while_full, to_a, failures, statuses, unrecorded = run(scenario, within=60)
    assert copies_while_full == 1
    assert to_a == 1
    assert failures >= 2  # the write was retried with a backoff, and counted
    if statuses is not None:
        assert statuses == [RecipientStatus.DELIVERED, RecipientStatus.DEFERRED]
    assert unrecorded == 0
    assert any("the spool refused" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info]  # warnings, never a traceback


def test_new_mail_gets_452_below_the_free_space_reserve_and_is_accepted_after(
    tmp_path: Path,
) -> None:
    """Before: a full disk answered "451 4.3.0 local error" after the whole DATA. After:
    "452 4.3.1" at RCPT below the reserve, and mail is taken again once there is room."""

    async def scenario() -> tuple[str, str, float, float]:
        with SmallFilesystem(FS_SIZE) as fs:
            async with SmtpSink() as sink:
                relay = Relay(
                    relay_settings(fs.path / "spool", spool_min_free=1024 * 1024),
                    document(connector("all", ["*"], sink.port)),
                )
                async with running(relay):
                    await send(relay.port, ["x@dest.test"], message_id="before")
                    filler = fs.path / "filler"
                    fill(filler, leave=512 * 1024)  # below the reserve, not quite full
                    refused = ""
                    for _ in range(30):  # the free space is looked at once a second
                        try:
                            await send(relay.port, ["x@dest.test"], message_id="while-full")
                        except aiosmtplib.SMTPRecipientsRefused as e:
                            refused = f"{e.recipients[0].code} {e.recipients[0].message}"
                            break
                        await asyncio.sleep(0.1)
                    full = metric(relay, "mailflow_spool_full")
                    filler.unlink()
                    accepted = ""
                    for _ in range(30):
                        try:
                            await send(relay.port, ["x@dest.test"], message_id="after")
                        except aiosmtplib.SMTPRecipientsRefused:
                            await asyncio.sleep(0.1)
                            continue
                        accepted = "accepted"
                        break
                    await until(lambda: len(sink.messages) >= 2, what="delivery after")
                    spool_full = metric(
                        relay, "mailflow_messages_refused_total", reason="spool_full"
                    )
                return refused, accepted, full, spool_full

    refused, accepted, full, spool_full = run(scenario, within=60)
    assert refused.startswith("452 4.3.1 "), refused
    assert accepted == "accepted"
    assert full == 1.0
    assert spool_full >= 1


def test_a_hand_off_on_a_full_disk_never_hands_the_delivered_recipient_again() -> None:
    """Draining while the outcome is only in memory: the peer gets b, never a again."""

    async def scenario() -> tuple[int, list[tuple[str, ...]]]:
        with SmallFilesystem(FS_SIZE) as fs:
            spool_dir = fs.path / "spool"
            Spool(spool_dir).store("alice@sender.test", ["a@good.test", "b@bad.test"], BODY)
            fill(fs.path / "filler")
            async with (
                SmtpSink(rcpt_replies={"b@bad.test": "451 4.2.0 try later"}) as sink,
                SmtpSink() as peer,
            ):
                relay = Relay(
                    relay_settings(
                        spool_dir,
                        spool_min_free=0,
                        spool_write_backoff=0.2,
                        handoff=("127.0.0.1", peer.port),
                        drain_grace=0.5,
                    ),
                    document(connector("all", ["*"], sink.port)),
                )
                async with running(relay):
                    await until(lambda: sink.messages, what="the first delivery")
                    await until(
                        lambda: metric(relay, "mailflow_spool_write_failures_total", what="state"),
                        what="a refused state write",
                    )
                return len(sink.messages), [m.rcpt_tos for m in peer.messages]

    delivered, handed = run(scenario, within=60)
    assert delivered == 1
    assert handed == [("b@bad.test",)]
