"""Running a relay as a process: signals, the HTTP port, and the configuration source.

The HTTP port comes up first, so ``/healthz`` answers while the relay waits for its
first routing document (``/readyz`` does not until one is loaded and the listener is
bound). SIGTERM and SIGINT start the drain (:meth:`Relay.stop`).

Where documents come from is a :class:`DocumentSource`: the manifests on disk
(standalone, compiled by the operator package's compiler, which the caller passes in),
or the relay config Secret in the cluster (:mod:`.cluster`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailflow_relay.engine.logs import announce
from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.hosting.loops import loop_name
from mailflow_relay.routing.document import RoutingDocument

__all__ = ["DocumentSource", "HealthServer", "serve", "write_atomically"]

logger = logging.getLogger(__name__)

HTTP_LINE_LIMIT = 64 * 1024
"""The longest request or header line the health port reads (asyncio's stream default)."""
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class DocumentSource(Protocol):
    async def first(self) -> RoutingDocument:
        """The document to start with; waits (logging why) until there is one."""

    async def follow(self, relay: Relay) -> None:
        """Load every later document into ``relay`` until cancelled."""


@dataclass
class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one small HTTP/1.1 port."""

    relay: Relay | None = None
    _server: asyncio.Server | None = field(default=None, init=False)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=HTTP_LINE_LIMIT)

    @property
    def port(self) -> int:
        """The bound port (the system's pick when started with 0)."""
        assert self._server is not None, "HealthServer.port before start()"
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[bytes | None, int]:
        """The request line, or None with the 4xx status that refuses the request."""
        async with asyncio.timeout(5):
            try:
                request = await reader.readline()
            except ValueError:  # over the limit: asyncio's LimitOverrunError, wrapped
                return None, 414
            try:
                while (await reader.readline()).strip():
                    pass
            except ValueError:
                return None, 431
        return request, 200

    def _refused(self, writer: asyncio.StreamWriter, status: int) -> None:
        peer = writer.get_extra_info("peername")
        # The request itself is not logged: its content is the client's and unbounded.
        logger.info(
            "HTTP request from %s refused with %d: a line over %d bytes",
            peer[0] if isinstance(peer, tuple) else "unknown",
            status,
            HTTP_LINE_LIMIT,
        )
        if self.relay is not None:
            self.relay.metrics.http_refused.labels(str(status)).inc()
        body = f"{_REASONS[status]}\n".encode()
        writer.write(
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request, refusal = await self._read_request(reader)
            if request is None:
                self._refused(writer, refusal)
                async with asyncio.timeout(5):
                    await writer.drain()
                return
            parts = request.split(b" ")
            path = parts[1].decode("ascii", "replace") if len(parts) > 1 else "/"
            status, body, content_type = await self.respond(path)
            reason = _REASONS[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            async with asyncio.timeout(5):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(5):
                    await writer.wait_closed()

    async def respond(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for a GET of ``path``."""
        content_type = "text/plain; charset=utf-8"
        relay = self.relay
        if path == "/healthz":
            status, body = 200, b"ok\n"
        elif path == "/readyz":
            ready = relay is not None and relay.is_ready
            status, body = (200, b"ready\n") if ready else (503, b"not ready\n")
            if relay is not None and relay.left_out:
                # The user opted in to leaving objects out; readiness says which.
                body += "".join(f"left out: {line}\n" for line in relay.left_out).encode()
        elif path == "/metrics":
            status, body = 200, b"" if relay is None else relay.metrics.render()
            content_type = "text/plain; version=0.0.4; charset=utf-8"
        else:
            status, body = 404, b"not found\n"
        return status, body, content_type


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


async def _follow(source: DocumentSource, relay: Relay) -> None:
    """Follow configuration changes; a failure here must never take the relay down."""
    while True:
        try:
            await source.follow(relay)
            return
        except Exception:
            logger.exception("following configuration changes failed; trying again in 5 s")
            relay.metrics.config_reloads.labels("refused").inc()
            await asyncio.sleep(5)


async def serve(
    settings: RelaySettings,
    source: DocumentSource,
    http: tuple[str, int] | None,
    *,
    http_port_file: Path | None = None,
) -> None:
    """Run one relay process until SIGTERM/SIGINT, then drain and return.

    ``http_port_file``: once the HTTP port is bound, its number is written there (a worker
    process tells its supervisor where to ask for its health and metrics)."""
    loop = asyncio.get_running_loop()
    health = HealthServer()
    if http is not None:
        await health.start(*http)
        if http_port_file is not None:
            write_atomically(http_port_file, f"{health.port}\n")
    stop_requested = asyncio.Event()
    relay: Relay | None = None

    def on_signal() -> None:
        stop_requested.set()
        if relay is not None:
            relay.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        first = asyncio.create_task(source.first(), name="mailflow-first-document")
        stopper = asyncio.create_task(stop_requested.wait(), name="mailflow-stop-wait")
        await asyncio.wait({first, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            return
        stopper.cancel()
        document = first.result()
        relay = Relay(settings, document)
        health.relay = relay
        if stop_requested.is_set():  # a signal came while the document was being read
            relay.stop()
        async with asyncio.TaskGroup() as tasks:
            runner = tasks.create_task(relay.run(), name="mailflow-relay")
            follower = tasks.create_task(_follow(source, relay), name="mailflow-config-follower")
            await relay.ready.wait()
            where = (
                f"listening on {settings.listener.host}:{relay.port}"
                if settings.accept_mail
                else "delivering what is left, not listening"
            )
            announce(  # plain text, or a JSON line: never text among JSON lines
                f"mailflow relay: {where}, spool "
                f"{settings.spool_dir}, routing document generation {document.generation} "
                f"({len(document.connectors)} connector(s)), event loop {loop_name()}"
            )
            await runner
            follower.cancel()
    finally:
        await health.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
