"""What a delivery attempt tells the engine: per recipient, per server tried, and the TLS."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mailflow_relay.outbound.tls_policy import CertificateInfo, TlsFailure
from mailflow_relay.outbound.tlsrpt import PolicyResult

__all__ = ["Attempt", "DeliveryReport", "DeliveryStatus", "RecipientResult"]


class DeliveryStatus(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    status: DeliveryStatus
    code: int
    message: str


@dataclass(frozen=True)
class Attempt:
    """One target tried, for logs, ``make demo`` and debugging."""

    target: str
    outcome: str


@dataclass(frozen=True)
class DeliveryReport:
    results: tuple[RecipientResult, ...]
    server: str | None = None
    """The target that took the message (or the last one tried)."""
    tls_version: str | None = None
    certificate: CertificateInfo | None = None
    verified: bool = False
    """The certificate was checked as the mode requires (chain, name or pins)."""
    tls_failure: TlsFailure | None = None
    attempts: tuple[Attempt, ...] = ()
    dane: str | None = None
    """What DANE did (a :class:`~.dane.DaneOutcome` value); None when ``tls.dane`` is None."""
    policy_results: tuple[PolicyResult, ...] = ()
    """Each TLS session or TLS refusal, as TLS-RPT (RFC 8460) counts them."""
    protocol_errors: int = 0
    """Targets that answered out of protocol (``250`` to ``DATA``, no valid reply code, a
    line over the limit): never a delivery, counted so that a broken next hop shows."""
    dsn: bool = False
    """The next hop offered DSN and got the sender's NOTIFY: it reports success itself."""
    extension_decisions: tuple[str, ...] = ()
    """What was changed (``quoted-printable``, ``a-labels``) or refused (``5.6.7``,
    ``5.6.3``, ``5.7.30``) to fit the next hop's extensions."""

    def status_of(self, recipient: str) -> DeliveryStatus:
        return next(r.status for r in self.results if r.recipient == recipient)
