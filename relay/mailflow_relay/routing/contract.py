"""Names shared by the control plane and the relays: the routing Secret and its annotations.

The routing document travels from the operator to the relays in one Secret; these names
are the whole of that contract besides the document's own format
(:mod:`mailflow_relay.routing.document`). Each is defined here once.
"""

from __future__ import annotations

__all__ = [
    "CHECKSUM_ANNOTATION",
    "POD_BACKOFF_ANNOTATION",
    "POD_GENERATION_ANNOTATION",
    "POD_TRANSPORT_ANNOTATION",
    "PUBLISHED_BY_LABEL",
    "ROUTING_KEY",
    "SECRET_GENERATION_ANNOTATION",
]

ROUTING_KEY = "routing.json"
"""The key of the routing Secret that holds the routing document (JSON)."""

SECRET_GENERATION_ANNOTATION = "mailflow.dev/generation"  # noqa: S105 - a name, not a secret
"""On the routing Secret: the generation of the document it holds (set by the operator)."""

CHECKSUM_ANNOTATION = "mailflow.dev/checksum"
"""On the routing Secret: the checksum of the document it holds (set by the operator)."""

POD_GENERATION_ANNOTATION = "mailflow.dev/config-generation"
"""On a relay pod: the generation of the document the relay serves (set by the relay);
the operator's ``Programmed`` condition reads it."""

POD_TRANSPORT_ANNOTATION = "mailflow.dev/transport-security"
"""On a relay pod: JSON ``{"namespace/name": {"dane": result, "mtaSts": result}}``, the last
DANE and MTA-STS outcome of each connector with such a policy (engine/transport_status.py);
the operator's ``TransportSecurity`` condition reads it."""

POD_BACKOFF_ANNOTATION = "mailflow.dev/backoff"
"""On a relay pod: JSON ``{"namespace/name": factor}`` of the connectors whose rate the relay
lowered after 421 / 4.7.x replies (engine/throttles.py), absent or ``{}`` when none; the
operator's ``RateLimited`` condition reads it."""

PUBLISHED_BY_LABEL = "mailflow.dev/published-by"
"""On the routing Secret: who wrote it (``mailflow-operator``)."""
