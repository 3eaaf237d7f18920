"""The operator's validating webhook, called by the real API server.

The operator serves HTTPS on 127.0.0.1 with a certificate made here; a
ValidatingWebhookConfiguration points the API server at ``https://127.0.0.1:PORT/...`` with
that CA as ``caBundle`` (the chart points it at a Service instead; both reach the same
handler). ``kubectl apply`` of a conflicting connector is refused with the webhook's
message; with the operator down, ``failurePolicy: Fail`` refuses every change and ``Ignore``
lets it through, as docs/install.md says; deletions are never blocked.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from controlplane import LOOPBACK, CertificateAuthority, ControlPlane, free_port
from kube.cluster import GROUP, VERSION, create_namespace, wait_for

pytestmark = pytest.mark.slow

NAMESPACE = "whmail"
WEBHOOK = "mailflow-test-webhook"


class WebhookOperator:
    def __init__(self, plane: ControlPlane, folder: Path) -> None:
        self.plane = plane
        self.port = free_port()
        ca = CertificateAuthority(folder, "Webhook CA")
        self.ca_bundle = base64.b64encode(ca.pem).decode()
        pair = ca.issue("webhook", "mailflow-webhook", server=True, ips=[LOOPBACK])
        mailflow = Path(sys.executable).parent / "mailflow"
        self.argv = [
            str(mailflow), "operator",
            "--namespace", NAMESPACE,
            "--routing-secret", f"{NAMESPACE}/mailflow-routing",
            "--relay-selector", "app.kubernetes.io/component=relay",
            "--probe-interval", "0",
            "--webhook-port", str(self.port),
            "--webhook-addr", LOOPBACK,
            "--webhook-cert", str(pair.cert_file),
            "--webhook-key", str(pair.key_file),
        ]  # fmt: skip
        self.env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
        self.log_file = plane.logs / "webhook-operator.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for("the webhook port", self.listening, timeout=60)

    def listening(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log_file.read_text()[-3000:]
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def hook(port: int, ca_bundle: str, failure_policy: str, plural: str) -> dict[str, Any]:
    return {
        "name": f"{plural}.validate.mailflow.dev",
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": failure_policy,
        "timeoutSeconds": 5,
        "clientConfig": {
            "url": f"https://{LOOPBACK}:{port}/validate-{plural}",
            "caBundle": ca_bundle,
        },
        "rules": [
            {
                "apiGroups": [GROUP],
                "apiVersions": [VERSION],
                "resources": [plural],
                "operations": ["CREATE", "UPDATE"],
                "scope": "Namespaced",
            }
        ],
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
    }


def configuration(port: int, ca_bundle: str, failure_policy: str) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK},
        "webhooks": [
            hook(port, ca_bundle, failure_policy, plural)
            for plural in ("outboundconnectors", "multismtpprofiles", "dkimkeys")
        ],
    }


def kubectl(
    plane: ControlPlane, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(plane.binaries.path("kubectl")), "--kubeconfig", str(plane.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def connector(name: str, domain: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OutboundConnector",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"recipientDomains": [domain]},
        }
    )


@pytest.fixture(scope="module")
def webhook(
    control_plane: ControlPlane,
    admin: kubernetes.client.ApiClient,
    crds: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WebhookOperator]:
    create_namespace(admin, NAMESPACE, exist_ok=True)
    operator = WebhookOperator(control_plane, tmp_path_factory.mktemp("webhook"))
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()
        # Never leave a webhook behind for the suites that follow.
        kubectl(control_plane, "delete", "validatingwebhookconfiguration", WEBHOOK,
                "--ignore-not-found")  # fmt: skip


def set_policy(plane: ControlPlane, operator: WebhookOperator, policy: str) -> None:
    body = configuration(operator.port, operator.ca_bundle, policy)
    result = kubectl(plane, "apply", "-f", "-", stdin=yaml.safe_dump(body))
    assert result.returncode == 0, result.stderr


def apply_and_wait_observed(
    plane: ControlPlane, admin: kubernetes.client.ApiClient, manifest: str
) -> None:
    """Apply one object and wait until the operator has reconciled it (it is in the webhook's
    view from then on)."""
    result = kubectl(plane, "apply", "-f", "-", stdin=manifest)
    assert result.returncode == 0, result.stderr
    body = yaml.safe_load(manifest)
    plural = {"OutboundConnector": "outboundconnectors", "DkimKey": "dkimkeys"}[body["kind"]]
    name = body["metadata"]["name"]
    custom = kubernetes.client.CustomObjectsApi(admin)

    def observed() -> bool:
        found: Any = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, name)
        return bool((found.get("status") or {}).get("observedGeneration") == 1)

    wait_for(f"the operator to know {plural}/{name}", observed, timeout=90)


def test_the_api_server_refuses_a_conflicting_connector_with_the_webhooks_message(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, webhook: WebhookOperator
) -> None:
    set_policy(control_plane, webhook, "Fail")
    apply_and_wait_observed(control_plane, admin, connector("first", "hook.example"))
    result = kubectl(control_plane, "apply", "-f", "-", stdin=connector("second", "hook.example"))
    assert result.returncode != 0
    assert 'admission webhook "outboundconnectors.validate.mailflow.dev" denied the request' in (
        result.stderr
    ), result.stderr
    assert "spec.recipientDomains[0]: Conflicted" in result.stderr, result.stderr
    # A change that conflicts with nothing goes through.
    result = kubectl(control_plane, "apply", "-f", "-", stdin=connector("third", "other.example"))
    assert result.returncode == 0, result.stderr


def dkim_key(name: str, selector: str, **spec: Any) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DkimKey",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "domain": "hook.example",
                "selector": selector,
                "privateKey": {"secretRef": {"name": f"{name}-key"}},
                **spec,
            },
        }
    )


def test_the_api_server_refuses_a_second_dkim_key_for_a_claimed_selector(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, webhook: WebhookOperator
) -> None:
    set_policy(control_plane, webhook, "Fail")
    apply_and_wait_observed(control_plane, admin, dkim_key("k1", "s1"))
    result = kubectl(control_plane, "apply", "-f", "-", stdin=dkim_key("k2", "s1"))
    assert result.returncode != 0
    assert 'admission webhook "dkimkeys.validate.mailflow.dev" denied the request' in (
        result.stderr
    ), result.stderr
    assert 'spec.selector: Conflicted: selector "s1" of domain "hook.example"' in result.stderr
    # Its Secret does not exist yet: not refused (GitOps applies in any order); nor is a
    # second, disabled key, nor a change to the key that signs.
    for body in (
        dkim_key("k3", "s2"),
        dkim_key("k2", "s1", enabled=False),
        dkim_key("k1", "s1", subdomains=True),
    ):
        result = kubectl(control_plane, "apply", "-f", "-", stdin=body)
        assert result.returncode == 0, result.stderr


def test_with_the_operator_down_the_failure_policy_decides(
    control_plane: ControlPlane, webhook: WebhookOperator
) -> None:
    webhook.stop()
    try:
        set_policy(control_plane, webhook, "Fail")
        result = kubectl(control_plane, "apply", "-f", "-", stdin=connector("down", "down.example"))
        assert result.returncode != 0
        assert "failed calling webhook" in result.stderr, result.stderr
        # Deletions are never blocked (the webhook does not ask for DELETE).
        result = kubectl(control_plane, "delete", "outboundconnector", "third", "-n", NAMESPACE)
        assert result.returncode == 0, result.stderr
        set_policy(control_plane, webhook, "Ignore")
        result = kubectl(control_plane, "apply", "-f", "-", stdin=connector("down", "down.example"))
        assert result.returncode == 0, result.stderr
    finally:
        webhook.start()
