"""DkimKeys in the operator: their status, key generation, and the DNS check.

Status (pure, like :mod:`.status`): ``Accepted`` and ``ResolvedRefs`` from the compiler's
findings, ``Ready`` as their summary (the relays can sign with the key), ``DnsPublished``
from the last DNS check, the public key's ``fingerprint`` and the exact TXT record to
publish (``dnsRecord``: ``<selector>._domainkey.<domain>``, its value split into strings of
at most 255 bytes). Nothing in the status is derived from the private key but its public
half.

Generation (``spec.generate: {}``): when the Secret named by ``privateKey.secretRef`` does
not exist, the operator creates it with a new key of the declared algorithm (RSA: 2048
bits). It never replaces or patches a Secret: it only ever sends a *create*, which the API
server refuses with 409 when the Secret appeared meanwhile.

The DNS check asks the resolver the operator is given for the TXT record and compares its
``p=`` with this key's public key: a rotation publishes the new selector, waits for
``DnsPublished=True``, and only then enables it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import dns.asyncresolver
import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailflow_compiler.compiler import Finding
from mailflow_compiler.dkim import DEFAULT_PRIVATE_KEY_KEY
from mailflow_operator.status import (
    READY,
    Condition,
    accepted,
    merge_conditions,
    now_rfc3339,
    resolved_refs,
)
from mailflow_relay.errors import DkimKeyError
from mailflow_relay.routing.dkim_keys import (
    DkimAlgorithm,
    LoadedKey,
    dns_record_name,
    dns_txt_strings,
    load_private_key,
    parse_duration,
)
from mailflow_relay.routing.document import ObjectRef

__all__ = [
    "DNS_PUBLISHED",
    "DnsCheck",
    "DnsResult",
    "check_dns",
    "dkim_status",
    "dns_check_for",
    "generated_secret",
    "loaded_key",
    "wants_generated_secret",
]

DNS_PUBLISHED: Final = "DnsPublished"
SIGNATURES_OUTLAST_QUEUE: Final = "SignaturesOutlastQueue"
"""Whether a signature made at acceptance is still valid when the relays give up on the
message: the relay signs once, when it accepts, so mail that waits in the queue longer than
``expireAfter`` arrives with an expired ``x=`` and fails DKIM (and DMARC) at the receiver."""
OUTLASTS_QUEUE: Final = "OutlastsQueue"
"""True: no ``expireAfter``, or one at least as long as the queue lifetime."""
EXPIRES_IN_QUEUE: Final = "ExpiresWhileQueued"
"""False: ``expireAfter`` is shorter than the queue lifetime (a Warning event says so)."""
# Condition reasons.
PUBLISHED: Final = "Published"
NOT_PUBLISHED: Final = "NotPublished"
KEY_MISMATCH: Final = "KeyMismatch"
REVOKED: Final = "Revoked"
LOOKUP_FAILED: Final = "LookupFailed"
NOT_CHECKED: Final = "NotChecked"
DISABLED: Final = "Disabled"
SECRET_UNKNOWN: Final = "SecretUnknown"  # noqa: S105 - a condition reason
READY_REASON: Final = "Ready"
GENERATED_ANNOTATION: Final = "mailflow.dev/generated-for"
GENERATED_RSA_BITS: Final = 2048
DEFAULT_QUEUE_LIFETIME: Final = 5 * 24 * 3600.0
"""The relays' default ``--queue-lifetime`` (Postfix's ``maximal_queue_lifetime``)."""


@dataclass(frozen=True)
class DnsCheck:
    """What one DNS check looks for; a change restarts the check."""

    name: str
    public_key: str
    """The expected p= value (base64, no white space)."""


@dataclass(frozen=True)
class DnsResult:
    status: str
    reason: str
    message: str


def _secret_ref(spec: Mapping[str, Any]) -> tuple[str, str]:
    secret_ref = (spec.get("privateKey") or {}).get("secretRef") or {}
    return str(secret_ref.get("name", "")), str(secret_ref.get("key", DEFAULT_PRIVATE_KEY_KEY))


def loaded_key(
    raw: Mapping[str, Any], secrets: Mapping[ObjectRef, Mapping[str, str]], namespace: str
) -> LoadedKey | None:
    """The key of a DkimKey's Secret, parsed (None when missing or unusable)."""
    spec = raw.get("spec") or {}
    name, key = _secret_ref(spec)
    pem = (secrets.get(ObjectRef(namespace, name)) or {}).get(key)
    if pem is None:
        return None
    try:
        algorithm = DkimAlgorithm(spec.get("algorithm", DkimAlgorithm.RSA_SHA256.value))
        return load_private_key(pem, algorithm)
    except (DkimKeyError, ValueError):
        return None


def wants_generated_secret(
    raw: Mapping[str, Any], secrets: Mapping[ObjectRef, Mapping[str, str]], namespace: str
) -> bool:
    spec = raw.get("spec") or {}
    name, _ = _secret_ref(spec)
    return "generate" in spec and bool(name) and ObjectRef(namespace, name) not in secrets


def generated_secret(raw: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """A new Secret holding a freshly generated key for this DkimKey (PKCS#8 PEM)."""
    spec = raw.get("spec") or {}
    name, key = _secret_ref(spec)
    algorithm = DkimAlgorithm(spec.get("algorithm", DkimAlgorithm.RSA_SHA256.value))
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
        if algorithm is DkimAlgorithm.RSA_SHA256
        else ed25519.Ed25519PrivateKey.generate()
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    owner = (raw.get("metadata") or {}).get("name", "")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "mailflow"},
            "annotations": {GENERATED_ANNOTATION: f"DkimKey/{owner}"},
        },
        "data": {key: base64.b64encode(pem).decode("ascii")},
    }


async def check_dns(
    check: DnsCheck, servers: Sequence[str], port: int, lifetime: float
) -> DnsResult:
    """Whether DNS answers ``check.name`` with a DKIM record carrying ``check.public_key``."""
    resolver = dns.asyncresolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = list(servers)
    resolver.port = port
    resolver.lifetime = lifetime
    try:
        answer = await resolver.resolve(check.name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return DnsResult("False", NOT_PUBLISHED, f"No TXT record at {check.name}")
    except dns.exception.DNSException as e:
        return DnsResult("Unknown", LOOKUP_FAILED, f"TXT lookup of {check.name} failed: {e}")
    published = []
    for record in answer:
        text = b"".join(record.strings).decode("ascii", errors="replace")
        tags = {
            part.split("=", 1)[0].strip(): part.split("=", 1)[1].strip()
            for part in text.split(";")
            if "=" in part
        }
        published.append("".join(tags.get("p", "").split()))
    if check.public_key in published:
        return DnsResult("True", PUBLISHED, f"{check.name} carries this key's public key")
    if any(p == "" for p in published):
        return DnsResult("False", REVOKED, f"{check.name} has an empty p= (key revoked)")
    return DnsResult(
        "False", KEY_MISMATCH, f"{check.name} carries another public key than this key's"
    )


def dns_check_for(raw: Mapping[str, Any], loaded: LoadedKey | None) -> DnsCheck | None:
    spec = raw.get("spec") or {}
    if loaded is None or not spec.get("domain") or not spec.get("selector"):
        return None
    name = dns_record_name(str(spec["selector"]).lower(), str(spec["domain"]).lower())
    return DnsCheck(name, loaded.public_key)


def signature_lifetime(spec: Mapping[str, Any], queue_lifetime: float) -> Condition:
    """``SignaturesOutlastQueue``: may a queued message outlive its own signature?"""
    text = spec.get("expireAfter")
    try:
        expire = None if text is None else parse_duration(str(text))
    except ValueError:
        expire = None  # the schema refuses it; Accepted says so
    if expire is None or expire >= queue_lifetime:
        return Condition(
            SIGNATURES_OUTLAST_QUEUE,
            "True",
            OUTLASTS_QUEUE,
            "Signatures stay valid as long as the relays keep a message"
            if expire is not None
            else "Signatures do not expire (no expireAfter)",
        )
    return Condition(
        SIGNATURES_OUTLAST_QUEUE,
        "False",
        EXPIRES_IN_QUEUE,
        f"expireAfter {text} is shorter than the relays' queue lifetime "
        f"({_duration(queue_lifetime)}): the relay signs once, at acceptance, so mail delivered "
        "after a longer wait arrives with an expired signature; raise expireAfter above the "
        "queue lifetime, or remove it",
    )


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def dkim_status(
    raw: Mapping[str, Any],
    findings: Sequence[Finding],
    schema_errors: Sequence[str],
    loaded: LoadedKey | None,
    dns_result: DnsResult | None,
    queue_lifetime: float = DEFAULT_QUEUE_LIFETIME,
) -> dict[str, Any]:
    """The status this DkimKey should have."""
    metadata = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    generation = int(metadata.get("generation") or 0)
    old: Mapping[str, Any] = raw.get("status") or {}
    conditions = [accepted(findings, schema_errors), resolved_refs(findings, has_refs=True)]
    if not all(c.ok for c in conditions):
        bad = next(c for c in conditions if not c.ok)
        conditions.append(Condition(READY, "False", bad.reason, f"{bad.type}: {bad.message}"))
    elif not spec.get("enabled", True):
        conditions.append(Condition(READY, "False", DISABLED, "enabled is false: signs nothing"))
    elif loaded is None:
        conditions.append(
            Condition(READY, "Unknown", SECRET_UNKNOWN, "The key's Secret is not known yet")
        )
    else:
        conditions.append(Condition(READY, "True", READY_REASON, "The relays sign with this key"))
    conditions.append(signature_lifetime(spec, queue_lifetime))
    before = next((c for c in old.get("conditions") or [] if c.get("type") == DNS_PUBLISHED), None)
    if dns_result is None and before is not None:
        # No check yet in this run (a restart): keep what the last check said, unchanged.
        conditions.append(
            Condition(
                DNS_PUBLISHED,
                str(before.get("status")),
                str(before.get("reason")),
                str(before.get("message")),
            )
        )
    elif dns_result is None:
        conditions.append(
            Condition(DNS_PUBLISHED, "Unknown", NOT_CHECKED, "DNS has not been checked yet")
        )
    else:
        conditions.append(
            Condition(DNS_PUBLISHED, dns_result.status, dns_result.reason, dns_result.message)
        )
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": merge_conditions(
            old.get("conditions"), conditions, generation, now_rfc3339()
        ),
    }
    if loaded is not None and spec.get("domain") and spec.get("selector"):
        status["fingerprint"] = loaded.fingerprint
        status["dnsRecord"] = {
            "name": dns_record_name(str(spec["selector"]).lower(), str(spec["domain"]).lower()),
            "type": "TXT",
            "strings": list(dns_txt_strings(loaded)),
        }
    return status
