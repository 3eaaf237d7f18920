"""The router: routing document → one decision per recipient.

Precedence (DESIGN.md, "Routing"):

1. the recipient pattern that is most specific wins: an exact domain, then the wildcard
   with the longest suffix (``*.eu.contoso.com`` before ``*.contoso.com``), then the
   catch-all;
2. among connectors with that same recipient pattern, one scoped to the sender's domain
   beats an unscoped one (an exact sender domain before a wildcard sender domain);
3. two enabled connectors on the same (recipient pattern, sender pattern, client scope)
   key are a conflict that the producer already resolved by age, then name: the loser
   does not hold that key.

Client scopes (``spec.clients``: source networks, AUTH users) filter before precedence: a
client-scoped connector exists only for mail submitted by one of its clients. Among
connectors with the same recipient pattern, a client-scoped one that matches beats
sender-scoped and unscoped ones — the most specific statement about this message is
who handed it over. So "mail back from the compliance server goes to the MX" is a
client-scoped catch-all beside the unscoped catch-all to the compliance server, and the
message cannot loop. The recipient pattern still comes first: an exact partner connector
beats a client-scoped catch-all, so scope the partner connector to the compliance server
too when partner mail must pass compliance first (examples/compliance/).

A pattern whose connectors are all scoped to other senders does not stop the search:
the next, less specific pattern is tried, so a sender-scoped exception never swallows
mail of other senders.

Lookups are hash probes, one per label of the recipient domain plus one for the
catch-all, so they do not slow down as connectors grow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mailflow_relay.errors import InvalidAddressError, InvalidDomainError
from mailflow_relay.routing.document import (
    ClientScope,
    Connector,
    DefaultAction,
    Destination,
    ObjectRef,
    RecipientMx,
    RoutingDocument,
    TlsPolicy,
)
from mailflow_relay.routing.domains import (
    DomainPattern,
    PatternKind,
    normalize_domain,
    parent_domains,
)
from mailflow_relay.routing.memo import DecisionMemo

__all__ = ["Candidate", "Client", "MatchRule", "RouteDecision", "Router", "domain_of"]


@dataclass(frozen=True)
class Client:
    """Who submitted the message: its address and, after SMTP AUTH, its user."""

    address: str | None = None
    user: str | None = None

    def __str__(self) -> str:
        shown = self.address or "?"
        return f"{shown} (user {self.user})" if self.user else shown


def domain_of(address: str) -> str:
    """The normalised domain of an envelope address (``local@domain``)."""
    local, sep, domain = address.strip().strip("<>").rpartition("@")
    if not sep or not local or not domain:
        raise InvalidAddressError(address, "expected local-part@domain")
    try:
        return normalize_domain(domain)
    except InvalidDomainError as e:
        raise InvalidAddressError(address, e.reason) from e


class MatchRule(enum.Enum):
    EXACT = "exact"
    WILDCARD = "wildcard"
    CATCH_ALL = "catch-all"
    DEFAULT_ROUTE = "default route"


@dataclass(frozen=True)
class RouteDecision:
    recipient: str
    domain: str
    sender_domain: str | None
    rule: MatchRule
    connector: Connector | None
    """None when the default route applies."""
    recipient_pattern: DomainPattern | None
    sender_pattern: DomainPattern | None
    destination: Destination | None
    """None when the default route rejects."""
    tls: TlsPolicy
    reason: str
    clients: ClientScope | None = None
    """The chosen connector's client scope, when it is client-scoped."""

    @property
    def rejected(self) -> bool:
        return self.destination is None


@dataclass(frozen=True)
class Candidate:
    """A connector that matched a recipient, and what became of it (for ``explain``)."""

    connector: ObjectRef
    recipient_pattern: DomainPattern
    sender_pattern: DomainPattern | None
    outcome: str
    chosen: bool = False


@dataclass
class _Bucket:
    """The connectors that hold one recipient pattern, keyed by sender scope."""

    unscoped: Connector | None = None
    by_sender: dict[str, Connector] = field(default_factory=dict)
    by_sender_suffix: dict[str, Connector] = field(default_factory=dict)

    def add(self, sender: DomainPattern | None, connector: Connector) -> None:
        if sender is None or sender.kind is PatternKind.ANY:
            self.unscoped = connector
        elif sender.kind is PatternKind.EXACT:
            self.by_sender[sender.domain] = connector
        else:
            self.by_sender_suffix[sender.domain] = connector

    def pick(self, sender_domain: str | None) -> tuple[Connector, DomainPattern | None] | None:
        if sender_domain is not None:
            if (hit := self.by_sender.get(sender_domain)) is not None:
                return hit, DomainPattern(PatternKind.EXACT, sender_domain)
            if self.by_sender_suffix:
                for parent in parent_domains(sender_domain):
                    if (hit := self.by_sender_suffix.get(parent)) is not None:
                        return hit, DomainPattern(PatternKind.SUBDOMAINS, parent)
        if self.unscoped is not None:
            return self.unscoped, None
        return None


@dataclass
class _Tables:
    """Buckets by recipient pattern: exact domains, wildcard suffixes, the catch-all."""

    exact: dict[str, _Bucket] = field(default_factory=dict)
    subdomains: dict[str, _Bucket] = field(default_factory=dict)
    any: _Bucket = field(default_factory=_Bucket)

    def bucket_for(self, pattern: DomainPattern) -> _Bucket:
        if pattern.kind is PatternKind.ANY:
            return self.any
        table = self.exact if pattern.kind is PatternKind.EXACT else self.subdomains
        return table.setdefault(pattern.domain, _Bucket())

    def get(self, pattern: DomainPattern) -> _Bucket | None:
        if pattern.kind is PatternKind.ANY:
            return self.any
        table = self.exact if pattern.kind is PatternKind.EXACT else self.subdomains
        return table.get(pattern.domain)


class Router:
    """Routes recipients with one routing document; build a new Router for a new document."""

    def __init__(self, document: RoutingDocument) -> None:
        self.document = document
        self.decisions: DecisionMemo[tuple[str, str, Client | None], RouteDecision] = DecisionMemo()
        self._open = _Tables()
        # One table set per distinct client scope: lookups cost one probe per label per
        # scope that matches the client, however many connectors share a scope.
        self._scoped: dict[ClientScope, _Tables] = {}
        lost = {
            (conflict.recipient, conflict.sender, conflict.clients, loser)
            for conflict in document.conflicts
            for loser in conflict.losers
        }
        for connector in document.connectors:
            if not connector.enabled:
                continue
            tables = (
                self._open
                if connector.clients is None
                else self._scoped.setdefault(connector.clients, _Tables())
            )
            senders: tuple[DomainPattern | None, ...] = connector.sender_patterns or (None,)
            for recipient in connector.recipient_patterns:
                for sender in senders:
                    if (recipient, sender, connector.clients, connector.ref) in lost:
                        continue
                    tables.bucket_for(recipient).add(sender, connector)

    def route_for(
        self, recipient: str, sender: str = "", client: Client | None = None
    ) -> RouteDecision:
        """Decide the connector for one recipient of a message from ``sender``.

        ``sender`` is the envelope sender; ``""`` or ``"<>"`` (the null sender of
        bounces) matches only connectors that are not scoped to sender domains.
        ``client`` is who submitted the message; None (a bounce this relay writes, an
        unknown client) matches only connectors that are not scoped to clients.

        Asked again with the same arguments, it returns the decision already made
        (:mod:`.memo`): RCPT time and delivery see one decision per document.
        """
        return self.decisions.get(
            (recipient, sender, client), lambda: self._decide(recipient, sender, client)
        )

    def _decide(self, recipient: str, sender: str, client: Client | None) -> RouteDecision:
        domain = domain_of(recipient)
        sender_domain = sender_domain_of(sender)
        scoped = [
            tables
            for scope, tables in self._scoped.items()
            if client is not None and scope.matches(client.address, client.user)
        ]
        patterns = [DomainPattern(PatternKind.EXACT, domain)]
        patterns += [DomainPattern(PatternKind.SUBDOMAINS, p) for p in parent_domains(domain)]
        patterns.append(DomainPattern(PatternKind.ANY, ""))
        for pattern in patterns:
            picked = None
            for tables in (*scoped, self._open):
                bucket = tables.get(pattern)
                if bucket is not None and (picked := bucket.pick(sender_domain)) is not None:
                    break
            if picked is None:
                continue
            connector, sender_pattern = picked
            return RouteDecision(
                recipient=recipient,
                domain=domain,
                sender_domain=sender_domain,
                rule=_RULES[pattern.kind],
                connector=connector,
                recipient_pattern=pattern,
                sender_pattern=sender_pattern,
                destination=connector.destination,
                tls=connector.tls,
                reason=_reason(pattern, sender_pattern, connector.clients),
                clients=connector.clients,
            )
        default = self.document.default_route
        return RouteDecision(
            recipient=recipient,
            domain=domain,
            sender_domain=sender_domain,
            rule=MatchRule.DEFAULT_ROUTE,
            connector=None,
            recipient_pattern=None,
            sender_pattern=None,
            destination=None if default.action is DefaultAction.REJECT else RecipientMx(),
            tls=default.tls,
            reason=f"no enabled connector matches; default route: {default.describe()}",
        )

    def candidates_for(
        self, recipient: str, sender: str = "", client: Client | None = None
    ) -> list[Candidate]:
        """Every connector whose patterns match, in precedence order, with its outcome.

        This walks all connectors: it is for explaining a decision, not for making it.
        """
        decision = self.route_for(recipient, sender, client)
        domain, sender_domain = decision.domain, decision.sender_domain
        chosen_key = (
            None
            if decision.connector is None
            else (decision.connector.ref, decision.recipient_pattern, decision.sender_pattern)
        )
        losers = {
            (c.recipient, c.sender, c.clients, loser): c.winner
            for c in self.document.conflicts
            for loser in c.losers
        }
        found: list[tuple[tuple[int, ...], Candidate]] = []
        for connector in self.document.connectors:
            for pattern in connector.recipient_patterns:
                if not pattern.matches(domain):
                    continue
                senders: tuple[DomainPattern | None, ...] = connector.sender_patterns or (None,)
                for sender_pattern in senders:
                    key = (connector.ref, pattern, sender_pattern)
                    outcome = _outcome(
                        connector, pattern, sender_pattern, sender_domain, decision, losers, client
                    )
                    scope = 0 if sender_pattern is None else 1 + sender_pattern.specificity[0]
                    rank = (*pattern.specificity, int(connector.clients is not None), scope)
                    found.append(
                        (
                            rank,
                            Candidate(
                                connector.ref, pattern, sender_pattern, outcome, key == chosen_key
                            ),
                        )
                    )
        found.sort(key=lambda item: (item[0], item[1].chosen), reverse=True)
        return [candidate for _, candidate in found]


def sender_domain_of(sender: str) -> str | None:
    stripped = sender.strip().strip("<>")
    if not stripped:
        return None
    try:
        return domain_of(stripped)
    except InvalidAddressError:
        # A sender without a usable domain is treated like the null sender: it is not
        # scoped to anything, so only unscoped connectors can serve it.
        return None


_RULES = {
    PatternKind.EXACT: MatchRule.EXACT,
    PatternKind.SUBDOMAINS: MatchRule.WILDCARD,
    PatternKind.ANY: MatchRule.CATCH_ALL,
}


def _sender_text(pattern: DomainPattern) -> str:
    if pattern.kind is PatternKind.SUBDOMAINS:
        return f"sender subdomains of '{pattern.domain}'"
    return f"sender domain '{pattern.domain}'"


def _reason(
    recipient: DomainPattern, sender: DomainPattern | None, clients: ClientScope | None = None
) -> str:
    if recipient.kind is PatternKind.EXACT:
        why = f"{recipient.describe()} is an exact match, the most specific kind"
    elif recipient.kind is PatternKind.SUBDOMAINS:
        why = (
            f"{recipient.describe()} is the longest matching wildcard suffix"
            " and no exact pattern matches"
        )
    else:
        why = f"{recipient.describe()} matches; no exact or wildcard pattern does"
    if clients is not None:
        why += f"; scoped to clients {clients}, which beats connectors not scoped to clients"
    if sender is not None:
        why += f"; scoped to {_sender_text(sender)}, which beats unscoped connectors"
    return why


def _scope_mismatch(
    connector: Connector,
    sender_pattern: DomainPattern | None,
    sender_domain: str | None,
    client: Client | None,
) -> str | None:
    """Why a connector's client or sender scope leaves this message out, or None."""
    if connector.clients is not None and (
        client is None or not connector.clients.matches(client.address, client.user)
    ):
        shown = "no client given" if client is None else f"not {client}"
        return f"scoped to clients {connector.clients}: {shown}"
    if sender_pattern is not None and (
        sender_domain is None or not sender_pattern.matches(sender_domain)
    ):
        shown = sender_domain or "<>"
        return f"scoped to {_sender_text(sender_pattern)}, which does not match {shown}"
    return None


def _outcome(
    connector: Connector,
    pattern: DomainPattern,
    sender_pattern: DomainPattern | None,
    sender_domain: str | None,
    decision: RouteDecision,
    losers: dict[
        tuple[DomainPattern, DomainPattern | None, ClientScope | None, ObjectRef], ObjectRef
    ],
    client: Client | None,
) -> str:
    if not connector.enabled:
        return "disabled"
    mismatch = _scope_mismatch(connector, sender_pattern, sender_domain, client)
    if mismatch is not None:
        return mismatch
    winner = losers.get((pattern, sender_pattern, connector.clients, connector.ref))
    if winner is not None:
        return (
            f"conflict on this pattern and sender scope: {winner} is older"
            " (or first by name) and routes it"
        )
    chosen = decision.connector is not None and decision.connector.ref == connector.ref
    if chosen and (decision.recipient_pattern, decision.sender_pattern) == (
        pattern,
        sender_pattern,
    ):
        return "chosen: " + decision.reason
    if decision.recipient_pattern is not None and decision.recipient_pattern != pattern:
        return f"less specific than {decision.recipient_pattern.describe()}"
    if decision.clients is not None and connector.clients is None:
        return "an equally specific connector scoped to this client wins"
    return "an equally specific connector scoped to the sender wins"
