"""A relay killed between a spool append and its fdatasync loses no acknowledged message.

The group-commit spool answers ``250`` only after the fdatasync of the batch that holds
the message. Here the relay kills itself at that exact point (kill_before_fdatasync.py),
under traffic from several clients; then the unsynced part of the segment is cut in the
middle, as a power cut could leave it (a torn tail). A clean start must deliver every
acknowledged message, and take the torn tail for what it is: never acknowledged, so
ignored, nothing moved to ``corrupt/``.
"""

from __future__ import annotations

import collections
import os
import random
import smtplib
import sys
import threading
import time
from pathlib import Path

import pytest

from faults import need_tool, summary
from mailflow_relay.queue.spool import Spool
from peers import SmtpSink, free_port
from relayproc import RelayProcess, connector

KILLER = Path(__file__).with_name("kill_before_fdatasync.py")
CLIENTS = 3
BODY = ("x" * 70 + "\r\n") * 70  # 5 kB: a batch spans several pages of the segment


def client(port: int, prefix: str, acknowledged: list[str], stop: threading.Event) -> None:
    for number in range(10_000):
        if stop.is_set():
            return
        message_id = f"<{prefix}-{number}@fdatasync.test>"
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
                refused = smtp.sendmail(
                    "a@fdatasync.test",
                    ["b@dest.test"],
                    f"Message-ID: {message_id}\r\nSubject: torn\r\n\r\n" + BODY,
                )
        except (OSError, smtplib.SMTPException):
            return  # the relay is gone: this message was never acknowledged
        if not refused:
            acknowledged.append(message_id)


def run_until_killed(
    tmp_path: Path, manifests: str, spool: Path, round_number: int, kill_at: int
) -> tuple[list[str], tuple[int, int, int]]:
    report = tmp_path / f"kill-{round_number}.report"
    relay = RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool)
    relay.command = [sys.executable, str(KILLER), str(kill_at), str(report), *relay.command[1:]]
    acknowledged: list[str] = []
    with relay:
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=client, args=(relay.port, f"r{round_number}c{i}", acknowledged, stop)
            )
            for i in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        assert relay.process is not None
        try:
            relay.process.wait(timeout=60)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
        assert relay.process.returncode == -9, relay.output()
        relay.process = None
    inode, durable, written = (int(field) for field in report.read_text().split())
    return acknowledged, (inode, durable, written)


def tear_the_unsynced_tail(spool: Path, inode: int, durable: int, written: int) -> int:
    """Cut the segment inside what the killed fdatasync never made durable."""
    for segment in spool.glob("seg-*.msg"):
        if segment.stat().st_ino == inode and written > durable:
            cut = durable + (written - durable) // 2
            os.truncate(segment, cut)
            return written - cut
    return 0


@pytest.mark.slow
def test_a_kill_between_append_and_fdatasync_loses_no_acknowledged_message(
    tmp_path: Path,
) -> None:
    need_tool("smtp-sink")
    rng = random.Random(20261202)
    port = free_port()  # nobody listens until the end: everything waits in the spool
    manifests = connector("all", '["*"]', port)
    spool = tmp_path / "spool"
    acknowledged: list[str] = []
    torn_bytes = 0
    started = time.monotonic()
    for round_number in range(2):
        ids, (inode, durable, written) = run_until_killed(
            tmp_path, manifests, spool, round_number, kill_at=rng.randint(8, 30)
        )
        acknowledged += ids
        torn_bytes += tear_the_unsynced_tail(spool, inode, durable, written)

    waiting = {m.queue_id for m in Spool(spool).scan(repair=False)}
    with (
        SmtpSink(port=port) as destination,
        RelayProcess(tmp_path, manifests, "--accept-from", "127.0.0.1/32", spool=spool),
    ):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and list(spool.glob("*.msg")):
            time.sleep(0.2)
        time.sleep(0.5)
        arrived = collections.Counter(
            line.split(":", 1)[1].strip()
            for message in destination.messages()
            for line in message.text.splitlines()
            if line.lower().startswith("message-id:")
        )
    missing = [m for m in acknowledged if m not in arrived]
    summary(
        "kill between append and fdatasync",
        acknowledged=len(acknowledged),
        spooled=len(waiting),
        torn_bytes=torn_bytes,
        seconds=f"{time.monotonic() - started:.1f}",
        lost=len(missing),
    )
    assert acknowledged, "no message was acknowledged before the kill: nothing was tested"
    assert torn_bytes > 0, "the kill left nothing unsynced to tear: the window was missed"
    assert missing == []
    # A torn tail is a crash, not damage: nothing for a person to look at.
    assert not os.listdir(spool / "corrupt")
