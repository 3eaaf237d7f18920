"""TLS-RPT (RFC 8460) offline: the store's bounds, the report, its gzip file, the rua record."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import email
import email.policy
import gzip
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest

from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.outbound.tls_policy import TlsFailure
from mailflow_relay.outbound.tlsrpt import (
    MAX_FAILURE_KINDS,
    PolicyResult,
    ReportSettings,
    Sent,
    TlsReporter,
    TlsReportStore,
    build_report,
    gzip_report,
    parse_rua,
    result_type_for,
)
from peers import DnsServer, free_port, require
from pki import Issued, Pki
from support import run
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


# --- sending: https POST and mailto through the relay ----------------------------------------


@dataclass
class Receiver:
    """An HTTPS report receiver on 127.0.0.81: answers each POST with the next status."""

    cert: Issued
    port: int
    statuses: list[int]
    bodies: list[tuple[str, bytes]] = field(default_factory=list)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
            length = next(
                int(line.partition(":")[2])
                for line in head.split("\r\n")
                if line.lower().startswith("content-length:")
            )
            content_type = next(
                line.partition(":")[2].strip()
                for line in head.split("\r\n")
                if line.lower().startswith("content-type:")
            )
            self.bodies.append((content_type, await reader.readexactly(length)))
            status = self.statuses.pop(0) if self.statuses else 200
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


def test_reports_go_by_https_post_with_retries_and_by_mail_through_the_relay(
    pki: Pki, tmp_path: Path
) -> None:
    require("nsd")
    ca = pki.ca("TLS-RPT Test CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca.pem)
    zones = {
        "x.test": [
            '_smtp._tls TXT "v=TLSRPTv1; rua=mailto:tls@x.test,https://reports.x.test/v1"',
            "reports A 127.0.0.81",
        ]
    }
    port = free_port()
    with DnsServer(zones) as dns:

        async def scenario() -> tuple[list[Sent], Receiver, list[tuple[str, list[str], bytes]]]:
            receiver = Receiver(ca.issue("reports.x.test"), port, statuses=[503, 200])
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(receiver.cert.cert_file, receiver.cert.key_file)
            server = await asyncio.start_server(receiver._handle, "127.0.0.81", port, ssl=context)
            queued: list[tuple[str, list[str], bytes]] = []

            async def submit(sender: str, recipients: list[str], data: bytes) -> None:
                queued.append((sender, recipients, data))

            store = TlsReportStore()
            store.record(PolicyResult("tlsa", "x.test", ("3 1 1 ab",)))
            store.record(PolicyResult("tlsa", "x.test", ("3 1 1 ab",), result_type="tlsa-invalid"))
            reporter = TlsReporter(
                store,
                Resolver([dns.address], port=dns.port, timeout=2),
                submit,
                ReportSettings(
                    organization="Mailflow tests",
                    contact="mailto:postmaster@relay.test",
                    submitter="relay.test",
                    https_port=port,
                    cafile=str(ca_file),
                    timeout=5,
                    retry_wait=0,
                ),
            )
            try:
                sent = await reporter.send_all()
            finally:
                server.close()
                await server.wait_closed()
            return sent, receiver, queued

        sent, receiver, queued = run(scenario)
    assert [(s.rua, s.ok, s.detail) for s in sent] == [
        ("mailto:tls@x.test", True, "queued for delivery"),
        ("https://reports.x.test/v1", True, "HTTP 200"),
    ]
    assert len(receiver.bodies) == 2  # 503 first, then retried
    content_type, body = receiver.bodies[-1]
    assert content_type == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(body))
    validate_report(report)
    assert report["policies"][0]["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    ((sender, recipients, data),) = queued
    assert (sender, recipients) == ("tlsrpt-noreply@relay.test", ["tls@x.test"])
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["TLS-Report-Domain"] == "x.test"
    assert message["TLS-Report-Submitter"] == "relay.test"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    validate_report(json.loads(gzip.decompress(attachment.get_content())))
