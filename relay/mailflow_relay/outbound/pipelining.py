"""The steps of one outbound transaction (MAIL, RCPT, DATA), pipelined when the hop allows it.

aiosmtplib sends one command and waits for its reply: a message to N recipients costs
N + 3 round trips (MAIL, each RCPT, DATA, the content). RFC 2920 lets a client that was
offered ``PIPELINING`` in the EHLO reply send MAIL, every RCPT and DATA in one write and
then read the replies in order, which costs 2 round trips whatever N is.

aiosmtplib keeps the connection (greeting, EHLO, STARTTLS, AUTH, RSET, QUIT all stay its
job), but its protocol object cannot take several replies in a row: it parses one reply
per ``data_received`` and drops bytes that arrive while a parsed reply waits to be picked
up (``read_response`` says so: "if multiple commands are written to the transport without
awaiting, response data will be lost"). So for the pipelined group this module hands the
transport to a small reader of its own (``transport.set_protocol``, asyncio's public way
to change who reads a transport, TLS or not) that queues every complete reply, and gives
the transport back to aiosmtplib's protocol afterwards. The reader applies aiosmtplib's
limits (a line over 8,192 octets, a reply over 32 KiB, a line without a code) and raises
aiosmtplib's errors, so the deliverer judges a pipelined reply exactly as a sequential one.

Both ways of sending offer the same three steps — :meth:`Steps.mail`, :meth:`Steps.rcpt`
(once per recipient, in order) and :meth:`Steps.data` — that raise like ``SMTP.mail``,
``SMTP.rcpt`` and ``SMTP.data``. Per-recipient replies are still decided one by one.

RFC 2920 edge cases, handled when the group is left (:meth:`PipelinedSteps.__aexit__`):

* the replies to commands the deliverer did not look at (the RCPTs and DATA after a
  refused MAIL; the DATA when every RCPT was refused) are still read, so that the
  connection stays in step for the RSET and the next message;
* a server that answers ``354`` to DATA although no recipient was accepted gets a message
  of one terminating dot (§3.1: the client must not send content then), and its reply is
  read and ignored;
* a reply that cannot be trusted while draining (no code, a timeout, a lost connection)
  closes the connection: the outcomes were already decided by the replies that counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Self, cast

import aiosmtplib
from aiosmtplib.email import quote_address

__all__ = ["Envelope", "PipelinedSteps", "SequentialSteps", "Steps", "steps_for"]

# aiosmtplib's limits (protocol.py), so that both ways refuse the same replies.
MAX_LINE_LENGTH = 8192
MAX_REPLY_LENGTH = MAX_LINE_LENGTH * 4
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_PERIOD = re.compile(rb"(?m)^\.")
_RCPT_ACCEPTED = (250, 251)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Envelope:
    """The sender of one transaction and its ESMTP parameters: ``mail`` on MAIL FROM
    (``SMTPUTF8``, ``BODY=8BITMIME``, ``RET=``, ``ENVID=``), ``rcpt`` per recipient on
    RCPT TO (``NOTIFY=``, ``ORCPT=``). No parameters by default: plain RFC 5321."""

    mail_from: str
    mail: tuple[str, ...] = ()
    rcpt: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(
        cls,
        mail_from: str,
        mail_options: Sequence[str],
        rcpt_options: Mapping[str, Sequence[str]],
    ) -> Envelope:
        return cls(
            mail_from,
            tuple(mail_options),
            MappingProxyType({r: tuple(o) for r, o in rcpt_options.items()}),
        )

    @property
    def encoding(self) -> str:
        """RFC 6531: addresses go as UTF-8 only in a transaction that asked for SMTPUTF8."""
        return "utf-8" if any(o.upper() == "SMTPUTF8" for o in self.mail) else "ascii"

    def for_recipient(self, recipient: str) -> tuple[str, ...]:
        return self.rcpt.get(recipient, ())


@dataclass(frozen=True)
class Timeouts:
    command: float
    """MAIL and RCPT replies (RFC 5321 §4.5.3.2: 5 minutes)."""
    data: float
    """The replies to DATA and to the end of the content, as the sequential path waits."""


class Steps:
    """MAIL, RCPT…, DATA of one transaction; raise as aiosmtplib's ``SMTP`` methods do."""

    pipelined = False

    async def mail(self) -> aiosmtplib.SMTPResponse:
        raise NotImplementedError

    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse:
        raise NotImplementedError

    async def data(self, content: bytes) -> aiosmtplib.SMTPResponse:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


class SequentialSteps(Steps):
    """One command, one reply: for hops that do not offer PIPELINING (today's way)."""

    def __init__(self, smtp: aiosmtplib.SMTP, envelope: Envelope, timeouts: Timeouts) -> None:
        self.smtp = smtp
        self.envelope = envelope
        self.timeouts = timeouts

    async def mail(self) -> aiosmtplib.SMTPResponse:
        envelope = self.envelope
        return await self.smtp.mail(
            envelope.mail_from, options=envelope.mail, encoding=envelope.encoding
        )

    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse:
        return await self.smtp.rcpt(
            recipient,
            options=self.envelope.for_recipient(recipient),
            encoding=self.envelope.encoding,
        )

    async def data(self, content: bytes) -> aiosmtplib.SMTPResponse:
        return await self.smtp.data(content, timeout=self.timeouts.data)


def command_line(verb: bytes, address: str, options: Sequence[str], encoding: str) -> bytes:
    """``MAIL FROM:<a> OPT…`` as aiosmtplib would write it; ValueError for what it refuses."""
    args = [verb + quote_address(address).encode(encoding)]
    args += [option.encode("ascii") for option in options]
    for arg in args:
        if _CONTROL.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


def dot_stuffed(content: bytes) -> bytes:
    """The content as DATA carries it: CRLF line ends, leading dots doubled, the final dot."""
    # A body accepted over SMTP already has CRLF line ends only, and most have no line that
    # starts with a dot: three counts (C speed) spare both regular expressions then.
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
        content = _LINE_ENDINGS.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if content.startswith(b".") or b"\n." in content:
        content = _LEADING_PERIOD.sub(b"..", content)
    return content + b".\r\n"


class _ReplyReader(asyncio.Protocol):
    """Reads a transport's replies while a pipelined group is in flight; queues them all.

    :meth:`expect` bounds what is kept: a server that sends more replies than commands is
    out of step, and its extra bytes are never parsed into a reply for a later command.
    """

    def __init__(self, app: asyncio.BaseProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self._app = app
        self._loop = loop
        self._buffer = bytearray()
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._expected = 0
        self._parsed = 0
        self.lost = False

    def expect(self, replies: int) -> None:
        """``replies`` more commands were (or are about to be) written."""
        self._expected += replies
        self._take_replies()

    # --- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        self._take_replies()

    def _take_replies(self) -> None:
        try:
            while self._parsed < self._expected and (reply := self._parse()) is not None:
                self._replies.append(reply)
                self._parsed += 1
            if len(self._buffer) > MAX_REPLY_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        except aiosmtplib.SMTPResponseException as e:
            self._error = e
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        # aiosmtplib's protocol and client must learn it too (is_connected, close()).
        self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # --- reading -------------------------------------------------------------------------------

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _parse(self) -> aiosmtplib.SMTPResponse | None:
        """One complete reply from the front of the buffer (RFC 5321 §4.2.1), or None."""
        offset = 0
        lines: list[bytes] = []
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            if len(line) > MAX_LINE_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                raise aiosmtplib.SMTPResponseException(
                    -1, f"Malformed SMTP response line: {text}"
                ) from None
            offset = end + 1
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:offset]
                message = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return aiosmtplib.SMTPResponse(code, message)
        return None

    async def reply(self, within: float) -> aiosmtplib.SMTPResponse:
        """The next reply in order; raises aiosmtplib's error for garbage, a loss, a timeout."""
        if self._replies:
            return self._replies.popleft()  # a pipelined group's replies often come at once
        # One timer on the waiter rather than asyncio.timeout(): the same bound, without a
        # context manager and its task bookkeeping twice per message.
        deadline = self._loop.time() + within
        while not self._replies:
            if self._error is not None:
                raise self._error
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._wakeup = waiter
            timer = self._loop.call_at(deadline, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        return self._replies.popleft()

    async def writable(self, within: float) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._writable is None or self._writable.done():
            return
        try:
            async with asyncio.timeout(within):
                await self._writable
        except TimeoutError as e:
            raise aiosmtplib.SMTPTimeoutError("Timed out sending the message content") from e


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(
            aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
        )


class PipelinedSteps(Steps):
    """RFC 2920: MAIL, every RCPT and DATA in one write, then each reply in order."""

    pipelined = True

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        envelope: Envelope,
        recipients: Sequence[str],
        timeouts: Timeouts,
    ) -> None:
        encoding = envelope.encoding
        # Built before anything is written: an address aiosmtplib would refuse stops the
        # transaction before the server saw any of it.
        self._group = command_line(b"MAIL FROM:", envelope.mail_from, envelope.mail, encoding)
        self._group += b"".join(
            command_line(b"RCPT TO:", r, envelope.for_recipient(r), encoding) for r in recipients
        )
        self._group += b"DATA\r\n"
        self.smtp = smtp
        self.mail_from = envelope.mail_from
        self.timeouts = timeouts
        self._commands = len(recipients) + 2
        self._unread = 0
        """Replies to the group not yet taken by a step."""
        self._data_answered = False
        self._transport: asyncio.WriteTransport | None = None
        self._reader: _ReplyReader | None = None

    async def __aenter__(self) -> Self:
        protocol = self.smtp.protocol
        # A cast, not isinstance(…, asyncio.WriteTransport): uvloop's transports do not
        # derive from asyncio's classes, though they offer the same methods.
        transport = cast(
            "asyncio.WriteTransport | None", protocol.transport if protocol is not None else None
        )
        if protocol is None or transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        self._reader = _ReplyReader(protocol, asyncio.get_running_loop())
        self._reader.expect(self._commands)
        self._unread = self._commands
        transport.set_protocol(self._reader)
        self._transport = transport
        transport.write(self._group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._reader is not None
        assert self._transport is not None
        if exc is None and self._unread:
            await self._drain()
        if not self._reader.lost:
            protocol = self.smtp.protocol
            if protocol is not None:
                self._transport.set_protocol(protocol)
            if self._unread:
                # Replies still owed by the server would be read as the replies to the
                # next commands: this connection is never used again.
                self.smtp.close()

    async def _next(self, within: float) -> aiosmtplib.SMTPResponse:
        assert self._reader is not None
        reply = await self._reader.reply(within)
        self._unread -= 1
        return reply

    async def mail(self) -> aiosmtplib.SMTPResponse:
        reply = await self._next(self.timeouts.command)
        if reply.code != 250:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, self.mail_from)
        return reply

    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse:
        reply = await self._next(self.timeouts.command)
        if reply.code not in _RCPT_ACCEPTED:
            raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
        return reply

    async def data(self, content: bytes) -> aiosmtplib.SMTPResponse:
        reply = await self._next(self.timeouts.data)
        self._data_answered = True
        if reply.code != 354:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        return await self._send_content(dot_stuffed(content))

    async def _send_content(self, payload: bytes) -> aiosmtplib.SMTPResponse:
        assert self._reader is not None
        assert self._transport is not None
        if self._reader.lost or self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._reader.expect(1)
        self._unread += 1
        self._transport.write(payload)
        await self._reader.writable(self.timeouts.data)
        reply = await self._next(self.timeouts.data)
        if reply.code != 250:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        return reply

    async def _drain(self) -> None:
        """Read what the deliverer did not need (see the module docstring)."""
        try:
            while self._unread > 1:
                await self._next(self.timeouts.command)
            if self._unread and not self._data_answered:
                reply = await self._next(self.timeouts.data)
                if reply.code == 354:
                    # §3.1: accepted DATA with no recipient; the empty message is not mail.
                    with contextlib.suppress(aiosmtplib.SMTPDataError):
                        await self._send_content(b".\r\n")
        except (aiosmtplib.SMTPException, OSError):
            # Outcomes stand; __aexit__ closes the connection (replies still owed).
            self._unread = max(self._unread, 1)


def steps_for(
    smtp: aiosmtplib.SMTP,
    envelope: Envelope,
    recipients: Sequence[str],
    timeouts: Timeouts,
    *,
    allowed: bool = True,
) -> Steps:
    """Pipelined steps when the hop offered PIPELINING (and the settings allow it)."""
    offered = smtp.supports_extension("pipelining")
    logger.debug(
        "%s:%s: %d recipient(s), %s",
        smtp.hostname,
        smtp.port,
        len(recipients),
        "pipelined"
        if allowed and offered
        else "sequential (" + ("--pipelining off" if offered else "PIPELINING not offered") + ")",
    )
    if allowed and offered:
        return PipelinedSteps(smtp, envelope, recipients, timeouts)
    return SequentialSteps(smtp, envelope, timeouts)
