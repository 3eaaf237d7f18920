"""What a sender asked for beyond the addresses: the ESMTP parameters of MAIL and RCPT.

The listener parses them (:mod:`mailflow_relay.inbound.commands`), the spool keeps them
with the envelope, the deliverer passes them on when the next hop offers the extension
(:mod:`mailflow_relay.outbound.extensions`) and the bounces honour them. They live here,
below inbound, queue and outbound, because all three speak them.

* ``BODY=7BIT|8BITMIME`` (RFC 6152) and ``SMTPUTF8`` (RFC 6531) on MAIL;
* ``RET=FULL|HDRS`` and ``ENVID`` on MAIL, ``NOTIFY`` and ``ORCPT`` on RCPT (RFC 3461);
* ``REQUIRETLS`` on MAIL (RFC 8689).

ENVID and ORCPT are kept decoded (xtext, RFC 3461 §4) and encoded again when passed on.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BodyType",
    "EnvelopeParameters",
    "MailParameters",
    "Notify",
    "RecipientParameters",
    "Ret",
    "XtextError",
    "utf8_address_decode",
    "utf8_address_encode",
    "xtext_decode",
    "xtext_encode",
]

MAX_ENVID = 100
"""RFC 3461 §4.4: ENVID is at most 100 characters (decoded)."""
MAX_ORCPT = 500
"""RFC 3461 §4.2: ORCPT's xtext is at most 500 characters."""


class BodyType(enum.Enum):
    """MAIL ``BODY=`` (RFC 6152); BINARYMIME (RFC 3030) is not offered."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"


class Ret(enum.Enum):
    """MAIL ``RET=`` (RFC 3461 §4.3): what a failure report carries of the message."""

    FULL = "FULL"
    HDRS = "HDRS"


class Notify(enum.Enum):
    """RCPT ``NOTIFY=`` (RFC 3461 §4.1): when the sender wants to hear about a recipient."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


class XtextError(ValueError):
    """Not valid xtext (RFC 3461 §4): a ``+`` not followed by two upper-case hex digits."""

    def __init__(self, text: str) -> None:
        super().__init__(f"not valid xtext: {text[:60]!r}")
        self.text = text


_XTEXT_ESCAPE = re.compile(r"\+([0-9A-F]{2})")
_XTEXT_PLAIN = re.compile(r"[!-*,-<>-~]")  # xchar: 33-126 but "+" and "="


def xtext_decode(text: str) -> str:
    """The value of an xtext; :class:`XtextError` if it is not one.

    ``+HH`` escapes are octets, read as UTF-8 (what :func:`xtext_encode` writes for a
    UTF-8 address). RFC 6533 lets a UTF-8 address appear as is in ORCPT's utf-8 type;
    those characters pass unchanged (the listener only allows them with SMTPUTF8).
    """
    if "+" in _XTEXT_ESCAPE.sub("", text) or any(c < "!" or c in "=\x7f" for c in text):
        raise XtextError(text)
    octets = bytearray()
    position = 0
    for escape in _XTEXT_ESCAPE.finditer(text):
        octets += text[position : escape.start()].encode("utf-8")
        octets.append(int(escape[1], 16))
        position = escape.end()
    octets += text[position:].encode("utf-8")
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError as e:
        raise XtextError(text) from e


def xtext_encode(value: str) -> str:
    """``value`` as xtext: every character outside xchar becomes ``+HH`` (UTF-8 octets)."""
    out: list[str] = []
    for char in value:
        if _XTEXT_PLAIN.fullmatch(char):
            out.append(char)
        elif char.isascii():
            out.append(f"+{ord(char):02X}")
        else:
            out.extend(f"+{octet:02X}" for octet in char.encode("utf-8"))
    return "".join(out)


_EMBEDDED_UNICODE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def utf8_address_decode(text: str) -> str:
    """RFC 6533 §3's ``utf-8-addr-xtext``: ``\\x{FC}`` escapes back to characters (what
    Postfix sends as ``ORCPT=utf-8;j\\x{FC}rgen@…``); :class:`XtextError` if one is not
    a character."""
    try:
        return _EMBEDDED_UNICODE.sub(lambda m: chr(int(m[1], 16)), text)
    except (ValueError, OverflowError) as e:
        raise XtextError(text) from e


def utf8_address_encode(address: str) -> str:
    """``address`` as ``utf-8-addr-xtext`` (RFC 6533 §3): ASCII, ``\\x{HEX}`` for the rest."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in address
    )


@dataclass(frozen=True)
class MailParameters:
    """The parameters of one MAIL command that this relay acts on."""

    body: BodyType | None = None
    """``BODY=`` as declared; None: not declared (taken as 8-bit clean when it is 8-bit)."""
    smtputf8: bool = False
    """``SMTPUTF8``: UTF-8 may appear in the envelope and the headers (RFC 6531)."""
    ret: Ret | None = None
    """``RET=``; None: not asked (a failure report carries the headers)."""
    envid: str | None = None
    """``ENVID=`` decoded: the sender's id, returned as ``Original-Envelope-Id``."""
    requiretls: bool = False
    """``REQUIRETLS``: deliver only over verified TLS to hops that offer it (RFC 8689)."""

    def to_json(self) -> dict[str, Any]:
        return {
            **({"body": self.body.value} if self.body is not None else {}),
            **({"smtputf8": True} if self.smtputf8 else {}),
            **({"ret": self.ret.value} if self.ret is not None else {}),
            **({"envid": self.envid} if self.envid is not None else {}),
            **({"requiretls": True} if self.requiretls else {}),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> MailParameters:
        body, ret, envid = raw.get("body"), raw.get("ret"), raw.get("envid")
        if envid is not None and not isinstance(envid, str):
            raise ValueError(f"envid is not a string: {envid!r}")
        return cls(
            body=None if body is None else BodyType(body),
            smtputf8=raw.get("smtputf8") is True,
            ret=None if ret is None else Ret(ret),
            envid=envid,
            requiretls=raw.get("requiretls") is True,
        )


@dataclass(frozen=True)
class RecipientParameters:
    """The DSN parameters of one RCPT command (RFC 3461 §4.1, §4.2)."""

    notify: frozenset[Notify] | None = None
    """``NOTIFY=``; None: not asked (failures are reported, delays when configured)."""
    orcpt: tuple[str, str] | None = None
    """``ORCPT=`` as (address type, decoded address), e.g. ``("rfc822", "a@example.test")``."""

    def wants(self, event: Notify) -> bool:
        """Whether the sender wants a report of ``event`` (FAILURE and DELAY by default)."""
        if self.notify is None:
            return event is not Notify.SUCCESS
        return event in self.notify

    def to_json(self) -> dict[str, Any]:
        return {
            **({"notify": sorted(n.value for n in self.notify)} if self.notify is not None else {}),
            **({"orcpt": list(self.orcpt)} if self.orcpt is not None else {}),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RecipientParameters:
        notify, orcpt = raw.get("notify"), raw.get("orcpt")
        if orcpt is not None and not (
            isinstance(orcpt, list) and len(orcpt) == 2 and all(isinstance(p, str) for p in orcpt)
        ):
            raise ValueError(f"orcpt is not [type, address]: {orcpt!r}")
        return cls(
            notify=None if notify is None else frozenset(Notify(n) for n in notify),
            orcpt=None if orcpt is None else (orcpt[0], orcpt[1]),
        )


_NO_RECIPIENT_PARAMETERS = RecipientParameters()
_NO_MAIL_PARAMETERS = MailParameters()


@dataclass(frozen=True)
class EnvelopeParameters:
    """A message's MAIL parameters and each recipient's RCPT parameters."""

    mail: MailParameters = field(default_factory=MailParameters)
    recipients: tuple[tuple[str, RecipientParameters], ...] = ()
    """(recipient, its parameters), only for recipients that gave any."""

    @classmethod
    def of(
        cls, mail: MailParameters, recipients: Iterable[tuple[str, RecipientParameters]]
    ) -> EnvelopeParameters:
        return cls(mail, tuple((a, p) for a, p in recipients if p != _NO_RECIPIENT_PARAMETERS))

    def __bool__(self) -> bool:
        return self.mail != _NO_MAIL_PARAMETERS or bool(self.recipients)

    def for_recipient(self, address: str) -> RecipientParameters:
        for recipient, parameters in self.recipients:
            if recipient == address:
                return parameters
        return _NO_RECIPIENT_PARAMETERS

    def to_json(self) -> dict[str, Any]:
        return {
            "mail": self.mail.to_json(),
            "recipients": {a: p.to_json() for a, p in self.recipients},
        }

    @classmethod
    def from_json(cls, raw: object) -> EnvelopeParameters:
        """The stored form back; :class:`ValueError` (or Key/TypeError) if it is malformed."""
        if not isinstance(raw, dict):
            raise TypeError(f"parameters are not an object: {raw!r}")
        recipients = raw.get("recipients", {})
        if not isinstance(recipients, dict):
            raise TypeError(f"recipient parameters are not an object: {recipients!r}")
        return cls(
            MailParameters.from_json(raw.get("mail", {})),
            tuple((str(a), RecipientParameters.from_json(p)) for a, p in recipients.items()),
        )
