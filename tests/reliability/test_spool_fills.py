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
from pathlib import Path

import aiosmtplib

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


def test_a_spool_that_fills_and_empties_loses_nothing_acknowledged(tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        started = time.monotonic()
        with SmallFilesystem(FS_SIZE) as fs:
            async with FaultyHop(mode="rcpt-451") as hop:
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
                outcomes = {"ok": 0, "452": 0, "other": 0}
                async with running(relay):
                    # Fill: until new mail hears 452 a few times in a row.
                    refused_in_a_row = 0
                    deadline = time.monotonic() + 60
                    for n in range(MAX_ATTEMPTS):
                        if refused_in_a_row >= 5 or time.monotonic() > deadline:
                            break
                        result = await try_send(relay.port, f"fill-{n}")
                        outcomes[result] += 1
                        if result == "ok":
                            acknowledged.append(f"fill-{n}")
                            refused_in_a_row = 0
                        else:
                            refused_in_a_row += result == "452"
                    queued_when_full = len(acknowledged)
                    # Full to the last byte: outcome writes fail too, for a while.
                    filler = fs.path / "filler"
                    fill(filler)
                    await asyncio.sleep(2.0)
                    write_failures = metric(
                        relay, "mailflow_spool_write_failures_total", what="state"
                    )
                    while_full = [await try_send(relay.port, f"full-{n}") for n in range(3)]
                    # Empty: the filler goes, the destination recovers, the queue drains.
                    filler.unlink()
                    hop.mode = "ok"
                    await until(
                        lambda: all(hop.delivered[m] for m in acknowledged),
                        within=60,
                        what="the queue drained",
                    )
                    after = []
                    for n in range(30):
                        result = await try_send(relay.port, f"after-{n}")
                        if result == "ok":
                            acknowledged.append(f"after-{n}")
                        after.append(result)
                        if after[-5:] == ["ok"] * 5:
                            break
                        await asyncio.sleep(0.2)
                    await until(
                        lambda: all(hop.delivered[m] for m in acknowledged),
                        within=30,
                        what="mail taken after the disk emptied",
                    )
                    await until(lambda: not list(relay.spool.directory.glob("*.msg")))
                return {
                    "acknowledged": acknowledged,
                    "queued_when_full": queued_when_full,
                    "outcomes": outcomes,
                    "while_full": while_full,
                    "after": after,
                    "write_failures": write_failures,
                    "delivered": dict(hop.delivered),
                    "seconds": time.monotonic() - started,
                }

    result = run(scenario, within=180)
    acknowledged = result["acknowledged"]
    delivered = result["delivered"]
    assert isinstance(acknowledged, list)
    assert isinstance(delivered, dict)
    lost = [m for m in acknowledged if not delivered.get(m)]
    duplicates = sum(n - 1 for n in delivered.values() if n > 1)
    summary(
        "spool fills and empties",
        messages=len(acknowledged),
        queued_when_full=result["queued_when_full"],
        refused_452=result["outcomes"]["452"],  # type: ignore[index]
        state_write_failures=int(result["write_failures"]),  # type: ignore[call-overload]
        kills=0,
        duplicates=duplicates,
        seconds=f"{result['seconds']:.1f}",
        lost=len(lost),
    )
    assert result["queued_when_full"], "nothing was queued: the disk never filled"
    assert result["outcomes"]["452"] >= 5  # type: ignore[index]
    assert result["outcomes"]["other"] == 0  # type: ignore[index]  # no 451 local error
    assert result["while_full"] == ["452", "452", "452"]
    assert result["write_failures"] >= 1  # type: ignore[operator]
    assert "ok" in result["after"]  # type: ignore[operator]  # resumes once there is room
    assert lost == []
    assert duplicates == 0
