"""What is wrong with a value, in words: the CRD's regex and a close name are not enough.

The API server answers a pattern mismatch with the regex itself (``should match
'^(\\*|\\*\\.\\*|(\\*\\.)?[a-z0-9\\u0080-…'``): true, and of no help to someone who wrote
``Contoso.com`` or ``mx.contoso.com:2525``. ``mailflow validate`` says instead what to
change, from the field the value is in and the usual mistakes for that kind of field.
It also offers the near miss for a mistyped field, kind or enum value (``certificatename``
→ ``certificateName``), case-insensitively first, then by similarity.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

__all__ = ["did_you_mean", "pattern_hint"]

_DOMAIN_FIELDS = frozenset(
    {"recipientDomains", "senderDomains", "certificateName", "host", "domain"}
)
_NAME_FIELDS = frozenset({"name"})
_HOST_AND_PORT = re.compile(r"^[^:\[\]]+:[0-9]+$")
_ALLOWED = re.compile(r"[a-z0-9.\-*\u0080-\uffff]")


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The choice that ``word`` most likely meant, or ``None``."""
    options = list(choices)
    for option in options:
        if option.lower() == word.lower():
            return option
    lowered = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[close[0]] if close else None


def pattern_hint(path: str, value: str, accepts: Callable[[str], bool]) -> str | None:
    """What to change in ``value`` so that the field at ``path`` accepts it, if we know.

    ``accepts`` is the field's pattern: "must be lower case" is said only when lower case
    is all it takes.
    """
    field = re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]
    if field == "pinnedFingerprints":
        if not value.lower().startswith("sha256/"):
            return 'only SHA-256 pins are supported: start with "sha256/"'
        return (
            'must be "sha256/" and then the SHA-256 as 64 hex digits or as 44 base64 characters '
            "ending in '='"
        )
    if field in _FIXED_HINTS:
        return _FIXED_HINTS[field]
    if field == "networks":
        return _network_hint(value)
    if field in _DOMAIN_FIELDS:
        return _domain_hint(field, value, accepts)
    if field in _NAME_FIELDS:
        common = _common_hint(value, accepts, wildcard_ok=False)
        return common or (
            'must be a lower-case Kubernetes name: letters a-z, digits, "-" and ".", '
            "starting and ending with a letter or digit"
        )
    return None


# Fields whose one pattern has one explanation, whatever the value.
_FIXED_HINTS = {
    "key": 'a Secret key may contain only letters, digits, "-", "_" and "."',
    "expireAfter": 'a duration: a whole number and a unit, s, m, h or d ("90d", "12h")',
    "signedHeaders": 'a header field name: printable ASCII without spaces or ":" ("From")',
    "selector": (
        'a DKIM selector: lower-case letters, digits, "-" and "_", labels separated by "." '
        '("s2026")'
    ),
}


def _network_hint(value: str) -> str:
    if "/" not in value:
        return f'a network in CIDR notation: add the prefix length ("{value}/32" for one address)'
    return 'a network in CIDR notation: an IPv4 or IPv6 address, "/" and the prefix length'


def _domain_hint(field: str, value: str, accepts: Callable[[str], bool]) -> str:
    for hint in (
        _host_hint(value) if field == "host" else None,
        _address_hint(field, value),
        _common_hint(value, accepts, wildcard_ok=field != "host"),
    ):
        if hint:
            return hint
    return _DOMAIN_FALLBACK.get(field, "a host name or an IP address")


_DOMAIN_FALLBACK = {
    "recipientDomains": '"*" or "*.*" (every domain), a domain, or "*." and a domain',
    "senderDomains": 'a domain, or "*." and a domain',
    "certificateName": 'a domain, or "*." and a domain',
    "domain": "a domain (the d= of the signatures)",
}


def _host_hint(value: str) -> str | None:
    if _HOST_AND_PORT.match(value):
        host, _, port = value.partition(":")
        return f'put the port in `port:` ({port}) and only the host in `host:` ("{host}")'
    if "://" in value:
        return "a host name or an IP address, not a URL"
    return None


def _address_hint(field: str, value: str) -> str | None:
    if field == "senderDomains" and value in ("*", "*.*"):
        return "leave senderDomains out (or empty) for mail from the whole organisation"
    if "@" in value and field != "host":
        return f'a domain, not an address: write "{value.rsplit("@", 1)[-1].lower()}"'
    return None


def _common_hint(value: str, accepts: Callable[[str], bool], *, wildcard_ok: bool) -> str | None:
    """The usual mistakes in a name, most telling first."""
    checks: tuple[Callable[[str], str | None], ...] = (
        lambda v: "must not be empty" if not v else None,
        lambda v: "must not contain spaces" if v != v.strip() or " " in v else None,
        lambda v: (
            f'must be lower case: "{v.lower()}"' if v != v.lower() and accepts(v.lower()) else None
        ),
        lambda v: _wildcard_hint(v, wildcard_ok=wildcard_ok),
        _character_hint,
        _label_hint,
    )
    for check in checks:
        hint = check(value)
        if hint:
            return hint
    return None


def _wildcard_hint(value: str, *, wildcard_ok: bool) -> str | None:
    if "*" not in value:
        return None
    if not wildcard_ok:
        return "a wildcard is not allowed here"
    if "*" in value[2:] or not value.startswith("*."):
        return 'a wildcard may only be the first label, as in "*.contoso.com"'
    return None


def _character_hint(value: str) -> str | None:
    bad = sorted({c for c in value if not _ALLOWED.match(c)})
    if not bad:
        return None
    shown = ", ".join(f'"{c}"' for c in bad)
    return f'may contain only lower-case letters, digits, "-" and "." (found {shown})'


def _label_hint(value: str) -> str | None:
    labels = value.removeprefix("*.").split(".")
    if any(label == "" for label in labels):
        return "has an empty label: two dots in a row, or a dot at the start or the end"
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return 'a label (the part between dots) may not start or end with "-"'
    if any(len(label) > 63 for label in labels):
        return "a label (the part between dots) may be at most 63 characters long"
    return None
