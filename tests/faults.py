"""Helpers for the fault suites: a relay in the test's loop, a small real file system, a
next hop that misbehaves on purpose, and a one-line summary per suite.

Everything binds 127.0.0.1; every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
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

__all__ = [
    "SmallFilesystem",
    "connector",
    "document",
    "fill",
    "metric",
    "need",
    "relay_settings",
    "running",
    "send",
    "summary",
]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def need(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false; with ``CI=true`` fail instead (a CI run that
    quietly skipped a fault suite would prove nothing)."""
    if condition:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


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
