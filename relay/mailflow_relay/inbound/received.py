"""An accepted message and its ``Received:`` trace header (RFC 5321 4.4, RFC 3848).

The header is the only place where what a client chose (HELO, MAIL FROM, RCPT TO) is
written into the message, so every value is reduced to one safe token first.
"""

from __future__ import annotations

import datetime
import email.utils
import ipaddress
import re
from dataclasses import dataclass, field

from mailflow_relay.envelope import EnvelopeParameters


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
    parameters: EnvelopeParameters = field(default_factory=EnvelopeParameters)
    """The ESMTP parameters of MAIL and of each RCPT (SMTPUTF8, BODY, DSN, REQUIRETLS)."""

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
    # RFC 3848 protocol names (RFC 6531 §3.7.3: UTF8SMTP…); STARTTLS and AUTH need EHLO.
    protocol = "ESMTP" if message.esmtp else "SMTP"
    if message.parameters.mail.smtputf8:
        protocol = "UTF8SMTP"
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


__all__ = ["AcceptedMessage"]


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
