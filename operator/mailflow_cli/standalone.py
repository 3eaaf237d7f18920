"""``mailflow relay``: the relay without a cluster, configured from manifests.

The manifests (connectors, profiles and the Secrets they reference) go through the same
checks and the same compiler as ``mailflow validate`` and the operator; the routing
document that comes out is what a relay pod would load from its config Secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from mailflow_cli.screening import (
    SKIP_OPTION,
    describe_conflict,
    new_conflicts,
    refusal,
    screen,
)
from mailflow_compiler.errors import UsageError
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.engine.relay import Relay
from mailflow_relay.routing.document import DefaultRoute, RoutingDocument

__all__ = ["ManifestSource", "ManifestWatcher", "compile_manifests"]

logger = logging.getLogger(__name__)


def compile_manifests(
    paths: Sequence[str],
    namespace: str,
    default_route: DefaultRoute,
    err: TextIO,
    *,
    skip_invalid: bool = False,
) -> tuple[RoutingDocument, dict[str, dict[str, str]], tuple[str, ...]]:
    """The routing document of the manifests, the Secrets among them (for AUTH users) and,
    with ``skip_invalid``, what was left out. Refuses (UsageError) on a blocking problem
    without ``skip_invalid``: a start must fail closed as a reload does (:mod:`.screening`)."""
    manifests = load_manifests(paths)
    screened = screen(
        manifests, namespace=namespace, default_route=default_route, skip_invalid=skip_invalid
    )
    for problem in screened.warnings:
        err.write(f"warning: {problem.format()}\n")
    if screened.blocking and not skip_invalid:
        for problem in screened.blocking:
            err.write(f"error: {problem.format()}\n")
        raise UsageError(refusal(screened.blocking))
    for line in screened.left_out:
        err.write(f"WARNING: left out ({SKIP_OPTION}): {line}\n")
    secrets: dict[str, dict[str, str]] = {}
    for manifest in manifests:
        if manifest.kind == "Secret" and manifest.body is not None:
            data = manifest.body.get("stringData") or {}
            secrets[manifest.name] = {str(k): str(v) for k, v in data.items()}
    return screened.document, secrets, screened.left_out


@dataclass
class ManifestWatcher:
    """Standalone hot reload: recompile when a manifest file changes.

    A change that does not compile cleanly — YAML that does not parse, an object the
    schema refuses, a value the compiler refuses — is refused as a whole, with a log
    line and a metric, and the document in force stays: half an edit must never drop a
    connector and send its mail down a less specific route. With ``skip_invalid`` such
    objects are left out instead, loudly. A change that introduces a conflict is always
    refused. Unresolved references are not refusals: they are reported, as the operator
    would, and the connector's mail waits.
    """

    relay: Relay
    paths: Sequence[str]
    namespace: str
    default_route: DefaultRoute
    interval: float
    skip_invalid: bool = False
    """``--skip-invalid-objects``: leave objects with problems out instead of refusing."""

    def _stamp(self) -> tuple[tuple[str, int, int], ...]:
        files: list[Path] = []
        for text in self.paths:
            path = Path(text)
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            )
        stamp = []
        for file in files:
            try:
                info = file.stat()
            except OSError:
                continue
            stamp.append((str(file), info.st_mtime_ns, info.st_size))
        return tuple(stamp)

    def reload(self) -> bool:
        current = self.relay.document
        try:
            manifests = load_manifests(self.paths)
        except UsageError as e:
            self.relay.refuse_document(str(e), cause="unreadable")
            return False
        screened = screen(
            manifests,
            namespace=self.namespace,
            default_route=self.default_route,
            skip_invalid=self.skip_invalid,
        )
        invalid = [p for p in screened.blocking if not p.message.startswith("Conflicted:")]
        if invalid and not self.skip_invalid:
            shown = "; ".join(p.format() for p in invalid[:3])
            self.relay.refuse_document(f"the manifests have problems: {shown}", cause="invalid")
            return False
        # A conflict decided by name would reroute a whole pattern at once (a catch-all
        # called "aa-…" takes every recipient): a reload that brings one is refused, with
        # or without the opt-in, and the generation in force keeps routing.
        introduced = new_conflicts(current, screened.document)
        if introduced:
            shown = "; ".join(describe_conflict(c) for c in introduced[:3])
            self.relay.refuse_document(
                f"the manifests introduce a conflict: {shown}; give one of the connectors "
                "another recipient pattern or sender scope, or disable it",
                cause="conflict",
            )
            return False
        for problem in screened.warnings:
            logger.warning("manifests: %s", problem.format())
        for line in screened.left_out:
            logger.warning("manifests: left out (%s): %s", SKIP_OPTION, line)
        document = screened.document
        if document.checksum == current.checksum:
            return True
        self.relay.load_document(
            replace(document, generation=current.generation + 1), left_out=screened.left_out
        )
        return True

    async def run(self) -> None:
        stamp = self._stamp()
        while True:
            await asyncio.sleep(self.interval)
            now = self._stamp()
            if now != stamp:
                stamp = now
                logger.info("manifests changed: recompiling")
                self.reload()


@dataclass
class ManifestSource:
    """The standalone relay's documents: the manifests, compiled once and on every change."""

    document: RoutingDocument
    watcher: Callable[[Relay], ManifestWatcher] | None
    left_out: tuple[str, ...] = ()
    """With ``--skip-invalid-objects``: what the first document leaves out."""

    async def first(self) -> RoutingDocument:
        return self.document

    async def follow(self, relay: Relay) -> None:
        relay.leave_out(self.left_out)
        if self.watcher is None:
            await asyncio.Event().wait()  # nothing to follow; cancelled at stop
        else:
            await self.watcher(relay).run()
