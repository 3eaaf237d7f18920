"""The validating admission webhook: refuse at apply time what ``mailflow validate`` refuses.

The API server checks each object against the CRD schema (with its CEL rules) by itself;
what it cannot see is the other objects. This webhook puts the incoming object into
the reconciler's view of every watched namespace (replacing its older self) and asks the one
compiler: findings about *this* object are refused with the same field paths and
messages that ``mailflow validate`` prints —

* always: ``Accepted`` findings (a conflict with another connector, two patterns that
  are the same after normalisation, a host that is not a host);
* in strict mode only: ``ResolvedRefs`` findings (a profile or Secret that does not
  exist yet). Off by default, because GitOps tools apply a connector and its profile
  in any order, and ``ResolvedRefs=False`` says the same thing after the fact.

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
from mailflow_compiler.manifests import RawConnector, RawProfile
from mailflow_operator.store import Store
from mailflow_relay.routing.document import ObjectRef

__all__ = ["admission_findings", "denial_message"]


def admission_findings(
    store: Store, kind: str, body: Mapping[str, Any], *, strict: bool = False
) -> list[Finding]:
    """What the compiler says about ``body`` among all the objects the operator reconciles."""
    metadata = body.get("metadata") or {}
    ref = ObjectRef(str(metadata.get("namespace") or "default"), str(metadata.get("name") or ""))
    crds = {k.kind: k for k in load_crds().values()}
    incoming = crds[kind].schema.apply_defaults(copy.deepcopy(dict(body)))
    if crds[kind].schema.validate(incoming):
        return []  # the API server reports schema errors itself, with the same wording

    def others(table: Mapping[ObjectRef, dict[str, Any]], table_kind: str) -> list[dict[str, Any]]:
        schema = crds[table_kind].schema
        return [
            schema.apply_defaults(value)
            for other, value in sorted(table.items())
            if not (other == ref and table_kind == kind)
        ]

    connectors = others(store.connectors, CONNECTOR_KIND)
    profiles = others(store.profiles, PROFILE_KIND)
    (connectors if kind == CONNECTOR_KIND else profiles).append(incoming)
    # Every watched namespace: they all compile into one routing document, so a conflict
    # with a connector of another namespace is as real as one next door. References
    # still resolve in the object's own namespace (the compiler sees to that).
    compiled = compile_routing(
        cast(list[RawConnector], connectors),
        cast(list[RawProfile], profiles),
        store.secrets,
        default_namespace=ref.namespace,
    )
    return [
        f
        for f in compiled.findings_for(kind, ref)
        if f.condition == "Accepted" or (strict and f.condition == "ResolvedRefs")
    ]


def denial_message(findings: list[Finding]) -> str:
    """One line per finding, ``field.path: message``, as ``mailflow validate`` words it."""
    return "\n".join(f"{f.path}: {f.message}" for f in findings)
