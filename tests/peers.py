"""Real SMTP and DNS peers for the tests on real sockets, from Debian's packages.

- `DnsServer`: NSD, an authoritative DNS server, serving zones given as records.
- `UnresponsiveDnsServer`: a loopback port that takes DNS queries and never answers (timeouts).
- `SmtpSink`: Postfix's `smtp-sink`, an SMTP server that dumps every message it accepts.
- `smtp_source()`: Postfix's `smtp-source`, a parallel SMTP client.
- `swaks()`: the Swiss Army Knife for SMTP, a scriptable client.

`scripts/install-debian-packages.sh` (run by `make test` as root) installs them; a test that
needs a missing one calls `require()` and is skipped with the reason. Every server binds
127.0.0.1 on a free port, keeps its files in its own temporary folder, runs in the foreground
as a child process and is stopped (terminate, wait, kill) when its `with` block ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

LOCALHOST = "127.0.0.1"
# Bounds on everything that waits, so that a broken peer fails a test instead of hanging it.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
CLIENT_TIMEOUT = 30.0

INSTALL_HINT = "run `make test` as root (or scripts/install-debian-packages.sh) to install it"
# Where each tool lives; the sbin folders are often missing from a non-root PATH.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"]
)
_PACKAGES = {
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "swaks": "swaks",
    "nsd": "nsd",
    "promtool": "prometheus",
    "nmap": "nmap",
    "testssl": "testssl.sh",
    "ldns-keygen": "ldnsutils",
    "ldns-signzone": "ldnsutils",
    "unbound": "unbound",
    "unbound-checkconf": "unbound",
}


def tool_path(tool: str) -> str | None:
    """The absolute path of `tool`, or None when it is not installed."""
    return shutil.which(tool, path=_SEARCH_PATH)


def require(tool: str) -> str:
    """The path of `tool`; skips the calling test (saying why) when it is not installed.

    In CI (``CI=true``) a missing tool fails the test instead: there, `make test` installs
    every tool, so a missing one is a broken install step, not a machine without it.
    """
    path = tool_path(tool)
    if path is None:
        missing(tool, _PACKAGES.get(tool, tool))
    return path


def missing(tool: str, package: str) -> NoReturn:
    """Skip the calling test for want of `tool`; with CI=true, fail it: CI installs every tool."""
    reason = f"{tool} (Debian package {package}) not installed: {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A port on 127.0.0.1 that is free for both TCP and UDP (DNS needs both) right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOCALHOST, 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOCALHOST, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate, wait, then kill the process and whatever it forked (its own session)."""
    if process.poll() is None:
        process.terminate()  # the leader only: NSD then stops its children in order
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
    # NSD forks a server and a transfer daemon: give them a moment to exit on their own,
    # then kill whatever is left of the process group.
    deadline = time.monotonic() + 1.0
    while _group_alive(process.pid):
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies do not count: their parent, or
    init, reaps them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            state, _ppid, group = stat.read_text().rpartition(")")[2].split()[:3]
            if int(group) == pgid and state != "Z":
                return True
    return False


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _check(result: subprocess.CompletedProcess[str], check: bool) -> None:
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(result.args)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )


# --------------------------------------------------------------------------------------- DNS


class _Process:
    """A peer run as a child process with its files in a temporary folder."""

    _process: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process)
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


class DnsServer(_Process):
    """NSD serving `zones` on 127.0.0.1:<free port>, UDP and TCP.

    `zones` maps a zone name to zone-file records relative to it, e.g.
    `{"contoso.test": ["@ MX 10 mx1.contoso.test.", "mx1 A 127.0.0.11"], "nullmx.test": ["@ MX 0 ."]}`;
    the SOA and NS records are added. Each name in `servfail` becomes a zone that answers
    SERVFAIL for every name in it (a secondary zone whose primary is down, so it never has data).

    NSD is authoritative only: it cannot make one name time out. For timeouts, point the
    resolver at an `UnresponsiveDnsServer`. A name delegated to a dead server gives a referral
    (NOERROR, no answer), not a timeout, because NSD does not recurse.
    """

    address = LOCALHOST

    def __init__(
        self,
        zones: Mapping[str, Iterable[str]],
        *,
        servfail: Iterable[str] = (),
        ttl: int = 60,
    ) -> None:
        self.zones = {name.rstrip(".").lower(): list(records) for name, records in zones.items()}
        self.servfail = [name.rstrip(".").lower() for name in servfail]
        self.ttl = ttl
        self.port = 0
        self.folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython stub resolver that asks this server only."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.address]
        resolver.port = self.port
        resolver.timeout = lifetime
        resolver.lifetime = lifetime
        resolver.cache = None
        return resolver

    def _zone_file(self, name: str, records: list[str]) -> str:
        lines = [
            f"$ORIGIN {name}.",
            f"$TTL {self.ttl}",
            f"@ IN SOA localhost. hostmaster.localhost. 1 3600 600 86400 {self.ttl}",
            "@ IN NS localhost.",
            *records,
        ]
        return "\n".join(lines) + "\n"

    def _config(self, folder: Path) -> str:
        dead_primary = free_port()  # nothing listens there: secondary zones never load
        lines = [
            "server:",
            f"    ip-address: {self.address}@{self.port}",
            f"    port: {self.port}",
            "    do-ip4: yes",
            "    do-ip6: no",
            '    username: ""',
            '    chroot: ""',
            f'    zonesdir: "{folder}"',
            '    database: ""',
            f'    zonelistfile: "{folder}/zone.list"',
            f'    xfrdfile: "{folder}/xfrd.state"',
            f'    xfrdir: "{folder}"',
            f'    pidfile: "{folder}/nsd.pid"',
            f'    logfile: "{folder}/nsd.log"',
            "    server-count: 1",
            "    reuseport: no",
            "    hide-version: yes",
            "    verbosity: 1",
            "remote-control:",
            "    control-enable: no",
        ]
        for name in self.zones:
            lines += ["zone:", f"    name: {name}", f'    zonefile: "{name}.zone"']
        for name in self.servfail:
            lines += [
                "zone:",
                f"    name: {name}",
                f'    zonefile: "{name}.secondary"',
                f"    request-xfr: {self.address}@{dead_primary} NOKEY",
            ]
        return "\n".join(lines) + "\n"

    def _answers(self) -> bool:
        """Whether NSD answers with its zones loaded (the first zone's SOA, else any reply)."""
        probe = next(iter(self.zones), ".")
        query = dns.message.make_query(f"{probe}.".replace("..", "."), "SOA")
        try:
            reply = dns.query.udp(query, self.address, port=self.port, timeout=0.2)
        except (dns.exception.Timeout, OSError):
            return False
        return not self.zones or (reply.rcode() == dns.rcode.NOERROR and bool(reply.answer))

    def _check(self, tool: str, *args: str) -> None:
        path = tool_path(tool)
        if path is None:
            return
        check = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
        )
        if check.returncode != 0:
            self.stop()
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{check.stdout}{check.stderr}")

    def start(self) -> None:
        nsd = require("nsd")
        self._tmp = tempfile.TemporaryDirectory(prefix="mailflow-nsd-")
        self.folder = folder = Path(self._tmp.name)
        for name, records in self.zones.items():
            (folder / f"{name}.zone").write_text(self._zone_file(name, records))
        for name in self.zones:  # a clear error for a bad record, instead of a SERVFAIL
            self._check("nsd-checkzone", name, str(folder / f"{name}.zone"))
        for attempt in range(3):  # the free port may be taken between choosing and binding it
            self.port = free_port()
            conf = folder / "nsd.conf"
            conf.write_text(self._config(folder))
            self._check("nsd-checkconf", str(conf))
            log = folder / "nsd.log"
            log.unlink(missing_ok=True)
            with (folder / "nsd.out").open("wb") as output:  # the child keeps its own copy
                self._process = subprocess.Popen(
                    [nsd, "-d", "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    break
                if self._answers():
                    return
                time.sleep(0.05)
            _stop(self._process)
            failure = _tail(folder / "nsd.out") + _tail(log)
            if attempt == 2 or "address already in use" not in failure.lower():
                break
        self.stop()
        raise RuntimeError(f"nsd did not start answering on port {self.port}:\n{failure}")


class UnresponsiveDnsServer:
    """A DNS server address on 127.0.0.1 that reads queries and never answers (UDP and TCP).

    Every query to it times out: the SERVFAIL-or-timeout (temporary failure) case."""

    address = LOCALHOST

    def __init__(self) -> None:
        self.port = 0
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> Self:
        for _ in range(10):
            self.port = free_port()
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((self.address, self.port))
                tcp.bind((self.address, self.port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)  # connections complete in the kernel and are never served
            self._sockets = [udp, tcp]
            return self
        raise RuntimeError("no free port for the unresponsive DNS server")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []


# -------------------------------------------------------------------------------------- SMTP


@dataclass(frozen=True)
class SinkMessage:
    """One mail transaction as smtp-sink dumped it (its lines end in LF, not CRLF)."""

    helo: str | None
    mail_from: str  # the reverse path without <>; "" for the null sender
    mail_args: str  # the whole MAIL FROM argument, with its ESMTP parameters
    recipients: list[str] = field(default_factory=list)  # forward paths without <>
    data: bytes = b""  # header and body as received (dot-unstuffed)
    raw: bytes = b""  # the whole dump file

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def _address(args: str) -> str:
    first = args.split(" ", 1)[0]
    return first.removeprefix("<").removesuffix(">")


def parse_sink_dump(raw: bytes) -> SinkMessage | None:
    """A dump file's transaction, or None while smtp-sink is still writing it."""
    if not raw.endswith(b"\n\n"):
        return None
    lines = raw.split(b"\n")
    helo: str | None = None
    mail_args = ""
    recipients: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index].decode("utf-8", errors="replace")
        index += 1
        name, _, value = line.partition(": ")
        if name == "X-Helo-Args":
            helo = value
        elif name == "X-Mail-Args":
            mail_args = value
        elif name == "X-Rcpt-Args":
            recipients.append(_address(value))
        elif name == "Received":
            # Three lines: "from ...", "\tby host (smtp-sink) with proto id ...;", "\tdate".
            while index < len(lines) and lines[index][:1] in (b"\t", b" "):
                index += 1
            break
        elif name not in ("X-Client-Addr", "X-Client-Proto"):
            return None
    else:
        return None
    data = b"\n".join(lines[index:])[:-1]  # the dump ends the message with an empty line
    return SinkMessage(helo, _address(mail_args), mail_args, recipients, data, raw)


class SmtpSink(_Process):
    """Postfix's smtp-sink on 127.0.0.1:<free port>, dumping each accepted message to a file.

    smtp-sink has no TLS: it never offers STARTTLS (a plaintext-only destination). It offers
    PIPELINING, 8BITMIME, AUTH PLAIN LOGIN (unless `auth=False`; it accepts any credentials),
    XCLIENT, XFORWARD, ENHANCEDSTATUSCODES and DSN; `esmtp=False` makes it answer EHLO with an
    error so that clients fall back to HELO.

    Replies: the commands in `hard_reject` get `hard_reply` (default "500 5.3.0 Error: command
    failed"), those in `soft_reject` get `soft_reply` (default "450 4.3.0 Error: command
    failed"); `disconnect` drops the connection without a reply and `disconnect_421` replies
    421 and drops it. Commands are CONNECT, HELO, EHLO, MAIL, RCPT, DATA, "." (end of data),
    RSET, NOOP, QUIT. Rejecting a command turns PIPELINING off. Rejecting "." happens after
    the message was dumped, so `messages()` still lists it.
    """

    address = LOCALHOST

    def __init__(
        self,
        *,
        hard_reject: Sequence[str] = (),
        soft_reject: Sequence[str] = (),
        hard_reply: str | None = None,
        soft_reply: str | None = None,
        disconnect: Sequence[str] = (),
        disconnect_421: Sequence[str] = (),
        auth: bool = True,
        esmtp: bool = True,
        hostname: str = "smtp-sink.test",
        extra_args: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        """``port``: listen there (a test that must know it in advance); 0 = a free one."""
        self.fixed_port = port
        self.args: list[str] = ["-c", "-4", "-h", hostname]
        for option, commands in (
            ("-f", hard_reject),
            ("-r", soft_reject),
            ("-q", disconnect),
            ("-Q", disconnect_421),
        ):
            if commands:
                self.args += [option, ",".join(commands)]
        if hard_reply is not None:
            self.args += ["-B", hard_reply]
        if soft_reply is not None:
            self.args += ["-b", soft_reply]
        if not auth:
            self.args.append("-a")
        if not esmtp:
            self.args.append("-e")
        self.args += extra_args
        self.port = 0
        self.folder: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def dump_folder(self) -> Path:
        assert self.folder is not None, "the sink is not running"
        return self.folder / "dump"

    def start(self) -> None:
        sink = require("smtp-sink")
        self._tmp = tempfile.TemporaryDirectory(prefix="mailflow-smtp-sink-")
        self.folder = Path(self._tmp.name)
        dump = self.dump_folder
        dump.mkdir()
        privileges: list[str] = []
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without -u; "nobody" must write the dumps.
            privileges = ["-u", "nobody"]
            self.folder.chmod(0o755)
            dump.chmod(0o777)
        # strftime expands the template: a literal "%" in the folder's name would be mangled.
        template = str(dump / "msg.").replace("%", "%%")
        for attempt in range(3):  # the free port may be taken between choosing and binding it
            self.port = self.fixed_port or free_port()
            listen = f"{self.address}:{self.port}"
            with (
                (self.folder / "counters").open("wb") as counters,
                (self.folder / "stderr").open("wb") as errors,
            ):  # the child keeps its own copies
                self._process = subprocess.Popen(
                    [sink, *privileges, *self.args, "-d", template, listen, "64"],
                    stdin=subprocess.DEVNULL,
                    stdout=counters,
                    stderr=errors,
                    start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    # A bare connection counts as a session in the counters and is harmless.
                    socket.create_connection((self.address, self.port), timeout=0.5).close()
                except OSError:
                    time.sleep(0.02)
                    continue
                return
            _stop(self._process)
            stderr = _tail(self.folder / "stderr")
            if attempt == 2 or "address already in use" not in stderr.lower():
                break
        self.stop()
        raise RuntimeError(f"smtp-sink did not start on port {self.port}:\n{stderr}")

    def received(self) -> int:
        """How many messages smtp-sink has counted ("." received), from its -c counters."""
        assert self.folder is not None, "the sink is not running"
        counters = (self.folder / "counters").read_bytes().decode(errors="replace")
        for report in reversed(counters.replace("\n", "\r").split("\r")):
            for item in report.split():
                name, _, value = item.partition("=")
                if name == "mesg" and value.isdigit():
                    return int(value)
        return 0

    def messages(self) -> list[SinkMessage]:
        """The completely dumped transactions, oldest first."""
        files = sorted(
            self.dump_folder.glob("msg.*"), key=lambda path: (path.stat().st_mtime_ns, path.name)
        )
        parsed = (parse_sink_dump(path.read_bytes()) for path in files)
        return [message for message in parsed if message is not None]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        """Waits (at most `timeout` seconds) until `count` messages arrived; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages()
            if len(messages) >= count and self.received() >= count:
                return messages
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"smtp-sink got {len(messages)} message(s) (counted {self.received()}), "
                    f"not {count}, within {timeout}s"
                )
            time.sleep(0.02)


def smtp_source(
    port: int,
    count: int = 1,
    size: int = 100,
    sessions: int = 1,
    *,
    reuse: bool = False,
    sender: str = "source@source.test",
    recipient: str = "rcpt@sink.test",
    recipients: int = 1,
    subject: str | None = None,
    host: str = LOCALHOST,
    helo: str = "source.test",
    extra_args: Sequence[str] = (),
    timeout: float = CLIENT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Postfix's smtp-source: `count` messages of `size` payload bytes over `sessions` parallel
    sessions; `reuse` sends the next message over the same connection instead of reconnecting.
    `recipients` > 1 prefixes a number to `recipient` for each one. With `check`, a non-zero
    exit raises AssertionError showing the output (smtp-source stops at the first non-2xx/3xx
    reply unless `extra_args` has "-A")."""
    command = [require("smtp-source"), "-m", str(count), "-l", str(size), "-s", str(sessions)]
    command += ["-f", sender, "-t", recipient, "-r", str(recipients), "-M", helo]
    if reuse:
        command.append("-d")
    if subject is not None:
        command += ["-S", subject]
    command += [*extra_args, f"inet:{host}:{port}"]
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    _check(result, check)
    return result


def swaks(
    port: int,
    *args: str,
    host: str = LOCALHOST,
    timeout: float = CLIENT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """swaks against host:port with `args` (e.g. "--to", "a@b.test", "--header", "Subject: x").

    Adds --server/--port, a HELO name, a sender and a recipient unless `args` has them, and
    bounds every SMTP wait. With `check`, a non-zero exit (e.g. a rejection) raises
    AssertionError showing the transcript."""
    command = [require("swaks"), "--server", host, "--port", str(port)]
    defaults = {
        ("--helo", "--ehlo", "--lhlo", "-h"): ["--helo", "swaks.test"],
        ("--from", "-f"): ["--from", "swaks@source.test"],
        ("--to", "-t"): ["--to", "rcpt@sink.test"],
        ("--timeout", "-to"): ["--timeout", "10"],
    }
    for options, value in defaults.items():
        if not any(arg in options or arg.split("=", 1)[0] in options for arg in args):
            command += value
    command += args
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    _check(result, check)
    return result
