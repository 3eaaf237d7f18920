"""Several relay processes on one port, supervised by one parent (``--processes N``).

One relay process is bound by one core (asyncio, TLS and the SMTP parser all run on its
event loop). So a pod runs N worker processes, each a complete ``mailflow relay`` with
its own spool folder ``<spool>/worker-<i>`` (its own lock: two processes on one folder
would both deliver every message), all bound to the same port with ``SO_REUSEPORT`` so
that the kernel spreads new connections among them. The parent accepts no mail:

* it reserves the port first (a bound, never listening ``SO_REUSEPORT`` socket), so that
  ``--listen HOST:0`` gives every worker the same port and a foreign listener on it makes
  the start fail at once;
* it restarts a worker that dies (with a growing pause when it dies again at once); the
  new worker rescans the same folder, so what the dead one had accepted is delivered;
* spool folders no listening worker owns — ``<spool>`` itself after a pod ran one
  process, ``worker-<i>`` folders after it ran more workers — each get a worker that does
  not listen and stops once its folder is empty (:attr:`RelaySettings.accept_mail`);
* SIGTERM/SIGINT go to every worker: each drains and hands its own spool to the peer
  (``--handoff``), and the parent exits when the last worker has;
* it serves the HTTP port: ``/readyz`` is ready when every listening worker is,
  ``/metrics`` is every worker's metrics with a ``worker`` label, plus its own.
* in a cluster, worker 0 alone annotates the pod, with the lowest generation of all the
  listening workers (:mod:`.generations`).

Workers learn their HTTP port from the system (``--http 127.0.0.1:0``) and write it into
a file the parent reads; they die with the parent (``PR_SET_PDEATHSIG``: SIGTERM, so a
killed parent still leaves them to drain rather than to hold the port and the spools).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from mailflow_relay.hosting.generations import FOLDER_ENV, NAME_ENV, WORKERS_ENV
from mailflow_relay.hosting.serve import HealthServer
from mailflow_relay.queue.folders import spool_folders, worker_folder, worker_index
from mailflow_relay.queue.lock import SpoolLock

__all__ = [
    "SUPERVISOR_LOCK",
    "Supervisor",
    "WorkerCommand",
    "WorkerSpec",
    "merge_metrics",
    "plan_workers",
]

logger = logging.getLogger(__name__)

SUPERVISOR_LOCK: Final = ".supervisor.lock"
"""In ``<spool>``: held by the parent, so that two supervisors never share a pod's spool."""
RESTART_PAUSE_MIN = 1.0
RESTART_PAUSE_MAX = 30.0
STABLE_AFTER = 30.0
"""A worker that ran this long before dying is restarted after the shortest pause again."""
WORKER_HTTP_TIMEOUT = 2.0
WORKER_HTTP_LIMIT = 16 * 1024 * 1024
"""The most the parent reads from a worker's HTTP answer (its metrics are far smaller)."""
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    """``worker-<i>`` for a listening worker, ``drain-<folder>`` for one on an orphan folder."""
    spool_dir: Path
    accept_mail: bool
    annotates_pod: bool = False
    """The one worker that annotates the pod with the generation it serves (cluster mode)."""


WorkerCommand = Callable[[WorkerSpec, int, Path], list[str]]
"""The command line of a worker: its spec, the SMTP port, the file for its HTTP port."""


def plan_workers(root: Path, processes: int) -> list[WorkerSpec]:
    """The workers for ``processes`` listening processes on the pod spool ``root``.

    One process uses ``root`` itself (as a relay always did); more use ``worker-<i>``.
    Every other folder that may hold mail gets a worker that only delivers it."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    listening = [root] if processes == 1 else [worker_folder(root, i) for i in range(processes)]
    specs = [
        WorkerSpec(f"worker-{i}", folder, accept_mail=True, annotates_pod=i == 0)
        for i, folder in enumerate(listening)
    ]
    if root.is_dir():
        for folder in spool_folders(root):
            if folder not in listening and _may_hold_mail(folder):
                label = "root" if folder == root else folder.name
                specs.append(WorkerSpec(f"drain-{label}", folder, accept_mail=False))
    return specs


def _may_hold_mail(folder: Path) -> bool:
    """Whether ``folder`` has anything a spool could have written (a false yes only costs a
    worker that rescans the folder and stops; a false no would strand mail, so unknown
    entries count as mail)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue  # locks, temp files, flush requests
            if entry.is_dir() and (
                worker_index(Path(entry.name)) is not None or entry.name == "corrupt"
            ):
                continue
            return True
    return False


@dataclass
class _Worker:
    spec: WorkerSpec
    port_file: Path
    process: asyncio.subprocess.Process | None = None
    done: bool = False
    """A worker on an orphan folder that stopped cleanly: its folder is delivered."""


@dataclass
class Supervisor:
    specs: Sequence[WorkerSpec]
    command: WorkerCommand
    listen: tuple[str, int]
    http: tuple[str, int] | None
    root: Path
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _workers: list[_Worker] = field(default_factory=list, init=False)
    _run_dir: Path | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.restarts = Counter(
            "mailflow_worker_restarts",
            "Worker processes restarted after they died (the spool folder is picked up again).",
            ["worker"],
            registry=self.registry,
        )
        self.running = Gauge(
            "mailflow_workers_running",
            "Worker processes running, by whether they accept mail.",
            ["accepting"],
            registry=self.registry,
        )

    async def run(self) -> None:
        """Run the workers until SIGTERM/SIGINT, then stop them all and return."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = SpoolLock(self.root, SUPERVISOR_LOCK)
        lock.acquire()
        try:
            reservation = _reserve_port(*self.listen)
        except BaseException:
            lock.release()
            raise
        port = int(reservation.getsockname()[1])
        run_dir = self._run_dir = Path(tempfile.mkdtemp(prefix="mailflow-workers-"))
        health = _SupervisorHealth(supervisor=self)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        try:
            if self.http is not None:
                await health.start(*self.http)
            self._workers = [_Worker(spec, run_dir / f"{spec.name}.port") for spec in self.specs]
            print(
                f"mailflow relay: {sum(s.accept_mail for s in self.specs)} worker process(es) "
                f"listening on {self.listen[0]}:{port}, spool {self.root}",
                file=sys.stderr,
                flush=True,
            )
            async with asyncio.TaskGroup() as tasks:
                for worker in self._workers:
                    tasks.create_task(self._keep(worker, port), name=f"mailflow-{worker.spec.name}")
        finally:
            await health.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            reservation.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            lock.release()
        logger.info("every worker process has stopped")

    def stop(self) -> None:
        if not self._stopping.is_set():
            logger.info("stopping: each worker drains (and hands off) its own spool")
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _keep(self, worker: _Worker, port: int) -> None:
        """Run one worker, and again whenever it dies, until the supervisor stops."""
        spec = worker.spec
        pause = RESTART_PAUSE_MIN
        while not self.stopping:
            worker.port_file.unlink(missing_ok=True)
            started = time.monotonic()
            worker.process = await asyncio.create_subprocess_exec(
                *self.command(spec, port, worker.port_file),
                env=self._env_for(spec),
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            if self._stopping.is_set():  # the signal came while this one was being started
                worker.process.send_signal(signal.SIGTERM)
            logger.info(
                "%s started: PID %d, spool %s%s",
                spec.name,
                worker.process.pid,
                spec.spool_dir,
                "" if spec.accept_mail else " (delivers what is left, accepts nothing)",
            )
            self.running.labels(str(spec.accept_mail).lower()).inc()
            try:
                code = await worker.process.wait()
            finally:
                self.running.labels(str(spec.accept_mail).lower()).dec()
            if self._stopping.is_set():  # (not the property: mypy narrowed it in the loop)
                logger.info("%s stopped (exit code %d)", spec.name, code)
                return
            if not spec.accept_mail and code == 0:
                logger.info("%s: spool %s is delivered", spec.name, spec.spool_dir)
                worker.done = True
                return
            pause = RESTART_PAUSE_MIN if time.monotonic() - started > STABLE_AFTER else pause
            logger.warning(
                "%s (PID %d) died (%s); restarting it in %.0f s, it picks up spool %s again",
                spec.name,
                worker.process.pid,
                f"signal {-code}" if code < 0 else f"exit code {code}",
                pause,
                spec.spool_dir,
            )
            self.restarts.labels(spec.name).inc()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stopping.wait()
            pause = min(pause * 2, RESTART_PAUSE_MAX)

    def _env_for(self, spec: WorkerSpec) -> dict[str, str]:
        env = dict(self.env)
        if not spec.annotates_pod:
            # One process annotates the pod (cluster.py); N patches of one annotation would
            # race each other for nothing.
            env.pop("POD_NAME", None)
        if spec.accept_mail and self._run_dir is not None:
            # The pod serves a generation once every listening worker does (generations.py).
            env[FOLDER_ENV] = str(self._run_dir)
            env[NAME_ENV] = spec.name
            env[WORKERS_ENV] = ",".join(s.name for s in self.specs if s.accept_mail)
        return env

    async def worker_http(self, worker: _Worker, path: str) -> tuple[int, bytes] | None:
        """A worker's answer to GET ``path``, None when it has no HTTP port (yet) or fails."""
        try:
            port = int(worker.port_file.read_text(encoding="ascii"))
        except (OSError, ValueError):
            return None
        return await http_get(port, path)


async def http_get(port: int, path: str) -> tuple[int, bytes] | None:
    """GET ``path`` from 127.0.0.1:``port``: (status, body), None on any failure."""
    try:
        async with asyncio.timeout(WORKER_HTTP_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                answer = await reader.read(WORKER_HTTP_LIMIT)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), body


@dataclass
class _SupervisorHealth(HealthServer):
    supervisor: Supervisor | None = None

    async def respond(self, path: str) -> tuple[int, bytes, str]:
        supervisor = self.supervisor
        assert supervisor is not None
        if path == "/readyz":
            return await self._ready(supervisor)
        if path == "/metrics":
            running = [w for w in supervisor._workers if not w.done]
            answers = await asyncio.gather(
                *(supervisor.worker_http(w, "/metrics") for w in running)
            )
            texts = [
                (w.spec.name, answer[1])
                for w, answer in zip(running, answers, strict=True)
                if answer is not None and answer[0] == 200
            ]
            body = merge_metrics(texts) + generate_latest(supervisor.registry)
            return 200, body, "text/plain; version=0.0.4; charset=utf-8"
        return await super().respond(path)

    @staticmethod
    async def _ready(supervisor: Supervisor) -> tuple[int, bytes, str]:
        listening = [w for w in supervisor._workers if w.spec.accept_mail]
        answers = await asyncio.gather(*(supervisor.worker_http(w, "/readyz") for w in listening))
        lines = []
        ready = not supervisor.stopping and bool(listening)
        for worker, answer in zip(listening, answers, strict=True):
            worker_ready = answer is not None and answer[0] == 200
            ready = ready and worker_ready
            lines.append(f"{worker.spec.name}: {'ready' if worker_ready else 'not ready'}\n")
        head = b"ready\n" if ready else b"not ready\n"
        return (200 if ready else 503), head + "".join(lines).encode(), "text/plain; charset=utf-8"


def merge_metrics(texts: Sequence[tuple[str, bytes]]) -> bytes:
    """Prometheus text from several workers as one exposition: each family once (the
    format allows no repeat), each sample with a ``worker`` label naming its process."""
    families: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        family = ""
        for line in text.decode("utf-8", "replace").splitlines():
            if line.startswith("# "):
                words = line.split(" ", 3)
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    family = words[2]
                    headers = families.setdefault(family, [])
                    if line not in headers:
                        headers.append(line)
                    samples.setdefault(family, [])
                continue
            if line.strip():
                samples.setdefault(family, []).append(_with_label(line, worker))
                families.setdefault(family, [])
    out: list[str] = []
    for family, headers in families.items():
        out.extend(headers)
        out.extend(samples.get(family, []))
    return ("\n".join(out) + "\n").encode() if out else b""


def _with_label(sample: str, worker: str) -> str:
    label = f'worker="{worker}"'
    name_end = len(sample)
    for i, char in enumerate(sample):
        if char in "{ ":
            name_end = i
            break
    name, rest = sample[:name_end], sample[name_end:]
    if rest.startswith("{"):
        return f"{name}{{{label},{rest[1:]}"
    return f"{name}{{{label}}}{rest}"


def _reserve_port(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((host, port))
    except OSError as e:
        reservation.close()
        # Worded as asyncio words it, so the CLI names the option (--listen) in its one line.
        raise OSError(
            e.errno, f"error while attempting to bind on address ({host!r}, {port}): {e.strerror}"
        ) from e
    return reservation


_LIBC = ctypes.CDLL(None, use_errno=True)
"""Loaded here, not in the forked child: between fork and exec only the call itself runs
(no dlopen, whose lock another thread of the parent may have held at the fork)."""


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM (a drain) when the parent dies, however it dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
