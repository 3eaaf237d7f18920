"""Helm's own binary installs the chart into the real API server.

With the default values and each ci/*.yaml: every object of the release is accepted
server-side (admission, schema, RBAC escalation checks), `helm upgrade` with changed values
keeps what the operator wrote into the routing Secret, and `helm uninstall` leaves behind
exactly what docs/install.md says: the CRDs and the connectors, not the routing Secret nor
any other object of the release. There is no kubelet, so no `--wait`; no pod ever runs here.

Kinds of other projects the chart can render (cert-manager's Certificate, the Prometheus
operator's ServiceMonitor) get a schema-less stand-in CRD, so that the API server accepts
them as it would in a cluster that has those projects installed.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from controlplane import ControlPlane
from helm.chart import CHART, HELM, RELEASE, VALUES_SETS
from kube.cluster import GROUP, VERSION, create_namespace, wait_established, wait_for

pytestmark = pytest.mark.slow

NAMESPACE = "helm-mail"
FOREIGN = {
    ("cert-manager.io/v1", "Certificate"): "certificates",
    ("cert-manager.io/v1", "Issuer"): "issuers",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules",
}
# Beside the ci/ files: what no ci/ file turns on.
EXTRA_SETS = {
    "monitoring": [
        "--set", "monitoring.prometheusRule.enabled=true",
        "--set", "monitoring.grafanaDashboard.enabled=true",
    ],
}  # fmt: skip


class Helm:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(HELM), "--kubeconfig", str(self.plane.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if check:
            assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
        return result


def values_args(values: str) -> list[str]:
    if values in EXTRA_SETS:
        return EXTRA_SETS[values]
    return [] if values == "default" else ["--values", str(CHART / "ci" / values)]


def stand_in_crd(api_version: str, kind: str, plural: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def helm_cli(
    control_plane: ControlPlane, admin: kubernetes.client.ApiClient, crds: list[str]
) -> Iterator[Helm]:
    if not HELM.exists():
        pytest.skip(f"{HELM} is missing: run `bash scripts/install-helm.sh`")
    api = kubernetes.client.ApiextensionsV1Api(admin)
    for (api_version, kind), plural in FOREIGN.items():
        body = stand_in_crd(api_version, kind, plural)
        api.patch_custom_resource_definition(
            body["metadata"]["name"],
            body,
            field_manager="mailflow-tests",
            force=True,
            _content_type="application/apply-patch+yaml",
        )
    wait_established(admin, [f"{plural}.{av.split('/')[0]}" for (av, _), plural in FOREIGN.items()])
    for namespace in (NAMESPACE, "mail", "mail-apps"):
        create_namespace(admin, namespace, exist_ok=True)
    helm = Helm(control_plane)
    yield helm
    helm("uninstall", RELEASE, "--namespace", NAMESPACE, check=False)


def release_objects(helm: Helm) -> list[dict[str, Any]]:
    manifest = helm("get", "manifest", RELEASE, "--namespace", NAMESPACE).stdout
    return [d for d in yaml.safe_load_all(manifest) if d]


def fetch(client: kubernetes.client.ApiClient, body: dict[str, Any]) -> dict[str, Any] | None:
    """GETs an object like the one rendered; None when it does not exist."""
    dynamic = kubernetes.dynamic.DynamicClient(client)  # type: ignore[no-untyped-call]
    resource = dynamic.resources.get(api_version=body["apiVersion"], kind=body["kind"])
    namespace = body["metadata"].get("namespace", NAMESPACE) if resource.namespaced else None
    try:
        found = resource.get(name=body["metadata"]["name"], namespace=namespace)
    except kubernetes.dynamic.exceptions.NotFoundError:
        return None
    result: dict[str, Any] = found.to_dict()
    return result


def leftovers(client: kubernetes.client.ApiClient, objects: list[dict[str, Any]]) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objects if fetch(client, o) is not None]


@pytest.mark.parametrize("values", [*VALUES_SETS, *EXTRA_SETS])
def test_helm_install_is_accepted_by_the_api_server_and_uninstall_cleans_up(
    helm_cli: Helm, admin: kubernetes.client.ApiClient, values: str
) -> None:
    helm_cli("install", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(values))
    try:
        objects = release_objects(helm_cli)
        assert objects
        missing = [
            f"{o['kind']}/{o['metadata']['name']}" for o in objects if fetch(admin, o) is None
        ]
        assert missing == []
        status = helm_cli("status", RELEASE, "--namespace", NAMESPACE, "-o", "json").stdout
        assert '"status":"deployed"' in status.replace(" ", "")
    finally:
        helm_cli("uninstall", RELEASE, "--namespace", NAMESPACE)
    assert leftovers(admin, objects) == []


def routing_secret_name(objects: list[dict[str, Any]]) -> str:
    (secret,) = [
        o
        for o in objects
        if o["kind"] == "Secret"
        and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "routing"
    ]
    return str(secret["metadata"]["name"])


def test_helm_upgrade_keeps_the_operator_output_and_uninstall_leaves_what_the_docs_say(
    helm_cli: Helm, admin: kubernetes.client.ApiClient, tmp_path: Path
) -> None:
    core = kubernetes.client.CoreV1Api(admin)
    apps = kubernetes.client.AppsV1Api(admin)
    custom = kubernetes.client.CustomObjectsApi(admin)
    helm_cli("install", RELEASE, str(CHART), "--namespace", NAMESPACE)
    objects = release_objects(helm_cli)
    secret_name = routing_secret_name(objects)
    # What the operator does: fill in routing.json.
    document = base64.b64encode(b'{"generation": 7}').decode()
    core.patch_namespaced_secret(secret_name, NAMESPACE, {"data": {"routing.json": document}})
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        "outboundconnectors",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OutboundConnector",
            "metadata": {"name": "kept-after-uninstall"},
            "spec": {"recipientDomains": ["contoso.com"]},
        },
    )

    helm_cli("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--set", "relay.replicas=3")
    statefulsets = [o for o in release_objects(helm_cli) if o["kind"] == "StatefulSet"]
    (relay,) = statefulsets
    assert (
        apps.read_namespaced_stateful_set(relay["metadata"]["name"], NAMESPACE).spec.replicas == 3
    )
    secret = core.read_namespaced_secret(secret_name, NAMESPACE)
    assert (secret.data or {}).get("routing.json") == document, "helm upgrade overwrote it"
    history = helm_cli("history", RELEASE, "--namespace", NAMESPACE, "-o", "yaml").stdout
    assert [r["revision"] for r in yaml.safe_load(history)] == [1, 2]

    helm_cli("uninstall", RELEASE, "--namespace", NAMESPACE)
    wait_for("the release's objects to go", lambda: not leftovers(admin, objects), timeout=60)
    # docs/install.md, "Uninstall": CRDs and connectors stay, the routing Secret goes.
    extensions = kubernetes.client.ApiextensionsV1Api(admin)
    for plural in ("outboundconnectors", "multismtpprofiles"):
        extensions.read_custom_resource_definition(f"{plural}.{GROUP}")
    kept: Any = custom.get_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "outboundconnectors", "kept-after-uninstall"
    )
    assert kept["spec"]["recipientDomains"] == ["contoso.com"]
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_secret(secret_name, NAMESPACE)
    assert gone.value.status == 404
    custom.delete_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, "outboundconnectors", "kept-after-uninstall"
    )
