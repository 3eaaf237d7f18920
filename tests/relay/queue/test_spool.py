"""The durable spool (DESIGN.md, "Relay guarantees"): nothing acknowledged is ever lost."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailflow_relay.errors import MailflowRelayError
from mailflow_relay.queue import spool as spool_module
from mailflow_relay.queue.spool import (
    InvalidEnvelopeError,
    InvalidQueueIdError,
    MessageNotFoundError,
    MessageTooLargeError,
    RecipientState,
    RecipientStatus,
    Spool,
    SpoolCorruptError,
    SpooledMessage,
    SpoolStateError,
    is_queue_id,
)

SENDER = "sender@example.org"
RECIPIENTS = ("a@example.com", "b@example.net", "c@example.net")
# Everything SMTP can carry and a careless spool could mangle: CRLF, bare CR and LF,
# dot-stuffing candidates, NUL, 8-bit bytes and a missing final newline.
BODY = b"Subject: hi\r\n\r\n.leading dot\r\n..two\r\nbare\rcr bare\nlf \x00\xff\xfe\r\nend"
WRITER = Path(__file__).with_name("spool_crash_writer.py")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def deferred(address: str, attempts: int = 1) -> RecipientState:
    return RecipientState(
        address,
        RecipientStatus.DEFERRED,
        attempts=attempts,
        next_attempt=datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        last_reply_code=451,
        last_reply_text="4.7.1 Greylisted, try again later",
    )


def delivered(address: str) -> RecipientState:
    return RecipientState(address, RecipientStatus.DELIVERED, attempts=1, last_reply_code=250)


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_file()}


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.msg"))


# --- Round trips ----------------------------------------------------------------------


def test_a_stored_message_comes_back_from_scan_byte_for_byte(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)

    [scanned] = spool.scan()

    # The index holds envelopes, never bodies: the body comes with load().
    assert scanned == replace(stored, body=b"")
    assert spool.load(stored.queue_id).body == BODY
    assert scanned.sender == SENDER
    assert scanned.size == len(BODY)
    assert scanned.received.tzinfo is not None
    assert abs(scanned.received - datetime.now(UTC)) < timedelta(minutes=1)
    assert [r.address for r in scanned.recipients] == list(RECIPIENTS)
    assert all(r == RecipientState(r.address) for r in scanned.recipients)
    assert not scanned.is_final


def test_a_fresh_spool_object_reads_what_another_one_stored(tmp_path: Path) -> None:
    stored = Spool(tmp_path / "spool").store("", ["postmaster@example.com"], b"")

    assert Spool(tmp_path / "spool").scan() == [replace(stored, body=b"")]
    assert Spool(tmp_path / "spool").load(stored.queue_id) == stored


def test_load_returns_the_same_message_as_scan(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)

    assert spool.load(stored.queue_id) == stored


def test_an_update_is_visible_to_scan_and_load(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)

    states = spool.update(stored.queue_id, deferred(RECIPIENTS[0]), delivered(RECIPIENTS[2]))

    expected = (deferred(RECIPIENTS[0]), RecipientState(RECIPIENTS[1]), delivered(RECIPIENTS[2]))
    assert states == expected
    [scanned] = spool.scan()
    assert scanned.recipients == expected
    assert spool.load(stored.queue_id).body == BODY
    assert spool.load(stored.queue_id).recipients == expected
    assert [r.address for r in scanned.pending] == list(RECIPIENTS[:2])


def test_later_updates_keep_the_states_of_untouched_recipients(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)

    spool.update(stored.queue_id, delivered(RECIPIENTS[0]))
    spool.update(stored.queue_id, deferred(RECIPIENTS[1], attempts=3))

    assert spool.load(stored.queue_id).recipients == (
        delivered(RECIPIENTS[0]),
        deferred(RECIPIENTS[1], attempts=3),
        RecipientState(RECIPIENTS[2]),
    )


def test_an_update_appends_a_small_record_and_never_rewrites_the_message(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY * 20_000)
    [segment] = segment_files(spool.directory)
    before = segment.read_bytes()

    spool.update(stored.queue_id, deferred(RECIPIENTS[0]))

    after = segment.read_bytes()
    assert after.startswith(before)
    assert 0 < len(after) - len(before) < 2_000


def test_a_removed_message_is_gone_from_scan_load_and_disk(spool: Spool) -> None:
    kept = spool.store(SENDER, RECIPIENTS, b"kept")
    gone = spool.store(SENDER, RECIPIENTS[:1], b"gone")
    spool.update(gone.queue_id, delivered(RECIPIENTS[0]))

    spool.remove(gone.queue_id)

    assert [m.queue_id for m in spool.scan()] == [kept.queue_id]
    with pytest.raises(MessageNotFoundError, match=gone.queue_id):
        spool.load(gone.queue_id)
    spool.remove(kept.queue_id, force=True)
    spool.close()
    # Nothing left to deliver: every segment is reclaimed, the folder is empty again.
    assert files_in(spool.directory) <= {".append.lock", ".reserve"}


def test_scan_returns_messages_oldest_first(spool: Spool) -> None:
    stored = [spool.store(SENDER, RECIPIENTS, f"{n}".encode()) for n in range(5)]

    scanned = spool.scan()

    assert [m.queue_id for m in scanned] == [m.queue_id for m in stored]
    assert [m.queue_id for m in stored] == sorted(m.queue_id for m in stored)
    assert [m.received for m in scanned] == sorted(m.received for m in stored)


def test_queue_ids_are_unique_and_filename_safe(spool: Spool) -> None:
    ids = [spool.store(SENDER, RECIPIENTS, b"x").queue_id for _ in range(50)]

    assert len(set(ids)) == len(ids)
    assert all(is_queue_id(i) for i in ids)
    assert all(set(i) <= set("0123456789abcdef-") for i in ids)


# --- Durability -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fsync:
    inode: int
    is_directory: bool
    listing: frozenset[str]
    """The spool directory's entries when a directory was synced."""


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch, spool: Spool) -> list[Fsync]:
    """Every ``os.fsync`` from now on, in order; the real fsync still runs."""
    calls: list[Fsync] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        info = os.fstat(fd)
        is_directory = stat.S_ISDIR(info.st_mode)
        listing = frozenset(os.listdir(spool.directory)) if is_directory else frozenset()
        calls.append(Fsync(info.st_ino, is_directory, listing))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_concurrent_stores_share_fdatasyncs_and_none_returns_before_its_bytes_are_synced(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.store(SENDER, RECIPIENTS, b"the segment exists")
    durable: list[int] = []
    guard = threading.Lock()
    real_fdatasync = os.fdatasync

    def slow_disk(fd: int) -> None:
        size = os.fstat(fd).st_size
        time.sleep(0.01)  # while the disk works, the next batch gathers
        real_fdatasync(fd)
        with guard:
            durable.append(size)

    monkeypatch.setattr(os, "fdatasync", slow_disk)
    start = threading.Barrier(32)

    def store(n: int) -> tuple[bytes, int]:
        body = f"[{n:03d}]".encode() * 500
        start.wait()
        spool.store(SENDER, RECIPIENTS, body)
        with guard:
            return body, max(durable)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(store, range(32)))

    assert len(durable) <= 8, f"{len(durable)} fdatasyncs for 32 stores: no batching"
    [segment] = segment_files(spool.directory)
    data = segment.read_bytes()
    for body, synced in results:
        # Its record (and so its body) ends inside what an fdatasync had made durable
        # before store() returned: that is the moment the relay may answer 250.
        assert data.index(body) + len(body) <= synced


def test_a_new_segment_is_in_a_synced_directory_before_its_first_acknowledgement(
    spool: Spool, fsyncs: list[Fsync]
) -> None:
    spool.store(SENDER, RECIPIENTS, BODY)

    [segment] = segment_files(spool.directory)
    directory = spool.directory.stat().st_ino
    assert any(c.inode == directory and segment.name in c.listing for c in fsyncs)


def test_segments_are_reclaimed_oldest_first_once_all_their_messages_are_final(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_SEGMENT_LIMIT", 1)  # one batch per segment
    monkeypatch.setattr(spool_module, "_COMPACT_AFTER_SEGMENTS", 100)  # not this test's
    first, second, third = (spool.store(SENDER, RECIPIENTS[:1], f"{n}".encode()) for n in "123")
    assert len(segment_files(spool.directory)) == 3

    spool.remove(second.queue_id, force=True)
    # The first segment is still live, and a later one holds the tombstone: all stay.
    assert len(segment_files(spool.directory)) == 4

    spool.remove(first.queue_id, force=True)
    # The first two are dead now; the third holds a live message and stays, with all
    # later ones (their tombstones must outlive it).
    assert len(segment_files(spool.directory)) == 3
    reopened = Spool(spool.directory)
    assert reopened.scan() == [replace(third, body=b"")]
    assert reopened.load(third.queue_id).body == b"3"

    spool.remove(third.queue_id, force=True)
    spool.close()
    assert segment_files(spool.directory) == []
    assert Spool(spool.directory).scan() == []


# --- Crash safety ---------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_message(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    rng = random.Random(20240601)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    acknowledged: dict[str, str] = {}
    deferred_ids: set[str] = set()
    removing_ids: set[str] = set()
    removed_ids: set[str] = set()
    deadline = time.monotonic() + 8.0

    for round_number in range(8):
        if time.monotonic() > deadline:
            break
        output = tmp_path / f"round-{round_number}.out"
        with output.open("wb") as out:
            child = subprocess.Popen(
                [sys.executable, str(WRITER), str(directory), str(round_number)],
                stdout=out,
                stderr=subprocess.PIPE,
                env=env,
            )
            try:
                # Wait for the first acknowledgement, so the kill lands amid real work.
                started = time.monotonic()
                while output.stat().st_size == 0 and child.poll() is None:
                    assert time.monotonic() - started < 5.0, "the writer never stored anything"
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.3))
                child.send_signal(signal.SIGKILL)
            finally:
                child.kill()
                _, stderr = child.communicate(timeout=5)
        assert child.returncode == -signal.SIGKILL, stderr.decode()

        for line in output.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # Not a whole acknowledgement.
            match line.split():
                case ["stored", queue_id, digest]:
                    acknowledged[queue_id] = digest
                case ["deferred", queue_id]:
                    deferred_ids.add(queue_id)
                case ["removing", queue_id]:
                    removing_ids.add(queue_id)
                case ["removed", queue_id]:
                    removed_ids.add(queue_id)

        reader = Spool(directory)
        scanned = {m.queue_id: m for m in reader.scan()}

        for queue_id, digest in acknowledged.items():
            if queue_id in removed_ids:
                assert queue_id not in scanned
                continue
            if queue_id in removing_ids and queue_id not in scanned:
                continue  # Killed after remove() returned, before it was reported.
            assert queue_id in scanned, f"acknowledged message {queue_id} was lost"
            message = reader.load(queue_id)
            assert hashlib.sha256(message.body).hexdigest() == digest
            assert message.size == len(message.body)
            if queue_id in deferred_ids:
                assert message.recipients[0].status is not RecipientStatus.PENDING
        assert not os.listdir(directory / "corrupt")
        leftovers = files_in(directory) - {p.name for p in segment_files(directory)}
        assert leftovers <= {".append.lock", ".reserve"}

    # Each round waited for an acknowledgement before killing, so none was idle.
    assert len(acknowledged) >= round_number + 1


# --- Damage ---------------------------------------------------------------------------


def store_measured(spool: Spool, body: bytes) -> tuple[SpooledMessage, int, int]:
    """Store one message; the message and where its record starts and ends."""
    segments = segment_files(spool.directory)
    before = segments[-1].stat().st_size if segments else 0
    message = spool.store(SENDER, RECIPIENTS, body)
    return message, before, segment_files(spool.directory)[-1].stat().st_size


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda start, end: start + 10, id="inside-the-magic"),
        pytest.param(lambda start, end: start + 60, id="inside-the-head"),
        pytest.param(lambda start, end: start + 100, id="inside-the-envelope"),
        pytest.param(lambda start, end: (start + end) // 2, id="inside-the-body"),
        pytest.param(lambda start, end: end - 1, id="one-byte-short"),
    ],
)
def test_a_torn_tail_is_ignored_and_the_segment_is_not_appended_to_again(
    spool: Spool, keep: Callable[[int, int], int]
) -> None:
    before = spool.store(SENDER, RECIPIENTS, b"before")
    torn, start, end = store_measured(spool, BODY * 10)
    [segment] = segment_files(spool.directory)
    # What a power cut between the append and its fdatasync can leave.
    os.truncate(segment, keep(start, end))

    restarted = Spool(spool.directory)
    assert restarted.scan() == [replace(before, body=b"")]
    with pytest.raises(MessageNotFoundError):
        restarted.load(torn.queue_id)
    # Never acknowledged, so nothing to keep for a person.
    assert not os.listdir(spool.directory / "corrupt")

    later = restarted.store(SENDER, RECIPIENTS, b"later")
    assert len(segment_files(spool.directory)) == 2
    assert [m.queue_id for m in Spool(spool.directory).scan()] == [
        before.queue_id,
        later.queue_id,
    ]


def test_a_tail_with_unwritten_body_blocks_is_torn_too(spool: Spool) -> None:
    before = spool.store(SENDER, RECIPIENTS, b"before")
    _, _, end = store_measured(spool, BODY * 100)
    [segment] = segment_files(spool.directory)
    data = bytearray(segment.read_bytes())
    # ext4's delayed allocation: the size is on disk, the body's blocks read as zeros.
    data[end - 4096 : end] = bytes(4096)
    segment.write_bytes(bytes(data))

    assert Spool(spool.directory).scan() == [replace(before, body=b"")]
    assert not os.listdir(spool.directory / "corrupt")


def test_a_flipped_bit_in_a_body_before_the_tail_is_copied_to_corrupt_and_skipped(
    spool: Spool,
) -> None:
    before = spool.store(SENDER, RECIPIENTS, b"before")
    _, _, end = store_measured(spool, BODY)
    after = spool.store(SENDER, RECIPIENTS, b"after")
    [segment] = segment_files(spool.directory)
    data = bytearray(segment.read_bytes())
    data[end - 3] ^= 0x01
    segment.write_bytes(bytes(data))

    restarted = Spool(spool.directory)
    assert restarted.scan() == [replace(before, body=b""), replace(after, body=b"")]
    assert restarted.load(after.queue_id).body == b"after"
    # Kept for a person: damage is not a crash, the message was acknowledged.
    [copy] = (spool.directory / "corrupt").iterdir()
    assert BODY[:-3] in copy.read_bytes()


def test_a_damaged_head_is_skipped_by_finding_the_next_record(spool: Spool) -> None:
    before = spool.store(SENDER, RECIPIENTS, b"before")
    _, start, _ = store_measured(spool, BODY)
    after = spool.store(SENDER, RECIPIENTS, b"after")
    [segment] = segment_files(spool.directory)
    data = bytearray(segment.read_bytes())
    data[start + 12] ^= 0xFF  # inside the lengths: the head no longer says where it ends
    segment.write_bytes(bytes(data))

    assert Spool(spool.directory).scan() == [replace(before, body=b""), replace(after, body=b"")]
    assert len(os.listdir(spool.directory / "corrupt")) == 1


def test_a_flipped_bit_in_a_closed_segment_is_caught_when_the_body_is_read(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_SEGMENT_LIMIT", 1)
    damaged, _, end = store_measured(spool, BODY)
    spool.store(SENDER, RECIPIENTS, b"closes the first segment")
    first = segment_files(spool.directory)[0]
    data = bytearray(first.read_bytes())
    data[end - 3] ^= 0x01
    first.write_bytes(bytes(data))

    restarted = Spool(spool.directory)
    # A closed segment was fully synced: its bodies are checked when read, not at start.
    assert damaged.queue_id in {m.queue_id for m in restarted.scan()}
    with pytest.raises(SpoolCorruptError, match="checksum"):
        restarted.load(damaged.queue_id)
    assert (spool.directory / "corrupt" / f"{damaged.queue_id}.body").exists()
    assert damaged.queue_id not in {m.queue_id for m in restarted.scan()}


def test_a_damaged_state_record_falls_back_to_the_states_before_it(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)
    spool.update(stored.queue_id, delivered(RECIPIENTS[0]))
    [segment] = segment_files(spool.directory)
    start = segment.stat().st_size
    spool.update(stored.queue_id, deferred(RECIPIENTS[1]))
    after = spool.store(SENDER, RECIPIENTS, b"after")
    data = bytearray(segment.read_bytes())
    data[start + 100] ^= 0x01  # inside the second state record's JSON
    segment.write_bytes(bytes(data))

    scanned = {m.queue_id: m for m in Spool(spool.directory).scan()}

    # Trying b again is a nuisance; forgetting a recipient would be a lost message.
    assert scanned[stored.queue_id].recipients == (
        delivered(RECIPIENTS[0]),
        RecipientState(RECIPIENTS[1]),
        RecipientState(RECIPIENTS[2]),
    )
    assert after.queue_id in scanned


def test_files_that_are_not_the_spools_are_quarantined_or_left_alone(spool: Spool) -> None:
    (spool.directory / "someones-mail.msg").write_bytes(b"From: x\r\n\r\nhello")
    (spool.directory / "README").write_bytes(b"left alone")

    assert spool.scan() == []
    assert files_in(spool.directory / "corrupt") == {"someones-mail.msg"}
    assert files_in(spool.directory) - {".append.lock", ".reserve"} == {"README"}


# --- The old layout (one .msg and one .state file per message) ------------------------


def old_record(
    directory: Path, n: int, body: bytes, states: list[RecipientState] | None = None
) -> str:
    """A message exactly as the relay before segments wrote it; its queue id."""
    received_us = 1_764_000_000_000_000 + n
    queue_id = f"{received_us:014x}-{n:016x}"
    received = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=received_us)

    def state_json(state: RecipientState) -> dict[str, object]:
        return {
            "address": state.address,
            "status": state.status.value,
            "attempts": state.attempts,
            "next_attempt": None if state.next_attempt is None else state.next_attempt.isoformat(),
            "last_reply_code": state.last_reply_code,
            "last_reply_text": state.last_reply_text,
            "delay_notified": state.delay_notified,
        }

    def canonical(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    envelope = canonical(
        {
            "queue_id": queue_id,
            "sender": SENDER,
            "recipients": [state_json(RecipientState(r)) for r in RECIPIENTS],
            "received": received.isoformat(),
            "size": len(body),
        }
    )
    lengths = f"{len(envelope)} {len(body)}".encode()
    digest = hashlib.sha256(lengths + envelope + body).hexdigest().encode()
    (directory / f"{queue_id}.msg").write_bytes(
        b"MAILFLOW-SPOOL-RECORD 1\n" + digest + b" " + lengths + b"\n" + envelope + body
    )
    if states is not None:
        payload = canonical({"queue_id": queue_id, "recipients": [state_json(s) for s in states]})
        (directory / f"{queue_id}.state").write_bytes(
            b"MAILFLOW-SPOOL-STATE 1\n"
            + f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
            + payload
        )
    return queue_id


def test_an_old_layout_spool_moves_into_segments_at_start_and_loses_nothing(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    states = [delivered(RECIPIENTS[0]), deferred(RECIPIENTS[1]), RecipientState(RECIPIENTS[2])]
    plain = old_record(directory, 1, BODY)
    with_states = old_record(directory, 2, b"second", states)
    broken = old_record(directory, 3, b"third")
    (directory / f"{broken}.msg").write_bytes((directory / f"{broken}.msg").read_bytes()[:-2])
    orphan = old_record(directory, 4, b"fourth", states)
    (directory / f"{orphan}.msg").unlink()  # an interrupted remove() of the old relay
    (directory / f".tmp-{plain}.msg-0123abcd").write_bytes(b"MAILFLOW-SP")

    spool = Spool(directory)
    scanned = spool.scan()

    assert [m.queue_id for m in scanned] == [plain, with_states]
    assert scanned[1].recipients == tuple(states)
    assert spool.load(plain).body == BODY
    assert spool.load(with_states).body == b"second"
    assert files_in(directory / "corrupt") == {f"{broken}.msg"}
    assert files_in(directory) == {p.name for p in segment_files(directory)} | {
        ".append.lock",
        ".reserve",
    }
    # A later start reads the same from the segments alone.
    assert Spool(directory).scan() == scanned


def test_a_read_only_scan_lists_the_old_layout_and_a_retry_moves_that_message(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    queue_id = old_record(
        directory, 1, BODY, [deferred(RECIPIENTS[0])] + [RecipientState(r) for r in RECIPIENTS[1:]]
    )
    admin = Spool(directory)

    [listed] = admin.scan(repair=False)

    assert (listed.queue_id, listed.body, listed.size) == (queue_id, b"", len(BODY))
    assert (directory / f"{queue_id}.msg").exists()
    assert admin.make_due(queue_id) == 1
    assert not (directory / f"{queue_id}.msg").exists()
    moved = Spool(directory).load(queue_id)
    assert moved.body == BODY
    assert moved.recipients[0].next_attempt is None
    assert moved.recipients[0].status is RecipientStatus.DEFERRED


# --- Refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queue_id",
    [
        "../../etc/passwd",
        "",
        "0006123456789a-0123456789abcdef/../../x",
        "0006123456789a-0123456789abcdef.msg",
        "0006123456789A-0123456789ABCDEF",
        "0006123456789a-0123456789abcdef\n",
        "/0006123456789a-0123456789abcdef",
    ],
)
@pytest.mark.parametrize("operation", ["load", "update", "remove"])
def test_an_id_that_is_not_a_queue_id_is_refused_before_any_path_is_built(
    spool: Spool, queue_id: str, operation: str
) -> None:
    with pytest.raises(InvalidQueueIdError, match="is not a queue id") as info:
        getattr(spool, operation)(queue_id)
    assert info.value.queue_id == queue_id
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MailflowRelayError)


def test_load_of_a_traversal_path_raises_a_clear_error(spool: Spool) -> None:
    with pytest.raises(
        InvalidQueueIdError, match=re.escape("'../../etc/passwd' is not a queue id")
    ):
        spool.load("../../etc/passwd")


def test_a_well_formed_but_unknown_queue_id_is_not_found(spool: Spool) -> None:
    with pytest.raises(MessageNotFoundError):
        spool.load("0006123456789a-0123456789abcdef")
    with pytest.raises(MessageNotFoundError):
        spool.update("0006123456789a-0123456789abcdef", delivered(RECIPIENTS[0]))
    with pytest.raises(MessageNotFoundError):
        spool.remove("0006123456789a-0123456789abcdef", force=True)


def test_a_message_over_the_size_limit_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_message_size=100)

    with pytest.raises(
        MessageTooLargeError, match="101 bytes exceeds the spool limit of 100"
    ) as info:
        spool.store(SENDER, RECIPIENTS, b"x" * 101)

    assert (info.value.size, info.value.limit) == (101, 100)
    assert isinstance(info.value, ValueError)
    assert spool.scan() == []
    assert all(path.stat().st_size == 0 for path in segment_files(spool.directory))
    assert spool.store(SENDER, RECIPIENTS, b"x" * 100).size == 100


@pytest.mark.parametrize(
    ("recipients", "reason"),
    [([], "no recipients"), (["a@example.com", "a@example.com"], "more than once")],
)
def test_an_envelope_without_distinct_recipients_is_refused(
    spool: Spool, recipients: list[str], reason: str
) -> None:
    with pytest.raises(InvalidEnvelopeError, match=reason):
        spool.store(SENDER, recipients, BODY)


def test_an_update_for_someone_not_on_the_envelope_is_refused(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS[:1], BODY)

    with pytest.raises(
        SpoolStateError, match=re.escape("'stranger@example.com' is not a recipient")
    ):
        spool.update(stored.queue_id, delivered("stranger@example.com"))
    assert spool.load(stored.queue_id) == stored


def test_a_final_state_never_changes(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS[:1], BODY)
    spool.update(stored.queue_id, delivered(RECIPIENTS[0]))

    with pytest.raises(SpoolStateError, match="already delivered"):
        spool.update(stored.queue_id, deferred(RECIPIENTS[0]))


def test_a_message_with_pending_recipients_is_only_removed_when_forced(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS[:2], BODY)
    spool.update(stored.queue_id, delivered(RECIPIENTS[0]))

    with pytest.raises(SpoolStateError, match=re.escape(f"not final yet: {RECIPIENTS[1]}")):
        spool.remove(stored.queue_id)
    assert spool.scan() != []

    spool.remove(stored.queue_id, force=True)
    assert spool.scan() == []


# --- Threads --------------------------------------------------------------------------


def test_threads_working_on_different_messages_do_not_interfere(spool: Spool) -> None:
    def lifecycle(n: int) -> str:
        message = spool.store(SENDER, RECIPIENTS[:2], f"message {n}".encode())
        spool.update(message.queue_id, deferred(RECIPIENTS[0]))
        spool.update(message.queue_id, delivered(RECIPIENTS[1]))
        if n % 2:
            spool.update(message.queue_id, delivered(RECIPIENTS[0]))
            spool.remove(message.queue_id)
        return message.queue_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lifecycle, range(64)))

    scanned = spool.scan()
    assert [m.queue_id for m in scanned] == [q for n, q in enumerate(ids) if not n % 2]
    assert all(m.recipients == (deferred(RECIPIENTS[0]), delivered(RECIPIENTS[1])) for m in scanned)


def test_scan_while_other_threads_store_deletes_none_of_their_writes(spool: Spool) -> None:
    stop = threading.Event()
    stored: list[str] = []
    errors: list[BaseException] = []

    def store_until_stopped() -> None:
        try:
            for n in range(2_000):
                if stop.is_set():
                    return
                stored.append(spool.store(SENDER, RECIPIENTS, b"x" * (n % 7) * 1000).queue_id)
        except BaseException as e:
            errors.append(e)

    writers = [threading.Thread(target=store_until_stopped, name=f"writer-{n}") for n in range(4)]
    for writer in writers:
        writer.start()
    try:
        for _ in range(20):
            spool.scan()
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=10)

    assert not errors
    assert {m.queue_id for m in spool.scan()} == set(stored)
    assert not os.listdir(spool.directory / "corrupt")


def test_make_due_touches_only_deferred_recipients_and_never_a_final_state(tmp_path: Path) -> None:
    relay_side = Spool(tmp_path)
    admin_side = Spool(tmp_path)  # another process, as `mailflow queue retry` is
    message = relay_side.store(
        "a@sender.test", ["x@d.test", "y@d.test"], b"Subject: s\r\n\r\nx\r\n"
    )
    later = datetime.now(UTC) + timedelta(hours=1)
    relay_side.update(
        message.queue_id,
        RecipientState(
            "x@d.test",
            RecipientStatus.DELIVERED,
            attempts=1,
            last_reply_code=250,
            last_reply_text="ok",
        ),
        RecipientState(
            "y@d.test",
            RecipientStatus.DEFERRED,
            attempts=1,
            next_attempt=later,
            last_reply_code=451,
            last_reply_text="later",
        ),
    )
    assert admin_side.make_due(message.queue_id) == 1
    states = {s.address: s for s in relay_side.load(message.queue_id).recipients}
    assert states["x@d.test"].status is RecipientStatus.DELIVERED
    assert states["y@d.test"].next_attempt is None
    assert states["y@d.test"].attempts == 1


def test_a_read_only_scan_leaves_temp_files_of_a_writer_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store("a@sender.test", ["x@d.test"], b"x\r\n")
    in_progress = tmp_path / ".tmp-somebody-is-writing"
    in_progress.write_bytes(b"half")
    assert len(Spool(tmp_path).scan(repair=False)) == 1
    assert in_progress.exists()


def test_contains_never_waits_for_another_process_holding_the_append_lock(
    tmp_path: Path,
) -> None:
    relay_side = Spool(tmp_path)
    stored = relay_side.store(SENDER, RECIPIENTS, BODY)
    admin_side = Spool(tmp_path)  # another process, as `mailflow queue delete` is
    admin_side.remove(stored.queue_id, force=True)
    fd = os.open(tmp_path / ".append.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # `mailflow queue` in the middle of its write
        started = time.monotonic()
        # The event loop asks: it gets what it knew, at once, not after the other's write.
        assert relay_side.contains(stored.queue_id)
        assert time.monotonic() - started < 1.0
    finally:
        os.close(fd)
    assert not relay_side.contains(stored.queue_id)
    with pytest.raises(MessageNotFoundError):
        relay_side.load(stored.queue_id)


def test_a_long_deferred_message_is_copied_forward_so_that_old_segments_go(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_SEGMENT_LIMIT", 1)  # one batch per segment
    waiting = spool.store(SENDER, RECIPIENTS, BODY)
    spool.update(waiting.queue_id, deferred(RECIPIENTS[0]))
    for n in range(6):
        passing = spool.store(SENDER, RECIPIENTS, f"delivered at once {n}".encode())
        spool.remove(passing.queue_id, force=True)
    spool.close()  # the committer finishes, compaction included

    # Without the copy every segment would stay behind the waiting message's.
    assert len(segment_files(spool.directory)) <= 4
    reopened = Spool(spool.directory)
    [message] = reopened.scan()
    assert message.queue_id == waiting.queue_id
    assert message.recipients[0] == deferred(RECIPIENTS[0])
    assert reopened.load(waiting.queue_id).body == BODY
    assert not os.listdir(spool.directory / "corrupt")


def test_a_write_whose_waiter_went_away_is_dropped_and_the_others_are_answered(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.store(SENDER, RECIPIENTS, b"the committer runs")
    real_fdatasync = os.fdatasync
    syncing = threading.Event()
    release = threading.Event()

    def slow_disk(fd: int) -> None:
        syncing.set()
        release.wait(timeout=10)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_disk)
    first = spool.submit_store(SENDER, RECIPIENTS, lambda _id: b"first")
    assert syncing.wait(timeout=10)  # the committer is busy with the first batch
    abandoned = spool.submit_store(SENDER, RECIPIENTS, lambda _id: b"abandoned")
    kept = spool.submit_store(SENDER, RECIPIENTS, lambda _id: b"kept")
    assert abandoned.cancel()  # what asyncio.wrap_future does when its task is cancelled
    release.set()

    assert first.result(timeout=10).body == b"first"
    assert kept.result(timeout=10).body == b"kept"
    stored = {spool.load(m.queue_id).body for m in spool.scan()}
    assert stored == {b"the committer runs", b"first", b"kept"}
