"""The validating webhook, served by kopf over TLS, asked with real AdmissionReview requests."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import uuid
from typing import Any

from kube_emulator import Cluster, OperatorThread, cluster
from mailflow_compiler.checks import check_manifests
from mailflow_compiler.manifests import Manifest
from mailflow_operator.reconcile import ReconcileSettings
from mailflow_operator.runner import OperatorConfig, WebhookConfig
from mailflow_operator.selectors import LabelSelector
from mailflow_relay.routing.document import ObjectRef
from pki import Pki
from support import until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connector(name: str, domains: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": name, "namespace": "mail"},
        "spec": {"recipientDomains": domains, **spec},
    }


def review(body: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "mailflow.dev", "version": "v1alpha1", "kind": body["kind"]},
            "resource": {
                "group": "mailflow.dev",
                "version": "v1alpha1",
                "resource": "outboundconnectors",
            },
            "requestKind": {"group": "mailflow.dev", "version": "v1alpha1", "kind": body["kind"]},
            "name": body["metadata"]["name"],
            "namespace": body["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": body,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


async def post(port: int, path: str, payload: dict[str, Any], ca_file: str) -> dict[str, Any]:
    """POST over TLS, verifying the webhook's certificate as the API server would."""
    context = ssl.create_default_context(cafile=ca_file)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    data = json.dumps(payload).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return dict(json.loads(body))


def expected_problems(bodies: list[dict[str, Any]], name: str) -> str:
    """What `mailflow validate` says about the object ``name`` among ``bodies``."""
    manifests = [Manifest("cluster.yaml", i + 1, 1, b) for i, b in enumerate(bodies)]
    result = check_manifests(manifests)
    return "\n".join(f"{p.path}: {p.message}" for p in result.problems if p.name == name)


def test_webhook_refuses_conflicts_with_the_messages_of_mailflow_validate(pki: Pki) -> None:
    ca = pki.ca("Webhook CA")
    leaf = ca.issue("localhost")
    port = free_port()

    async def scenario(api: Cluster) -> None:
        existing = await api.apply(connector("first", ["*"]))
        config = OperatorConfig(
            reconcile=ReconcileSettings(
                namespaces=("mail",),
                routing_secret=ObjectRef("mailflow-system", "routing"),
                relay_selector=LabelSelector.parse("app=relay"),
                probe_interval=0,
                debounce=0.05,
            ),
            webhook=WebhookConfig(
                port=port,
                addr="127.0.0.1",
                host="localhost",
                cert_file=leaf.cert_file,
                key_file=leaf.key_file,
            ),
            api_server=api.url,
        )
        async with OperatorThread(config) as operator:
            await until(lambda: operator.passes >= 1)
            path = "/validate-outboundconnectors"
            ca_file = str(ca.issued.cert_file)

            fine = await post(port, path, review(connector("contoso", ["contoso.com"])), ca_file)
            assert fine["response"]["allowed"] is True

            clash = connector("second", ["*.*"])
            denied = await post(port, path, review(clash), ca_file)
            assert denied["response"]["allowed"] is False
            message = denied["response"]["status"]["message"]
            assert message == expected_problems([existing, clash], "second")
            assert "OutboundConnector mail/first" in message

            # Credentials with a TLS mode that verifies nothing: refused over the real
            # AdmissionReview path too (a cluster's older CRD may lack the CEL rule).
            leaky = connector("leaky", ["leaky.example"], auth={"secretRef": {"name": "creds"}})
            refused = (await post(port, path, review(leaky), ca_file))["response"]
            assert refused["allowed"] is False
            assert refused["status"]["message"].startswith(
                "spec.auth: Invalid value: Opportunistic: auth sends credentials only over a "
                "verified TLS session"
            )

            # A profile that does not exist (yet) is fine unless strict mode is on.
            pooled = connector(
                "pooled", ["fabrikam.example"], destination={"profileRef": {"name": "nope"}}
            )
            allowed = await post(port, path, review(pooled), ca_file)
            assert allowed["response"]["allowed"] is True

            # An update of the existing connector is not a conflict with itself.
            again = connector("first", ["*"], description="now with a description")
            assert (await post(port, path, review(again, "UPDATE"), ca_file))["response"][
                "allowed"
            ] is True

    async def main() -> None:
        async with cluster() as api:
            await scenario(api)

    asyncio.run(main())


def test_a_conflict_with_a_connector_of_another_namespace_is_refused_too() -> None:
    from mailflow_operator.store import Store
    from mailflow_operator.webhook import admission_findings
    from mailflow_relay.routing.document import ObjectRef

    def body(namespace: str, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "mailflow.dev/v1alpha1",
            "kind": "OutboundConnector",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "creationTimestamp": "2026-01-02T00:00:00Z",
            },
            "spec": {"recipientDomains": ["contoso.com"]},
        }

    store = Store()
    older = body("team-a", "a")
    older["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    store.connectors[ObjectRef("team-a", "a")] = older
    findings = admission_findings(store, "OutboundConnector", body("team-b", "b"))
    assert [f.reason for f in findings] == ["Conflicted"]
    assert "team-a/a" in findings[0].message


def test_auth_with_an_unverified_tls_mode_is_refused_even_where_the_crd_lacks_the_rule() -> None:
    # Helm never upgrades CRDs: a cluster may still run one without the auth CEL rule, and
    # then only the webhook stands between the password and an unverified server.
    from mailflow_operator.store import Store
    from mailflow_operator.webhook import admission_findings, denial_message

    leaky = connector("leaky", ["*"], auth={"secretRef": {"name": "creds"}})
    findings = admission_findings(Store(), "OutboundConnector", leaky)
    assert [(f.path, f.condition) for f in findings] == [("spec.auth", "Accepted")]
    assert denial_message(findings) == (
        "spec.auth: Invalid value: Opportunistic: auth sends credentials only over a verified "
        "TLS session: set tls.mode to TrustedCA, DomainMatch or NameMatch, or SelfSigned with "
        "pinnedFingerprints"
    )
    pinned = connector(
        "pinned",
        ["*"],
        auth={"secretRef": {"name": "creds"}},
        tls={"mode": "SelfSigned", "pinnedFingerprints": ["sha256/" + "a" * 64]},
    )
    assert admission_findings(Store(), "OutboundConnector", pinned) == []


def dkim_body(name: str, selector: str, created: str | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": "mail"}
    if created is not None:
        metadata["creationTimestamp"] = created
    return {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "DkimKey",
        "metadata": metadata,
        "spec": {
            "domain": "contoso.com",
            "selector": selector,
            "privateKey": {"secretRef": {"name": f"{name}-key"}},
            **spec,
        },
    }


def test_a_second_dkim_key_for_a_claimed_selector_is_refused_but_not_the_one_that_signs() -> None:
    from mailflow_operator.store import Store
    from mailflow_operator.webhook import admission_findings

    store = Store()
    store.dkim_keys[ObjectRef("mail", "first")] = dkim_body("first", "s1", "2026-01-01T00:00:00Z")
    newcomer = admission_findings(store, "DkimKey", dkim_body("second", "s1"))
    assert [(f.path, f.reason) for f in newcomer] == [("spec.selector", "Conflicted")]
    assert "mail/first is older" in newcomer[0].message
    # Another selector, or the same one disabled, signs nothing twice: admitted.
    assert admission_findings(store, "DkimKey", dkim_body("second", "s2")) == []
    assert admission_findings(store, "DkimKey", dkim_body("second", "s1", enabled=False)) == []
    # With the newer key stored (applied while the webhook was down), an update of the key
    # that keeps signing must still go through: otherwise it could not even be disabled.
    store.dkim_keys[ObjectRef("mail", "second")] = dkim_body("second", "s1", "2026-02-01T00:00:00Z")
    update = dkim_body("first", "s1", "2026-01-01T00:00:00Z", subdomains=True)
    assert admission_findings(store, "DkimKey", update) == []
    again = admission_findings(store, "DkimKey", dkim_body("second", "s1", "2026-02-01T00:00:00Z"))
    assert [f.reason for f in again] == ["Conflicted"]


def test_a_dkim_key_is_refused_for_its_headers_and_for_a_missing_secret_only_when_strict() -> None:
    from mailflow_operator.store import Store
    from mailflow_operator.webhook import admission_findings

    store = Store()
    bad = admission_findings(store, "DkimKey", dkim_body("k", "s1", signedHeaders=["From", "Bcc"]))
    assert [(f.path, f.reason) for f in bad] == [("spec.signedHeaders[1]", "InvalidValue")]
    assert admission_findings(store, "DkimKey", dkim_body("k", "s1")) == []
    strict = admission_findings(store, "DkimKey", dkim_body("k", "s1"), strict=True)
    assert [f.path for f in strict] == ["spec.privateKey.secretRef.name"]
