"""The load and the far end: Postfix's smtp-source and smtp-sink, and a latency probe.

- :class:`CountingSink` runs ``smtp-sink -c`` on a loopback port without dumping bodies
  (a dump per message would make the sink, not the relay, the bottleneck) and reads its
  running counters to know how many messages it has taken (``"."`` answered ``250``).
- :func:`source_command` builds the ``smtp-source`` command line for a run.
- :class:`LatencyProbe` measures acceptance latency: one extra SMTP session, in a thread of
  the harness, sends messages back to back while smtp-source loads the server, and times
  each from writing ``MAIL FROM`` to reading the ``250`` after the final dot. One
  transaction at a time, no pipelining: each sample is exactly what a client waits for
  before it may forget its copy of a message. smtp-source cannot give per-message times,
  so the probe's samples are the latency figures; its messages count in the totals.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "LOCALHOST",
    "CountingSink",
    "LatencyProbe",
    "free_port",
    "message_body",
    "source_command",
    "tool",
    "wait_for_port",
]

LOCALHOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"]
)


def tool(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = START_TIMEOUT, alive: object = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((LOCALHOST, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"nothing listens on {LOCALHOST}:{port} after {timeout}s"
                ) from None
            time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def parse_counters(text: str) -> int:
    """The last ``mesg=N`` in smtp-sink's ``-c`` output (reports end in CR or LF)."""
    for report in reversed(text.replace("\n", "\r").split("\r")):
        for item in report.split():
            name, _, value = item.partition("=")
            if name == "mesg" and value.isdigit():
                return int(value)
    return 0


class CountingSink:
    """``smtp-sink -c`` on 127.0.0.1:<free port>, counting messages, storing none."""

    def __init__(self, *, backlog: int = 256, extra_args: Sequence[str] = ()) -> None:
        self.backlog = backlog
        self.extra_args = tuple(extra_args)
        """More smtp-sink options (``-p``: no PIPELINING in the EHLO reply)."""
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._counters: Path | None = None

    def start(self) -> None:
        sink = tool("smtp-sink")
        if sink is None:
            raise RuntimeError("smtp-sink (Debian package postfix) is not installed")
        self._tmp = tempfile.TemporaryDirectory(prefix="mailflow-bench-sink-")
        folder = Path(self._tmp.name)
        self._counters = folder / "counters"
        # smtp-sink refuses to run as root without dropping privileges.
        privileges = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.port = free_port()
        with self._counters.open("wb") as out, (folder / "stderr").open("wb") as err:
            self._process = subprocess.Popen(
                [
                    sink,
                    *privileges,
                    "-c",
                    "-4",
                    "-h",
                    "sink.bench.test",
                    *self.extra_args,
                    f"{LOCALHOST}:{self.port}",
                    str(self.backlog),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        wait_for_port(self.port)

    def received(self) -> int:
        assert self._counters is not None, "the sink is not running"
        return parse_counters(self._counters.read_bytes().decode(errors="replace"))

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def source_command(
    port: int, *, messages: int, size: int, sessions: int, reuse: bool, smtp_source: str
) -> list[str]:
    """smtp-source: ``messages`` of ``size`` bytes over ``sessions`` parallel sessions;
    ``reuse`` (-d) keeps each session open for its next message instead of reconnecting."""
    command = [smtp_source, "-m", str(messages), "-l", str(size), "-s", str(sessions)]
    command += ["-f", "source@source.bench.test", "-t", "rcpt@sink.bench.test"]
    command += ["-M", "source.bench.test"]
    if reuse:
        command.append("-d")
    return [*command, f"inet:{LOCALHOST}:{port}"]


def message_body(size: int) -> bytes:
    """A message of about ``size`` bytes: a few headers and 78-character lines."""
    header = (
        b"From: <probe@source.bench.test>\r\nTo: <rcpt@sink.bench.test>\r\n"
        b"Subject: latency probe\r\nMessage-ID: <probe@source.bench.test>\r\n\r\n"
    )
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(header)) // len(line))
    return header + line * lines


@dataclass
class LatencyProbe:
    """Sends messages back to back in one session and times each transaction (see above)."""

    port: int
    size: int
    max_messages: int = 2000
    timeout: float = 30.0
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-latency-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)

    @property
    def sent(self) -> int:
        return len(self.samples)

    def _run(self) -> None:
        body = message_body(self.size) + b".\r\n"
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=self.timeout) as sock:
                replies = sock.makefile("rb")

                def reply() -> bytes:
                    while True:
                        line = replies.readline(1024)
                        if not line:
                            raise ConnectionError("connection closed")
                        if line[3:4] != b"-":
                            return line

                def expect(prefix: bytes, line: bytes) -> None:
                    if not line.startswith(prefix):
                        raise ConnectionError(f"unexpected reply {line!r}")

                expect(b"220", reply())
                sock.sendall(b"EHLO probe.bench.test\r\n")
                expect(b"250", reply())
                while not self._stop.is_set() and len(self.samples) < self.max_messages:
                    started = time.perf_counter()
                    sock.sendall(b"MAIL FROM:<probe@source.bench.test>\r\n")
                    expect(b"250", reply())
                    sock.sendall(b"RCPT TO:<rcpt@sink.bench.test>\r\n")
                    expect(b"250", reply())
                    sock.sendall(b"DATA\r\n")
                    expect(b"354", reply())
                    sock.sendall(body)
                    expect(b"250", reply())
                    self.samples.append(time.perf_counter() - started)
                with contextlib.suppress(OSError):
                    sock.sendall(b"QUIT\r\n")
                    reply()
        except (OSError, ConnectionError) as e:
            self.errors.append(str(e))
