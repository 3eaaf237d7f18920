"""``make demo``: real delivery through every example connector, on this machine only.

The examples name hosts of the outside world (and TEST-NET addresses that must never be
contacted). The demo keeps the manifests as they are but for what must change to stay
on loopback, and says so:

* a DNS server made for the demo (on a loopback port) answers for the examples' host
  and MX names with 127.0.0.x addresses;
* IP-address destinations of the 192.0.2.0/24 documentation range become 127.0.0.x;
* every destination port becomes one free port P (binding port 25 needs root);
* the Secret ``contoso-ca`` carries the demo CA, and the self-signed connector pins the
  demo's self-signed certificate;
* "system roots" are the demo CA (``SSL_CERT_FILE``), as if it were a public CA.

Destination servers: certificates from the demo CA, one self-signed, one with a wrong
name, some without STARTTLS. One message goes through each connector and a table shows
where it went, with which TLS, and whether the certificate was verified — or why the
message was deferred.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import ipaddress
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.certificates import self_signed
from mailflow_relay.engine.relay import DeliveryEvent, Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings, DeliveryStatus
from mailflow_relay.testing.sink import SmtpSink

EXAMPLES = Path(__file__).resolve().parent
NOW = datetime.datetime.now(datetime.UTC)


# --- certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path
    certificate: x509.Certificate


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(
    folder: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Pem:
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pem(cert_file, key_file, certificate)


class DemoCa:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mailflow Demo CA")])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _write(folder, "demo-ca", certificate, self.key)

    def issue(self, dns_name: str) -> Pem:
        key = _key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
            .issuer_name(self.pem.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return _write(self.folder, dns_name, certificate, key)

    def self_signed(self, dns_name: str) -> Pem:
        cert_pem, key_pem = self_signed([dns_name], days=30)
        cert_file = self.folder / f"self-signed-{dns_name}.crt"
        key_file = self.folder / f"self-signed-{dns_name}.key"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        return Pem(cert_file, key_file, x509.load_pem_x509_certificate(cert_pem))


# --- a DNS server for the demo's names ---------------------------------------------------


class DemoDns(asyncio.DatagramProtocol):
    """Answers A and MX questions for the demo's zone; NXDOMAIN for other names."""

    def __init__(self, records: dict[str, list[tuple[str, str]]]) -> None:
        self.records = {name.rstrip(".").lower(): rows for name, rows in records.items()}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rows = self.records.get(name)
        if rows is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            wanted = dns.rdatatype.to_text(question.rdtype)
            texts = [value for rdtype, value in rows if rdtype == wanted]
            if texts:
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", wanted, *texts))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


# --- the demo ----------------------------------------------------------------------------


def _free_port(addresses: Iterable[str]) -> int:
    """A port that is free on every one of the loopback addresses."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        sockets = []
        try:
            for address in addresses:
                s = socket.socket()
                sockets.append(s)
                s.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port on the demo's loopback addresses")


@dataclass(frozen=True)
class Destination:
    address: str
    cert: Pem | None
    users: dict[str, str]
    label: str


@dataclass(frozen=True)
class Scenario:
    connector: str
    sender: str
    recipient: str


SCENARIOS = [
    Scenario("all-via-compliance", "alice@contoso.com", "someone@elsewhere.example"),
    Scenario("fabrikam-partner", "alice@contoso.com", "partner@fabrikam.example"),
    Scenario("fabrikam-partner", "alice@contoso.com", "sales@emea.fabrikam.example"),
    Scenario("fabrikam-partner", "alice@contoso.com", "legal@fabrikam.example"),
    Scenario("marketing-bulk", "news@marketing.contoso.com", "reader@elsewhere.example"),
    Scenario("tls-opportunistic", "alice@contoso.com", "info@smallpartner.example"),
    Scenario("tls-self-signed", "alice@contoso.com", "backup@archive.contoso.example"),
    Scenario("tls-trusted-ca", "alice@contoso.com", "ops@it.subsidiaries.example"),
    Scenario("tls-domain-match", "alice@contoso.com", "treasury@bank.example"),
    Scenario("tls-name-match", "alice@contoso.com", "hr@payroll.example"),
]


# The bank's MX presents a certificate for another name: DomainMatch must defer it.
EXPECTED = {"treasury@bank.example": DeliveryStatus.DEFERRED}


def _rewrite(
    documents: list[dict[str, Any]], port: int, ip_map: dict[str, str], ca_pem: str, pins: list[str]
) -> list[dict[str, Any]]:
    rewritten = copy.deepcopy(documents)
    for body in rewritten:
        kind, spec = body.get("kind"), body.get("spec") or {}
        if kind == "OutboundConnector":
            smart = (spec.get("destination") or {}).get("smartHost")
            if smart:
                smart["host"] = ip_map.get(smart["host"], smart["host"])
                smart["port"] = port
            if body["metadata"]["name"] == "tls-self-signed":
                spec["tls"]["pinnedFingerprints"] = pins
        elif kind == "MultiSmtpProfile":
            for server in spec["servers"]:
                server["host"] = ip_map.get(server["host"], server["host"])
                server["port"] = port
        elif kind == "Secret" and body["metadata"]["name"] == "contoso-ca":
            body["stringData"]["ca.crt"] = ca_pem
    return rewritten


async def _send(port: int, scenario: Scenario) -> str:
    message = (
        f"From: {scenario.sender}\r\nTo: {scenario.recipient}\r\n"
        f"Subject: Mailflow demo via {scenario.connector}\r\n\r\nHello from the demo.\r\n"
    ).encode()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
    async with smtp:
        await smtp.sendmail(scenario.sender, [scenario.recipient], message)
    return "accepted"


async def run_demo(workdir: Path) -> int:
    pki_dir = workdir / "pki"
    pki_dir.mkdir()
    ca = DemoCa(pki_dir)
    self_signed = ca.self_signed("archive.contoso.example")
    spki = self_signed.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib

    pins = ["sha256/" + hashlib.sha256(spki).hexdigest()]
    os.environ["SSL_CERT_FILE"] = str(ca.pem.cert)  # "system roots" = the demo CA

    destinations = {
        "compliance.contoso.com": Destination(
            "127.0.0.21", ca.issue("compliance.contoso.com"), {}, "CA cert"
        ),
        "smtp.bulkmail.example": Destination(
            "127.0.0.22",
            ca.issue("smtp.bulkmail.example"),
            {"contoso-marketing": "example-only-change-me-too"},
            "CA cert, AUTH",
        ),
        "relay.payroll.example": Destination(
            "127.0.0.23", ca.issue("relay.payroll.example"), {}, "CA cert"
        ),
        "192.0.2.21": Destination(
            "127.0.0.24",
            ca.issue("gw1.fabrikam.example"),
            {"mailflow-relay": "example-only-change-me"},
            "CA cert, AUTH",
        ),
        "192.0.2.22": Destination("127.0.0.25", None, {}, "no STARTTLS"),
        "gw3.fabrikam.example": Destination(
            "127.0.0.26",
            ca.issue("gw3.fabrikam.example"),
            {"mailflow-relay": "example-only-change-me"},
            "CA cert, AUTH",
        ),
        "192.0.2.40": Destination("127.0.0.27", self_signed, {}, "self-signed, pinned"),
        "mx.smallpartner.example": Destination("127.0.0.31", None, {}, "no STARTTLS"),
        "mx.it.subsidiaries.example": Destination(
            "127.0.0.32", ca.issue("mx.it.subsidiaries.example"), {}, "CA cert"
        ),
        "mx.bank.example": Destination(
            "127.0.0.33", ca.issue("mail.wrongname.example"), {}, "CA cert with a wrong name"
        ),
    }
    port = _free_port(d.address for d in destinations.values())
    ip_map = {name: d.address for name, d in destinations.items() if _is_ip(name)}
    records: dict[str, list[tuple[str, str]]] = {
        name: [("A", d.address)] for name, d in destinations.items() if not _is_ip(name)
    }
    records["smallpartner.example"] = [("MX", "10 mx.smallpartner.example.")]
    records["it.subsidiaries.example"] = [("MX", "10 mx.it.subsidiaries.example.")]
    records["bank.example"] = [("MX", "10 mx.bank.example.")]

    print(
        f"==> demo destinations on loopback port {port} (examples' ports and TEST-NET addresses mapped):"
    )
    for name, d in destinations.items():
        print(f"    {name:28} -> {d.address}:{port}  ({d.label})")

    documents = [m.body for m in load_manifests([str(EXAMPLES)]) if m.body is not None]
    manifests = workdir / "manifests.yaml"
    manifests.write_text(
        yaml.safe_dump_all(_rewrite(documents, port, ip_map, ca.pem.cert.read_text(), pins))
    )
    result = check_manifests(load_manifests([str(manifests)]), resolve_secrets=True)
    assert result.compiled is not None
    for problem in result.problems:
        print(f"warning: {problem.format()}")

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: DemoDns(records), local_addr=("127.0.0.1", 0)
    )
    dns_port = int(transport.get_extra_info("sockname")[1])

    sinks = [
        SmtpSink(
            host=d.address,
            port=port,
            cert_file=d.cert.cert if d.cert else None,
            key_file=d.cert.key if d.cert else None,
            users=d.users,
        )
        for d in destinations.values()
    ]
    events: list[DeliveryEvent] = []
    done = asyncio.Event()
    expected = len(SCENARIOS)

    def on_delivery(event: DeliveryEvent) -> None:
        events.append(event)
        if len(events) >= expected:
            done.set()

    settings = RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1",
            port=0,
            hostname="relay.demo",
            accept_from=(ipaddress.ip_network("127.0.0.1/32"),),
        ),
        spool_dir=workdir / "spool",
        delivery=DeliverySettings(
            helo_name="relay.demo", mx_port=port, connect_timeout=5, command_timeout=10
        ),
        dns_servers=("127.0.0.1",),
        dns_port=dns_port,
        retry_initial=3600,
    )
    relay = Relay(settings, result.compiled.document, on_delivery=on_delivery)
    try:
        for sink in sinks:
            await sink.start()
        runner = asyncio.create_task(relay.run(), name="mailflow-demo-relay")
        await relay.ready.wait()
        print(f"==> mailflow relay on 127.0.0.1:{relay.port}; sending one message per scenario")
        for scenario in SCENARIOS:
            await _send(relay.port, scenario)
        try:
            async with asyncio.timeout(60):
                await done.wait()
        except TimeoutError:
            print(f"warning: only {len(events)} of {expected} deliveries finished in time")
        relay.stop()
        await runner
    finally:
        for sink in sinks:
            await sink.stop()
        transport.close()

    _print_table(events, destinations, port)
    outcomes = {
        result.recipient: result.status for event in events for result in event.report.results
    }
    surprises = [
        f"{s.recipient}: expected {EXPECTED.get(s.recipient, DeliveryStatus.DELIVERED).value}, "
        f"got {outcomes[s.recipient].value if s.recipient in outcomes else 'nothing'}"
        for s in SCENARIOS
        if outcomes.get(s.recipient) is not EXPECTED.get(s.recipient, DeliveryStatus.DELIVERED)
    ]
    print()
    if surprises:
        print("demo FAILED: " + "; ".join(surprises))
        return 1
    print(
        "demo OK: every connector delivered with its TLS mode; the DomainMatch connector "
        "deferred because mx.bank.example shows a certificate for another name"
    )
    return 0


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _print_table(
    events: list[DeliveryEvent], destinations: dict[str, Destination], port: int
) -> None:
    by_address = {f"{d.address}:{port}": name for name, d in destinations.items()}
    rows = [("connector", "recipient", "reached", "TLS", "verified", "outcome")]
    for event in events:
        report = event.report
        for result in report.results:
            reached = report.server or "-"
            for address, name in by_address.items():
                if reached.endswith(address) or f"[{address.split(':')[0]}]" in reached:
                    reached = name
            delivered = result.status is DeliveryStatus.DELIVERED
            rows.append(
                (
                    event.connector,
                    result.recipient,
                    reached if delivered else "-",
                    report.tls_version or ("none" if delivered else "-"),
                    ("yes" if report.verified else "no") if delivered else "-",
                    f"{event.tls_mode.value}: delivered"
                    if delivered
                    else f"{event.tls_mode.value}: {result.status.value}: {result.message}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print()
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[-1]
        )


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="    relay log: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's own chatter
    with tempfile.TemporaryDirectory(prefix="mailflow-demo-") as folder:
        return asyncio.run(run_demo(Path(folder)))


if __name__ == "__main__":
    sys.exit(main())
