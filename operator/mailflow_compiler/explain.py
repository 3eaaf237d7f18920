"""``mailflow explain``: which connector takes each recipient, and why.

The decision comes from the relay's own :class:`~mailflow_relay.router.Router`, fed with
the document that the one compiler made; this module only puts it into words.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailflow_compiler.dkim_explain import dkim_json, dkim_lines
from mailflow_compiler.throttles import explain_lines
from mailflow_relay.routing.document import (
    Destination,
    ProfilePool,
    RecipientMx,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.router import Candidate, Client, RouteDecision, Router

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
            "implicitTls": destination.implicit_tls,
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
        "dane": tls.dane.value,
        "mtaSts": tls.mta_sts.value,
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


def _decision_json(
    router: Router, decision: RouteDecision, sender: str, client: Client | None = None
) -> dict[str, object]:
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
        "clients": None if decision.clients is None else str(decision.clients),
        "reason": decision.reason,
        "rejected": decision.rejected,
        "destination": _destination_json(decision.destination),
        "tls": _tls_json(decision.tls),
        "auth": connector is not None and connector.auth is not None,
        "unresolved": [] if connector is None else list(connector.unresolved),
        "candidates": [
            _candidate_json(c) for c in router.candidates_for(decision.recipient, sender, client)
        ],
    }


def explain_json(
    document: RoutingDocument,
    sender: str,
    recipients: Sequence[str],
    client: Client | None = None,
    header_from: str = "",
) -> dict[str, object]:
    router = Router(document)
    decisions = [router.route_for(recipient, sender, client) for recipient in recipients]
    return {
        "sender": sender,
        "client": None if client is None else str(client),
        "dkim": dkim_json(document, header_from or sender, decisions),
        "generation": document.generation,
        "checksum": document.checksum,
        "recipients": [
            _decision_json(router, router.route_for(recipient, sender, client), sender, client)
            for recipient in recipients
        ],
    }


def explain_text(
    document: RoutingDocument,
    sender: str,
    recipients: Sequence[str],
    client: Client | None = None,
    header_from: str = "",
) -> str:
    router = Router(document)
    lines: list[str] = []
    submitted = "" if client is None else f", submitted by {client}"
    for recipient in recipients:
        decision = router.route_for(recipient, sender, client)
        connector = decision.connector
        lines.append(f"{recipient}  (from {sender or '<>'}{submitted})")
        lines.append(f"  connector    {connector.ref if connector else '(none: default route)'}")
        lines.append(f"  why          {decision.reason}")
        if decision.destination is None:
            lines.append("  destination  rejected (550 5.7.1): the default route is Reject")
        else:
            lines.append(f"  destination  {decision.destination.describe()}")
            lines.append(f"  tls          {decision.tls.describe()}")
        if connector is not None and connector.auth is not None:
            lines.append(
                "  auth         SMTP AUTH with the connector's credentials (only over verified TLS)"
            )
        if connector is not None and connector.unresolved:
            lines.extend(
                f"  UNRESOLVED   {reason} — mail on this route is deferred"
                for reason in connector.unresolved
            )
        if decision.clients is not None:
            lines.append(f"  clients      only mail submitted by {decision.clients}")
        lines.extend(explain_lines(decision))
        others = [c for c in router.candidates_for(recipient, sender, client) if not c.chosen]
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
    decisions = [router.route_for(recipient, sender, client) for recipient in recipients]
    lines.extend(dkim_lines(document, header_from or sender, decisions))
    return "\n".join(lines)
