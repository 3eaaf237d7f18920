"""The offline pipeline behind ``mailflow validate`` and ``mailflow explain``.

manifests → (CRD schema + CEL, per object) → (references, conflicts: the compiler) →
problems, each pointing at a file, a line and column, an object and a field.

The schemas are the CRDs shipped with Mailflow, unless CRD manifests of the Mailflow API
group are among the inputs: then those are used for the kinds they define (to check
against the CRDs a cluster actually runs), and a note says so. A CRD that cannot be used
is a problem, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from mailflow_compiler.compiler import (
    CONNECTOR_KIND,
    PROFILE_KIND,
    Compiled,
    compile_routing,
    secret_values,
)
from mailflow_compiler.crds import CrdKind, kinds_of, load_crds
from mailflow_compiler.dkim import DKIM_KEY_KIND
from mailflow_compiler.errors import CrdError
from mailflow_compiler.manifests import (
    API_GROUP,
    Manifest,
    RawConnector,
    RawDkimKey,
    RawProfile,
    RawSecret,
)
from mailflow_compiler.problems import Problem
from mailflow_compiler.schema import CEL_SKIPPED
from mailflow_compiler.wording import did_you_mean
from mailflow_relay.routing.document import DefaultRoute, ObjectRef

__all__ = ["CheckResult", "check_manifests"]

CRD_API_VERSION = "apiextensions.k8s.io/v1"
CRD_KIND = "CustomResourceDefinition"


@dataclass
class CheckResult:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compiled: Compiled | None = None
    checked: int = 0
    """Mailflow objects checked (connectors, profiles and DKIM keys)."""
    secrets_given: bool = False
    invalid: int = 0
    """Documents that did not parse or objects the schema refused (left out of the document)."""
    incomplete: int = 0
    """Objects whose CEL rules did not run because of other errors (more may follow a fix)."""


class _Checker:
    def __init__(self, default_namespace: str) -> None:
        self.default_namespace = default_namespace
        self.result = CheckResult()
        self.connectors: list[RawConnector] = []
        self.profiles: list[RawProfile] = []
        self.dkim_keys: list[RawDkimKey] = []
        self.secrets: dict[ObjectRef, dict[str, str]] = {}
        self.where: dict[tuple[str, ObjectRef], Manifest] = {}

    def problem(self, manifest: Manifest, path: str, message: str) -> None:
        line, column = manifest.position(path)
        self.result.problems.append(
            Problem(
                file=manifest.file,
                document=manifest.document,
                kind=manifest.kind,
                namespace="" if _is_crd(manifest) else manifest.namespace(self.default_namespace),
                name=manifest.name,
                path=path,
                message=message,
                line=line,
                column=column,
            )
        )

    def unreadable(self, manifest: Manifest) -> None:
        self.result.invalid += 1
        self.result.problems.append(
            Problem(
                manifest.file,
                manifest.document,
                "",
                "",
                "",
                "",
                manifest.parse_error or "unreadable",
                manifest.line,
                manifest.column,
            )
        )

    def crds(self, manifests: Sequence[Manifest]) -> Mapping[tuple[str, str], CrdKind]:
        """The shipped CRDs, replaced kind by kind by the Mailflow CRDs given as input."""
        crds = dict(load_crds())
        given: dict[tuple[str, str], Manifest] = {}
        for manifest in manifests:
            if not _is_crd(manifest):
                continue
            assert manifest.body is not None
            spec = manifest.body.get("spec")
            group = spec.get("group") if isinstance(spec, dict) else None
            if group != API_GROUP:
                self.result.notes.append(
                    f"{manifest.location}: skipped {CRD_KIND} {manifest.name}: not of the "
                    f"{API_GROUP} API group".rstrip()
                )
                continue
            try:
                kinds = kinds_of(manifest.body, manifest.location)
            except CrdError as e:
                self.problem(manifest, "spec", f"cannot use this CRD: {e.reason}")
                continue
            for kind in kinds:
                key = (kind.api_version, kind.kind)
                if key in given and crds[key].schema.raw == kind.schema.raw:
                    continue  # the same CRD twice (crds/ and the chart's copy): nothing to choose
                if key in given:
                    self.problem(
                        manifest,
                        "spec.names.kind",
                        f"Duplicate value: {kind.api_version} {kind.kind} is also defined at "
                        f"{given[key].location}; give one CRD per kind",
                    )
                    continue
                given[key] = manifest
                crds[key] = kind
                self.result.notes.append(
                    f"{manifest.location}: checking {kind.api_version} {kind.kind} against "
                    "this CRD (given on the command line) instead of the built-in one"
                )
        return crds

    def secret(self, manifest: Manifest) -> None:
        ref = ObjectRef(manifest.namespace(self.default_namespace), manifest.name)
        if self.duplicate(manifest, "Secret", ref):
            return
        values, secret_problems = secret_values(cast(RawSecret, manifest.body))
        for path, message in secret_problems:
            self.problem(manifest, path, message)
        self.secrets[ref] = values

    def unknown_kind(self, manifest: Manifest, crds: Mapping[tuple[str, str], CrdKind]) -> None:
        kind, api_version = manifest.kind, manifest.api_version
        ours = sorted({k for _, k in crds})
        if api_version.startswith(API_GROUP + "/"):
            known = sorted(f"{v}/{k}" for v, k in crds)
            near = did_you_mean(f"{api_version}/{kind}", known)
            near_version, _, near_kind = (near or "").rpartition("/")
            if near and near_version == api_version:
                path, hint = "kind", f"did you mean kind: {near_kind}? "
            elif near:
                path, hint = "apiVersion", f"did you mean apiVersion: {near_version}? "
            else:
                path, hint = "kind", ""
            self.problem(
                manifest,
                path,
                f'no matches for kind "{kind}" in version "{api_version}": {hint}'
                f"known: {', '.join(known)}",
            )
            return
        ours_near = did_you_mean(kind, ours) if kind else None
        if ours_near is not None:
            # A Mailflow kind under another API version would be skipped, and its mail routed
            # elsewhere: that is a problem, not a note.
            versions = sorted(v for v, k in crds if k == ours_near)
            self.problem(
                manifest,
                "apiVersion",
                f'Invalid value: "{api_version}": {ours_near} is served as '
                f"{' or '.join(versions)}; did you mean apiVersion: {versions[-1]}?",
            )
            return
        label = f"{api_version or '?'}/{kind or '?'}"
        self.result.notes.append(f"{manifest.location}: skipped {label} {manifest.name}".rstrip())

    def mailflow_object(self, manifest: Manifest, crd: CrdKind) -> None:
        assert manifest.body is not None
        self.result.checked += 1
        body: dict[str, Any] = crd.schema.apply_defaults(manifest.body)
        errors = crd.schema.validate(body)
        # `certificatename` is one mistake, not two: no "certificateName: Required" after it.
        meant = {e.meant for e in errors if e.meant}
        for error in errors:
            if error.message == CEL_SKIPPED:
                self.result.incomplete += 1  # a summary note, not a line of its own
            elif not (error.path in meant and error.message.startswith("Required value")):
                self.problem(manifest, error.path, error.message)
        if errors:
            self.result.invalid += 1
        ref = ObjectRef(manifest.namespace(self.default_namespace), manifest.name)
        if errors or self.duplicate(manifest, crd.kind, ref):
            return
        if crd.kind == CONNECTOR_KIND:
            self.connectors.append(cast(RawConnector, body))
        elif crd.kind == PROFILE_KIND:
            self.profiles.append(cast(RawProfile, body))
        elif crd.kind == DKIM_KEY_KIND:
            self.dkim_keys.append(cast(RawDkimKey, body))

    def duplicate(self, manifest: Manifest, kind: str, ref: ObjectRef) -> bool:
        first = self.where.get((kind, ref))
        if first is not None:
            self.problem(
                manifest,
                "metadata.name",
                f"Duplicate value: {kind} {ref} is also defined at {first.location}",
            )
            return True
        self.where[(kind, ref)] = manifest
        return False


def _is_crd(manifest: Manifest) -> bool:
    return manifest.kind == CRD_KIND and manifest.api_version == CRD_API_VERSION


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
    checker = _Checker(default_namespace)
    result = checker.result
    crds = checker.crds(manifests)
    for manifest in manifests:
        if manifest.body is None:
            checker.unreadable(manifest)
        elif _is_crd(manifest):
            continue  # used (or refused) above
        elif manifest.kind == "Secret" and manifest.api_version == "v1":
            checker.secret(manifest)
        elif (crd := crds.get((manifest.api_version, manifest.kind))) is not None:
            checker.mailflow_object(manifest, crd)
        else:
            checker.unknown_kind(manifest, crds)

    result.secrets_given = bool(checker.secrets)
    resolve = result.secrets_given if resolve_secrets is None else resolve_secrets
    compiled = compile_routing(
        checker.connectors,
        checker.profiles,
        checker.secrets if resolve else None,
        default_route=default_route,
        default_namespace=default_namespace,
        dkim_keys=checker.dkim_keys,
    )
    result.compiled = compiled
    for finding in compiled.findings:
        checker.problem(checker.where[(finding.kind, finding.ref)], finding.path, finding.message)
    # Per file, in the order written (line, column), then the object-wide notes (no path).
    result.problems.sort(key=lambda p: (p.file, p.line, p.column, p.path == "", p.path, p.message))
    return result
