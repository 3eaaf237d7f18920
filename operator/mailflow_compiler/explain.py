"""``mailflow explain``: which connector takes each recipient, and why.

The decision comes from the relay's own :class:`~mailflow_relay.router.Router`, fed with
the document that the one compiler made; this module only puts it into words.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailflow_relay.routing.document import (
    Destination,
    ProfilePool,
    RecipientMx,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.router import Candidate, RouteDecision, Router

__all__ = ["explain_json", "explain_text"]


def _destination_json(destination: Destination | None) -> dict[str, object] | None:
    if destination is None:
        return None
    if isinstance(destination, SmartHost):
        return {
            "kind": "SmartHost",
            "host": destination.host,
            "port": destination.port,
            "mx": destination.mx,
        }
    if isinstance(destination, ProfilePool):
        return {
            "kind": "Profile",
            "profile": str(destination.profile),
            "balancing": destination.balancing.value,
            "servers": [str(s) for s in destination.servers],
        }
    assert isinstance(destination, RecipientMx)
    return {"kind": "RecipientMx"}


def _tls_json(tls: TlsPolicy) -> dict[str, object]:
    # The CA bundle itself is not shown: only whether the connector brings its own.
    return {
        "mode": tls.mode.value,
        "certificateName": tls.certificate_name,
        "caBundle": "connector" if tls.ca_bundle else "system",
        "pinnedFingerprints": list(tls.pinned_fingerprints),
    }


def _candidate_json(candidate: Candidate) -> dict[str, object]:
    return {
        "connector": str(candidate.connector),
        "recipientPattern": str(candidate.recipient_pattern),
        "senderPattern": None
        if candidate.sender_pattern is None
        else str(candidate.sender_pattern),
        "chosen": candidate.chosen,
        "outcome": candidate.outcome,
    }


def _decision_json(router: Router, decision: RouteDecision, sender: str) -> dict[str, object]:
    connector = decision.connector
    return {
        "recipient": decision.recipient,
        "domain": decision.domain,
        "rule": decision.rule.value,
        "connector": None if connector is None else str(connector.ref),
        "recipientPattern": None
        if decision.recipient_pattern is None
        else str(decision.recipient_pattern),
        "senderPattern": None if decision.sender_pattern is None else str(decision.sender_pattern),
        "reason": decision.reason,
        "rejected": decision.rejected,
        "destination": _destination_json(decision.destination),
        "tls": _tls_json(decision.tls),
        "auth": connector is not None and connector.auth is not None,
        "unresolved": [] if connector is None else list(connector.unresolved),
        "candidates": [
            _candidate_json(c) for c in router.candidates_for(decision.recipient, sender)
        ],
    }


def explain_json(
    document: RoutingDocument, sender: str, recipients: Sequence[str]
) -> dict[str, object]:
    router = Router(document)
    return {
        "sender": sender,
        "generation": document.generation,
        "checksum": document.checksum,
        "recipients": [
            _decision_json(router, router.route_for(recipient, sender), sender)
            for recipient in recipients
        ],
    }


def explain_text(document: RoutingDocument, sender: str, recipients: Sequence[str]) -> str:
    router = Router(document)
    lines: list[str] = []
    for recipient in recipients:
        decision = router.route_for(recipient, sender)
        connector = decision.connector
        lines.append(f"{recipient}  (from {sender or '<>'})")
        lines.append(f"  connector    {connector.ref if connector else '(none: default route)'}")
        lines.append(f"  why          {decision.reason}")
        if decision.destination is None:
            lines.append("  destination  rejected (550 5.7.1): the default route is Reject")
        else:
            lines.append(f"  destination  {decision.destination.describe()}")
            lines.append(f"  tls          {decision.tls.describe()}")
        if connector is not None and connector.auth is not None:
            lines.append(
                "  auth         SMTP AUTH with the connector's credentials (over TLS only)"
            )
        if connector is not None and connector.unresolved:
            lines.extend(
                f"  UNRESOLVED   {reason} — mail on this route is deferred"
                for reason in connector.unresolved
            )
        others = [c for c in router.candidates_for(recipient, sender) if not c.chosen]
        if others:
            lines.append("  also matched")
            for candidate in others:
                scope = (
                    ""
                    if candidate.sender_pattern is None
                    else f", sender {candidate.sender_pattern}"
                )
                lines.append(
                    f"    - {candidate.connector} ({candidate.recipient_pattern.describe()}{scope}): "
                    f"{candidate.outcome}"
                )
        lines.append("")
    return "\n".join(lines)
