"""The durable message spool: what the relay has promised to deliver.

The problem
===========

The relay answers ``250`` after DATA, and from that moment the message is its
responsibility (RFC 5321, section 6.1: "the receiver-SMTP MUST NOT lose the message for
frivolous reasons, such as because the host later crashes"). DESIGN.md sharpens that
into a guarantee: a crash or SIGKILL at any instant loses no acknowledged message. So
``250`` may only be sent once the body *and* its envelope survive a power cut, and every
later change to the message (a recipient delivered, deferred or failed) must also be
either fully on disk or not at all.

This module owns that promise. It is synchronous and does blocking I/O on purpose: the
listener and the delivery workers call it through :func:`asyncio.to_thread`, and it is
safe to call from several threads at once.

The layout
==========

Everything lives in one directory (one file system, so that :func:`os.replace` is an
atomic rename)::

    spool/
        <queue id>.msg      the record: envelope and body, written once, never changed
        <queue id>.state    the recipients' current states; absent until the first update
        .tmp-…              a write in progress (or interrupted by a crash)
        corrupt/            records and state files that failed their checksum

A queue id is 14 hex digits of microseconds since the epoch, a dash and 16 random hex
digits from :mod:`secrets` (``0006123456789a-0123456789abcdef``): unique, safe in a file
name and a URL, and sorted by time when sorted as text. Every path is built from an id
only after the id matched that exact pattern, so an id from a CLI or an HTTP request
cannot name a file outside the spool.

A record is a magic line, a header line and a payload::

    MAILFLOW-SPOOL-RECORD 1\\n
    <sha256 hex> <envelope length> <body length>\\n
    <envelope: canonical JSON><body: the message bytes, untouched>

The digest covers the two lengths and the payload, and the file must be exactly as long
as the header says, so a truncated, extended or bit-flipped record is told apart from a
complete one without trusting any of its content. A state file has the same shape
(``MAILFLOW-SPOOL-STATE 1``, one length, a JSON payload listing every recipient's state).

Why a separate state file
=========================

A message may wait days for one slow recipient, with an attempt every few minutes.
Rewriting a 30 MB body to record "451, try again at 10:15" would cost far more than the
attempt itself, so the body is written once and the small state file is replaced instead.
A missing state file means "the states written in the record", which are all PENDING.

The writes, in order, and why every crash point is safe
=======================================================

Each durable write is the classic sequence, and a crash between any two steps of it is
harmless:

1. Write the new content to a fresh temp file (``O_EXCL``, name starting ``.tmp-``). A
   crash here leaves a partial temp file, which is not a record: no acknowledgement was
   given, and :meth:`Spool.scan` deletes it.
2. ``fsync`` the temp file. Until this returns, the data may be only in the page cache;
   renaming first would let a power cut leave a *named* file with missing or zero-filled
   blocks (ext4's delayed allocation does exactly that). A crash here is step 1 again.
3. ``os.replace`` the temp file onto its final name. POSIX renames are atomic: the name
   shows the old content (or nothing) or the new content, never a mix. After a crash
   the rename may or may not have survived, but the caller was not answered yet, so
   either outcome is allowed.
4. ``fsync`` the directory. The rename is a change to the directory, and it is only
   durable once the directory is flushed. Only now does the call return, and only now
   does the listener send ``250``.

For :meth:`Spool.store` the record is the commit point: before step 3 there is no
message, after step 4 there is a complete one. The record is never opened for writing
again, so it cannot be damaged by a later crash either.

For :meth:`Spool.update` the state file is the commit point. It always holds the states
of *all* recipients, so it is never a merge of two writes. A crash before step 3 keeps
the previous state (or none, that is the record's PENDING states); the caller was not
answered, so at worst a delivery is tried again. That is the trade-off every MTA makes:
at-least-once, never at-most-once, because a duplicate is a nuisance and a loss is a bug.
The state file is only written after the record was committed by :meth:`Spool.store`,
so a state file never precedes its record.

:meth:`Spool.remove` unlinks the record first, fsyncs the directory, and only then
unlinks the state file and fsyncs again. The order matters: had the state file gone
first, a crash in between would revive the message with all recipients PENDING and
deliver it again to everyone. The other way round, the crash leaves a state file without
a record; :meth:`Spool.scan` deletes such orphans, which is safe precisely because a
state file is never created before its record is durable.

Scanning at start
=================

:meth:`Spool.scan` runs when the relay starts and repairs what a crash can leave:

- temp files are deleted (they were never acknowledged);
- state files without a record are deleted (an interrupted :meth:`Spool.remove`);
- a record that fails its checksum is *moved* to ``corrupt/``, together with its state
  file, never deleted: it cannot come from a crash (records appear only by rename), so
  it means a disk or an operator damaged it, and a person may still recover the mail;
- a state file that fails its checksum is moved to ``corrupt/`` and its message falls
  back to the record's PENDING states: again at-least-once rather than a lost message;
- every complete message is returned, oldest first.

What this does not cover: a disk that acknowledges ``fsync`` but loses the data (a
write cache without a battery), and a spool on a network file system without atomic
renames. Both are deployment errors; DESIGN.md puts the spool on each relay pod's PVC.
Sending ``250`` after a successful :meth:`Spool.store` is the listener's job; so is
answering ``452``/``552`` when :meth:`Spool.store` refuses.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from mailflow_relay.envelope import EnvelopeParameters
from mailflow_relay.errors import MailflowRelayError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "InvalidEnvelopeError",
    "InvalidQueueIdError",
    "MessageNotFoundError",
    "MessageTooLargeError",
    "RecipientState",
    "RecipientStatus",
    "Spool",
    "SpoolCorruptError",
    "SpoolError",
    "SpoolStateError",
    "SpoolWriteError",
    "SpooledMessage",
    "is_queue_id",
    "new_queue_id",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE: Final = 50 * 1024 * 1024

# Exact integer arithmetic: a float timestamp could drift a microsecond from the queue id.
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_RECORD_MAGIC: Final = b"MAILFLOW-SPOOL-RECORD 1\n"
_STATE_MAGIC: Final = b"MAILFLOW-SPOOL-STATE 1\n"
_RECORD_SUFFIX: Final = ".msg"
_STATE_SUFFIX: Final = ".state"
_TEMP_PREFIX: Final = ".tmp-"
_CORRUPT_DIR: Final = "corrupt"
# A header line is a digest and at most two decimal lengths; anything longer is damage.
_MAX_HEADER_LINE: Final = 128
_QUEUE_ID_RE: Final = re.compile(r"\A[0-9a-f]{14}-[0-9a-f]{16}\Z")
# Striped locks: bounded memory however many messages pass through, and two threads
# working on different messages rarely share a stripe.
_LOCK_STRIPES: Final = 64


# --- Errors ---------------------------------------------------------------------------


class SpoolError(MailflowRelayError):
    """Root of every error raised by the spool."""


class InvalidQueueIdError(SpoolError, ValueError):
    """A queue id that does not have the spool's format (and so names no file in it)."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(
            f"{queue_id!r} is not a queue id (expected 14 hex digits, '-', 16 hex digits)"
        )
        self.queue_id = queue_id


class MessageTooLargeError(SpoolError, ValueError):
    """A message over the spool's size limit; the listener answers 552 (RFC 5321 4.5.3.1.10)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the spool limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidEnvelopeError(SpoolError, ValueError):
    """An envelope that cannot be spooled (no recipients, a duplicate recipient, …)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot spool the envelope: {reason}")
        self.reason = reason


class MessageNotFoundError(SpoolError, LookupError):
    """No complete message with this queue id is in the spool."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"no message {queue_id} in the spool")
        self.queue_id = queue_id


class SpoolStateError(SpoolError, ValueError):
    """A state change the message does not allow (unknown recipient, final state, …)."""

    def __init__(self, queue_id: str, reason: str) -> None:
        super().__init__(f"message {queue_id}: {reason}")
        self.queue_id = queue_id
        self.reason = reason


class SpoolCorruptError(SpoolError, ValueError):
    """A record or state file that fails its checksum or cannot be parsed."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SpoolWriteError(SpoolError, OSError):
    """A write, rename, unlink or fsync that failed; nothing was promised to anyone."""

    def __init__(self, path: Path, action: str, cause: OSError) -> None:
        super().__init__(cause.errno, f"{action} {path}: {cause.strerror or cause}")
        self.path = path
        self.action = action


# --- Values ---------------------------------------------------------------------------


class RecipientStatus(enum.Enum):
    """Where one recipient of a spooled message stands."""

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """Whether nothing more will be attempted for this recipient."""
        return self in (RecipientStatus.DELIVERED, RecipientStatus.FAILED)


@dataclass(frozen=True)
class RecipientState:
    """One recipient of a spooled message and the outcome of its delivery so far."""

    address: str
    """The envelope recipient (RCPT TO), exactly as accepted."""
    status: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    """Delivery attempts made so far, successful or not."""
    next_attempt: datetime | None = None
    """When a DEFERRED recipient is due again (timezone-aware)."""
    last_reply_code: int | None = None
    """The next hop's last SMTP reply code for this recipient, if it answered."""
    last_reply_text: str | None = None
    """The text of that reply, for the bounce and for ``mailflow queue``."""
    delay_notified: bool = False
    """A delay warning (RFC 3464 ``Action: delayed``) went to the sender for this recipient."""
    remote_mta: str | None = None
    """The next hop that gave :attr:`last_reply_code` (RFC 3464 ``Remote-MTA``)."""
    remote_dsn: bool = False
    """The next hop that took it offered DSN and got the sender's NOTIFY: it reports
    success itself, so no ``relayed`` notification is due from here (RFC 3461 §6.2.1)."""

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ValueError(f"attempts must not be negative, got {self.attempts}")
        if self.last_reply_code is not None and not 200 <= self.last_reply_code <= 599:
            raise ValueError(f"not an SMTP reply code: {self.last_reply_code}")
        if self.next_attempt is not None and self.next_attempt.tzinfo is None:
            raise ValueError("next_attempt must be timezone-aware")


@dataclass(frozen=True)
class SpooledMessage:
    """A complete message in the spool: its envelope, its recipients' states and its body."""

    queue_id: str
    sender: str
    """The envelope sender (MAIL FROM); empty for the null reverse-path ``<>``."""
    recipients: tuple[RecipientState, ...]
    received: datetime
    """When the spool accepted the message (UTC)."""
    size: int
    """The body's length in bytes."""
    body: bytes = field(repr=False)
    client: str = ""
    """The submitting client's address ("" when unknown: a bounce, an older record)."""
    user: str | None = None
    """The SMTP AUTH user that submitted it, if any (client-scoped connectors)."""
    arrived: datetime | None = None
    """When the message first arrived in the fleet, if before :attr:`received` (a hand-off
    from a peer relay keeps the message's age); None: it arrived here."""
    parameters: EnvelopeParameters = field(default_factory=EnvelopeParameters)
    """The sender's ESMTP parameters (SMTPUTF8, BODY, DSN, REQUIRETLS)."""

    @property
    def arrival(self) -> datetime:
        """When the message's queue lifetime started (RFC 3464 ``Arrival-Date``)."""
        return self.arrived if self.arrived is not None else self.received

    @property
    def is_final(self) -> bool:
        """Whether every recipient is delivered or failed, so the message can be removed."""
        return all(r.status.is_final for r in self.recipients)

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        """The recipients that still need a delivery attempt."""
        return tuple(r for r in self.recipients if not r.status.is_final)

    def recipient(self, address: str) -> RecipientState:
        """The state of one recipient; :class:`KeyError` if it is not on the envelope."""
        for state in self.recipients:
            if state.address == address:
                return state
        raise KeyError(address)


# --- Queue ids ------------------------------------------------------------------------


def is_queue_id(text: str) -> bool:
    """Whether ``text`` has the exact format of a queue id (and so is safe in a path)."""
    return _QUEUE_ID_RE.match(text) is not None


def new_queue_id(received_us: int) -> str:
    """A fresh queue id for a message received at ``received_us`` µs since the epoch."""
    return f"{received_us:014x}-{secrets.token_hex(8)}"


def _checked_queue_id(queue_id: str) -> str:
    if not isinstance(queue_id, str) or not is_queue_id(queue_id):
        raise InvalidQueueIdError(str(queue_id))
    return queue_id


# --- The spool ------------------------------------------------------------------------


class Spool:
    """The durable spool in one directory; see the module docstring for the guarantees.

    Methods block on disk I/O; call them through :func:`asyncio.to_thread`. Calls on
    different messages run in parallel; calls on the same message are serialised.
    """

    def __init__(
        self, directory: Path | str, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        if max_message_size <= 0:
            raise ValueError(f"max_message_size must be positive, got {max_message_size}")
        self._directory = Path(directory)
        self._corrupt = self._directory / _CORRUPT_DIR
        self._max_message_size = max_message_size
        self._locks = tuple(threading.Lock() for _ in range(_LOCK_STRIPES))
        self._mutex = threading.Lock()
        self._last_received_us = 0
        # Temp files this process is writing right now: scan() must not take them
        # for leftovers of a crash when it runs while other threads store messages.
        self._in_flight: set[str] = set()
        self._create_directory(self._directory)
        self._create_directory(self._corrupt)

    @property
    def directory(self) -> Path:
        """The spool directory."""
        return self._directory

    @property
    def max_message_size(self) -> int:
        """The largest body :meth:`store` accepts, in bytes."""
        return self._max_message_size

    # --- The public operations --------------------------------------------------------

    def store(self, sender: str, recipients: Sequence[str], body: bytes) -> SpooledMessage:
        """Spool a new message durably; when this returns, the relay may answer ``250``."""
        return self.store_with_header(sender, recipients, lambda _queue_id: body)

    def store_with_header(
        self,
        sender: str,
        recipients: Sequence[str],
        make_body: Callable[[str], bytes],
        *,
        client: str = "",
        user: str | None = None,
        arrived: datetime | None = None,
        parameters: EnvelopeParameters | None = None,
    ) -> SpooledMessage:
        """Like :meth:`store`, but the body is made knowing its queue id.

        The relay's ``Received:`` header names the queue id, so that one id follows a
        message from the client's ``250`` to the final delivery log line.
        """
        received_us = self._next_received_us()
        queue_id = new_queue_id(received_us)
        body = make_body(queue_id)
        if len(body) > self._max_message_size:
            raise MessageTooLargeError(len(body), self._max_message_size)
        if not recipients:
            raise InvalidEnvelopeError("no recipients")
        if len(set(recipients)) != len(recipients):
            raise InvalidEnvelopeError("a recipient appears more than once")
        message = SpooledMessage(
            queue_id=queue_id,
            sender=sender,
            recipients=tuple(RecipientState(address) for address in recipients),
            received=_EPOCH + timedelta(microseconds=received_us),
            size=len(body),
            body=body,
            client=client,
            user=user,
            arrived=arrived,
            parameters=parameters or EnvelopeParameters(),
        )
        envelope = _dump_json(_envelope_to_json(message))
        lengths = f"{len(envelope)} {len(body)}".encode()
        digest = _digest(lengths, envelope, body)
        header = _RECORD_MAGIC + digest.encode() + b" " + lengths + b"\n"
        # No per-message lock: the id is brand new, nobody else can know it yet, and a
        # stripe lock held by a slow update of another message must not stall DATA.
        self._write_durably(self._record_path(message.queue_id), header, envelope, body)
        return message

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's file system (statvfs)."""
        stats = os.statvfs(self._directory)
        return stats.f_bavail * stats.f_frsize

    def contains(self, queue_id: str) -> bool:
        """Whether the message's record is still in the spool (cheap: no read)."""
        return self._record_path(_checked_queue_id(queue_id)).exists()

    def load(self, queue_id: str) -> SpooledMessage:
        """The message with this id, its checksum verified, with its current states."""
        queue_id = _checked_queue_id(queue_id)
        with self._lock_for(queue_id):
            return self._load(queue_id)

    def update(self, queue_id: str, *states: RecipientState) -> tuple[RecipientState, ...]:
        """Record new states for some recipients durably; returns every recipient's state.

        All ``states`` are written in one atomic step, so recording the outcome of one
        delivery transaction (several recipients, one next hop) is all-or-nothing.
        """
        queue_id = _checked_queue_id(queue_id)
        with self._lock_for(queue_id), self._process_lock(queue_id):
            return self._update_locked(queue_id, states)

    def make_due(self, queue_id: str) -> int:
        """Deferred recipients due now (``mailflow queue retry``); how many there were.

        Read and written under the message's lock, so a delivery outcome the relay records
        at the same moment is neither lost nor overwritten.
        """
        queue_id = _checked_queue_id(queue_id)
        with self._lock_for(queue_id), self._process_lock(queue_id):
            due = [
                replace(s, next_attempt=None)
                for s in self._read_current_states(queue_id)
                if s.status is RecipientStatus.DEFERRED
            ]
            if due:
                self._update_locked(queue_id, due)
            return len(due)

    def _update_locked(
        self, queue_id: str, states: Sequence[RecipientState]
    ) -> tuple[RecipientState, ...]:
        # The envelope and current states are enough; re-reading a large body on
        # every delivery attempt would undo the point of the separate state file.
        current = self._read_current_states(queue_id)
        by_address = {state.address: state for state in current}
        for state in states:
            previous = by_address.get(state.address)
            if previous is None:
                raise SpoolStateError(queue_id, f"{state.address!r} is not a recipient")
            if previous.status.is_final and state != previous:
                raise SpoolStateError(
                    queue_id,
                    f"{state.address!r} is already {previous.status.value}; "
                    "a final state never changes",
                )
            by_address[state.address] = state
        updated = tuple(by_address[state.address] for state in current)
        payload = _dump_json(
            {"queue_id": queue_id, "recipients": [_state_to_json(s) for s in updated]}
        )
        header = _STATE_MAGIC + f"{_digest(payload)} {len(payload)}\n".encode()
        self._write_durably(self._state_path(queue_id), header, payload)
        return updated

    def remove(self, queue_id: str, *, force: bool = False) -> None:
        """Delete a message durably once every recipient is final (or at once, if forced).

        Without ``force`` the states on disk must all be final. ``force`` skips that check;
        its callers know something the disk does not yet say: an administrator deleting by
        hand, a hand-off after the peer's ``250``, and the engine when every recipient has
        just become final in memory (it saves writing a state file only to delete it; a
        crash before the removal delivers again, as one before any write would).
        """
        queue_id = _checked_queue_id(queue_id)
        with self._lock_for(queue_id), self._process_lock(queue_id):
            record = self._record_path(queue_id)
            if not record.exists():
                raise MessageNotFoundError(queue_id)
            if not force:
                pending = [
                    s.address for s in self._read_current_states(queue_id) if not s.status.is_final
                ]
                if pending:
                    raise SpoolStateError(
                        queue_id, f"recipients not final yet: {', '.join(pending)}"
                    )
            # The record goes first and durably, then the state file: the reverse order
            # could revive the message with every recipient PENDING after a crash.
            self._unlink(record)
            self._fsync_directory(self._directory)
            if self._state_path(queue_id).exists():
                self._unlink(self._state_path(queue_id))
                self._fsync_directory(self._directory)

    def scan(self, *, repair: bool = True) -> list[SpooledMessage]:
        """Repair what a crash can leave and return every complete message, oldest first.

        Meant for start-up, but safe while other threads use the spool. Another process
        (``mailflow queue``) must pass ``repair=False``: it cannot know which temp files
        the relay is writing right now, so it only reads, and skips what it cannot read.
        """
        names = sorted(os.listdir(self._directory))
        if not repair:
            return self._read_only_scan(names)
        # Listed first, then the in-flight set: a temp file in the listing is either
        # still in the set or finished (renamed away, so deleting it is a no-op).
        with self._mutex:
            in_flight = set(self._in_flight)
        changed = False
        for name in names:
            if name.startswith(_TEMP_PREFIX) and name not in in_flight:
                self._unlink(self._directory / name, missing_ok=True)
                changed = True
        if changed:
            self._fsync_directory(self._directory)

        messages: list[SpooledMessage] = []
        for name in names:
            # .relay.lock: the running relay's lock (queue/lock.py), not a message.
            if name.startswith(_TEMP_PREFIX) or name in (_CORRUPT_DIR, ".relay.lock"):
                continue
            stem, dot, suffix = name.rpartition(".")
            if not dot or f".{suffix}" not in (_RECORD_SUFFIX, _STATE_SUFFIX):
                logger.warning("spool: ignoring a foreign file %s", self._directory / name)
                continue
            if not is_queue_id(stem):
                # Not something this module wrote, but it could still be someone's mail.
                self._quarantine(name, "not named after a queue id")
                continue
            with self._lock_for(stem):
                message = self._scan_one(stem, f".{suffix}")
            if message is not None:
                messages.append(message)
        messages.sort(key=lambda m: (m.received, m.queue_id))
        return messages

    def _read_only_scan(self, names: list[str]) -> list[SpooledMessage]:
        messages = []
        for name in names:
            stem, _, suffix = name.rpartition(".")
            if f".{suffix}" != _RECORD_SUFFIX or not is_queue_id(stem):
                continue
            try:
                with self._lock_for(stem):
                    messages.append(self._load(stem))
            except (MessageNotFoundError, SpoolCorruptError, OSError) as e:
                logger.info("spool: skipping %s while reading: %s", name, e)
        messages.sort(key=lambda m: (m.received, m.queue_id))
        return messages

    # --- Reading ----------------------------------------------------------------------

    def _scan_one(self, queue_id: str, suffix: str) -> SpooledMessage | None:
        record = self._record_path(queue_id)
        state = self._state_path(queue_id)
        if suffix == _STATE_SUFFIX:
            if not record.exists() and state.exists():
                # An interrupted remove(): the record, the commit point, is already gone.
                self._unlink(state, missing_ok=True)
                self._fsync_directory(self._directory)
            return None
        if not record.exists():  # Removed by another thread since the listing.
            return None
        try:
            return self._load(queue_id)
        except SpoolCorruptError as e:
            if e.path == state:
                logger.error("spool: %s; its recipients fall back to PENDING", e)
                self._quarantine(state.name, e.reason)
                return self._load(queue_id)
            logger.error("spool: %s", e)
            self._quarantine(record.name, e.reason)
            if state.exists():
                self._quarantine(state.name, "its record is corrupt")
            return None

    def _load(self, queue_id: str) -> SpooledMessage:
        path = self._record_path(queue_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MessageNotFoundError(queue_id) from None
        message = _parse_record(path, queue_id, data)
        states = self._read_state_file(queue_id, message.recipients)
        return message if states is None else replace(message, recipients=states)

    def _read_current_states(self, queue_id: str) -> tuple[RecipientState, ...]:
        path = self._record_path(queue_id)
        try:
            with path.open("rb") as f:
                head = f.readline(len(_RECORD_MAGIC) + 1) + f.readline(_MAX_HEADER_LINE)
                _, envelope_length, _ = _parse_record_header(path, head)
                envelope = _parse_envelope(path, queue_id, f.read(envelope_length))
        except FileNotFoundError:
            raise MessageNotFoundError(queue_id) from None
        states = self._read_state_file(queue_id, envelope.recipients)
        return envelope.recipients if states is None else states

    def _read_state_file(
        self, queue_id: str, initial: tuple[RecipientState, ...]
    ) -> tuple[RecipientState, ...] | None:
        path = self._state_path(queue_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return _parse_state(path, queue_id, data, initial)

    # --- Writing ----------------------------------------------------------------------

    def _write_durably(self, path: Path, *chunks: bytes) -> None:
        temp = self._directory / f"{_TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
        with self._mutex:
            self._in_flight.add(temp.name)
        try:
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with open(fd, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise SpoolWriteError(temp, "writing", e) from e
            try:
                os.replace(temp, path)
            except OSError as e:
                raise SpoolWriteError(path, "renaming into", e) from e
            self._fsync_directory(self._directory)
        except BaseException:
            # Not needed for safety (scan() would delete it), only to keep the spool tidy.
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise
        finally:
            with self._mutex:
                self._in_flight.discard(temp.name)

    def _quarantine(self, name: str, reason: str) -> None:
        target = self._corrupt / name
        while target.exists():  # Never overwrite earlier evidence.
            target = self._corrupt / f"{name}.{secrets.token_hex(4)}"
        try:
            os.replace(self._directory / name, target)
        except OSError as e:
            raise SpoolWriteError(self._directory / name, "moving to corrupt/", e) from e
        self._fsync_directory(self._corrupt)
        self._fsync_directory(self._directory)
        logger.error("spool: moved %s to %s (%s)", name, target, reason)

    def _unlink(self, path: Path, *, missing_ok: bool = False) -> None:
        try:
            path.unlink(missing_ok=missing_ok)
        except OSError as e:
            raise SpoolWriteError(path, "deleting", e) from e

    def _fsync_directory(self, directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise SpoolWriteError(directory, "syncing the directory", e) from e

    def _create_directory(self, directory: Path) -> None:
        if directory.is_dir():
            return
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolWriteError(directory, "creating", e) from e
        # The new directory's own name must be durable too, or its records vanish with it.
        self._fsync_directory(directory.parent)

    # --- Helpers ----------------------------------------------------------------------

    def _record_path(self, queue_id: str) -> Path:
        return self._directory / f"{queue_id}{_RECORD_SUFFIX}"

    def _state_path(self, queue_id: str) -> Path:
        return self._directory / f"{queue_id}{_STATE_SUFFIX}"

    @contextlib.contextmanager
    def _process_lock(self, queue_id: str) -> Iterator[None]:
        """Exclude other processes (``mailflow queue``) from this message's read-modify-write.

        An advisory ``flock`` on the record itself: no extra files, and it goes away with
        the record. The thread lock is taken first, so within one process this never waits.
        """
        try:
            fd = os.open(self._record_path(queue_id), os.O_RDONLY)
        except FileNotFoundError:
            raise MessageNotFoundError(queue_id) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _lock_for(self, queue_id: str) -> threading.Lock:
        return self._locks[hash(queue_id) % _LOCK_STRIPES]

    def _next_received_us(self) -> int:
        # Strictly increasing within a process, so ids sort in acceptance order even
        # when two messages arrive in the same microsecond or the clock steps back.
        with self._mutex:
            now = max(time.time_ns() // 1000, self._last_received_us + 1)
            self._last_received_us = now
            return now


# --- The on-disk format ---------------------------------------------------------------


def _digest(*chunks: bytes) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def _dump_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _envelope_to_json(message: SpooledMessage) -> dict[str, Any]:
    return {
        "queue_id": message.queue_id,
        "sender": message.sender,
        "recipients": [_state_to_json(r) for r in message.recipients],
        "received": message.received.isoformat(),
        "size": message.size,
        # Optional, so that records written before them still load (and look the same).
        **({"client": message.client} if message.client else {}),
        **({"user": message.user} if message.user is not None else {}),
        **({"arrived": message.arrived.isoformat()} if message.arrived is not None else {}),
        **({"parameters": message.parameters.to_json()} if message.parameters else {}),
    }


def _state_to_json(state: RecipientState) -> dict[str, Any]:
    return {
        "address": state.address,
        "status": state.status.value,
        "attempts": state.attempts,
        "next_attempt": None if state.next_attempt is None else state.next_attempt.isoformat(),
        "last_reply_code": state.last_reply_code,
        "last_reply_text": state.last_reply_text,
        "delay_notified": state.delay_notified,
        **({"remote_mta": state.remote_mta} if state.remote_mta is not None else {}),
        **({"remote_dsn": True} if state.remote_dsn else {}),
    }


def _split_lines(path: Path, data: bytes, magic: bytes) -> tuple[bytes, bytes]:
    if not data.startswith(magic):
        raise SpoolCorruptError(path, "bad magic line")
    end = data.find(b"\n", len(magic), len(magic) + _MAX_HEADER_LINE)
    if end < 0:
        raise SpoolCorruptError(path, "truncated header")
    return data[len(magic) : end], data[end + 1 :]


def _parse_record_header(path: Path, data: bytes) -> tuple[str, int, int]:
    header, _ = _split_lines(path, data, _RECORD_MAGIC)
    match = re.fullmatch(rb"([0-9a-f]{64}) ([0-9]{1,12}) ([0-9]{1,12})", header)
    if match is None:
        raise SpoolCorruptError(path, "malformed header")
    return match[1].decode(), int(match[2]), int(match[3])


def _parse_record(path: Path, queue_id: str, data: bytes) -> SpooledMessage:
    digest, envelope_length, body_length = _parse_record_header(path, data)
    _, payload = _split_lines(path, data, _RECORD_MAGIC)
    if len(payload) != envelope_length + body_length:
        raise SpoolCorruptError(
            path, f"{len(payload)} payload bytes, the header says {envelope_length + body_length}"
        )
    lengths = f"{envelope_length} {body_length}".encode()
    if _digest(lengths, payload) != digest:
        raise SpoolCorruptError(path, "checksum mismatch")
    envelope = _parse_envelope(path, queue_id, payload[:envelope_length])
    body = payload[envelope_length:]
    if envelope.size != len(body):
        raise SpoolCorruptError(path, f"envelope says {envelope.size} bytes, body has {len(body)}")
    return replace(envelope, body=body)


def _parse_envelope(path: Path, queue_id: str, data: bytes) -> SpooledMessage:
    """The envelope as a message with an empty body; the caller attaches the body."""
    try:
        raw = json.loads(data)
        if raw["queue_id"] != queue_id:
            raise SpoolCorruptError(path, f"holds message {raw['queue_id']!r}")
        sender = raw["sender"]
        size = raw["size"]
        if not isinstance(sender, str) or not isinstance(size, int) or size < 0:
            raise SpoolCorruptError(path, "malformed envelope")
        return SpooledMessage(
            queue_id=queue_id,
            sender=sender,
            recipients=_parse_states(path, raw["recipients"]),
            received=_parse_time(path, raw["received"]),
            size=size,
            body=b"",
            client=str(raw.get("client", "")),
            user=None if raw.get("user") is None else str(raw["user"]),
            arrived=None if raw.get("arrived") is None else _parse_time(path, raw["arrived"]),
            parameters=EnvelopeParameters.from_json(raw.get("parameters", {})),
        )
    except SpoolCorruptError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise SpoolCorruptError(path, f"malformed envelope: {e}") from e


def _parse_state(
    path: Path, queue_id: str, data: bytes, initial: tuple[RecipientState, ...]
) -> tuple[RecipientState, ...]:
    header, payload = _split_lines(path, data, _STATE_MAGIC)
    match = re.fullmatch(rb"([0-9a-f]{64}) ([0-9]{1,12})", header)
    if match is None:
        raise SpoolCorruptError(path, "malformed header")
    if len(payload) != int(match[2]):
        raise SpoolCorruptError(path, f"{len(payload)} payload bytes, the header says {match[2]!r}")
    if _digest(payload) != match[1].decode():
        raise SpoolCorruptError(path, "checksum mismatch")
    try:
        raw = json.loads(payload)
        if raw["queue_id"] != queue_id:
            raise SpoolCorruptError(path, f"holds message {raw['queue_id']!r}")
        states = _parse_states(path, raw["recipients"])
    except SpoolCorruptError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise SpoolCorruptError(path, f"malformed state: {e}") from e
    if [s.address for s in states] != [s.address for s in initial]:
        raise SpoolCorruptError(path, "recipients differ from the record's")
    return states


def _parse_states(path: Path, raw: object) -> tuple[RecipientState, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpoolCorruptError(path, "no recipients")
    return tuple(_parse_one_state(path, item) for item in raw)


def _parse_one_state(path: Path, raw: Any) -> RecipientState:
    address = raw["address"]
    attempts = raw["attempts"]
    code = raw["last_reply_code"]
    text = raw["last_reply_text"]
    next_attempt = raw["next_attempt"]
    if (
        not isinstance(address, str)
        or not isinstance(attempts, int)
        or not (code is None or isinstance(code, int))
        or not (text is None or isinstance(text, str))
    ):
        raise SpoolCorruptError(path, f"malformed recipient state {raw!r}")
    return RecipientState(
        address=address,
        status=RecipientStatus(raw["status"]),
        attempts=attempts,
        next_attempt=None if next_attempt is None else _parse_time(path, next_attempt),
        last_reply_code=code,
        last_reply_text=text,
        # Absent in states written before the field existed.
        delay_notified=bool(raw.get("delay_notified", False)),
        remote_mta=None if raw.get("remote_mta") is None else str(raw["remote_mta"]),
        remote_dsn=raw.get("remote_dsn") is True,
    )


def _parse_time(path: Path, raw: object) -> datetime:
    if not isinstance(raw, str):
        raise SpoolCorruptError(path, f"not a time: {raw!r}")
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        raise SpoolCorruptError(path, f"time without a zone: {raw!r}")
    return value
