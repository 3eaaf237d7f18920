"""Delivery status notifications (RFC 3464), from the null sender, back to the sender.

A bounce is a ``multipart/report; report-type=delivery-status`` message (RFC 6522) of
three parts: a text for people, the ``message/delivery-status`` part with one block per
recipient (``Final-Recipient``, ``Original-Recipient``, ``Action``, ``Status``,
``Remote-MTA``, ``Diagnostic-Code``, …) after the sender's ``Original-Envelope-Id``, and
the headers of the original message (``text/rfc822-headers``), not its body: the sender
has the body, and a bounce should not carry it (nor its attachments) around again —
unless the sender asked for it with ``RET=FULL`` (RFC 3461 §4.3; then the whole
message, ``message/rfc822``, when it fits). A message with UTF-8 headers (SMTPUTF8) is
returned as ``message/global-headers`` / ``message/global`` (RFC 6532 §3.5).

Actions (RFC 3464 §2.3.3): ``failed``, ``delayed``, and ``relayed`` — delivered to a next
hop that does not offer DSN, when the sender asked for ``NOTIFY=SUCCESS``.

Rules that keep bounces from doing harm (RFC 5321 §4.5.5, §6.1; RFC 3834):

* a message from the null sender ``<>`` never gets a bounce (bounce loops);
* the bounce itself is sent from ``<>`` and is marked ``Auto-Submitted: auto-replied``;
* header values taken from the original are folded to one line, so nothing in them
  can add a header to the report.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from mailflow_relay.envelope import utf8_address_encode
from mailflow_relay.queue.spool import SpooledMessage

__all__ = ["BounceRecipient", "build_dsn", "status_of"]

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
MAX_HEADERS = 64 * 1024


@dataclass(frozen=True)
class BounceRecipient:
    address: str
    action: str
    """``failed``, ``delayed`` or ``relayed`` (RFC 3464 §2.3.3)."""
    status: str
    """Enhanced status code (RFC 3463), e.g. ``5.1.1``."""
    diagnostic: str
    """The reply that decided it, e.g. ``550 5.1.1 no such user``."""
    remote_mta: str | None = None
    last_attempt: datetime | None = None
    original_recipient: tuple[str, str] | None = None
    """The sender's ORCPT (address type, address), RFC 3461 §4.2."""


def status_of(reply: str, code: int | None, *, default_class: str) -> str:
    """The enhanced status code in a reply, or one made from its class."""
    found = _ENHANCED.search(reply)
    if found is not None:
        return found.group(1)
    if code is not None and 400 <= code < 600:
        return f"{code // 100}.0.0"
    return f"{default_class}.0.0"


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _typed_address(address: str) -> str:
    """``rfc822; a@b``, or RFC 6533 §3's ``utf-8; j\\x{FC}rgen@b``: ASCII either way, so the
    report part stays 7-bit whatever the next hop offers."""
    if address.isascii():
        return f"rfc822; {_clean(address)}"
    return f"utf-8; {utf8_address_encode(address)}"


def _original_headers(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    headers = body if end < 0 else body[: end + 2]
    return headers[:MAX_HEADERS]


def build_dsn(
    *,
    reporting_mta: str,
    original: SpooledMessage,
    recipients: Sequence[BounceRecipient],
    will_retry_until: datetime | None = None,
    now: datetime | None = None,
    return_full: bool = False,
) -> bytes:
    """The complete DSN message (headers and body, CRLF line ends) for ``original``'s sender.

    ``return_full``: the whole message (RET=FULL), else its headers.
    """
    queue_id, original_sender, original_body = original.queue_id, original.sender, original.body
    arrival, envelope_id = original.arrival, original.parameters.mail.envid
    if not original_sender:
        raise ValueError("no bounce to the null sender")
    now = now or datetime.now(UTC)
    mta = _clean(reporting_mta)
    delayed = all(r.action == "delayed" for r in recipients)
    relayed = all(r.action == "relayed" for r in recipients)
    boundary = f"mailflow-report-{secrets.token_hex(12)}"
    subject = (
        "Delayed Mail (still being retried)"
        if delayed
        else "Successful Mail Delivery Report"
        if relayed
        else "Undelivered Mail Returned to Sender"
    )
    human = [
        f"This is the mail system at {mta}.",
        "",
        (
            "Your message could not be delivered yet to the recipients below. It is still "
            f"being retried{' until ' + format_datetime(will_retry_until) if will_retry_until else ''}; "
            "you do not need to send it again."
            if delayed
            else "Your message was relayed to the recipients below. The next server does not "
            "report delivery (it does not offer DSN): this is the last notice you will get."
            if relayed
            else "Your message could not be delivered to the recipients below. "
            "It will not be retried."
        ),
        "",
    ]
    human.extend(f"<{_clean(r.address)}>: {_clean(r.diagnostic)}" for r in recipients)
    status_fields = [
        *([f"Original-Envelope-Id: {_clean(envelope_id)}"] if envelope_id else []),
        f"Reporting-MTA: dns; {mta}",
        f"X-Mailflow-Queue-ID: {_clean(queue_id)}",
        f"Arrival-Date: {format_datetime(arrival)}",
        "",
    ]
    for recipient in recipients:
        status_fields.append(f"Final-Recipient: {_typed_address(recipient.address)}")
        if recipient.original_recipient is not None:
            kind, given = recipient.original_recipient
            shown = _typed_address(given) if kind == "utf-8" else f"{_clean(kind)}; {_clean(given)}"
            status_fields.append(f"Original-Recipient: {shown}")
        status_fields += [
            f"Action: {recipient.action}",
            f"Status: {recipient.status}",
        ]
        if recipient.remote_mta:
            status_fields.append(f"Remote-MTA: dns; {_clean(recipient.remote_mta)}")
        status_fields.append(f"Diagnostic-Code: smtp; {_clean(recipient.diagnostic)}")
        if recipient.last_attempt is not None:
            status_fields.append(f"Last-Attempt-Date: {format_datetime(recipient.last_attempt)}")
        if will_retry_until is not None and recipient.action == "delayed":
            status_fields.append(f"Will-Retry-Until: {format_datetime(will_retry_until)}")
        status_fields.append("")
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{_clean(original_sender)}>",
        f"Subject: {subject}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    headers_only = _original_headers(original_body)
    utf8 = not headers_only.isascii()
    if return_full:
        returned_type = "message/global" if utf8 else "message/rfc822"
        description = "Undelivered Message"
        returned = original_body
    else:
        returned_type = "message/global-headers" if utf8 else "text/rfc822-headers"
        description = "Message Headers" if relayed else "Undelivered Message Headers"
        returned = headers_only
    parts = [
        "\r\n".join(headers),
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
        "\r\n".join(human),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        "\r\n".join(status_fields),
        f"--{boundary}",
        f"Content-Type: {returned_type}",
        f"Content-Description: {description}",
        "",
    ]
    text = "\r\n".join(parts).encode("utf-8") + b"\r\n"
    ending = b"" if returned.endswith(b"\r\n") else b"\r\n"
    return text + returned + ending + f"\r\n--{boundary}--\r\n".encode()
