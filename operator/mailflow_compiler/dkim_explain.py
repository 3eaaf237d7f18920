"""``mailflow explain``'s DKIM part: which keys would sign a message, or why none.

The key choice is the relay's own (:func:`mailflow_relay.routing.dkim_keys.keys_for`) and so
is the opt-out rule (every route opts out → unsigned). Keys are shown by their public
fingerprint only.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.routing.dkim_keys import DkimKey, keys_for
from mailflow_relay.routing.document import RoutingDocument
from mailflow_relay.routing.router import RouteDecision, domain_of

__all__ = ["dkim_json", "dkim_lines"]


def _decide(
    document: RoutingDocument, header_from: str, decisions: Sequence[RouteDecision]
) -> tuple[str, str | None, list[DkimKey]]:
    """(outcome, From domain, keys): the relay's decision for this From and these routes."""
    try:
        domain = domain_of(header_from)
    except InvalidAddressError:
        return "skipped_no_from", None, []
    keys = keys_for(document.dkim_keys, domain)
    if not keys:
        return "skipped_no_key", domain, []
    opted_out = bool(decisions) and all(
        d.connector is not None and not d.connector.dkim_sign for d in decisions
    )
    return ("skipped_opt_out" if opted_out else "signed"), domain, keys


def _key_json(key: DkimKey) -> dict[str, object]:
    return {
        "key": key.ref,
        "domain": key.domain,
        "selector": key.selector,
        "algorithm": key.algorithm.value,
        "fingerprint": key.fingerprint,
        "subdomains": key.subdomains,
    }


def dkim_json(
    document: RoutingDocument, header_from: str, decisions: Sequence[RouteDecision]
) -> dict[str, object]:
    outcome, domain, keys = _decide(document, header_from, decisions)
    return {
        "headerFrom": header_from,
        "domain": domain,
        "outcome": outcome,
        "keys": [_key_json(k) for k in keys],
        "optedOutBy": sorted(
            str(d.connector.ref) for d in decisions if d.connector and not d.connector.dkim_sign
        ),
    }


def dkim_lines(
    document: RoutingDocument, header_from: str, decisions: Sequence[RouteDecision]
) -> list[str]:
    outcome, domain, keys = _decide(document, header_from, decisions)
    lines = [f"DKIM  (From: {header_from or '<>'})"]
    if outcome == "skipped_no_from":
        lines.append("  unsigned     the From: address has no domain")
    elif outcome == "skipped_no_key":
        lines.append(
            f"  unsigned     no enabled DkimKey for {domain} (or a parent with subdomains)"
        )
    elif outcome == "skipped_opt_out":
        lines.append(
            "  unsigned     every route opts out (dkim.sign: false); keys that would sign:"
        )
    else:
        lines.append("  signs with")
    lines.extend(f"    - {key.ref}: {key.describe()}" for key in keys)
    return [*lines, ""]
