"""What a standalone relay does with manifests that have problems: fail closed.

A connector that the schema refuses (a one-letter typo: ``certificatename``) is not in the
routing document, so its mail takes the next less specific route — with a catch-all
compliance connector, that is every recipient's MX with Opportunistic TLS. So a problem
that changes *which* connector routes a recipient stops the relay from starting, and stops
a reload, unless the user asked to leave the bad objects out (``--skip-invalid-objects``):

* blocking: a document that does not parse, an object the schema or the compiler refuses
  (``InvalidValue``, duplicates), two connectors that claim the same pattern
  (``Conflicted``);
* not blocking: references that do not resolve (a missing profile or Secret). The
  connector keeps its routes and its mail waits (deferred) until the reference resolves,
  which already fails closed; the operator reports them the same way.

With the opt-in, an object that has a blocking problem is left out of the document as a
whole (never half compiled), and every left-out object is said loudly: stderr at start,
a WARNING per reload, ``/readyz`` detail and ``mailflow_config_objects_left_out``.
Conflicts are decided by the compiler (creation time, then name) and reported the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailflow_compiler.checks import CheckResult, check_manifests
from mailflow_compiler.compiler import CONNECTOR_KIND
from mailflow_compiler.manifests import Manifest
from mailflow_compiler.problems import Problem
from mailflow_relay.routing.document import Conflict, DefaultRoute, RoutingDocument

__all__ = ["Screened", "describe_conflict", "new_conflicts", "refusal", "screen"]

SKIP_OPTION = "--skip-invalid-objects"
NOT_BLOCKING = frozenset({"ResolvedRefs"})
"""Finding conditions that leave the object's routes in place (its mail waits)."""


@dataclass(frozen=True)
class Screened:
    document: RoutingDocument
    blocking: tuple[Problem, ...]
    """Problems that change routing: each one refuses a start or a reload without the opt-in."""
    warnings: tuple[Problem, ...]
    """Problems that do not (unresolved references: the connector's mail waits)."""
    left_out: tuple[str, ...]
    """With the opt-in: one line per blocking problem, for logs and ``/readyz``."""

    @property
    def conflicted(self) -> bool:
        return any(p.message.startswith("Conflicted:") for p in self.blocking)


def _object(problem: Problem) -> tuple[str, str, str]:
    return problem.kind, problem.namespace, problem.name


def _classify(result: CheckResult) -> tuple[list[Problem], list[Problem]]:
    assert result.compiled is not None
    harmless = {
        (f.kind, f.ref.namespace, f.ref.name, f.path, f.message)
        for f in result.compiled.findings
        if f.condition in NOT_BLOCKING
    }
    blocking: list[Problem] = []
    warnings: list[Problem] = []
    for problem in result.problems:
        key = (problem.kind, problem.namespace, problem.name, problem.path, problem.message)
        (warnings if key in harmless else blocking).append(problem)
    return blocking, warnings


def screen(
    manifests: Sequence[Manifest],
    *,
    namespace: str,
    default_route: DefaultRoute,
    skip_invalid: bool,
) -> Screened:
    """Check and compile ``manifests``; with ``skip_invalid``, without the objects that fail."""
    result = check_manifests(
        manifests, default_namespace=namespace, resolve_secrets=True, default_route=default_route
    )
    blocking, warnings = _classify(result)
    if skip_invalid and blocking:
        # Objects the compiler refused a value of would otherwise be half compiled (a
        # pattern missing, a host unparsed): leave each out as a whole, and compile again.
        refused = {
            _object(p)
            for p in blocking
            if p.kind == CONNECTOR_KIND and not p.message.startswith("Conflicted:")
        }
        if refused:
            kept = [m for m in manifests if (m.kind, m.namespace(namespace), m.name) not in refused]
            result = check_manifests(
                kept, default_namespace=namespace, resolve_secrets=True, default_route=default_route
            )
            _, warnings = _classify(result)
    assert result.compiled is not None
    left_out = tuple(p.format() for p in blocking) if skip_invalid else ()
    return Screened(result.compiled.document, tuple(blocking), tuple(warnings), left_out)


def _conflict_key(conflict: Conflict) -> tuple[str, str, frozenset[str]]:
    holders = frozenset(str(ref) for ref in (conflict.winner, *conflict.losers))
    return str(conflict.recipient), str(conflict.sender), holders


def new_conflicts(current: RoutingDocument, document: RoutingDocument) -> list[Conflict]:
    """Conflicts in ``document`` that ``current`` does not have (the same holders, pattern
    and sender scope count as the same conflict)."""
    known = {_conflict_key(c) for c in current.conflicts}
    return [c for c in document.conflicts if _conflict_key(c) not in known]


def describe_conflict(conflict: Conflict) -> str:
    scope = "every sender" if conflict.sender is None else f"senders {conflict.sender}"
    holders = " and ".join(str(ref) for ref in (conflict.winner, *conflict.losers))
    return f'"{conflict.recipient}" for {scope} is claimed by {CONNECTOR_KIND} {holders}'


def refusal(blocking: Sequence[Problem]) -> str:
    """The one line that says why the relay does not start, and how to fix it."""
    first = blocking[0].format()
    more = f" (and {len(blocking) - 1} more problem(s) above)" if len(blocking) > 1 else ""
    return (
        f"--manifests: {first}{more}; the relay does not start with an invalid or conflicting "
        f"object, because its mail would take another route: fix the object, or pass "
        f"{SKIP_OPTION} to leave it out"
    )
