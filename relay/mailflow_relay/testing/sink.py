"""A small SMTP sink: the far end for ``make demo`` and for tests of the delivery side.

It accepts mail on a loopback port, optionally offers STARTTLS with a given certificate,
can be told to answer a recipient or the whole transaction with a chosen code, and
records what it received (envelope, data, whether TLS was used and which SNI the client
sent). It runs on the caller's event loop: no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["ReceivedMessage", "SmtpSink"]


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    tls: bool
    server_name: str | None
    authenticated_as: str | None


@dataclass
class _Handler:
    sink: SmtpSink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.sink.rcpt_log.append((time.monotonic(), address))
        reply = self.sink.rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_reply is not None:
            return self.sink.data_reply
        content = envelope.original_content or b""
        login: Any = getattr(session.auth_data, "login", None)
        self.sink.messages.append(
            ReceivedMessage(
                mail_from="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=content,
                tls=session.ssl is not None,
                server_name=self.sink.last_server_name,
                authenticated_as=login.decode() if isinstance(login, bytes) else None,
            )
        )
        self.sink.arrived.set()
        return "250 2.0.0 OK: queued"


@dataclass
class SmtpSink:
    host: str = "127.0.0.1"
    port: int = 0
    cert_file: Path | None = None
    key_file: Path | None = None
    """With a certificate, STARTTLS is offered; without, it is not."""
    users: Mapping[str, str] = field(default_factory=dict)
    """AUTH accounts (plain passwords: this is a test peer)."""
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    """Recipient (lower case) → the reply to its RCPT, e.g. ``"450 4.2.0 try later"``."""
    data_reply: str | None = None
    """A reply that replaces ``250`` after DATA, e.g. ``"554 5.7.1 rejected"``."""
    messages: list[ReceivedMessage] = field(default_factory=list)
    rcpt_log: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic time, recipient) of every RCPT, accepted or not: retry timing is read here."""
    sessions: int = 0
    max_sessions: int = 0
    """The most sessions open at once: concurrency limits are read here."""
    connections: int = 0
    """Connections accepted so far: connection reuse is read here."""
    last_server_name: str | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _protocols: set[SMTP] = field(default_factory=set)
    _session_tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.cert_file is None or self.key_file is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)

        def remember_sni(_sock: Any, name: str | None, _context: ssl.SSLContext) -> None:
            self.last_server_name = name

        context.sni_callback = remember_sni
        return context

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)

    async def start(self) -> None:
        tls_context = self._tls_context()
        handler = _Handler(self)
        loop = asyncio.get_running_loop()

        sink = self

        class _CountingSMTP(SMTP):
            counted = False

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                # aiosmtpd calls this again after STARTTLS: one connection, counted once.
                if not self.counted:
                    self.counted = True
                    sink.sessions += 1
                    sink.connections += 1
                    sink.max_sessions = max(sink.max_sessions, sink.sessions)
                    sink._protocols.add(self)
                super().connection_made(transport)
                if self._handler_coroutine is not None:
                    sink._session_tasks.add(self._handler_coroutine)

            def connection_lost(self, error: Exception | None) -> None:
                if self in sink._protocols:
                    sink._protocols.discard(self)
                    sink.sessions -= 1
                super().connection_lost(error)

        def factory() -> SMTP:
            return _CountingSMTP(
                handler,
                hostname="sink.test",
                tls_context=tls_context,
                authenticator=self._authenticate if self.users else None,
                auth_require_tls=True,
                loop=loop,
            )

        self._server = await loop.create_server(factory, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close every open session, as a server going down would."""
        if self._server is not None:
            self._server.close()
            for protocol in list(self._protocols):
                if protocol.transport is not None:
                    protocol.transport.close()
            await self._server.wait_closed()
            self._server = None
            await asyncio.sleep(0)  # let connection_lost run
        # A session whose client gave up in the middle of a TLS handshake may never see
        # connection_lost: its task is ours to end, so that no task outlives the sink.
        tasks = [t for t in self._session_tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._session_tasks.clear()

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
