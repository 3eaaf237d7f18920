"""``smartHost.implicitTls``: TLS on connect, on by default for port 465 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.compiler import compile_routing
from mailflow_compiler.manifests import RawConnector, RawProfile, load_manifests
from mailflow_relay.routing.document import ProfilePool, RoutingDocument, SmartHost


def connector(smart_host: dict[str, object]) -> RawConnector:
    body = {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": "smtps", "namespace": "mail"},
        "spec": {"recipientDomains": ["contoso.com"], "destination": {"smartHost": smart_host}},
    }
    return cast(RawConnector, body)


def smart_host_of(document: RoutingDocument) -> SmartHost:
    (compiled,) = document.connectors
    assert isinstance(compiled.destination, SmartHost)
    return compiled.destination


@pytest.mark.parametrize(
    ("smart_host", "implicit"),
    [
        ({"host": "smtp.contoso.com", "port": 465}, True),
        ({"host": "smtp.contoso.com", "port": 465, "implicitTls": False}, False),
        ({"host": "smtp.contoso.com", "port": 587}, False),
        ({"host": "smtp.contoso.com"}, False),
        ({"host": "smtp.contoso.com", "port": 2465, "implicitTls": True}, True),
    ],
)
def test_implicit_tls_defaults_to_port_465_and_survives_the_document(
    smart_host: dict[str, object], implicit: bool
) -> None:
    document = compile_routing([connector(smart_host)], [], {}).document
    assert smart_host_of(document).implicit_tls is implicit
    reread = RoutingDocument.from_json(document.to_json())
    assert smart_host_of(reread).implicit_tls is implicit
    assert ("implicit TLS" in smart_host_of(reread).describe()) is implicit


@pytest.mark.parametrize(("port", "implicit"), [(465, True), (25, False)])
def test_a_document_from_an_older_operator_gets_the_same_default(port: int, implicit: bool) -> None:
    document = compile_routing([connector({"host": "smtp.contoso.com", "port": port})], [], {})
    raw = json.loads(document.document.to_json())
    for body in raw["connectors"]:
        del body["destination"]["implicitTls"]
    assert smart_host_of(RoutingDocument.from_dict(raw)).implicit_tls is implicit


def test_the_schema_takes_a_boolean_only(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\n"
        "metadata: {name: smtps, namespace: mail}\n"
        "spec:\n  recipientDomains: [contoso.com]\n"
        "  destination: {smartHost: {host: smtp.contoso.com, port: 465, implicitTls: maybe}}\n"
    )
    problems = check_manifests(load_manifests([str(tmp_path)])).problems
    assert [p.path for p in problems] == ["spec.destination.smartHost.implicitTls"]


def profile(servers: list[dict[str, object]]) -> dict[str, object]:
    return {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "MultiSmtpProfile",
        "metadata": {"name": "pool", "namespace": "mail"},
        "spec": {"servers": servers},
    }


def test_a_profile_server_on_465_gets_implicit_tls_too() -> None:
    servers = [
        {"host": "smtps.contoso.com", "port": 465},
        {"host": "smtp.contoso.com", "port": 587},
        {"host": "odd.contoso.com", "port": 465, "implicitTls": False},
    ]
    body = connector({"host": "unused"})
    body["spec"]["destination"] = {"profileRef": {"name": "pool"}}
    document = compile_routing([body], [cast(RawProfile, profile(servers))], {}).document
    for reread in (document, RoutingDocument.from_json(document.to_json())):
        (compiled,) = reread.connectors
        assert isinstance(compiled.destination, ProfilePool)
        assert [s.implicit_tls for s in compiled.destination.servers] == [True, False, False]
