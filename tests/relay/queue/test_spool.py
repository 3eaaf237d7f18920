"""The durable spool (DESIGN.md, "Relay guarantees"): nothing acknowledged is ever lost."""

from __future__ import annotations

import hashlib
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailflow_relay.errors import MailflowRelayError
from mailflow_relay.queue.spool import (
    InvalidEnvelopeError,
    InvalidQueueIdError,
    MessageNotFoundError,
    MessageTooLargeError,
    RecipientState,
    RecipientStatus,
    Spool,
    SpoolCorruptError,
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


# --- Round trips ----------------------------------------------------------------------


def test_a_stored_message_comes_back_from_scan_byte_for_byte(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)

    [scanned] = spool.scan()

    assert scanned == stored
    assert scanned.body == BODY
    assert scanned.sender == SENDER
    assert scanned.size == len(BODY)
    assert scanned.received.tzinfo is not None
    assert abs(scanned.received - datetime.now(UTC)) < timedelta(minutes=1)
    assert [r.address for r in scanned.recipients] == list(RECIPIENTS)
    assert all(r == RecipientState(r.address) for r in scanned.recipients)
    assert not scanned.is_final


def test_a_fresh_spool_object_reads_what_another_one_stored(tmp_path: Path) -> None:
    stored = Spool(tmp_path / "spool").store("", ["postmaster@example.com"], b"")

    assert Spool(tmp_path / "spool").scan() == [stored]


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
    assert scanned.body == BODY
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


def test_an_update_does_not_rewrite_the_record(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)
    record = spool.directory / f"{stored.queue_id}.msg"
    before = record.stat()

    spool.update(stored.queue_id, deferred(RECIPIENTS[0]))

    after = record.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )


def test_a_removed_message_is_gone_from_scan_load_and_disk(spool: Spool) -> None:
    kept = spool.store(SENDER, RECIPIENTS, b"kept")
    gone = spool.store(SENDER, RECIPIENTS[:1], b"gone")
    spool.update(gone.queue_id, delivered(RECIPIENTS[0]))

    spool.remove(gone.queue_id)

    assert [m.queue_id for m in spool.scan()] == [kept.queue_id]
    with pytest.raises(MessageNotFoundError, match=gone.queue_id):
        spool.load(gone.queue_id)
    assert not any(name.startswith(gone.queue_id) for name in files_in(spool.directory))


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


def index_of(calls: list[Fsync], predicate: Callable[[Fsync], bool]) -> int:
    return next(i for i, call in enumerate(calls) if predicate(call))


def test_store_fsyncs_the_record_then_the_directory_after_the_rename(
    spool: Spool, fsyncs: list[Fsync]
) -> None:
    message = spool.store(SENDER, RECIPIENTS, BODY)

    name = f"{message.queue_id}.msg"
    record = (spool.directory / name).stat().st_ino
    directory = spool.directory.stat().st_ino
    file_synced = index_of(fsyncs, lambda c: c.inode == record and not c.is_directory)
    directory_synced = index_of(
        fsyncs, lambda c: c.inode == directory and c.is_directory and name in c.listing
    )
    assert file_synced < directory_synced
    # The file was synced under its temp name, before it could be seen as a record.
    assert not any(name in c.listing for c in fsyncs[:file_synced])


def test_update_fsyncs_the_state_file_then_the_directory_before_returning(
    spool: Spool, fsyncs: list[Fsync]
) -> None:
    message = spool.store(SENDER, RECIPIENTS, BODY)
    fsyncs.clear()

    spool.update(message.queue_id, deferred(RECIPIENTS[0]))

    name = f"{message.queue_id}.state"
    state = (spool.directory / name).stat().st_ino
    directory = spool.directory.stat().st_ino
    file_synced = index_of(fsyncs, lambda c: c.inode == state and not c.is_directory)
    directory_synced = index_of(
        fsyncs, lambda c: c.inode == directory and c.is_directory and name in c.listing
    )
    assert file_synced < directory_synced


def test_remove_fsyncs_the_directory_after_the_record_and_again_after_the_state(
    spool: Spool, fsyncs: list[Fsync]
) -> None:
    message = spool.store(SENDER, RECIPIENTS[:1], BODY)
    spool.update(message.queue_id, delivered(RECIPIENTS[0]))
    record, state = f"{message.queue_id}.msg", f"{message.queue_id}.state"
    fsyncs.clear()

    spool.remove(message.queue_id)

    directory = spool.directory.stat().st_ino
    listings = [c.listing for c in fsyncs if c.is_directory and c.inode == directory]
    # First durable: the record gone while the state file is still there (never the
    # reverse, which could revive the message as PENDING); then both gone.
    assert state in listings[0]
    assert record not in listings[0]
    assert not listings[-1] & {record, state}


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

        scanned = {m.queue_id: m for m in Spool(directory).scan()}

        for queue_id, digest in acknowledged.items():
            if queue_id in removed_ids:
                assert queue_id not in scanned
                continue
            if queue_id in removing_ids and queue_id not in scanned:
                continue  # Killed after remove() returned, before it was reported.
            assert queue_id in scanned, f"acknowledged message {queue_id} was lost"
            message = scanned[queue_id]
            assert hashlib.sha256(message.body).hexdigest() == digest
            assert message.size == len(message.body)
            if queue_id in deferred_ids:
                assert message.recipients[0].status is not RecipientStatus.PENDING
        assert not os.listdir(directory / "corrupt")
        leftovers = files_in(directory) - {f"{q}.msg" for q in scanned}
        leftovers -= {f"{q}.state" for q in scanned}
        assert not leftovers

    # Each round waited for an acknowledgement before killing, so none was idle.
    assert len(acknowledged) >= round_number + 1


# --- Damage ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda size: 0, id="empty"),
        pytest.param(lambda size: 10, id="inside-the-magic-line"),
        pytest.param(lambda size: 40, id="inside-the-header"),
        pytest.param(lambda size: size // 2, id="inside-the-payload"),
        pytest.param(lambda size: size - 1, id="one-byte-short"),
    ],
)
def test_a_truncated_record_is_moved_to_corrupt_and_the_others_still_load(
    spool: Spool, keep: Callable[[int], int]
) -> None:
    before = spool.store(SENDER, RECIPIENTS, b"before")
    damaged = spool.store(SENDER, RECIPIENTS, BODY * 10)
    after = spool.store(SENDER, RECIPIENTS, b"after")
    spool.update(damaged.queue_id, deferred(RECIPIENTS[0]))
    record = spool.directory / f"{damaged.queue_id}.msg"
    os.truncate(record, keep(record.stat().st_size))

    with pytest.raises(SpoolCorruptError):
        spool.load(damaged.queue_id)
    scanned = spool.scan()

    assert scanned == [before, after]
    # Moved with its state file, never deleted: a person may still recover the mail.
    assert files_in(spool.directory / "corrupt") == {
        f"{damaged.queue_id}.msg",
        f"{damaged.queue_id}.state",
    }
    assert not any(name.startswith(damaged.queue_id) for name in files_in(spool.directory))


def test_a_flipped_bit_in_the_body_is_caught_by_the_checksum(spool: Spool) -> None:
    damaged = spool.store(SENDER, RECIPIENTS, BODY)
    record = spool.directory / f"{damaged.queue_id}.msg"
    data = bytearray(record.read_bytes())
    data[-3] ^= 0x01
    record.write_bytes(bytes(data))

    with pytest.raises(SpoolCorruptError, match="checksum"):
        spool.load(damaged.queue_id)
    assert spool.scan() == []
    assert files_in(spool.directory / "corrupt") == {f"{damaged.queue_id}.msg"}


def test_a_corrupt_state_file_is_quarantined_and_its_recipients_retried(spool: Spool) -> None:
    stored = spool.store(SENDER, RECIPIENTS, BODY)
    spool.update(stored.queue_id, delivered(RECIPIENTS[0]))
    state = spool.directory / f"{stored.queue_id}.state"
    os.truncate(state, state.stat().st_size - 5)

    [scanned] = spool.scan()

    # Delivering twice is a nuisance; forgetting a recipient would be a lost message.
    assert scanned == stored
    assert files_in(spool.directory / "corrupt") == {state.name}


def test_scan_deletes_temp_files_and_orphaned_state_files(spool: Spool) -> None:
    kept = spool.store(SENDER, RECIPIENTS, BODY)
    removed = spool.store(SENDER, RECIPIENTS[:1], BODY)
    spool.update(removed.queue_id, delivered(RECIPIENTS[0]))
    state = (spool.directory / f"{removed.queue_id}.state").read_bytes()
    spool.remove(removed.queue_id)
    # What a crash leaves: half a write, and a remove() cut after the record went.
    (spool.directory / f".tmp-{kept.queue_id}.msg-0123abcd").write_bytes(b"MAILFLOW-SP")
    (spool.directory / f"{removed.queue_id}.state").write_bytes(state)

    assert spool.scan() == [kept]
    assert files_in(spool.directory) == {f"{kept.queue_id}.msg"}
    assert not os.listdir(spool.directory / "corrupt")


def test_scan_quarantines_spool_files_not_named_after_a_queue_id(spool: Spool) -> None:
    (spool.directory / "someones-mail.msg").write_bytes(b"From: x\r\n\r\nhello")
    (spool.directory / "README").write_bytes(b"left alone")

    assert spool.scan() == []
    assert files_in(spool.directory / "corrupt") == {"someones-mail.msg"}
    assert files_in(spool.directory) == {"README"}


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
    assert files_in(spool.directory) == set()
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
