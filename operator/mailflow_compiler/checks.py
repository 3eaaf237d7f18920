"""The offline pipeline behind ``mailflow validate`` and ``mailflow explain``.

manifests → (CRD schema + CEL, per object) → (references, conflicts: the compiler) →
problems, each pointing at a file, a document, an object and a field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from mailflow_compiler.compiler import (
    CONNECTOR_KIND,
    PROFILE_KIND,
    Compiled,
    compile_routing,
    secret_values,
)
from mailflow_compiler.crds import load_crds
from mailflow_compiler.manifests import (
    API_GROUP,
    Manifest,
    RawConnector,
    RawProfile,
    RawSecret,
)
from mailflow_compiler.problems import Problem
from mailflow_relay.routing.document import DefaultRoute, ObjectRef

__all__ = ["CheckResult", "check_manifests"]


@dataclass
class CheckResult:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compiled: Compiled | None = None
    checked: int = 0
    """Mailflow objects checked (connectors and profiles)."""
    secrets_given: bool = False
    invalid: int = 0
    """Documents that did not parse or objects the schema refused (left out of the document)."""


def check_manifests(
    manifests: Sequence[Manifest],
    *,
    default_namespace: str = "default",
    resolve_secrets: bool | None = None,
    default_route: DefaultRoute | None = None,
) -> CheckResult:
    """Check manifests as the API server and the operator together would.

    ``resolve_secrets``: ``None`` resolves Secret references only when Secret manifests
    are among the inputs (``validate``); ``True`` always resolves them, so a missing
    Secret shows as unresolved (``explain``, standalone relay).
    """
    result = CheckResult()
    crds = load_crds()
    connectors: list[RawConnector] = []
    profiles: list[RawProfile] = []
    secrets: dict[ObjectRef, dict[str, str]] = {}
    where: dict[tuple[str, ObjectRef], Manifest] = {}

    def problem(manifest: Manifest, path: str, message: str) -> None:
        result.problems.append(
            Problem(
                file=manifest.file,
                document=manifest.document,
                kind=manifest.kind,
                namespace=manifest.namespace(default_namespace),
                name=manifest.name,
                path=path,
                message=message,
                line=manifest.line,
            )
        )

    for manifest in manifests:
        if manifest.body is None:
            result.invalid += 1
            result.problems.append(
                Problem(
                    manifest.file,
                    manifest.document,
                    "",
                    "",
                    "",
                    "",
                    manifest.parse_error or "unreadable",
                    manifest.line,
                )
            )
            continue
        kind, api_version = manifest.kind, manifest.api_version
        if kind == "Secret" and api_version == "v1":
            ref = ObjectRef(manifest.namespace(default_namespace), manifest.name)
            if _duplicate(manifest, kind, ref, where, problem):
                continue
            values, secret_problems = secret_values(cast(RawSecret, manifest.body))
            for path, message in secret_problems:
                problem(manifest, path, message)
            secrets[ref] = values
            continue
        crd = crds.get((api_version, kind))
        if crd is None:
            if api_version.startswith(API_GROUP + "/"):
                problem(
                    manifest,
                    "apiVersion",
                    f'no matches for kind "{kind}" in version "{api_version}"; '
                    f"known: {', '.join(sorted(f'{v}/{k}' for v, k in crds))}",
                )
            else:
                label = f"{api_version or '?'}/{kind or '?'}"
                result.notes.append(
                    f"{manifest.location}: skipped {label} {manifest.name}".rstrip()
                )
            continue
        result.checked += 1
        body: dict[str, Any] = crd.schema.apply_defaults(manifest.body)
        errors = crd.schema.validate(body)
        for error in errors:
            problem(manifest, error.path, error.message)
        if errors:
            result.invalid += 1
        ref = ObjectRef(manifest.namespace(default_namespace), manifest.name)
        if errors or _duplicate(manifest, kind, ref, where, problem):
            continue
        if kind == CONNECTOR_KIND:
            connectors.append(cast(RawConnector, body))
        elif kind == PROFILE_KIND:
            profiles.append(cast(RawProfile, body))

    result.secrets_given = bool(secrets)
    resolve = result.secrets_given if resolve_secrets is None else resolve_secrets
    compiled = compile_routing(
        connectors,
        profiles,
        secrets if resolve else None,
        default_route=default_route,
        default_namespace=default_namespace,
    )
    result.compiled = compiled
    for finding in compiled.findings:
        manifest = where[(finding.kind, finding.ref)]
        problem(manifest, finding.path, finding.message)
    # Per object, field problems in path order, then the object-wide notes (no path).
    result.problems.sort(key=lambda p: (p.file, p.document, p.path == "", p.path, p.message))
    return result


def _duplicate(
    manifest: Manifest,
    kind: str,
    ref: ObjectRef,
    where: dict[tuple[str, ObjectRef], Manifest],
    problem: Any,
) -> bool:
    first = where.get((kind, ref))
    if first is not None:
        problem(
            manifest,
            "metadata.name",
            f"Duplicate value: {kind} {ref} is also defined at {first.location}",
        )
        return True
    where[(kind, ref)] = manifest
    return False
