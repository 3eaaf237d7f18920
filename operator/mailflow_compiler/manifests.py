"""Reading Kubernetes manifests from YAML files and folders, keeping where each came from.

Every document keeps its file, its position in that file, its first line and the line and
column of every field (kubectl's path notation: ``spec.servers[1].port``), so that a problem
found later can be reported where editors and CI problem matchers look:
``FILE:LINE:COL: Kind/namespace/name: path: message``.
YAML that does not parse is not an exception here: it becomes a :class:`Manifest` with
a ``parse_error`` and the line of the error, and the other documents are still read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import yaml

from mailflow_compiler.errors import UsageError

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "Manifest",
    "RawConnector",
    "RawDkimKey",
    "RawMetadata",
    "RawProfile",
    "RawSecret",
    "load_manifests",
]

API_GROUP = "mailflow.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
YAML_SUFFIXES = (".yaml", ".yml", ".json")
"""Compared case-insensitively: ``CONNECTORS.YML`` is read too."""
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


class RawMetadata(TypedDict, total=False):
    name: str
    namespace: str
    generation: int
    creationTimestamp: str
    uid: str
    annotations: dict[str, str]
    labels: dict[str, str]


class RawSecretRef(TypedDict):
    name: str
    key: NotRequired[str]


class RawSmartHost(TypedDict):
    host: str
    port: NotRequired[int]
    mx: NotRequired[bool]
    implicitTls: NotRequired[bool]


class RawDestination(TypedDict, total=False):
    smartHost: RawSmartHost
    profileRef: dict[str, str]


class RawTls(TypedDict, total=False):
    mode: str
    certificateName: str
    caBundle: dict[str, RawSecretRef]
    pinnedFingerprints: list[str]
    dane: str
    mtaSts: str


class RawClients(TypedDict, total=False):
    networks: list[str]
    users: list[str]


class RawThrottle(TypedDict, total=False):
    maxConnections: int
    messagesPerMinute: int
    recipientsPerMessage: int


class RawDomainThrottle(RawThrottle):
    domain: str


class RawConnectorThrottle(RawThrottle, total=False):
    domains: list[RawDomainThrottle]


class RawConnectorSpec(TypedDict, total=False):
    description: str
    enabled: bool
    recipientDomains: list[str]
    senderDomains: list[str]
    clients: RawClients
    destination: RawDestination
    tls: RawTls
    auth: dict[str, RawSecretRef]
    dkim: RawConnectorDkim
    paused: bool
    throttle: RawConnectorThrottle


class RawConnectorDkim(TypedDict, total=False):
    sign: bool


class RawConnector(TypedDict):
    apiVersion: str
    kind: str
    metadata: RawMetadata
    spec: RawConnectorSpec


class RawServer(TypedDict):
    host: str
    port: NotRequired[int]
    paused: NotRequired[bool]
    throttle: NotRequired[RawThrottle]
    implicitTls: NotRequired[bool]


class RawProfileSpec(TypedDict, total=False):
    description: str
    servers: list[RawServer]
    balancing: str


class RawProfile(TypedDict):
    apiVersion: str
    kind: str
    metadata: RawMetadata
    spec: RawProfileSpec


class RawDkimKeySpec(TypedDict, total=False):
    enabled: bool
    domain: str
    subdomains: bool
    selector: str
    algorithm: str
    privateKey: dict[str, RawSecretRef]
    signedHeaders: list[str]
    canonicalization: str
    expireAfter: str
    generate: dict[str, object]


class RawDkimKey(TypedDict):
    apiVersion: str
    kind: str
    metadata: RawMetadata
    spec: RawDkimKeySpec


class RawSecret(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: RawMetadata
    type: str
    data: dict[str, str]
    stringData: dict[str, str]


@dataclass(frozen=True)
class Manifest:
    """One YAML document of one file."""

    file: str
    document: int
    """1-based position of the document in its file."""
    line: int
    """1-based line where the document (or the parse error) starts."""
    body: dict[str, Any] | None
    parse_error: str | None = None
    column: int = 1
    """1-based column of the document start (or of the parse error)."""
    positions: Mapping[str, tuple[int, int]] = field(
        default_factory=dict, compare=False, hash=False
    )
    """(line, column), 1-based, of every field by its path: where a key or an item starts."""

    def position(self, path: str) -> tuple[int, int]:
        """Where ``path`` is written, else its nearest written parent, else the document."""
        while path:
            if path in self.positions:
                return self.positions[path]
            path = _parent(path)
        return (self.line, self.column)

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", "")) if self.body else ""

    @property
    def api_version(self) -> str:
        return str(self.body.get("apiVersion", "")) if self.body else ""

    @property
    def name(self) -> str:
        metadata = self.body.get("metadata") if self.body else None
        return str(metadata.get("name", "")) if isinstance(metadata, dict) else ""

    def namespace(self, default: str) -> str:
        metadata = self.body.get("metadata") if self.body else None
        if isinstance(metadata, dict) and isinstance(metadata.get("namespace"), str):
            return str(metadata["namespace"]) or default
        return default

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


def load_manifests(paths: Sequence[str]) -> list[Manifest]:
    """Read every YAML document under ``paths`` (files, or folders searched recursively)."""
    manifests: list[Manifest] = []
    for file in _expand(paths):
        manifests.extend(_read_file(file))
    return manifests


def _expand(paths: Sequence[str]) -> Iterator[Path]:
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in YAML_SUFFIXES and not _hidden(p, path)
            )
            yield from found
        elif path.is_file():
            yield path
        else:
            raise UsageError(f"{text}: no such file or folder")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_file(path: Path) -> Iterable[Manifest]:
    file = os.fspath(path)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return [Manifest(file, 1, 1, None, f"larger than {MAX_MANIFEST_BYTES} bytes")]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [Manifest(file, 1, 1, None, f"cannot read: {e}")]
    return list(_parse_documents(file, text))


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, but a key written twice in one mapping is an error (as kubectl says)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _parse_documents(file: str, text: str) -> Iterator[Manifest]:
    loader = _StrictLoader(text)
    number = 0
    try:
        while True:
            try:
                if not loader.check_node():
                    return
                number += 1
                node = loader.get_node()
                if node is None:
                    continue
                line = node.start_mark.line + 1
                column = node.start_mark.column + 1
                positions = _positions(node)
                data = loader.construct_document(node)
            except yaml.MarkedYAMLError as e:
                mark = e.problem_mark or e.context_mark
                line = mark.line + 1 if mark else 0
                problem = e.problem or e.context or "invalid YAML"
                yield Manifest(
                    file,
                    max(number, 1),
                    line,
                    None,
                    f"YAML: {problem}",
                    column=mark.column + 1 if mark else 0,
                )
                return  # the parser cannot resynchronise after a syntax error
            except yaml.YAMLError as e:
                yield Manifest(file, max(number, 1), 0, None, f"YAML: {e}")
                return
            if data is None:
                continue
            if not isinstance(data, dict):
                yield Manifest(
                    file,
                    number,
                    line,
                    None,
                    f"expected a Kubernetes object (a mapping), got {type(data).__name__}",
                    column,
                )
                continue
            if data.get("kind") == "List" and isinstance(data.get("items"), list):
                for i, item in enumerate(data["items"]):
                    if isinstance(item, dict):
                        start = positions.get(f"items[{i}]", (line, column))
                        yield Manifest(
                            file, number, start[0], item, None, start[1], _within(positions, i)
                        )
                continue
            yield Manifest(file, number, line, data, None, column, positions)
    finally:
        loader.dispose()


def _positions(node: yaml.Node) -> dict[str, tuple[int, int]]:
    """(line, column) of every key and item under ``node``, by kubectl path."""
    found: dict[str, tuple[int, int]] = {}
    stack: list[tuple[str, yaml.Node]] = [("", node)]
    while stack:
        path, current = stack.pop()
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                child = f"{path}.{key_node.value}" if path else str(key_node.value)
                found.setdefault(
                    child, (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                )
                stack.append((child, value_node))
        elif isinstance(current, yaml.SequenceNode):
            for i, item in enumerate(current.value):
                child = f"{path}[{i}]"
                found[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
                stack.append((child, item))
    return found


def _within(positions: Mapping[str, tuple[int, int]], item: int) -> dict[str, tuple[int, int]]:
    """The positions of ``items[item]`` of a List, as paths of that item."""
    prefix = f"items[{item}]."
    return {k[len(prefix) :]: v for k, v in positions.items() if k.startswith(prefix)}


def _parent(path: str) -> str:
    """``spec.servers[1].port`` → ``spec.servers[1]`` → ``spec.servers`` → ``spec`` → ``""``."""
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""
