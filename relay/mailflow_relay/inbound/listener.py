"""The relay's SMTP listener: who may hand us mail, and on what terms.

The problem
===========

Everything a mail host, an application or a cloud mail service sends through Mailflow
enters here, so this module decides three things before the spool ever sees a byte:

* **Who may relay.** A relay that forwards mail for anyone is an open relay, abused
  within hours. A recipient is accepted only if the client's address is in the
  configured allow-list (``accept_from``) or the session authenticated with SMTP AUTH;
  everyone else gets ``550 5.7.1 Relaying denied`` at RCPT. AUTH (PLAIN and LOGIN,
  RFC 4954) is only possible after STARTTLS (RFC 3207), so a password never crosses the
  network in clear; passwords are stored hashed (:mod:`mailflow_relay.inbound.passwords`).
* **What a message is.** RFC 5321 ends DATA at ``<CRLF>.<CRLF>`` and nowhere else.
  Servers that also end it at ``<LF>.<LF>`` or ``<CR>.<CR>``, while the next hop does
  not (or the other way round), let an attacker hide a second message with a forged
  sender inside the first one: SMTP smuggling (CVE-2023-51764, -51765, -51766).
  aiosmtpd 1.4.6 ends DATA only at ``<CRLF>.<CRLF>``, so nothing can be smuggled *into*
  this relay; but we re-send the data to the next hop, whose parser we do not know, so
  any bare LF or bare CR in the data refuses the whole message (as Postfix's
  ``smtpd_forbid_bare_newline = reject`` does). Commands are still read by aiosmtpd,
  which ends a command line at LF: that cannot smuggle a message, since of a command
  line only the envelope addresses reach the next hop (refused when they hold a control
  character, ``501``) and the sanitised ``Received:`` header.
* **What it costs us.** Limits with their RFC 5321 codes (section 4.5.3.1): message size
  (advertised with SIZE, RFC 1870; ``552 5.3.4``), recipients per message
  (``452 4.5.3``), text line length (1000 octets including CRLF, not counting the
  transparency dot; ``500 5.6.0``), connections per client address and in all
  (``421 4.7.0``; the global cap stays well below the open-file limit, so a flood of idle
  connections cannot take the descriptors the relay needs to deliver), and timeouts
  (section 4.5.3.2): ``command_timeout`` while waiting for a command, and
  ``data_timeout`` for the whole message content. A timeout sends ``421 4.4.2`` and
  closes the connection.
* **What an attacker gets to try.** Error replies slow down past a soft limit and end the
  session at a hard limit (Postfix's ``smtpd_soft_error_limit``/``smtpd_hard_error_limit``);
  AUTH allows a few failures per session and makes an address that failed recently wait,
  longer with each failure (:mod:`.defences`). NUL in the content is refused like bare
  CR/LF: a next hop that strips NUL would otherwise see an end of data we never saw.
  Every such decision is a log line (with the client's address, escaped) and an event for
  the owner's metrics (:class:`~.settings.ListenerEvent`).

Only after all of that is the message handed to ``on_message`` (the spool), and ``250``
is sent only when that callback returns a queue id, i.e. once the message is durable.
If the callback fails the client gets ``451 4.3.0`` (try again later), never a traceback,
and the session goes on.

Concurrency
===========

aiosmtpd's :class:`~aiosmtpd.smtp.SMTP` is an asyncio protocol; it is used directly with
:meth:`asyncio.loop.create_server` (not aiosmtpd's ``Controller``, which runs its own loop
in a thread). aiosmtpd starts one task per connection; the listener owns those tasks,
names them, and on :meth:`SmtpListener.stop` waits for them: stop accepting, let the open
sessions finish within a grace period, then abort what remains. Every network wait is
bounded by aiosmtpd's per-session timer (which closes the transport, cancelling the
session task), re-armed here for DATA with ``data_timeout``; the ``on_message`` callback
runs under :func:`asyncio.timeout`. Password verification (scrypt, deliberately slow) runs
in a worker thread, a few at a time, so a flood of AUTH attempts cannot stall the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import re
import resource
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

from mailflow_relay.certificates import self_signed
from mailflow_relay.inbound.construction import SmtpOptions
from mailflow_relay.inbound.defences import AuthFailures, OncePerInterval
from mailflow_relay.inbound.passwords import verify_password
from mailflow_relay.inbound.received import AcceptedMessage
from mailflow_relay.inbound.session import SmtpSession
from mailflow_relay.inbound.settings import (
    ABORT_SETTLE_SECONDS,
    AUTH_VERIFICATIONS_AT_ONCE,
    NO_SUCH_USER_HASH,
    IPAddress,
    ListenerConfigError,
    ListenerEvent,
    ListenerSettings,
)

log = logging.getLogger(__name__)

__all__ = [
    "AcceptCallback",
    "AcceptedMessage",
    "EventCallback",
    "ListenerConfigError",
    "ListenerEvent",
    "ListenerSettings",
    "RecipientCheck",
    "SmtpListener",
]

AcceptCallback: TypeAlias = Callable[[AcceptedMessage], Awaitable[str]]
"""Makes the message durable and returns its queue id; raising -> 451 4.3.0."""

RecipientCheck: TypeAlias = Callable[[str, str, str, str | None], tuple[int, str] | None]
"""(sender, recipient, client address, AUTH user or None) -> None to accept, or
(code, text) to refuse that RCPT (the client matters to client-scoped connectors)."""

EventCallback: TypeAlias = Callable[[ListenerEvent], None]
"""Told of each defensive decision (the engine counts them as metrics); must not raise."""

FLOOD_LOG_INTERVAL = 10.0
"""Seconds between two log lines about the same flood (refused connections, accept errors)."""

_ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"
DESCRIPTOR_CHECK_SECONDS = 1.0
"""How often a listener on uvloop looks whether the process is out of descriptors."""
"""What asyncio's accept loop reports when accept() fails with EMFILE/ENFILE/ENOBUFS/ENOMEM."""


class SmtpListener:
    """An SMTP server on one address: accepts mail for relaying and hands it over.

    ``await start()`` binds; ``await stop()`` stops accepting, lets open sessions finish
    within a grace period and aborts what remains.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        on_message: AcceptCallback,
        check_recipient: RecipientCheck | None = None,
        on_refusal: Callable[[str], None] | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.settings = settings
        self.on_message = on_message
        self.check_recipient = check_recipient
        self.on_refusal = on_refusal
        """Told the reason (``mail_loop``) of a message refused at DATA, for a metric."""
        self.on_event = on_event
        self._server: asyncio.Server | None = None
        self._descriptor_watch: asyncio.Task[None] | None = None
        self._port: int | None = None
        self._accepting = False
        self._tls_context: ssl.SSLContext | None = None
        self._sessions: set[SmtpSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_client: collections.Counter[str] = collections.Counter()
        self._foreign: set[SmtpSession] = set()
        """Open sessions from outside accept_from (who may only relay after AUTH)."""
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._auth_slots = asyncio.Semaphore(AUTH_VERIFICATIONS_AT_ONCE)
        self._session_counter = 0
        self._auth_failures = AuthFailures(
            delay=settings.auth_failure_delay,
            delay_max=settings.auth_failure_delay_max,
            window=settings.auth_failure_window,
            capacity=settings.auth_failure_addresses,
        )
        self._cap_log = OncePerInterval(FLOOD_LOG_INTERVAL)
        self._accept_error_log = OncePerInterval(FLOOD_LOG_INTERVAL)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_exception_handler: Any = None

    @property
    def port(self) -> int:
        """The bound TCP port (the one picked by the system when settings say 0)."""
        if self._port is None:
            raise RuntimeError("SmtpListener.port is only known after start()")
        return self._port

    @property
    def active_sessions(self) -> int:
        """Open SMTP sessions (connections refused at the door are not counted)."""
        return len(self._sessions)

    @property
    def smtp_options(self) -> SmtpOptions:
        """What each session's ``SMTP.__init__`` gets (construction.py)."""
        settings = self.settings
        return SmtpOptions(
            data_size_limit=settings.max_message_size,
            hostname=settings.hostname,
            ident="ESMTP Mailflow relay",
            tls_context=self._tls_context,
            timeout=settings.command_timeout,
            # Without users, AUTH is not offered at all (the mechanisms are left out).
            auth_exclude_mechanism=frozenset() if settings.users else frozenset(("PLAIN", "LOGIN")),
            enable_smtputf8=True,
        )

    @property
    def accepting(self) -> bool:
        """Whether the listening socket is open."""
        return self._accepting

    async def start(self) -> None:
        """Bind the listening socket and start serving."""
        if self._server is not None:
            raise RuntimeError("SmtpListener.start() called twice")
        settings = self.settings
        self._tls_context, certificate_source = _server_tls_context(settings)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._previous_exception_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        self._server = await loop.create_server(
            lambda: SmtpSession(self, loop),
            settings.host,
            settings.port,
            reuse_port=settings.reuse_port or None,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._accepting = True
        if not isinstance(loop, asyncio.BaseEventLoop):
            # uvloop: an accept() out of descriptors never reaches the exception handler.
            self._descriptor_watch = loop.create_task(
                self._watch_descriptors(), name=f"smtp-descriptor-watch-{self._port}"
            )
        log.info(
            "SMTP listener on %s port %d as %s: STARTTLS with %s; relaying allowed from %s"
            " and for %d AUTH user(s); max size %d, %d recipients, %d connections per client,"
            " %d in all",
            settings.host,
            self._port,
            settings.hostname,
            certificate_source,
            ", ".join(str(network) for network in settings.accept_from) or "no network",
            len(settings.users),
            settings.max_message_size,
            settings.max_recipients,
            settings.max_connections_per_client,
            settings.max_connections,
        )

    async def stop_accepting(self) -> None:
        """Close the listening socket; open sessions continue."""
        if self._server is None or not self._accepting:
            return
        self._accepting = False
        # Not wait_closed(): from Python 3.12 on it also waits for every open session.
        self._server.close()
        watch, self._descriptor_watch = self._descriptor_watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        log.info(
            "SMTP listener on port %s stopped accepting; %d session(s) still open",
            self._port,
            len(self._sessions),
        )

    # The signature is the integrator's contract, hence a timeout parameter.
    async def wait_sessions_closed(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds for open sessions to end, then abort the rest."""
        try:
            async with asyncio.timeout(timeout):
                await self._quiet.wait()
        except TimeoutError:
            log.warning(
                "Aborting %d SMTP session(s) still open after %.1f s",
                len(self._sessions),
                timeout,
            )
            for session in list(self._sessions):
                session.abort()
            for task in list(self._tasks):
                task.cancel()
            try:
                async with asyncio.timeout(ABORT_SETTLE_SECONDS):
                    await self._quiet.wait()
            except TimeoutError:
                log.error("%d SMTP session(s) did not end after being aborted", len(self._sessions))
        if not self._accepting:
            # Nothing is accepted any more: asyncio's own handler may have its loop back.
            self._restore_exception_handler()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, give open sessions ``grace`` seconds to finish, abort the rest."""
        await self.stop_accepting()
        await self.wait_sessions_closed(grace)
        if self._server is not None:
            try:
                async with asyncio.timeout(ABORT_SETTLE_SECONDS):
                    await self._server.wait_closed()
            except TimeoutError:
                log.error("SMTP listener on port %s did not close in time", self._port)
        self._restore_exception_handler()
        log.info("SMTP listener on port %s stopped", self._port)

    # -- bookkeeping, called by the sessions -------------------------------------------

    def _event(self, event: ListenerEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                # Counting must never break a session.
                log.exception("on_event failed for %s", event)

    def _admit(self, session: SmtpSession) -> str | None:
        """Register a new session; or the reply that refuses it."""
        if not self._accepting:
            return "421 4.3.2 Service shutting down, try again later"
        settings = self.settings
        if len(self._sessions) >= settings.max_connections:
            self._event(ListenerEvent.CONNECTION_CAP)
            # A flood must not become a log flood: one line per interval, with a count.
            if (refused := self._cap_log.ready()) is not None:
                log.warning(
                    "Connection from %s refused: %d sessions open (max_connections=%d);"
                    " %d connection(s) refused for this since the last such line",
                    session.client,
                    len(self._sessions),
                    settings.max_connections,
                    refused,
                )
            return "421 4.7.0 Too many connections, try again later"
        foreign = bool(settings.accept_from) and not self._relay_allowed(session.client_ip)
        if foreign and len(self._foreign) >= _foreign_share(settings.max_connections):
            self._event(ListenerEvent.CONNECTION_CAP)
            if (refused := self._cap_log.ready()) is not None:
                log.warning(
                    "Connection from %s refused: %d sessions open from outside accept_from"
                    " (their share of max_connections=%d); %d connection(s) refused for this"
                    " since the last such line",
                    session.client,
                    len(self._foreign),
                    settings.max_connections,
                    refused,
                )
            return "421 4.7.0 Too many connections, try again later"
        limit = settings.max_connections_per_client
        if self._per_client[session.client] >= limit:
            self._event(ListenerEvent.CLIENT_CAP)
            log.warning(
                "Connection from %s refused: %d connections from that address already open"
                " (max_connections_per_client=%d)",
                session.client,
                self._per_client[session.client],
                limit,
            )
            return "421 4.7.0 Too many connections from your address, try again later"
        self._per_client[session.client] += 1
        self._sessions.add(session)
        if foreign:
            self._foreign.add(session)
        self._quiet.clear()
        self._session_counter += 1
        return None

    def _own_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        self._quiet.clear()
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # aiosmtpd re-raises a reset connection from its session task; nobody awaits
            # that task but us, so retrieve it here rather than leave it "never retrieved".
            log.debug("SMTP session task %s ended with %r", task.get_name(), error)
        self._update_quiet()

    def _release(self, session: SmtpSession) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            self._foreign.discard(session)
            self._per_client[session.client] -= 1
            if self._per_client[session.client] <= 0:
                del self._per_client[session.client]
        self._update_quiet()

    def _update_quiet(self) -> None:
        if not self._sessions and not self._tasks:
            self._quiet.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Accept errors once per interval, without a traceback; the rest as before.

        When accept() fails for want of descriptors, asyncio pauses the listening socket
        for a second and reports it with a full traceback, over and over while the flood
        lasts. The count and the errno say everything an operator can act on.
        """
        if context.get("message") == _ACCEPT_ERROR_MESSAGE:
            self._event(ListenerEvent.ACCEPT_ERROR)
            if (occurrences := self._accept_error_log.ready()) is not None:
                error = context.get("exception")
                log.error(
                    "SMTP listener on port %s cannot accept connections: %s; %d time(s)"
                    " since the last such line (%d sessions open, max_connections=%d)",
                    self._port,
                    error if error is not None else "out of system resources",
                    occurrences,
                    len(self._sessions),
                    self.settings.max_connections,
                )
            return
        if self._previous_exception_handler is not None:
            self._previous_exception_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def _watch_descriptors(self) -> None:
        """Under uvloop, report a process out of descriptors as asyncio reports accept().

        libuv gives up on accept() out of descriptors quietly: it accepts the connection
        with a descriptor kept in reserve and closes it, and nothing reaches the loop's
        exception handler. Once a second, a process at its descriptor limit goes through
        :meth:`_loop_exception` as asyncio's own accept error does (the ``accept_error``
        event, one log line per interval).
        """
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(DESCRIPTOR_CHECK_SECONDS)
            try:
                # The listing holds a descriptor of its own: at the limit, at most one free.
                exhausted = len(os.listdir("/proc/self/fd")) >= limit
            except OSError as e:
                exhausted = e.errno in (errno.EMFILE, errno.ENFILE)
            if exhausted:
                error = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
                self._loop_exception(loop, {"message": _ACCEPT_ERROR_MESSAGE, "exception": error})

    def _restore_exception_handler(self) -> None:
        loop = self._loop
        # Only ours to undo: another component may have put its own in place since.
        if loop is not None and loop.get_exception_handler() == self._loop_exception:
            loop.set_exception_handler(self._previous_exception_handler)
        self._loop = None

    def _relay_allowed(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in network for network in self.settings.accept_from)

    async def _verify(self, username: str, password: str | None) -> bool:
        stored = self.settings.users.get(username)
        async with self._auth_slots:
            matches = await asyncio.to_thread(
                verify_password, password or "", stored or NO_SUCH_USER_HASH
            )
        return matches and stored is not None and password is not None


def _foreign_share(max_connections: int) -> int:
    """Sessions clients outside accept_from may hold: three quarters of the cap (at least 1)."""
    return max(1, max_connections - max_connections // 4)


def _server_tls_context(settings: ListenerSettings) -> tuple[ssl.SSLContext, str]:
    """The STARTTLS context and a description of its certificate, for the log."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ssl.SSLError) as error:
            raise ListenerConfigError(
                "tls_cert_file/tls_key_file",
                f"cannot load {settings.tls_cert_file} with {settings.tls_key_file}: {error}",
            ) from error
        return context, f"certificate {settings.tls_cert_file}"
    certificate, key = _self_signed_pem(settings.hostname)
    # ssl only loads certificates from files: write them to a private temporary
    # directory, load them, and delete them at once; the key lives on only in memory.
    with tempfile.TemporaryDirectory(prefix="mailflow-tls-") as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(certificate)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key)
        context.load_cert_chain(cert_file, key_file)
    log.warning(
        "No TLS certificate configured: STARTTLS uses a self-signed certificate for %s,"
        " generated at start",
        settings.hostname,
    )
    return context, f"a self-signed certificate for {settings.hostname}"


def _self_signed_pem(hostname: str) -> tuple[bytes, bytes]:
    return self_signed([hostname if _is_dns_name(hostname) else "localhost"])


def _is_dns_name(name: str) -> bool:
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    return len(name) <= 253 and re.fullmatch(rf"{label}(\.{label})*\.?", name) is not None
