"""MAIL and RCPT arguments, parsed strictly: the path (RFC 5321 §4.1.2) and the parameters.

aiosmtpd parses addresses with the ``email`` package's header parser (about 95 µs a
command, and it accepts header syntax that is no SMTP path, such as comments) and
upper-cases every parameter, which would corrupt ENVID and ORCPT (xtext is case-sensitive).
This module replaces both with one pass of regular expressions over the argument:

* a path is ``<local@domain>``, a MAIL path may be ``<>``; the obsolete source route
  (``<@a,@b:user@c>``) is dropped as RFC 5321 §4.1.2 says; a bare address without angle
  brackets is accepted, as Postfix and aiosmtpd do;
* the local part is a dot-string or a quoted string (at most 64 octets), the domain a
  host name (labels of at most 63 octets) or an address literal (``[192.0.2.1]``,
  ``[IPv6:…]``); UTF-8 is allowed in both only after ``SMTPUTF8`` (RFC 6531 §3.3), and
  a U-label must be valid IDNA;
* each parameter is ``keyword[=value]`` (RFC 5321 §4.1.2), known keywords only, each once.

Every refusal is a :class:`CommandRefused` carrying the complete reply.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TypeVar

import idna

from mailflow_relay.envelope import (
    MAX_ENVID,
    MAX_ORCPT,
    BodyType,
    MailParameters,
    Notify,
    RecipientParameters,
    Ret,
    XtextError,
    utf8_address_decode,
    xtext_decode,
)

__all__ = ["CommandRefused", "MailCommand", "RcptCommand", "parse_mail", "parse_rcpt"]

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class CommandRefused(ValueError):
    """The argument of MAIL or RCPT is not acceptable; ``reply`` says why, with its code."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class MailCommand:
    address: str
    """The reverse path without angle brackets; empty for ``<>``."""
    parameters: MailParameters
    size: int | None
    """``SIZE=``, if declared."""


@dataclass(frozen=True)
class RcptCommand:
    address: str
    parameters: RecipientParameters


_UTF8 = "\u0080-\U0010ffff"
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
_QUOTED_ASCII = re.compile(r'"(?:[ !#-\[\]-~]|\\[ -~])*"')
_QUOTED_UTF8 = re.compile(rf'"(?:[ !#-\[\]-~{_UTF8}]|\\[ -~])*"')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SOURCE_ROUTE = re.compile(r"@[^,:<>\s]+(?:,@[^,:<>\s]+)*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE_ASCII = re.compile(r"[!-<>-~]+")
_VALUE_UTF8 = re.compile(rf"[!-<>-~{_UTF8}]+")
_SIZE = re.compile(r"[0-9]{1,20}")
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")

_E = TypeVar("_E", BodyType, Ret)

_BAD_UTF8 = "500 5.5.2 Error: bad UTF-8 syntax"
_NEED_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"


def parse_mail(arg: str | None, *, esmtp: bool, tls: bool) -> MailCommand:
    """``MAIL FROM:<path> [params]``; ``tls``: REQUIRETLS is offered (the session is TLS)."""
    syntax = "501 5.5.4 Syntax: MAIL FROM:<address>" + (" [SP <parameters>]" if esmtp else "")
    rest = _after_keyword(arg, "FROM:", syntax)
    utf8 = _declares_smtputf8(rest)
    address, params = _split_path(rest, syntax, sender=True, utf8=utf8)
    if params and not esmtp:
        raise CommandRefused(syntax)
    body: BodyType | None = None
    ret: Ret | None = None
    envid: str | None = None
    size: int | None = None
    smtputf8 = requiretls = False
    for keyword, value in _parameters(params, utf8=utf8):
        if keyword == "SIZE":
            if value is None or not _SIZE.fullmatch(value):
                raise CommandRefused("501 5.5.4 Bad SIZE parameter syntax")
            size = int(value)
        elif keyword == "BODY":
            body = _enum(BodyType, value, "501 5.5.4 BODY can only be 7BIT or 8BITMIME")
        elif keyword == "SMTPUTF8":
            _no_value(keyword, value)
            smtputf8 = True
        elif keyword == "RET":
            ret = _enum(Ret, value, "501 5.5.4 Bad RET parameter syntax: FULL or HDRS")
        elif keyword == "ENVID":
            envid = _envid(value)
        elif keyword == "REQUIRETLS" and tls:
            _no_value(keyword, value)
            requiretls = True
        elif keyword == "AUTH":
            # RFC 4954 §5: the submitter's claimed identity, never trusted from a client;
            # accepted (Postfix's smtp client sends AUTH=<>) and not passed on.
            if value is None:
                raise CommandRefused("501 5.5.4 Bad AUTH parameter syntax")
        else:
            raise CommandRefused(f"555 5.5.4 Unsupported option: {keyword}")
    parameters = MailParameters(
        body=body, smtputf8=smtputf8, ret=ret, envid=envid, requiretls=requiretls
    )
    return MailCommand(address, parameters, size)


def parse_rcpt(arg: str | None, *, esmtp: bool, smtputf8: bool) -> RcptCommand:
    """``RCPT TO:<path> [params]``; ``smtputf8``: MAIL declared SMTPUTF8."""
    syntax = "501 5.5.4 Syntax: RCPT TO:<address>" + (" [SP <parameters>]" if esmtp else "")
    rest = _after_keyword(arg, "TO:", syntax)
    address, params = _split_path(rest, syntax, sender=False, utf8=smtputf8)
    if params and not esmtp:
        raise CommandRefused(syntax)
    notify: frozenset[Notify] | None = None
    orcpt: tuple[str, str] | None = None
    for keyword, value in _parameters(params, utf8=smtputf8):
        if keyword == "NOTIFY":
            notify = _notify(value)
        elif keyword == "ORCPT":
            orcpt = _orcpt(value, utf8=smtputf8)
        else:
            raise CommandRefused(f"555 5.5.4 Unsupported option: {keyword}")
    return RcptCommand(address, RecipientParameters(notify=notify, orcpt=orcpt))


# --- the path ----------------------------------------------------------------------------


def _after_keyword(arg: str | None, keyword: str, syntax: str) -> str:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        raise CommandRefused(syntax)
    rest = arg[len(keyword) :].lstrip(" ")
    if _has_surrogates(rest):
        # aiosmtpd decodes with surrogateescape: invalid UTF-8 arrives as lone surrogates.
        raise CommandRefused(_BAD_UTF8)
    return rest


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text) if not text.isascii() else False


def _declares_smtputf8(rest: str) -> bool:
    """Whether the parameters hold SMTPUTF8 (needed before the path is checked)."""
    return any(word.upper() == "SMTPUTF8" for word in rest.split(" ")[1:])


def _split_path(rest: str, syntax: str, *, sender: bool, utf8: bool) -> tuple[str, str]:
    """(address, parameters) from ``<path> params`` or ``address params``."""
    if rest.startswith("<"):
        path, params = _bracketed(rest, syntax)
    else:
        path, _, params = rest.partition(" ")
        if not path:
            raise CommandRefused(syntax)
    if len(path.encode("utf-8")) > MAX_PATH:
        raise CommandRefused(
            "501 5.1.0 Address too long" if sender else "501 5.1.3 Address too long"
        )
    if path == "" and sender:
        return "", params.strip(" ")
    source_route = _SOURCE_ROUTE.match(path)
    if source_route is not None:
        path = path[source_route.end() :]
    _check_mailbox(path, sender=sender, utf8=utf8)
    return path, params.strip(" ")


def _bracketed(rest: str, syntax: str) -> tuple[str, str]:
    """The text between ``<`` and its ``>`` (a quoted local part may hold ``>``)."""
    index = 1
    quoted = False
    while index < len(rest):
        char = rest[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            after = rest[index + 1 :]
            if after and not after.startswith(" "):
                raise CommandRefused(syntax)
            return rest[1:index], after
        index += 1
    raise CommandRefused(syntax)


def _check_mailbox(mailbox: str, *, sender: bool, utf8: bool) -> None:
    bad = (
        "501 5.1.7 Bad sender address syntax"
        if sender
        else "501 5.1.3 Bad recipient address syntax"
    )
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise CommandRefused(bad)
    if not mailbox.isascii() and not utf8:
        raise CommandRefused(_NEED_SMTPUTF8)
    if utf8:
        local_ok = _DOT_STRING_UTF8.fullmatch(local) or _QUOTED_UTF8.fullmatch(local)
    else:
        local_ok = _DOT_STRING_ASCII.fullmatch(local) or _QUOTED_ASCII.fullmatch(local)
    if not local_ok or len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise CommandRefused(bad)
    if not _valid_domain(domain):
        raise CommandRefused(bad)


def _valid_domain(domain: str) -> bool:
    if domain.startswith("["):
        return _valid_literal(domain)
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        return False
    for label in domain.split("."):
        if label.isascii():
            if not _LDH_LABEL.fullmatch(label):
                return False
            continue
        try:
            a_label = idna.alabel(label)
        except (idna.IDNAError, UnicodeError):
            return False
        if len(a_label) > 63:
            return False
    return True


def _valid_literal(domain: str) -> bool:
    if not domain.endswith("]"):
        return False
    inner = domain[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


# --- the parameters ----------------------------------------------------------------------


def _parameters(text: str, *, utf8: bool) -> list[tuple[str, str | None]]:
    """(KEYWORD, value or None) per parameter, keywords upper-cased, each at most once."""
    seen: set[str] = set()
    result: list[tuple[str, str | None]] = []
    value_pattern = _VALUE_UTF8 if utf8 else _VALUE_ASCII
    for word in text.split(" "):
        if not word:
            continue  # several spaces between parameters: tolerated, as Postfix does
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not value_pattern.fullmatch(value)):
            raise CommandRefused(f"501 5.5.4 Bad parameter syntax: {_shown(word)}")
        keyword = keyword.upper()
        if keyword in seen:
            raise CommandRefused(f"501 5.5.4 Duplicate parameter: {keyword}")
        seen.add(keyword)
        result.append((keyword, value if eq else None))
    return result


def _shown(word: str) -> str:
    return re.sub(r"[^!-~]", "?", word)[:40]


def _no_value(keyword: str, value: str | None) -> None:
    if value is not None:
        raise CommandRefused(f"501 5.5.4 {keyword} takes no value")


def _enum(kind: type[_E], value: str | None, reply: str) -> _E:
    try:
        return kind((value or "").upper())
    except ValueError:
        raise CommandRefused(reply) from None


def _envid(value: str | None) -> str:
    reply = "501 5.5.4 Bad ENVID parameter syntax"
    if value is None:
        raise CommandRefused(reply)
    try:
        decoded = xtext_decode(value)
    except XtextError:
        raise CommandRefused(reply) from None
    # RFC 3461 §4.4: printable US-ASCII only, at most 100 characters.
    if not decoded or len(decoded) > MAX_ENVID or not all(" " < c <= "~" for c in decoded):
        raise CommandRefused(reply)
    return decoded


def _notify(value: str | None) -> frozenset[Notify]:
    reply = "501 5.5.4 Bad NOTIFY parameter syntax: NEVER, or SUCCESS, FAILURE, DELAY"
    words = (value or "").upper().split(",")
    try:
        notify = [Notify(word) for word in words]
    except ValueError:
        raise CommandRefused(reply) from None
    if len(set(notify)) != len(notify) or (Notify.NEVER in notify and len(notify) > 1):
        raise CommandRefused(reply)
    return frozenset(notify)


def _orcpt(value: str | None, *, utf8: bool) -> tuple[str, str]:
    reply = "501 5.5.4 Bad ORCPT parameter syntax"
    if value is None or len(value) > MAX_ORCPT:
        raise CommandRefused(reply)
    address_type, semicolon, xtext = value.partition(";")
    if not semicolon or not xtext or not _ADDRESS_TYPE.fullmatch(address_type):
        raise CommandRefused(reply)
    try:
        address = xtext_decode(xtext)
        if address_type.lower() == "utf-8":
            address = utf8_address_decode(address)
    except XtextError:
        raise CommandRefused(reply) from None
    if any(c < " " or c == "\x7f" for c in address) or (not xtext.isascii() and not utf8):
        raise CommandRefused(reply)
    return address_type.lower(), address
