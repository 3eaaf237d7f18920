"""Status of OutboundConnectors and MultiSmtpProfiles, following the API conventions.

Pure functions: given what the compiler found, what the relays serve and what the last
probe saw, compute the ``status`` an object should have. The reconciler writes it only
when it differs from what is stored, so an unchanged world makes no API writes.

Conditions have the ``metav1.Condition`` shape. ``lastTransitionTime`` changes only
when a condition's *status* changes (a new reason or message keeps the old time), so a
restarted operator that computes the same statuses writes nothing at all. ``Ready`` is
the summary that GitOps tools read (Argo CD's health.lua, Flux's kstatus): True when the
object is accepted, its references resolve and every ready relay serves it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mailflow_compiler.compiler import Finding

__all__ = [
    "ACCEPTED",
    "DESTINATION_REACHABLE",
    "PROGRAMMED",
    "RATE_LIMITED",
    "READY",
    "RECONCILING",
    "RESOLVED_REFS",
    "STALLED",
    "TLS_VERIFIED",
    "Condition",
    "RelayCount",
    "kstatus",
    "merge_conditions",
    "now_rfc3339",
    "rate_limited",
]

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
PROGRAMMED = "Programmed"
READY = "Ready"
DESTINATION_REACHABLE = "DestinationReachable"
TLS_VERIFIED = "TLSVerified"
RATE_LIMITED = "RateLimited"
"""A connector's destination answered 421 / 4.7.x and relays lowered its rate (their pods'
backoff annotation); informational, never part of Ready."""
RATE_LIMIT_REPLIES = "RateLimitReplies"
FULL_RATE = "FullRate"
TRANSPORT_SECURITY = "TransportSecurity"
"""What DANE and MTA-STS did on the connector's last deliveries, as the ready relays report
it (their pods' transport-security annotation); informational, never part of Ready."""
VERIFIED = "Verified"
"""True: the last deliveries were authenticated by DANE (TLSA) or met the MTA-STS policy."""
NO_POLICY = "NoPolicy"
"""True: no usable DANE records (the connector's TLS mode applied) and no MTA-STS failure."""
NOT_REPORTED = "NotReported"
"""Unknown: no ready relay has delivered under DANE or MTA-STS since it started."""
DANE_FAILED = "DaneFailed"
"""False: a delivery was refused by DANE (TLSA mismatch, TLS failure, a lookup that failed,
Mandatory without records): the mail waits; see mailflow_dane_results_total."""
MTA_STS_FAILED = "MtaStsFailed"
"""False: a delivery did not meet the domain's MTA-STS policy (an RFC 8460 result type)."""
DANE_FAILURES = frozenset({"mismatch", "tls_failed", "lookup_failed", "required"})
RECONCILING = "Reconciling"
STALLED = "Stalled"
ORDER = (
    ACCEPTED,
    RESOLVED_REFS,
    PROGRAMMED,
    READY,
    RECONCILING,
    STALLED,
    DESTINATION_REACHABLE,
    TLS_VERIFIED,
)
PROBE_CONDITIONS = (DESTINATION_REACHABLE, TLS_VERIFIED)


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    """``"True"``, ``"False"`` or ``"Unknown"``."""
    reason: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "True"


@dataclass(frozen=True)
class RelayCount:
    synced: int
    ready: int

    def __str__(self) -> str:
        return f"{self.synced}/{self.ready}"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_MESSAGE = 4096
"""Well under the CRD's 32768: one connector with many findings must not make its whole
status (and so every other object's, in the same pass) unwritable."""


def _bounded(parts: Sequence[str]) -> str:
    text = ""
    for shown, part in enumerate(parts):
        candidate = f"{text}; {part}" if text else part
        if len(candidate) > MAX_MESSAGE:
            return f"{text}; … and {len(parts) - shown} more"
        text = candidate
    return text


def _findings_text(findings: Sequence[Finding]) -> str:
    return _bounded([f"{f.path}: {f.message}" for f in findings])


def accepted(findings: Sequence[Finding], schema_errors: Sequence[str]) -> Condition:
    if schema_errors:
        return Condition(ACCEPTED, "False", "InvalidValue", _bounded(schema_errors))
    mine = [f for f in findings if f.condition == ACCEPTED]
    if not mine:
        return Condition(
            ACCEPTED, "True", "Accepted", "The spec is valid and conflicts with no other connector"
        )
    conflicted = [f for f in mine if f.reason == "Conflicted"]
    reason = "Conflicted" if conflicted else mine[0].reason
    return Condition(ACCEPTED, "False", reason, _findings_text(mine))


def resolved_refs(findings: Sequence[Finding], *, has_refs: bool) -> Condition:
    mine = [f for f in findings if f.condition == RESOLVED_REFS]
    if mine:
        return Condition(RESOLVED_REFS, "False", mine[0].reason, _findings_text(mine))
    message = "Every referenced object exists" if has_refs else "Nothing to resolve"
    return Condition(RESOLVED_REFS, "True", "ResolvedRefs", message)


def programmed(config_generation: int | None, relays: RelayCount, selector: str) -> Condition:
    if config_generation is None:
        return Condition(
            PROGRAMMED, "False", "Invalid", "Not in the routing document: the spec is invalid"
        )
    if relays.ready == 0:
        return Condition(
            PROGRAMMED,
            "False",
            "NoReadyRelays",
            f"No ready relay pod matches {selector!r}; routing generation {config_generation} "
            "is published",
        )
    if relays.synced == relays.ready:
        return Condition(
            PROGRAMMED,
            "True",
            "Programmed",
            f"{relays} ready relay pods serve routing generation {config_generation} or newer",
        )
    return Condition(
        PROGRAMMED,
        "False",
        "Pending",
        f"{relays} ready relay pods serve routing generation {config_generation} or newer",
    )


def rate_limited(
    connector: str, backoffs: Sequence[Mapping[str, float]], *, shown_before: bool
) -> Condition | None:
    """``RateLimited`` from the ready relays' backoff (None: never limited, no condition)."""
    factors = [b[connector] for b in backoffs if connector in b]
    if factors:
        return Condition(
            RATE_LIMITED,
            "True",
            RATE_LIMIT_REPLIES,
            f"The destination answered 421 or 4.7.x: {len(factors)}/{len(backoffs)} ready relays"
            f" send at {min(factors):.0%} or more of the normal rate and connections, recovering"
            " on their own (see mailflow_backoff_factor)",
        )
    if shown_before:
        return Condition(RATE_LIMITED, "False", FULL_RATE, "Every ready relay sends at full rate")
    return None


def transport_security(
    connector: str, reports: Sequence[Mapping[str, Mapping[str, str]]], *, shown_before: bool
) -> Condition | None:
    """``TransportSecurity`` from the ready relays' last DANE / MTA-STS outcomes (None: no
    relay has delivered under such a policy, and the condition was never shown)."""
    entries = [r[connector] for r in reports if connector in r]
    if not entries:
        if shown_before:
            return Condition(
                TRANSPORT_SECURITY,
                "Unknown",
                NOT_REPORTED,
                "No ready relay has delivered under DANE or MTA-STS since it started",
            )
        return None
    dane = sorted({e["dane"] for e in entries if "dane" in e})
    sts = sorted({e["mtaSts"] for e in entries if "mtaSts" in e})
    where = f"{len(entries)}/{len(reports)} ready relays"
    if failed := [d for d in dane if d in DANE_FAILURES]:
        return Condition(
            TRANSPORT_SECURITY,
            "False",
            DANE_FAILED,
            f"DANE refused the next hop ({', '.join(failed)}) on the last deliveries of {where};"
            " the mail waits (see mailflow_dane_results_total)",
        )
    if failed := [r for r in sts if r != "success"]:
        return Condition(
            TRANSPORT_SECURITY,
            "False",
            MTA_STS_FAILED,
            f"The MTA-STS policy was not met ({', '.join(failed)}) on the last deliveries of"
            f" {where} (see mailflow_tls_policy_results_total)",
        )
    verified = [
        *(["DANE verified the next hop"] if "verified" in dane else []),
        *(["the MTA-STS policy was met"] if "success" in sts else []),
    ]
    if verified:
        text = " and ".join(verified)
        return Condition(
            TRANSPORT_SECURITY,
            "True",
            VERIFIED,
            f"{text[0].upper()}{text[1:]} on the last deliveries of {where}",
        )
    return Condition(
        TRANSPORT_SECURITY,
        "True",
        NO_POLICY,
        f"No usable DANE records ({', '.join(dane)}): the connector's TLS mode applied on the"
        f" last deliveries of {where}",
    )


def ready(conditions: Sequence[Condition]) -> Condition:
    for condition in conditions:
        if not condition.ok:
            return Condition(
                READY,
                "False",
                condition.reason,
                f"{condition.type}: {condition.message}"[:MAX_MESSAGE],
            )
    return Condition(
        READY, "True", "Ready", "Accepted, references resolved, served by every ready relay"
    )


def kstatus(conditions: Sequence[Condition]) -> list[Condition]:
    """``Reconciling`` and ``Stalled``, the abnormal-true pair that kstatus (Flux, kpt,
    cli-utils) reads for custom resources, which does not look at ``Ready``.

    Stalled: it will not get better without a change by a person (invalid, conflicted,
    a reference that does not resolve). Reconciling: it is on its way (relays catching up).
    """
    by_type = {c.type: c for c in conditions}
    blocking = [by_type[t] for t in (ACCEPTED, RESOLVED_REFS) if t in by_type and not by_type[t].ok]
    if blocking:
        stalled = Condition(STALLED, "True", blocking[0].reason, blocking[0].message[:MAX_MESSAGE])
        reconciling = Condition(
            RECONCILING, "False", "Stalled", "Waiting for a change of the spec or its references"
        )
        return [reconciling, stalled]
    stalled = Condition(STALLED, "False", "Accepted", "Nothing blocks this object")
    programmed_ = by_type.get(PROGRAMMED)
    if programmed_ is not None and not programmed_.ok:
        return [Condition(RECONCILING, "True", programmed_.reason, programmed_.message), stalled]
    return [Condition(RECONCILING, "False", "Programmed", "Served by every ready relay"), stalled]


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    desired: Sequence[Condition],
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """The conditions list to store: ``lastTransitionTime`` kept unless the status changed.

    Probe conditions not in ``desired`` (no probe has run since the operator started) are
    carried over unchanged, so a restart does not make them disappear and come back.
    """
    before = {str(c.get("type")): c for c in previous or () if isinstance(c, Mapping)}
    result: dict[str, dict[str, Any]] = {}
    for condition in desired:
        old = before.get(condition.type)
        changed = old is None or old.get("status") != condition.status
        result[condition.type] = {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "observedGeneration": generation,
            "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),  # type: ignore[union-attr]
        }
    for kind in PROBE_CONDITIONS:
        if kind not in result and kind in before:
            result[kind] = dict(before[kind])
    return [result[t] for t in ORDER if t in result] + [
        c for t, c in sorted(result.items()) if t not in ORDER
    ]
