"""What the operator's watches have seen: raw bodies and decoded Secrets, by namespace/name.

Filled by the kopf watch handlers, read by the reconciler and the admission webhook; the
one place that holds cluster state in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mailflow_compiler.compiler import CONNECTOR_KIND, PROFILE_KIND
from mailflow_compiler.dkim import DKIM_KEY_KIND
from mailflow_relay.routing.contract import (
    POD_BACKOFF_ANNOTATION,
    POD_GENERATION_ANNOTATION,
    POD_TRANSPORT_ANNOTATION,
)
from mailflow_relay.routing.document import ObjectRef

__all__ = ["PodState", "Store", "pod_state", "ref_of"]


@dataclass
class PodState:
    """A relay pod as the operator needs it: is it ready, which generation does it serve."""

    ready: bool
    generation: int | None
    backoff: dict[str, float] = field(default_factory=dict)
    """Connectors (``namespace/name``) this relay slowed down after 421 / 4.7.x, by factor."""
    transport: dict[str, dict[str, str]] = field(default_factory=dict)
    """Connectors' last DANE / MTA-STS outcomes on this relay (``dane``, ``mtaSts``)."""


@dataclass
class Store:
    """What the watches have seen: raw bodies and decoded Secrets, by namespace/name."""

    connectors: dict[ObjectRef, dict[str, Any]] = field(default_factory=dict)
    profiles: dict[ObjectRef, dict[str, Any]] = field(default_factory=dict)
    dkim_keys: dict[ObjectRef, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[ObjectRef, dict[str, str]] = field(default_factory=dict)
    pods: dict[ObjectRef, PodState] = field(default_factory=dict)
    deleted: set[tuple[str, ObjectRef]] = field(default_factory=set)
    """Deletions seen by the watch, so that a slower initial listing cannot resurrect them."""

    def table(self, kind: str) -> dict[ObjectRef, Any]:
        tables: dict[str, dict[ObjectRef, Any]] = {
            CONNECTOR_KIND: self.connectors,
            PROFILE_KIND: self.profiles,
            DKIM_KEY_KIND: self.dkim_keys,
            "Secret": self.secrets,
            "Pod": self.pods,
        }
        return tables[kind]


def ref_of(body: Mapping[str, Any]) -> ObjectRef:
    metadata = body.get("metadata") or {}
    return ObjectRef(str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))


def pod_state(body: Mapping[str, Any]) -> PodState:
    metadata = body.get("metadata") or {}
    conditions = (body.get("status") or {}).get("conditions") or []
    is_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    if metadata.get("deletionTimestamp"):
        is_ready = False
    annotation = (metadata.get("annotations") or {}).get(POD_GENERATION_ANNOTATION)
    try:
        generation = int(annotation) if annotation is not None else None
    except ValueError:
        generation = None
    return PodState(is_ready, generation, _backoff(metadata), _transport(metadata))


MAX_BACKOFF_ANNOTATION = 65536
"""A pod's annotation is the relay's word, but a bounded one (at most one entry a connector)."""


def _json_annotation(metadata: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A relay's JSON annotation (its word, bounded in size); malformed: empty."""
    text = (metadata.get("annotations") or {}).get(key)
    if not isinstance(text, str) or len(text) > MAX_BACKOFF_ANNOTATION:
        return {}
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    return raw if isinstance(raw, dict) else {}


_OUTCOME = re.compile(r"[a-z][a-z_-]{0,39}")


def _transport(metadata: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The relay's transport-security annotation; what is malformed is left out."""
    raw = _json_annotation(metadata, POD_TRANSPORT_ANNOTATION)
    found: dict[str, dict[str, str]] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            continue
        kept = {
            key: value
            for key, value in entry.items()
            if key in ("dane", "mtaSts") and isinstance(value, str) and _OUTCOME.fullmatch(value)
        }
        if kept:
            found[str(name)] = kept
    return found


def _backoff(metadata: Mapping[str, Any]) -> dict[str, float]:
    """The relay's backoff annotation; anything malformed reads as no backoff."""
    raw = _json_annotation(metadata, POD_BACKOFF_ANNOTATION)
    return {
        str(name): float(factor)
        for name, factor in raw.items()
        if isinstance(factor, int | float) and not isinstance(factor, bool) and 0.0 < factor < 1.0
    }
