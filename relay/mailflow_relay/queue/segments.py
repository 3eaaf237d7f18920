"""The spool's segment files: append-only logs of checksummed records.

The format and the reading of one segment only; what the records mean, when they are
written and why every crash point is safe is the essay at the top of :mod:`.spool`.

A record is a fixed head, a metadata payload (canonical JSON) and a body::

    magic     8 bytes   b"MFSPOOL\\x01"
    kind      1 byte    M message, S states, R removal (tombstone), E end of segment
    meta      4 bytes   big-endian length of the JSON
    body      8 bytes   big-endian length of the body
    body hash 32 bytes  SHA-256 of the body
    head hash 32 bytes  SHA-256 of kind, both lengths, the body hash and the JSON

The head hash makes the head and the envelope trustworthy without reading the body, so a
scan reads a few hundred bytes per message however large it is. The body hash is checked
whenever a body is read, and for every record of a segment that was not closed by an ``E``
record (the only segments a crash can have left half-written).
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

__all__ = [
    "HEAD_SIZE",
    "MAGIC",
    "Damage",
    "Kind",
    "Record",
    "body_digest_matches",
    "encode",
    "read_body",
    "read_records",
]

MAGIC: Final = b"MFSPOOL\x01"
_FIELDS: Final = struct.Struct(">cIQ")
_HEAD: Final = struct.Struct(">8s13s32s32s")
HEAD_SIZE: Final = _HEAD.size
# An envelope is a few kilobytes; anything near this is damage, not a record.
_MAX_META: Final = 16 * 1024 * 1024
_CHUNK: Final = 1024 * 1024


class Kind(enum.Enum):
    MESSAGE = b"M"
    STATE = b"S"
    REMOVE = b"R"
    END = b"E"


@dataclass(frozen=True)
class Record:
    """One record whose head hash matched (its body is checked separately)."""

    kind: Kind
    offset: int
    meta: bytes
    body_offset: int
    body_length: int
    body_digest: bytes

    @property
    def end(self) -> int:
        return self.body_offset + self.body_length


@dataclass(frozen=True)
class Damage:
    """Bytes that are no record: ``start`` to ``end``; ``tail`` when nothing valid follows."""

    start: int
    end: int
    tail: bool


def encode(kind: Kind, meta: bytes, body: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """The chunks of one record, ready for one ``writev``."""
    body_digest = hashlib.sha256(body).digest()
    fields = _FIELDS.pack(kind.value, len(meta), len(body))
    head_digest = hashlib.sha256(fields + body_digest + meta).digest()
    return _HEAD.pack(MAGIC, fields, body_digest, head_digest), meta, body


def _record_at(f: BinaryIO, offset: int, size: int) -> Record | None:
    f.seek(offset)
    head = f.read(HEAD_SIZE)
    if len(head) < HEAD_SIZE:
        return None
    magic, fields, body_digest, head_digest = _HEAD.unpack(head)
    if magic != MAGIC:
        return None
    kind_byte, meta_length, body_length = _FIELDS.unpack(fields)
    if meta_length > _MAX_META or offset + HEAD_SIZE + meta_length + body_length > size:
        return None
    meta = f.read(meta_length)
    if hashlib.sha256(fields + body_digest + meta).digest() != head_digest:
        return None
    try:
        kind = Kind(kind_byte)
    except ValueError:
        return None
    body_offset = offset + HEAD_SIZE + meta_length
    return Record(kind, offset, meta, body_offset, body_length, body_digest)


def _next_record(f: BinaryIO, offset: int, size: int) -> Record | None:
    """The first valid record after ``offset`` (a damaged head: resynchronise on the magic)."""
    position = offset + 1
    while position < size:
        f.seek(position)
        chunk = f.read(_CHUNK + len(MAGIC))
        found = chunk.find(MAGIC)
        while found >= 0:
            record = _record_at(f, position + found, size)
            if record is not None:
                return record
            found = chunk.find(MAGIC, found + 1)
        position += _CHUNK
    return None


def read_records(f: BinaryIO, start: int, size: int) -> Iterator[Record | Damage]:
    """Every record from ``start`` to ``size``, and the damaged spans between them."""
    offset = start
    while offset < size:
        record = _record_at(f, offset, size)
        if record is None:
            record = _next_record(f, offset, size)
            if record is None:
                yield Damage(offset, size, tail=True)
                return
            yield Damage(offset, record.offset, tail=False)
        yield record
        offset = record.end


def body_digest_matches(f: BinaryIO, record: Record) -> bool:
    """Whether the body on disk hashes to the head's body hash (read in bounded chunks)."""
    hasher = hashlib.sha256()
    f.seek(record.body_offset)
    left = record.body_length
    while left:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            return False
        hasher.update(chunk)
        left -= len(chunk)
    return hasher.digest() == record.body_digest


def read_body(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` (one ``pread`` for most bodies)."""
    parts = []
    while length:
        part = os.pread(fd, length, offset)
        if not part:
            raise EOFError(f"segment ends {length} bytes before the body does")
        parts.append(part)
        offset += len(part)
        length -= len(part)
    return b"".join(parts)
