"""TLS policy on the delivery side: the five modes of DESIGN.md, exactly.

| mode          | TLS required | chain checked | name checked                                  |
|---------------|--------------|---------------|-----------------------------------------------|
| Opportunistic | no           | no            | no                                            |
| SelfSigned    | yes          | no (pins)     | no                                            |
| TrustedCA     | yes          | yes           | no                                            |
| DomainMatch   | yes          | yes           | recipient domain (RFC 6125) or a subdomain    |
| NameMatch     | yes          | yes           | ``certificateName`` (``*.x``: one label of x) |

The work is split in two, because the two halves happen at different moments:

* :func:`client_context` builds the :class:`ssl.SSLContext` for the handshake. Modes that
  check the chain let OpenSSL do it (trusted issuer, validity period, with the
  connector's CA bundle replacing the system roots); OpenSSL's own host-name check is
  off in every mode, because DomainMatch accepts names that it would not (a subdomain of
  the recipient domain, Postfix's ``dot-nexthop``) and because the name to check is
  not always the host we connect to.
* :func:`check_certificate` runs after the handshake on the peer's DER certificate:
  pins for SelfSigned, the name rules for DomainMatch and NameMatch.

Either half fails with a :class:`TlsPolicyError` whose ``reason`` is one of
:class:`TlsFailure` — the label of the ``tls_failures`` metric and the text of the
deferral — so an administrator sees *why* a required-TLS hop was refused. A required
mode never falls back to plaintext: the caller defers the message on any such error.

Name matching follows RFC 6125 §6.4: DNS subject alternative names only (the subject
CN is used only when the certificate has no DNS SAN at all, §6.4.4), case-insensitive,
IDNs compared as A-labels, and a wildcard only as the whole leftmost label, matching
exactly one label.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import ssl
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID, NameOID

from mailflow_relay.errors import MailflowRelayError
from mailflow_relay.routing.document import TlsMode, TlsPolicy
from mailflow_relay.routing.domains import is_ip_literal

__all__ = [
    "CertificateInfo",
    "TlsFailure",
    "TlsPolicyError",
    "certificate_info",
    "check_certificate",
    "classify_handshake_error",
    "client_context",
    "name_matches",
    "names_to_match",
    "server_name_for",
]


class TlsFailure(enum.Enum):
    """Why a hop that requires TLS was refused (the metric label and the log reason)."""

    NO_STARTTLS = "no_starttls"
    HANDSHAKE = "handshake"
    UNTRUSTED = "untrusted"
    EXPIRED = "expired"
    NAME_MISMATCH = "name_mismatch"
    PIN_MISMATCH = "pin_mismatch"
    DANE_MISMATCH = "dane_mismatch"
    """Validated TLSA records exist and the server's chain matches none (RFC 7672)."""
    DANE_LOOKUP = "dane_lookup"
    """The trusted resolver could not answer (SERVFAIL: bogus or expired signatures)."""
    DANE_REQUIRED = "dane_required"
    """``tls.dane: Mandatory`` and no usable TLSA record."""
    STS_MX_MISMATCH = "sts_mx_mismatch"
    """An MTA-STS policy in enforce mode does not list this MX host."""


class TlsPolicyError(MailflowRelayError, ConnectionError):
    """The next hop does not satisfy the connector's TLS mode; the message is deferred."""

    def __init__(self, reason: TlsFailure, detail: str, *, mode: TlsMode) -> None:
        super().__init__(f"{mode.value}: {reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.mode = mode


@dataclass(frozen=True)
class CertificateInfo:
    """What a delivery log line, a metric or a probe says about the peer's certificate."""

    subject: str
    issuer: str
    dns_names: tuple[str, ...]
    not_after: datetime
    sha256: str
    """Hex SHA-256 of the DER certificate."""
    spki_sha256: str
    """Hex SHA-256 of the DER SubjectPublicKeyInfo."""
    matched_name: str | None = None
    """The certificate name that satisfied DomainMatch or NameMatch."""


# OpenSSL verify codes (x509_vfy.h) that mean "valid chain, wrong time".
_EXPIRED_CODES = frozenset({9, 10})  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED


def client_context(policy: TlsPolicy) -> ssl.SSLContext:
    """The context for STARTTLS to a next hop under ``policy``, shared by every connection.

    Building a verifying context loads a CA bundle (the system's: tens of milliseconds of
    CPU), so contexts are cached by what they depend on: whether the chain is checked,
    the connector's CA bundle, and where the system roots come from (``SSL_CERT_FILE``,
    ``SSL_CERT_DIR``). Nothing per connection lives in the context: names are checked by
    :func:`check_certificate` and SNI is given per connection.
    """
    return _context_for(
        policy.mode.verifies_chain,
        policy.ca_bundle,
        os.environ.get("SSL_CERT_FILE"),
        os.environ.get("SSL_CERT_DIR"),
    )


@functools.lru_cache(maxsize=256)
def _context_for(
    verifies_chain: bool, ca_bundle: str | None, cert_file: str | None, cert_dir: str | None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # names are checked by check_certificate, per mode
    if verifies_chain:
        context.verify_mode = ssl.CERT_REQUIRED
        if ca_bundle:
            context.load_verify_locations(cadata=ca_bundle)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def server_name_for(policy: TlsPolicy, host: str, recipient_domain: str) -> str | None:
    """The SNI to send: the name being checked, else the host; never an IP address."""
    if policy.mode is TlsMode.DOMAIN_MATCH:
        return recipient_domain
    name = policy.certificate_name
    if policy.mode is TlsMode.NAME_MATCH and name and not name.startswith("*."):
        return name
    return None if is_ip_literal(host) else host.rstrip(".")


def classify_handshake_error(error: BaseException, mode: TlsMode) -> TlsPolicyError:
    """Turn what ``ssl`` raised during the handshake into a reasoned policy error."""
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        reason = TlsFailure.EXPIRED if code in _EXPIRED_CODES else TlsFailure.UNTRUSTED
        return TlsPolicyError(reason, error.verify_message or str(error), mode=mode)
    return TlsPolicyError(TlsFailure.HANDSHAKE, str(error) or type(error).__name__, mode=mode)


def certificate_info(der: bytes) -> CertificateInfo:
    certificate = x509.load_der_x509_certificate(der)
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        dns_names=tuple(_dns_names(certificate)),
        not_after=certificate.not_valid_after_utc,
        sha256=hashlib.sha256(der).hexdigest(),
        spki_sha256=hashlib.sha256(spki).hexdigest(),
    )


def check_certificate(
    policy: TlsPolicy, der: bytes | None, recipient_domain: str
) -> CertificateInfo | None:
    """Check the peer certificate after the handshake; raise :class:`TlsPolicyError` if refused.

    ``recipient_domain`` must already be normalised (A-labels, lower case).
    """
    mode = policy.mode
    if der is None:
        if mode.requires_tls:
            raise TlsPolicyError(TlsFailure.HANDSHAKE, "the server sent no certificate", mode=mode)
        return None
    try:
        info = certificate_info(der)
    except ValueError as e:
        # OpenSSL took it, cryptography cannot read it. Modes that check nothing go on;
        # a mode that must check something cannot, and says so.
        if mode is TlsMode.OPPORTUNISTIC or (
            mode is TlsMode.SELF_SIGNED and not policy.pinned_fingerprints
        ):
            return None
        raise TlsPolicyError(TlsFailure.HANDSHAKE, f"unreadable certificate: {e}", mode=mode) from e
    if mode is TlsMode.SELF_SIGNED and policy.pinned_fingerprints:
        pins = {pin.partition("/")[2].lower() for pin in policy.pinned_fingerprints}
        if info.sha256 not in pins and info.spki_sha256 not in pins:
            raise TlsPolicyError(
                TlsFailure.PIN_MISMATCH,
                f"neither the certificate (sha256/{info.sha256}) nor its public key "
                f"(sha256/{info.spki_sha256}) is pinned",
                mode=mode,
            )
    names = _names_to_match(info, der)
    if mode is TlsMode.DOMAIN_MATCH:
        for name in names:
            if _matches(name, recipient_domain) or _names_a_subdomain(name, recipient_domain):
                return _with_match(info, name)
        raise TlsPolicyError(
            TlsFailure.NAME_MISMATCH,
            f"certificate names {list(names)} are neither {recipient_domain} nor a subdomain of it",
            mode=mode,
        )
    if mode is TlsMode.NAME_MATCH:
        wanted = (policy.certificate_name or "").lower()
        for name in names:
            if _name_satisfies(name, wanted):
                return _with_match(info, name)
        raise TlsPolicyError(
            TlsFailure.NAME_MISMATCH,
            f"certificate names {list(names)} do not match certificateName {wanted}",
            mode=mode,
        )
    return info


def _with_match(info: CertificateInfo, name: str) -> CertificateInfo:
    return CertificateInfo(
        subject=info.subject,
        issuer=info.issuer,
        dns_names=info.dns_names,
        not_after=info.not_after,
        sha256=info.sha256,
        spki_sha256=info.spki_sha256,
        matched_name=name,
    )


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        )
    except x509.ExtensionNotFound:
        return []
    assert isinstance(extension.value, x509.SubjectAlternativeName)
    return [name.lower().rstrip(".") for name in extension.value.get_values_for_type(x509.DNSName)]


def _names_to_match(info: CertificateInfo, der: bytes) -> tuple[str, ...]:
    if info.dns_names:
        return info.dns_names
    # RFC 6125 §6.4.4: the CN only when there is no DNS SAN at all.
    certificate = x509.load_der_x509_certificate(der)
    return tuple(
        str(attribute.value).lower().rstrip(".")
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    )


def names_to_match(der: bytes) -> tuple[str, ...]:
    """The certificate's DNS names, or its subject CNs when it has no DNS SAN (RFC 6125)."""
    return _names_to_match(certificate_info(der), der)


def name_matches(presented: str, reference: str) -> bool:
    """RFC 6125 §6.4.3 for one certificate name (lower case) against one host name."""
    return _matches(presented, reference.lower().rstrip("."))


def _matches(presented: str, reference: str) -> bool:
    """RFC 6125 §6.4.3: exact, or a whole-label wildcard on the left matching one label."""
    if presented == reference:
        return "*" not in presented
    if not presented.startswith("*."):
        return False
    head, dot, tail = reference.partition(".")
    return bool(head) and bool(dot) and "*" not in tail and presented[2:] == tail


def _names_a_subdomain(presented: str, domain: str) -> bool:
    """Postfix's dot-nexthop: the certificate names a host (or all hosts) below ``domain``."""
    base = presented[2:] if presented.startswith("*.") else presented
    if "*" in base:
        return False  # partial or inner wildcards ("m*.x", "a.*.x") are never honoured
    return base.endswith("." + domain) or (presented.startswith("*.") and base == domain)


def _name_satisfies(presented: str, wanted: str) -> bool:
    """NameMatch: ``wanted`` is a host name, or ``*.x`` meaning one label left of x."""
    if wanted.startswith("*."):
        # The certificate must cover "one label left of x": the same wildcard, or one
        # concrete host of exactly one label below x.
        return presented == wanted or _matches(wanted, presented)
    return _matches(presented, wanted)
