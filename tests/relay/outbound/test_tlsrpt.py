"""TLS-RPT (RFC 8460) offline: the store's bounds, the report, its gzip file, the rua record."""

from __future__ import annotations

import copy
import datetime
import gzip
import json
from typing import Any, cast

import jsonschema
import pytest

from mailflow_relay.outbound.tls_policy import TlsFailure
from mailflow_relay.outbound.tlsrpt import (
    MAX_FAILURE_KINDS,
    PolicyResult,
    TlsReportStore,
    build_report,
    gzip_report,
    parse_rua,
    result_type_for,
)
from tlsrpt_schema import validate_report

START = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
END = START + datetime.timedelta(days=1)


def report_for(store: TlsReportStore, domain: str) -> dict[str, object]:
    return build_report(
        organization="Mailflow",
        contact="mailto:tlsrpt@relay.test",
        report_id="id-1",
        start=START,
        end=END,
        policies=store.take(domain),
    )


def test_every_tls_failure_maps_to_a_registered_result_type() -> None:
    store = TlsReportStore()
    for i, failure in enumerate(TlsFailure):
        store.record(
            PolicyResult(
                "tlsa",
                "x.test",
                ("3 1 1 ab",),
                result_type=result_type_for(failure),
                receiving_mx_hostname=f"mx{i}.x.test",
            )
        )
    validate_report(report_for(store, "x.test"))


def test_the_schema_refuses_what_rfc_8460_does_not_allow() -> None:
    store = TlsReportStore()
    store.record(PolicyResult("sts", "x.test", ("version: STSv1",)))
    good = report_for(store, "x.test")
    validate_report(good)
    for broken in (
        {k: v for k, v in good.items() if k != "report-id"},
        {**good, "date-range": {"start-datetime": "yesterday", "end-datetime": "today"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_report(broken)
    wrong_type = copy.deepcopy(good)
    wrong_type["policies"][0]["policy"]["policy-type"] = "dane"  # type: ignore[index]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(wrong_type)


def test_failure_kinds_per_policy_are_bounded() -> None:
    store = TlsReportStore()
    for i in range(MAX_FAILURE_KINDS + 50):
        store.record(
            PolicyResult(
                "no-policy-found",
                "x.test",
                result_type="starttls-not-supported",
                receiving_ip=f"192.0.2.{i % 256}",
                receiving_mx_hostname=f"mx{i}.x.test",
            )
        )
    report = report_for(store, "x.test")
    validate_report(report)
    (policy,) = cast(list[dict[str, Any]], report["policies"])
    assert len(policy["failure-details"]) == MAX_FAILURE_KINDS + 1  # the rest summarised
    assert policy["summary"]["total-failure-session-count"] == MAX_FAILURE_KINDS + 50


def test_the_gzip_file_is_named_as_rfc_8460_says_and_holds_the_report() -> None:
    store = TlsReportStore()
    store.record(PolicyResult("tlsa", "x.test", ("3 1 1 ab",)))
    report = report_for(store, "x.test")
    name, body = gzip_report(
        report, sender_domain="relay.test", policy_domain="x.test", unique="u1"
    )
    assert name == f"relay.test!x.test!{int(START.timestamp())}!{int(END.timestamp())}!u1.json.gz"
    assert json.loads(gzip.decompress(body)) == report


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=TLSRPTv1; rua=mailto:tls@x.test"], ["mailto:tls@x.test"]),
        (
            ["v=TLSRPTv1;rua=mailto:tls@x.test,https://reports.x.test/v1"],
            ["mailto:tls@x.test", "https://reports.x.test/v1"],
        ),
        (["v=TLSRPTv1; rua=http://insecure.x.test/"], []),
        (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], []),
        (["v=spf1 -all"], []),
    ],
)
def test_rua_discovery(texts: list[str], expected: list[str]) -> None:
    assert parse_rua(texts) == expected
