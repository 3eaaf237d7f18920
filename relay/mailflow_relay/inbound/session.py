"""The one module that touches aiosmtpd's internals: its ``SMTP`` protocol, subclassed.

One :class:`SmtpSession` per connection. It enforces what :mod:`.listener`'s essay
describes — who may relay, the end-of-data rules, the limits and timeouts — inside
aiosmtpd's command loop, and hands each accepted message to the listener's callback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextvars
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AnyStr, TypeVar

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException

from mailflow_relay.envelope import (
    BodyType,
    EnvelopeParameters,
    MailParameters,
    RecipientParameters,
)
from mailflow_relay.inbound.commands import CommandRefused, parse_mail, parse_rcpt
from mailflow_relay.inbound.construction import init_smtp
from mailflow_relay.inbound.content import SMUGGLING_REPLY_START, ContentReader
from mailflow_relay.inbound.defences import address_key
from mailflow_relay.inbound.hops import hop_refusal
from mailflow_relay.inbound.received import AcceptedMessage
from mailflow_relay.inbound.session_ids import bind_new_session
from mailflow_relay.inbound.settings import (
    COMMAND_LINE_LIMIT,
    SIZE_PARAMETER_ALLOWANCE,
    IPAddress,
    ListenerEvent,
    printable,
)
from mailflow_relay.transports import write_transport

__all__ = ["SmtpSession", "client_ip"]

T = TypeVar("T")

# The listener's logger: one name for everything a client's session does.
log = logging.getLogger("mailflow_relay.inbound.listener")

if TYPE_CHECKING:
    from mailflow_relay.inbound.listener import SmtpListener


def client_ip(peer: Any) -> IPAddress | None:
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


# RFC 3461 §5 (ENVID, RET: 110; NOTIFY, ORCPT: 500), RFC 6531 §3.4 (SMTPUTF8: 10),
# RFC 4954 §5 (AUTH=: 500): the longer command lines a server offering them accepts.
_MAIL_LINE_ALLOWANCE = SIZE_PARAMETER_ALLOWANCE + 110 + 10 + 14 + 11 + 500
_RCPT_LINE_ALLOWANCE = 500 + 30
_DATA_CHUNK = 64 * 1024


class _Envelope(Envelope):
    """aiosmtpd's envelope with the parsed ESMTP parameters of MAIL and each RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.parameters = MailParameters()
        self.recipient_parameters: list[tuple[str, RecipientParameters]] = []


class _SessionHooks:
    """aiosmtpd's ``handle_*`` hooks for one session, delegating to the session."""

    def __init__(self, session: SmtpSession) -> None:
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
        responses = self.session.ehlo_lines(responses)
        # One push, hence one write: a reply split over several TCP segments makes some
        # clients (nmap's smtp-open-relay among them) pair replies with the wrong commands.
        return ["\r\n".join(responses)]

    async def handle_exception(self, error: Exception) -> str:
        client = self.session.client
        if isinstance(error, TLSSetupException):
            log.warning("TLS handshake with %s failed: %r", client, error.__cause__)
            return "454 4.7.0 TLS not available due to temporary reason"
        log.error("Unexpected error in the SMTP session with %s", client, exc_info=error)
        return "451 4.3.0 Requested action aborted: local error in processing"


class _Session(Session):
    """aiosmtpd's Session without the legacy ``login_data`` warning.

    aiosmtpd 1.4 sets ``session.login_data`` after every successful AUTH and logs a
    deprecation WARNING for its own assignment; nothing here reads it (the user is
    ``SmtpSession.authenticated_user``), so the value is kept quietly.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class SmtpSession(SMTP):
    """One SMTP connection: aiosmtpd's protocol with this relay's policy."""

    def __init__(self, listener: SmtpListener, loop: asyncio.AbstractEventLoop) -> None:
        settings = listener.settings
        self.listener = listener
        self.settings = settings
        self.client = "unknown"
        self.client_ip: IPAddress | None = None
        self.authenticated_user: str | None = None
        self.session_id = ""
        self._context: contextvars.Context | None = None
        """The session's own context (its id bound): every callback about it runs there."""
        self._refused = False
        self._lost = False
        self._errors = 0
        self._auth_failures = 0
        # aiosmtpd sizes its StreamReader from this before anything is read; our own
        # DATA reader checks the exact limit, commands need at least 512 + extensions.
        # The stream buffer's limit, so DATA's chunks (content.py); aiosmtpd still
        # refuses a longer command line by command_size_limits.
        self.line_length_limit = max(settings.max_line_length + 1, _DATA_CHUNK)
        # SMTP.__init__, without its introspection at every connection (construction.py).
        init_smtp(self, _SessionHooks(self), loop, listener.smtp_options)
        # aiosmtpd keeps these limits in a dict shared by every instance, and each EHLO
        # grows the MAIL limit; keep a fixed one per session instead.
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_LINE_LIMIT)

    # -- connection lifecycle ----------------------------------------------------------

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def _create_envelope(self) -> _Envelope:
        return _Envelope()

    def _in_context(self, callback: Callable[..., T], *args: Any) -> T:
        """``callback`` in the session's context. asyncio runs each protocol callback in a
        copy of the loop's context, uvloop in the loop's own: the session id is bound in a
        context of the session's, never in the loop's, where it would label later lines."""
        if self._context is None:
            self._context = contextvars.copy_context()
        return self._context.run(callback, *args)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._in_context(self._session_made, transport)

    def _session_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            # STARTTLS completed: the same connection, now under TLS. RFC 3207 4.2: the
            # server forgets what the client said before, aiosmtpd resets the session.
            super().connection_made(transport)
            self.authenticated_user = None
            cipher = transport.get_extra_info("cipher")
            log.info("TLS established with %s: %s", self.client, cipher or "unknown cipher")
            return
        self.session_id = bind_new_session()  # before the session's task copies the context
        self.client_ip = client_ip(transport.get_extra_info("peername"))
        self.client = str(self.client_ip) if self.client_ip is not None else "unknown"
        refusal = self.listener._admit(self)
        if refusal is not None:
            self._refused = True
            writable = write_transport(transport)
            assert writable is not None
            writable.write(refusal.encode("ascii") + b"\r\n")
            writable.close()
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
        self._in_context(self._session_lost, error)

    def _session_lost(self, error: Exception | None) -> None:
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
        writable = write_transport(self.transport)
        if writable is not None and not writable.is_closing():
            # RFC 5321 4.5.3.2: the server may close after a timeout; say why first.
            writable.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode("ascii"))
        super()._timeout_cb()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd

    def eof_received(self) -> bool | None:
        return self._in_context(self._session_eof)

    def _session_eof(self) -> bool:
        if self._refused:
            return False
        super().eof_received()
        # aiosmtpd cancels the session's task on EOF and leaves the closing to that task; a
        # task cancelled before it ever ran (EOF in the loop iteration that made the
        # connection, as uvloop does it) never closes, and the session would stay open for
        # good. The transport closes itself instead (False): the same end for every session.
        return False

    def abort(self) -> None:
        """Drop the connection now (shutdown grace period over)."""
        # Under STARTTLS, abort the TCP transport beneath the TLS one.
        underlying = write_transport(self._original_transport or self.transport)
        if underlying is not None:
            underlying.abort()

    # -- replies: every one goes through here ---------------------------------------------

    async def push(self, status: AnyStr) -> None:
        """Send one reply in one write; count error replies against the session's limits.

        Past ``soft_error_limit`` each error reply waits ``error_sleep`` seconds longer than
        the one before (a client probing addresses or flooding commands slows down); at
        ``hard_error_limit`` the error reply becomes ``421 4.7.0`` and the connection
        closes (Postfix's smtpd_soft_error_limit / smtpd_hard_error_limit).
        """
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        text = self._with_enhanced_code(text)
        if text[:1] in ("4", "5") and not text.startswith("421"):
            self._errors += 1
            settings = self.settings
            if self._errors >= settings.hard_error_limit:
                log.warning(
                    "Closing the connection from %s: %d error replies in this session"
                    " (hard_error_limit); last %s",
                    self.client,
                    self._errors,
                    printable(text, 80),
                )
                self.listener._event(ListenerEvent.ERROR_DISCONNECT)
                await super().push("421 4.7.0 Too many errors, closing the connection")
                if self.transport is not None:
                    self.transport.close()
                return
            if self._errors > settings.soft_error_limit and settings.error_sleep > 0:
                delay = settings.error_sleep * (self._errors - settings.soft_error_limit)
                log.info(
                    "Delaying error reply %d to %s by %.1f s (soft_error_limit %d)",
                    self._errors,
                    self.client,
                    delay,
                    settings.soft_error_limit,
                )
                self.listener._event(ListenerEvent.ERROR_DELAYED)
                await asyncio.sleep(delay)
        # aiosmtpd decodes arguments with surrogateescape (SMTPUTF8) and echoes some (VRFY):
        # an invalid UTF-8 octet in a reply becomes "?" instead of an encoding error.
        await super().push(text.encode("utf-8", "replace"))

    def _with_enhanced_code(self, text: str) -> str:
        """RFC 2034 §4: with ENHANCEDSTATUSCODES, every 2xx/4xx/5xx reply but the greeting
        and the HELO/EHLO answer starts with one; aiosmtpd's own (NOOP, RSET, QUIT, an
        unknown command) do not, so they get the code RFC 3463 gives their class."""
        if (
            len(text) < 4
            or text[0] not in "245"
            or text[3] != " "
            or text.startswith("220")
            or text == f"250 {self.hostname}"
            or _ENHANCED_CODE.match(text, 4)
        ):
            return text
        code = text[:3]
        return f"{code} {_DEFAULT_ENHANCED.get(code, text[0] + '.0.0')} {text[4:]}"

    # -- commands ------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        await super().smtp_EHLO(hostname)
        self.command_size_limits["MAIL"] = COMMAND_LINE_LIMIT + _MAIL_LINE_ALLOWANCE
        self.command_size_limits["RCPT"] = COMMAND_LINE_LIMIT + _RCPT_LINE_ALLOWANCE

    def ehlo_lines(self, offered: list[str]) -> list[str]:
        """The EHLO answer, in a fixed order; ``offered``: aiosmtpd's (for STARTTLS, AUTH).

        PIPELINING: aiosmtpd reads each command after the reply to the one before is
        written, so pipelined commands wait in the socket buffer and are answered in order
        (RFC 2920 §3.1). REQUIRETLS only under TLS (RFC 8689 §4.1).
        """
        tls = self._tls_protocol is not None
        keywords = [
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "SMTPUTF8",
            "DSN",
        ]
        keywords += [line[4:] for line in offered if line == "250-STARTTLS"]
        if tls:
            keywords.append("REQUIRETLS")
        if self.settings.users:
            keywords += [line[4:] for line in offered if line.startswith("250-AUTH ")]
        keywords.append("HELP")
        lines = [f"250-{self.hostname}"] + [f"250-{keyword}" for keyword in keywords]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def smtp_MAIL(self, arg: str | None) -> None:
        # Replaces aiosmtpd's MAIL: a strict parser (commands.py) that keeps the
        # parameters' case, knows the DSN, SMTPUTF8 and REQUIRETLS ones, and replies with
        # enhanced status codes.
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        assert self.session is not None
        envelope = self.envelope
        assert isinstance(envelope, _Envelope)
        try:
            command = parse_mail(
                arg, esmtp=self.session.extended_smtp, tls=self._tls_protocol is not None
            )
        except CommandRefused as refused:
            log.info(
                "Refused MAIL from %s: %s (%s)", self.client, refused.reply, printable(arg or "")
            )
            await self.push(refused.reply)
            return
        if envelope.mail_from:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        limit = self.settings.max_message_size
        if command.size is not None and command.size > limit:
            log.info(
                "Refused MAIL from %s: declared SIZE=%d exceeds %d",
                self.client,
                command.size,
                limit,
            )
            await self.push(
                f"552 5.3.4 Declared message size exceeds fixed maximum message size"
                f" ({limit} octets)"
            )
            return
        envelope.mail_from = command.address or "<>"
        envelope.smtp_utf8 = command.parameters.smtputf8
        envelope.parameters = command.parameters
        await self.push("250 2.1.0 OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        assert self.session is not None
        envelope = self.envelope
        assert isinstance(envelope, _Envelope)
        if not envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        try:
            command = parse_rcpt(
                arg, esmtp=self.session.extended_smtp, smtputf8=envelope.parameters.smtputf8
            )
        except CommandRefused as refused:
            log.info(
                "Refused RCPT from %s: %s (%s)", self.client, refused.reply, printable(arg or "")
            )
            await self.push(refused.reply)
            return
        reply = self.decide_recipient(envelope, command.address, [])
        if reply.startswith("250"):
            envelope.recipient_parameters.append((command.address, command.parameters))
        await self.push(reply)

    def decide_recipient(self, envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        """The reply to RCPT TO: relay permission, recipient limit, recipient check."""
        assert self.session is not None
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        if not (self.session.authenticated or self.listener._relay_allowed(self.client_ip)):
            log.warning(
                "Relaying denied: client %s is not in accept_from and not authenticated"
                " (sender <%s>, recipient <%s>)",
                self.client,
                printable(sender),
                printable(address),
            )
            return "550 5.7.1 Relaying denied"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            log.info(
                "Refused recipient <%s> from %s: already %d recipients (max_recipients)",
                printable(address),
                self.client,
                len(envelope.rcpt_tos),
            )
            return "452 4.5.3 Too many recipients"
        check = self.listener.check_recipient
        if check is not None:
            try:
                verdict = check(sender, address, self.client, self.authenticated_user)
            except Exception:
                log.exception("check_recipient failed for <%s>", printable(address))
                return "451 4.3.0 Requested action aborted: local error in processing"
            if verdict is not None:
                code, text = verdict
                if not (isinstance(code, int) and 400 <= code <= 599):
                    log.error("check_recipient returned an invalid reply code %r", code)
                    return "451 4.3.0 Requested action aborted: local error in processing"
                reply = f"{code} {printable(str(text), 400)}"
                log.info(
                    "Refused recipient <%s> from %s: %s", printable(address), self.client, reply
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
        assert isinstance(envelope, _Envelope)
        if (
            refusal is None
            and envelope.parameters.body is BodyType.SEVEN_BIT
            and not data.isascii()
        ):
            # RFC 6152 §3: 8-bit octets only after BODY=8BITMIME; a relay passing them on
            # as 7-bit would make the next hop (or a signature check) mangle them.
            refusal = "550 5.6.1 Message contains 8-bit data but was declared BODY=7BIT"
        if refusal is None:
            refusal = hop_refusal(data, self.settings.max_hops)  # a mail loop: hops.py
            if refusal is not None and self.listener.on_refusal is not None:
                self.listener.on_refusal("mail_loop")
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd
        if refusal is not None:
            self._reset_timeout()
            if refusal.startswith(SMUGGLING_REPLY_START):
                self.listener._event(ListenerEvent.SMUGGLING)
            log.warning(
                "Refused message from %s (sender <%s>): %s",
                self.client,
                printable(str(envelope.mail_from)),
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
            parameters=EnvelopeParameters.of(envelope.parameters, envelope.recipient_parameters),
        )
        await self.push(await self._hand_over(message))

    async def _read_content(self) -> tuple[bytes, str | None]:
        """Read DATA content up to ``<CRLF>.<CRLF>``: the content, or the refusal reply.

        A refused message is still read to its end (RFC 5321 4.2.5: the reply comes after
        the final dot) but not kept. Only CRLF ends a line, exactly as aiosmtpd does. Read
        in chunks that never pass the end of data (content.py has the rules).
        """
        content = ContentReader(self.settings.max_message_size, self.settings.max_line_length)
        while True:
            try:
                try:
                    chunk = await self._reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as overrun:
                    # A full buffer without a dot line: take it, minus a possible partial end.
                    chunk = await self._reader.readexactly(overrun.consumed)
            except asyncio.IncompleteReadError as error:
                raise ConnectionResetError("connection closed during DATA") from error
            if content.feed(chunk):
                return content.content, content.refusal

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
                printable(message.mail_from),
                len(message.rcpt_tos),
            )
            self._reset_timeout()
            return "451 4.3.0 Requested action aborted: local error in processing"
        # Not in a finally: on cancellation (connection lost) no timer may be re-armed.
        self._reset_timeout()
        # No size here: the engine's "queued" line gives the one size, as stored (with the
        # Received: header), so a message never shows two.
        # A client that delivers mail is not probing: its earlier errors are forgiven
        # (as Postfix counts errors "without delivering mail").
        self._errors = 0
        log.debug(  # the delivery line is the one INFO line per message
            "Accepted message %s from %s: sender <%s>, %d recipient(s), user %s, %s",
            printable(queue_id),
            self.client,
            printable(message.mail_from),
            len(message.rcpt_tos),
            printable(message.authenticated_user) if message.authenticated_user else "-",
            "TLS" if message.tls else "plaintext",
            extra={"queue_id": queue_id},
        )
        return f"250 2.0.0 OK: queued as {printable(queue_id)}"

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
        failures = self.listener._auth_failures
        key = address_key(self.client_ip)
        wait = failures.wait_before_attempt(key)
        if wait > 0:
            log.info(
                "AUTH from %s held back %.1f s: %d failure(s) from %s recently",
                self.client,
                wait,
                failures.recent(key),
                key,
            )
            self.listener._event(ListenerEvent.AUTH_DELAYED)
            await asyncio.sleep(wait)
        if await self.listener._verify(username, password_text):
            failures.succeeded(key)
            self.authenticated_user = username
            log.info(
                "AUTH %s succeeded for user %r from %s",
                mechanism,
                printable(username, 64),
                self.client,
            )
            return AuthResult(success=True, auth_data=username)
        self._auth_failures += 1
        recent = failures.failed(key)
        self.listener._event(ListenerEvent.AUTH_FAILURE)
        # The user name may be a password typed into the wrong field: printable() keeps it
        # short and escaped, the password itself never reaches a log line.
        log.warning(
            "AUTH %s failed for user %r from %s: %d in this session, %d from %s within %.0f s",
            mechanism,
            printable(username, 64),
            self.client,
            self._auth_failures,
            recent,
            key,
            failures.window,
        )
        if self._auth_failures < self.settings.max_auth_failures:
            return AuthResult(success=False, handled=False)
        log.warning(
            "Closing the connection from %s after %d AUTH failures (max_auth_failures)",
            self.client,
            self._auth_failures,
        )
        self.listener._event(ListenerEvent.AUTH_DISCONNECT)
        await self.push("535 5.7.8 Authentication credentials invalid")
        await self.push("421 4.7.0 Too many authentication failures, closing the connection")
        if self.transport is not None:
            self.transport.close()
        return AuthResult(success=False, handled=True)


_ENHANCED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
# RFC 3463: invalid command, syntax error, command not implemented, bad sequence, …
_DEFAULT_ENHANCED = {
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "554": "5.3.0",
}


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
