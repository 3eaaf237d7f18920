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
  network in clear; passwords are stored hashed (:mod:`mailflow_relay.passwords`).
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
  transparency dot; ``500 5.6.0``), connections per client address (``421 4.7.0``), and
  timeouts (section 4.5.3.2): ``command_timeout`` while waiting for a command, and
  ``data_timeout`` for the whole message content. A timeout sends ``421 4.4.2`` and
  closes the connection.

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
import base64
import binascii
import collections
import datetime
import email.utils
import ipaddress
import logging
import re
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException

from mailflow_relay.certificates import self_signed
from mailflow_relay.errors import MailflowRelayError
from mailflow_relay.passwords import verify_password

__all__ = [
    "AcceptCallback",
    "AcceptedMessage",
    "ListenerConfigError",
    "ListenerSettings",
    "RecipientCheck",
    "SmtpListener",
]

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
log = logging.getLogger(__name__)

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

COMMAND_LINE_LIMIT = 512
"""RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF."""
SIZE_PARAMETER_ALLOWANCE = 26
"""RFC 1870: a server offering SIZE accepts MAIL lines 26 octets longer."""
AUTH_VERIFICATIONS_AT_ONCE = 4
"""scrypt verifications running in parallel (each takes tens of ms and ~16 MiB)."""
ABORT_SETTLE_SECONDS = 5.0
"""After aborting transports, how long to wait for their sessions to notice."""

# A stored hash in the right format that matches no password: unknown users cost the
# same time as known ones, so AUTH failures do not reveal which user names exist.
_NO_SUCH_USER_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "="


class ListenerConfigError(MailflowRelayError, ValueError):
    """Listener settings that cannot work (a key without a certificate, a zero limit)."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


@dataclass(frozen=True)
class ListenerSettings:
    """Everything the listener needs to know; immutable, replaced as a whole on reload."""

    host: str = "127.0.0.1"
    """Address to bind (``0.0.0.0`` or ``::`` for every interface)."""

    port: int = 2525
    """TCP port to bind; 0 picks a free one (read it back from :attr:`SmtpListener.port`)."""

    hostname: str = field(default_factory=socket.getfqdn)
    """Our name: in the 220 greeting, the EHLO reply and the ``by`` clause of ``Received:``."""

    accept_from: tuple[IPNetwork, ...] = ()
    """Client networks allowed to relay without AUTH. Empty: only authenticated clients."""

    users: Mapping[str, str] = field(default_factory=dict)
    """SMTP AUTH users: user name -> password hash (:func:`passwords.hash_password`).
    Empty: AUTH is not offered."""

    tls_cert_file: Path | None = None
    """PEM certificate chain for STARTTLS. None (with no key): a self-signed certificate
    for :attr:`hostname` is generated at start and kept in memory only."""

    tls_key_file: Path | None = None
    """PEM private key matching :attr:`tls_cert_file`."""

    max_message_size: int = 25 * 1024 * 1024
    """Largest message in octets: advertised with SIZE (RFC 1870), larger -> 552 5.3.4."""

    max_recipients: int = 100
    """Recipients per message; more -> 452 4.5.3 (RFC 5321 4.5.3.1.10: at least 100)."""

    max_line_length: int = 1000
    """Longest text line in DATA, including CRLF, not counting a transparency dot
    (RFC 5321 4.5.3.1.6); longer -> 500 5.6.0."""

    command_timeout: float = 300.0
    """Seconds to wait for the next command (RFC 5321 4.5.3.2.7: at least 5 minutes);
    also bounds the ``on_message`` callback. Then 421 4.4.2 and close."""

    data_timeout: float = 600.0
    """Seconds allowed for the whole message content, from the 354 reply to the final dot
    (a client dripping one line every few minutes cannot hold a session forever)."""

    max_connections_per_client: int = 20
    """Simultaneous connections from one client address; more -> 421 4.7.0 and close."""

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ListenerConfigError(
                "tls_cert_file/tls_key_file", "give both a certificate and its key, or neither"
            )
        for name in (
            "max_message_size",
            "max_recipients",
            "max_line_length",
            "max_connections_per_client",
        ):
            if getattr(self, name) < 1:
                raise ListenerConfigError(name, "must be at least 1")
        for name in ("command_timeout", "data_timeout"):
            if not getattr(self, name) > 0:
                raise ListenerConfigError(name, "must be a positive number of seconds")
        if not 0 <= self.port <= 65535:
            raise ListenerConfigError("port", f"{self.port} is not a TCP port")


@dataclass(frozen=True)
class AcceptedMessage:
    """A message the listener accepted, as the client sent it, with its envelope."""

    mail_from: str
    """Envelope sender (MAIL FROM); empty for the null reverse-path ``<>``."""
    rcpt_tos: tuple[str, ...]
    """Envelope recipients (RCPT TO), in the order accepted."""
    data: bytes
    """Message content as received: CRLF line ends, dot-unstuffed, no end-of-data dot."""
    client_address: str
    """The client's IP address."""
    helo: str
    """The HELO/EHLO argument, untrusted and unsanitised."""
    authenticated_user: str | None
    """The SMTP AUTH user, or None if the session did not authenticate."""
    tls: bool
    """Whether the message was received over STARTTLS."""
    esmtp: bool
    """Whether the client greeted with EHLO (ESMTP) rather than HELO."""
    received_by: str = "localhost"
    """Our host name, for the ``by`` clause of the ``Received:`` header."""

    def with_received(self, queue_id: str, now: datetime.datetime | None = None) -> bytes:
        """:attr:`data` with a ``Received:`` header prepended (RFC 5321 4.4, RFC 3848).

        Nothing the client chose (HELO, MAIL FROM, RCPT TO) can add a header line: every
        value is reduced to printable ASCII without white space, parentheses, angle
        brackets, quotes, backslashes or semicolons (which would move the date).
        ``now`` defaults to the current time; a naive ``now`` is taken as UTC.
        """
        return _received_header(self, queue_id, now) + self.data


def _received_header(
    message: AcceptedMessage, queue_id: str, now: datetime.datetime | None = None
) -> bytes:
    """The ``Received:`` trace header for ``message``, folded, ending in CRLF."""
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=datetime.UTC)
    # RFC 3848 protocol names; STARTTLS and AUTH both need EHLO.
    protocol = "ESMTP" if message.esmtp else "SMTP"
    if message.esmtp and message.tls:
        protocol += "S"
    if message.esmtp and message.authenticated_user is not None:
        protocol += "A"
    client = _address_literal(message.client_address)
    lines = [
        f"Received: from {_header_token(message.helo) or 'unknown'} ({client})",
        f"\tby {_header_token(message.received_by) or 'localhost'}"
        f" with {protocol} id {_header_token(queue_id) or 'unknown'}",
        f"\t(envelope-from <{_header_token(message.mail_from)}>)",
    ]
    if len(message.rcpt_tos) == 1:
        # Naming one recipient is customary; naming many would leak the Bcc list.
        lines.append(f"\tfor <{_header_token(message.rcpt_tos[0])}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{email.utils.format_datetime(now)}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


_UNSAFE_IN_HEADER = re.compile(r'[^\x21-\x7e]|[()<>\\;"]')


def _header_token(text: str, limit: int = 256) -> str:
    """``text`` as one header-safe token: unsafe characters become ``?``, then truncated."""
    return _UNSAFE_IN_HEADER.sub("?", text)[:limit]


def _address_literal(address: str) -> str:
    """An RFC 5321 address literal: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return _header_token(address) or "unknown"
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def _printable(text: str, limit: int = 100) -> str:
    """Client-supplied text, safe to put into a reply line or a log message."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]


AcceptCallback: TypeAlias = Callable[[AcceptedMessage], Awaitable[str]]
"""Makes the message durable and returns its queue id; raising -> 451 4.3.0."""

RecipientCheck: TypeAlias = Callable[[str, str], tuple[int, str] | None]
"""(sender, recipient) -> None to accept, or (code, text) to refuse that RCPT."""


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
    ) -> None:
        self.settings = settings
        self.on_message = on_message
        self.check_recipient = check_recipient
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._accepting = False
        self._tls_context: ssl.SSLContext | None = None
        self._sessions: set[_SmtpSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_client: collections.Counter[str] = collections.Counter()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._auth_slots = asyncio.Semaphore(AUTH_VERIFICATIONS_AT_ONCE)
        self._session_counter = 0

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
        self._server = await loop.create_server(
            lambda: _SmtpSession(self, loop), settings.host, settings.port
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._accepting = True
        log.info(
            "SMTP listener on %s port %d as %s: STARTTLS with %s; relaying allowed from %s"
            " and for %d AUTH user(s); max size %d, %d recipients, %d connections per client",
            settings.host,
            self._port,
            settings.hostname,
            certificate_source,
            ", ".join(str(network) for network in settings.accept_from) or "no network",
            len(settings.users),
            settings.max_message_size,
            settings.max_recipients,
            settings.max_connections_per_client,
        )

    async def stop_accepting(self) -> None:
        """Close the listening socket; open sessions continue."""
        if self._server is None or not self._accepting:
            return
        self._accepting = False
        # Not wait_closed(): from Python 3.12 on it also waits for every open session.
        self._server.close()
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
        log.info("SMTP listener on port %s stopped", self._port)

    # -- bookkeeping, called by the sessions -------------------------------------------

    def _admit(self, session: _SmtpSession) -> str | None:
        """Register a new session; or the reply that refuses it."""
        if not self._accepting:
            return "421 4.3.2 Service shutting down, try again later"
        limit = self.settings.max_connections_per_client
        if self._per_client[session.client] >= limit:
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

    def _release(self, session: _SmtpSession) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            self._per_client[session.client] -= 1
            if self._per_client[session.client] <= 0:
                del self._per_client[session.client]
        self._update_quiet()

    def _update_quiet(self) -> None:
        if not self._sessions and not self._tasks:
            self._quiet.set()

    def _relay_allowed(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in network for network in self.settings.accept_from)

    async def _verify(self, username: str, password: str | None) -> bool:
        stored = self.settings.users.get(username)
        async with self._auth_slots:
            matches = await asyncio.to_thread(
                verify_password, password or "", stored or _NO_SUCH_USER_HASH
            )
        return matches and stored is not None and password is not None


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


def _client_ip(peer: Any) -> IPAddress | None:
    """The client's IP from a transport's ``peername`` (IPv4-mapped IPv6 made IPv4)."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    try:
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_SIZE_PARAMETER = re.compile(r"(?:^|\s)SIZE=(\d{1,30})(?=\s|$)", re.IGNORECASE)


class _SessionHooks:
    """aiosmtpd's ``handle_*`` hooks for one session, delegating to the session."""

    def __init__(self, session: _SmtpSession) -> None:
        self.session = session

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With this hook aiosmtpd leaves recording the greeting to us.
        session.host_name = hostname
        if not self.session.listener.settings.users:
            responses = [line for line in responses if not line.startswith("250-AUTH")]
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if _CONTROL_CHARACTERS.search(address):
            # aiosmtpd ends a command at a bare LF and keeps a bare CR: an address with
            # one would reach the spool, the logs and (rewritten) the next hop.
            log.info(
                "Refused MAIL from %s: control characters in <%s>",
                self.session.client,
                _printable(address),
            )
            return "501 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if _CONTROL_CHARACTERS.search(address):
            log.info(
                "Refused RCPT from %s: control characters in <%s>",
                self.session.client,
                _printable(address),
            )
            return "501 5.1.3 Bad recipient address syntax"
        return self.session.decide_recipient(envelope, address, rcpt_options)

    async def handle_exception(self, error: Exception) -> str:
        client = self.session.client
        if isinstance(error, TLSSetupException):
            log.warning("TLS handshake with %s failed: %r", client, error.__cause__)
            return "454 4.7.0 TLS not available due to temporary reason"
        log.error("Unexpected error in the SMTP session with %s", client, exc_info=error)
        return "451 4.3.0 Requested action aborted: local error in processing"


class _SmtpSession(SMTP):
    """One SMTP connection: aiosmtpd's protocol with this relay's policy."""

    def __init__(self, listener: SmtpListener, loop: asyncio.AbstractEventLoop) -> None:
        settings = listener.settings
        self.listener = listener
        self.settings = settings
        self.client = "unknown"
        self.client_ip: IPAddress | None = None
        self.authenticated_user: str | None = None
        self._refused = False
        self._lost = False
        # aiosmtpd sizes its StreamReader from this before anything is read; our own
        # DATA reader checks the exact limit, commands need at least 512 + extensions.
        self.line_length_limit = max(settings.max_line_length + 1, 1001)
        super().__init__(
            _SessionHooks(self),
            data_size_limit=settings.max_message_size,
            hostname=settings.hostname,
            ident="ESMTP Mailflow relay",
            tls_context=listener._tls_context,
            timeout=settings.command_timeout,
            auth_require_tls=True,
            auth_exclude_mechanism=() if settings.users else ("PLAIN", "LOGIN"),
            loop=loop,
        )
        # aiosmtpd keeps these limits in a dict shared by every instance, and each EHLO
        # grows the MAIL limit; keep a fixed one per session instead.
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LINE_LIMIT)

    # -- connection lifecycle ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            # STARTTLS completed: the same connection, now under TLS. RFC 3207 4.2: the
            # server forgets what the client said before, aiosmtpd resets the session.
            super().connection_made(transport)
            self.authenticated_user = None
            cipher = transport.get_extra_info("cipher")
            log.info("TLS established with %s: %s", self.client, cipher or "unknown cipher")
            return
        self.client_ip = _client_ip(transport.get_extra_info("peername"))
        self.client = str(self.client_ip) if self.client_ip is not None else "unknown"
        refusal = self.listener._admit(self)
        if refusal is not None:
            self._refused = True
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(refusal.encode("ascii") + b"\r\n")
            transport.close()
            return
        log.info(
            "Connection from %s (relaying %s)",
            self.client,
            "allowed by accept_from"
            if self.listener._relay_allowed(self.client_ip)
            else "only after AUTH",
        )
        super().connection_made(transport)
        task = self._handler_coroutine
        assert task is not None
        task.set_name(f"smtp-session-{self.listener._session_counter}-{self.client}")
        self.listener._own_task(task)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._lost:
            # aiosmtpd calls this itself after a failed TLS handshake, then the transport
            # calls it again; the second call has nothing left to do.
            return
        self._lost = True
        try:
            super().connection_lost(error)
        finally:
            log.info("Connection from %s closed", self.client)
            self.listener._release(self)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        log.warning("Timeout waiting for %s; closing the connection", self.client)
        if isinstance(self.transport, asyncio.WriteTransport) and not self.transport.is_closing():
            # RFC 5321 4.5.3.2: the server may close after a timeout; say why first.
            self.transport.write(
                f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode("ascii")
            )
        super()._timeout_cb()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def abort(self) -> None:
        """Drop the connection now (shutdown grace period over)."""
        # Under STARTTLS, abort the TCP transport beneath the TLS one.
        underlying = self._original_transport or self.transport
        if isinstance(underlying, asyncio.Transport):
            underlying.abort()

    # -- commands ------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        await super().smtp_EHLO(hostname)
        self.command_size_limits["MAIL"] = COMMAND_LINE_LIMIT + SIZE_PARAMETER_ALLOWANCE

    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd checks SIZE= too, but replies without an enhanced status code.
        assert self.session is not None
        match = _SIZE_PARAMETER.search(arg or "") if self.session.extended_smtp else None
        limit = self.settings.max_message_size
        if match is not None and self.session.host_name and int(match[1]) > limit:
            log.info(
                "Refused MAIL from %s: declared SIZE=%s exceeds %d", self.client, match[1], limit
            )
            await self.push(
                f"552 5.3.4 Declared message size exceeds fixed maximum message size"
                f" ({limit} octets)"
            )
            return
        await super().smtp_MAIL(arg)

    def decide_recipient(self, envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        """The reply to RCPT TO: relay permission, recipient limit, recipient check."""
        assert self.session is not None
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        if not (self.session.authenticated or self.listener._relay_allowed(self.client_ip)):
            log.warning(
                "Relaying denied: client %s is not in accept_from and not authenticated"
                " (sender <%s>, recipient <%s>)",
                self.client,
                _printable(sender),
                _printable(address),
            )
            return "550 5.7.1 Relaying denied"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            log.info(
                "Refused recipient <%s> from %s: already %d recipients (max_recipients)",
                _printable(address),
                self.client,
                len(envelope.rcpt_tos),
            )
            return "452 4.5.3 Too many recipients"
        check = self.listener.check_recipient
        if check is not None:
            try:
                verdict = check(sender, address)
            except Exception:
                log.exception("check_recipient failed for <%s>", _printable(address))
                return "451 4.3.0 Requested action aborted: local error in processing"
            if verdict is not None:
                code, text = verdict
                if not (isinstance(code, int) and 400 <= code <= 599):
                    log.error("check_recipient returned an invalid reply code %r", code)
                    return "451 4.3.0 Requested action aborted: local error in processing"
                reply = f"{code} {_printable(str(text), 400)}"
                log.info(
                    "Refused recipient <%s> from %s: %s", _printable(address), self.client, reply
                )
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def smtp_DATA(self, arg: str) -> None:
        # Replaces aiosmtpd's DATA: this one refuses bare CR/LF, replies with enhanced
        # codes, and bounds the content phase with data_timeout.
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        assert self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self.settings.data_timeout)
        data, refusal = await self._read_content()
        envelope = self.envelope
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd
        if refusal is not None:
            self._reset_timeout()
            log.warning(
                "Refused message from %s (sender <%s>): %s",
                self.client,
                _printable(str(envelope.mail_from)),
                refusal,
            )
            await self.push(refusal)
            return
        message = AcceptedMessage(
            mail_from="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            client_address=self.client,
            helo=self.session.host_name or "",
            authenticated_user=self.authenticated_user,
            tls=self._tls_protocol is not None,
            esmtp=self.session.extended_smtp,
            received_by=self.hostname,
        )
        await self.push(await self._hand_over(message))

    async def _read_content(self) -> tuple[bytes, str | None]:
        """Read DATA content up to ``<CRLF>.<CRLF>``: the content, or the refusal reply.

        A refused message is still read to its end (RFC 5321 4.2.5: the reply comes after
        the final dot) but not kept. Only CRLF ends a line, exactly as aiosmtpd does.
        """
        max_size = self.settings.max_message_size
        max_line = self.settings.max_line_length
        lines: list[bytes] = []
        size = 0
        refusal: str | None = None
        in_overlong_line = False
        while True:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as overrun:
                # Longer than the reader's buffer: drop what is buffered, keep reading.
                await self._reader.read(overrun.consumed)
                in_overlong_line = True
                refusal = refusal or _line_too_long(max_line)
                lines.clear()
                continue
            except asyncio.IncompleteReadError as error:
                raise ConnectionResetError("connection closed during DATA") from error
            if in_overlong_line:
                in_overlong_line = False  # the tail of a line already refused
                continue
            if line == b".\r\n":
                return b"".join(lines), refusal
            if refusal is not None:
                continue
            if b"\r" in line[:-2] or b"\n" in line[:-2]:
                refusal = (
                    "550 5.6.0 Message contains bare LF or CR; refused (SMTP smuggling protection)"
                )
                lines.clear()
                continue
            if line.startswith(b"."):
                line = line[1:]  # RFC 5321 4.5.2 transparency
            if len(line) > max_line:
                refusal = _line_too_long(max_line)
                lines.clear()
                continue
            size += len(line)
            if size > max_size:
                refusal = (
                    f"552 5.3.4 Message size exceeds fixed maximum message size ({max_size} octets)"
                )
                lines.clear()
                continue
            lines.append(line)

    async def _hand_over(self, message: AcceptedMessage) -> str:
        """Give ``message`` to the callback; the reply to send for it."""
        # The callback has its own deadline; the session timer must not fire meanwhile
        # (it would close the connection under a message that may just be made durable).
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            async with asyncio.timeout(self.settings.command_timeout):
                queue_id = await self.listener.on_message(message)
        except Exception:
            log.exception(
                "Message from %s (sender <%s>, %d recipient(s)) not accepted: the"
                " on_message callback failed; replied 451",
                self.client,
                _printable(message.mail_from),
                len(message.rcpt_tos),
            )
            self._reset_timeout()
            return "451 4.3.0 Requested action aborted: local error in processing"
        # Not in a finally: on cancellation (connection lost) no timer may be re-armed.
        self._reset_timeout()
        log.info(
            "Accepted message %s from %s: sender <%s>, %d recipient(s), %d octets, user %s, %s",
            _printable(queue_id),
            self.client,
            _printable(message.mail_from),
            len(message.rcpt_tos),
            len(message.data),
            _printable(message.authenticated_user) if message.authenticated_user else "-",
            "TLS" if message.tls else "plaintext",
        )
        return f"250 2.0.0 OK: queued as {_printable(queue_id)}"

    # -- AUTH (RFC 4954), offered only after STARTTLS ------------------------------------

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            response = await self.challenge_auth("")
            if not isinstance(response, bytes):
                return AuthResult(success=False)  # aborted; aiosmtpd replied
        else:
            decoded = _b64decode(args[1])
            if decoded is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
            response = decoded
        parts = response.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        # RFC 4616: [authzid] NUL authcid NUL passwd; the authzid is ignored.
        return await self._check_credentials("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        login: bytes | None
        if len(args) == 1:
            challenge = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            login = challenge if isinstance(challenge, bytes) else None
            if login is None:
                return AuthResult(success=False)
        else:
            login = _b64decode(args[1])
            if login is None:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False)
        return await self._check_credentials("LOGIN", login, password)

    async def _check_credentials(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        username = login.decode("utf-8", errors="replace")
        try:
            password_text: str | None = password.decode("utf-8")
        except UnicodeDecodeError:
            password_text = None
        if await self.listener._verify(username, password_text):
            self.authenticated_user = username
            log.info(
                "AUTH %s succeeded for user %r from %s",
                mechanism,
                _printable(username, 64),
                self.client,
            )
            return AuthResult(success=True, auth_data=username)
        log.warning(
            "AUTH %s failed for user %r from %s", mechanism, _printable(username, 64), self.client
        )
        return AuthResult(success=False, handled=False)


def _line_too_long(max_line: int) -> str:
    return f"500 5.6.0 Line too long: at most {max_line} octets including CRLF (RFC 5321 4.5.3.1.6)"


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
