"""The five TLS modes against real TLS handshakes with certificates made by the tests.

Each handshake is real OpenSSL on both sides, connected by memory BIOs instead of a
socket, so the matrix runs in milliseconds; the relay's socket-level tests (STARTTLS
offered or not) build on these semantics.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from mailflow_relay.outbound.tls_policy import (
    TlsFailure,
    TlsPolicyError,
    check_certificate,
    classify_handshake_error,
    client_context,
    server_name_for,
)
from mailflow_relay.routing.document import TlsMode, TlsPolicy

if TYPE_CHECKING:
    from pki import Issued, Pki

RECIPIENT_DOMAIN = "contoso.example"
HOST = "mx.contoso.example"


def handshake(server: Issued, policy: TlsPolicy, server_name: str | None) -> bytes | None:
    """A full TLS handshake between a server with ``server`` and a client under ``policy``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server.cert_file, server.key_file)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(policy).wrap_bio(client_in, client_out, server_hostname=server_name)
    served = server_context.wrap_bio(to_server, to_client, server_side=True)
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        to_server.write(client_out.read())
        if not server_done:
            try:
                served.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                server_done = True  # the client refused us; its side raises the reason
        client_in.write(to_client.read())
        if client_done and server_done:
            break
    return client.getpeercert(binary_form=True)


def deliver(server: Issued, policy: TlsPolicy) -> str:
    """What the relay would do: ``ok``, or the failure reason that defers the message."""
    try:
        der = handshake(server, policy, server_name_for(policy, HOST, RECIPIENT_DOMAIN))
    except ssl.SSLError as e:
        return classify_handshake_error(e, policy.mode).reason.value
    try:
        check_certificate(policy, der, RECIPIENT_DOMAIN)
    except TlsPolicyError as e:
        return e.reason.value
    return "ok"


@dataclass
class Certificates:
    trusted_ca_pem: str
    valid: Issued
    untrusted: Issued
    expired: Issued
    wrong_name: Issued
    self_signed: Issued


@pytest.fixture
def certs(pki: Pki) -> Certificates:
    ca = pki.ca()
    other_ca = pki.ca("Somebody Else's CA")
    return Certificates(
        trusted_ca_pem=ca.pem,
        valid=ca.issue(HOST),
        untrusted=other_ca.issue(HOST),
        expired=ca.issue(HOST, expired=True),
        wrong_name=ca.issue("mail.fabrikam.example"),
        self_signed=pki.self_signed(HOST),
    )


OK = "ok"
MATRIX = {
    # mode: valid, untrusted CA, expired, wrong name, self-signed
    TlsMode.OPPORTUNISTIC: (OK, OK, OK, OK, OK),
    TlsMode.SELF_SIGNED: (OK, OK, OK, OK, OK),
    TlsMode.TRUSTED_CA: (OK, "untrusted", "expired", OK, "untrusted"),
    TlsMode.DOMAIN_MATCH: (OK, "untrusted", "expired", "name_mismatch", "untrusted"),
    TlsMode.NAME_MATCH: (OK, "untrusted", "expired", "name_mismatch", "untrusted"),
}
KINDS = ("valid", "untrusted", "expired", "wrong_name", "self_signed")


@pytest.mark.parametrize(
    ("mode", "kind", "expected"),
    [
        (mode, kind, outcome)
        for mode, row in MATRIX.items()
        for kind, outcome in zip(KINDS, row, strict=True)
    ],
    ids=[f"{mode.value}-{kind}" for mode in MATRIX for kind in KINDS],
)
def test_tls_mode_against_certificate(
    certs: Certificates, mode: TlsMode, kind: str, expected: str
) -> None:
    policy = TlsPolicy(
        mode=mode,
        certificate_name=HOST if mode is TlsMode.NAME_MATCH else None,
        ca_bundle=certs.trusted_ca_pem if mode.verifies_chain else None,
    )
    assert deliver(getattr(certs, kind), policy) == expected


def test_self_signed_accepts_a_certificate_pinned_by_its_own_hash(certs: Certificates) -> None:
    policy = TlsPolicy(TlsMode.SELF_SIGNED, pinned_fingerprints=(certs.self_signed.cert_pin,))
    assert deliver(certs.self_signed, policy) == OK


def test_self_signed_accepts_a_certificate_pinned_by_its_public_key(certs: Certificates) -> None:
    policy = TlsPolicy(TlsMode.SELF_SIGNED, pinned_fingerprints=(certs.self_signed.key_pin,))
    assert deliver(certs.self_signed, policy) == OK


def test_self_signed_refuses_a_certificate_that_matches_no_pin(certs: Certificates) -> None:
    policy = TlsPolicy(
        TlsMode.SELF_SIGNED,
        pinned_fingerprints=(certs.valid.cert_pin, certs.valid.key_pin),
    )
    assert deliver(certs.self_signed, policy) == "pin_mismatch"


def test_a_connector_ca_bundle_replaces_the_system_roots(certs: Certificates) -> None:
    with_bundle = TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=certs.trusted_ca_pem)
    system_roots = TlsPolicy(TlsMode.TRUSTED_CA)
    assert deliver(certs.valid, with_bundle) == OK
    assert deliver(certs.valid, system_roots) == "untrusted"


def test_name_match_with_a_wildcard_accepts_one_label_only(pki: Pki) -> None:
    ca = pki.ca()
    policy = TlsPolicy(TlsMode.NAME_MATCH, certificate_name="*.contoso.example", ca_bundle=ca.pem)
    assert deliver(ca.issue("mx.contoso.example"), policy) == OK
    assert deliver(ca.issue("*.contoso.example"), policy) == OK
    assert deliver(ca.issue("a.b.contoso.example"), policy) == "name_mismatch"
    assert deliver(ca.issue("contoso.example"), policy) == "name_mismatch"


@pytest.mark.parametrize(
    ("san", "expected"),
    [
        ("contoso.example", OK),
        ("*.contoso.example", OK),
        ("mx.contoso.example", OK),
        ("mx.eu.contoso.example", OK),
        ("*.example", OK),  # RFC 6125: a wildcard covers exactly one label
        ("notcontoso.example", "name_mismatch"),
        ("contoso.example.evil", "name_mismatch"),
        ("m*.contoso.example", "name_mismatch"),
    ],
)
def test_domain_match_accepts_the_domain_or_a_subdomain_of_it(
    pki: Pki, san: str, expected: str
) -> None:
    ca = pki.ca()
    policy = TlsPolicy(TlsMode.DOMAIN_MATCH, ca_bundle=ca.pem)
    assert deliver(ca.issue(san), policy) == expected


def test_the_common_name_counts_only_when_there_is_no_dns_san(pki: Pki) -> None:
    ca = pki.ca()
    policy = TlsPolicy(TlsMode.NAME_MATCH, certificate_name=HOST, ca_bundle=ca.pem)
    assert deliver(ca.issue(common_name=HOST), policy) == OK
    assert deliver(ca.issue("other.example", common_name=HOST), policy) == "name_mismatch"


def test_a_required_mode_refuses_a_peer_without_a_certificate() -> None:
    with pytest.raises(TlsPolicyError) as info:
        check_certificate(TlsPolicy(TlsMode.SELF_SIGNED), None, RECIPIENT_DOMAIN)
    assert info.value.reason is TlsFailure.HANDSHAKE
    assert check_certificate(TlsPolicy(TlsMode.OPPORTUNISTIC), None, RECIPIENT_DOMAIN) is None


def test_certificate_details_are_reported_for_logs_and_probes(certs: Certificates) -> None:
    policy = TlsPolicy(TlsMode.DOMAIN_MATCH, ca_bundle=certs.trusted_ca_pem)
    info = check_certificate(policy, certs.valid.der, RECIPIENT_DOMAIN)
    assert info is not None
    assert info.dns_names == (HOST,)
    assert info.matched_name == HOST
    assert info.issuer == "CN=Mailflow Test Root CA"
    assert "sha256/" + info.sha256 == certs.valid.cert_pin


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (TlsPolicy(TlsMode.DOMAIN_MATCH), RECIPIENT_DOMAIN),
        (
            TlsPolicy(TlsMode.NAME_MATCH, certificate_name="relay.payroll.example"),
            "relay.payroll.example",
        ),
        (TlsPolicy(TlsMode.NAME_MATCH, certificate_name="*.contoso.example"), HOST),
        (TlsPolicy(TlsMode.TRUSTED_CA), HOST),
        (TlsPolicy(TlsMode.OPPORTUNISTIC), HOST),
    ],
    ids=["domain-match", "name-match", "name-match-wildcard", "trusted-ca", "opportunistic"],
)
def test_sni_carries_the_name_being_checked(policy: TlsPolicy, expected: str) -> None:
    assert server_name_for(policy, HOST, RECIPIENT_DOMAIN) == expected


def test_sni_is_never_an_ip_address() -> None:
    assert server_name_for(TlsPolicy(TlsMode.TRUSTED_CA), "192.0.2.10", RECIPIENT_DOMAIN) is None


def test_the_sni_sent_is_the_one_the_server_sees(certs: Certificates) -> None:
    seen: list[str | None] = []
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs.valid.cert_file, certs.valid.key_file)
    server_context.sni_callback = lambda _sock, name, _ctx: seen.append(name)
    policy = TlsPolicy(TlsMode.DOMAIN_MATCH, ca_bundle=certs.trusted_ca_pem)
    to_server, to_client, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context(policy).wrap_bio(
        client_in, client_out, server_hostname=server_name_for(policy, HOST, RECIPIENT_DOMAIN)
    )
    served = server_context.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(10):
        for side in (client, served):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
            to_server.write(client_out.read())
            client_in.write(to_client.read())
    assert seen == [RECIPIENT_DOMAIN]
