"""The last DANE / MTA-STS outcome per connector, as a relay reports it to the operator."""

from __future__ import annotations

from mailflow_relay.engine.transport_status import MAX_CONNECTORS, TransportStatus
from mailflow_relay.outbound.tlsrpt import PolicyResult


def sts(result: str | None = None) -> PolicyResult:
    return PolicyResult("sts", "contoso.example", result_type=result)


def test_the_last_outcome_of_each_policy_is_kept_and_a_failure_in_a_delivery_wins() -> None:
    status = TransportStatus()
    status.record("mail/a", "not_applicable", [PolicyResult("no-policy-found", "x.example")])
    assert status.reported() == {}  # nothing under a policy: nothing to say
    status.record("mail/a", "verified", [sts()])
    assert status.reported() == {"mail/a": {"dane": "verified", "mtaSts": "success"}}
    # A retry that succeeded does not hide the failure in the same delivery.
    status.record("mail/a", None, [sts("sts-webpki-invalid"), sts()])
    assert status.reported() == {"mail/a": {"dane": "verified", "mtaSts": "sts-webpki-invalid"}}
    status.record("mail/b", "mismatch", [])
    assert list(status.reported()) == ["mail/a", "mail/b"]


def test_the_report_is_bounded() -> None:
    status = TransportStatus()
    for i in range(MAX_CONNECTORS + 5):
        status.record(f"mail/c{i}", "verified", [])
    reported = status.reported()
    assert len(reported) == MAX_CONNECTORS
    assert "mail/c0" not in reported
    assert f"mail/c{MAX_CONNECTORS + 4}" in reported
