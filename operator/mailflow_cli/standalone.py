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

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.errors import UsageError
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.engine.relay import Relay
from mailflow_relay.routing.document import DefaultRoute, RoutingDocument

__all__ = ["ManifestSource", "ManifestWatcher", "compile_manifests"]

logger = logging.getLogger(__name__)


def compile_manifests(
    paths: Sequence[str], namespace: str, default_route: DefaultRoute, err: TextIO
) -> tuple[RoutingDocument, dict[str, dict[str, str]]]:
    """The routing document of the manifests, and the Secrets among them (for AUTH users)."""
    manifests = load_manifests(paths)
    result = check_manifests(
        manifests, default_namespace=namespace, resolve_secrets=True, default_route=default_route
    )
    for problem in result.problems:
        err.write(f"warning: {problem.format()}\n")
    assert result.compiled is not None
    secrets: dict[str, dict[str, str]] = {}
    for manifest in manifests:
        if manifest.kind == "Secret" and manifest.body is not None:
            data = manifest.body.get("stringData") or {}
            secrets[manifest.name] = {str(k): str(v) for k, v in data.items()}
    return result.compiled.document, secrets


@dataclass
class ManifestWatcher:
    """Standalone hot reload: recompile when a manifest file changes.

    A change that does not compile cleanly — YAML that does not parse, an object the
    schema refuses, a value the compiler refuses — is refused as a whole, with a log
    line and a metric, and the document in force stays: half an edit must never drop a
    connector and send its mail down a less specific route. Conflicts and unresolved
    references are not refusals: they are reported, as the operator would.
    """

    relay: Relay
    paths: Sequence[str]
    namespace: str
    default_route: DefaultRoute
    interval: float

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
            self.relay.refuse_document(str(e))
            return False
        result = check_manifests(
            manifests,
            default_namespace=self.namespace,
            resolve_secrets=True,
            default_route=self.default_route,
        )
        assert result.compiled is not None
        invalid_values = [f for f in result.compiled.findings if f.reason == "InvalidValue"]
        if result.invalid or invalid_values:
            shown = "; ".join(p.format() for p in result.problems[:3])
            self.relay.refuse_document(f"the manifests have problems: {shown}")
            return False
        for problem in result.problems:
            logger.warning("manifests: %s", problem.format())
        document = result.compiled.document
        if document.checksum == current.checksum:
            return True
        self.relay.load_document(replace(document, generation=current.generation + 1))
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

    async def first(self) -> RoutingDocument:
        return self.document

    async def follow(self, relay: Relay) -> None:
        if self.watcher is None:
            await asyncio.Event().wait()  # nothing to follow; cancelled at stop
        else:
            await self.watcher(relay).run()
