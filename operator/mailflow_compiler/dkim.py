"""DkimKey resources → the routing document's DKIM keys, and the findings about them.

What the CRD schema cannot see is checked here: the Secret and its key exist (when Secrets
are known), the PEM parses, the key is of the declared algorithm and large enough, and no
two enabled keys claim the same ``domain`` + ``selector`` (the older one, by creation time
then name, keeps signing). Every message names the key by its public fingerprint at most:
never a byte of the private key.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from mailflow_compiler.manifests import RawDkimKey
from mailflow_relay.errors import DkimKeyError, InvalidDomainError
from mailflow_relay.routing.dkim_keys import (
    DEFAULT_SIGNED_HEADERS,
    NEVER_SIGNED,
    DkimAlgorithm,
    DkimCanonicalization,
    DkimKey,
    load_private_key,
    parse_duration,
)
from mailflow_relay.routing.document import ObjectRef
from mailflow_relay.routing.domains import normalize_domain

__all__ = [
    "DEFAULT_PRIVATE_KEY_KEY",
    "DKIM_KEY_KIND",
    "DkimFinding",
    "compile_dkim_keys",
]

DKIM_KEY_KIND: Final = "DkimKey"
DEFAULT_PRIVATE_KEY_KEY: Final = "private.key"

ACCEPTED: Final = "Accepted"
RESOLVED_REFS: Final = "ResolvedRefs"
REASON_INVALID_VALUE: Final = "InvalidValue"
REASON_CONFLICTED: Final = "Conflicted"
REASON_SECRET_NOT_FOUND: Final = "SecretNotFound"  # noqa: S105 - a condition reason
REASON_SECRET_KEY_NOT_FOUND: Final = "SecretKeyNotFound"  # noqa: S105 - a condition reason
REASON_INVALID_KEY: Final = "InvalidKey"


@dataclass(frozen=True)
class DkimFinding:
    ref: ObjectRef
    path: str
    message: str
    condition: str
    reason: str


def _ref(body: RawDkimKey, default_namespace: str) -> ObjectRef:
    metadata = body["metadata"]
    return ObjectRef(metadata.get("namespace") or default_namespace, metadata["name"])


def compile_dkim_keys(
    bodies: Sequence[RawDkimKey],
    secrets: Mapping[ObjectRef, Mapping[str, str]] | None,
    *,
    default_namespace: str = "default",
) -> tuple[list[DkimKey], list[DkimFinding]]:
    """The enabled keys that can sign, and what is wrong with the others.

    With ``secrets`` ``None`` (Secrets unknown), no key can be carried and none is reported
    for its Secret: the offline check says what it can without them.
    """
    findings: list[DkimFinding] = []
    enabled = [b for b in bodies if b["spec"].get("enabled", True)]
    # Every key is checked (all its problems reported); of conflicting ones only the oldest
    # is carried, and if that one cannot sign, none of them signs.
    compiled = [
        _compile_one(body, _ref(body, default_namespace), secrets, findings) for body in enabled
    ]
    kept = {id(body) for body in _without_conflicts(enabled, default_namespace, findings)}
    keys = [key for body, key in zip(enabled, compiled, strict=True) if key and id(body) in kept]
    return keys, findings


def _without_conflicts(
    bodies: Sequence[RawDkimKey], default_namespace: str, findings: list[DkimFinding]
) -> list[RawDkimKey]:
    claims: dict[tuple[str, str], list[RawDkimKey]] = defaultdict(list)
    for body in bodies:
        spec = body["spec"]
        claims[(spec["domain"].lower().rstrip("."), spec["selector"].lower())].append(body)
    kept: list[RawDkimKey] = []
    for (domain, selector), holders in claims.items():
        ordered = sorted(
            holders,
            key=lambda b: (
                str(b["metadata"].get("creationTimestamp") or "~"),
                b["metadata"]["name"],
                str(b["metadata"].get("namespace") or default_namespace),
            ),
        )
        kept.append(ordered[0])
        if len(ordered) < 2:
            continue
        winner = _ref(ordered[0], default_namespace)
        for body in ordered:
            ref = _ref(body, default_namespace)
            others = ", ".join(str(_ref(b, default_namespace)) for b in ordered if b is not body)
            outcome = (
                "this key is older (or first by name) and keeps signing"
                if body is ordered[0]
                else f"{winner} is older (or first by name) and signs"
            )
            findings.append(
                DkimFinding(
                    ref,
                    "spec.selector",
                    f'Conflicted: selector "{selector}" of domain "{domain}" is also claimed by '
                    f"{DKIM_KEY_KIND} {others}; {outcome}",
                    ACCEPTED,
                    REASON_CONFLICTED,
                )
            )
    return kept


def _compile_one(
    body: RawDkimKey,
    ref: ObjectRef,
    secrets: Mapping[ObjectRef, Mapping[str, str]] | None,
    findings: list[DkimFinding],
) -> DkimKey | None:
    spec = body["spec"]
    try:
        domain = normalize_domain(spec["domain"])
    except InvalidDomainError as e:
        findings.append(
            DkimFinding(
                ref,
                "spec.domain",
                f'Invalid value: "{spec["domain"]}": {e.reason}',
                ACCEPTED,
                REASON_INVALID_VALUE,
            )
        )
        return None
    headers = tuple(spec.get("signedHeaders") or DEFAULT_SIGNED_HEADERS)
    for i, header in enumerate(headers):
        if header.lower() in NEVER_SIGNED:
            findings.append(
                DkimFinding(
                    ref,
                    f"spec.signedHeaders[{i}]",
                    f'Invalid value: "{header}": this field changes on the way or must stay '
                    "hidden and is never signed (RFC 6376 section 5.4)",
                    ACCEPTED,
                    REASON_INVALID_VALUE,
                )
            )
            return None
    algorithm = DkimAlgorithm(spec.get("algorithm", DkimAlgorithm.RSA_SHA256.value))
    expire = spec.get("expireAfter")
    pem = _private_key(body, ref, secrets, findings)
    if pem is None:
        return None
    try:
        loaded = load_private_key(pem, algorithm, ref=str(ref))
    except DkimKeyError as e:
        secret_ref = spec["privateKey"]["secretRef"]
        findings.append(
            DkimFinding(
                ref,
                "spec.privateKey.secretRef",
                f'Invalid value: key "{secret_ref.get("key", DEFAULT_PRIVATE_KEY_KEY)}" of '
                f'Secret "{secret_ref["name"]}": {e.reason}',
                RESOLVED_REFS,
                REASON_INVALID_KEY,
            )
        )
        return None
    return DkimKey(
        ref=str(ref),
        domain=domain,
        subdomains=bool(spec.get("subdomains", False)),
        selector=spec["selector"].lower(),
        algorithm=algorithm,
        private_key=loaded.pkcs8,
        fingerprint=loaded.fingerprint,
        signed_headers=headers,
        canonicalization=DkimCanonicalization(
            spec.get("canonicalization", DkimCanonicalization.RELAXED_RELAXED.value)
        ),
        expire_after=None if expire is None else parse_duration(expire),
    )


def _private_key(
    body: RawDkimKey,
    ref: ObjectRef,
    secrets: Mapping[ObjectRef, Mapping[str, str]] | None,
    findings: list[DkimFinding],
) -> str | None:
    if secrets is None:
        return None
    secret_ref = body["spec"]["privateKey"]["secretRef"]
    name = secret_ref["name"]
    key = secret_ref.get("key", DEFAULT_PRIVATE_KEY_KEY)
    values = secrets.get(ObjectRef(ref.namespace, name))
    if values is None:
        findings.append(
            DkimFinding(
                ref,
                "spec.privateKey.secretRef.name",
                f'Not found: "{name}": no Secret named "{name}" in namespace "{ref.namespace}"',
                RESOLVED_REFS,
                REASON_SECRET_NOT_FOUND,
            )
        )
        return None
    if key not in values:
        findings.append(
            DkimFinding(
                ref,
                "spec.privateKey.secretRef.key",
                f'Not found: Secret "{name}" has no key "{key}"',
                RESOLVED_REFS,
                REASON_SECRET_KEY_NOT_FOUND,
            )
        )
        return None
    return values[key]
