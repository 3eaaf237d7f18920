"""Helpers of the real-control-plane suites: clients, CRDs, namespaces, waiting."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

from controlplane import ROOT, ControlPlane

T = TypeVar("T")
GROUP = "mailflow.dev"
VERSION = "v1alpha1"
PLURALS = {
    "OutboundConnector": "outboundconnectors",
    "MultiSmtpProfile": "multismtpprofiles",
    "DkimKey": "dkimkeys",
}


def api_client(kubeconfig: Path) -> kubernetes.client.ApiClient:
    client: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return client


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except ApiException as error:
            if error.status == 403:
                raise
            last = error
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def install_crds(client: kubernetes.client.ApiClient) -> list[str]:
    """Applies crds/*.yaml (server-side apply, like `kubectl apply --server-side`) and waits
    until each is Established; returns their names."""
    api = kubernetes.client.ApiextensionsV1Api(client)
    names = []
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for body in load_yaml_documents(path):
            name = body["metadata"]["name"]
            names.append(name)
            api.patch_custom_resource_definition(
                name,
                body,
                field_manager="mailflow-tests",
                force=True,
                _content_type="application/apply-patch+yaml",
            )

    wait_established(client, names)
    return names


def wait_established(client: kubernetes.client.ApiClient, names: list[str]) -> None:
    api = kubernetes.client.ApiextensionsV1Api(client)

    def established() -> bool:
        for name in names:
            status = api.read_custom_resource_definition(name).status
            conditions = {c.type: c.status for c in (status.conditions if status else None) or []}
            if conditions.get("Established") != "True":
                return False
        return True

    wait_for(f"{', '.join(names)} to be Established", established)


def new_namespace(client: kubernetes.client.ApiClient, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    create_namespace(client, name)
    return name


def create_namespace(
    client: kubernetes.client.ApiClient, name: str, exist_ok: bool = False
) -> None:
    body = kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
    try:
        kubernetes.client.CoreV1Api(client).create_namespace(body)
    except ApiException as error:
        if not (exist_ok and error.status == 409):
            raise


def status_causes(error: ApiException) -> list[dict[str, Any]]:
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        return []
    return list((body.get("details") or {}).get("causes") or [])


def plane_kubeconfig(plane: ControlPlane) -> Path:
    return plane.kubeconfig
