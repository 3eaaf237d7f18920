"""The routing document: canonical JSON, checksum, and precise load errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from mailflow_relay.errors import RoutingDocumentError
from mailflow_relay.routing.document import (
    ROUTING_API_VERSION,
    Balancing,
    Conflict,
    Connector,
    DefaultAction,
    DefaultRoute,
    Destination,
    ObjectRef,
    ProfilePool,
    RecipientMx,
    RoutingDocument,
    ServerAddress,
    SmartHost,
    SmtpCredentials,
    TlsMode,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern

PASSWORD = "s3cr3t-Pa55word!"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


def ref(name: str) -> ObjectRef:
    return ObjectRef("mail", name)


def connector(
    name: str,
    recipients: tuple[str, ...] | list[str],
    senders: tuple[str, ...] | list[str] = (),
    enabled: bool = True,
    destination: Destination | None = None,
    tls: TlsPolicy | None = None,
    auth: SmtpCredentials | None = None,
    unresolved: tuple[str, ...] = (),
    description: str = "",
) -> Connector:
    return Connector(
        ref=ref(name),
        generation=3,
        created="2024-01-01T00:00:00Z",
        enabled=enabled,
        recipient_patterns=tuple(DomainPattern.parse(p) for p in recipients),
        sender_patterns=tuple(DomainPattern.parse(p) for p in senders),
        destination=destination or RecipientMx(),
        tls=tls or TlsPolicy(),
        description=description,
        auth=auth,
        unresolved=unresolved,
    )


# Listed in ref order, so the index of each connector in the JSON is known.
CONNECTORS = (
    connector(
        "a-smarthost",
        ["contoso.com", "*.eu.contoso.com"],
        senders=["fabrikam.com"],
        destination=SmartHost("192.0.2.10", 2525),
        tls=TlsPolicy(TlsMode.OPPORTUNISTIC),
        auth=SmtpCredentials("relay-user", PASSWORD),
        description="Compliance server — «EU»",
    ),
    connector(
        "b-profile",
        ["*.contoso.com"],
        destination=ProfilePool(
            ref("contoso-pool"),
            (ServerAddress("192.0.2.21"), ServerAddress("2001:db8::25", 587)),
            Balancing.FAILOVER,
        ),
        tls=TlsPolicy(TlsMode.SELF_SIGNED, pinned_fingerprints=("sha256/AAAA", "sha256/0f0f")),
    ),
    connector(
        "c-mx",
        ["*.bücher.example"],
        senders=["*.fabrikam.com"],
        destination=SmartHost("mail.contoso.com", mx=True),
        tls=TlsPolicy(TlsMode.TRUSTED_CA, ca_bundle=CA_PEM),
    ),
    connector(
        "d-recipient-mx",
        ["northwind.com"],
        destination=RecipientMx(),
        tls=TlsPolicy(TlsMode.DOMAIN_MATCH),
        enabled=False,
    ),
    connector(
        "e-unresolved",
        ["*"],
        destination=ProfilePool(ref("missing-pool"), ()),
        tls=TlsPolicy(TlsMode.NAME_MATCH, certificate_name="*.contoso.com"),
        unresolved=("MultiSmtpProfile mail/missing-pool not found", "Secret mail/creds missing"),
    ),
    connector(
        "f-newer",
        ["contoso.com", "tailspin.com"],
        senders=["fabrikam.com"],
        destination=SmartHost("mx.tailspin.com"),
    ),
)

CONFLICTS = (
    Conflict(
        DomainPattern.parse("contoso.com"),
        DomainPattern.parse("fabrikam.com"),
        winner=ref("a-smarthost"),
        losers=(ref("f-newer"),),
    ),
    Conflict(
        DomainPattern.parse("tailspin.com"),
        None,
        winner=ref("f-newer"),
        losers=(ref("g-gone"), ref("h-gone")),
    ),
)


def full_document(generation: int = 7) -> RoutingDocument:
    return RoutingDocument(
        generation=generation,
        connectors=CONNECTORS,
        conflicts=CONFLICTS,
        default_route=DefaultRoute(DefaultAction.REJECT, TlsPolicy(TlsMode.TRUSTED_CA)),
    )


def as_dict(document: RoutingDocument) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(document.to_json())
    return raw


def load(raw: object) -> RoutingDocument:
    return RoutingDocument.from_json(json.dumps(raw))


# --- canonical form ----------------------------------------------------------------------


def test_the_document_covers_every_destination_kind_and_tls_mode() -> None:
    kinds = {type(c.destination) for c in CONNECTORS}
    assert kinds == {SmartHost, ProfilePool, RecipientMx}
    assert {c.tls.mode for c in CONNECTORS} == set(TlsMode)


def test_to_json_is_the_same_bytes_for_the_same_document() -> None:
    first = full_document().to_json().encode("utf-8")
    assert full_document().to_json().encode("utf-8") == first
    assert full_document().to_json().encode("utf-8") == first


def test_to_json_is_compact_json_with_sorted_keys() -> None:
    text = full_document().to_json()
    again = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert text == again
    assert "\n" not in text


def test_to_json_does_not_depend_on_the_order_connectors_are_given_in() -> None:
    shuffled = dataclasses.replace(
        full_document(), connectors=(*CONNECTORS[3:], *reversed(CONNECTORS[:3]))
    )
    assert shuffled.to_json().encode("utf-8") == full_document().to_json().encode("utf-8")
    assert shuffled.checksum == full_document().checksum


def test_to_json_does_not_depend_on_the_order_conflicts_are_given_in() -> None:
    swapped = dataclasses.replace(full_document(), conflicts=tuple(reversed(CONFLICTS)))
    assert swapped.to_json() == full_document().to_json()


def test_the_checksum_is_sha256_over_everything_but_generation_and_checksum() -> None:
    raw = as_dict(full_document())
    checksum = raw.pop("checksum")
    del raw["generation"]
    body = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert checksum == "sha256:" + hashlib.sha256(body.encode("utf-8")).hexdigest()
    assert checksum == full_document().checksum


# --- round trip --------------------------------------------------------------------------


def test_from_json_of_to_json_gives_back_an_equal_document() -> None:
    document = full_document()
    loaded = RoutingDocument.from_json(document.to_json())
    assert loaded == document
    assert loaded.checksum == document.checksum
    assert loaded.to_json() == document.to_json()


def test_from_json_accepts_utf8_bytes() -> None:
    document = full_document()
    assert RoutingDocument.from_json(document.to_json().encode("utf-8")) == document


def test_a_minimal_document_round_trips() -> None:
    document = RoutingDocument(generation=0, connectors=())
    assert RoutingDocument.from_json(document.to_json()) == document


def test_a_round_trip_keeps_auth_and_unresolved_reasons() -> None:
    loaded = RoutingDocument.from_json(full_document().to_json())
    smarthost = loaded.connector(ref("a-smarthost"))
    assert smarthost is not None
    assert smarthost.auth == SmtpCredentials("relay-user", PASSWORD)
    unresolved = loaded.connector(ref("e-unresolved"))
    assert unresolved is not None
    assert unresolved.unresolved == CONNECTORS[4].unresolved


def test_a_round_trip_of_connectors_out_of_order_keeps_content_and_checksum() -> None:
    shuffled = dataclasses.replace(full_document(), connectors=tuple(reversed(CONNECTORS)))
    loaded = RoutingDocument.from_json(shuffled.to_json())
    assert loaded.checksum == shuffled.checksum
    assert set(loaded.connectors) == set(shuffled.connectors)


# --- generation and checksum -------------------------------------------------------------


def test_changing_the_generation_keeps_the_checksum() -> None:
    assert full_document(1).checksum == full_document(2).checksum
    one, two = as_dict(full_document(1)), as_dict(full_document(2))
    assert one["generation"] == 1
    assert two["generation"] == 2
    assert {**one, "generation": 0} == {**two, "generation": 0}


def test_a_document_whose_generation_was_changed_still_loads() -> None:
    raw = as_dict(full_document(7))
    raw["generation"] = 8
    assert load(raw) == full_document(8)


def test_changing_content_changes_the_checksum() -> None:
    changed = dataclasses.replace(
        full_document(), default_route=DefaultRoute(DefaultAction.RECIPIENT_MX)
    )
    assert changed.checksum != full_document().checksum


def _set(path: tuple[str | int, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        target: Any = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        target: Any = raw
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


TAMPERING = {
    "port": _set(("connectors", 0, "destination", "port"), 25),
    "host": _set(("connectors", 0, "destination", "host"), "198.51.100.66"),
    "mx-flag": _set(("connectors", 2, "destination", "mx"), False),
    "enabled": _set(("connectors", 3, "enabled"), True),
    "password": _set(("connectors", 0, "auth", "password"), "other"),
    "recipient-domain": _set(("connectors", 0, "recipientDomains", 0), "fabrikam.com"),
    "sender-domain-removed": _set(("connectors", 0, "senderDomains"), []),
    "tls-mode": _set(("connectors", 4, "tls", "mode"), "Opportunistic"),
    "pinned-fingerprint": _set(("connectors", 1, "tls", "pinnedFingerprints", 0), "sha256/BBBB"),
    "profile-server": _set(("connectors", 1, "destination", "servers", 0, "port"), 26),
    "unresolved-cleared": _set(("connectors", 4, "unresolved"), []),
    "conflict-winner": _set(("conflicts", 0, "winner"), "mail/f-newer"),
    "default-action": _set(("defaultRoute", "action"), "RecipientMx"),
    "connector-removed": _delete(("connectors", 5)),
    "checksum-itself": _set(("checksum",), "sha256:" + "0" * 64),
}


@pytest.mark.parametrize("tamper", list(TAMPERING.values()), ids=list(TAMPERING))
def test_a_tampered_document_is_refused_with_path_checksum(
    tamper: Callable[[dict[str, Any]], None],
) -> None:
    raw = as_dict(full_document())
    tamper(raw)
    with pytest.raises(RoutingDocumentError) as info:
        load(raw)
    assert info.value.path == "checksum"


def test_a_document_without_checksum_is_refused() -> None:
    raw = as_dict(full_document())
    del raw["checksum"]
    with pytest.raises(RoutingDocumentError) as info:
        load(raw)
    assert info.value.path == "checksum"


# --- load errors with exact paths --------------------------------------------------------

ERRORS = {
    "wrong-api-version": (_set(("apiVersion",), "mailflow.dev/routing/v0"), "apiVersion"),
    "missing-api-version": (_delete(("apiVersion",)), "apiVersion"),
    "missing-generation": (_delete(("generation",)), "generation"),
    "generation-as-string": (_set(("generation",), "7"), "generation"),
    "generation-as-boolean": (_set(("generation",), True), "generation"),
    "generation-as-float": (_set(("generation",), 7.5), "generation"),
    "connectors-not-a-list": (_set(("connectors",), {}), "connectors"),
    "connector-not-an-object": (_set(("connectors", 2), "c-mx"), "connectors[2]"),
    "missing-connectors": (_delete(("connectors",)), "connectors"),
    "missing-ref": (_delete(("connectors", 0, "ref")), "connectors[0].ref"),
    "ref-without-namespace": (_set(("connectors", 0, "ref"), "a-smarthost"), "connectors[0].ref"),
    "missing-enabled": (_delete(("connectors", 1, "enabled")), "connectors[1].enabled"),
    "enabled-as-string": (_set(("connectors", 1, "enabled"), "true"), "connectors[1].enabled"),
    "enabled-as-integer": (_set(("connectors", 1, "enabled"), 1), "connectors[1].enabled"),
    "missing-description": (
        _delete(("connectors", 0, "description")),
        "connectors[0].description",
    ),
    "bad-recipient-pattern": (
        _set(("connectors", 0, "recipientDomains", 1), "foo*.contoso.com"),
        "connectors[0].recipientDomains[1]",
    ),
    "recipient-domains-not-a-list": (
        _set(("connectors", 0, "recipientDomains"), "contoso.com"),
        "connectors[0].recipientDomains",
    ),
    "sender-domain-not-a-string": (
        _set(("connectors", 0, "senderDomains", 0), 5),
        "connectors[0].senderDomains[0]",
    ),
    "port-zero": (
        _set(("connectors", 0, "destination", "port"), 0),
        "connectors[0].destination.port",
    ),
    "port-70000": (
        _set(("connectors", 0, "destination", "port"), 70000),
        "connectors[0].destination.port",
    ),
    "port-negative": (
        _set(("connectors", 0, "destination", "port"), -25),
        "connectors[0].destination.port",
    ),
    "port-as-string": (
        _set(("connectors", 0, "destination", "port"), "25"),
        "connectors[0].destination.port",
    ),
    "port-as-float": (
        _set(("connectors", 0, "destination", "port"), 25.0),
        "connectors[0].destination.port",
    ),
    "port-as-boolean": (
        _set(("connectors", 0, "destination", "port"), True),
        "connectors[0].destination.port",
    ),
    "missing-port": (
        _delete(("connectors", 0, "destination", "port")),
        "connectors[0].destination.port",
    ),
    "profile-server-port-zero": (
        _set(("connectors", 1, "destination", "servers", 1, "port"), 0),
        "connectors[1].destination.servers[1].port",
    ),
    "profile-server-port-70000": (
        _set(("connectors", 1, "destination", "servers", 0, "port"), 70000),
        "connectors[1].destination.servers[0].port",
    ),
    "profile-server-missing-host": (
        _delete(("connectors", 1, "destination", "servers", 0, "host")),
        "connectors[1].destination.servers[0].host",
    ),
    "bad-balancing": (
        _set(("connectors", 1, "destination", "balancing"), "Random"),
        "connectors[1].destination.balancing",
    ),
    "bad-profile-ref": (
        _set(("connectors", 1, "destination", "profile"), "nonamespace"),
        "connectors[1].destination.profile",
    ),
    "mx-as-string": (
        _set(("connectors", 2, "destination", "mx"), "yes"),
        "connectors[2].destination.mx",
    ),
    "unknown-destination-kind": (
        _set(("connectors", 0, "destination", "kind"), "Pigeon"),
        "connectors[0].destination.kind",
    ),
    "destination-not-an-object": (
        _set(("connectors", 0, "destination"), None),
        "connectors[0].destination",
    ),
    "unknown-tls-mode": (
        _set(("connectors", 0, "tls", "mode"), "Strict"),
        "connectors[0].tls.mode",
    ),
    "certificate-name-as-number": (
        _set(("connectors", 4, "tls", "certificateName"), 42),
        "connectors[4].tls.certificateName",
    ),
    "pinned-fingerprint-not-a-string": (
        _set(("connectors", 1, "tls", "pinnedFingerprints", 1), None),
        "connectors[1].tls.pinnedFingerprints[1]",
    ),
    "auth-not-an-object": (_set(("connectors", 0, "auth"), "user:pw"), "connectors[0].auth"),
    "auth-missing-password": (
        _delete(("connectors", 0, "auth", "password")),
        "connectors[0].auth.password",
    ),
    "unresolved-not-strings": (
        _set(("connectors", 4, "unresolved", 1), {"reason": "x"}),
        "connectors[4].unresolved[1]",
    ),
    "conflict-bad-recipient": (
        _set(("conflicts", 1, "recipient"), "a..b"),
        "conflicts[1].recipient",
    ),
    "conflict-bad-sender": (_set(("conflicts", 0, "sender"), "*.*.x"), "conflicts[0].sender"),
    "conflict-bad-loser": (_set(("conflicts", 1, "losers", 1), "nope"), "conflicts[1].losers[1]"),
    "conflict-missing-winner": (_delete(("conflicts", 0, "winner")), "conflicts[0].winner"),
    "missing-default-route": (_delete(("defaultRoute",)), "defaultRoute"),
    "bad-default-action": (_set(("defaultRoute", "action"), "Drop"), "defaultRoute.action"),
    "bad-default-tls-mode": (_set(("defaultRoute", "tls", "mode"), "may"), "defaultRoute.tls.mode"),
}


@pytest.mark.parametrize(("mutate", "path"), list(ERRORS.values()), ids=list(ERRORS))
def test_an_invalid_document_is_refused_with_the_exact_field_path(
    mutate: Callable[[dict[str, Any]], None], path: str
) -> None:
    raw = as_dict(full_document())
    mutate(raw)
    with pytest.raises(RoutingDocumentError) as info:
        load(raw)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("{", id="truncated"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param("[]", id="list"),
        pytest.param("null", id="null"),
    ],
)
def test_a_document_that_is_not_a_json_object_is_refused_at_the_top(text: str | bytes) -> None:
    with pytest.raises(RoutingDocumentError) as info:
        RoutingDocument.from_json(text)
    assert info.value.path == ""


@pytest.mark.parametrize("port", [1, 65535])
def test_ports_at_the_limits_are_accepted(port: int) -> None:
    document = RoutingDocument(
        generation=1, connectors=(connector("edge", ["*"], destination=SmartHost("h", port)),)
    )
    assert RoutingDocument.from_json(document.to_json()) == document


def test_the_api_version_is_the_documented_one() -> None:
    assert (
        as_dict(full_document())["apiVersion"] == ROUTING_API_VERSION == "mailflow.dev/routing/v1"
    )


# --- secrets -----------------------------------------------------------------------------


def test_smtp_credentials_repr_never_contains_the_password() -> None:
    credentials = SmtpCredentials("relay-user", PASSWORD)
    assert PASSWORD not in repr(credentials)
    assert PASSWORD not in str(credentials)
    assert "relay-user" in repr(credentials)


def test_connector_and_document_reprs_never_contain_the_password() -> None:
    document = full_document()
    assert PASSWORD not in repr(document)
    assert PASSWORD not in repr(CONNECTORS[0])
    assert PASSWORD not in repr(RoutingDocument.from_json(document.to_json()))


def test_a_password_that_failed_to_load_is_not_in_the_error() -> None:
    raw = as_dict(full_document())
    raw["connectors"][0]["auth"]["username"] = 5
    with pytest.raises(RoutingDocumentError) as info:
        load(raw)
    assert PASSWORD not in str(info.value)


# --- regressions --------------------------------------------------------------------------


def test_conflicts_on_an_exact_and_a_wildcard_pattern_serialise() -> None:
    document = RoutingDocument(
        generation=1,
        connectors=(),
        conflicts=(
            Conflict(DomainPattern.parse("contoso.com"), None, ref("a"), (ref("b"),)),
            Conflict(DomainPattern.parse("*.contoso.com"), None, ref("c"), (ref("d"),)),
        ),
    )
    assert RoutingDocument.from_json(document.to_json()) == document


def test_an_unscoped_and_a_sender_scoped_conflict_on_one_pattern_serialise() -> None:
    document = RoutingDocument(
        generation=1,
        connectors=(),
        conflicts=(
            Conflict(DomainPattern.parse("contoso.com"), None, ref("a"), (ref("b"),)),
            Conflict(
                DomainPattern.parse("contoso.com"),
                DomainPattern.parse("fabrikam.com"),
                ref("c"),
                (ref("d"),),
            ),
        ),
    )
    assert RoutingDocument.from_json(document.to_json()) == document
