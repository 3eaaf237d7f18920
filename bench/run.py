"""``make bench``: Mailflow's relay against Postfix, end to end, on this machine.

In one run, with the same message set (smtp-source: N messages of S bytes over C
sessions, with or without connection reuse), three paths are timed until the sink has
counted every message — not just until injection ends:

1. **floor**: smtp-source → sink (what the load tools and the machine can do at most);
2. **postfix**: smtp-source → a private Postfix (default durability: ``250`` after the
   queue file's fsync; ``smtp_tls_security_level = may``) → sink;
3. **mailflow**: smtp-source → ``mailflow relay`` (standalone, durable spool, one
   smart-host connector with Opportunistic TLS, its default ``--idle-connections``) → sink;
   ``mailflow-dkim-rsa`` / ``mailflow-dkim-ed25519`` (not run by default: ``--relays``):
   the same, signing every message at acceptance with a DkimKey (RSA-2048 or Ed25519) for
   the sender's domain.

Table 1 delivers to Postfix's smtp-sink (no STARTTLS: both relays send in plaintext).
Table 2 delivers to a STARTTLS-capable sink (``tls_sink.py``), so both relays encrypt
the outbound hop. Acceptance latency comes from a probe session that runs alongside the
load (see :mod:`smtp_peers`). CPU seconds and peak RSS are the relay's whole process tree
(see :mod:`procstat`). Then the control plane (:mod:`control_plane`).

Everything listens on 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import control_plane
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from postfix_instance import PostfixInstance
from procstat import TreeSampler
from report import (
    BacklogResult,
    ControlPlaneResult,
    RunResult,
    Table,
    format_backlog,
    format_control_plane,
    format_table,
    to_json,
    write_plot,
)
from smtp_peers import (
    LOCALHOST,
    CountingSink,
    LatencyProbe,
    free_port,
    message_body,
    source_command,
    stop_process,
    tool,
    wait_for_port,
)
from tls_sink import make_certificate, parse_counts

from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.queue.folders import worker_folder
from mailflow_relay.queue.spool import Spool

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WARMUP_MESSAGES = 50
POLL = 0.01

CONNECTOR = """\
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {{name: bench-smart-host, namespace: bench}}
spec:
  description: "Everything to the benchmark's sink"
  recipientDomains: ["*"]
  destination: {{smartHost: {{host: 127.0.0.1, port: {port}}}}}
  tls: {{mode: {mode}{tls_extra}}}
"""

CA_BUNDLE = """\
---
apiVersion: v1
kind: Secret
metadata: {{name: bench-ca, namespace: bench}}
stringData:
  ca.crt: |
{pem}
"""
VERIFYING = {
    "TrustedCA": ", caBundle: {secretRef: {name: bench-ca}}",
    "NameMatch": ", certificateName: tls-sink.bench.test, caBundle: {secretRef: {name: bench-ca}}",
}
"""The verifying TLS modes, trusting the TLS sink's own certificate (tls_sink.py)."""


@dataclass(frozen=True)
class Load:
    messages: int
    size: int
    sessions: int
    reuse: bool
    idle_connections: int
    timeout: float
    probe_max: int
    profile: Path | None = None
    """Record the mailflow relay with py-spy during the timed part, into this folder."""
    recipients: int = 1
    """Recipients per message (smtp-source -r)."""
    processes: int = 1
    """``mailflow relay --processes``: relay processes on the one port."""
    pipelining: str = "on"
    """mailflow relay --pipelining (on, off): RFC 2920 outbound."""


def log(text: str) -> None:
    print(text, flush=True)


# --- the far ends --------------------------------------------------------------------------


class Sink:
    """What a run delivers to: counted messages, and the TLS sessions where there is TLS."""

    port: int

    def received(self) -> int:
        raise NotImplementedError

    def tls_counts(self) -> tuple[int, int] | None:
        """(messages that came over TLS, sessions); None for a sink without TLS."""
        return None


class PlainSink(Sink):
    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink
        self.port = sink.port

    def received(self) -> int:
        return self.sink.received()


class TlsSink(Sink):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cert_file = folder / "tls-sink.crt"
        self.count_file = folder / "tls-sink.count"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cert, key = make_certificate(self.folder)
        with (self.folder / "tls-sink.log").open("wb") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(BENCH / "tls_sink.py"),
                    "--port",
                    str(self.port),
                    "--cert",
                    str(cert),
                    "--key",
                    str(key),
                    "--count-file",
                    str(self.count_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port)

    def _counts(self) -> tuple[int, int, int]:
        try:
            return parse_counts(self.count_file.read_text())
        except OSError:
            return 0, 0, 0

    def received(self) -> int:
        return self._counts()[0]

    def tls_counts(self) -> tuple[int, int] | None:
        _, tls, sessions = self._counts()
        return tls, sessions

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


LATENCY_MS = 5.0
"""Each way, on the ``plain-latency`` hop: a next hop a few milliseconds away, as in a LAN
between data centres, where each round trip a client saves shows."""


@contextlib.contextmanager
def delayed(port: int, folder: Path) -> Iterator[int]:
    """A proxy in front of ``port`` that delays each chunk :data:`LATENCY_MS` each way."""
    listen = free_port()
    with (folder / "delay-proxy.log").open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(BENCH / "delay_proxy.py"), "--listen", str(listen),
             "--to", str(port), "--delay-ms", str(LATENCY_MS)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port(listen)
        yield listen
    finally:
        stop_process(process)


@contextlib.contextmanager
def sink_for(hop: str, folder: Path) -> Iterator[Sink]:
    if hop == "plain-latency":
        with CountingSink() as counting, delayed(counting.port, folder) as port:
            sink = PlainSink(counting)
            sink.port = port
            yield sink
        return
    if hop in ("plain", "plain-nopipelining"):
        # -p: smtp-sink does not announce PIPELINING, so a relay that pipelines its
        # outbound transaction waits for each reply, as with a peer that cannot.
        with CountingSink(extra_args=("-p",) if hop == "plain-nopipelining" else ()) as counting:
            yield PlainSink(counting)
        return
    tls = TlsSink(folder)
    try:
        tls.start()
        yield tls
    finally:
        tls.stop()


# --- the relays ----------------------------------------------------------------------------


@contextlib.contextmanager
def no_relay(sink: Sink, folder: Path, load: Load) -> Iterator[tuple[int, int | None]]:
    yield sink.port, None


@contextlib.contextmanager
def postfix_relay(sink: Sink, folder: Path, load: Load) -> Iterator[tuple[int, int | None]]:
    port = free_port()
    instance = PostfixInstance(
        folder / "postfix", port=port, relay_port=sink.port, connection_reuse=load.reuse, tls=True
    )
    (folder / "postfix").mkdir()
    with instance:
        wait_for_port(port)
        yield port, instance.master_pid()


DKIM_KEY = """\
---
apiVersion: v1
kind: Secret
metadata: {{name: bench-dkim, namespace: bench}}
stringData:
  private.key: |
{pem}
---
apiVersion: mailflow.dev/v1alpha1
kind: DkimKey
metadata: {{name: bench-dkim, namespace: bench}}
spec:
  domain: source.bench.test
  selector: bench
  algorithm: {algorithm}
  privateKey: {{secretRef: {{name: bench-dkim}}}}
"""


def dkim_key(algorithm: str) -> str:
    """A DkimKey for smtp-source's sender domain, with a key made now."""
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RSA-SHA256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    indented = "\n".join("    " + line for line in pem.splitlines())
    return DKIM_KEY.format(pem=indented, algorithm=algorithm)


def mailflow_manifests(sink: Sink, *, dkim: str | None, tls_mode: str) -> str:
    """The connector to the sink (in ``tls_mode``) and, when asked, a DkimKey."""
    text = CONNECTOR.format(port=sink.port, mode=tls_mode, tls_extra=VERIFYING.get(tls_mode, ""))
    if tls_mode in VERIFYING:
        if not isinstance(sink, TlsSink):
            raise ValueError(f"tls mode {tls_mode} needs the TLS sink (hop tls)")
        pem = sink.cert_file.read_text()
        text += CA_BUNDLE.format(pem="\n".join("    " + line for line in pem.splitlines()))
    return text + (dkim_key(dkim) if dkim else "")


def mailflow_command(
    manifests: Path, port: int, http: int, spool: Path, load: Load, pipelining: str | None = None
) -> list[str]:
    mailflow = Path(sys.executable).parent / "mailflow"
    command = [str(mailflow), "relay", "--manifests", str(manifests)]
    command += ["--listen", f"{LOCALHOST}:{port}", "--spool", str(spool)]
    command += ["--accept-from", "127.0.0.0/8", "--hostname", "mailflow.bench.test"]
    command += ["--idle-connections", str(load.idle_connections if load.reuse else 0)]
    command += ["--processes", str(load.processes), "--http", f"{LOCALHOST}:{http}"]
    command += ["--pipelining", pipelining or load.pipelining]
    # smtp-source -r sends up to this many recipients per message.
    return [*command, "--max-recipients", str(max(100, load.recipients))]


def wait_until_ready(http: int, process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until ``/readyz`` answers 200 (every worker process listens)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"mailflow relay exited with {process.returncode}")
        url = f"http://{LOCALHOST}:{http}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"mailflow relay not ready within {timeout:.0f}s")


@contextlib.contextmanager
def mailflow_relay(
    sink: Sink,
    folder: Path,
    load: Load,
    *,
    dkim: str | None = None,
    tls_mode: str = "Opportunistic",
    pipelining: str | None = None,
) -> Iterator[tuple[int, int | None]]:
    port, http = free_port(), free_port()
    manifests = folder / "connector.yaml"
    manifests.write_text(mailflow_manifests(sink, dkim=dkim, tls_mode=tls_mode))
    command = mailflow_command(manifests, port, http, folder / "spool", load, pipelining)
    with (folder / "mailflow.log").open("wb") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_until_ready(http, process, timeout=60)
        yield port, process.pid
    finally:
        stop_process(process)


RELAYS: dict[
    str, Callable[[Sink, Path, Load], contextlib.AbstractContextManager[tuple[int, int | None]]]
] = {
    "floor": no_relay,
    "postfix": postfix_relay,
    "mailflow": mailflow_relay,
    "mailflow-dkim-rsa": functools.partial(mailflow_relay, dkim="RSA-SHA256"),
    "mailflow-dkim-ed25519": functools.partial(mailflow_relay, dkim="Ed25519-SHA256"),
    "mailflow-trustedca": functools.partial(mailflow_relay, tls_mode="TrustedCA"),
    "mailflow-namematch": functools.partial(mailflow_relay, tls_mode="NameMatch"),
    "mailflow-nopipelining": functools.partial(mailflow_relay, pipelining="off"),
}
BASE_RELAYS = ("floor", "postfix", "mailflow")
EXTRA_RELAYS = {
    # Signing costs CPU at acceptance: measured where nothing else (TLS) hides it.
    "plain": ("mailflow-dkim-rsa", "mailflow-dkim-ed25519"),
    # Verifying the next hop's certificate: only a TLS hop has one.
    "tls": ("mailflow-trustedca", "mailflow-namematch"),
}
"""Run with connection reuse on (the default table), next to the base relays."""
HOP_TITLES = {
    "plain": "Outbound hop in plaintext (smtp-sink)",
    "tls": "Outbound hop with STARTTLS (TLS sink)",
    "plain-nopipelining": "Outbound hop in plaintext, sink without PIPELINING (smtp-sink -p)",
    "plain-latency": f"Outbound hop in plaintext, {LATENCY_MS:g} ms away each way (smtp-sink)",
}
LATENCY_RELAYS = ("postfix", "mailflow", "mailflow-nopipelining")
"""The pipelining table: the same relay with RFC 2920 on and off, and Postfix (which
pipelines to a server that offers it)."""


# --- one run -------------------------------------------------------------------------------


def _wait_for_sink(sink: Sink, target: int, deadline: float, label: str) -> int:
    """Poll the sink until it counted ``target`` messages or the deadline passed."""
    next_report = time.monotonic() + 2
    while True:
        count = sink.received()
        now = time.monotonic()
        if count >= target or now >= deadline:
            return count
        if now >= next_report:
            log(f"    {label}: sink counted {count}/{target}")
            next_report = now + 2
        time.sleep(POLL)


def _warm_up(port: int, sink: Sink, smtp_source: str, load: Load, label: str) -> int:
    """A few messages first: processes spawned, code paths warm, connections opened."""
    command = source_command(
        port,
        messages=WARMUP_MESSAGES,
        size=load.size,
        sessions=min(load.sessions, 5),
        reuse=load.reuse,
        smtp_source=smtp_source,
    )
    command[1:1] = ["-r", str(load.recipients)]
    subprocess.run(command, capture_output=True, timeout=60, check=True)
    count = _wait_for_sink(sink, WARMUP_MESSAGES, time.monotonic() + 60, f"{label} warm-up")
    if count < WARMUP_MESSAGES:
        raise RuntimeError(f"warm-up: the sink counted {count}/{WARMUP_MESSAGES}")
    time.sleep(0.3)  # let connection caches and queues settle
    return sink.received()


def run_one(relay: str, hop: str, load: Load, smtp_source: str, folder: Path) -> RunResult:
    label = f"{relay}/{hop}"
    folder.mkdir(parents=True)
    with sink_for(hop, folder) as sink, RELAYS[relay](sink, folder, load) as (port, pid):
        try:
            base = _warm_up(port, sink, smtp_source, load, label)
        except (subprocess.SubprocessError, RuntimeError) as e:
            return RunResult(relay, 0, load.messages, 0.0, 0.0, error=f"warm-up failed: {e}")
        base_tls = sink.tls_counts()
        sampler = TreeSampler(pid) if pid is not None else None
        probe = LatencyProbe(port, load.size, max_messages=load.probe_max)
        command = source_command(
            port,
            messages=load.messages,
            size=load.size,
            sessions=load.sessions,
            reuse=load.reuse,
            smtp_source=smtp_source,
        )
        command[1:1] = ["-r", str(load.recipients)]
        log(f"  {label}: {load.messages} messages through port {port} …")
        spy = _start_py_spy(pid, load.profile, label) if relay == "mailflow" else None
        if sampler is not None:
            sampler.start()
        started = time.monotonic()
        deadline = started + load.timeout
        source = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        probe.start()
        error: str | None = None
        try:
            output, _ = source.communicate(timeout=load.timeout)
        except subprocess.TimeoutExpired:
            source.kill()
            output, _ = source.communicate()
            error = f"smtp-source did not finish within {load.timeout:.0f}s"
        injected = time.monotonic()
        probe.stop()
        if source.returncode != 0 and error is None:
            error = (
                f"smtp-source exited {source.returncode}: {output.decode(errors='replace')[-300:]}"
            )
        if probe.errors:
            error = error or f"probe: {probe.errors[0]}"
        expected = load.messages + probe.sent
        if error is not None:
            # smtp-source gave up: what it did send is not known, so do not wait long.
            deadline = min(deadline, time.monotonic() + 5)
        count = _wait_for_sink(sink, base + expected, deadline, label) - base
        finished = time.monotonic()
        usage = sampler.stop() if sampler is not None else None
        if spy is not None:
            _stop_py_spy(spy)
        sessions = sink.tls_counts()
        if sessions is not None and base_tls is not None:
            sessions = (sessions[0] - base_tls[0], sessions[1] - base_tls[1])
        if count < expected and error is None:
            error = f"the sink counted {count}/{expected} within {load.timeout:.0f}s"
        result = RunResult(
            relay=relay,
            messages=count,
            expected=expected,
            seconds=round(finished - started, 3),
            inject_seconds=round(injected - started, 3),
            latency_ms=tuple(round(s * 1000, 3) for s in probe.samples),
            cpu_seconds=None if usage is None else usage.cpu_seconds,
            peak_rss_bytes=None if usage is None else usage.peak_rss_bytes,
            peak_pss_bytes=None if usage is None else usage.peak_pss_bytes,
            processes=None if usage is None else usage.processes,
            tls_messages=None if sessions is None else sessions[0],
            sessions=None if sessions is None else sessions[1],
            error=error,
        )
        log(
            f"  {label}: {result.msgs_per_second or 0:.1f} msg/s end to end "
            f"({count} in {result.seconds:.2f}s), p50 {result.p50_ms} ms, p99 {result.p99_ms} ms"
        )
        return result


def _start_py_spy(
    pid: int | None, folder: Path | None, label: str
) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).parent / "py-spy"
    if folder is None or pid is None:
        return None
    if not spy.exists():
        log(
            "    --profile: py-spy is not installed in the venv (pip install py-spy); not profiling"
        )
        return None
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / f"{label.replace('/', '-')}.collapsed.txt"
    command = [str(spy), "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
    command += ["--output", str(output), "--nonblocking", "--idle"]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)  # py-spy attaches
    log(f"    py-spy → {output}")
    return process


def _stop_py_spy(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, signal.SIGINT)


# --- the machine and the tools -------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    postfix_version = ""
    postconf = tool("postconf")
    if postconf is not None:
        result = subprocess.run(
            [postconf, "-dh", "mail_version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        postfix_version = result.stdout.strip()
    memory = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    return {
        "git": commit,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        # Other work on the machine moves every figure: recorded next to them.
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def ensure_tools() -> str:
    """smtp-source, smtp-sink and postfix, installed from Debian when missing (as root)."""
    if not all(tool(name) for name in ("smtp-source", "smtp-sink", "postfix")):
        script = REPO / "scripts" / "install-debian-packages.sh"
        log(f"==> installing Postfix and its load tools ({script.name})")
        subprocess.run(["bash", str(script)], check=True, timeout=900)
    missing = [name for name in ("smtp-source", "smtp-sink", "postfix") if not tool(name)]
    if missing:
        raise SystemExit(f"make bench needs {', '.join(missing)} (Debian package postfix)")
    if os.geteuid() != 0:
        raise SystemExit("make bench runs a private Postfix instance, which needs root")
    smtp_source = tool("smtp-source")
    assert smtp_source is not None
    return smtp_source


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Mailflow's relay against Postfix (and the floor) end to end, then the "
        "control plane at scale. Loads go to 127.0.0.1 only.",
    )
    parser.add_argument(
        "--messages", type=int, default=3000, help="messages per run (smtp-source -m)"
    )
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (smtp-source -l)")
    parser.add_argument(
        "--sessions",
        type=int,
        default=16,
        help="parallel sessions (smtp-source -s); the probe adds one; mailflow relay allows 20 "
        "per client address (default: 16)",
    )
    parser.add_argument(
        "--reuse",
        choices=("on", "off", "both"),
        default="both",
        help="connection reuse: smtp-source -d inbound; Postfix smtp_connection_cache_on_demand "
        "and mailflow --idle-connections outbound; off is one message per connection "
        "(default: both, one table each)",
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=DeliverySettings().idle_connections_per_target,
        help="mailflow relay, with reuse on (default: the relay's own, %(default)s)",
    )
    parser.add_argument(
        "--hops",
        default="plain,tls",
        help="outbound hops: plain, tls, plain-nopipelining (default: plain,tls)",
    )
    parser.add_argument(
        "--relays",
        default="",
        help=f"which paths to run in every table, among {', '.join(RELAYS)} (default: floor, "
        "postfix, mailflow; with reuse on also the DKIM ones in plaintext and the verifying "
        "TLS modes with STARTTLS)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="mailflow relay --processes (default: one per CPU here, %(default)s)",
    )
    parser.add_argument(
        "--recipients",
        type=int,
        default=5,
        help="recipients per message in the multi-recipient table; 1 skips it (default: 5)",
    )
    parser.add_argument(
        "--no-pipelining-case",
        dest="pipelining_case",
        action="store_false",
        help="skip the pipelining tables: a sink that does not announce PIPELINING, and a sink "
        f"{LATENCY_MS:g} ms away each way with mailflow's pipelining on and off",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=10_000,
        help="messages queued before a relay start-up that is timed; 0 skips it "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--no-plot", dest="plot", action="store_false", help="no PNG next to the --json file"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per run")
    parser.add_argument(
        "--probe-max", type=int, default=3000, help="latency samples at most per run"
    )
    parser.add_argument("--no-control-plane", action="store_true", help="skip the control plane")
    parser.add_argument(
        "--pipelining",
        choices=("on", "off"),
        default="on",
        help="mailflow relay --pipelining, outbound RFC 2920 (default: on)",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file as JSON")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the mailflow relay with py-spy (collapsed stacks) into DIR",
    )
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Case:
    """One table: a message set and a hop, through each of ``relays``."""

    title: str
    hop: str
    load: Load
    relays: tuple[str, ...]


def cases(args: argparse.Namespace) -> list[Case]:
    """The tables of a run: both hops (each with and without connection reuse), then one
    with several recipients per message and one with a sink that does not pipeline."""
    chosen = tuple(r.strip() for r in args.relays.split(",") if r.strip()) if args.relays else ()
    for name in chosen:
        if name not in RELAYS:
            raise SystemExit(f"unknown relay {name!r}: choose among {', '.join(RELAYS)}")
    reuses = {"on": [True], "off": [False], "both": [True, False]}[args.reuse]
    hops = [h.strip() for h in args.hops.split(",") if h.strip()]
    for hop in hops:
        if hop not in HOP_TITLES:
            raise SystemExit(f"unknown hop {hop!r}: choose among {', '.join(HOP_TITLES)}")

    def load(reuse: bool, recipients: int = 1) -> Load:
        return Load(
            messages=args.messages,
            size=args.size,
            sessions=args.sessions,
            reuse=reuse,
            idle_connections=args.idle_connections,
            timeout=args.timeout,
            probe_max=args.probe_max,
            profile=args.profile,
            recipients=recipients,
            processes=args.processes,
            pipelining=args.pipelining,
        )

    found = []
    for reuse in reuses:
        for hop in hops:
            extra = EXTRA_RELAYS.get(hop, ()) if reuse else ()
            found.append(Case(HOP_TITLES[hop], hop, load(reuse), chosen or (*BASE_RELAYS, *extra)))
    if args.recipients > 1:
        title = f"{args.recipients} recipients per message, outbound hop in plaintext (smtp-sink)"
        found.append(Case(title, "plain", load(True, args.recipients), chosen or BASE_RELAYS))
    if args.pipelining_case:
        hop = "plain-nopipelining"
        found.append(Case(HOP_TITLES[hop], hop, load(True), chosen or BASE_RELAYS))
        hop = "plain-latency"
        found.append(Case(HOP_TITLES[hop], hop, load(True), chosen or LATENCY_RELAYS))
    return found


def fill_spool(folders: Sequence[Path], count: int, size: int) -> float:
    """``count`` messages spread over ``folders``, stored as the relay stores them (fsync'ed);
    the seconds it took."""
    body = message_body(size)
    spools = [Spool(folder) for folder in folders]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        stored = pool.map(
            lambda n: spools[n % len(spools)].store(
                "source@source.bench.test", [f"{n}rcpt@sink.bench.test"], body
            ),
            range(count),
        )
        for _ in stored:
            pass
    return time.monotonic() - started


def backlog_startup(count: int, load: Load, folder: Path) -> BacklogResult:
    """A relay started on ``count`` queued messages: time to ready, to the last delivery,
    and its peak memory meanwhile (a backlog must not be held in memory)."""
    folder.mkdir(parents=True)
    root = folder / "spool"
    folders = (
        [root] if load.processes == 1 else [worker_folder(root, i) for i in range(load.processes)]
    )
    fill = fill_spool(folders, count, load.size)
    log(f"  backlog: {count} messages spooled in {fill:.1f}s; starting the relay …")
    with sink_for("plain", folder) as sink:
        manifests = folder / "connector.yaml"
        manifests.write_text(mailflow_manifests(sink, dkim=None, tls_mode="Opportunistic"))
        port, http = free_port(), free_port()
        command = mailflow_command(manifests, port, http, root, load)
        started = time.monotonic()
        with (folder / "mailflow.log").open("wb") as output:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        sampler = TreeSampler(process.pid)
        sampler.start()
        error = None
        ready = None
        try:
            ready = wait_until_ready(http, process, timeout=load.timeout)
            delivered = _wait_for_sink(sink, count, started + load.timeout, "backlog")
        except RuntimeError as e:
            error, delivered = str(e), sink.received()
        finished = time.monotonic()
        usage = sampler.stop()
        stop_process(process)
    if delivered < count and error is None:
        error = f"the sink counted {delivered}/{count} within {load.timeout:.0f}s"
    result = BacklogResult(
        messages=count,
        processes=load.processes,
        fill_seconds=round(fill, 3),
        ready_seconds=None if ready is None else round(ready, 3),
        drained_seconds=round(finished - started, 3),
        delivered=delivered,
        cpu_seconds=usage.cpu_seconds,
        peak_rss_bytes=usage.peak_rss_bytes,
        error=error,
    )
    log(format_backlog(result))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    smtp_source = ensure_tools()
    info = machine()
    log(
        f"==> Mailflow benchmark on {info['nproc']} × {info['cpu_model']}, "
        f"Postfix {info['postfix']}, Python {info['python']}, load average {info['loadavg']}, "
        f"mailflow relay with {args.processes} process(es)"
    )
    tables: list[Table] = []
    backlog: BacklogResult | None = None
    work = Path(tempfile.mkdtemp(prefix="mailflow-bench-"))
    work.chmod(0o755)  # Postfix's daemons run as the postfix user: they must reach their folders
    try:
        for number, case in enumerate(cases(args)):
            load = case.load
            log(f"==> {case.title}, connection reuse {'on' if load.reuse else 'off'}")
            runs = [
                run_one(relay, case.hop, load, smtp_source, work / f"{number}-{relay}")
                for relay in case.relays
            ]
            parameters = {
                "hop": case.hop,
                "messages": load.messages,
                "size": load.size,
                "sessions": load.sessions,
                "reuse": "on" if load.reuse else "off",
                "recipients": load.recipients,
                "processes": load.processes,
            }
            table = Table(case.title, parameters, tuple(runs))
            tables.append(table)
            log("")
            log(format_table(table))
            log("")
        if args.backlog:
            log(f"==> Start-up with a backlog of {args.backlog} messages")
            backlog = backlog_startup(args.backlog, cases(args)[0].load, work / "backlog")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    control: list[ControlPlaneResult] = []
    if not args.no_control_plane:
        log("==> Control plane")
        control = control_plane.run_all(progress=log)
        log("")
        log(format_control_plane(control))
        log("")

    log("==> Summary")
    for table in tables:
        log("")
        log(format_table(table))
    if backlog is not None:
        log("")
        log(format_backlog(backlog))
    if control:
        log("")
        log(format_control_plane(control))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            to_json(machine=info, tables=tables, control_plane=control, backlog=backlog)
        )
        log(f"\nfigures written to {args.json}")
        if args.plot:
            plot = args.json.with_suffix(".png")
            write_plot(json.loads(args.json.read_text()), plot)
            log(f"plot of the ratios written to {plot}")
    failed = [f"{t.title}: {r.relay}" for t in tables for r in t.runs if not r.complete]
    if backlog is not None and backlog.error is not None:
        failed.append(f"backlog: {backlog.error}")
    if failed:
        log("incomplete runs: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
