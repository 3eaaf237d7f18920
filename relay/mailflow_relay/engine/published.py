"""The routing document in force, left in the spool folder for ``mailflow queue``.

``mailflow queue show`` tells which route each recipient takes *now*, and ``--connector``
filters by it; both must route as the running relay does, with its document, which in a
cluster comes from a Secret the CLI cannot read. So the relay leaves a copy next to the
mail it routes, ``<spool>/.routing.json``, each time a document comes into force.

The copy carries no secret: SMTP AUTH passwords are replaced and the DKIM private keys
left out (the router needs neither). It is written to a temporary name and renamed, so a
reader sees the old document or the new one, never a mix; it is not fsynced, since a lost
copy only costs the CLI a route until the next load, and no mail depends on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Final

from mailflow_relay.queue.admin import PUBLISHED_DOCUMENT
from mailflow_relay.routing.document import Connector, RoutingDocument

__all__ = ["publish", "redacted"]

_REDACTED: Final = "(redacted)"

logger = logging.getLogger(__name__)


def _without_password(connector: Connector) -> Connector:
    if connector.auth is None:
        return connector
    return replace(connector, auth=replace(connector.auth, password=_REDACTED))


def redacted(document: RoutingDocument) -> RoutingDocument:
    """``document`` as the router sees it, without passwords or private keys."""
    return replace(
        document,
        connectors=tuple(_without_password(c) for c in document.connectors),
        dkim_keys=(),
    )


def publish(spool_dir: Path, document: RoutingDocument) -> None:
    """Leave the redacted ``document`` in ``spool_dir``; a failure is logged, never raised."""
    target = spool_dir / PUBLISHED_DOCUMENT
    # Not the spool's ".tmp-" prefix: the spool's start-up scan deletes those.
    temp = spool_dir / f".routing-{secrets.token_hex(4)}.partial"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(redacted(document).to_json())
        os.replace(temp, target)
    except OSError as e:
        logger.warning(
            "cannot leave the routing document for `mailflow queue` in %s: %s", target, e
        )
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
