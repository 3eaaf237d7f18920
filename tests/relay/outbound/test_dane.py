"""DANE (RFC 7672) against real DNSSEC: zones signed by ldns-signzone, NSD, unbound validating.

The deliverer resolves MX and addresses through NSD directly (the cluster's plain resolver)
and asks unbound, which validates with the test zones' own KSKs as trust anchors, for
everything DANE needs: the AD bit of the MX, A/AAAA and TLSA answers. Every MX host is a
real SMTP server with STARTTLS on its own loopback address. Each trap of docs/dane.md has
a test here, named after it.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dnssec import SignedDns
from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.dane import (
    Dane,
    DaneRequirement,
    DaneState,
    DnssecResolver,
    Tlsa,
    association,
    verify_chain,
)
from mailflow_relay.outbound.deliverer import (
    Deliverer,
    DeliveryReport,
    DeliverySettings,
    DeliveryStatus,
)
from mailflow_relay.outbound.dns import Resolver
from mailflow_relay.outbound.tls_policy import TlsFailure, TlsPolicyError
from mailflow_relay.outbound.tlsrpt import TlsReportStore, build_report
from mailflow_relay.routing.document import (
    Connector,
    DaneMode,
    Destination,
    ObjectRef,
    ProfilePool,
    RecipientMx,
    RoutingDocument,
    ServerAddress,
    SmartHost,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.testing.sink import SmtpSink
from peers import DnsServer, free_port, require
from pki import CertificateAuthority, Issued, Pki
from support import run, until
from tlsrpt_schema import validate_report

MESSAGE = b"Subject: dane\r\n\r\nhello\r\n"


def spki_sha256(certificate: x509.Certificate) -> str:
    return association(certificate, 1, 1).hex()


def chain_file(folder: Path, leaf: Issued, ca: CertificateAuthority) -> Issued:
    """The leaf and its CA in one file: a server that sends its chain, as DANE-TA needs."""
    path = folder / f"chain-{leaf.cert_file.stem}.pem"
    path.write_text(leaf.pem + ca.pem)
    return Issued(leaf.certificate, path, leaf.key_file)


@dataclass
class World:
    dns: SignedDns
    port: int
    ca: CertificateAuthority
    ee: Issued
    """Self-signed, naming nothing relevant: DANE-EE(3) checks neither names nor dates."""
    ta: Issued
    ta_expired: Issued
    ta_wrong_name: Issued
    cname_target: Issued
    mismatch: Issued
    plain: Issued


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for tool in ("nsd", "ldns-keygen", "ldns-signzone", "unbound"):
        require(tool)
    folder = tmp_path_factory.mktemp("dane-pki")
    pki = Pki(folder)
    ca = pki.ca("DANE Test CA, in no trust store")
    ee = pki.self_signed("unrelated.example")
    ta = chain_file(folder, ca.issue("mx-ta.dane.test"), ca)
    ta_expired = chain_file(folder, ca.issue("mx-ta-expired.dane.test", expired=True), ca)
    ta_wrong_name = chain_file(folder, ca.issue("elsewhere.example"), ca)
    cname_target = chain_file(folder, ca.issue("real.hosting.test"), ca)
    mismatch = pki.self_signed("mx-bad.dane.test")
    plain = pki.self_signed("mx.plain.test")
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    wrong = hashlib.sha256(
        other_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()
    port = free_port()
    tlsa = f"_{port}._tcp"
    ca_hash = spki_sha256(ca.issued.certificate)
    zones = {
        "dane.test": [
            "ee MX 10 mx-ee.dane.test.",
            "mx-ee A 127.0.0.31",
            f"{tlsa}.mx-ee TLSA 3 1 1 {spki_sha256(ee.certificate)}",
            "ta MX 10 mx-ta.dane.test.",
            "mx-ta A 127.0.0.32",
            f"{tlsa}.mx-ta TLSA 2 1 1 {ca_hash}",
            "bad MX 10 mx-bad.dane.test.",
            "mx-bad A 127.0.0.33",
            f"{tlsa}.mx-bad TLSA 3 1 1 {wrong}",
            "cname MX 10 mail.dane.test.",
            "mail CNAME real.hosting.test.",
            "unusable MX 10 mx-unusable.dane.test.",
            "mx-unusable A 127.0.0.35",
            f"{tlsa}.mx-unusable TLSA 1 1 1 {spki_sha256(ee.certificate)}",
            f"{tlsa}.mx-unusable TLSA 3 1 7 {spki_sha256(ee.certificate)}",
            "nostarttls MX 10 mx-nostarttls.dane.test.",
            "mx-nostarttls A 127.0.0.36",
            f"{tlsa}.mx-nostarttls TLSA 3 1 1 {spki_sha256(ee.certificate)}",
            "ta-expired MX 10 mx-ta-expired.dane.test.",
            "mx-ta-expired A 127.0.0.37",
            f"{tlsa}.mx-ta-expired TLSA 2 1 1 {ca_hash}",
            "ta-wrong-name MX 10 mx-ta-wrong-name.dane.test.",
            "mx-ta-wrong-name A 127.0.0.38",
            f"{tlsa}.mx-ta-wrong-name TLSA 2 1 1 {ca_hash}",
            "insecure-a MX 10 alias.dane.test.",
            # Signed, validated and wrong: looked up only if the insecure addresses were
            # (wrongly) trusted.
            "alias CNAME mx.plain.test.",
            f"{tlsa}.alias TLSA 3 1 1 {wrong}",
            "expired MX 10 mx.old.test.",
            "servfail MX 10 mx.bogus.test.",
        ],
        "hosting.test": [
            "real A 127.0.0.34",
            f"{tlsa}.real TLSA 2 1 1 {ca_hash}",
        ],
        "plain.test": [
            "mx A 127.0.0.39",
            # Never used: the zone is not signed, so these records prove nothing.
            f"{tlsa}.mx TLSA 3 1 1 {wrong}",
            "unsigned MX 10 mx.plain.test.",
            "insecure-mx MX 10 mx-bad.dane.test.",
        ],
        "old.test": ["mx A 127.0.0.40"],
        "bogus.test": [
            "mx A 127.0.0.41",
            f"{tlsa}.mx TLSA 3 1 1 {spki_sha256(ee.certificate)}",
        ],
    }
    # One byte of the TLSA data changed after signing: its RRSIG no longer verifies.
    good = spki_sha256(ee.certificate)
    flipped = ("0" if good[0] != "0" else "1") + good[1:]
    tampered = {"bogus.test": (good, flipped)}
    with SignedDns(
        zones,
        signed=["dane.test", "hosting.test", "old.test", "bogus.test"],
        expired=["old.test"],
        tampered=tampered,
    ) as dns:
        yield World(dns, port, ca, ee, ta, ta_expired, ta_wrong_name, cname_target, mismatch, plain)


def engine(world: World) -> Deliverer:
    assert world.dns.nsd is not None
    return Deliverer(
        DeliverySettings(
            helo_name="relay.test", mx_port=world.port, connect_timeout=3, command_timeout=10
        ),
        Resolver([world.dns.nsd.address], port=world.dns.nsd.port, timeout=2),
        dane=Dane(DnssecResolver(["127.0.0.1"], port=world.dns.port, timeout=2)),
    )


OPPORTUNISTIC_DANE = TlsPolicy(TlsMode.OPPORTUNISTIC, dane=DaneMode.OPPORTUNISTIC)


async def deliver(
    deliverer: Deliverer,
    recipient: str,
    tls: TlsPolicy = OPPORTUNISTIC_DANE,
    destination: Destination | None = None,
) -> DeliveryReport:
    return await deliverer.deliver(
        mail_from="a@sender.test",
        recipients=[recipient],
        data=MESSAGE,
        destination=destination or RecipientMx(),
        tls=tls,
        auth=None,
        recipient_domain=recipient.rpartition("@")[2],
    )


def sink(world: World, address: str, issued: Issued | None) -> SmtpSink:
    return SmtpSink(
        host=address,
        port=world.port,
        cert_file=issued.cert_file if issued else None,
        key_file=issued.key_file if issued else None,
    )


def deliver_to(
    world: World,
    address: str,
    issued: Issued | None,
    recipient: str,
    tls: TlsPolicy = OPPORTUNISTIC_DANE,
    destination: Destination | None = None,
) -> tuple[DeliveryReport, SmtpSink]:
    async def scenario() -> tuple[DeliveryReport, SmtpSink]:
        async with sink(world, address, issued) as server:
            deliverer = engine(world)
            try:
                return await deliver(deliverer, recipient, tls, destination), server
            finally:
                await deliverer.close()

    return run(scenario)


def status(report: DeliveryReport) -> DeliveryStatus:
    return report.results[0].status


# --- delivered and verified by TLSA ----------------------------------------------------------


def test_dane_ee_delivers_verified_whatever_the_names_and_issuer(world: World) -> None:
    # TrustedCA with the system roots would refuse this self-signed certificate: DANE
    # replaces the connector's checks, it does not add to them.
    tls = TlsPolicy(TlsMode.TRUSTED_CA, dane=DaneMode.OPPORTUNISTIC)
    report, server = deliver_to(world, "127.0.0.31", world.ee, "b@ee.dane.test", tls)
    assert status(report) is DeliveryStatus.DELIVERED
    assert report.verified
    assert server.messages[0].tls
    assert server.last_server_name == "mx-ee.dane.test"
    assert report.dane == "verified"


def test_trap_dane_ta_without_any_webpki_anchor(world: World) -> None:
    # The CA is in no trust store and no caBundle is given: the TLSA record is the anchor.
    tls = TlsPolicy(TlsMode.TRUSTED_CA, dane=DaneMode.OPPORTUNISTIC)
    report, _ = deliver_to(world, "127.0.0.32", world.ta, "b@ta.dane.test", tls)
    assert status(report) is DeliveryStatus.DELIVERED, report.results
    assert report.verified
    assert report.certificate is not None
    assert report.certificate.matched_name == "mx-ta.dane.test"


def test_trap_the_tlsa_base_domain_is_the_sni_and_the_name_not_the_recipient_domain(
    world: World,
) -> None:
    # DomainMatch alone would send and match "ta.dane.test": with DANE, the MX host name.
    tls = TlsPolicy(TlsMode.DOMAIN_MATCH, dane=DaneMode.OPPORTUNISTIC)
    report, server = deliver_to(world, "127.0.0.32", world.ta, "b@ta.dane.test", tls)
    assert status(report) is DeliveryStatus.DELIVERED, report.results
    assert server.last_server_name == "mx-ta.dane.test"


def test_trap_a_cnamed_mx_host_uses_the_expanded_name_as_base_domain(world: World) -> None:
    report, server = deliver_to(world, "127.0.0.34", world.cname_target, "b@cname.dane.test")
    assert status(report) is DeliveryStatus.DELIVERED, report.results
    assert report.verified
    assert server.last_server_name == "real.hosting.test"
    assert report.certificate is not None
    assert report.certificate.matched_name == "real.hosting.test"


def test_a_smart_host_by_name_is_authenticated_by_its_tlsa(world: World) -> None:
    destination = SmartHost("mx-ee.dane.test", world.port)
    report, _ = deliver_to(
        world, "127.0.0.31", world.ee, "b@anywhere.example", destination=destination
    )
    assert status(report) is DeliveryStatus.DELIVERED, report.results
    assert report.verified


# --- deferred, never downgraded --------------------------------------------------------------


def test_a_tlsa_mismatch_defers(world: World) -> None:
    report, server = deliver_to(world, "127.0.0.33", world.mismatch, "b@bad.dane.test")
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.DANE_MISMATCH
    assert report.dane == "mismatch"
    assert not server.messages
    assert "4.7.5" in report.results[0].message


def test_usable_tlsa_and_no_starttls_defers_never_plaintext(world: World) -> None:
    report, server = deliver_to(world, "127.0.0.36", None, "b@nostarttls.dane.test")
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.NO_STARTTLS
    assert report.dane == "tls_failed"
    assert not server.messages


def test_unusable_tlsa_records_make_tls_mandatory(world: World) -> None:
    # PKIX-EE(1) and an unknown matching type: unusable (RFC 7672 3.1.3), yet TLS is required.
    report, server = deliver_to(world, "127.0.0.35", None, "b@unusable.dane.test")
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.NO_STARTTLS
    assert not server.messages


def test_dane_ta_with_an_expired_leaf_defers(world: World) -> None:
    report, _ = deliver_to(world, "127.0.0.37", world.ta_expired, "b@ta-expired.dane.test")
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.EXPIRED


def test_dane_ta_with_a_certificate_for_another_name_defers(world: World) -> None:
    report, _ = deliver_to(world, "127.0.0.38", world.ta_wrong_name, "b@ta-wrong-name.dane.test")
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.NAME_MISMATCH


def test_trap_expired_rrsigs_defer_without_connecting(world: World) -> None:
    report, server = deliver_to(world, "127.0.0.40", world.plain, "b@expired.dane.test")
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.DANE_LOOKUP
    assert server.connections == 0


def test_trap_a_tlsa_lookup_that_servfails_defers_never_downgrades(world: World) -> None:
    # A bogus RRSIG on the TLSA RRset: unbound answers SERVFAIL; the host has a valid,
    # STARTTLS-capable server that Opportunistic TLS would happily use.
    report, server = deliver_to(world, "127.0.0.41", world.ee, "b@servfail.dane.test")
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.DANE_LOOKUP
    assert "never downgraded" in report.results[0].message
    assert report.dane == "lookup_failed"
    assert server.connections == 0


# --- DANE does not apply: the connector's TLS mode does ---------------------------------------


def test_an_unsigned_zone_falls_back_to_the_tls_mode(world: World) -> None:
    report, server = deliver_to(world, "127.0.0.39", world.plain, "b@unsigned.plain.test")
    assert status(report) is DeliveryStatus.DELIVERED
    assert not report.verified  # Opportunistic: encrypted, not authenticated
    assert report.dane == "not_applicable"
    assert server.messages[0].tls


def test_trap_mx_host_with_insecure_addresses_ignores_its_tlsa(world: World) -> None:
    # The MX RRset is signed; the host is a CNAME into an unsigned zone, so its addresses
    # are insecure: no TLSA lookup at all, not even at the signed original name.
    report, _ = deliver_to(world, "127.0.0.39", world.plain, "b@insecure-a.dane.test")
    assert status(report) is DeliveryStatus.DELIVERED
    assert not report.verified


def test_trap_insecure_mx_rrset_with_a_signed_host_zone_ignores_the_tlsa(world: World) -> None:
    # mx-bad.dane.test has a validated TLSA that would not match: it is not used, because an
    # unsigned MX RRset could have been made by an attacker (RFC 7672 2.2.1).
    report, server = deliver_to(world, "127.0.0.33", world.mismatch, "b@insecure-mx.plain.test")
    assert status(report) is DeliveryStatus.DELIVERED
    assert not report.verified
    assert server.messages


def test_mandatory_dane_defers_when_there_is_no_usable_tlsa(world: World) -> None:
    tls = TlsPolicy(TlsMode.OPPORTUNISTIC, dane=DaneMode.MANDATORY)
    report, server = deliver_to(world, "127.0.0.39", world.plain, "b@unsigned.plain.test", tls)
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.DANE_REQUIRED
    assert report.dane == "required"
    assert server.connections == 0


def test_mandatory_dane_delivers_with_usable_tlsa(world: World) -> None:
    tls = TlsPolicy(TlsMode.OPPORTUNISTIC, dane=DaneMode.MANDATORY)
    report, _ = deliver_to(world, "127.0.0.31", world.ee, "b@ee.dane.test", tls)
    assert status(report) is DeliveryStatus.DELIVERED
    assert report.verified


def test_dane_none_ignores_tlsa_records(world: World) -> None:
    tls = TlsPolicy(TlsMode.OPPORTUNISTIC, dane=DaneMode.NONE)
    report, _ = deliver_to(world, "127.0.0.33", world.mismatch, "b@bad.dane.test", tls)
    assert status(report) is DeliveryStatus.DELIVERED
    assert not report.verified
    assert report.dane is None


# --- without a trusted resolver, and for profiles ----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "state"),
    [(DaneMode.OPPORTUNISTIC, DaneState.NOT_APPLICABLE), (DaneMode.MANDATORY, DaneState.FAILED)],
)
def test_without_a_dnssec_resolver_dane_never_applies(mode: DaneMode, state: DaneState) -> None:
    async def scenario() -> DaneRequirement:
        found = await Dane(None).requirements(
            RecipientMx(), TlsPolicy(dane=mode), "x.test", [("mx.x.test", 25)]
        )
        return found[("mx.x.test", 25)]

    requirement = run(scenario)
    assert requirement.state is state
    assert "--dnssec-resolver" in requirement.reason


def test_profiles_are_not_covered_by_dane() -> None:
    pool = ProfilePool(ObjectRef("ns", "p"), (ServerAddress("mx.x.test", 25),))

    async def scenario() -> DaneRequirement:
        found = await Dane(None).requirements(
            pool, TlsPolicy(dane=DaneMode.OPPORTUNISTIC), "x.test", [("mx.x.test", 25)]
        )
        return found[("mx.x.test", 25)]

    assert run(scenario).state is DaneState.NOT_APPLICABLE


# --- the matching rules, offline ---------------------------------------------------------------


@pytest.fixture
def ta_world(pki: Pki) -> tuple[CertificateAuthority, Issued]:
    ca = pki.ca()
    return ca, ca.issue("mx.example.test")


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matching_type", [0, 1, 2])
@pytest.mark.parametrize("usage", [2, 3])
def test_every_selector_and_matching_type(
    ta_world: tuple[CertificateAuthority, Issued], usage: int, selector: int, matching_type: int
) -> None:
    ca, leaf = ta_world
    target = leaf.certificate if usage == 3 else ca.issued.certificate
    record = Tlsa(usage, selector, matching_type, association(target, selector, matching_type))
    requirement = DaneRequirement(
        DaneState.USABLE, "test", "mx.example.test", ("mx.example.test",), (record,)
    )
    info = verify_chain(requirement, [leaf.der, ca.issued.der])
    assert info.sha256 == hashlib.sha256(leaf.der).hexdigest()


def test_a_full_ta_certificate_in_the_record_anchors_a_chain_that_omits_it(
    ta_world: tuple[CertificateAuthority, Issued],
) -> None:
    ca, leaf = ta_world
    record = Tlsa(2, 0, 0, ca.issued.der)
    requirement = DaneRequirement(
        DaneState.USABLE, "test", "mx.example.test", ("mx.example.test",), (record,)
    )
    verify_chain(requirement, [leaf.der])


def test_a_ta_record_matching_the_leaf_itself_is_no_anchor(
    ta_world: tuple[CertificateAuthority, Issued],
) -> None:
    ca, leaf = ta_world
    record = Tlsa(2, 1, 1, association(leaf.certificate, 1, 1))
    requirement = DaneRequirement(
        DaneState.USABLE, "test", "mx.example.test", ("mx.example.test",), (record,)
    )
    with pytest.raises(TlsPolicyError) as raised:
        verify_chain(requirement, [leaf.der, ca.issued.der])
    assert raised.value.reason is TlsFailure.DANE_MISMATCH


@pytest.mark.parametrize(
    ("record", "usable"),
    [
        (Tlsa(0, 0, 1, b"x" * 32), False),  # PKIX-TA: not for SMTP (RFC 7672 3.1.3)
        (Tlsa(1, 1, 1, b"x" * 32), False),  # PKIX-EE
        (Tlsa(3, 2, 1, b"x" * 32), False),  # unknown selector
        (Tlsa(3, 1, 3, b"x" * 32), False),  # unknown matching type
        (Tlsa(3, 1, 1, b"x" * 31), False),  # a SHA-256 that is not 32 bytes
        (Tlsa(3, 1, 2, b"x" * 64), True),
        (Tlsa(2, 0, 0, b"x"), True),
    ],
)
def test_which_records_are_usable(record: Tlsa, usable: bool) -> None:
    assert record.usable is usable


# --- mailflow explain --resolve ----------------------------------------------------------------


def test_explain_resolve_shows_the_dane_requirement_of_each_next_hop(
    world: World, tmp_path: Path
) -> None:
    assert world.dns.nsd is not None
    (tmp_path / "c.yaml").write_text(
        "apiVersion: mailflow.dev/v1alpha1\n"
        "kind: OutboundConnector\n"
        "metadata: {name: dane, namespace: mail}\n"
        "spec:\n"
        '  recipientDomains: ["*.dane.test", "*.plain.test"]\n'
        "  tls: {mode: Opportunistic, dane: Opportunistic}\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailflow_cli",
            "explain",
            str(tmp_path),
            "--from",
            "a@sender.test",
            "--to",
            "b@ta.dane.test",
            "--to",
            "b@servfail.dane.test",
            "--to",
            "b@insecure-mx.plain.test",
            "--resolve",
            "--dns-server",
            f"127.0.0.1:{world.dns.nsd.port}",
            "--dnssec-resolver",
            f"127.0.0.1:{world.dns.port}",
            "--mx-port",
            str(world.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "tls          Opportunistic, DANE Opportunistic" in text
    assert f"mx-ta.dane.test:{world.port}: usable: TLSA _{world.port}._tcp.mx-ta.dane.test" in text
    assert f"mx.bogus.test:{world.port}: failed: DNSSEC lookup failed" in text
    assert "not_applicable: the MX RRset of insecure-mx.plain.test is not DNSSEC-validated" in text


# --- TLS-RPT: the results of real deliveries, as an RFC 8460 report ------------------------------


def test_dane_outcomes_make_a_tls_report_that_validates_against_rfc_8460(world: World) -> None:
    store = TlsReportStore()
    for address, issued, recipient in [
        ("127.0.0.31", world.ee, "b@ee.dane.test"),
        ("127.0.0.31", world.ee, "c@ee.dane.test"),
        ("127.0.0.33", world.mismatch, "b@bad.dane.test"),
        ("127.0.0.41", world.ee, "b@servfail.dane.test"),
        ("127.0.0.39", world.plain, "b@unsigned.plain.test"),
    ]:
        report, _ = deliver_to(world, address, issued, recipient)
        for result in report.policy_results:
            store.record(result)
    assert store.domains() == [
        "bad.dane.test",
        "ee.dane.test",
        "servfail.dane.test",
        "unsigned.plain.test",
    ]
    start = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    reports = {
        domain: build_report(
            organization="Mailflow tests",
            contact="mailto:tlsrpt@relay.test",
            report_id=f"2026-12-01-{domain}",
            start=start,
            end=start + datetime.timedelta(days=1),
            policies=store.take(domain),
        )
        for domain in store.domains()
    }
    for made in reports.values():
        validate_report(made)

    def policies(domain: str) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], reports[domain]["policies"])

    (ee,) = policies("ee.dane.test")
    assert ee["policy"]["policy-type"] == "tlsa"
    assert ee["policy"]["policy-string"] == [f"3 1 1 {spki_sha256(world.ee.certificate)}"]
    assert ee["summary"] == {
        "total-successful-session-count": 2,
        "total-failure-session-count": 0,
    }
    (bad,) = policies("bad.dane.test")
    assert bad["failure-details"] == [
        {
            "result-type": "tlsa-invalid",
            "failed-session-count": 1,
            "receiving-mx-hostname": "mx-bad.dane.test",
            "receiving-ip": "127.0.0.33",
        }
    ]
    (servfail,) = policies("servfail.dane.test")
    assert servfail["failure-details"][0]["result-type"] == "dnssec-invalid"
    (plain,) = policies("unsigned.plain.test")
    assert plain["policy"] == {
        "policy-type": "no-policy-found",
        "policy-domain": "unsigned.plain.test",
    }
    assert store.domains() == []  # taken: the next period starts empty


# --- the relay: metrics per connector and result, the TLS-RPT store ------------------------------


def test_the_relay_counts_dane_results_per_connector_and_records_them_for_tls_rpt(
    world: World, tmp_path: Path
) -> None:
    assert world.dns.nsd is not None
    settings = RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1",
            port=0,
            hostname="relay.test",
            accept_from=(ipaddress.ip_network("127.0.0.0/8"),),
        ),
        spool_dir=tmp_path / "spool",
        delivery=DeliverySettings(
            helo_name="relay.test", mx_port=world.port, connect_timeout=3, command_timeout=10
        ),
        dns_servers=(world.dns.nsd.address,),
        dns_port=world.dns.nsd.port,
        dnssec_resolvers=("127.0.0.1",),
        dnssec_port=world.dns.port,
        retry_initial=30,
        scheduler_tick=0.05,
        drain_grace=3.0,
    )
    connector = Connector(
        ref=ObjectRef("mail", "mx"),
        generation=1,
        created="",
        enabled=True,
        recipient_patterns=(DomainPattern.parse("*.dane.test"),),
        sender_patterns=(),
        destination=RecipientMx(),
        tls=OPPORTUNISTIC_DANE,
    )

    def result(relay: Relay, value: str) -> float:
        labels = {"connector": "mail/mx", "result": value}
        return relay.metrics.registry.get_sample_value("mailflow_dane_results_total", labels) or 0

    async def scenario() -> tuple[float, float, list[str]]:
        async with sink(world, "127.0.0.31", world.ee), sink(world, "127.0.0.33", world.mismatch):
            relay = Relay(settings, RoutingDocument(generation=1, connectors=(connector,)))
            task = asyncio.create_task(relay.run(), name="test-relay")
            await relay.ready.wait()
            try:
                async with aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
                ) as smtp:
                    await smtp.sendmail(
                        "a@sender.test",
                        ["b@ee.dane.test", "b@bad.dane.test"],
                        b"Subject: dane\r\n\r\nhello\r\n",
                    )
                await until(
                    lambda: result(relay, "verified") >= 1 and result(relay, "mismatch") >= 1
                )
                return (
                    result(relay, "verified"),
                    result(relay, "mismatch"),
                    relay.tls_reports.domains(),
                )
            finally:
                relay.stop()
                await task

    assert run(scenario) == (1.0, 1.0, ["bad.dane.test", "ee.dane.test"])

    def counted(relay: Relay, outcome: str) -> bool:
        return result(relay, outcome) >= 1

    async def one_after_the_other() -> list[dict[str, dict[str, str]]]:
        """The connector's last outcome, for the operator's TransportSecurity condition."""
        async with sink(world, "127.0.0.31", world.ee), sink(world, "127.0.0.33", world.mismatch):
            relay = Relay(
                replace(settings, spool_dir=tmp_path / "again"),
                RoutingDocument(generation=1, connectors=(connector,)),
            )
            task = asyncio.create_task(relay.run(), name="test-relay")
            await relay.ready.wait()
            seen = [relay.transport_status.reported()]
            try:
                for recipient, outcome in (
                    ("b@ee.dane.test", "verified"),
                    ("b@bad.dane.test", "mismatch"),
                ):
                    async with aiosmtplib.SMTP(
                        hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
                    ) as smtp:
                        await smtp.sendmail(
                            "a@sender.test", [recipient], b"Subject: d\r\n\r\nx\r\n"
                        )
                    await until(functools.partial(counted, relay, outcome), what=outcome)
                    seen.append(relay.transport_status.reported())
                return seen
            finally:
                relay.stop()
                await task

    assert run(one_after_the_other) == [
        {},
        {"mail/mx": {"dane": "verified"}},
        {"mail/mx": {"dane": "mismatch"}},
    ]


def test_trap_an_mx_host_from_an_unvalidated_answer_is_never_tried(world: World) -> None:
    # The relay's plain resolver lies (or is stale): it names an MX host that the validated
    # MX RRset does not. That host has no TLSA records, so trying it would bypass DANE.
    with DnsServer({"dane.test": ["ee MX 10 evil.dane.test.", "evil A 127.0.0.45"]}) as liar:

        async def scenario() -> tuple[DeliveryReport, SmtpSink]:
            async with sink(world, "127.0.0.45", world.plain) as evil:
                deliverer = Deliverer(
                    DeliverySettings(
                        helo_name="relay.test",
                        mx_port=world.port,
                        connect_timeout=3,
                        command_timeout=10,
                    ),
                    Resolver([liar.address], port=liar.port, timeout=2),
                    dane=Dane(DnssecResolver(["127.0.0.1"], port=world.dns.port, timeout=2)),
                )
                try:
                    return await deliver(deliverer, "b@ee.dane.test"), evil
                finally:
                    await deliverer.close()

        report, evil = run(scenario)
    assert status(report) is DeliveryStatus.DEFERRED
    assert report.tls_failure is TlsFailure.DANE_LOOKUP
    assert "not in the DNSSEC-validated MX RRset" in report.results[0].message
    assert evil.connections == 0


def test_dane_ta_matches_the_subject_cn_only_when_there_is_no_dns_san(pki: Pki) -> None:
    ca = pki.ca()
    record = Tlsa(2, 1, 1, association(ca.issued.certificate, 1, 1))
    requirement = DaneRequirement(
        DaneState.USABLE, "test", "mx.example.test", ("mx.example.test",), (record,)
    )
    no_san = ca.issue(common_name="mx.example.test")
    assert verify_chain(requirement, [no_san.der, ca.issued.der]).matched_name == "mx.example.test"
    san_elsewhere = ca.issue("other.example.test", common_name="mx.example.test")
    with pytest.raises(TlsPolicyError) as raised:
        verify_chain(requirement, [san_elsewhere.der, ca.issued.der])
    assert raised.value.reason is TlsFailure.NAME_MISMATCH
