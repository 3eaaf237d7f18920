"""The spool's file system fills and empties under traffic: nothing acknowledged is lost.

A small tmpfs (mounted by the test, root only) holds the spool. The destination first
refuses every recipient with 451, so the queue grows until the free space falls below the
reserve and new mail hears ``452 4.3.1``; then a filler file takes the rest of the disk,
so that even the relay's state writes fail for a while. Then the filler goes, the
destination recovers, the queue drains, and new mail is taken again. Every message that
got a 250 must arrive; duplicates are counted (none are expected: nothing the destination
acknowledged is forgotten).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest

from faults import (
    FaultyHop,
    SmallFilesystem,
    connector,
    document,
    fill,
    metric,
    relay_settings,
    running,
    summary,
)
from mailflow_relay.engine.relay import Relay
from support import run, until

FS_SIZE = 4 * 1024 * 1024
RESERVE = 1024 * 1024
PADDING = "x" * 76 + "\r\n"
BODY_LINES = 200  # about 16 KiB per message
MAX_ATTEMPTS = 400
"""Bounds the filling phase in count (and the loop below bounds it in time)."""


async def try_send(port: int, message_id: str) -> str:
    """``ok``, ``452`` (refused for space at RCPT) or ``other`` (any other refusal)."""
    body = (
        f"From: a@sender.test\r\nSubject: fill\r\nMessage-ID: <{message_id}@sender.test>\r\n\r\n"
        + PADDING * BODY_LINES
    )
    try:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, timeout=10
        ) as smtp:
            await smtp.sendmail("a@sender.test", ["x@dest.test"], body.encode())
    except aiosmtplib.SMTPRecipientsRefused as e:
        refusal = e.recipients[0]
        return "452" if (refusal.code, refusal.message[:5]) == (452, "4.3.1") else "other"
    except aiosmtplib.SMTPException:
        return "other"
    return "ok"


@dataclass
class Cycle:
    queued_when_full: int = 0
    refused_452: int = 0
    other_refusals: int = 0
    while_full: list[str] = field(default_factory=list)
    write_failures: float = 0.0
    after: list[str] = field(default_factory=list)


async def fill_until_refused(port: int, cycle: int, acknowledged: list[str], record: Cycle) -> None:
    """Send until new mail hears 452 five times in a row (bounded in count and time)."""
    refused_in_a_row = 0
    deadline = time.monotonic() + 60
    for n in range(MAX_ATTEMPTS):
        if refused_in_a_row >= 5 or time.monotonic() > deadline:
            break
        message_id = f"fill{cycle}-{n}"
        result = await try_send(port, message_id)
        if result == "ok":
            acknowledged.append(message_id)
            record.queued_when_full += 1
            refused_in_a_row = 0
        elif result == "452":
            record.refused_452 += 1
            refused_in_a_row += 1
        else:
            record.other_refusals += 1


async def one_cycle(
    relay: Relay, hop: FaultyHop, fs: SmallFilesystem, cycle: int, acknowledged: list[str]
) -> Cycle:
    record = Cycle()
    hop.mode = "rcpt-451"  # the queue grows
    await fill_until_refused(relay.port, cycle, acknowledged, record)
    # Full to the last byte: outcome writes fail too, for a while.
    before = metric(relay, "mailflow_spool_write_failures_total", what="state")
    filler = fs.path / "filler"
    fill(filler)
    await asyncio.sleep(2.0)
    record.write_failures = metric(relay, "mailflow_spool_write_failures_total", what="state")
    record.write_failures -= before
    record.while_full = [await try_send(relay.port, f"full{cycle}-{n}") for n in range(3)]
    # Empty: the filler goes, the destination recovers, the queue drains.
    filler.unlink()
    hop.mode = "ok"
    await until(
        lambda: all(hop.delivered[m] for m in acknowledged), within=60, what="the queue drained"
    )
    for n in range(30):
        result = await try_send(relay.port, f"after{cycle}-{n}")
        if result == "ok":
            acknowledged.append(f"after{cycle}-{n}")
        record.after.append(result)
        if record.after[-5:] == ["ok"] * 5:
            break
        await asyncio.sleep(0.2)
    await until(
        lambda: all(hop.delivered[m] for m in acknowledged),
        within=30,
        what="mail taken after the disk emptied",
    )
    return record


def fills_and_empties(tmp_path: Path, cycles: int) -> None:
    async def scenario() -> tuple[list[str], dict[str, int], list[Cycle], float]:
        started = time.monotonic()
        with SmallFilesystem(FS_SIZE) as fs:
            async with FaultyHop() as hop:
                relay = Relay(
                    relay_settings(
                        fs.path / "spool",
                        spool_min_free=RESERVE,
                        spool_write_backoff=0.2,
                        retry_initial=0.5,
                        retry_max=1.0,
                    ),
                    document(connector("dest", ["*"], hop.port)),
                )
                acknowledged: list[str] = []
                async with running(relay):
                    records = [
                        await one_cycle(relay, hop, fs, cycle, acknowledged)
                        for cycle in range(cycles)
                    ]
                    await until(lambda: not list(relay.spool.directory.glob("*.msg")))
                return acknowledged, dict(hop.delivered), records, time.monotonic() - started

    acknowledged, delivered, records, seconds = run(scenario, within=90 + 90 * cycles)
    lost = [m for m in acknowledged if not delivered.get(m)]
    duplicates = sum(n - 1 for n in delivered.values() if n > 1)
    summary(
        f"spool fills and empties ({cycles} cycle(s))",
        messages=len(acknowledged),
        queued_when_full="/".join(str(r.queued_when_full) for r in records),
        refused_452=sum(r.refused_452 for r in records),
        state_write_failures=int(sum(r.write_failures for r in records)),
        kills=0,
        duplicates=duplicates,
        seconds=f"{seconds:.1f}",
        lost=len(lost),
    )
    for record in records:
        assert record.queued_when_full, "nothing was queued: the disk never filled"
        assert record.refused_452 >= 5
        assert record.other_refusals == 0  # never "451 local error": 452 before it is full
        assert record.while_full == ["452", "452", "452"]
        assert record.write_failures >= 1
        assert "ok" in record.after  # new mail is taken again once there is room
    assert lost == []
    assert duplicates == 0


def test_a_spool_that_fills_and_empties_loses_nothing_acknowledged(tmp_path: Path) -> None:
    fills_and_empties(tmp_path, cycles=1)


@pytest.mark.soak
def test_a_spool_that_fills_and_empties_again_and_again_loses_nothing(tmp_path: Path) -> None:
    fills_and_empties(tmp_path, cycles=4)
