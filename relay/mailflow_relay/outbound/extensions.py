"""What one transaction sends, given the message's parameters and the next hop's EHLO.

The sender's ESMTP parameters (:mod:`mailflow_relay.envelope`) are passed on when the
next hop offers the extension; when it does not, this module decides, as Postfix does:

* **SMTPUTF8** (RFC 6531 §3.2) — asked for and needed (UTF-8 in the envelope or the
  headers) but not offered: if only domains are UTF-8 (and the headers are ASCII), the
  domains are sent as A-labels (IDNA); otherwise the recipients fail with ``5.6.7``.
* **8BITMIME** (RFC 6152 §3) — an 8-bit body to a hop without it is converted to
  quoted-printable, part by part (Postfix's default); a signed message (DKIM, S/MIME,
  PGP/MIME) cannot be altered without breaking its signature, so it fails with ``5.6.3``,
  as does a ``binary`` part.
* **DSN** (RFC 3461 §4) — NOTIFY and ORCPT per recipient (ORCPT added from the envelope
  recipient when the sender gave none, §6.2.1), RET and ENVID on MAIL; without DSN the
  relay reports success itself (a ``relayed`` DSN, see the engine).
* **REQUIRETLS** (RFC 8689 §4.2) — only over TLS whose certificate was verified as the
  route's mode requires, to a hop that offers REQUIRETLS, and passed on; otherwise the
  recipients fail with ``5.7.30``.

The result is a :class:`TransactionPlan` (``mail_options``, ``rcpt_options`` per recipient,
the addresses and the content to send) or an :class:`ExtensionRefusal` for the whole
transaction.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import io
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.message import Message

import idna

from mailflow_relay.envelope import (
    BodyType,
    EnvelopeParameters,
    Notify,
    RecipientParameters,
    utf8_address_encode,
    xtext_encode,
)

__all__ = [
    "ExtensionRefusal",
    "TransactionPlan",
    "handoff_options",
    "plan_transaction",
    "to_quoted_printable",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransactionPlan:
    """What to send in one transaction."""

    mail_from: str
    mail_options: tuple[str, ...]
    recipients: Mapping[str, str]
    """Envelope recipient -> the address sent (differs only after an A-label downgrade)."""
    rcpt_options: Mapping[str, tuple[str, ...]]
    """Envelope recipient -> its RCPT parameters."""
    data: bytes = field(repr=False)
    encoding: str = "ascii"
    """How addresses go on the wire: ``utf-8`` with SMTPUTF8."""
    dsn: bool = False
    """NOTIFY went to the next hop: it reports success itself."""
    conversions: tuple[str, ...] = ()
    """What was changed to fit the next hop, for the log: ``quoted-printable``,
    ``a-labels``."""


@dataclass(frozen=True)
class ExtensionRefusal:
    """The next hop cannot take this message as the sender asked; permanent."""

    code: int
    reply: str
    """Enhanced status code and text, e.g. ``5.6.7 SMTPUTF8 is required, …``."""


_SIGNED_CONTENT = re.compile(
    rb"^content-type:[ \t]*(?:multipart/signed|multipart/encrypted|application/(?:x-)?pkcs7-mime)",
    re.IGNORECASE | re.MULTILINE,
)
_DKIM_SIGNATURE = re.compile(rb"^dkim-signature:", re.IGNORECASE | re.MULTILINE)


def plan_transaction(
    parameters: EnvelopeParameters,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    *,
    capabilities: Collection[str],
    verified_tls: bool,
    server: str,
) -> TransactionPlan | ExtensionRefusal:
    """The plan for ``recipients`` to a hop offering ``capabilities`` (lower-case EHLO keywords)."""
    mail = parameters.mail
    if mail.requiretls:
        refusal = _requiretls_refusal(capabilities, verified_tls, server)
        if refusal is not None:
            return refusal
    addressing = _addresses(parameters, mail_from, recipients, data, capabilities, server)
    if isinstance(addressing, ExtensionRefusal):
        return addressing
    options, conversions = list(addressing.options), list(addressing.conversions)
    eight_bit = not data.isascii()
    if "8bitmime" in capabilities:
        if eight_bit or mail.body is BodyType.EIGHT_BIT_MIME:
            options.append("BODY=8BITMIME")
        elif mail.body is BodyType.SEVEN_BIT:
            options.append("BODY=7BIT")
    elif eight_bit and addressing.encoding != "utf-8":
        converted = _convert_for_seven_bit(data, server)
        if isinstance(converted, ExtensionRefusal):
            return converted
        data = converted
        conversions.append("quoted-printable")
    dsn = "dsn" in capabilities
    rcpt_options: dict[str, tuple[str, ...]] = dict.fromkeys(recipients, ())
    if dsn:
        if mail.ret is not None:
            options.append(f"RET={mail.ret.value}")
        if mail.envid is not None:
            options.append(f"ENVID={xtext_encode(mail.envid)}")
        for recipient in recipients:
            rcpt_options[recipient] = _dsn_options(parameters, recipient)
    if mail.requiretls:
        options.append("REQUIRETLS")
    return TransactionPlan(
        mail_from=addressing.mail_from,
        mail_options=tuple(options),
        recipients=addressing.recipients,
        rcpt_options=rcpt_options,
        data=data,
        encoding=addressing.encoding,
        dsn=dsn,
        conversions=tuple(conversions),
    )


def _requiretls_refusal(
    capabilities: Collection[str], verified_tls: bool, server: str
) -> ExtensionRefusal | None:
    if not verified_tls:
        return ExtensionRefusal(
            550,
            f"5.7.30 REQUIRETLS support required: TLS to {server} was not verified"
            " (the route's TLS mode does not check the certificate, or TLS was not used)",
        )
    if "requiretls" not in capabilities:
        return ExtensionRefusal(
            550, f"5.7.30 REQUIRETLS support required, but not offered by host {server}"
        )
    return None


@dataclass(frozen=True)
class _Addressing:
    mail_from: str
    recipients: Mapping[str, str]
    encoding: str = "ascii"
    options: tuple[str, ...] = ()
    conversions: tuple[str, ...] = ()


def _addresses(
    parameters: EnvelopeParameters,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    capabilities: Collection[str],
    server: str,
) -> _Addressing | ExtensionRefusal:
    """SMTPUTF8 passed on, the addresses downgraded to A-labels, or the 5.6.7 refusal."""
    header_block = _headers(data)
    needs_utf8 = parameters.mail.smtputf8 and not (
        mail_from.isascii() and all(r.isascii() for r in recipients) and header_block.isascii()
    )
    if not needs_utf8:
        return _Addressing(mail_from, {r: r for r in recipients})
    if "smtputf8" in capabilities:
        return _Addressing(mail_from, {r: r for r in recipients}, "utf-8", ("SMTPUTF8",))
    downgraded = _ascii_addresses([mail_from, *recipients]) if header_block.isascii() else None
    if downgraded is None:
        return ExtensionRefusal(
            550, f"5.6.7 SMTPUTF8 is required, but was not offered by host {server}"
        )
    return _Addressing(
        downgraded[0],
        dict(zip(recipients, downgraded[1:], strict=True)),
        conversions=("a-labels",),
    )


def handoff_options(
    parameters: EnvelopeParameters, recipients: Sequence[str]
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """MAIL and per-recipient RCPT options that give a peer relay the message exactly as
    the sender asked (a hand-off is this relay, continued): every parameter as stored.
    REQUIRETLS is not among them: a hand-off is plaintext, and a peer offers it only under
    TLS; it travels in the hand-off's origin header instead (engine/origin.py)."""
    mail = parameters.mail
    options: list[str] = []
    if mail.smtputf8:
        options.append("SMTPUTF8")
    if mail.body is not None:
        options.append(f"BODY={mail.body.value}")
    if mail.ret is not None:
        options.append(f"RET={mail.ret.value}")
    if mail.envid is not None:
        options.append(f"ENVID={xtext_encode(mail.envid)}")
    rcpt_options: dict[str, tuple[str, ...]] = {}
    for recipient in recipients:
        own = parameters.for_recipient(recipient)
        rcpt_options[recipient] = (
            _dsn_options(parameters, recipient) if own != RecipientParameters() else ()
        )
    return tuple(options), rcpt_options


def _dsn_options(parameters: EnvelopeParameters, recipient: str) -> tuple[str, ...]:
    own = parameters.for_recipient(recipient)
    options: list[str] = []
    if own.notify is not None:
        order = (Notify.NEVER, Notify.SUCCESS, Notify.FAILURE, Notify.DELAY)
        options.append("NOTIFY=" + ",".join(n.value for n in order if n in own.notify))
    if own.orcpt is not None:
        kind, address = own.orcpt
    else:
        # RFC 3461 §6.2.1: a relay passes the recipient as the sender gave it.
        kind, address = ("rfc822" if recipient.isascii() else "utf-8"), recipient
    if kind == "utf-8":
        address = utf8_address_encode(address)  # RFC 6533 §3: ASCII on the wire
    options.append(f"ORCPT={kind};{xtext_encode(address)}")
    return tuple(options)


def _headers(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def _ascii_addresses(addresses: Sequence[str]) -> list[str] | None:
    """The addresses with U-label domains as A-labels; None if a local part is UTF-8."""
    result = []
    for address in addresses:
        if address.isascii():
            result.append(address)
            continue
        local, _, domain = address.rpartition("@")
        if not local.isascii():
            return None
        try:
            result.append(f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}")
        except (idna.IDNAError, UnicodeError):
            return None
    return result


def _convert_for_seven_bit(data: bytes, server: str) -> bytes | ExtensionRefusal:
    headers = _headers(data)
    if _DKIM_SIGNATURE.search(headers) or _SIGNED_CONTENT.search(headers):
        return ExtensionRefusal(
            550,
            f"5.6.3 Conversion required and prohibited: the body is 8-bit, host {server}"
            " does not offer 8BITMIME, and the message is signed (converting it would"
            " break the signature)",
        )
    converted = to_quoted_printable(data)
    if converted is None:
        return ExtensionRefusal(
            550,
            f"5.6.3 Conversion required but not possible: the body is 8-bit, host {server}"
            " does not offer 8BITMIME, and a part is binary or its headers are 8-bit",
        )
    return converted


_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


def to_quoted_printable(data: bytes) -> bytes | None:
    """``data`` with every 8-bit MIME leaf part re-encoded as quoted-printable.

    None when that cannot make it 7-bit: a ``binary`` part, or 8-bit header text (which
    would need RFC 2047 and a charset nobody declared). Parts that are 7-bit already are
    written back unchanged.
    """
    if not _headers(data).isascii():
        return None
    message = email.message_from_bytes(data, policy=_POLICY)
    for part in message.walk():
        if part.is_multipart():
            continue
        if not _convert_part(part):
            return None
    for part in message.walk():
        # A container of parts that are now 7-bit is 7-bit (RFC 2045 §6.4).
        if part.is_multipart() and part.get("Content-Transfer-Encoding", "").lower() == "8bit":
            part.replace_header("Content-Transfer-Encoding", "7bit")
    if "MIME-Version" not in message:
        message["MIME-Version"] = "1.0"
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_POLICY).flatten(message)
    result = out.getvalue()
    return result if result.isascii() else None


def _convert_part(part: Message) -> bool:
    encoding = part.get("Content-Transfer-Encoding", "7bit").strip().lower()
    if encoding not in ("7bit", "8bit", "binary"):
        # Encoded already (quoted-printable, base64): 7-bit unless malformed.
        payload = part.get_payload(decode=False)
        return isinstance(payload, str) and payload.isascii()
    raw = part.get_payload(decode=True)  # the octets as received, for these encodings
    if not isinstance(raw, bytes):
        return False
    if raw.isascii():
        return True
    if encoding == "binary":
        return False  # may hold bare CR/LF or NUL: no line-based encoding keeps it
    lines = raw.replace(b"\r\n", b"\n")
    encoded = binascii.b2a_qp(lines, istext=True).replace(b"\n", b"\r\n")
    part.set_payload(encoded.decode("ascii"))
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", "quoted-printable")
    else:
        part["Content-Transfer-Encoding"] = "quoted-printable"
    return True
