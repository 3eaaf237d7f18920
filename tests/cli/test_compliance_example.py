"""examples/compliance/ as a user runs it: `mailflow relay`, a compliance server, the Internet.

Everything on loopback. The manifests are the example's, with only what must change to
stay on this machine: the compliance server's and the partner gateways' addresses and
ports become loopback ones, the compliance server's address in ``spec.clients`` becomes
127.0.0.2 (it hands mail back from there), and the CA Secret carries the test CA. The
recipient MX comes from a real DNS server (NSD) on a loopback port.

The compliance server is an SMTP sink with a certificate for compliance.contoso.com from
that CA, which hands every message it receives back to the relay — once, as a real one
would. Before client scopes the example could not be written: the hand-back matched the
catch-all again and the message went round until the hop limit.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from mailflow_relay.testing.sink import ReceivedMessage, SmtpSink
from peers import DnsServer, require
from pki import Pki
from relayproc import RelayProcess
from support import run, until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "compliance"
COMPLIANCE_CLIENT = "127.0.0.2"


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    require("nsd")
    with DnsServer({"example.org": ["@ MX 10 mx.example.org.", "mx A 127.0.0.1"]}) as server:
        yield server


def localised(ca_pem: str, compliance_port: int, partner_port: int) -> str:
    """The example's manifests, moved onto loopback (see the module docstring)."""
    documents: list[dict[str, Any]] = []
    for path in sorted(EXAMPLE.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for document in documents:
        spec = document.get("spec", {})
        if document["kind"] == "Secret":
            document["stringData"]["ca.crt"] = ca_pem
        if "clients" in spec:
            assert spec["clients"]["networks"] == ["192.0.2.25/32"]
            spec["clients"]["networks"] = [f"{COMPLIANCE_CLIENT}/32"]
        smart = spec.get("destination", {}).get("smartHost")
        if smart is not None:
            smart.update(host="127.0.0.1", port=compliance_port)
        if document["kind"] == "MultiSmtpProfile":
            spec["servers"] = [{"host": "127.0.0.1", "port": partner_port}]
    return yaml.safe_dump_all(documents)


async def hand_back(compliance: SmtpSink, relay_port: int, stop: asyncio.Event) -> None:
    """The compliance server: every message it received goes back to the relay, once."""
    done = 0
    while not stop.is_set():
        for message in compliance.messages[done:]:
            done += 1
            async with asyncio.timeout(20):
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=relay_port,
                    source_address=(COMPLIANCE_CLIENT, 0),
                    start_tls=False,
                    timeout=10,
                )
                async with client:
                    await client.sendmail(message.mail_from, list(message.rcpt_tos), message.data)
        await asyncio.sleep(0.05)


def test_the_compliance_example_passes_everything_through_compliance_once(
    tmp_path: Path, dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki(tmp_path)
    ca = pki.ca("Contoso Internal Mail CA")
    compliance_cert = ca.issue("compliance.contoso.com")
    partner_cert = ca.issue("gw1.fabrikam.example")
    # "System roots" for the partner's TrustedCA are the test CA, as if it were public.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.issued.cert_file))

    async def scenario() -> None:
        compliance = SmtpSink(
            cert_file=compliance_cert.cert_file, key_file=compliance_cert.key_file
        )
        partner = SmtpSink(cert_file=partner_cert.cert_file, key_file=partner_cert.key_file)
        internet = SmtpSink()
        async with compliance, partner, internet:
            relay = RelayProcess(
                tmp_path,
                localised(ca.pem, compliance.port, partner.port),
                "--accept-from",
                "127.0.0.1/32",
                "--accept-from",
                f"{COMPLIANCE_CLIENT}/32",
                "--default-route",
                "Reject",
                "--dns-server",
                f"{dns_server.address}:{dns_server.port}",
                "--mx-port",
                str(internet.port),
            )
            await asyncio.to_thread(relay.__enter__)
            stop = asyncio.Event()
            back = asyncio.create_task(
                hand_back(compliance, relay.port, stop), name="test-compliance-hand-back"
            )
            try:
                await asyncio.to_thread(submit, relay.port)
                await until(lambda: len(internet.messages) == 1, within=30, what="the MX copy")
                await until(lambda: len(partner.messages) == 1, within=30, what="the partner copy")
                await asyncio.sleep(1)  # nothing more may arrive anywhere
            finally:
                stop.set()
                await back
                await asyncio.to_thread(relay.stop)
            check(compliance.messages, partner.messages, internet.messages, relay.output())

    run(scenario, within=90)


def submit(port: int) -> None:
    """A mail host (127.0.0.1) sends one message to a partner and one to the Internet."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            "alice@contoso.com",
            ["bob@example.org", "eve@fabrikam.example"],
            "From: alice@contoso.com\r\nSubject: quarterly figures\r\n\r\nsee attachment\r\n",
        )


def check(
    compliance: list[ReceivedMessage],
    partner: list[ReceivedMessage],
    internet: list[ReceivedMessage],
    log: str,
) -> None:
    # Compliance saw the message once, over TLS verified against the internal CA...
    assert len(compliance) == 1, log
    (seen,) = compliance
    assert seen.tls
    assert sorted(seen.rcpt_tos) == ["bob@example.org", "eve@fabrikam.example"]
    # ...and what it handed back went to the partner's gateway (TLS) and to the MX.
    (to_partner,) = partner
    assert to_partner.rcpt_tos == ("eve@fabrikam.example",)
    assert to_partner.tls
    (to_mx,) = internet
    assert to_mx.rcpt_tos == ("bob@example.org",)
    for copy in (to_partner, to_mx):
        # Two passes through the relay and nothing more: no loop.
        assert copy.data.count(b"Received: ") == 2, copy.data.decode(errors="replace")
        assert b"Subject: quarterly figures" in copy.data
    assert "connector=mail/all-via-compliance" in log
    assert "connector=mail/direct-after-compliance" in log
    assert "connector=mail/fabrikam-after-compliance" in log
    assert "mail_loop" not in log
    assert "5.4.6" not in log


def test_the_compliance_example_validates_and_explains_both_sides() -> None:
    import subprocess
    import sys

    mailflow = str(Path(sys.executable).parent / "mailflow")
    result = subprocess.run(
        [mailflow, "validate", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    def explain(*extra: str) -> str:
        done = subprocess.run(
            [mailflow, "explain", str(EXAMPLE), "--from", "alice@contoso.com", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    from_hosts = explain("--to", "eve@fabrikam.example")
    assert "connector    mail/all-via-compliance" in from_hosts
    back = explain("--to", "eve@fabrikam.example", "--client", "192.0.2.25")
    assert "connector    mail/fabrikam-after-compliance" in back
    assert "clients      only mail submitted by 192.0.2.25/32" in back
