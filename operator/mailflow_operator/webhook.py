"""The validating admission webhook: refuse at apply time what ``mailflow validate`` refuses.

The API server checks each object against the CRD schema (with its CEL rules) by itself;
what it cannot see is the other objects. This webhook puts the incoming object into
the reconciler's view of every watched namespace (replacing its older self) and asks the one
compiler: findings about *this* object are refused with the same field paths and
messages that ``mailflow validate`` prints —

* always: ``Accepted`` findings (a conflict with another connector, two patterns that
  are the same after normalisation, a host that is not a host, ``auth`` with a TLS mode
  that does not verify the server);
* in strict mode only: ``ResolvedRefs`` findings (a profile or Secret that does not
  exist yet). Off by default, because GitOps tools apply a connector and its profile
  in any order, and ``ResolvedRefs=False`` says the same thing after the fact.

DkimKeys are admitted the same way: a second enabled key for a domain and selector that
another key already claims is refused (the older key keeps signing, so the newcomer would
sign nothing); a key whose domain is not a domain or that would sign a header that must
never be signed is refused. A key is never refused for its Secret (generated or applied
later, in any order) except in strict mode, and an update of the key that keeps signing is
never refused because a newer one conflicts with it: that would block disabling it.

Deletions are never refused: deleting a profile in use turns its connectors'
``ResolvedRefs`` False instead (no finalizer deadlock).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

from mailflow_compiler.compiler import (
    CONNECTOR_KIND,
    PROFILE_KIND,
    Finding,
    compile_routing,
)
from mailflow_compiler.crds import load_crds
from mailflow_compiler.dkim import DKIM_KEY_KIND, REASON_CONFLICTED
from mailflow_compiler.manifests import RawConnector, RawDkimKey, RawProfile
from mailflow_operator.store import Store
from mailflow_relay.routing.document import ObjectRef

__all__ = ["admission_findings", "denial_message"]

AUTH_PATH = "spec.auth"


def admission_findings(
    store: Store, kind: str, body: Mapping[str, Any], *, strict: bool = False
) -> list[Finding]:
    """What the compiler says about ``body`` among all the objects the operator reconciles."""
    metadata = body.get("metadata") or {}
    ref = ObjectRef(str(metadata.get("namespace") or "default"), str(metadata.get("name") or ""))
    crds = {k.kind: k for k in load_crds().values()}
    incoming = crds[kind].schema.apply_defaults(copy.deepcopy(dict(body)))
    if any(e.path != AUTH_PATH for e in crds[kind].schema.validate(incoming)):
        return []  # the API server reports schema errors itself, with the same wording
    # Except the auth rule: a cluster whose CRD predates it (Helm never upgrades CRDs) lets
    # auth with an unverified TLS mode through, so the compiler's finding refuses it here.

    def others(table: Mapping[ObjectRef, dict[str, Any]], table_kind: str) -> list[dict[str, Any]]:
        schema = crds[table_kind].schema
        return [
            schema.apply_defaults(value)
            for other, value in sorted(table.items())
            if not (other == ref and table_kind == kind)
        ]

    connectors = others(store.connectors, CONNECTOR_KIND)
    profiles = others(store.profiles, PROFILE_KIND)
    keys = others(store.dkim_keys, DKIM_KEY_KIND)
    {CONNECTOR_KIND: connectors, PROFILE_KIND: profiles, DKIM_KEY_KIND: keys}[kind].append(incoming)
    # Every watched namespace: they all compile into one routing document, so a conflict
    # with a connector of another namespace is as real as one next door. References
    # still resolve in the object's own namespace (the compiler sees to that).
    compiled = compile_routing(
        cast(list[RawConnector], connectors),
        cast(list[RawProfile], profiles),
        store.secrets,
        default_namespace=ref.namespace,
        dkim_keys=cast(list[RawDkimKey], keys),
    )
    keeps_signing = kind == DKIM_KEY_KIND and _signs_first(incoming, keys)
    return [
        f
        for f in compiled.findings_for(kind, ref)
        if (f.condition == "Accepted" or (strict and f.condition == "ResolvedRefs"))
        and not (keeps_signing and f.reason == REASON_CONFLICTED)
    ]


def _signs_first(incoming: Mapping[str, Any], keys: list[dict[str, Any]]) -> bool:
    """Whether ``incoming`` is the key that signs among those claiming its domain and selector.

    The compiler's order: oldest first, then by name; a new object has no creation time yet
    and sorts last, as it will once the API server stamps it.
    """

    def claim(body: Mapping[str, Any]) -> tuple[str, str]:
        spec = body.get("spec") or {}
        return (
            str(spec.get("domain", "")).lower().rstrip("."),
            str(spec.get("selector", "")).lower(),
        )

    def age(body: Mapping[str, Any]) -> tuple[str, str]:
        metadata = body.get("metadata") or {}
        return (str(metadata.get("creationTimestamp") or "~"), str(metadata.get("name") or ""))

    rivals = [
        b
        for b in keys
        if b is not incoming
        and (b.get("spec") or {}).get("enabled", True)
        and claim(b) == claim(incoming)
    ]
    return all(age(incoming) < age(b) for b in rivals)


def denial_message(findings: list[Finding]) -> str:
    """One line per finding, ``field.path: message``, as ``mailflow validate`` words it."""
    return "\n".join(f"{f.path}: {f.message}" for f in findings)
