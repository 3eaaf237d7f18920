"""DANE for SMTP (RFC 7672): TLSA records, trusted only when DNSSEC-validated, authenticate a hop.

The relay validates nothing itself: it asks a validating resolver that it is told to trust
(``--dnssec-resolver``, on loopback or in the cluster) and believes the AD bit of its
answers. With any other resolver (or none) DANE never applies: an unvalidated TLSA record
is a record an attacker could have written.

What applies to one next hop is a :class:`DaneRequirement`, decided before connecting:

* ``NOT_APPLICABLE``: no DNSSEC-validated TLSA records (insecure MX RRset, insecure
  address records, insecure or absent TLSA, an address literal). The connector's TLS mode
  applies, exactly as without DANE.
* ``USABLE``: validated TLSA records with at least one usable record. TLS is mandatory and
  the server is authenticated by the TLSA records only (:func:`verify_chain`): no fallback
  to plaintext, to the connector's mode or to WebPKI.
* ``UNUSABLE``: validated TLSA records, none usable (PKIX-TA(0)/PKIX-EE(1), unknown
  selector or matching type, RFC 7672 §3.1.3). TLS becomes mandatory; the connector's mode
  decides what is checked.
* ``FAILED``: the lookup did not give an answer (SERVFAIL: bogus signatures, expired
  RRSIGs, a broken server) or ``tls.dane: Mandatory`` found nothing usable. This host is
  not tried; the message waits. Never a downgrade.

Traps, each tested in tests/relay/outbound/test_dane.py:

* DANE-TA(2) is a trust anchor for this host only; no WebPKI root is needed or used.
* The TLSA base domain (the CNAME-expanded host name when its TLSA records are found there,
  else the MX host name) is the SNI and a name to match; the original MX host name matches
  too (RFC 7672 §3.2.2). DANE-EE(3) checks neither names nor dates (§3.1.1).
* TLSA records are looked up only when the MX RRset and the host's address records are
  both DNSSEC-validated (§2.2.1, §2.2.2).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import logging
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TLSA
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID

from mailflow_relay.errors import MailflowRelayError
from mailflow_relay.outbound.mta_sts import MtaSts, StsMode, StsPolicy, StsPolicyError
from mailflow_relay.outbound.tls_policy import (
    CertificateInfo,
    TlsFailure,
    TlsPolicyError,
    certificate_info,
    name_matches,
    names_to_match,
)
from mailflow_relay.outbound.tlsrpt import PolicyResult, result_type_for
from mailflow_relay.routing.document import (
    DaneMode,
    Destination,
    MtaStsMode,
    RecipientMx,
    SmartHost,
    TlsMode,
    TlsPolicy,
)

__all__ = [
    "Dane",
    "DaneLookupError",
    "DaneOutcome",
    "DaneRequirement",
    "DaneState",
    "DnssecResolver",
    "Tlsa",
    "dane_context",
    "dane_for",
    "dane_outcome",
    "peer_chain",
    "policy_result",
    "verify_chain",
]

logger = logging.getLogger(__name__)

# RFC 6698 / RFC 7218 numbers.
DANE_TA = 2
DANE_EE = 3
_DIGEST_LENGTHS = {1: 32, 2: 64}
_MAX_CHAIN = 10


class DaneLookupError(MailflowRelayError, LookupError):
    """The trusted resolver gave no usable answer (SERVFAIL, timeout): retry later."""

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"{rdtype} {name}: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


@dataclass(frozen=True)
class SecureAnswer:
    """One answer from the trusted resolver, with what DNSSEC says about it."""

    records: tuple[dns.rdata.Rdata, ...]
    secure: bool
    """The resolver set AD: the answer (or the denial) is DNSSEC-validated."""
    canonical_name: str
    """The name after following CNAMEs (the queried name when there was none)."""


class DnssecResolver:
    """Asks one validating resolver, with DO and AD set, and reads the AD bit of its answers."""

    def __init__(self, nameservers: Sequence[str], *, port: int = 53, timeout: float = 5.0):
        if not nameservers:
            raise ValueError("a DNSSEC resolver needs at least one address")
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.nameservers = list(nameservers)
        self._resolver.port = port
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self._resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver.flags = dns.flags.RD | dns.flags.AD
        self.description = ", ".join(f"{n}:{port}" for n in nameservers)

    async def lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> SecureAnswer:
        """The records of ``name``; empty when it has none or does not exist."""
        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as e:
            responses = list(e.responses().values())  # type: ignore[no-untyped-call]
            secure = bool(responses) and all(_authenticated(r) for r in responses)
            return SecureAnswer((), secure, name.rstrip(".").lower())
        except dns.exception.DNSException as e:
            # SERVFAIL is what a validating resolver answers for bogus data (a bad or
            # expired signature): never read as "no records".
            raise DaneLookupError(name, rdtype.name, str(e) or type(e).__name__) from e
        records = tuple(answer.rrset) if answer.rrset is not None else ()
        canonical = answer.canonical_name.to_text(omit_final_dot=True).lower()
        return SecureAnswer(records, _authenticated(answer.response), canonical)


def _authenticated(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AD)


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    matching_type: int
    data: bytes = field(repr=False)

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1: DANE-TA(2) and DANE-EE(3) only; PKIX usages are unusable for SMTP."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.matching_type == 0:
            return bool(self.data)
        return len(self.data) == _DIGEST_LENGTHS.get(self.matching_type, -1)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching_type} {self.data.hex()[:16]}..."


class DaneState(enum.Enum):
    NOT_APPLICABLE = "not_applicable"
    USABLE = "usable"
    UNUSABLE = "unusable"
    FAILED = "failed"


@dataclass(frozen=True)
class DaneRequirement:
    state: DaneState
    reason: str
    """Why, for the log line, the deferral and ``mailflow explain``."""
    base_domain: str | None = None
    """The TLSA base domain: the SNI, and the first name to match for DANE-TA."""
    names: tuple[str, ...] = ()
    """Names a DANE-TA-verified certificate may carry (base domain, MX host name)."""
    records: tuple[Tlsa, ...] = ()
    failure: TlsFailure | None = None
    """For FAILED: the reason label of the ``tls_failures`` metric."""
    override: TlsPolicy | None = None
    """The TLS policy that replaces the connector's for this hop (MTA-STS enforce)."""
    sts: str | None = None
    """What MTA-STS said of this hop (``enforce``, ``testing-mismatch``, ...), for reports."""
    sts_policy: tuple[str, ...] = field(default=(), repr=False)
    """The MTA-STS policy's lines, for TLS-RPT's policy-string."""

    @property
    def authenticates(self) -> bool:
        return self.state is DaneState.USABLE

    @property
    def requires_tls(self) -> bool:
        return self.state in (DaneState.USABLE, DaneState.UNUSABLE)


NOT_ENABLED = DaneRequirement(DaneState.NOT_APPLICABLE, "tls.dane is None")


def dane_mx_domain(destination: Destination, recipient_domain: str) -> tuple[bool, str | None]:
    """Whether DANE can apply to ``destination``, and whose MX RRset must then be validated.

    A smart host given by name comes from the connector, not from DNS: there is no MX RRset
    to trust (``None``). A profile's servers are not covered (they are addresses or names
    chosen by the administrator, with the TLS mode made for them).
    """
    if isinstance(destination, RecipientMx):
        return True, recipient_domain
    if isinstance(destination, SmartHost):
        return True, destination.host if destination.mx else None
    return False, None


class Dane:
    """Decides the DANE requirement of each next hop, with lookups through the trusted resolver."""

    def __init__(self, resolver: DnssecResolver | None, mta_sts: MtaSts | None = None) -> None:
        self.resolver = resolver
        self.mta_sts = mta_sts

    async def requirements(
        self,
        destination: Destination,
        tls: TlsPolicy,
        recipient_domain: str,
        hosts: Iterable[tuple[str, int]],
    ) -> dict[tuple[str, int], DaneRequirement]:
        """The requirement for every (host, port) of one delivery: DANE, then MTA-STS."""
        found = await self._dane_requirements(destination, tls, recipient_domain, hosts)
        if tls.mta_sts is MtaStsMode.NONE or self.mta_sts is None:
            return found
        if isinstance(destination, RecipientMx):
            policy_domain = recipient_domain
        elif isinstance(destination, SmartHost):
            policy_domain = destination.host  # RFC 8461 3.4: the smart host's domain
        else:
            return found
        try:
            policy = await self.mta_sts.policy(policy_domain)
        except StsPolicyError as e:
            # No policy could be had: delivery goes on as without one (RFC 8461 5.1).
            logger.warning("%s: delivering as without a policy", e)
            note = e.result_type
            return {h: dataclasses.replace(r, sts=r.sts or note) for h, r in found.items()}
        if policy is None or policy.mode is StsMode.NONE:
            return found
        return {
            h: _with_sts(r, tls, policy, h[0], self.mta_sts.ca_bundle) for h, r in found.items()
        }

    async def _dane_requirements(
        self,
        destination: Destination,
        tls: TlsPolicy,
        recipient_domain: str,
        hosts: Iterable[tuple[str, int]],
    ) -> dict[tuple[str, int], DaneRequirement]:
        hosts = list(dict.fromkeys(hosts))
        if tls.dane is DaneMode.NONE:
            return dict.fromkeys(hosts, NOT_ENABLED)
        applies, mx_domain = dane_mx_domain(destination, recipient_domain)
        if not applies:
            found = DaneRequirement(DaneState.NOT_APPLICABLE, "DANE is not used for profiles")
            return {host: _enforce(tls, found) for host in hosts}
        if self.resolver is None:
            found = DaneRequirement(
                DaneState.NOT_APPLICABLE,
                "no DNSSEC-validating resolver is configured (--dnssec-resolver)",
            )
            return {host: _enforce(tls, found) for host in hosts}
        mx_secure: DaneRequirement | None = None
        validated: frozenset[str] | None = None
        if mx_domain is not None:
            mx_secure, validated = await self._mx_state(mx_domain)
        result: dict[tuple[str, int], DaneRequirement] = {}
        for host, port in hosts:
            found = (
                mx_secure
                or _not_validated(host, validated, mx_domain)
                or await self.requirement(host, port)
            )
            result[(host, port)] = _enforce(tls, found)
            logger.info(
                "DANE for %s:%d (%s): %s: %s",
                host,
                port,
                tls.dane.value,
                result[(host, port)].state.value,
                result[(host, port)].reason,
            )
        return result

    async def _mx_state(self, domain: str) -> tuple[DaneRequirement | None, frozenset[str] | None]:
        """(None, the validated MX hosts) when the MX RRset is validated; else what applies
        to all of its hosts."""
        assert self.resolver is not None
        try:
            answer = await self.resolver.lookup(domain, dns.rdatatype.MX)
        except DaneLookupError as e:
            return _lookup_failed(e), None
        if answer.secure:
            hosts = frozenset(
                r.exchange.to_text(omit_final_dot=True).lower()
                for r in answer.records
                if isinstance(r, dns.rdtypes.ANY.MX.MX)
            )
            return None, hosts
        return DaneRequirement(
            DaneState.NOT_APPLICABLE,
            f"the MX RRset of {domain} is not DNSSEC-validated: its hosts' TLSA records are not used",
        ), None

    async def requirement(self, host: str, port: int) -> DaneRequirement:
        """What the TLSA records of ``host`` say, once its name is known to be trustworthy."""
        assert self.resolver is not None
        if _is_address(host):
            return DaneRequirement(DaneState.NOT_APPLICABLE, f"{host} is an address: no TLSA")
        host = host.rstrip(".").lower()
        try:
            address = await self.resolver.lookup(host, dns.rdatatype.A)
            if not address.records:
                address = await self.resolver.lookup(host, dns.rdatatype.AAAA)
            if not address.secure:
                return DaneRequirement(
                    DaneState.NOT_APPLICABLE,
                    f"the address records of {host} are not DNSSEC-validated: no TLSA lookup",
                )
            # RFC 7672 §2.2.2: a CNAME'd host's TLSA records are looked for at the expanded
            # name first, then at the original name; where they are found is the base domain.
            # An insecure answer there (or a validated denial) moves on to the next name.
            insecure: list[str] = []
            for base in dict.fromkeys([address.canonical_name, host]):
                owner = f"_{port}._tcp.{base}"
                answer = await self.resolver.lookup(owner, dns.rdatatype.TLSA)
                if not answer.secure:
                    insecure.append(owner)
                elif answer.records:
                    return _from_tlsa(owner, base, host, answer.records)
        except DaneLookupError as e:
            return _lookup_failed(e)
        if insecure:
            return DaneRequirement(
                DaneState.NOT_APPLICABLE, f"TLSA {', '.join(insecure)}: not DNSSEC-validated"
            )
        return DaneRequirement(
            DaneState.NOT_APPLICABLE, f"no TLSA records for {host} (DNSSEC-validated denial)"
        )


def _from_tlsa(
    owner: str, base: str, host: str, found: Sequence[dns.rdata.Rdata]
) -> DaneRequirement:
    records = tuple(
        Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert))
        for r in found
        if isinstance(r, dns.rdtypes.ANY.TLSA.TLSA)
    )
    names = tuple(dict.fromkeys([base, host]))
    usable = tuple(r for r in records if r.usable)
    if not usable:
        return DaneRequirement(
            DaneState.UNUSABLE,
            f"TLSA {owner}: {len(records)} record(s), none usable (RFC 7672 3.1.3): "
            "TLS is mandatory, not authenticated by DANE",
            base_domain=base,
            names=names,
            records=records,
        )
    return DaneRequirement(
        DaneState.USABLE,
        f"TLSA {owner}: {len(usable)} usable record(s)",
        base_domain=base,
        names=names,
        records=usable,
    )


class DaneOutcome(enum.Enum):
    """What DANE did for one delivery: the ``result`` label of ``mailflow_dane_results``."""

    VERIFIED = "verified"
    """Authenticated by the TLSA records and delivered."""
    MISMATCH = "mismatch"
    """Validated TLSA records that the server's chain does not match: deferred."""
    TLS_FAILED = "tls_failed"
    """Usable TLSA records, and no STARTTLS, a failed handshake, a wrong name or date."""
    LOOKUP_FAILED = "lookup_failed"
    REQUIRED = "required"
    """``tls.dane: Mandatory`` without usable TLSA records: deferred."""
    UNUSABLE = "unusable"
    NOT_APPLICABLE = "not_applicable"


def dane_outcome(
    requirement: DaneRequirement | None, tls_failure: TlsFailure | None
) -> DaneOutcome | None:
    """The outcome of one attempt under ``requirement``; None when ``tls.dane`` is None."""
    if requirement is None or requirement is NOT_ENABLED:
        return None
    if tls_failure is TlsFailure.DANE_LOOKUP:
        return DaneOutcome.LOOKUP_FAILED
    if tls_failure is TlsFailure.DANE_REQUIRED:
        return DaneOutcome.REQUIRED
    if tls_failure is TlsFailure.DANE_MISMATCH:
        return DaneOutcome.MISMATCH
    if requirement.state is DaneState.USABLE:
        return DaneOutcome.TLS_FAILED if tls_failure is not None else DaneOutcome.VERIFIED
    if requirement.state is DaneState.UNUSABLE:
        return DaneOutcome.UNUSABLE
    return DaneOutcome.NOT_APPLICABLE


def dane_for(
    resolvers: Sequence[str], port: int, timeout: float = 5.0, mta_sts: MtaSts | None = None
) -> Dane:
    """The relay's DANE, with the resolvers of ``--dnssec-resolver`` (none: never applies)."""
    if not resolvers:
        return Dane(None, mta_sts)
    logger.info("DANE: trusting the AD bit of %s", ", ".join(f"{r}:{port}" for r in resolvers))
    return Dane(DnssecResolver(resolvers, port=port, timeout=timeout), mta_sts)


def _with_sts(
    found: DaneRequirement, tls: TlsPolicy, policy: StsPolicy, host: str, ca_bundle: str | None
) -> DaneRequirement:
    """MTA-STS on top of DANE: a usable or failed DANE requirement is never overridden."""
    if found.state in (DaneState.USABLE, DaneState.FAILED):
        return found
    allowed = policy.allows(host)
    if policy.mode is StsMode.TESTING:
        return dataclasses.replace(
            found, sts="testing" if allowed else "testing-mismatch", sts_policy=_lines(policy)
        )
    if not allowed:
        return DaneRequirement(
            DaneState.FAILED,
            f"MTA-STS policy {policy.id} of {policy.domain} (enforce) does not list {host} "
            f"(mx: {', '.join(policy.mx)})",
            failure=TlsFailure.STS_MX_MISMATCH,
            sts="enforce-mismatch",
            sts_policy=_lines(policy),
        )
    override = None
    if tls.mode in (TlsMode.OPPORTUNISTIC, TlsMode.TRUSTED_CA):
        # Enforce: TLS with a WebPKI certificate valid for the MX host name. The modes
        # that already check at least as much keep their own checks.
        override = TlsPolicy(TlsMode.NAME_MATCH, certificate_name=host, ca_bundle=ca_bundle)
    return dataclasses.replace(found, override=override, sts="enforce", sts_policy=_lines(policy))


def _lines(policy: StsPolicy) -> tuple[str, ...]:
    return tuple(line.strip() for line in policy.text.splitlines() if line.strip())


_STS_NOTES = ("enforce", "testing", "testing-mismatch", "enforce-mismatch")
_DANE_FAILURES = (TlsFailure.DANE_LOOKUP, TlsFailure.DANE_MISMATCH, TlsFailure.DANE_REQUIRED)


def policy_result(
    requirement: DaneRequirement | None,
    policy_domain: str,
    host: str,
    address: str,
    tls_failure: TlsFailure | None,
) -> PolicyResult:
    """One attempt as TLS-RPT sees it: which policy applied, and what came of it."""
    requirement = requirement or NOT_ENABLED
    result_type = None if tls_failure is None else result_type_for(tls_failure)
    code = None
    if requirement.state is DaneState.USABLE or tls_failure in _DANE_FAILURES:
        kind = "tlsa"
        strings = tuple(
            f"{r.usage} {r.selector} {r.matching_type} {r.data.hex()}" for r in requirement.records
        )
    elif requirement.sts in _STS_NOTES:
        kind, strings = "sts", requirement.sts_policy
        if requirement.sts == "testing-mismatch" and result_type is None:
            # testing: delivered, and reported as what enforce would have refused.
            result_type = "validation-failure"
        if requirement.sts.endswith("mismatch"):
            code = "mx-not-in-policy"
    elif requirement.sts is not None:
        # The policy could not be had (fetch error, invalid policy): that is the failure.
        kind, strings, result_type = "sts", (), requirement.sts
    else:
        kind, strings = "no-policy-found", ()
    return PolicyResult(
        policy_type=kind,
        policy_domain=policy_domain,
        policy_strings=strings,
        result_type=result_type,
        receiving_mx_hostname=host if result_type else None,
        receiving_ip=address if result_type else None,
        failure_reason_code=code,
    )


def _not_validated(
    host: str, validated: frozenset[str] | None, mx_domain: str | None
) -> DaneRequirement | None:
    """A host that the validated MX RRset does not name came from an unvalidated answer
    (the plain resolver lied, or is stale): never tried, or an attacker's MX host would
    bypass DANE by having no TLSA records."""
    if validated is None or mx_domain is None:
        return None
    name = host.rstrip(".").lower()
    if name in validated or (not validated and name == mx_domain.rstrip(".").lower()):
        return None  # listed, or the implicit MX of a domain with a validated "no MX"
    return DaneRequirement(
        DaneState.FAILED,
        f"{host} is not in the DNSSEC-validated MX RRset of {mx_domain} "
        f"({', '.join(sorted(validated)) or 'no MX records'}): not tried",
        failure=TlsFailure.DANE_LOOKUP,
    )


def _lookup_failed(error: DaneLookupError) -> DaneRequirement:
    return DaneRequirement(
        DaneState.FAILED,
        f"DNSSEC lookup failed ({error}): the host is not tried, never downgraded",
        failure=TlsFailure.DANE_LOOKUP,
    )


def _enforce(tls: TlsPolicy, found: DaneRequirement) -> DaneRequirement:
    """``tls.dane: Mandatory`` (Postfix's dane-only): nothing usable means no delivery."""
    if tls.dane is DaneMode.MANDATORY and found.state in (
        DaneState.NOT_APPLICABLE,
        DaneState.UNUSABLE,
    ):
        return DaneRequirement(
            DaneState.FAILED,
            f"tls.dane is Mandatory and there is no usable TLSA record: {found.reason}",
            base_domain=found.base_domain,
            names=found.names,
            failure=TlsFailure.DANE_REQUIRED,
        )
    return found


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# --- after the handshake ------------------------------------------------------------------


def dane_context() -> ssl.SSLContext:
    """A context that checks nothing itself: :func:`verify_chain` does, from the TLSA records."""
    return _DANE_CONTEXT


def _make_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the chain is checked against the TLSA records
    return context


_DANE_CONTEXT = _make_context()


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, leaf first, as DER (not verified by OpenSSL)."""
    chain_of = getattr(ssl_object, "get_unverified_chain", None)  # Python 3.13+
    if chain_of is None:
        # Python 3.10-3.12 have the same method, on the private _ssl object only.
        chain_of = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    chain: list[bytes] = []
    if chain_of is not None:
        for certificate in chain_of() or ():
            if isinstance(certificate, bytes):
                chain.append(certificate)
            else:
                chain.append(certificate.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    if not chain:
        leaf = ssl_object.getpeercert(binary_form=True)
        if leaf:
            chain.append(leaf)
    return chain[:_MAX_CHAIN]


def association(certificate: x509.Certificate, selector: int, matching_type: int) -> bytes:
    """The certificate association data of ``certificate`` (RFC 6698 §2.1)."""
    if selector == 0:
        data = certificate.public_bytes(serialization.Encoding.DER)
    else:
        data = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if matching_type == 1:
        return hashlib.sha256(data).digest()
    if matching_type == 2:
        return hashlib.sha512(data).digest()
    return data


@dataclass(frozen=True)
class _Anchor:
    key: object
    subject: x509.Name | None


def verify_chain(
    requirement: DaneRequirement, chain: Sequence[bytes], *, now: datetime | None = None
) -> CertificateInfo:
    """Authenticate the server by the TLSA records; raise :class:`TlsPolicyError` if refused."""
    mode = TlsMode.OPPORTUNISTIC  # only for the error's text: DANE replaced the mode
    if not chain:
        raise TlsPolicyError(TlsFailure.DANE_MISMATCH, "the server sent no certificate", mode=mode)
    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as e:
        raise TlsPolicyError(
            TlsFailure.DANE_MISMATCH, f"unreadable certificate: {e}", mode=mode
        ) from e
    leaf = certificates[0]
    info = certificate_info(chain[0])
    for record in requirement.records:
        if record.usage == DANE_EE and association(leaf, record.selector, record.matching_type) == (
            record.data
        ):
            # RFC 7672 §3.1.1: the key is the server's; names and dates say nothing more.
            return info
    anchors = _trust_anchors(requirement.records, certificates[1:])
    if not anchors:
        raise TlsPolicyError(
            TlsFailure.DANE_MISMATCH,
            f"no TLSA record of {requirement.base_domain} matches the certificate chain "
            f"(leaf sha256/{info.sha256})",
            mode=mode,
        )
    now = now or datetime.now(UTC)
    _check_path(certificates, anchors, now)
    for name in names_to_match(chain[0]):
        for wanted in requirement.names:
            if name_matches(name, wanted):
                return CertificateInfo(
                    subject=info.subject,
                    issuer=info.issuer,
                    dns_names=info.dns_names,
                    not_after=info.not_after,
                    sha256=info.sha256,
                    spki_sha256=info.spki_sha256,
                    matched_name=name,
                )
    raise TlsPolicyError(
        TlsFailure.NAME_MISMATCH,
        f"DANE-TA: certificate names {list(info.dns_names)} match none of "
        f"{list(requirement.names)}",
        mode=mode,
    )


def _trust_anchors(records: Iterable[Tlsa], issuers: Sequence[x509.Certificate]) -> list[_Anchor]:
    anchors: list[_Anchor] = []
    for record in records:
        if record.usage != DANE_TA:
            continue
        anchors.extend(
            _Anchor(issuer.public_key(), issuer.subject)
            for issuer in issuers
            if association(issuer, record.selector, record.matching_type) == record.data
        )
        # A full certificate or key in the record is an anchor even if the server omits it.
        if record.matching_type == 0:
            try:
                if record.selector == 0:
                    certificate = x509.load_der_x509_certificate(record.data)
                    anchors.append(_Anchor(certificate.public_key(), certificate.subject))
                else:
                    anchors.append(_Anchor(serialization.load_der_public_key(record.data), None))
            except ValueError:
                continue
    return anchors


def _check_path(
    certificates: Sequence[x509.Certificate], anchors: Sequence[_Anchor], now: datetime
) -> None:
    """Leaf to anchor through the server's intermediates: signatures, CA flags, dates."""
    mode = TlsMode.OPPORTUNISTIC
    current = certificates[0]
    pool = list(certificates[1:])
    for depth in range(_MAX_CHAIN):
        if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
            raise TlsPolicyError(
                TlsFailure.EXPIRED,
                f"DANE-TA: {current.subject.rfc4514_string()} is outside its validity period",
                mode=mode,
            )
        if depth > 0 and not _is_ca(current):
            raise TlsPolicyError(
                TlsFailure.DANE_MISMATCH,
                f"DANE-TA: {current.subject.rfc4514_string()} is not a CA certificate",
                mode=mode,
            )
        for anchor in anchors:
            if (anchor.subject is None or anchor.subject == current.issuer) and _signed_by(
                current, anchor.key
            ):
                return
        issuer = next(
            (
                c
                for c in pool
                if c.subject == current.issuer
                and c is not current
                and _signed_by(current, c.public_key())
            ),
            None,
        )
        if issuer is None:
            break
        pool.remove(issuer)
        current = issuer
    raise TlsPolicyError(
        TlsFailure.DANE_MISMATCH,
        "DANE-TA: the chain does not lead to the trust anchor of the TLSA records",
        mode=mode,
    )


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_oid(
            ExtensionOID.BASIC_CONSTRAINTS
        ).value
    except x509.ExtensionNotFound:
        return False
    return isinstance(constraints, x509.BasicConstraints) and constraints.ca


def _signed_by(certificate: x509.Certificate, key: object) -> bool:
    signature = certificate.signature
    data = certificate.tbs_certificate_bytes
    algorithm = certificate.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            parameters = certificate.signature_algorithm_parameters
            if not isinstance(parameters, padding.PSS | padding.PKCS1v15):
                return False
            key.verify(signature, data, parameters, algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
