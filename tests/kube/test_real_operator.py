"""The operator on the real API server, as the chart's ServiceAccount with the chart's RBAC.

`helm install` (default values) creates the ServiceAccount, Roles and RoleBindings; the
operator runs as a local process with the Deployment's own arguments (probe and metrics
ports moved to free 127.0.0.1 ports) and a token from the TokenRequest API, never as admin.
The examples reconcile into the routing Secret with the right conditions and
observedGeneration; conflicts, missing references, deletions and a restart behave as
docs/operator.md says. A 403 anywhere fails the suite (the RBAC is sufficient), and every
verb the chart grants is one the operator used (the RBAC is minimal), from the API server's
audit log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes.client.exceptions import ApiException

from controlplane import ROOT, ControlPlane, free_port
from helm.chart import CHART, HELM, RELEASE
from kube.cluster import GROUP, VERSION, create_namespace, wait_for

pytestmark = pytest.mark.slow

NAMESPACE = "opmail"
SERVICE_ACCOUNT = "mailflow-operator"
ROUTING_SECRET = "mailflow-routing"
CONNECTORS = "outboundconnectors"
FORBIDDEN = re.compile(r"\b403\b")
PROFILES = "multismtpprofiles"
DKIM_KEYS = "dkimkeys"


@dataclass
class Operator:
    plane: ControlPlane
    argv: list[str]
    env: dict[str, str]
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
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def assert_never_forbidden(self) -> None:
        forbidden = [
            line
            for line in self.log().splitlines()
            if FORBIDDEN.search(line) or "forbidden" in line.lower()
        ]
        assert forbidden == [], "the chart's RBAC is not enough:\n" + "\n".join(forbidden[:20])


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


def operator_argv(deployment: dict[str, Any]) -> list[str]:
    """The chart's operator container arguments, its listeners moved to loopback ports."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    for flag, value in (
        ("--liveness", f"http://127.0.0.1:{free_port()}/healthz"),
        ("--metrics", f"127.0.0.1:{free_port()}"),
    ):
        if flag in args:
            args[args.index(flag) + 1] = value
    mailflow = Path(sys.executable).parent / "mailflow"
    return [str(mailflow), *args, "--probe-interval", "0"]


def service_account_token(admin: kubernetes.client.ApiClient) -> str:
    request = kubernetes.client.AuthenticationV1TokenRequest(
        spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    response = kubernetes.client.CoreV1Api(admin).create_namespaced_service_account_token(
        SERVICE_ACCOUNT, NAMESPACE, request
    )
    assert response.status is not None
    return str(response.status.token)


@pytest.fixture(scope="module")
def release(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, crds: list[str]
) -> Iterator[list[dict[str, Any]]]:
    if not HELM.exists():
        pytest.skip(f"{HELM} is missing: run `bash scripts/install-helm.sh`")
    create_namespace(admin, NAMESPACE, exist_ok=True)
    helm(control_plane, "install", RELEASE, str(CHART), "--namespace", NAMESPACE)
    manifest = helm(control_plane, "get", "manifest", RELEASE, "--namespace", NAMESPACE)
    yield [d for d in yaml.safe_load_all(manifest) if d]
    helm(control_plane, "uninstall", RELEASE, "--namespace", NAMESPACE)


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane,
    admin: kubernetes.client.ApiClient,
    release: list[dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Operator]:
    folder = tmp_path_factory.mktemp("operator")
    (deployment,) = [o for o in release if o["kind"] == "Deployment"]
    kubeconfig = control_plane.kubeconfig_for_token(
        folder / "operator.kubeconfig", service_account_token(admin), NAMESPACE
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(kubeconfig), POD_NAME="mailflow-operator-0", POD_NAMESPACE=NAMESPACE)
    running = Operator(
        control_plane, operator_argv(deployment), env, control_plane.logs / "operator.log"
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()
    running.assert_never_forbidden()


def examples() -> list[dict[str, Any]]:
    objects = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            if body:
                body["metadata"]["namespace"] = NAMESPACE
                objects.append(body)
    return objects


def apply(plane: ControlPlane, *objects: dict[str, Any]) -> None:
    """`kubectl apply` as the administrator (the user, not the operator)."""
    subprocess.run(
        [str(plane.binaries.path("kubectl")), "--kubeconfig", str(plane.kubeconfig), "apply",
         "-f", "-"],
        input=yaml.safe_dump_all(objects), text=True, capture_output=True, check=True, timeout=60,
    )  # fmt: skip


def custom(admin: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(admin)


def get(admin: kubernetes.client.ApiClient, plural: str, name: str) -> dict[str, Any]:
    body: Any = custom(admin).get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, name)
    return dict(body)


def conditions(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        c["type"]: (c["status"], c.get("reason", ""))
        for c in (body.get("status") or {}).get("conditions", [])
    }


def settled(body: dict[str, Any]) -> bool:
    """The operator has reported on this generation of the object."""
    status = body.get("status") or {}
    return bool(
        status.get("observedGeneration") == body["metadata"]["generation"]
        and {"Accepted", "ResolvedRefs"} <= conditions(body).keys()
    )


def wait_settled(admin: kubernetes.client.ApiClient, plural: str, name: str) -> dict[str, Any]:
    return wait_for(
        f"{plural}/{name} to be reconciled",
        lambda: body if settled(body := get(admin, plural, name)) else None,
        timeout=90,
    )


def routing(admin: kubernetes.client.ApiClient) -> tuple[dict[str, Any], dict[str, str]]:
    secret = kubernetes.client.CoreV1Api(admin).read_namespaced_secret(ROUTING_SECRET, NAMESPACE)
    data = (secret.data or {}).get("routing.json")
    document = json.loads(base64.b64decode(data)) if data else {}
    return document, dict(secret.metadata.annotations or {}) if secret.metadata else {}


def routed_names(admin: kubernetes.client.ApiClient) -> set[str]:
    document, _ = routing(admin)
    names = set()
    for connector in document.get("connectors", []):
        ref = connector.get("ref") or connector.get("name")
        names.add(ref["name"] if isinstance(ref, dict) else str(ref).split("/")[-1])
    return names


def test_examples_reconcile_into_the_routing_secret(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    objects = examples()
    apply(control_plane, *objects)
    connectors = [o["metadata"]["name"] for o in objects if o["kind"] == "OutboundConnector"]
    profiles = [o["metadata"]["name"] for o in objects if o["kind"] == "MultiSmtpProfile"]
    for name in connectors:
        body = wait_settled(admin, CONNECTORS, name)
        found = conditions(body)
        assert found["Accepted"] == ("True", "Accepted"), (name, found)
        assert found["ResolvedRefs"][0] == "True", (name, found)
        # No relay pod is ready here: Programmed and Ready say so.
        assert found["Ready"][0] == "False", (name, found)
    for name in profiles:
        wait_settled(admin, PROFILES, name)
    wait_for(
        "every example in the routing document", lambda: routed_names(admin) >= set(connectors)
    )
    _, annotations = routing(admin)
    assert int(annotations["mailflow.dev/generation"]) >= 1
    assert annotations["mailflow.dev/checksum"]
    operator.assert_never_forbidden()


def test_kubectl_get_tells_the_truth(control_plane: ControlPlane, operator: Operator) -> None:
    """The CRD's printer columns, as the API server renders them for `kubectl get`."""
    result = subprocess.run(
        [str(control_plane.binaries.path("kubectl")), "--kubeconfig",
         str(control_plane.kubeconfig), "get", CONNECTORS, "-n", NAMESPACE],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "READY", "DESTINATION", "TLS", "RELAYS", "AGE"]
    by_name = {row.split()[0]: row.split() for row in rows}
    row = by_name["all-via-compliance"]
    assert row[1] == "False"  # no relay serves it here
    assert "compliance.contoso.com" in row[2]
    assert row[3] == "NameMatch"
    assert row[4] == "0/0"


def test_a_spec_change_is_observed_and_published(
    admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    before = wait_settled(admin, CONNECTORS, "tls-opportunistic")
    _, annotations = routing(admin)
    generation = int(annotations["mailflow.dev/generation"])
    custom(admin).patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, CONNECTORS, "tls-opportunistic",
        {"spec": {"description": "changed by the test"}},
    )  # fmt: skip
    after = wait_settled(admin, CONNECTORS, "tls-opportunistic")
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    wait_for(
        "a new routing generation",
        lambda: int(routing(admin)[1]["mailflow.dev/generation"]) > generation,
    )


def connector(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "OutboundConnector",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def accepted(admin: kubernetes.client.ApiClient, name: str) -> tuple[str, str] | None:
    return conditions(get(admin, CONNECTORS, name)).get("Accepted")


def items(admin: kubernetes.client.ApiClient, plural: str) -> list[dict[str, Any]]:
    listed: Any = custom(admin).list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural)
    return list(listed["items"])


def secret_version(admin: kubernetes.client.ApiClient) -> str:
    secret = kubernetes.client.CoreV1Api(admin).read_namespaced_secret(ROUTING_SECRET, NAMESPACE)
    assert secret.metadata is not None
    return str(secret.metadata.resource_version)


def test_two_connectors_on_one_pattern_are_conflicted_and_the_older_keeps_routing(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    apply(control_plane, connector("older-claim", recipientDomains=["conflict.example"]))
    wait_settled(admin, CONNECTORS, "older-claim")
    time.sleep(1.1)  # creation timestamps have one-second resolution
    apply(control_plane, connector("newer-claim", recipientDomains=["conflict.example"]))
    for name in ("older-claim", "newer-claim"):
        wait_for(
            f"{name} to be Conflicted",
            lambda name=name: accepted(admin, name) == ("False", "Conflicted"),  # type: ignore[misc]
        )
    document, _ = routing(admin)
    (conflict,) = [c for c in document["conflicts"] if c["recipient"] == "conflict.example"]
    assert conflict["winner"] == f"{NAMESPACE}/older-claim"
    assert conflict["losers"] == [f"{NAMESPACE}/newer-claim"]
    custom(admin).delete_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, CONNECTORS, "newer-claim"
    )
    wait_for(
        "the older claim to be Accepted again",
        lambda: (
            conditions(get(admin, CONNECTORS, "older-claim")).get("Accepted")
            == ("True", "Accepted")
        ),
    )


def test_a_missing_profile_is_reported_until_it_exists(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    apply(
        control_plane,
        connector(
            "needs-pool",
            recipientDomains=["pool.example"],
            destination={"profileRef": {"name": "late-pool"}},
        ),
    )
    body = wait_settled(admin, CONNECTORS, "needs-pool")
    assert conditions(body)["ResolvedRefs"] == ("False", "ProfileNotFound")
    apply(
        control_plane,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MultiSmtpProfile",
            "metadata": {"name": "late-pool", "namespace": NAMESPACE},
            "spec": {"servers": [{"host": "192.0.2.30"}]},
        },
    )
    wait_for(
        "the reference to resolve",
        lambda: (
            conditions(get(admin, CONNECTORS, "needs-pool")).get("ResolvedRefs", ("",))[0] == "True"
        ),
    )


def test_a_deleted_connector_leaves_the_routing_document(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    apply(control_plane, connector("short-lived", recipientDomains=["short.example"]))
    wait_for("short-lived to be routed", lambda: "short-lived" in routed_names(admin))
    custom(admin).delete_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, CONNECTORS, "short-lived"
    )
    wait_for("short-lived to leave the document", lambda: "short-lived" not in routed_names(admin))


def test_a_dkim_key_is_ready_shows_its_dns_record_and_reaches_the_relays(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = "sha256/" + hashlib.sha256(spki).hexdigest()
    apply(
        control_plane,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "dkim-contoso-s2026", "namespace": NAMESPACE},
            "stringData": {"private.key": pem},
        },
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DkimKey",
            "metadata": {"name": "contoso-s2026", "namespace": NAMESPACE},
            "spec": {
                "domain": "contoso.com",
                "selector": "s2026",
                "privateKey": {"secretRef": {"name": "dkim-contoso-s2026"}},
            },
        },
    )
    body = wait_settled(admin, DKIM_KEYS, "contoso-s2026")
    assert conditions(body)["Ready"] == ("True", "Ready")
    assert conditions(body)["DnsPublished"] == ("Unknown", "NotChecked")  # probes are off
    status = body["status"]
    assert status["fingerprint"] == fingerprint
    record = status["dnsRecord"]
    assert record["name"] == "s2026._domainkey.contoso.com"
    public = base64.b64encode(spki).decode()
    assert "".join(record["strings"]) == f"v=DKIM1; k=rsa; p={public}"
    keys = wait_for("the key in the routing document", lambda: routing(admin)[0].get("dkimKeys"))
    assert [(k["ref"], k["fingerprint"]) for k in keys] == [
        (f"{NAMESPACE}/contoso-s2026", fingerprint)
    ]
    body_lines = "".join(line for line in pem.splitlines() if "-----" not in line)
    assert body_lines[:40] not in json.dumps(status)


def test_generate_creates_the_key_secret_as_the_chart_service_account_and_never_replaces_it(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    apply(
        control_plane,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DkimKey",
            "metadata": {"name": "contoso-ed2027", "namespace": NAMESPACE},
            "spec": {
                "domain": "contoso.com",
                "selector": "ed2027",
                "algorithm": "Ed25519-SHA256",
                "privateKey": {"secretRef": {"name": "dkim-contoso-ed2027"}},
                "generate": {},
            },
        },
    )
    core = kubernetes.client.CoreV1Api(admin)

    def generated() -> Any:
        try:
            return core.read_namespaced_secret("dkim-contoso-ed2027", NAMESPACE)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    secret = wait_for("the generated Secret", generated, timeout=90)
    assert secret.metadata.annotations["mailflow.dev/generated-for"] == ("DkimKey/contoso-ed2027")
    body = wait_for(
        "the generated key to be Ready",
        lambda: (
            b
            if conditions(b := get(admin, DKIM_KEYS, "contoso-ed2027")).get("Ready")
            == ("True", "Ready")
            else None
        ),
        timeout=90,
    )
    assert body["status"]["dnsRecord"]["strings"][0].startswith("v=DKIM1; k=ed25519; p=")
    version = secret.metadata.resource_version
    # Another pass (a spec change) must not touch the Secret that exists.
    custom(admin).patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, DKIM_KEYS, "contoso-ed2027", {"spec": {"subdomains": True}}
    )
    wait_settled(admin, DKIM_KEYS, "contoso-ed2027")
    assert generated().metadata.resource_version == version


def test_a_deleted_routing_secret_is_written_again(
    admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    generation = int(routing(admin)[1]["mailflow.dev/generation"])
    kubernetes.client.CoreV1Api(admin).delete_namespaced_secret(ROUTING_SECRET, NAMESPACE)

    def rewritten() -> bool:
        try:
            _, annotations = routing(admin)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return int(annotations.get("mailflow.dev/generation", 0)) >= generation

    wait_for("the routing Secret to be recreated", rewritten, timeout=120)


def test_rapid_concurrent_edits_settle_on_the_last_generation(
    admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    """Edits race the operator's status writes: its merge patches carry no resourceVersion,
    so none is refused with a conflict, and it ends on the newest generation."""
    api = custom(admin)
    for i in range(8):
        api.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, CONNECTORS, "tls-opportunistic",
            {"spec": {"description": f"edit {i}"}},
        )  # fmt: skip
    final = get(admin, CONNECTORS, "tls-opportunistic")["metadata"]["generation"]
    body = wait_settled(admin, CONNECTORS, "tls-opportunistic")
    assert body["metadata"]["generation"] == final
    assert body["status"]["observedGeneration"] == final
    assert accepted(admin, "tls-opportunistic") == ("True", "Accepted")
    assert not re.search(r"\b409\b", operator.log())
    # A stale write from a user is the API server's to refuse, as it should.
    stale = dict(body)
    stale["metadata"] = {**body["metadata"], "resourceVersion": "1"}
    with pytest.raises(ApiException) as refused:
        api.replace_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, CONNECTORS, "tls-opportunistic", stale
        )
    assert refused.value.status == 409


def test_a_restart_changes_nothing(admin: kubernetes.client.ApiClient, operator: Operator) -> None:
    # First let the earlier edits finish publishing: nothing changes for a few seconds.
    def snapshot() -> tuple[str, dict[str, Any]]:
        return secret_version(admin), {
            i["metadata"]["name"]: i["status"] for i in items(admin, CONNECTORS)
        }

    def quiet() -> tuple[str, dict[str, Any]] | None:
        first = snapshot()
        time.sleep(3)
        return first if snapshot() == first else None

    secret_before, statuses_before = wait_for("the operator to be idle", quiet, timeout=90)
    operator.stop()
    operator.start()
    # Give the restarted operator time to list, compile and (not) write.
    time.sleep(10)
    assert operator.process is not None
    assert operator.process.poll() is None, operator.log()[-3000:]
    assert secret_version(admin) == secret_before
    statuses_after = {i["metadata"]["name"]: i["status"] for i in items(admin, CONNECTORS)}
    assert statuses_after == statuses_before


def kstatus(plane: ControlPlane) -> dict[str, str]:
    """What Flux and kstatus-based tooling see: tools/kstatus (sigs.k8s.io/cli-utils)."""
    listed = subprocess.run(
        [str(plane.binaries.path("kubectl")), "--kubeconfig", str(plane.kubeconfig), "get",
         CONNECTORS, "-n", NAMESPACE, "-o", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    result = subprocess.run(
        [str(plane.binaries.path("kstatus"))],
        input=listed.stdout,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in result.stdout.splitlines()]
    return {v["name"]: v["status"] for v in verdicts}


def test_kstatus_sees_in_progress_failed_and_current(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, operator: Operator
) -> None:
    if not control_plane.binaries.path("kstatus").exists():
        pytest.skip("tools/kstatus is not built: run scripts/build-k8s.sh")
    # No relay pod: every accepted connector waits for relays (Reconciling → InProgress).
    wait_settled(admin, CONNECTORS, "older-claim")
    assert kstatus(control_plane)["older-claim"] == "InProgress"
    # A conflict will not resolve by itself (Stalled → Failed).
    apply(control_plane, connector("stalled-twin", recipientDomains=["conflict.example"]))
    wait_for(
        "the twin to be Conflicted",
        lambda: accepted(admin, "stalled-twin") == ("False", "Conflicted"),
    )
    wait_for("kstatus to say Failed", lambda: kstatus(control_plane)["stalled-twin"] == "Failed")
    custom(admin).delete_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, CONNECTORS, "stalled-twin"
    )
    # A ready relay pod that serves the current generation: Programmed, Ready → Current.
    core = kubernetes.client.CoreV1Api(admin)
    wait_for(
        "the default ServiceAccount",
        lambda: core.read_namespaced_service_account("default", NAMESPACE),
    )
    labels = {
        "app.kubernetes.io/name": "mailflow",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "relay",
    }
    core.create_namespaced_pod(
        NAMESPACE,
        kubernetes.client.V1Pod(
            metadata=kubernetes.client.V1ObjectMeta(name="mailflow-relay-0", labels=labels),
            spec=kubernetes.client.V1PodSpec(
                automount_service_account_token=False,
                containers=[kubernetes.client.V1Container(name="relay", image="mailflow-relay")],
            ),
        ),
    )
    core.patch_namespaced_pod_status(
        "mailflow-relay-0",
        NAMESPACE,
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
    )

    def served() -> bool:
        generation = routing(admin)[1]["mailflow.dev/generation"]
        core.patch_namespaced_pod(
            "mailflow-relay-0",
            NAMESPACE,
            {"metadata": {"annotations": {"mailflow.dev/config-generation": generation}}},
        )
        return kstatus(control_plane).get("older-claim") == "Current"

    wait_for("kstatus to say Current", served, timeout=90)
    body = get(admin, CONNECTORS, "older-claim")
    assert conditions(body)["Ready"] == ("True", "Ready")
    core.delete_namespaced_pod("mailflow-relay-0", NAMESPACE, grace_period_seconds=0)


def test_the_chart_grants_only_what_the_operator_uses(
    control_plane: ControlPlane, release: list[dict[str, Any]], operator: Operator
) -> None:
    """Every verb of every rule bound to the operator's ServiceAccount is needed: some request
    in the audit log is allowed by it and by no other grant."""
    user = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    bound = {
        b["roleRef"]["name"]
        for b in release
        if b["kind"] == "RoleBinding"
        and any(s.get("name") == SERVICE_ACCOUNT for s in b.get("subjects", []))
    }
    grants = [
        (role["metadata"]["name"], group, resource, verb, tuple(rule.get("resourceNames", ())))
        for role in release
        if role["kind"] == "Role" and role["metadata"]["name"] in bound
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    ]
    requests = set()
    for event in control_plane.audit_events(user):
        assert event["responseStatus"]["code"] != 403, event
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # discovery: granted to every authenticated user
        resource = ref["resource"] + ("/" + ref["subresource"] if ref.get("subresource") else "")
        requests.add((ref.get("apiGroup", ""), resource, event["verb"], ref.get("name", "")))

    def allows(grant: tuple[str, str, str, str, tuple[str, ...]], request: Any) -> bool:
        _, group, resource, verb, names = grant
        return (group, resource, verb) == request[:3] and (not names or request[3] in names)

    needed = {
        grant
        for request in requests
        for grant in grants
        if allows(grant, request) and not any(allows(g, request) for g in grants if g != grant)
    }
    # A request two grants allow makes both of them look optional; each alone must stay.
    shared = {g for request in requests for g in grants if allows(g, request)} - needed
    unused = [g for g in grants if g not in needed and g not in shared]
    assert unused == [], f"granted but never used: {unused}\nrequests: {sorted(requests)}"
