"""The operator against a real cluster: the one KUBECONFIG points at, else the test run's own
control plane (tests/controlplane.py: etcd, kube-apiserver and kube-controller-manager on
127.0.0.1, built from tools/).

It installs the CRDs, runs `mailflow operator` as a process with the kubeconfig's
credentials, applies the examples into a fresh namespace and waits for every connector
to be Accepted with its references resolved, and for the routing Secret. Relay pods are
not part of this suite (no relay is deployed), so Ready stays False with NoReadyRelays.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

_cluster: dict[str, str] = {}


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> dict[str, str]:
    """kubectl and KUBECONFIG: the user's cluster when KUBECONFIG is set, else ours."""
    if os.environ.get("KUBECONFIG"):
        _cluster.update(kubectl="kubectl", kubeconfig=os.environ["KUBECONFIG"])
    else:
        plane = request.getfixturevalue("control_plane")
        _cluster.update(
            kubectl=str(plane.binaries.path("kubectl")), kubeconfig=str(plane.kubeconfig)
        )
    return _cluster


def kubectl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [_cluster["kubectl"], "--kubeconfig", _cluster["kubeconfig"], *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def get(kind: str, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json")))


@pytest.fixture
def namespace(cluster: dict[str, str]) -> Iterator[str]:
    name = f"mailflow-e2e-{uuid.uuid4().hex[:8]}"
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false")


def test_examples_become_accepted_and_the_routing_secret_is_published(
    cluster: dict[str, str], namespace: str
) -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        text = path.read_text().replace("namespace: mail", f"namespace: {namespace}")
        kubectl("apply", "-n", namespace, "-f", "-", stdin=text)
    operator = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mailflow"), "operator",
            "--namespace", namespace,
            "--routing-secret", f"{namespace}/mailflow-routing",
            "--relay-selector", "app.kubernetes.io/name=mailflow-relay",
            "--probe-interval", "0",
        ],
        env={**os.environ, "KUBECONFIG": cluster["kubeconfig"]},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        names = json.loads(kubectl("get", "outboundconnectors", "-n", namespace, "-o", "json"))
        pending = {item["metadata"]["name"] for item in names["items"]}
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                status = get("outboundconnector", namespace, name).get("status") or {}
                conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
                if (
                    conditions.get("Accepted") == "True"
                    and conditions.get("ResolvedRefs") == "True"
                ):
                    pending.discard(name)
            time.sleep(1)
        assert not pending, f"not accepted in time: {sorted(pending)}"
        secret = get("secret", namespace, "mailflow-routing")
        document = json.loads(base64.b64decode(secret["data"]["routing.json"]))
        assert len(document["connectors"]) == len(names["items"])
        assert secret["metadata"]["annotations"]["mailflow.dev/generation"] == "1"
    finally:
        operator.terminate()
        operator.wait(timeout=30)
