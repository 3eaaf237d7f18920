"""Client scopes (`spec.clients`): a connector for mail from some clients only.

Through the whole chain a user's manifest takes: CRD schema + CEL, compiler, routing
document (JSON and back), router, explain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.errors import RoutingDocumentError
from mailflow_relay.routing.document import (
    ROUTING_API_VERSION,
    ROUTING_API_VERSION_CLIENTS,
    ClientScope,
    ObjectRef,
    RoutingDocument,
)
from mailflow_relay.routing.router import Client, Router

COMPLIANCE = "192.0.2.25"


def oc(name: str, recipients: str = '["*"]', extra: str = "") -> str:
    return (
        "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\n"
        f"metadata: {{name: {name}, namespace: mail}}\n"
        f"spec:\n  recipientDomains: {recipients}\n"
        f"  destination: {{smartHost: {{host: {name}.example, port: 25}}}}\n{extra}---\n"
    )


DESIGN = (
    oc("all-via-compliance")
    + oc("direct-after-compliance", extra=f"  clients: {{networks: [{COMPLIANCE}/32]}}\n")
    + oc(
        "partner",
        '["fabrikam.example"]',
        extra=f"  clients: {{networks: ['{COMPLIANCE}/32'], users: [compliance]}}\n",
    )
)


def compile_text(tmp_path: Path, text: str) -> tuple[RoutingDocument, list[str]]:
    (tmp_path / "m.yaml").write_text(text)
    result = check_manifests(load_manifests([str(tmp_path)]), default_namespace="mail")
    assert result.compiled is not None
    return result.compiled.document, [p.format() for p in result.problems]


def chosen(router: Router, recipient: str, client: Client | None) -> str:
    decision = router.route_for(recipient, "alice@contoso.com", client)
    assert decision.connector is not None
    return decision.connector.ref.name


def test_mail_back_from_the_compliance_server_goes_direct_and_cannot_loop(
    tmp_path: Path,
) -> None:
    document, problems = compile_text(tmp_path, DESIGN)
    assert problems == []
    router = Router(document)
    host = Client("10.20.0.7")
    compliance = Client(COMPLIANCE)
    assert chosen(router, "bob@example.org", host) == "all-via-compliance"
    assert chosen(router, "bob@example.org", compliance) == "direct-after-compliance"
    # Partner mail passes compliance first too: the partner connector is scoped to it.
    assert chosen(router, "eve@fabrikam.example", host) == "all-via-compliance"
    assert chosen(router, "eve@fabrikam.example", compliance) == "partner"
    assert chosen(router, "eve@fabrikam.example", Client("10.0.0.9", "compliance")) == "partner"
    # A bounce (no client) never matches a client scope.
    assert chosen(router, "bob@example.org", None) == "all-via-compliance"


def test_the_client_scope_is_in_the_reason_and_the_candidates(tmp_path: Path) -> None:
    document, _ = compile_text(tmp_path, DESIGN)
    router = Router(document)
    decision = router.route_for("bob@example.org", "", Client(COMPLIANCE))
    assert "scoped to clients 192.0.2.25/32" in decision.reason
    outcomes = {
        c.connector.name: c.outcome for c in router.candidates_for("bob@example.org", "", None)
    }
    assert outcomes["direct-after-compliance"] == (
        "scoped to clients 192.0.2.25/32: no client given"
    )
    assert outcomes["all-via-compliance"].startswith("chosen: ")


def test_a_client_scoped_document_round_trips_and_says_routing_v2(tmp_path: Path) -> None:
    document, _ = compile_text(tmp_path, DESIGN)
    text = document.to_json()
    assert f'"apiVersion":"{ROUTING_API_VERSION_CLIENTS}"' in text
    again = RoutingDocument.from_json(text)
    assert again == document
    scoped = again.connector(ObjectRef("mail", "partner"))
    assert scoped is not None
    assert scoped.clients is not None
    assert scoped.clients.users == ("compliance",)


def test_a_document_without_client_scopes_keeps_v1_and_its_bytes(tmp_path: Path) -> None:
    document, _ = compile_text(tmp_path, oc("all-via-compliance"))
    text = document.to_json()
    assert f'"apiVersion":"{ROUTING_API_VERSION}"' in text
    assert '"clients"' not in text


def test_a_relay_that_knows_only_v1_refuses_a_client_scoped_document(tmp_path: Path) -> None:
    # An older relay would ignore "clients" and route the scoped connector for everyone.
    document, _ = compile_text(tmp_path, DESIGN)
    assert document.to_json().count(ROUTING_API_VERSION_CLIENTS) == 1
    with pytest.raises(RoutingDocumentError):
        RoutingDocument.from_json(
            document.to_json().replace(ROUTING_API_VERSION_CLIENTS, "mailflow.dev/routing/v9")
        )


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ("{}", "name at least one network or user"),
        ("{networks: []}", "name at least one network or user"),
        ("{networks: [192.0.2.1/33]}", "spec.clients.networks[0]: Invalid value"),
        ("{networks: [192.0.2.1/24]}", "has host bits set"),
        ("{networks: [0.0.0.0/0]}", "every address; omit clients"),
        ("{networks: [compliance.contoso.com]}", "spec.clients.networks[0]"),
    ],
)
def test_a_client_scope_that_cannot_work_is_refused(
    tmp_path: Path, clients: str, message: str
) -> None:
    _, problems = compile_text(tmp_path, oc("c", extra=f"  clients: {clients}\n"))
    assert any(message in p for p in problems), problems


def test_the_same_pattern_for_the_same_clients_conflicts_but_other_clients_do_not(
    tmp_path: Path,
) -> None:
    scoped = f"  clients: {{networks: [{COMPLIANCE}/32]}}\n"
    _, problems = compile_text(tmp_path, oc("a", extra=scoped) + oc("b", extra=scoped))
    assert len(problems) == 2
    assert all("from clients 192.0.2.25/32" in p and "Conflicted" in p for p in problems)
    other = "  clients: {networks: [192.0.2.26/32]}\n"
    _, problems = compile_text(tmp_path, oc("a", extra=scoped) + oc("b", extra=other) + oc("c"))
    assert problems == []


def test_a_client_scope_matches_networks_and_users() -> None:
    import ipaddress

    scope = ClientScope((ipaddress.ip_network("2001:db8::/64"),), ("svc",))
    assert scope.matches("2001:db8::5", None)
    assert not scope.matches("2001:db9::5", None)
    assert scope.matches(None, "svc")
    assert not scope.matches("192.0.2.1", "other")
    assert not scope.matches("not an address", None)


def test_explain_says_who_submitted_and_which_client_scope_chose(tmp_path: Path) -> None:
    from mailflow_compiler.explain import explain_json, explain_text

    document, _ = compile_text(tmp_path, DESIGN)
    text = explain_text(document, "alice@contoso.com", ["bob@example.org"], Client(COMPLIANCE))
    assert "(from alice@contoso.com, submitted by 192.0.2.25)" in text
    assert "connector    mail/direct-after-compliance" in text
    assert "clients      only mail submitted by 192.0.2.25/32" in text
    assert "mail/all-via-compliance (catch-all '*')" in text
    body = explain_json(document, "alice@contoso.com", ["bob@example.org"], None)
    recipients = body["recipients"]
    assert isinstance(recipients, list)
    (decision,) = recipients
    assert decision["connector"] == "mail/all-via-compliance"
    assert decision["clients"] is None
