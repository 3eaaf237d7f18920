"""The spool records who submitted a message and when it first arrived; one relay per spool."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailflow_relay.queue.lock import LOCK_FILE, SpoolInUseError, SpoolLock
from mailflow_relay.queue.spool import Spool


def test_client_user_and_first_arrival_survive_a_reload_from_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
    stored = spool.store_with_header(
        "a@sender.test",
        ["b@dest.test"],
        lambda _id: b"Subject: s\r\n\r\nx\r\n",
        client="192.0.2.25",
        user="compliance",
        arrived=first,
    )
    (loaded,) = Spool(tmp_path).scan()
    assert (loaded.client, loaded.user, loaded.arrived) == ("192.0.2.25", "compliance", first)
    assert loaded.arrival == first
    assert loaded.received == stored.received


def test_a_record_written_before_these_fields_still_loads(tmp_path: Path) -> None:
    # The old single-file layout, as a relay before these fields wrote it.
    queue_id = "0006123456789a-0123456789abcdef"
    body = b"Subject: s\r\n\r\nx\r\n"
    recipient = {
        "address": "b@dest.test",
        "status": "pending",
        "attempts": 0,
        "next_attempt": None,
        "last_reply_code": None,
        "last_reply_text": None,
    }
    envelope = json.dumps(
        {
            "queue_id": queue_id,
            "sender": "a@sender.test",
            "recipients": [recipient],
            "received": "2026-11-28T09:30:00+00:00",
            "size": len(body),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    lengths = f"{len(envelope)} {len(body)}".encode()
    digest = hashlib.sha256(lengths + envelope + body).hexdigest().encode()
    (tmp_path / f"{queue_id}.msg").write_bytes(
        b"MAILFLOW-SPOOL-RECORD 1\n" + digest + b" " + lengths + b"\n" + envelope + body
    )
    (loaded,) = Spool(tmp_path).scan()
    assert (loaded.client, loaded.user, loaded.arrived) == ("", None, None)
    assert loaded.arrival == loaded.received
    assert not loaded.recipients[0].delay_notified
    # Moved into a segment, and the same from there.
    assert Spool(tmp_path).scan() == [loaded]


def test_the_lock_file_is_not_taken_for_a_foreign_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = SpoolLock(tmp_path)
    lock.acquire()
    try:
        assert Spool(tmp_path).scan() == []
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert "foreign file" not in caplog.text
    assert not (tmp_path / "corrupt" / LOCK_FILE).exists()


def test_a_second_lock_names_the_holder_and_a_killed_holder_leaves_no_lock(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from mailflow_relay.queue.lock import SpoolLock;"
            f"SpoolLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True);"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SpoolInUseError) as refused:
            SpoolLock(tmp_path).acquire()
        assert refused.value.pid == holder.pid
        assert f"in use by the relay with PID {holder.pid}" in str(refused.value)
        assert isinstance(refused.value, BlockingIOError)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    # SIGKILL: the PID stays in the file, the lock does not.
    again = SpoolLock(tmp_path)
    again.acquire()
    again.release()
