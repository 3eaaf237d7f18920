"""TLS reporting (RFC 8460): per policy domain, the sessions that succeeded and those that failed.

Every delivery attempt under a DANE or MTA-STS policy (or under none) gives one
:class:`PolicyResult`; a :class:`TlsReportStore` counts them per policy (type, domain and
policy strings), with the failure details of RFC 8460 §4.3 (result type, the servers, the
MX host), bounded in the number of policy domains and failure kinds it keeps.
:func:`build_report` turns one day of it into the aggregate JSON report of §4.4, and
:func:`gzip_report` into the ``application/tlsrpt+gzip`` body with its file name (§5.1).
:func:`parse_rua` reads the ``_smtp._tls`` TXT record that says where reports go.

Sending the reports (mailto: through the relay, https: by POST) is not done yet.
"""

from __future__ import annotations

import datetime
import gzip
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailflow_relay.outbound.tls_policy import TlsFailure

__all__ = [
    "PolicyResult",
    "TlsReportStore",
    "build_report",
    "gzip_report",
    "parse_rua",
    "result_type_for",
]

MAX_POLICIES = 10_000
"""Policies kept per reporting period: beyond, new policy domains are counted as dropped."""
MAX_FAILURE_KINDS = 100
"""Distinct failure details kept per policy (RFC 8460 lets a report summarise)."""

# TlsFailure -> RFC 8460 §4.3 result-type.
_RESULT_TYPES = {
    TlsFailure.NO_STARTTLS: "starttls-not-supported",
    TlsFailure.HANDSHAKE: "validation-failure",
    TlsFailure.UNTRUSTED: "certificate-not-trusted",
    TlsFailure.EXPIRED: "certificate-expired",
    TlsFailure.NAME_MISMATCH: "certificate-host-mismatch",
    TlsFailure.PIN_MISMATCH: "validation-failure",
    TlsFailure.DANE_MISMATCH: "tlsa-invalid",
    TlsFailure.DANE_LOOKUP: "dnssec-invalid",
    TlsFailure.DANE_REQUIRED: "dane-required",
    TlsFailure.STS_MX_MISMATCH: "validation-failure",
}


def result_type_for(failure: TlsFailure) -> str:
    return _RESULT_TYPES.get(failure, "validation-failure")


@dataclass(frozen=True)
class PolicyResult:
    """One session (or one refused attempt) under one policy, for the report."""

    policy_type: str
    """``tlsa``, ``sts`` or ``no-policy-found``."""
    policy_domain: str
    policy_strings: tuple[str, ...] = ()
    mx_host: str | None = None
    result_type: str | None = None
    """None: a successful TLS session; else an RFC 8460 result type."""
    receiving_mx_hostname: str | None = None
    receiving_ip: str | None = None
    failure_reason_code: str | None = None


@dataclass
class _PolicyCounts:
    successes: int = 0
    failures: dict[tuple[str, str | None, str | None, str | None], int] = field(
        default_factory=dict
    )
    dropped_kinds: int = 0


class TlsReportStore:
    """The results of one reporting period, per policy; thread-safe, bounded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: dict[tuple[str, str, tuple[str, ...], str | None], _PolicyCounts] = {}
        self.dropped = 0

    def record(self, result: PolicyResult) -> None:
        key = (result.policy_type, result.policy_domain, result.policy_strings, result.mx_host)
        with self._lock:
            counts = self._policies.get(key)
            if counts is None:
                if len(self._policies) >= MAX_POLICIES:
                    self.dropped += 1
                    return
                counts = self._policies[key] = _PolicyCounts()
            if result.result_type is None:
                counts.successes += 1
                return
            kind = (
                result.result_type,
                result.receiving_mx_hostname,
                result.receiving_ip,
                result.failure_reason_code,
            )
            if kind not in counts.failures and len(counts.failures) >= MAX_FAILURE_KINDS:
                counts.dropped_kinds += 1
                kind = (result.result_type, None, None, "summarised")
            counts.failures[kind] = counts.failures.get(kind, 0) + 1

    def domains(self) -> list[str]:
        with self._lock:
            return sorted({key[1] for key in self._policies})

    def take(self, domain: str) -> list[dict[str, object]]:
        """The ``policies`` array of the report for ``domain``; forgets them (period over)."""
        with self._lock:
            keys = sorted(k for k in self._policies if k[1] == domain)
            taken = [(k, self._policies.pop(k)) for k in keys]
        return [_policy_json(key, counts) for key, counts in taken]


def _policy_json(
    key: tuple[str, str, tuple[str, ...], str | None], counts: _PolicyCounts
) -> dict[str, object]:
    policy_type, domain, strings, mx_host = key
    policy: dict[str, object] = {"policy-type": policy_type, "policy-domain": domain}
    if strings:
        policy["policy-string"] = list(strings)
    if mx_host:
        policy["mx-host"] = mx_host
    details = []
    for (result_type, mx_name, ip, code), count in sorted(
        counts.failures.items(), key=lambda item: tuple(str(v) for v in item[0])
    ):
        detail: dict[str, object] = {"result-type": result_type, "failed-session-count": count}
        if mx_name:
            detail["receiving-mx-hostname"] = mx_name
        if ip:
            detail["receiving-ip"] = ip
        if code:
            detail["failure-reason-code"] = code
        details.append(detail)
    entry: dict[str, object] = {
        "policy": policy,
        "summary": {
            "total-successful-session-count": counts.successes,
            "total-failure-session-count": sum(counts.failures.values()),
        },
    }
    if details:
        entry["failure-details"] = details
    return entry


def _timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    *,
    organization: str,
    contact: str,
    report_id: str,
    start: datetime.datetime,
    end: datetime.datetime,
    policies: Sequence[dict[str, object]],
) -> dict[str, object]:
    """The aggregate report of RFC 8460 §4.4 for one policy domain and one period."""
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _timestamp(start), "end-datetime": _timestamp(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": list(policies),
    }


def gzip_report(
    report: dict[str, object], *, sender_domain: str, policy_domain: str, unique: str
) -> tuple[str, bytes]:
    """The file name of RFC 8460 §5.1 and the gzip body (``application/tlsrpt+gzip``)."""
    start = datetime.datetime.strptime(
        str(report["date-range"]["start-datetime"]),  # type: ignore[index]
        "%Y-%m-%dT%H:%M:%SZ",
    ).replace(tzinfo=datetime.UTC)
    end = datetime.datetime.strptime(
        str(report["date-range"]["end-datetime"]),  # type: ignore[index]
        "%Y-%m-%dT%H:%M:%SZ",
    ).replace(tzinfo=datetime.UTC)
    name = (
        f"{sender_domain}!{policy_domain}!{int(start.timestamp())}!{int(end.timestamp())}"
        f"!{unique}.json.gz"
    )
    body = json.dumps(report, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return name, gzip.compress(body, mtime=0)


_RUA = re.compile(r"^(mailto:[^\s,;!]+@[^\s,;!]+|https://[^\s,;]+)$")


def parse_rua(texts: Sequence[str]) -> list[str]:
    """The report addresses of the ``_smtp._tls`` TXT records (RFC 8460 §3); [] for none.

    Exactly one ``v=TLSRPTv1`` record counts; addresses other than ``mailto:`` and
    ``https:`` (and malformed ones) are ignored.
    """
    records = [t for t in texts if t.replace(" ", "").startswith("v=TLSRPTv1")]
    if len(records) != 1:
        return []
    fields = dict(
        part.strip().partition("=")[::2] for part in records[0].split(";") if part.strip()
    )
    if fields.get("v") != "TLSRPTv1":
        return []
    return [uri.strip() for uri in fields.get("rua", "").split(",") if _RUA.match(uri.strip())]
