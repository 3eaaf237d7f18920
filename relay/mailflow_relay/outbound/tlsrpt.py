"""TLS reporting (RFC 8460): per policy domain, the sessions that succeeded and those that failed.

Every delivery attempt under a DANE or MTA-STS policy (or under none) gives one
:class:`PolicyResult`; a :class:`TlsReportStore` counts them per policy (type, domain and
policy strings), with the failure details of RFC 8460 §4.3 (result type, the servers, the
MX host), bounded in the number of policy domains and failure kinds it keeps.
:func:`build_report` turns one day of it into the aggregate JSON report of §4.4, and
:func:`gzip_report` into the ``application/tlsrpt+gzip`` body with its file name (§5.1).
:func:`parse_rua` reads the ``_smtp._tls`` TXT record that says where reports go.

:class:`TlsReporter` sends them once a day: ``mailto:`` as an RFC 8460 §5.3 message queued
through the relay itself, ``https:`` by POST (``application/tlsrpt+gzip``) with a time
limit and retries; at most :data:`MAX_RUA` addresses per domain, reports up to 1 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.message
import email.policy
import email.utils
import gzip
import json
import logging
import re
import ssl
import threading
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from mailflow_relay.outbound.dns import DnsError, Resolver
from mailflow_relay.outbound.tls_policy import TlsFailure

logger = logging.getLogger(__name__)

__all__ = [
    "PolicyResult",
    "ReportSettings",
    "Sent",
    "TlsReportStore",
    "TlsReporter",
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


# --- sending (RFC 8460 §5) -----------------------------------------------------------------

Submit = Callable[[str, list[str], bytes], Awaitable[None]]
"""Queue a message (sender, recipients, content) for delivery through the relay itself."""

MAX_RUA = 5
"""At most this many report addresses per policy domain (a TXT record is theirs to write)."""
MAX_REPORT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Sent:
    """One report handed to one address, for logs, metrics and tests."""

    policy_domain: str
    rua: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ReportSettings:
    organization: str
    contact: str
    """``contact-info`` of the reports (an address for questions about them)."""
    submitter: str
    """This relay's domain: the report's submitter and the domain of its From address."""
    https_port: int = 443
    cafile: str | None = None
    """For tests: the CA of https report receivers; None = the system's roots."""
    timeout: float = 30.0
    retries: int = 3
    retry_wait: float = 30.0
    period: float = 86400.0


class TlsReporter:
    """Once a period (a day), sends each policy domain's report to the ``rua`` of its record."""

    def __init__(
        self,
        store: TlsReportStore,
        resolver: Resolver,
        submit: Submit,
        settings: ReportSettings,
        *,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.submit = submit
        self.settings = settings
        self.organization = settings.organization
        self.contact = settings.contact
        self.submitter = settings.submitter
        self.https_port = settings.https_port
        self.timeout = settings.timeout
        self.retries = settings.retries
        self.retry_wait = settings.retry_wait
        self.period = settings.period
        self.clock = clock
        self._context = ssl.create_default_context(cafile=settings.cafile)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.started = clock()

    async def run(self, stopping: asyncio.Event) -> None:
        """Send a report at the end of every period until ``stopping`` is set."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.period):
                    await stopping.wait()
            if stopping.is_set():
                return
            await self.send_all()

    async def send_all(self) -> list[Sent]:
        start, end = self.started, self.clock()
        self.started = end
        sent: list[Sent] = []
        for domain in self.store.domains():
            policies = self.store.take(domain)
            try:
                rua = parse_rua(await self.resolver.texts(f"_smtp._tls.{domain}"))
            except DnsError as e:
                logger.info("TLS-RPT %s: no report address (%s)", domain, e.reason)
                continue
            if not rua:
                continue
            report_id = f"{end.strftime('%Y%m%dT%H%M%SZ')}.{uuid.uuid4().hex[:12]}@{self.submitter}"
            report = build_report(
                organization=self.organization,
                contact=self.contact,
                report_id=report_id,
                start=start,
                end=end,
                policies=policies,
            )
            name, body = gzip_report(
                report, sender_domain=self.submitter, policy_domain=domain, unique=uuid.uuid4().hex
            )
            if len(body) > MAX_REPORT_BYTES:
                logger.warning("TLS-RPT %s: report of %d bytes not sent", domain, len(body))
                continue
            for uri in rua[:MAX_RUA]:
                outcome = await self._send(domain, uri, report_id, name, body)
                logger.info("TLS-RPT %s to %s: %s", domain, uri, outcome.detail)
                sent.append(outcome)
        return sent

    async def _send(self, domain: str, uri: str, report_id: str, name: str, body: bytes) -> Sent:
        if uri.startswith("mailto:"):
            recipient = urllib.parse.unquote(uri.removeprefix("mailto:").partition("?")[0])
            message = self._message(domain, recipient, report_id, name, body)
            await self.submit(f"tlsrpt-noreply@{self.submitter}", [recipient], message)
            return Sent(domain, uri, True, "queued for delivery")
        detail = ""
        for attempt in range(self.retries):
            try:
                status = await self._post(uri, body)
            except (OSError, TimeoutError, ssl.SSLError, ValueError) as e:
                detail = f"{type(e).__name__}: {e}"
            else:
                if 200 <= status < 300:
                    return Sent(domain, uri, True, f"HTTP {status}")
                detail = f"HTTP {status}"
                if 400 <= status < 500:
                    break  # refused for good: retrying would not help
            if attempt + 1 < self.retries:
                await asyncio.sleep(self.retry_wait * (attempt + 1))
        return Sent(domain, uri, False, detail)

    async def _post(self, uri: str, body: bytes) -> int:
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname
        if parts.scheme != "https" or not host:
            raise ValueError(f"not an https URI: {uri}")
        port = parts.port or self.https_port
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        addresses = await self.resolver.addresses(host)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    addresses[0], port, ssl=self._context, server_hostname=host
                )
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mailflow\r\n"
                    "Content-Type: application/tlsrpt+gzip\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                status_line = await reader.readline()
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                    async with asyncio.timeout(2):
                        await writer.wait_closed()
        fields = status_line.decode("latin-1").split(" ", 2)
        if len(fields) < 2 or not fields[1].isdigit():
            raise ValueError(f"no HTTP status line: {status_line[:60]!r}")
        return int(fields[1])

    def _message(
        self, domain: str, recipient: str, report_id: str, name: str, body: bytes
    ) -> bytes:
        """RFC 8460 §5.3: multipart/report with the gzip report attached."""
        message = email.message.EmailMessage()
        message["From"] = f"tlsrpt-noreply@{self.submitter}"
        message["To"] = recipient
        message["Date"] = email.utils.format_datetime(self.clock())
        message["Message-ID"] = email.utils.make_msgid(domain=self.submitter)
        message["Subject"] = (
            f"Report Domain: {domain} Submitter: {self.submitter} Report-ID: <{report_id}>"
        )
        message["TLS-Report-Domain"] = domain
        message["TLS-Report-Submitter"] = self.submitter
        message.set_content(
            f"This is an aggregate TLS report (RFC 8460) from {self.organization} for {domain}.\n"
        )
        message.add_attachment(body, maintype="application", subtype="tlsrpt+gzip", filename=name)
        message.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"')
        return message.as_bytes(policy=email.policy.SMTP)
