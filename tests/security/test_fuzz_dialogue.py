"""A hypothesis-driven SMTP dialogue fuzzer against a `mailflow relay` process.

Random commands (valid, malformed, unknown), random bytes (NUL, bare CR, 8-bit, control
characters), random lengths (up to several times the line limits), DATA with random
content, and disconnects at random points. For every dialogue:

* the relay never crashes (the process is alive, and a fresh session gets 220 and 250);
* it never hangs (every reply within ``REPLY_TIMEOUT``);
* every reply line is a valid 3-digit code (2xx-5xx) followed by a space or a hyphen;
* its memory levels off: the resident size over the second half of the run grows by less
  than ``RSS_GROWTH_LIMIT``.

``make test`` runs about 30 s of it; ``make soak`` runs it for minutes and prints a summary.
The relay runs with ``--error-sleep 0.01``: the error limits are exercised, their delays
would only slow the fuzzer down.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peers import SmtpSink, require
from relayproc import RelayProcess, connector

REPLY_TIMEOUT = 10.0
RSS_GROWTH_LIMIT = 16 * 1024 * 1024
REPLY_LINE = re.compile(rb"^[2-5][0-5][0-9][ -]")

VERBS = [
    b"EHLO",
    b"HELO",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY",
    b"EXPN",
    b"HELP",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"BDAT",
    b"XCLIENT",
    b"ETRN",
    b"",
]
ADDRESSES = [
    b"<a@sender.test>",
    b"<bob@dest.test>",
    b"<>",
    b"<victim@elsewhere.example>",
    b"<a%b@relay.test>",
    b"<@x:y@z>",
    b'<"q"@dest.test>',
]

# No LF inside a generated line: each line sent must get exactly one reply.
line_bytes = st.binary(max_size=3000).map(lambda b: b.replace(b"\n", b" "))
command = st.one_of(
    st.tuples(st.sampled_from(VERBS), st.sampled_from(ADDRESSES)).map(lambda t: t[0] + t[1]),
    st.tuples(st.sampled_from(VERBS), line_bytes).map(lambda t: t[0] + b" " + t[1]),
    line_bytes,
    st.just(b"DATA"),
)
content_line = st.one_of(
    st.binary(max_size=1200),
    st.sampled_from([b".", b"..", b"\x00.", b".\x00", b"\r.", b"\n.\n", b"Subject: x"]),
)
step = st.one_of(
    command.map(lambda c: ("command", c)),
    st.lists(content_line, max_size=20).map(lambda lines: ("data", lines)),
    st.just(("disconnect", b"")),
)
dialogue = st.lists(step, min_size=1, max_size=25)


@dataclass
class Totals:
    dialogues: int = 0
    commands: int = 0
    disconnects: int = 0
    closed_by_relay: int = 0
    rss: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class Session:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        self.buffer = b""

    def reply(self) -> int | None:
        """One whole reply's code; None when the relay closed the connection."""
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)  # times out after REPLY_TIMEOUT: a hang
                if not chunk:
                    return None
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            assert REPLY_LINE.match(line), f"not a valid reply line: {line[:200]!r}"
            if line[3:4] == b" ":
                return int(line[:3])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _play(port: int, steps: list[tuple[str, object]], totals: Totals) -> None:
    session = Session(port)
    try:
        _dialogue(session, steps, totals)
    except (ConnectionResetError, BrokenPipeError):
        # The relay closed while we were still sending (after 421, or aiosmtpd's "502 Too
        # many unrecognized commands"): a reset, not a crash — _alive() checks that.
        totals.closed_by_relay += 1
    finally:
        session.close()


def _dialogue(session: Session, steps: list[tuple[str, object]], totals: Totals) -> None:
    assert session.reply() == 220
    for kind, value in steps:
        if kind == "disconnect":
            totals.disconnects += 1
            return
        if kind == "data":
            assert isinstance(value, list)
            session.send(b"".join(line + b"\r\n" for line in value) + b".\r\n")
            continue  # outside DATA these are commands too: replies are drained below
        assert isinstance(value, bytes)
        totals.commands += 1
        session.send(value + b"\r\n")
        code = session.reply()
        if code is None or code == 421:
            totals.closed_by_relay += 1
            return
        if value.upper().startswith(b"STARTTLS") and code == 220:
            return  # the rest would be a TLS handshake
    session.send(b"QUIT\r\n")
    # Whatever replies are still due (data lines sent as commands), then 221 or close.
    while (code := session.reply()) not in (None, 221, 421):
        pass


def _alive(relay: RelayProcess) -> None:
    assert relay.process is not None
    assert relay.process.poll() is None, relay.output()[-3000:]
    session = Session(relay.port)
    try:
        assert session.reply() == 220
        session.send(b"NOOP\r\n")
        assert session.reply() == 250
    finally:
        session.close()


@pytest.fixture(scope="module")
def fuzzed_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    require("smtp-sink")
    folder = tmp_path_factory.mktemp("fuzzed-relay")
    with (
        SmtpSink() as sink,
        RelayProcess(
            folder,
            connector("all", '["*"]', sink.port),
            "--accept-from",
            "127.0.0.1/32",
            "--error-sleep",
            "0.01",
            "--log-level",
            "WARNING",
        ) as relay,
    ):
        yield relay


def _fuzz(relay: RelayProcess, examples: int, label: str) -> Totals:
    totals = Totals()
    assert relay.process is not None
    pid = relay.process.pid

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(dialogue)
    def one(steps: list[tuple[str, object]]) -> None:
        _play(relay.port, steps, totals)
        totals.dialogues += 1
        totals.rss.append(_rss(pid))

    one()
    _alive(relay)
    half = totals.rss[len(totals.rss) // 2]
    growth = max(totals.rss[len(totals.rss) // 2 :]) - half
    print(
        f"\n{label}: {totals.dialogues} dialogues, {totals.commands} commands, "
        f"{totals.disconnects} client disconnects, {totals.closed_by_relay} closed by the relay, "
        f"RSS {totals.rss[0] / 2**20:.1f} -> {totals.rss[-1] / 2**20:.1f} MiB "
        f"(second half +{growth / 2**20:.1f} MiB), {time.monotonic() - totals.started:.0f} s"
    )
    assert growth < RSS_GROWTH_LIMIT, totals.rss[::10]
    assert "Traceback" not in relay.output()
    return totals


@pytest.mark.slow
def test_random_dialogues_never_crash_or_hang_the_relay_and_get_valid_codes(
    fuzzed_relay: RelayProcess,
) -> None:
    totals = _fuzz(fuzzed_relay, examples=1000, label="fuzz")
    assert totals.dialogues >= 1000


@pytest.mark.soak
def test_soak_random_dialogues_for_minutes(fuzzed_relay: RelayProcess) -> None:
    totals = _fuzz(fuzzed_relay, examples=10000, label="fuzz soak")
    assert totals.dialogues >= 10000
