"""The relay in cluster mode on the real API server, as the chart's relay ServiceAccount.

`helm install` creates the relay's ServiceAccount, its Role (the routing Secret by name, its
own pods by name) and the empty routing Secret. The operator (admin here: its own RBAC is
proven in test_real_operator) compiles a connector to a loopback smtp-sink into that Secret.
The relay runs as a local process with the StatefulSet's arguments (listeners on free
127.0.0.1 ports, the spool in a temporary folder, no hand-off address) and a TokenRequest
token of its ServiceAccount: it reads the routing Secret, annotates the Pod object
``mailflow-relay-0`` (created here; no kubelet runs it) with the generation it serves, and
mail through it follows a change of the connector to a second sink. The relay never gets a
403, and every verb its Role grants is one it used.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from controlplane import LOOPBACK, ControlPlane, free_port
from helm.chart import CHART, HELM, RELEASE
from kube.cluster import GROUP, VERSION, create_namespace, wait_for
from peers import SmtpSink, tool_path

pytestmark = pytest.mark.slow

NAMESPACE = "rlmail"
RELAY_ACCOUNT = "mailflow-relay"
POD = "mailflow-relay-0"
ROUTING_SECRET = "mailflow-routing"
GENERATION = "mailflow.dev/config-generation"
# Flags whose value names a cluster address (DNS names of Services): never dialled here.
CLUSTER_ONLY = {"--handoff", "--hostname"}


def helm(plane: ControlPlane, *args: str) -> str:
    result = subprocess.run(
        [str(HELM), "--kubeconfig", str(plane.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@dataclass
class Relay:
    argv: list[str]
    env: dict[str, str]
    port: int
    log_file: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def relay_argv(statefulset: dict[str, Any], spool: Path, port: int) -> list[str]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args: list[str] = []
    given = iter(container["args"])
    for arg in given:
        if arg in CLUSTER_ONLY:
            next(given)
            continue
        args.append(arg)
    for flag, value in (
        ("--listen", f"{LOOPBACK}:{port}"),
        ("--http", f"{LOOPBACK}:{free_port()}"),
        ("--spool", str(spool)),
    ):
        args[args.index(flag) + 1] = value
    mailflow = Path(sys.executable).parent / "mailflow"
    return [
        str(mailflow),
        *args,
        "--hostname",
        "relay-0.mailflow.test",
        "--config-poll",
        "0.5",
        "--retry-initial",
        "1",
    ]


def token(admin: kubernetes.client.ApiClient, account: str) -> str:
    request = kubernetes.client.AuthenticationV1TokenRequest(
        spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    response = kubernetes.client.CoreV1Api(admin).create_namespaced_service_account_token(
        account, NAMESPACE, request
    )
    assert response.status is not None
    return str(response.status.token)


def connector(port: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OutboundConnector",
        "metadata": {"name": "to-sink", "namespace": NAMESPACE},
        "spec": {
            "recipientDomains": ["sink.example"],
            "destination": {"smartHost": {"host": LOOPBACK, "port": port}},
            "tls": {"mode": "Opportunistic"},
        },
    }


@dataclass
class Setup:
    release: list[dict[str, Any]]
    relay: Relay
    operator: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def cluster_relay(
    control_plane: ControlPlane,
    admin: kubernetes.client.ApiClient,
    crds: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    if not HELM.exists():
        pytest.skip(f"{HELM} is missing: run `bash scripts/install-helm.sh`")
    if tool_path("smtp-sink") is None:
        pytest.skip("smtp-sink (Postfix) is missing: run scripts/install-debian-packages.sh")
    folder = tmp_path_factory.mktemp("relay")
    create_namespace(admin, NAMESPACE, exist_ok=True)
    helm(control_plane, "install", RELEASE, str(CHART), "--namespace", NAMESPACE)
    manifest = helm(control_plane, "get", "manifest", RELEASE, "--namespace", NAMESPACE)
    release = [d for d in yaml.safe_load_all(manifest) if d]
    (statefulset,) = [o for o in release if o["kind"] == "StatefulSet"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    core = kubernetes.client.CoreV1Api(admin)
    wait_for(
        "the default ServiceAccount (the controller manager makes it)",
        lambda: core.read_namespaced_service_account("default", NAMESPACE),
    )
    core.create_namespaced_pod(
        NAMESPACE,
        kubernetes.client.V1Pod(
            metadata=kubernetes.client.V1ObjectMeta(name=POD, labels=labels),
            spec=kubernetes.client.V1PodSpec(
                service_account_name=RELAY_ACCOUNT,
                automount_service_account_token=False,
                containers=[kubernetes.client.V1Container(name="relay", image="mailflow-relay")],
            ),
        ),
    )
    selector = ",".join(
        f"{k}={v}"
        for k, v in labels.items()
        if k.startswith("app.kubernetes.io/") and k != "app.kubernetes.io/version"
    )
    mailflow = Path(sys.executable).parent / "mailflow"
    with (control_plane.logs / "relay-suite-operator.log").open("ab") as log:
        operator = subprocess.Popen(
            [
                str(mailflow), "operator", "--namespace", NAMESPACE,
                "--routing-secret", f"{NAMESPACE}/{ROUTING_SECRET}",
                "--relay-selector", selector, "--probe-interval", "0",
            ],
            env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    kubeconfig = control_plane.kubeconfig_for_token(
        folder / "relay.kubeconfig", token(admin, RELAY_ACCOUNT), NAMESPACE
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(kubeconfig), POD_NAME=POD, POD_NAMESPACE=NAMESPACE)
    spool = folder / "spool"
    spool.mkdir()
    port = free_port()
    relay = Relay(relay_argv(statefulset, spool, port), env, port, control_plane.logs / "relay.log")
    try:
        yield Setup(release, relay, operator)
    finally:
        relay.stop()
        operator.terminate()
        operator.wait(timeout=30)
        helm(control_plane, "uninstall", RELEASE, "--namespace", NAMESPACE)


def routing_generation(admin: kubernetes.client.ApiClient) -> int:
    secret = kubernetes.client.CoreV1Api(admin).read_namespaced_secret(ROUTING_SECRET, NAMESPACE)
    assert secret.metadata is not None
    return int((secret.metadata.annotations or {}).get("mailflow.dev/generation", "0"))


def served_generation(admin: kubernetes.client.ApiClient) -> int:
    pod = kubernetes.client.CoreV1Api(admin).read_namespaced_pod(POD, NAMESPACE)
    assert pod.metadata is not None
    return int((pod.metadata.annotations or {}).get(GENERATION, "0"))


def send(port: int, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "alice@contoso.com"
    message["To"] = "bob@sink.example"
    message["Subject"] = subject
    message.set_content("through the relay in cluster mode\n")
    with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
        client.send_message(message)


def test_the_relay_follows_the_routing_secret_and_annotates_its_pod(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, cluster_relay: Setup
) -> None:
    custom = kubernetes.client.CustomObjectsApi(admin)
    with SmtpSink() as first, SmtpSink() as second:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "outboundconnectors", connector(first.port)
        )
        wait_for("the routing document", lambda: routing_generation(admin) >= 1)
        relay = cluster_relay.relay
        relay.start()
        generation = routing_generation(admin)
        wait_for(
            "the relay to annotate its pod",
            lambda: served_generation(admin) >= generation,
            timeout=60,
        )
        send(relay.port, "first")
        (message,) = first.wait_for(1, timeout=60)
        assert "bob@sink.example" in message.text

        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "outboundconnectors", "to-sink",
            {"spec": {"destination": {"smartHost": {"host": LOOPBACK, "port": second.port}}}},
        )  # fmt: skip
        wait_for("a new routing generation", lambda: routing_generation(admin) > generation)
        changed = routing_generation(admin)
        wait_for(
            "the relay to serve the new generation",
            lambda: served_generation(admin) >= changed,
            timeout=60,
        )
        send(relay.port, "second")
        second.wait_for(1, timeout=60)
        assert len(first.messages()) == 1
    # The client's ApiException reads "(403)" and "Forbidden"; a bare "403" can be part of a
    # queue id or a checksum.
    assert "Forbidden" not in relay.log(), relay.log()[-3000:]
    assert "(403)" not in relay.log(), relay.log()[-3000:]


def test_the_relay_role_grants_only_what_the_relay_uses(
    control_plane: ControlPlane, cluster_relay: Setup
) -> None:
    user = f"system:serviceaccount:{NAMESPACE}:{RELAY_ACCOUNT}"
    used = set()
    for event in control_plane.audit_events(user):
        assert event["responseStatus"]["code"] != 403, event
        ref = event.get("objectRef") or {}
        if ref.get("resource"):
            used.add((ref["resource"], event["verb"]))
    (role,) = [
        o
        for o in cluster_relay.release
        if o["kind"] == "Role" and o["metadata"]["name"].endswith("relay")
    ]
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted - used == set(), f"granted but never used: {sorted(granted - used)}"
