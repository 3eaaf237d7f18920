"""The operator against a real cluster: runs only when KUBECONFIG points at one.

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

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"),
        reason="KUBECONFIG is not set: the end-to-end suite needs a real cluster",
    ),
]


def kubectl(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout


def get(kind: str, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json")))


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"mailflow-e2e-{uuid.uuid4().hex[:8]}"
    kubectl("apply", "-f", str(ROOT / "crds"))
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false")


def test_examples_become_accepted_and_the_routing_secret_is_published(namespace: str) -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        text = path.read_text().replace("namespace: mail", f"namespace: {namespace}")
        kubectl("apply", "-n", namespace, "-f", "-", stdin=text)
    operator = subprocess.Popen(
        [
            sys.executable, "-m", "mailflow_cli.main", "operator",
            "--namespace", namespace,
            "--routing-secret", f"{namespace}/mailflow-routing",
            "--relay-selector", "app.kubernetes.io/name=mailflow-relay",
            "--probe-interval", "0",
        ],
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
