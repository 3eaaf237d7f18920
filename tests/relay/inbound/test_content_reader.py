"""The chunked DATA reader (inbound/content.py) against the line-by-line rules it replaces.

An oracle applies the rules one CRLF-ended line at a time (the reader as it was); the
chunked reader gets the same bytes cut at random places, as a socket may deliver them,
and must keep the same content and refuse the same messages.
"""

from __future__ import annotations

import random

from mailflow_relay.inbound.content import ContentReader, line_too_long

MAX_LINE = 40
MAX_SIZE = 400


def oracle(stream: bytes) -> tuple[bytes, str | None, bytes]:
    lines: list[bytes] = []
    size = 0
    refusal: str | None = None
    position = 0
    while True:
        end = stream.index(b"\r\n", position)
        line = stream[position : end + 2]
        position = end + 2
        if line == b".\r\n":
            return b"".join(lines), refusal, stream[position:]
        if refusal is not None:
            continue
        if b"\r" in line[:-2] or b"\n" in line[:-2] or b"\x00" in line:
            refusal = "smuggling"
        else:
            if line.startswith(b"."):
                line = line[1:]
            if len(line) > MAX_LINE:
                refusal = line_too_long(MAX_LINE)
            else:
                size += len(line)
                if size > MAX_SIZE:
                    refusal = "size"
                else:
                    lines.append(line)
                    continue
        lines.clear()


def chunked(stream: bytes, rng: random.Random) -> tuple[bytes, str | None, bytes]:
    """Feed as the session does: readuntil(b".\\r\\n") returns at the first one, or (its
    buffer full) a part that never ends inside one."""
    reader = ContentReader(MAX_SIZE, MAX_LINE)
    position = 0
    while True:
        found = stream.find(b".\r\n", position)
        cut = position + rng.randint(1, 60)
        end = found + 3 if 0 <= found < cut else min(cut, len(stream))
        done = reader.feed(stream[position:end])
        position = end
        if done:
            return reader.content, reader.refusal, stream[position:]


def kind(refusal: str | None) -> str | None:
    if refusal is None:
        return None
    if "smuggling" in refusal:
        return "smuggling"
    if refusal.startswith("552") or refusal == "size":
        return "size"
    return refusal


PIECES = [
    b"a",
    b"hello world",
    b".",
    b"..",
    b"\r\n",
    b"\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b"x" * 45,
    b"\xc3\xa9",
]


def test_the_chunked_reader_keeps_and_refuses_what_the_line_reader_did() -> None:
    rng = random.Random(16)
    for _ in range(3000):
        body = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))
        stream = body + (b"" if body.endswith(b"\r\n") or not body else b"\r\n") + b".\r\nNEXT\r\n"
        if body == b"":
            stream = b".\r\nNEXT\r\n"
        expected, expected_refusal, expected_left = oracle(stream)
        content, refusal, left = chunked(stream, rng)
        assert left == expected_left, stream  # nothing pipelined after the end is consumed
        assert content == expected, stream
        lines = stream.split(b"\r\n")
        if all(len(line) + 2 <= MAX_LINE for line in lines):
            assert kind(refusal) == kind(expected_refusal), stream
        else:
            assert (refusal is None) == (expected_refusal is None), stream


def test_an_overlong_line_is_refused_without_being_kept_and_its_tail_is_not_the_end() -> None:
    reader = ContentReader(MAX_SIZE, MAX_LINE)
    assert not reader.feed(b"ok\r\n" + b"y" * 100)
    assert not reader.feed(b"y" * 100 + b"\r")
    assert not reader.feed(b"\n.")  # the overlong line ends here; "." starts a new line
    assert not reader.feed(b"x\r\n")
    assert reader.feed(b".\r\n")
    assert reader.refusal == line_too_long(MAX_LINE)
    assert reader.content == b""
