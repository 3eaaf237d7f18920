"""Pause and throttles (`spec.paused`, `spec.throttle`, profile servers' `paused`/`throttle`):
through the chain a manifest takes: CRD schema, compiler, routing document (JSON and back).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mailflow_compiler.checks import check_manifests
from mailflow_compiler.explain import explain_text
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.errors import RoutingDocumentError
from mailflow_relay.routing.document import (
    DomainThrottle,
    ProfilePool,
    RoutingDocument,
    ServerAddress,
    ServerLimits,
    Throttle,
)

CONNECTOR = """\
apiVersion: mailflow.dev/v1alpha1
kind: OutboundConnector
metadata: {name: partner, namespace: mail}
spec:
  recipientDomains: ["*"]
  destination: {profileRef: {name: gateways}}
%s
---
apiVersion: mailflow.dev/v1alpha1
kind: MultiSmtpProfile
metadata: {name: gateways, namespace: mail}
spec:
  servers:
    - {host: gw1.example, port: 25, throttle: {maxConnections: 2}}
    - {host: gw2.example, paused: true}
    - {host: gw3.example}
"""

LIMITS = """\
  paused: true
  throttle:
    maxConnections: 10
    messagesPerMinute: 600
    recipientsPerMessage: 50
    domains:
      - {domain: bigmail.example, messagesPerMinute: 60}
      - {domain: bücher.example, recipientsPerMessage: 5}
"""


def compile_text(tmp_path: Path, text: str) -> tuple[RoutingDocument | None, list[str]]:
    (tmp_path / "m.yaml").write_text(text)
    result = check_manifests(load_manifests([str(tmp_path)]), default_namespace="mail")
    document = None if result.compiled is None else result.compiled.document
    return document, [p.format() for p in result.problems]


def test_the_fields_reach_the_routing_document_and_survive_json(tmp_path: Path) -> None:
    document, problems = compile_text(tmp_path, CONNECTOR % LIMITS)
    assert problems == []
    assert document is not None
    (connector,) = document.connectors
    assert connector.paused
    assert connector.throttle == Throttle(10, 600, 50)
    assert connector.domain_throttles == (
        DomainThrottle("bigmail.example", Throttle(messages_per_minute=60)),
        DomainThrottle("xn--bcher-kva.example", Throttle(recipients_per_message=5)),
    )
    pool = connector.destination
    assert isinstance(pool, ProfilePool)
    assert pool.server_limits == (
        ServerLimits(ServerAddress("gw1.example", 25), throttle=Throttle(max_connections=2)),
        ServerLimits(ServerAddress("gw2.example", 25), paused=True),
    )
    fleet = replace(document, fleet_relays=3)
    again = RoutingDocument.from_json(fleet.to_json())
    assert again == fleet
    assert again.checksum != document.checksum


def test_a_connector_without_them_keeps_its_document_bytes(tmp_path: Path) -> None:
    document, problems = compile_text(tmp_path, CONNECTOR % "")
    assert problems == []
    assert document is not None
    raw = json.loads(document.to_json())
    assert "fleet" not in raw
    assert not {"paused", "throttle", "domainThrottles"} & set(raw["connectors"][0])
    (connector,) = document.connectors
    assert not connector.paused
    assert connector.throttle is None


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("  throttle: {messagesPerMinute: 0}\n", "spec.throttle.messagesPerMinute"),
        ("  throttle: {maxConnections: 20000}\n", "spec.throttle.maxConnections"),
        ("  throttle: {domains: [{domain: '*.example', messagesPerMinute: 1}]}\n", "domain"),
        ("  throttle: {rate: 5}\n", "spec.throttle"),
        ("  paused: maybe\n", "spec.paused"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path: Path, extra: str, path: str) -> None:
    _, problems = compile_text(tmp_path, CONNECTOR % extra)
    assert problems, extra
    assert any(path in p for p in problems), problems


def test_a_domain_listed_twice_is_refused(tmp_path: Path) -> None:
    twice = "  throttle:\n    domains:\n      - {domain: a.example}\n      - {domain: A.example}\n"
    _, problems = compile_text(tmp_path, CONNECTOR % twice)
    assert problems


def test_the_relay_refuses_a_document_with_a_bad_throttle() -> None:
    document = RoutingDocument(generation=1, connectors=(), fleet_relays=2)
    text = document.to_json().replace('"relays":2', '"relays":0')
    with pytest.raises(RoutingDocumentError, match=r"fleet\.relays"):
        RoutingDocument.from_json(text)


def test_explain_says_a_route_is_paused_and_throttled(tmp_path: Path) -> None:
    document, _ = compile_text(tmp_path, CONNECTOR % LIMITS)
    assert document is not None
    text = explain_text(document, "a@contoso.example", ["x@bigmail.example"])
    assert "PAUSED       spec.paused" in text
    assert "throttle     600 messages/min, 10 connections, 50 recipients/message" in text
    assert "throttle     bigmail.example: 60 messages/min" in text
    assert "throttle     server gw2.example:25: paused" in text
    other = explain_text(document, "a@contoso.example", ["x@small.example"])
    assert "bigmail.example" not in other
