"""Connection and error floods against a `mailflow relay` process with few descriptors.

Issue 12, point 5: 300 idle connections from 15 addresses exhausted a 256-descriptor limit;
the normal client timed out and the accept loop wrote 18-24 MB of tracebacks in 19 s.
Here the relay runs as a child process under ``prlimit --nofile=128``:

* with the default cap (half the limit: 64 sessions, 48 of them for addresses outside
  accept_from) a flood of idle connections from seven foreign addresses gets 421 beyond
  its share, and the relay's own mail host (127.0.0.1) still delivers a message;
* with a cap set above the limit on purpose, accept() fails with EMFILE; that is logged
  a few times in all, never with a traceback, and the relay serves again once the flood
  is gone.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import SmtpSink, require
from relayproc import RelayProcess, connector
from smtpraw import raw_connection
from support import run

NOFILE = 128
FLOOD_SOURCES = [f"127.0.0.{n}" for n in range(2, 9)]  # 7 addresses x 20 per client


class LimitedRelay(RelayProcess):
    """`mailflow relay` started under prlimit with a low RLIMIT_NOFILE."""

    def __init__(self, folder: Path, manifests: str, *extra: str) -> None:
        super().__init__(folder, manifests, *extra)
        self.command = [require("prlimit"), f"--nofile={NOFILE}:{NOFILE}", "--", *self.command]


@contextlib.contextmanager
def flood(port: int, sources: list[str], per_source: int) -> Iterator[list[bytes]]:
    """Idle connections held open; yields the first bytes each one received."""
    sockets: list[socket.socket] = []
    greetings: list[bytes] = []
    try:
        for source in sources:
            for _ in range(per_source):
                try:
                    sock = socket.create_connection(
                        ("127.0.0.1", port), timeout=2, source_address=(source, 0)
                    )
                except OSError:
                    greetings.append(b"")
                    continue
                sockets.append(sock)
                # An accept() that failed leaves the connection in the backlog, unanswered.
                sock.settimeout(0.2)
                try:
                    greetings.append(sock.recv(200))
                except OSError:
                    greetings.append(b"")
        yield greetings
    finally:
        for sock in sockets:
            sock.close()


def _deliver_one(port: int, subject: bytes) -> int:
    async def scenario() -> int:
        async with raw_connection(port) as client:
            await client.transaction()
            code, _ = await client.command(b"Subject: " + subject + b"\r\n\r\nhello\r\n.")
            return code

    return run(scenario)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    require("smtp-sink")
    with SmtpSink() as running:
        yield running


@pytest.mark.slow
def test_a_flood_of_idle_connections_leaves_room_for_the_relays_own_mail_hosts(
    tmp_path: Path, sink: SmtpSink
) -> None:
    manifests = connector("all", '["*"]', sink.port)
    with LimitedRelay(tmp_path, manifests, "--accept-from", "127.0.0.1/32") as relay:
        with flood(relay.port, FLOOD_SOURCES, 20) as greetings:
            admitted = sum(g.startswith(b"220 ") for g in greetings)
            refused = sum(g.startswith(b"421 4.7.0") for g in greetings)
            assert (admitted, refused) == (48, 140 - 48), greetings
            assert _deliver_one(relay.port, b"during the flood") == 250
            sink.wait_for(1, timeout=30)
        assert relay.process is not None
        assert relay.process.poll() is None
        log = relay.output()
    assert "Traceback" not in log
    assert log.count("max_connections=64") <= 3  # once per 10 s, not once per refusal


@pytest.mark.slow
def test_accept_errors_under_descriptor_exhaustion_are_logged_once_per_interval(
    tmp_path: Path, sink: SmtpSink
) -> None:
    manifests = connector("all", '["*"]', sink.port)
    with LimitedRelay(
        tmp_path,
        manifests,
        "--accept-from",
        "127.0.0.1/32",
        "--max-connections",
        "1000",  # deliberately above the descriptor limit
        "--max-connections-per-client",
        "1000",
    ) as relay:
        started = time.monotonic()
        with flood(relay.port, ["127.0.0.2"], 200):
            time.sleep(3)  # asyncio retries accept() once a second meanwhile
        flooded = time.monotonic() - started
        assert relay.process is not None
        assert relay.process.poll() is None
        # Descriptors come back as the flood's sessions end; then mail flows again.
        deadline = time.monotonic() + 20
        code = 0
        while time.monotonic() < deadline:
            try:
                code = _deliver_one(relay.port, b"after the flood")
                break
            except (AssertionError, OSError, TimeoutError):
                time.sleep(0.5)
        assert code == 250
        sink.wait_for(1, timeout=30)
        log = relay.output()
    assert "cannot accept connections: [Errno 24] Too many open files" in log
    # asyncio retried accept() about once a second: one line per 10 s says it all.
    lines = log.count("cannot accept connections")
    assert 1 <= lines <= flooded / 10 + 2, (lines, flooded)
    assert "Traceback" not in log, log[-3000:]
