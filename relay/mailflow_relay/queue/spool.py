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

This module owns that promise, and does it with one ``fdatasync`` for many messages.

Group commit
============

Every write (a new message, new recipient states, a removal) is a *request* to one
committer thread per :class:`Spool`. The committer takes every request waiting (at most
``_BATCH_LIMIT``), turns each into a record, appends all of them to the newest segment
file with one ``writev``, calls ``fdatasync`` once, updates the in-memory index, and only
then answers every request of the batch. While the disk works on one batch, the next one
gathers. The listener awaits its request's future (:meth:`Spool.submit_store` with
:func:`asyncio.wrap_future`): one hand-off to the committer, one back, no thread of a pool
parked in ``fsync`` per message. The blocking methods (:meth:`Spool.store`, …) wait for
the same future, for callers outside the event loop (``mailflow queue``, tests).

The layout
==========

Everything lives in one directory::

    spool/
        seg-<16 hex µs>.msg   a segment: records appended, never rewritten
        .append.lock          flock'ed by whoever appends (the relay, ``mailflow queue``)
        .reserve              64 KiB set aside so that removals work on a full disk
        corrupt/              what failed a checksum, kept for a person
        <queue id>.msg/.state the single-file layout of older relays, until moved

Segment names grow (microseconds, always above the newest one), so name order is the
order in which segments were started; the ``.msg`` suffix keeps "no ``*.msg`` file: the
queue is empty" true for operators' scripts, as it was. A queue id is 14 hex digits of
microseconds since the epoch, a dash and 16 random hex digits from :mod:`secrets`
(``0006123456789a-0123456789abcdef``): unique, safe in a file name and a URL, sorted by
time when sorted as text. An id from a CLI or an HTTP request is used only after it
matched that exact pattern.

A record (:mod:`.segments`) is a fixed head, a JSON payload and a body: ``M`` a message
(its envelope with every recipient's state, then the body), ``S`` every recipient's
state of one message, ``R`` a removal (tombstone), ``E`` the end of a full segment. The
head carries the lengths, the SHA-256 of the body and a SHA-256 over the head fields and
the JSON. A message's current form is its last ``M`` record plus the ``S`` records after
it, unless an ``R`` came later.

The index holds envelopes, never bodies
=======================================

Replaying the segments reads heads and envelopes only: a scan costs a few hundred bytes
per message however large it is, and :meth:`Spool.scan` returns messages with an empty
``body``. The index keeps, per message, the envelope, its current states and where the
body is; :meth:`Spool.load` reads and checks the body when the relay delivers it, and the
relay drops it after the attempt. So memory grows with the number of queued messages,
not with their bytes (10,000 waiting messages of 1 MiB: a relay under 256 MiB RSS).

The writes, in order, and why every crash point is safe
=======================================================

A new message (:meth:`Spool.store`):

1. The request waits for the committer. A crash here: nothing written, nobody answered.
2. The committer appends the batch (``writev``). A crash in the middle leaves the tail
   of the segment half-written: a head whose hash fails, or a record running past the
   end of the file. Nobody was answered; the next scan ignores it (see "Reading").
3. Written, ``fdatasync`` not returned. After a SIGKILL the bytes are in the page cache
   and reach the disk anyway: the message exists though its client never heard ``250``
   and will likely send it again, a duplicate, allowed. After a power cut any part of
   the batch may be missing or zeros (ext4's delayed allocation). Every such record
   fails its head or body hash; none of them was acknowledged.
4. ``fdatasync`` returned: every record of the batch is on stable storage (fdatasync
   also flushes the file size, which reading it back needs). Only now is the index
   updated and only now are the callers answered; the listener sends ``250``. A crash
   between the ``fdatasync`` and the ``250``: a stored message whose client did not hear
   it, a duplicate again, never a loss.

A new segment is created with ``O_EXCL`` and the directory is fsynced before anything
is written into it, so no acknowledged record sits in a file whose name could vanish.

New states (:meth:`Spool.update`) and removals (:meth:`Spool.remove`) go through the
same committer. The committer merges the new states with the current ones under the
append lock and writes *all* recipients' states in one ``S`` record, so a record is
never a merge of two writes, and a final state never changes. A crash before the batch's
``fdatasync`` keeps the previous states (or the message, for a removal); the caller was
not answered, so at worst a delivery is tried again. That is the trade-off every MTA
makes: at-least-once, never at-most-once, because a duplicate is a nuisance and a loss
is a bug.

Order. Records are replayed segment by segment in name order, and in file order within
one. Every appender holds the append lock (a thread lock, then ``flock`` across
processes) while it writes and syncs, and appends only to the newest segment, so file
order is the order of the writes. A process appends to a segment it started, or to a
newer one another process started, never to one it found at start: a crash may have
torn that one's tail, which then stays at its end.

A full segment (past 64 MiB) gets an ``E`` record, synced, before the next one starts.
Everything before an ``E`` was synced, so a scan trusts the bodies of closed segments
until it reads them; only segments without an ``E`` (the newest, one a crash left) have
every body checked at start. A crash while writing the ``E``: the segment counts as
open and is checked in full, which is slower and as safe.

Write failures. A failed ``writev`` (a full disk) is cut off again with ``ftruncate``,
so the segment still ends with a whole record; nobody of the batch was answered. After
a failed ``ftruncate`` or ``fdatasync`` the segment takes no more records (the kernel
may have dropped the dirty pages, so its page cache says nothing reliable); the next
batch starts a new segment. The batch's records may still show up after a restart:
unacknowledged, so either way is allowed. A batch of removals only that finds the disk
full deletes ``.reserve`` and tries once more, because removing is what frees space;
new messages get ``452`` from the listener instead, and outcomes wait in memory (the
engine's unrecorded outcomes).

Reclaiming. A segment is deleted once it and every older segment hold no live message,
oldest first, with a directory fsync after each unlink. A message's ``S`` and ``R``
records are in its own segment or later ones, so deleting a prefix of dead segments
never separates a live message from its states, and never revives a removed one: after
a crash the deleted segments are still a prefix. When no message is left at all the
newest segment goes too (the folder is as empty as the queue); otherwise it stays while
it is written to, and an idle committer (one second without work) reclaims again.

Compaction. A message deferred for days would keep every later segment on disk. So when
the oldest segment holds only a few live messages (16 MiB at most) and keeps at least
four segments, the committer copies those messages to the newest segment, as ``M``
records with their current states, synced before anything is deleted. Replay takes a
message's last ``M`` record, so a crash before the copy is synced keeps the original, and
one after it, before or during the deletion, finds the same message twice and keeps the
copy. A body that fails its hash is not copied; it is found when it is delivered.

Reading at start
================

A scan replays every segment from where this object last read it:

- a damaged span with no valid record after it in its segment is a torn tail: what a
  crash cut short before its ``fdatasync``; never acknowledged, so ignored (a warning);
- a damaged span *followed* by valid records cannot come from a crash of a closed
  batch: it is copied to ``corrupt/`` and skipped (an ``M``: that message is missing; an
  ``S``: the states before it hold, at-least-once; an ``R``: the message comes back and
  is delivered again). A damaged head is skipped by searching the next valid head;
- a body that fails its hash when :meth:`Spool.load` reads it is copied to
  ``corrupt/<queue id>.body`` and its message is removed, so it does not fail forever;
- with ``repair`` (the relay, holding its lock) messages of the old single-file layout
  move into a segment with their current states, their old files are unlinked and the
  directory is fsynced before the scan returns, so before any delivery could change
  their states; a crash in between moves the same message again or finds it in the
  segment already. Temp files and orphaned state files of the old layout are deleted,
  and old records that fail their checksum go to ``corrupt/`` as before.

``mailflow queue`` (another process) scans with ``repair=False``: it reads the segments
and lists old-layout files as they are; a retry or a delete of an old-layout message
moves that message first. The relay sees what ``mailflow queue`` appended before its
own next batch (the committer reads new records under the lock), on ``scan``, and on
``load``/``contains`` when the folder or the newest segment changed.

What this does not cover: a disk that acknowledges ``fdatasync`` but loses the data (a
write cache without a battery); a spool on a network file system without ``flock``;
and damage that hits the very last record of a segment, which looks like a torn tail and
is ignored.
Sending ``250`` after a successful store is the listener's job; so is answering
``452``/``552`` when the spool refuses.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final

from mailflow_relay.envelope import EnvelopeParameters
from mailflow_relay.errors import MailflowRelayError
from mailflow_relay.queue import segments
from mailflow_relay.queue.segments import Damage, Kind, Record

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
_SEGMENT_PREFIX: Final = "seg-"
_SEGMENT_RE: Final = re.compile(r"\Aseg-([0-9a-f]{16})\.msg\Z")
_APPEND_LOCK: Final = ".append.lock"
# Space set aside so that removals (tombstones, a few hundred bytes) work on a full disk.
_RESERVE: Final = ".reserve"
_RESERVE_BYTES: Final = 64 * 1024
# A segment is closed once past this size; a single large message may overshoot it.
_SEGMENT_LIMIT: Final = 64 * 1024 * 1024
# Requests in one batch: enough to share one fdatasync among every waiting session,
# few enough that the first of them is not kept waiting for the bodies of the last.
_BATCH_LIMIT: Final = 128
# The committer thread goes after this long without work (and reclaims segments then).
_IDLE_SECONDS: Final = 1.0
# Compaction: when this many segments are kept by the oldest one's few live messages
# (together at most _COMPACT_MAX_BYTES), those messages are copied to the newest segment.
_COMPACT_AFTER_SEGMENTS: Final = 4
_COMPACT_MAX_BYTES: Final = 16 * 1024 * 1024
# writev(2) takes at most IOV_MAX (1024 on Linux) buffers at once.
_IOV_MAX: Final = 1024


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
    held: bool = False
    """Put on hold by an administrator (``mailflow queue hold``): neither tried nor bounced,
    and not aged into a bounce, until released."""
    bounce_requested: bool = False
    """An administrator asked to return it to the sender (``mailflow queue bounce``): the
    relay fails it without another attempt and sends the sender an RFC 3464 report."""
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


@dataclass
class _Segment:
    """What this process knows of one segment file."""

    end: int = 0
    """Bytes read (records and damage) or written by this process so far."""
    sealed: bool = False
    """Closed by an END record: every byte before it was on stable storage."""
    torn: bool = False
    """Its tail is damaged (a crash before the fdatasync): never appended to again."""
    live: set[str] = field(default_factory=set)
    """Messages whose current record is in this segment."""


@dataclass(frozen=True)
class _Entry:
    """One message in the index: its envelope and states, and where its body is."""

    envelope: SpooledMessage
    """With an empty body: the index never holds bodies."""
    segment: str
    body_offset: int
    body_digest: bytes


@dataclass(frozen=True)
class _Staged:
    kind: Kind
    meta: bytes
    body: bytes
    envelope: SpooledMessage | None
    states: tuple[RecipientState, ...] | None


@dataclass(frozen=True)
class _Request:
    action: Callable[[_Staging], Any]
    future: Future[Any]


class _Staging:
    """The records of one batch, and the states they leave, before they are written."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.records: list[_Staged] = []
        self.migrated: list[str] = []
        self._states: dict[str, tuple[RecipientState, ...] | None] = {}

    def current(self, queue_id: str) -> tuple[RecipientState, ...]:
        """The states as this batch leaves them so far; MessageNotFoundError when gone."""
        if queue_id in self._states:
            states = self._states[queue_id]
            if states is None:
                raise MessageNotFoundError(queue_id)
            return states
        entry = self._spool._index.get(queue_id)
        if entry is not None:
            return entry.envelope.recipients
        # Still in the single-file layout of an older relay: it moves into a segment with
        # this batch, and its old files go once the batch is on disk.
        message = self._spool._load_legacy(queue_id)
        self.add(Kind.MESSAGE, _dump_json(_envelope_to_json(message)), message.body)
        self.set(queue_id, message.recipients)
        self.migrated.append(queue_id)
        return message.recipients

    def knows(self, queue_id: str) -> bool:
        return queue_id in self._states or queue_id in self._spool._index

    def add(
        self,
        kind: Kind,
        meta: bytes,
        body: bytes = b"",
        *,
        envelope: SpooledMessage | None = None,
        states: tuple[RecipientState, ...] | None = None,
    ) -> None:
        """One record; ``envelope`` or ``states``: what it says, so as not to parse it."""
        self.records.append(_Staged(kind, meta, body, envelope, states))

    def set(self, queue_id: str, states: tuple[RecipientState, ...] | None) -> None:
        self._states[queue_id] = states


class Spool:
    """The durable spool in one directory; see the module docstring for the guarantees.

    The blocking methods wait for the committer (they are safe to call from any thread,
    e.g. through :func:`asyncio.to_thread`); the ``submit_*`` methods return a
    :class:`concurrent.futures.Future` at once, for :func:`asyncio.wrap_future`.
    """

    def __init__(
        self, directory: Path | str, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        if max_message_size <= 0:
            raise ValueError(f"max_message_size must be positive, got {max_message_size}")
        self._directory = Path(directory)
        self._folder = os.fspath(self._directory)
        """As a string: joined with a file name per batch, where a ``Path`` costs more."""
        self._corrupt = self._directory / _CORRUPT_DIR
        self._max_message_size = max_message_size
        self._mutex = threading.RLock()
        """Guards the index and the segment table."""
        self._writer = threading.Lock()
        """This process's side of the append lock (``flock`` is per open file, not thread)."""
        self._requests: collections.deque[_Request] = collections.deque()
        self._wakeup = threading.Condition(threading.Lock())
        self._committer: threading.Thread | None = None
        self._closing = False
        self._started: set[str] = set()
        """Segments this object created (it appends to those, and to newer ones)."""
        self._first_seen = ""
        """The newest segment when this object first read the spool."""
        self._index: dict[str, _Entry] = {}
        self._segments: dict[str, _Segment] = {}
        self._tail: tuple[str, int] | None = None
        self._opened = False
        self._seen: tuple[int, int] = (-1, -1)
        self._last_received_us = 0
        self._last_segment_us = 0
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
        future = self.submit_store(
            sender,
            recipients,
            make_body,
            client=client,
            user=user,
            arrived=arrived,
            parameters=parameters,
        )
        return future.result()

    def submit_store(
        self,
        sender: str,
        recipients: Sequence[str],
        make_body: Callable[[str], bytes],
        *,
        client: str = "",
        user: str | None = None,
        arrived: datetime | None = None,
        parameters: EnvelopeParameters | None = None,
    ) -> Future[SpooledMessage]:
        """:meth:`store_with_header` without waiting: the future is done after the fdatasync.

        ``make_body`` runs in the committer (it may sign: it must not block on I/O).
        """
        if not recipients:
            raise InvalidEnvelopeError("no recipients")
        if len(set(recipients)) != len(recipients):
            raise InvalidEnvelopeError("a recipient appears more than once")
        received_us = self._next_received_us()
        queue_id = new_queue_id(received_us)
        addresses = tuple(recipients)

        def action(staging: _Staging) -> SpooledMessage:
            body = make_body(queue_id)
            if len(body) > self._max_message_size:
                raise MessageTooLargeError(len(body), self._max_message_size)
            message = SpooledMessage(
                queue_id=queue_id,
                sender=sender,
                recipients=tuple(RecipientState(address) for address in addresses),
                received=_EPOCH + timedelta(microseconds=received_us),
                size=len(body),
                body=body,
                client=client,
                user=user,
                arrived=arrived,
                parameters=parameters or EnvelopeParameters(),
            )
            staging.add(
                Kind.MESSAGE,
                _dump_json(_envelope_to_json(message)),
                body,
                envelope=replace(message, body=b""),
            )
            staging.set(queue_id, message.recipients)
            return message

        return self._submit(action)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's file system (statvfs)."""
        stats = os.statvfs(self._directory)
        return stats.f_bavail * stats.f_frsize

    def contains(self, queue_id: str) -> bool:
        """Whether the message is still in the spool (cheap: two stat calls, never a wait)."""
        queue_id = _checked_queue_id(queue_id)
        self._catch_up(wait=False)
        with self._mutex:
            if queue_id in self._index:
                return True
        return self._record_path(queue_id).exists()

    def load(self, queue_id: str) -> SpooledMessage:
        """The message with this id, its checksum verified, with its current states.

        The only call that reads a body: the relay loads a message when it delivers it
        and drops it afterwards, so memory holds the bodies of deliveries in progress.
        """
        queue_id = _checked_queue_id(queue_id)
        self._catch_up()
        with self._mutex:
            entry = self._index.get(queue_id)
        if entry is None:
            return self._load_legacy(queue_id)
        return replace(entry.envelope, body=self._read_body(entry))

    def update(self, queue_id: str, *states: RecipientState) -> tuple[RecipientState, ...]:
        """Record new states for some recipients durably; returns every recipient's state.

        All ``states`` are written in one record, so recording the outcome of one
        delivery transaction (several recipients, one next hop) is all-or-nothing.
        """
        return self.submit_update(queue_id, *states).result()

    def submit_update(
        self, queue_id: str, *states: RecipientState
    ) -> Future[tuple[RecipientState, ...]]:
        """:meth:`update` without waiting; the merge happens in the committer, in order."""
        queue_id = _checked_queue_id(queue_id)

        def action(staging: _Staging) -> tuple[RecipientState, ...]:
            # An outcome the relay decided on an older read must not undo a hold or a bounce
            # that `mailflow queue` wrote meanwhile: only amend() changes those marks.
            updated = _merged_states(queue_id, staging.current(queue_id), states, keep_marks=True)
            staging.add(Kind.STATE, _state_payload(queue_id, updated), states=updated)
            staging.set(queue_id, updated)
            return updated

        return self._submit(action)

    def make_due(self, queue_id: str) -> int:
        """Deferred recipients due now (``mailflow queue retry``); how many there were.

        Read and written by the committer under the append lock, so a delivery outcome
        the relay records at the same moment is neither lost nor overwritten.
        """
        queue_id = _checked_queue_id(queue_id)

        def action(staging: _Staging) -> int:
            current = staging.current(queue_id)
            due = [
                replace(s, next_attempt=None)
                for s in current
                if s.status is RecipientStatus.DEFERRED
            ]
            if due:
                updated = _merged_states(queue_id, current, due)
                staging.add(Kind.STATE, _state_payload(queue_id, updated), states=updated)
                staging.set(queue_id, updated)
            return len(due)

        return int(self._submit(action).result())

    def amend(
        self, queue_id: str, change: Callable[[RecipientState], RecipientState]
    ) -> tuple[RecipientState, ...]:
        """Apply ``change`` to every recipient not final yet; the states that changed
        (``mailflow queue hold|release|bounce``).

        Like :meth:`make_due`, a read-modify-write in the committer under the append lock,
        which an outcome the relay records at the same moment can neither lose nor overwrite.
        """
        queue_id = _checked_queue_id(queue_id)

        def action(staging: _Staging) -> tuple[RecipientState, ...]:
            current = staging.current(queue_id)
            changed = [
                new
                for state in current
                if not state.status.is_final and (new := change(state)) != state
            ]
            if changed:
                updated = _merged_states(queue_id, current, changed)
                staging.add(Kind.STATE, _state_payload(queue_id, updated), states=updated)
                staging.set(queue_id, updated)
            return tuple(changed)

        result: tuple[RecipientState, ...] = self._submit(action).result()
        return result

    def remove(self, queue_id: str, *, force: bool = False) -> None:
        """Delete a message durably once every recipient is final (or at once, if forced).

        Without ``force`` the states on disk must all be final. ``force`` skips that check;
        its callers know something the disk does not yet say: an administrator deleting by
        hand, a hand-off after the peer's ``250``, and the engine when every recipient has
        just become final in memory (it saves writing a state record only to delete it; a
        crash before the removal delivers again, as one before any write would).
        """
        self.submit_remove(queue_id, force=force).result()

    def submit_remove(self, queue_id: str, *, force: bool = False) -> Future[None]:
        """:meth:`remove` without waiting."""
        queue_id = _checked_queue_id(queue_id)

        def action(staging: _Staging) -> None:
            current = staging.current(queue_id)
            pending = [s.address for s in current if not s.status.is_final]
            if pending and not force:
                raise SpoolStateError(queue_id, f"recipients not final yet: {', '.join(pending)}")
            staging.add(Kind.REMOVE, _dump_json({"queue_id": queue_id}))
            staging.set(queue_id, None)

        return self._submit(action)

    def scan(self, *, repair: bool = True) -> list[SpooledMessage]:
        """Every complete message's envelope and states (no body), oldest first.

        With ``repair`` (the relay, at start, holding the relay lock) it first moves
        messages of the old single-file layout into segments and tidies what an old
        relay's crash left. Another process (``mailflow queue``) passes ``repair=False``
        and only reads: old-layout messages are listed from their files as they are.
        """
        self._catch_up(force=True)
        names = sorted(os.listdir(self._directory))
        if repair:
            self._migrate_legacy(names)
            names = sorted(os.listdir(self._directory))
            self._reclaim(idle=True)
        with self._mutex:
            messages = [entry.envelope for entry in self._index.values()]
            indexed = set(self._index)
        messages += self._legacy_envelopes(names, indexed)
        messages.sort(key=lambda m: (m.received, m.queue_id))
        return messages

    def close(self) -> None:
        """Finish what was submitted, let the committer go and reclaim what is final.

        Not needed for safety (a committer also goes after a second without work); it
        leaves a spool without final messages as an empty folder at once.
        """
        with self._wakeup:
            committer = self._committer
            self._closing = True
            self._wakeup.notify_all()
        if committer is not None and committer is not threading.current_thread():
            committer.join()
        with self._wakeup:
            self._closing = False
        if self._opened:
            self._reclaim(idle=True)

    # --- The committer ----------------------------------------------------------------

    def _submit(self, action: Callable[[_Staging], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._wakeup:
            self._requests.append(_Request(action, future))
            if self._committer is None:
                self._committer = threading.Thread(
                    target=self._run_committer, name="mailflow-spool-committer", daemon=True
                )
                self._committer.start()
            else:
                self._wakeup.notify()
        return future

    def _run_committer(self) -> None:
        while True:
            with self._wakeup:
                if not self._requests and not self._closing:
                    self._wakeup.wait(timeout=_IDLE_SECONDS)
                if not self._requests:
                    self._committer = None
                    break
                taken = [
                    self._requests.popleft() for _ in range(min(len(self._requests), _BATCH_LIMIT))
                ]
            # A request whose waiter was cancelled (a session gone) is not written; once a
            # future runs it can no longer be cancelled, so every answer below can be given.
            batch = [r for r in taken if r.future.set_running_or_notify_cancel()]
            self._commit(batch)
            self._compact()
            if not self._requests:
                # Nothing waiting: the tail is closed now, so that a spool nobody writes to
                # holds no descriptor (it stays open only from one batch to the next).
                with self._writer:
                    self._close_tail()
        if not self._directory.is_dir():
            with self._writer:
                self._close_tail()
            return  # the spool folder itself went away (a test, an operator): nothing to do
        try:
            self._reclaim(idle=True)
        except OSError as e:
            logger.warning("spool: cannot reclaim segments (%s); trying again when next idle", e)

    def _compact(self) -> None:
        """Copy the few live messages of the oldest segment forward, so that it can go.

        A message deferred for days would otherwise keep every later segment on disk (they
        are reclaimed oldest first). The copy is an ``M`` record with the current states,
        synced before the old segment is deleted: replay takes the later record, so a crash
        before, during or after the deletion leaves the same message.
        """
        with self._mutex:
            names = sorted(self._segments)
            if len(names) < _COMPACT_AFTER_SEGMENTS:
                return
            live = [self._index[q] for q in self._segments[names[0]].live if q in self._index]
        if not live or sum(e.envelope.size for e in live) > _COMPACT_MAX_BYTES:
            return
        try:
            with self._exclusive():
                staged = []
                for entry in live:
                    current = self._index.get(entry.envelope.queue_id)
                    if current is None or current.segment != names[0]:
                        continue  # removed or moved meanwhile
                    envelope = current.envelope
                    body = self._read_body(current, quarantine=False)
                    meta = _dump_json(_envelope_to_json(replace(envelope, body=body)))
                    staged.append(_Staged(Kind.MESSAGE, meta, body, envelope, None))
                if staged:
                    self._append(staged)
                    logger.info(
                        "spool: %d message(s) copied out of %s so that it can be reclaimed",
                        len(staged),
                        names[0],
                    )
                self._reclaim_locked(idle=False)
                self._close_tail()
        except (OSError, SpoolError) as e:
            logger.warning("spool: compacting %s failed (%s); trying again later", names[0], e)

    def _commit(self, batch: list[_Request]) -> None:
        """One batch: every record appended, one fdatasync, then every caller answered."""
        answers: list[tuple[Future[Any], Any]] = []
        failures: list[tuple[Future[Any], BaseException]] = []
        try:
            with self._exclusive():
                staging = _Staging(self)
                for request in batch:
                    try:
                        answers.append((request.future, request.action(staging)))
                    except Exception as e:
                        failures.append((request.future, e))
                # The tail stays open while more requests wait (an open and a close less
                # per batch under load) and is closed after the last (_run_committer): no
                # descriptor outlives the work (a file system with a spool that nobody
                # writes to can be unmounted).
                if staging.records:
                    self._append_or_use_reserve(staging.records)
                self._tidy_after_commit(staging.migrated)
        except Exception as e:
            logger.error("spool: a batch of %d write(s) failed: %s", len(answers), e)
            failures += [(future, e) for future, _ in answers]
            answers = []
        finally:
            # Outside the lock: a caller woken here may come straight back with more work.
            for future, result in answers:
                future.set_result(result)
            for future, error in failures:
                future.set_exception(error)

    def _append_or_use_reserve(self, records: list[_Staged]) -> None:
        try:
            self._append(records)
        except SpoolWriteError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or any(
                staged.kind is not Kind.REMOVE for staged in records
            ):
                raise
            # A removal is what frees space: it must not fail for the lack of it. New
            # messages and states never use the reserve (they get 452, or wait in memory).
            if not self._release_reserve():
                raise
            logger.warning("spool: the disk is full; the space reserve was used for removals")
            self._append(records)

    def _ensure_reserve(self) -> None:
        reserve = self._directory / _RESERVE
        if reserve.exists():
            return
        try:
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, _RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                reserve.unlink()
            logger.warning("spool: cannot set aside the space reserve (%s); trying later", e)

    def _release_reserve(self) -> bool:
        try:
            (self._directory / _RESERVE).unlink()
        except OSError:
            return False
        return True

    def _tidy_after_commit(self, migrated: list[str]) -> None:
        """What may fail without undoing the batch: it is on disk and will be answered."""
        try:
            self._drop_legacy(migrated)
            self._reclaim_locked(idle=False)
        except OSError as e:
            logger.warning("spool: tidying after a commit failed (%s); trying again later", e)

    def _append(self, records: list[_Staged]) -> None:
        name, fd = self._tail_for_append()
        segment = self._segments[name]
        path = self._directory / name
        start = position = segment.end
        chunks: list[bytes] = []
        written: list[Record] = []
        for staged in records:
            head, meta, body = segments.encode(staged.kind, staged.meta, staged.body)
            chunks += (head, meta, body)
            body_offset = position + len(head) + len(meta)
            written.append(
                Record(staged.kind, position, meta, body_offset, len(body), _body_digest(head))
            )
            position = body_offset + len(body)
        try:
            _write_all(fd, chunks)
        except OSError as e:
            # Cut the partial batch off, so that the segment ends with a whole record.
            try:
                os.ftruncate(fd, start)
            except OSError:
                self._abandon_tail(name)
            raise SpoolWriteError(path, "appending to", e) from e
        try:
            os.fdatasync(fd)
        except OSError as e:
            # After a failed fdatasync the page cache says nothing reliable (the kernel
            # may have dropped the dirty pages): this segment takes no more records.
            segment.end = position
            self._abandon_tail(name)
            raise SpoolWriteError(path, "syncing", e) from e
        segment.end = position
        with self._mutex:
            for staged, record in zip(records, written, strict=True):
                if staged.envelope is not None or staged.states is not None:
                    self._apply_known(name, record, staged)
                else:
                    self._apply(name, record)
        self._remember_seen()

    def _apply_known(self, name: str, record: Record, staged: _Staged) -> None:
        """:meth:`_apply` for a record this process just wrote: the same effect, unparsed."""
        if staged.envelope is not None:
            queue_id = staged.envelope.queue_id
            previous = self._index.get(queue_id)
            if previous is not None:
                self._segments[previous.segment].live.discard(queue_id)
            self._index[queue_id] = _Entry(
                staged.envelope, name, record.body_offset, record.body_digest
            )
            self._segments[name].live.add(queue_id)
            return
        assert staged.states is not None
        queue_id = json.loads(staged.meta)["queue_id"]
        entry = self._index.get(queue_id)
        if entry is not None:
            self._index[queue_id] = replace(
                entry, envelope=replace(entry.envelope, recipients=staged.states)
            )

    def _tail_for_append(self) -> tuple[str, int]:
        newest = max(self._segments, default=None)
        if self._tail is not None and self._tail[0] != newest:
            self._close_tail()  # another process started a newer segment
        # A process appends to a segment it started, or to a newer one another process
        # started (the order of records must be the order of writes); never to one left
        # by an earlier process, whose tail may be torn and which stays as it was found.
        if newest is not None and (newest in self._started or newest > self._first_seen):
            segment = self._segments[newest]
            if not segment.torn and not segment.sealed and segment.end >= _SEGMENT_LIMIT:
                self._seal(newest)
            if not segment.torn and not segment.sealed:
                if self._tail is None:
                    self._tail = (newest, self._open_segment(newest, os.O_WRONLY | os.O_APPEND))
                return self._tail
        self._close_tail()
        now = max(time.time_ns() // 1000, self._last_segment_us + 1)
        match = None if newest is None else _SEGMENT_RE.match(newest)
        if match is not None:
            now = max(now, int(match[1], 16) + 1)
        self._last_segment_us = now
        name = f"{_SEGMENT_PREFIX}{now:016x}{_RECORD_SUFFIX}"
        fd = self._open_segment(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL)
        self._segments[name] = _Segment()
        self._started.add(name)
        self._tail = (name, fd)
        # The new name must be durable before anything in it is acknowledged.
        self._fsync_directory(self._directory)
        self._ensure_reserve()
        return self._tail

    def _seal(self, name: str) -> None:
        """Close a full segment with an END record: a scan need not check its bodies."""
        self._close_tail()
        segment = self._segments[name]
        chunks = segments.encode(Kind.END, b"{}")
        fd = self._open_segment(name, os.O_WRONLY | os.O_APPEND)
        try:
            _write_all(fd, chunks)
            os.fdatasync(fd)
        except OSError as e:
            segment.torn = True  # either way, nothing more goes into it
            raise SpoolWriteError(self._directory / name, "closing", e) from e
        finally:
            os.close(fd)
        segment.end += sum(len(chunk) for chunk in chunks)
        segment.sealed = True

    def _open_segment(self, name: str, flags: int) -> int:
        try:
            return os.open(os.path.join(self._folder, name), flags | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SpoolWriteError(self._directory / name, "opening", e) from e

    def _close_tail(self) -> None:
        if self._tail is not None:
            with contextlib.suppress(OSError):
                os.close(self._tail[1])
            self._tail = None

    def _abandon_tail(self, name: str) -> None:
        self._segments[name].torn = True
        self._close_tail()

    # --- Reclaiming -------------------------------------------------------------------

    def _reclaim(self, *, idle: bool) -> None:
        with self._exclusive():
            try:
                self._reclaim_locked(idle=idle)
                if idle and self._segments:
                    self._ensure_reserve()  # again, once a full disk has room
            finally:
                if idle:
                    # No descriptor outlives the work: an idle spool holds no file open.
                    self._close_tail()

    def _reclaim_locked(self, *, idle: bool) -> None:
        """Delete segments from the oldest on, while none of their messages is live.

        Oldest first and one durable unlink at a time: a tombstone is always in a later
        segment than its message, so a segment never goes before the messages it removes.
        The newest segment stays while the relay is busy (it is being appended to), unless
        no message is left at all: then the spool folder is as empty as the queue.
        """
        idle = idle or not self._index
        newest = max(self._segments, default=None)
        for name in sorted(self._segments):
            segment = self._segments[name]
            if segment.live or (name == newest and not idle):
                break
            if self._tail is not None and self._tail[0] == name:
                self._close_tail()
            self._unlink(self._directory / name, missing_ok=True)
            self._fsync_directory(self._directory)
            del self._segments[name]
        self._remember_seen()

    # --- Reading the segments ---------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The append lock: this process's threads, then other processes (``flock``)."""
        with self._writer, self._append_lock(wait=True):
            self._read_news()
            yield

    @contextlib.contextmanager
    def _append_lock(self, *, wait: bool) -> Iterator[bool]:
        """``flock`` on the lock file; without ``wait``, False at once if another holds it."""
        try:
            fd = os.open(
                os.path.join(self._folder, _APPEND_LOCK),
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
        except OSError as e:
            raise SpoolWriteError(self._directory / _APPEND_LOCK, "opening", e) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _read_news(self) -> None:
        self._refresh_locked()
        if not self._opened:
            self._first_seen = max(self._segments, default="")
            self._opened = True

    def _catch_up(self, *, force: bool = False, wait: bool = True) -> None:
        """Read what another process appended, if anything changed since this one looked.

        Unless forced, a busy committer is left alone: it is reading the same news now.
        Without ``wait`` (the event loop's :meth:`contains`) a lock held by another process
        is not waited for either: the news is read by the next batch or the next load.
        """
        if not force and self._opened and self._seen == self._look():
            return
        if not force and self._opened and self._writer.locked():
            return
        if wait or not self._opened:
            with self._exclusive():
                return
        if not self._writer.acquire(blocking=False):
            return
        try:
            with self._append_lock(wait=False) as locked:
                if locked:
                    self._read_news()
        finally:
            self._writer.release()

    def _look(self) -> tuple[int, int]:
        try:
            listing = os.stat(self._folder).st_mtime_ns
            newest = max(self._segments, default=None)
            size = -1 if newest is None else os.stat(os.path.join(self._folder, newest)).st_size
        except FileNotFoundError:
            return (-2, -2)
        return (listing, size)

    def _remember_seen(self) -> None:
        self._seen = self._look()

    def _refresh_locked(self) -> None:
        listing = {n for n in os.listdir(self._folder) if _SEGMENT_RE.match(n)}
        for gone in set(self._segments) - listing:
            # Reclaimed by another process: every message in it was removed.
            with self._mutex:
                for queue_id in self._segments.pop(gone).live:
                    self._index.pop(queue_id, None)
            if self._tail is not None and self._tail[0] == gone:
                self._close_tail()
        for name in sorted(listing):
            segment = self._segments.setdefault(name, _Segment())
            try:
                size = os.stat(os.path.join(self._folder, name)).st_size
            except FileNotFoundError:
                continue
            if size > segment.end:
                self._replay(name, segment, size)
        self._remember_seen()

    def _replay(self, name: str, segment: _Segment, size: int) -> None:
        path = self._directory / name
        with path.open("rb") as f:
            # Heads only, a few hundred bytes per message: no readahead of the bodies
            # between them (a cold start on a 10 GiB backlog would read all of it).
            with contextlib.suppress(OSError):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            items = list(segments.read_records(f, segment.end, size))
            records = [item for item in items if isinstance(item, Record)]
            sealed = segment.sealed or bool(records and records[-1].kind is Kind.END)
            if not sealed:
                # Not closed: a crash may have cut its last batch short, and a torn record
                # can have a whole head and missing body blocks. Check every body.
                items = self._verified(f, items)
        with self._mutex:
            for item in items:
                if isinstance(item, Damage):
                    self._damaged(name, segment, item)
                else:
                    self._apply(name, item)
        segment.end = size

    def _verified(self, f: BinaryIO, items: list[Record | Damage]) -> list[Record | Damage]:
        checked: list[Record | Damage] = []
        for item in items:
            if isinstance(item, Record) and not segments.body_digest_matches(f, item):
                checked.append(Damage(item.offset, item.end, tail=False))
            else:
                checked.append(item)
        # Bad records with nothing valid after them are the torn tail, not damage.
        last_good = max(
            (i for i, item in enumerate(checked) if isinstance(item, Record)), default=-1
        )
        for i in range(last_good + 1, len(checked)):
            item = checked[i]
            if isinstance(item, Damage):
                checked[i] = Damage(item.start, item.end, tail=True)
        return checked

    def _damaged(self, name: str, segment: _Segment, damage: Damage) -> None:
        if damage.tail:
            # Never acknowledged: the fdatasync that would have made it so never returned.
            segment.torn = True
            logger.warning(
                "spool: %s ends in %d bytes of a write a crash cut short (never acknowledged);"
                " ignored",
                name,
                damage.end - damage.start,
            )
            return
        logger.error(
            "spool: %s: bytes %d to %d fail their checksum; a copy goes to corrupt/",
            name,
            damage.start,
            damage.end,
        )
        target = self._corrupt / f"{name}-{damage.start:x}"
        if target.exists():
            return
        with contextlib.suppress(OSError), (self._directory / name).open("rb") as f:
            f.seek(damage.start)
            target.write_bytes(f.read(damage.end - damage.start))

    def _apply(self, name: str, record: Record) -> None:
        """One record's effect on the index: the same for replay and for a fresh write."""
        segment = self._segments[name]
        if record.kind is Kind.END:
            segment.sealed = True
            return
        try:
            queue_id = json.loads(record.meta)["queue_id"]
            if not isinstance(queue_id, str) or not is_queue_id(queue_id):
                raise SpoolCorruptError(self._where(name, record), f"not a queue id: {queue_id!r}")
            entry = self._index.get(queue_id)
            if record.kind is Kind.MESSAGE:
                where = self._where(name, record)
                envelope = _parse_envelope(where, queue_id, record.meta)
                if envelope.size != record.body_length:
                    raise SpoolCorruptError(where, "the envelope's size is not the body's")
                if entry is not None:
                    self._segments[entry.segment].live.discard(queue_id)
                self._index[queue_id] = _Entry(
                    envelope, name, record.body_offset, record.body_digest
                )
                segment.live.add(queue_id)
            elif entry is None:
                return  # a state or tombstone of a message already gone
            elif record.kind is Kind.STATE:
                states = _parse_state_payload(
                    self._where(name, record), queue_id, record.meta, entry.envelope.recipients
                )
                self._index[queue_id] = replace(
                    entry, envelope=replace(entry.envelope, recipients=states)
                )
            else:
                del self._index[queue_id]
                self._segments[entry.segment].live.discard(queue_id)
        except SpoolCorruptError as e:
            logger.error("spool: %s; record skipped", e)
        except (ValueError, KeyError, TypeError) as e:
            logger.error("spool: %s: malformed record (%s); skipped", self._where(name, record), e)

    def _where(self, name: str, record: Record) -> Path:
        """A record's place, for an error (only then: a ``Path`` per record costs)."""
        return self._directory / f"{name}@{record.offset}"

    def _read_body(self, entry: _Entry, *, quarantine: bool = True) -> bytes:
        path = self._directory / entry.segment
        queue_id = entry.envelope.queue_id
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MessageNotFoundError(queue_id) from None
        try:
            body = segments.read_body(fd, entry.body_offset, entry.envelope.size)
        except EOFError as e:
            raise SpoolCorruptError(path, f"message {queue_id}: {e}") from e
        finally:
            os.close(fd)
        if hashlib.sha256(body).digest() != entry.body_digest:
            if quarantine:  # not from the committer itself: the removal goes through it
                self._quarantine_body(queue_id, body)
            raise SpoolCorruptError(path, f"message {queue_id}: body checksum mismatch")
        return body

    def _quarantine_body(self, queue_id: str, body: bytes) -> None:
        """Keep the damaged body for a person, and take the message out of the queue."""
        target = self._corrupt / f"{queue_id}.body"
        with contextlib.suppress(OSError):
            target.write_bytes(body)
        logger.error("spool: message %s has a damaged body; copied to %s", queue_id, target)
        with contextlib.suppress(SpoolError):
            self.remove(queue_id, force=True)

    # --- The old layout (one .msg and one .state file per message) --------------------

    def _migrate_legacy(self, names: list[str]) -> None:
        """Move old-layout messages into segments, each with its current states.

        A crash before the old files are durably gone moves the same message again: a
        later message record for an id replaces the earlier one, so that is harmless.
        """
        for name in names:
            if name.startswith(_TEMP_PREFIX):
                self._unlink(self._directory / name, missing_ok=True)
        pending: list[tuple[str, Future[None]]] = []
        for name in names:
            # Dot files are not mail: .relay.lock (queue/lock.py), .routing.json (the document
            # in force, for `mailflow queue`: engine/published.py), the append lock.
            if _SEGMENT_RE.match(name) or name.startswith(".") or name == _CORRUPT_DIR:
                continue
            stem, dot, suffix = name.rpartition(".")
            if not dot or f".{suffix}" not in (_RECORD_SUFFIX, _STATE_SUFFIX):
                logger.warning("spool: ignoring a foreign file %s", self._directory / name)
                continue
            if not is_queue_id(stem):
                # Not something this module wrote, but it could still be someone's mail.
                self._quarantine(name, "not named after a queue id")
                continue
            if f".{suffix}" == _STATE_SUFFIX:
                if not self._record_path(stem).exists():
                    # An interrupted remove(): the record, the commit point, is gone.
                    self._unlink(self._directory / name, missing_ok=True)
                continue
            message = self._scan_legacy_one(stem)
            if message is not None:
                pending.append((stem, self._submit(functools.partial(_restage, message))))
        for _, future in pending:
            future.result()
        for stem, _ in pending:
            self._drop_legacy([stem])
        self._fsync_directory(self._directory)
        if pending:
            logger.info("spool: %d message(s) moved from the old layout", len(pending))

    def _drop_legacy(self, queue_ids: list[str]) -> None:
        for queue_id in queue_ids:
            # The record first: a state file alone is an orphan, a record alone a message.
            self._unlink(self._record_path(queue_id), missing_ok=True)
            self._unlink(self._state_path(queue_id), missing_ok=True)

    def _scan_legacy_one(self, queue_id: str) -> SpooledMessage | None:
        record = self._record_path(queue_id)
        state = self._state_path(queue_id)
        try:
            return self._load_legacy(queue_id)
        except MessageNotFoundError:
            return None
        except SpoolCorruptError as e:
            if e.path == state:
                logger.error("spool: %s; its recipients fall back to PENDING", e)
                self._quarantine(state.name, e.reason)
                return self._load_legacy(queue_id)
            logger.error("spool: %s", e)
            self._quarantine(record.name, e.reason)
            if state.exists():
                self._quarantine(state.name, "its record is corrupt")
            return None

    def _legacy_envelopes(self, names: list[str], indexed: set[str]) -> list[SpooledMessage]:
        """Old-layout messages, envelope and states only (the body is never read here)."""
        messages = []
        for name in names:
            stem, _, suffix = name.rpartition(".")
            if f".{suffix}" != _RECORD_SUFFIX or not is_queue_id(stem) or stem in indexed:
                continue
            try:
                messages.append(self._legacy_envelope(stem))
            except (MessageNotFoundError, SpoolCorruptError, OSError) as e:
                logger.info("spool: skipping %s while reading: %s", name, e)
        return messages

    def _load_legacy(self, queue_id: str) -> SpooledMessage:
        path = self._record_path(queue_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MessageNotFoundError(queue_id) from None
        message = _parse_record(path, queue_id, data)
        states = self._read_state_file(queue_id, message.recipients)
        return message if states is None else replace(message, recipients=states)

    def _legacy_envelope(self, queue_id: str) -> SpooledMessage:
        path = self._record_path(queue_id)
        try:
            with path.open("rb") as f:
                head = f.readline(len(_RECORD_MAGIC) + 1) + f.readline(_MAX_HEADER_LINE)
                _, envelope_length, _ = _parse_record_header(path, head)
                envelope = _parse_envelope(path, queue_id, f.read(envelope_length))
        except FileNotFoundError:
            raise MessageNotFoundError(queue_id) from None
        states = self._read_state_file(queue_id, envelope.recipients)
        return envelope if states is None else replace(envelope, recipients=states)

    def _read_state_file(
        self, queue_id: str, initial: tuple[RecipientState, ...]
    ) -> tuple[RecipientState, ...] | None:
        path = self._state_path(queue_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return _parse_state(path, queue_id, data, initial)

    # --- Files ------------------------------------------------------------------------

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

    def _record_path(self, queue_id: str) -> Path:
        return self._directory / f"{queue_id}{_RECORD_SUFFIX}"

    def _state_path(self, queue_id: str) -> Path:
        return self._directory / f"{queue_id}{_STATE_SUFFIX}"

    def _next_received_us(self) -> int:
        # Strictly increasing within a process, so ids sort in acceptance order even
        # when two messages arrive in the same microsecond or the clock steps back.
        with self._mutex:
            now = max(time.time_ns() // 1000, self._last_received_us + 1)
            self._last_received_us = now
            return now


def _restage(message: SpooledMessage, staging: _Staging) -> None:
    """Write an old-layout message into a segment (unless an interrupted move already did)."""
    if staging.knows(message.queue_id):
        return
    staging.add(Kind.MESSAGE, _dump_json(_envelope_to_json(message)), message.body)
    staging.set(message.queue_id, message.recipients)


def _merged_states(
    queue_id: str,
    current: tuple[RecipientState, ...],
    states: Sequence[RecipientState],
    *,
    keep_marks: bool = False,
) -> tuple[RecipientState, ...]:
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
        by_address[state.address] = _with_marks(state, previous) if keep_marks else state
    return tuple(by_address[state.address] for state in current)


def _state_payload(queue_id: str, states: tuple[RecipientState, ...]) -> bytes:
    return _dump_json({"queue_id": queue_id, "recipients": [_state_to_json(s) for s in states]})


def _body_digest(head: bytes) -> bytes:
    start = len(segments.MAGIC) + 13
    return head[start : start + 32]


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    views = [memoryview(chunk) for chunk in chunks if chunk]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


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


def _with_marks(state: RecipientState, previous: RecipientState) -> RecipientState:
    if (state.held, state.bounce_requested) == (previous.held, previous.bounce_requested):
        return state
    marked = replace(state, held=previous.held, bounce_requested=previous.bounce_requested)
    if previous.bounce_requested and not state.status.is_final:
        marked = replace(marked, next_attempt=None)  # the bounce is due now, not at the backoff
    return marked


def _state_to_json(state: RecipientState) -> dict[str, Any]:
    return {
        "address": state.address,
        "status": state.status.value,
        "attempts": state.attempts,
        "next_attempt": None if state.next_attempt is None else state.next_attempt.isoformat(),
        "last_reply_code": state.last_reply_code,
        "last_reply_text": state.last_reply_text,
        "delay_notified": state.delay_notified,
        # Optional, so that states without them still load (and look the same).
        **({"held": True} if state.held else {}),
        **({"bounce_requested": True} if state.bounce_requested else {}),
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
    return _parse_state_payload(path, queue_id, payload, initial)


def _parse_state_payload(
    path: Path, queue_id: str, payload: bytes, initial: tuple[RecipientState, ...]
) -> tuple[RecipientState, ...]:
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
        held=raw.get("held", False) is True,
        bounce_requested=raw.get("bounce_requested", False) is True,
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
