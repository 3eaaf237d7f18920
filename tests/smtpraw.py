"""An abusive SMTP client on raw sockets, and a listener to aim it at.

The security and inbound suites share these: ``serving`` runs a real :class:`SmtpListener`
on 127.0.0.1 port 0; ``RawClient`` sends exactly the bytes it is given (smuggled ends of
data, NUL, control characters, floods) and reads replies with a bounded wait; ``Inbox``
records what the listener hands over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

from mailflow_relay.inbound.listener import (
    AcceptedMessage,
    EventCallback,
    ListenerEvent,
    ListenerSettings,
    RecipientCheck,
    SmtpListener,
)

__all__ = [
    "BASE",
    "IO_TIMEOUT",
    "Events",
    "Inbox",
    "RawClient",
    "raw_connection",
    "serving",
    "settings",
]

IO_TIMEOUT = 5.0
LOOPBACK_ONLY = ipaddress.ip_network("127.0.0.1/32")
BASE = ListenerSettings(
    host="127.0.0.1",
    port=0,
    hostname="relay.test",
    accept_from=(LOOPBACK_ONLY,),
    command_timeout=10.0,
    data_timeout=10.0,
)


def settings(**overrides: Any) -> ListenerSettings:
    return dataclasses.replace(BASE, **overrides)


class Inbox:
    """The on_message callback: records every message it is handed."""

    def __init__(self) -> None:
        self.messages: list[AcceptedMessage] = []

    async def __call__(self, message: AcceptedMessage) -> str:
        self.messages.append(message)
        return f"Q{len(self.messages):04d}"


class Events:
    """The on_event callback: counts what the listener reports."""

    def __init__(self) -> None:
        self.seen: list[ListenerEvent] = []

    def __call__(self, event: ListenerEvent) -> None:
        self.seen.append(event)

    def count(self, event: ListenerEvent) -> int:
        return self.seen.count(event)


@contextlib.asynccontextmanager
async def serving(
    config: ListenerSettings,
    inbox: Inbox | None = None,
    check: RecipientCheck | None = None,
    events: EventCallback | None = None,
) -> AsyncIterator[SmtpListener]:
    listener = SmtpListener(config, inbox or Inbox(), check, on_event=events)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop(grace=2.0)


class RawClient:
    """An SMTP client that sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self, within: float = IO_TIMEOUT) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its lines' text joined by newlines."""
        lines = []
        async with asyncio.timeout(within):
            while True:
                line = await self.reader.readline()
                assert line.endswith(b"\r\n"), f"connection closed mid-reply: {line!r}"
                lines.append(line[4:-2].decode())
                if line[3:4] == b" ":
                    return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(IO_TIMEOUT):
            await self.writer.drain()

    async def command(self, line: bytes, within: float = IO_TIMEOUT) -> tuple[int, str]:
        await self.send(line + b"\r\n")
        return await self.reply(within)

    async def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        async with asyncio.timeout(IO_TIMEOUT):
            return await self.reader.read()

    async def transaction(self, rcpts: int = 1) -> None:
        assert (await self.command(b"MAIL FROM:<alice@sender.example>"))[0] == 250
        for n in range(rcpts):
            assert (await self.command(b"RCPT TO:<bob%d@recipient.example>" % n))[0] == 250
        assert (await self.command(b"DATA"))[0] == 354


@contextlib.asynccontextmanager
async def raw_connection(
    port: int, *, ehlo: bool = True, source: str | None = None
) -> AsyncIterator[RawClient]:
    """A raw client on 127.0.0.1:``port``, bound to ``source`` (e.g. 127.0.0.2) if given."""
    async with asyncio.timeout(IO_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0) if source else None
        )
    client = RawClient(reader, writer)
    try:
        code, banner = await client.reply()
        assert code == 220, banner
        if ehlo:
            assert (await client.command(b"EHLO client.test"))[0] == 250
        yield client
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
