"""Router precedence (DESIGN.md, "Routing"): one decision per recipient."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.routing.document import (
    Conflict,
    Connector,
    DefaultAction,
    DefaultRoute,
    Destination,
    ObjectRef,
    RecipientMx,
    RoutingDocument,
    SmartHost,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.routing.router import MatchRule, Router, domain_of

NAMESPACE = "mail"


def ref(name: str) -> ObjectRef:
    return ObjectRef(NAMESPACE, name)


def connector(
    name: str,
    recipients: tuple[str, ...] | list[str],
    senders: tuple[str, ...] | list[str] = (),
    enabled: bool = True,
    destination: Destination | None = None,
    tls: TlsPolicy | None = None,
    created: str = "2024-01-01T00:00:00Z",
) -> Connector:
    return Connector(
        ref=ref(name),
        generation=1,
        created=created,
        enabled=enabled,
        recipient_patterns=tuple(DomainPattern.parse(p) for p in recipients),
        sender_patterns=tuple(DomainPattern.parse(p) for p in senders),
        destination=destination or SmartHost(f"{name}.relay.example"),
        tls=tls or TlsPolicy(),
    )


def router(
    *connectors: Connector,
    conflicts: tuple[Conflict, ...] = (),
    default: DefaultAction = DefaultAction.RECIPIENT_MX,
) -> Router:
    return Router(
        RoutingDocument(
            generation=1,
            connectors=connectors,
            conflicts=conflicts,
            default_route=DefaultRoute(action=default),
        )
    )


def routed_name(r: Router, recipient: str, sender: str = "") -> str | None:
    decision = r.route_for(recipient, sender)
    return None if decision.connector is None else decision.connector.ref.name


# --- precedence table --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    connectors: tuple[Connector, ...]
    recipient: str
    sender: str
    expected: str | None  # connector name; None = default route
    rule: MatchRule


PRECEDENCE = {
    "exact-beats-wildcard-and-catch-all": Case(
        (
            connector("all", ["*"]),
            connector("wild", ["*.contoso.com"]),
            connector("exact", ["sales.contoso.com"]),
        ),
        "ann@sales.contoso.com",
        "bob@fabrikam.com",
        "exact",
        MatchRule.EXACT,
    ),
    "wildcard-beats-catch-all": Case(
        (connector("all", ["*.*"]), connector("wild", ["*.contoso.com"])),
        "ann@sales.contoso.com",
        "bob@fabrikam.com",
        "wild",
        MatchRule.WILDCARD,
    ),
    "wildcard-matches-at-any-depth": Case(
        (connector("all", ["*.*"]), connector("wild", ["*.contoso.com"])),
        "ann@a.b.c.contoso.com",
        "",
        "wild",
        MatchRule.WILDCARD,
    ),
    "catch-all-when-nothing-else-matches": Case(
        (connector("all", ["*"]), connector("wild", ["*.contoso.com"])),
        "ann@fabrikam.com",
        "",
        "all",
        MatchRule.CATCH_ALL,
    ),
    "longer-wildcard-suffix-beats-shorter": Case(
        (connector("short", ["*.contoso.com"]), connector("long", ["*.eu.contoso.com"])),
        "ann@a.eu.contoso.com",
        "",
        "long",
        MatchRule.WILDCARD,
    ),
    "longer-wildcard-suffix-beats-shorter-in-either-order": Case(
        (connector("long", ["*.eu.contoso.com"]), connector("short", ["*.contoso.com"])),
        "ann@x.y.eu.contoso.com",
        "",
        "long",
        MatchRule.WILDCARD,
    ),
    "longer-wildcard-does-not-take-its-own-apex": Case(
        (connector("short", ["*.contoso.com"]), connector("long", ["*.eu.contoso.com"])),
        "ann@eu.contoso.com",
        "",
        "short",
        MatchRule.WILDCARD,
    ),
    "wildcard-does-not-take-the-apex": Case(
        (connector("wild", ["*.contoso.com"]), connector("all", ["*"])),
        "ann@contoso.com",
        "",
        "all",
        MatchRule.CATCH_ALL,
    ),
    "wildcard-does-not-take-the-apex-no-fallback": Case(
        (connector("wild", ["*.contoso.com"]),),
        "ann@contoso.com",
        "",
        None,
        MatchRule.DEFAULT_ROUTE,
    ),
    "exact-does-not-take-a-subdomain": Case(
        (connector("exact", ["contoso.com"]),),
        "ann@sales.contoso.com",
        "",
        None,
        MatchRule.DEFAULT_ROUTE,
    ),
    "sender-scoped-beats-unscoped-for-the-same-pattern": Case(
        (
            connector("unscoped", ["contoso.com"]),
            connector("scoped", ["contoso.com"], senders=["fabrikam.com"]),
        ),
        "ann@contoso.com",
        "bob@fabrikam.com",
        "scoped",
        MatchRule.EXACT,
    ),
    "sender-scoped-beats-unscoped-regardless-of-order": Case(
        (
            connector("scoped", ["*.contoso.com"], senders=["fabrikam.com"]),
            connector("unscoped", ["*.contoso.com"]),
        ),
        "ann@eu.contoso.com",
        "bob@FABRIKAM.com",
        "scoped",
        MatchRule.WILDCARD,
    ),
    "scoped-to-another-sender-falls-back-to-unscoped-same-pattern": Case(
        (
            connector("unscoped", ["contoso.com"]),
            connector("scoped", ["contoso.com"], senders=["fabrikam.com"]),
        ),
        "ann@contoso.com",
        "bob@northwind.com",
        "unscoped",
        MatchRule.EXACT,
    ),
    "scoped-non-matching-does-not-block-less-specific-unscoped": Case(
        (
            connector("scoped", ["contoso.com"], senders=["fabrikam.com"]),
            connector("all", ["*"]),
        ),
        "ann@contoso.com",
        "bob@northwind.com",
        "all",
        MatchRule.CATCH_ALL,
    ),
    "scoped-non-matching-wildcard-does-not-block-shorter-wildcard": Case(
        (
            connector("scoped", ["*.eu.contoso.com"], senders=["fabrikam.com"]),
            connector("short", ["*.contoso.com"]),
        ),
        "ann@a.eu.contoso.com",
        "bob@northwind.com",
        "short",
        MatchRule.WILDCARD,
    ),
    "more-specific-unscoped-beats-less-specific-scoped": Case(
        (
            connector("scoped", ["*"], senders=["fabrikam.com"]),
            connector("exact", ["contoso.com"]),
        ),
        "ann@contoso.com",
        "bob@fabrikam.com",
        "exact",
        MatchRule.EXACT,
    ),
    "exact-sender-scope-beats-wildcard-sender-scope": Case(
        (
            connector("wild-sender", ["contoso.com"], senders=["*.fabrikam.com"]),
            connector("exact-sender", ["contoso.com"], senders=["eu.fabrikam.com"]),
            connector("unscoped", ["contoso.com"]),
        ),
        "ann@contoso.com",
        "bob@eu.fabrikam.com",
        "exact-sender",
        MatchRule.EXACT,
    ),
    "wildcard-sender-scope-beats-unscoped": Case(
        (
            connector("unscoped", ["contoso.com"]),
            connector("wild-sender", ["contoso.com"], senders=["*.fabrikam.com"]),
        ),
        "ann@contoso.com",
        "bob@eu.fabrikam.com",
        "wild-sender",
        MatchRule.EXACT,
    ),
    "wildcard-sender-scope-does-not-take-the-sender-apex": Case(
        (
            connector("unscoped", ["contoso.com"]),
            connector("wild-sender", ["contoso.com"], senders=["*.fabrikam.com"]),
        ),
        "ann@contoso.com",
        "bob@fabrikam.com",
        "unscoped",
        MatchRule.EXACT,
    ),
    "null-sender-only-gets-unscoped-connectors": Case(
        (
            connector("scoped", ["contoso.com"], senders=["fabrikam.com"]),
            connector("all", ["*"]),
        ),
        "ann@contoso.com",
        "<>",
        "all",
        MatchRule.CATCH_ALL,
    ),
    "empty-sender-only-gets-unscoped-connectors": Case(
        (
            connector("scoped", ["*"], senders=["*.fabrikam.com", "fabrikam.com"]),
            connector("unscoped", ["*"]),
        ),
        "ann@contoso.com",
        "",
        "unscoped",
        MatchRule.CATCH_ALL,
    ),
    "null-sender-with-only-scoped-connectors-gets-the-default-route": Case(
        (connector("scoped", ["*"], senders=["fabrikam.com"]),),
        "ann@contoso.com",
        "<>",
        None,
        MatchRule.DEFAULT_ROUTE,
    ),
    "disabled-exact-never-routes": Case(
        (
            connector("exact", ["contoso.com"], enabled=False),
            connector("all", ["*"]),
        ),
        "ann@contoso.com",
        "",
        "all",
        MatchRule.CATCH_ALL,
    ),
    "disabled-scoped-never-routes": Case(
        (
            connector("scoped", ["contoso.com"], senders=["fabrikam.com"], enabled=False),
            connector("unscoped", ["contoso.com"]),
        ),
        "ann@contoso.com",
        "bob@fabrikam.com",
        "unscoped",
        MatchRule.EXACT,
    ),
    "disabled-only-connector-leaves-the-default-route": Case(
        (connector("all", ["*"], enabled=False),),
        "ann@contoso.com",
        "",
        None,
        MatchRule.DEFAULT_ROUTE,
    ),
    "idn-recipient-meets-punycode-pattern": Case(
        (connector("idn", ["xn--bcher-kva.example"]), connector("all", ["*"])),
        "ann@Bücher.Example.",
        "",
        "idn",
        MatchRule.EXACT,
    ),
    "punycode-sender-meets-u-label-scope": Case(
        (
            connector("unscoped", ["contoso.com"]),
            connector("scoped", ["contoso.com"], senders=["münchen.de"]),
        ),
        "ann@contoso.com",
        "<bob@XN--MNCHEN-3YA.de>",
        "scoped",
        MatchRule.EXACT,
    ),
}


@pytest.mark.parametrize("case", list(PRECEDENCE.values()), ids=list(PRECEDENCE))
def test_precedence_table_picks_the_most_specific_enabled_connector(case: Case) -> None:
    r = router(*case.connectors)
    decision = r.route_for(case.recipient, case.sender)
    assert (None if decision.connector is None else decision.connector.ref.name) == case.expected
    assert decision.rule is case.rule
    if decision.connector is not None:
        assert decision.destination == decision.connector.destination
        assert decision.tls == decision.connector.tls
    # The precedence never depends on the order connectors are listed in.
    reversed_router = router(*reversed(case.connectors))
    assert routed_name(reversed_router, case.recipient, case.sender) == case.expected


def test_decision_names_the_patterns_that_won() -> None:
    r = router(
        connector("all", ["*"]),
        connector("scoped", ["*.contoso.com"], senders=["*.fabrikam.com"]),
    )
    decision = r.route_for("ann@A.EU.contoso.com", "bob@x.fabrikam.com")
    assert decision.domain == "a.eu.contoso.com"
    assert decision.sender_domain == "x.fabrikam.com"
    assert decision.recipient_pattern == DomainPattern.parse("*.contoso.com")
    assert decision.sender_pattern == DomainPattern.parse("*.fabrikam.com")
    assert not decision.rejected


def test_null_sender_has_no_sender_domain() -> None:
    r = router(connector("all", ["*"]))
    for sender in ("", "<>", " <> "):
        decision = r.route_for("ann@contoso.com", sender)
        assert decision.sender_domain is None
        assert decision.sender_pattern is None


# --- disabled connectors -----------------------------------------------------------------


def test_candidates_for_reports_a_disabled_connector_as_disabled() -> None:
    r = router(
        connector("off", ["contoso.com"], enabled=False),
        connector("all", ["*"]),
    )
    candidates = {c.connector.name: c for c in r.candidates_for("ann@contoso.com")}
    assert candidates["off"].outcome == "disabled"
    assert not candidates["off"].chosen
    assert candidates["all"].chosen
    assert candidates["all"].outcome.startswith("chosen: ")


def test_a_disabled_connector_never_routes_any_of_its_patterns() -> None:
    off = connector("off", ["contoso.com", "*.fabrikam.com", "*"], enabled=False)
    r = router(off, default=DefaultAction.REJECT)
    for recipient in ("a@contoso.com", "a@x.fabrikam.com", "a@northwind.com"):
        decision = r.route_for(recipient)
        assert decision.connector is None
        assert decision.rejected


def test_candidates_are_listed_in_precedence_order() -> None:
    r = router(
        connector("all", ["*"]),
        connector("short", ["*.contoso.com"]),
        connector("long", ["*.eu.contoso.com"]),
        connector("exact", ["a.eu.contoso.com"]),
        connector("other", ["fabrikam.com"]),
    )
    names = [c.connector.name for c in r.candidates_for("ann@a.eu.contoso.com")]
    assert names == ["exact", "long", "short", "all"]


# --- conflicts ---------------------------------------------------------------------------


def _conflicted_router() -> Router:
    older = connector("older", ["contoso.com"], created="2024-01-01T00:00:00Z")
    newer = connector("newer", ["contoso.com", "fabrikam.com"], created="2024-06-01T00:00:00Z")
    conflict = Conflict(
        recipient=DomainPattern.parse("contoso.com"),
        sender=None,
        winner=older.ref,
        losers=(newer.ref,),
    )
    # The loser is listed last, so a router that ignored the conflict would pick it.
    return router(older, newer, conflicts=(conflict,))


def test_a_conflict_loser_does_not_route_the_conflicted_key() -> None:
    assert routed_name(_conflicted_router(), "ann@contoso.com") == "older"


def test_a_conflict_loser_still_routes_its_other_patterns() -> None:
    assert routed_name(_conflicted_router(), "ann@fabrikam.com") == "newer"


def test_candidates_for_explains_a_conflict_loser() -> None:
    candidates = {c.connector.name: c for c in _conflicted_router().candidates_for("a@contoso.com")}
    assert candidates["older"].chosen
    assert not candidates["newer"].chosen
    assert "conflict" in candidates["newer"].outcome
    assert "mail/older" in candidates["newer"].outcome


def test_a_sender_scoped_conflict_only_removes_the_loser_from_that_scope() -> None:
    older = connector("older", ["contoso.com"], senders=["fabrikam.com"])
    newer = connector("newer", ["contoso.com"], senders=["fabrikam.com", "northwind.com"])
    conflict = Conflict(
        recipient=DomainPattern.parse("contoso.com"),
        sender=DomainPattern.parse("fabrikam.com"),
        winner=older.ref,
        losers=(newer.ref,),
    )
    r = router(older, newer, connector("all", ["*"]), conflicts=(conflict,))
    assert routed_name(r, "ann@contoso.com", "bob@fabrikam.com") == "older"
    assert routed_name(r, "ann@contoso.com", "bob@northwind.com") == "newer"
    assert routed_name(r, "ann@contoso.com", "bob@other.com") == "all"


# --- default route -----------------------------------------------------------------------


def test_default_route_recipient_mx_delivers_to_the_recipient_mx() -> None:
    r = router(connector("exact", ["contoso.com"]), default=DefaultAction.RECIPIENT_MX)
    decision = r.route_for("ann@fabrikam.com", "bob@contoso.com")
    assert decision.rule is MatchRule.DEFAULT_ROUTE
    assert decision.connector is None
    assert decision.destination == RecipientMx()
    assert decision.tls.mode is TlsMode.OPPORTUNISTIC
    assert not decision.rejected


def test_default_route_reject_rejects_unmatched_recipients() -> None:
    r = router(connector("exact", ["contoso.com"]), default=DefaultAction.REJECT)
    decision = r.route_for("ann@fabrikam.com")
    assert decision.rule is MatchRule.DEFAULT_ROUTE
    assert decision.destination is None
    assert decision.rejected
    assert not r.route_for("ann@contoso.com").rejected


def test_an_empty_document_uses_the_default_route() -> None:
    decision = router().route_for("ann@contoso.com")
    assert decision.rule is MatchRule.DEFAULT_ROUTE
    assert decision.destination == RecipientMx()


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        pytest.param("ann@contoso.com", "contoso.com", id="plain"),
        pytest.param("<ann@Contoso.COM.>", "contoso.com", id="bracketed-case-dot"),
        pytest.param('"a@b"@contoso.com', "contoso.com", id="quoted-local-part-with-at"),
        pytest.param("ann@bücher.example", "xn--bcher-kva.example", id="idn"),
    ],
)
def test_domain_of_returns_the_normalised_domain(address: str, domain: str) -> None:
    assert domain_of(address) == domain


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("contoso.com", id="no-at"),
        pytest.param("@contoso.com", id="no-local-part"),
        pytest.param("ann@", id="no-domain"),
        pytest.param("ann@[192.0.2.1]", id="address-literal"),
        pytest.param("ann@a..b", id="empty-label"),
    ],
)
def test_domain_of_rejects_addresses_without_a_usable_domain(address: str) -> None:
    with pytest.raises(InvalidAddressError):
        domain_of(address)


def test_route_for_rejects_an_invalid_recipient() -> None:
    with pytest.raises(InvalidAddressError):
        router(connector("all", ["*"])).route_for("not-an-address")


def test_a_sender_without_a_usable_domain_is_treated_like_the_null_sender() -> None:
    r = router(
        connector("scoped", ["*"], senders=["fabrikam.com"]),
        connector("unscoped", ["*"]),
    )
    assert routed_name(r, "ann@contoso.com", "MAILER-DAEMON") == "unscoped"


# --- scale -------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [10, 20_000], ids=["10-connectors", "20000-connectors"])
def test_lookups_stay_correct_with_many_exact_domain_connectors(count: int) -> None:
    connectors = [connector(f"c{i}", [f"d{i}.example.com"]) for i in range(count)]
    connectors.append(connector("wild", ["*.example.com"]))
    connectors.append(connector("all", ["*"]))
    r = router(*connectors)
    for i in {0, 1, count // 2, count - 1}:
        decision = r.route_for(f"ann@D{i}.example.com.")
        assert decision.connector is not None
        assert decision.connector.ref.name == f"c{i}"
        assert decision.rule is MatchRule.EXACT
        assert decision.destination == SmartHost(f"c{i}.relay.example")
    assert routed_name(r, f"ann@d{count}.example.com") == "wild"
    assert routed_name(r, f"ann@x.d{count - 1}.example.com") == "wild"
    assert routed_name(r, "ann@example.com") == "all"
    assert routed_name(r, "ann@fabrikam.com") == "all"
