"""Helpers for the fault suites: a relay in the test's loop, a small real file system, a
next hop that misbehaves on purpose, and a one-line summary per suite.

Everything binds 127.0.0.1; every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import os
import re
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import (
    Connector,
    Destination,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from peers import INSTALL_HINT, tool_path

__all__ = [
    "FaultyHop",
    "SmallFilesystem",
    "connector",
    "document",
    "fill",
    "metric",
    "need",
    "need_tool",
    "relay_settings",
    "running",
    "send",
    "summary",
]


def need(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false; with ``CI=true`` fail instead (a CI run that
    quietly skipped a fault suite would prove nothing)."""
    if condition:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def need_tool(tool: str) -> str:
    """The path of ``tool`` (Debian's nsd, Postfix's smtp-sink); skipped without it, and
    a failure with ``CI=true``."""
    path = tool_path(tool)
    need(path is not None, f"{tool} is not installed: {INSTALL_HINT}")
    assert path is not None
    return path


def connector(
    name: str,
    domains: list[str],
    port: int,
    *,
    generation: int = 1,
    destination: Destination | None = None,
) -> Connector:
    return Connector(
        ref=ObjectRef("mail", name),
        generation=generation,
        created="",
        enabled=True,
        recipient_patterns=tuple(DomainPattern.parse(d) for d in domains),
        sender_patterns=(),
        destination=destination or SmartHost("127.0.0.1", port),
        tls=TlsPolicy(),
    )


def document(*connectors: Connector, generation: int = 1) -> RoutingDocument:
    return RoutingDocument(generation=generation, connectors=connectors)


def relay_settings(spool: Path, **overrides: Any) -> RelaySettings:
    base = RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1",
            port=0,
            hostname="relay.test",
            accept_from=(ipaddress.ip_network("127.0.0.0/8"),),
        ),
        spool_dir=spool,
        delivery=DeliverySettings(helo_name="relay.test", connect_timeout=2, command_timeout=5),
        retry_initial=0.2,
        retry_max=1.0,
        scheduler_tick=0.05,
        drain_grace=3.0,
        spool_threads=8,
    )
    return replace(base, **overrides)


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(relay.run(), name="test-relay")
    await relay.ready.wait()
    try:
        yield relay
    finally:
        relay.stop()
        await task


async def send(
    port: int,
    recipients: list[str],
    *,
    sender: str = "alice@sender.test",
    message_id: str = "hi",
) -> None:
    """One message through the relay; raises aiosmtplib's error when it is refused."""
    body = (
        f"From: {sender}\r\nSubject: fault\r\nMessage-ID: <{message_id}@sender.test>\r\n"
        "\r\nhello\r\n"
    )
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=10
    ) as smtp:
        await smtp.sendmail(sender, recipients, body.encode())


def metric(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def summary(suite: str, **figures: object) -> str:
    """The one line each reliability suite prints (``make soak`` shows them)."""
    line = f"SUMMARY {suite}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    print(line, flush=True)
    return line


class SmallFilesystem:
    """A size-limited tmpfs mounted in a temporary folder for the test (root only), and
    unmounted at the end: a real file system that really fills up (ENOSPC)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.path = Path()

    def __enter__(self) -> SmallFilesystem:
        need(os.geteuid() == 0, "mounting a small tmpfs for the spool needs root")
        self._tmp = tempfile.TemporaryDirectory(prefix="mailflow-smallfs-")
        self.path = Path(self._tmp.name)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            self._tmp.cleanup()
            need(False, f"cannot mount a tmpfs: {result.stderr.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.path)], capture_output=True, timeout=30, check=False)
        if self._tmp is not None:
            self._tmp.cleanup()

    def free(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize


def fill(path: Path, *, leave: int = 0) -> int:
    """Write ``path`` until the file system has at most ``leave`` bytes free; its size."""
    written = 0
    chunk = b"\0" * 65536
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(100_000):  # bounded: 6 GiB at most
            stats = os.statvfs(path.parent)
            free = stats.f_bavail * stats.f_frsize
            if free <= leave:
                break
            try:
                written += os.write(fd, chunk[: min(len(chunk), free - leave)])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return written


MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.IGNORECASE | re.MULTILINE)


@dataclass
class FaultyHop:
    """A raw-socket next hop on 127.0.0.1 whose behaviour the test changes while it runs.

    ``mode``: ``ok`` (a correct server), ``421`` (421 to the greeting and every command),
    ``rcpt-451`` (every RCPT 451), ``drop-mid-data`` (reads part of the content, then
    closes), ``data-250`` (250 to DATA instead of 354), ``silent`` (greets, then never
    answers). ``delay`` is waited before every reply (a slow server). Each message that
    got a 250 after its content is counted by its Message-ID, with the time it was taken.
    """

    mode: str = "ok"
    delay: float = 0.0
    delivered: collections.Counter[str] = field(default_factory=collections.Counter)
    taken_at: dict[str, list[float]] = field(default_factory=dict)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> FaultyHop:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _reply(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        writer.write(line)
        await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._dialogue(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "421":
            await self._reply(writer, b"421 4.3.2 service not available\r\n")
            return
        await self._reply(writer, b"220 hop.test ESMTP\r\n")
        while line := await asyncio.wait_for(reader.readline(), 30):
            verb = line[:4].upper()
            if self.mode == "silent":
                continue
            if self.mode == "421":
                await self._reply(writer, b"421 4.3.2 going away\r\n")
                return
            if verb in (b"EHLO", b"HELO"):
                await self._reply(writer, b"250-hop.test\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT" and self.mode == "rcpt-451":
                await self._reply(writer, b"451 4.3.0 try again later\r\n")
            elif verb == b"DATA" and self.mode == "data-250":
                await self._reply(writer, b"250 2.0.0 ok\r\n")
            elif verb == b"DATA":
                await self._reply(writer, b"354 go ahead\r\n")
                if not await self._content(reader, writer):
                    return
            elif verb == b"QUIT":
                await self._reply(writer, b"221 bye\r\n")
                return
            else:
                await self._reply(writer, b"250 2.0.0 ok\r\n")

    async def _content(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        content = bytearray()
        dropping = self.mode == "drop-mid-data"
        for _ in range(100_000):
            chunk = await asyncio.wait_for(reader.readline(), 30)
            if chunk in (b".\r\n", b""):
                break
            content += chunk
            if dropping and len(content) > 20:
                writer.transport.abort()  # half a message, then the line goes dead
                return False
        match = MESSAGE_ID.search(bytes(content))
        # The local part: the test's own number for the message (send(message_id=...)).
        key = match[1].decode().partition("@")[0] if match else "(no Message-ID)"
        self.delivered[key] += 1
        self.taken_at.setdefault(key, []).append(time.monotonic())
        await self._reply(writer, b"250 2.0.0 queued\r\n")
        return True
