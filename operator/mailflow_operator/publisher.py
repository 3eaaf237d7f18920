"""Publishing the routing document into the relay config Secret.

The Secret holds one key, ``routing.json``: exactly ``RoutingDocument.to_json()``, the
bytes ``mailflow relay --manifests`` would compile from the same objects. Two
annotations say what it holds without decoding it: ``mailflow.dev/generation`` and
``mailflow.dev/checksum``.

The generation only grows. It is read back from the Secret, and never goes below what
the operator published before or what a relay pod says it serves (so a restarted
operator, or a Secret that was deleted or emptied, continues the sequence); a new
document (another checksum) gets the previous generation + 1, and the same document is not written again
— GitOps tools and relays see no churn when nothing changed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from mailflow_operator.kubeclient import KubeClient
from mailflow_relay.routing.contract import (
    CHECKSUM_ANNOTATION,
    PUBLISHED_BY_LABEL,
    ROUTING_KEY,
    SECRET_GENERATION_ANNOTATION,
)
from mailflow_relay.routing.document import ObjectRef, RoutingDocument

__all__ = [
    "CHECKSUM_ANNOTATION",
    "GENERATION_ANNOTATION",
    "ROUTING_KEY",
    "Published",
    "publish",
]

logger = logging.getLogger(__name__)

GENERATION_ANNOTATION = SECRET_GENERATION_ANNOTATION


@dataclass(frozen=True)
class Published:
    document: RoutingDocument
    """The document the Secret holds now, with its generation."""
    written: bool


def stored_routing(secret: dict[str, Any] | None) -> tuple[int, str | None]:
    """The generation and checksum the Secret holds (0, None when there is none)."""
    if secret is None:
        return 0, None
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    try:
        generation = int(annotations.get(GENERATION_ANNOTATION, 0))
    except ValueError:
        generation = 0
    checksum = annotations.get(CHECKSUM_ANNOTATION)
    text = _routing_text(secret)
    if text is not None:
        try:
            stored = RoutingDocument.from_json(text)
        except ValueError:
            return generation, None  # unreadable: rewrite it
        generation = max(generation, stored.generation)
        if checksum != stored.checksum:
            checksum = None  # annotation and content disagree: rewrite
    else:
        checksum = None
    return generation, checksum


def _routing_text(secret: dict[str, Any]) -> str | None:
    encoded = (secret.get("data") or {}).get(ROUTING_KEY)
    if encoded is not None:
        try:
            return base64.b64decode(str(encoded), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
    text = (secret.get("stringData") or {}).get(ROUTING_KEY)
    return None if text is None else str(text)


async def publish(
    client: KubeClient, target: ObjectRef, document: RoutingDocument, *, floor: int = 0
) -> Published:
    """Make the Secret hold ``document`` (its generation is decided here).

    ``floor``: a generation already in use elsewhere (published before by this operator,
    served by a relay). A Secret that was deleted or emptied would otherwise restart the
    sequence at 1 and reuse numbers for other content.
    """
    secret = await client.get("v1", "secrets", target.namespace, target.name)
    generation, checksum = stored_routing(secret)
    if checksum == document.checksum:
        return Published(dataclasses.replace(document, generation=generation), written=False)
    document = dataclasses.replace(document, generation=max(generation, floor) + 1)
    metadata: dict[str, Any] = {
        "annotations": {
            GENERATION_ANNOTATION: str(document.generation),
            CHECKSUM_ANNOTATION: document.checksum,
        },
        # Not app.kubernetes.io/managed-by: the chart renders that label (Helm) and GitOps
        # tools would see every publish as drift.
        "labels": {PUBLISHED_BY_LABEL: "mailflow-operator"},
    }
    if secret is None:
        metadata |= {"name": target.name, "namespace": target.namespace}
    body: dict[str, Any] = {
        "metadata": metadata,
        "type": "Opaque",
        "data": {ROUTING_KEY: base64.b64encode(document.to_json().encode("utf-8")).decode()},
    }
    if secret is None:
        await client.create(
            "v1", "secrets", target.namespace, {"apiVersion": "v1", "kind": "Secret", **body}
        )
    else:
        await client.merge_patch("v1", "secrets", target.namespace, target.name, body)
    logger.info(
        "published routing generation %d (%s, %d connector(s)) to Secret %s",
        document.generation,
        document.checksum,
        len(document.connectors),
        target,
    )
    return Published(document, written=True)
