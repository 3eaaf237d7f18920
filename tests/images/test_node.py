"""The relay image as the chart's pod, on a real kubelet with containerd (issue 14, point 3,
first step): no API server yet, so the chart's relay pod spec runs as a static pod, on the
host's network and 127.0.0.1 only, with the chart's security context, probes, preStop and
volumes (the spool a host folder instead of a PersistentVolumeClaim)."""

from __future__ import annotations

import os
import smtplib
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from imagerun import COMPONENTS, archive, image_name, read_digests
from node import Node
from peers import SmtpSink, free_port

pytestmark = [pytest.mark.images, pytest.mark.slow]

UID = 10001


def relay_pod(
    spec: dict[str, Any], folders: dict[str, Path], smtp: int, http: int
) -> dict[str, Any]:
    """The chart's relay pod spec, standalone: manifests instead of the routing Secret (no API
    server), the host network, the image loaded into containerd, probes on 127.0.0.1."""
    pod = {**spec, "hostNetwork": True, "automountServiceAccountToken": False}
    pod.pop("serviceAccountName", None)
    (container,) = pod["containers"]
    container = {**container, "image": image_name("relay"), "imagePullPolicy": "Never"}
    container["args"] = [
        "relay",
        "--manifests",
        "/etc/mailflow/manifests",
        "--listen",
        f"127.0.0.1:{smtp}",
        "--http",
        f"127.0.0.1:{http}",
        "--spool",
        "/var/spool/mailflow",
        "--accept-from",
        "127.0.0.0/8",
        "--hostname",
        "relay-0.test",
        "--drain-grace",
        "5",
    ]
    container["ports"] = [
        {"name": "smtp", "containerPort": smtp},
        {"name": "http", "containerPort": http},
    ]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        container[probe] = {
            **container[probe],
            "httpGet": {**container[probe]["httpGet"], "host": "127.0.0.1"},
        }
    container["volumeMounts"] = [
        *container["volumeMounts"],
        {"name": "manifests", "mountPath": "/etc/mailflow/manifests", "readOnly": True},
    ]
    pod["containers"] = [container]
    pod["volumes"] = [
        *pod.get("volumes", []),
        {"name": "spool", "hostPath": {"path": str(folders["spool"]), "type": "Directory"}},
        {"name": "manifests", "hostPath": {"path": str(folders["manifests"]), "type": "Directory"}},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mailflow-relay", "namespace": "mail"},
        "spec": pod,
    }


def test_the_charts_relay_pod_runs_on_a_real_kubelet_and_delivers(
    archives: dict[str, str], pod_specs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o770)
    os.chown(spool, UID, UID)  # what fsGroup does for a PersistentVolumeClaim
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    tmp_path.chmod(0o755)
    smtp, http = free_port(), free_port()
    with SmtpSink() as sink, Node() as node:
        # ctr images import names each archive by its annotation, with the same digest.
        for component in COMPONENTS:
            node.import_archive(archive(component))
        listed = node.images()
        for name, digest in read_digests().items():
            assert listed[name] == digest
        (manifests / "connectors.yaml").write_text(
            "apiVersion: mailflow.dev/v1alpha1\nkind: OutboundConnector\n"
            "metadata: {name: all, namespace: mail}\n"
            'spec: {recipientDomains: ["*"], tls: {mode: Opportunistic},\n'
            f"  destination: {{smartHost: {{host: 127.0.0.1, port: {sink.port}}}}}}}\n"
        )
        node.static(
            "relay",
            relay_pod(pod_specs["relay"], {"spool": spool, "manifests": manifests}, smtp, http),
        )
        ready = False
        deadline = time.monotonic() + 180
        while not ready and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(0.5)
        assert ready, node.log("kubelet") + "\n" + node.log("containerd")

        message = EmailMessage()
        message["From"] = "alice@contoso.com"
        message["To"] = "bob@fabrikam.example"
        message["Subject"] = "through a pod on a real kubelet"
        message.set_content("Hello from the node.\n")
        with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as client:
            client.send_message(message)
        (delivered,) = sink.wait_for(1, timeout=60)
        assert delivered.recipients == ["bob@fabrikam.example"]
        assert "relay-0.test" in delivered.text

        # Deleted as on a node drain: preStop sleep, SIGTERM, drain, within the grace period.
        (container,) = pod_specs["relay"]["containers"]
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        grace = pod_specs["relay"]["terminationGracePeriodSeconds"]
        took = node.remove("relay", timeout=grace)
        assert pre_stop <= took < pre_stop + 30, took
