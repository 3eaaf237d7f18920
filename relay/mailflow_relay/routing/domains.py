"""Domain names and the connector patterns that match them.

Every domain that reaches a routing decision goes through :func:`normalize_domain`
once: case folded, the trailing root dot removed, and internationalised labels turned
into their A-label (punycode) form with IDNA 2008 and the UTS 46 mapping. After that,
matching is plain string comparison, so ``Bücher.example.``, ``bücher.example`` and
``xn--bcher-kva.example`` all meet the same connector.

Patterns follow the hosted "outbound connector" model:

* ``*`` or ``*.*`` — every domain (catch-all);
* ``contoso.com`` — that domain only;
* ``*.contoso.com`` — any subdomain at any depth, but not ``contoso.com`` itself.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

import idna

from mailflow_relay.errors import InvalidDomainError

__all__ = [
    "DomainPattern",
    "PatternKind",
    "is_ip_literal",
    "normalize_domain",
    "normalize_host",
    "parent_domains",
]

MAX_DOMAIN_LENGTH = 253
CATCH_ALL_SPELLINGS = frozenset({"*", "*.*"})


def normalize_domain(text: str) -> str:
    """Return the canonical (lower-case A-label, no trailing dot) form of a domain."""
    candidate = text.strip()
    if candidate.endswith("."):
        candidate = candidate[:-1]  # the root label; only one may be written
    if not candidate:
        raise InvalidDomainError(text, "empty domain")
    if candidate.endswith(".") or ".." in candidate:
        raise InvalidDomainError(text, "empty label")
    if candidate.startswith("[") or is_ip_literal(candidate):
        raise InvalidDomainError(text, "an address literal is not a domain")
    try:
        # uts46 folds case and maps compatibility characters the way mail clients do;
        # transitional=False keeps IDNA 2008's treatment of ß and ς.
        encoded = idna.encode(candidate, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as e:
        raise InvalidDomainError(text, f"not a valid (internationalised) domain name: {e}") from e
    encoded = encoded.lower()
    if len(encoded) > MAX_DOMAIN_LENGTH:
        raise InvalidDomainError(text, f"longer than {MAX_DOMAIN_LENGTH} characters")
    return encoded


def is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def normalize_host(text: str) -> str:
    """Canonical form of a next-hop host: an IP address as written by ``ipaddress``, else a domain."""
    stripped = text.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(stripped))
    except ValueError:
        pass
    labels = stripped.rstrip(".").split(".")
    if labels and all(label.isdigit() for label in labels):
        raise InvalidDomainError(text, "looks like an IPv4 address but is not a valid one")
    return normalize_domain(stripped)


def parent_domains(domain: str) -> list[str]:
    """Proper parent domains, nearest first: ``a.b.c`` → ``["b.c", "c"]``."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(1, len(labels))]


class PatternKind(enum.Enum):
    EXACT = "exact"
    SUBDOMAINS = "subdomains"
    ANY = "any"


@dataclass(frozen=True)
class DomainPattern:
    """A recipient or sender domain pattern, parsed and normalised once."""

    kind: PatternKind
    domain: str  # A-label form; "" for ANY

    @classmethod
    def parse(cls, text: str) -> DomainPattern:
        stripped = text.strip()
        if stripped in CATCH_ALL_SPELLINGS:
            return cls(PatternKind.ANY, "")
        if stripped.startswith("*."):
            rest = stripped[2:]
            if "*" in rest:
                raise InvalidDomainError(text, "a wildcard may only be the leftmost label")
            return cls(PatternKind.SUBDOMAINS, normalize_domain(rest))
        if "*" in stripped:
            raise InvalidDomainError(text, "a wildcard must be '*', '*.*' or a leading '*.'")
        return cls(PatternKind.EXACT, normalize_domain(stripped))

    def matches(self, domain: str) -> bool:
        """Whether an already normalised domain falls under this pattern."""
        if self.kind is PatternKind.ANY:
            return True
        if self.kind is PatternKind.EXACT:
            return domain == self.domain
        return domain.endswith("." + self.domain)

    @property
    def specificity(self) -> tuple[int, int]:
        """Higher is more specific: exact beats any wildcard, a longer suffix beats a shorter."""
        if self.kind is PatternKind.EXACT:
            return (2, len(self.domain.split(".")))
        if self.kind is PatternKind.SUBDOMAINS:
            return (1, len(self.domain.split(".")))
        return (0, 0)

    def __str__(self) -> str:
        if self.kind is PatternKind.ANY:
            return "*"
        if self.kind is PatternKind.SUBDOMAINS:
            return "*." + self.domain
        return self.domain

    def describe(self) -> str:
        if self.kind is PatternKind.ANY:
            return "catch-all '*'"
        if self.kind is PatternKind.SUBDOMAINS:
            return f"wildcard '*.{self.domain}'"
        return f"exact '{self.domain}'"
