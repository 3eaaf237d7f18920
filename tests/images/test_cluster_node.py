"""The chart as a user installs it, on a real node (issue 14, point 3): containerd and a kubelet
registered with the real API server of tests/controlplane.py (with the workload controllers and
kube-scheduler), `helm install` with `relay.hostNetwork` and `operator.hostNetwork` (no pod
network: everything on 127.0.0.1), the images imported with `ctr images import` and
`imagePullPolicy: Never`. Then: the operator and two relays Ready; the examples applied with
their destinations at loopback sinks, mail through a relay arriving with the declared TLS
modes; a connector changed and the routing following; the StatefulSet scaled 2 -> 1 with
relay-1's queue handed to relay-0 and nothing lost; `helm uninstall`.

Ports: each relay listens on the chart's smtpPort/httpPort + its ordinal, so the bases are
chosen with their +1 free. The pods reach the API server at 127.0.0.1 (KUBERNETES_SERVICE_HOST
and _PORT set by relay/operator.extraEnv): the kubelet would otherwise give them the
`kubernetes` Service's ClusterIP, which nothing here may dial; the test reads the environment
of the running relay process to check it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from controlplane import CONTROLLERS, Binaries, ControlPlane
from helm.chart import CHART, HELM, ROOT
from imagerun import COMPONENTS, VERSION, archive
from mailflow_relay.testing.sink import ReceivedMessage, SmtpSink
from node import NODE_NAME, Node
from pki import Issued, Pki

pytestmark = [pytest.mark.images, pytest.mark.slow]

NAMESPACE = "mail"
RELEASE = "mailflow"
RELAY = f"{RELEASE}-relay"
UID = 10001
# Deployments, ReplicaSets, StatefulSets, the binding of the spools' claims to the
# PersistentVolumes the test makes (there is no provisioner), and the node lifecycle, which
# lifts the not-ready taint the kubelet registers its node with once the node is Ready.
WORKLOAD_CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "persistentvolume-binder-controller",
    "node-lifecycle-controller",
)
T = TypeVar("T")


def diagnostics(node: Node) -> str:
    return (
        f"--- kubelet\n{node.log('kubelet')}\n--- containerd\n{node.log('containerd')}\n"
        f"--- kube-scheduler\n{node.log('kube-scheduler')}\n{node.pod_logs()}"
    )


def wait_for(what: str, check: Callable[[], T | None], timeout: float, diagnose: Node) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}\n{diagnostics(diagnose)}"
    )


def port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1: the bases of relay-0 and relay-1."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            base = int(first.getsockname()[1])
            if base >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
                return base
    raise AssertionError("no two consecutive free ports on 127.0.0.1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sinks:
    """Loopback SMTP sinks (the relay's own test sink, with STARTTLS when given a certificate)
    on an event loop in a thread of their own, so that the test can block meanwhile."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sinks: list[SmtpSink] = []

    def _run(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout=30)

    def start(self, tls: Issued | None = None, port: int = 0, **options: Any) -> SmtpSink:
        async def started() -> SmtpSink:
            sink = SmtpSink(
                port=port,
                cert_file=tls.cert_file if tls else None,
                key_file=tls.key_file if tls else None,
                **options,
            )
            await sink.start()
            return sink

        sink: SmtpSink = self._run(started())
        self.sinks.append(sink)
        return sink

    def close(self) -> None:
        async def stopped() -> None:
            for sink in self.sinks:
                await sink.stop()

        try:
            self._run(stopped())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@dataclass
class Cluster:
    plane: ControlPlane
    node: Node
    folder: Path

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.plane.binaries.path("kubectl")), "--kubeconfig", str(self.plane.kubeconfig),
             *args],
            input=stdin, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert not check or result.returncode == 0, f"kubectl {args}: {result.stderr}"
        return result.stdout

    def helm(self, *args: str) -> str:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.plane.kubeconfig),
            "HELM_CACHE_HOME": str(self.folder / "helm-cache"),
            "HELM_CONFIG_HOME": str(self.folder / "helm-config"),
            "HELM_DATA_HOME": str(self.folder / "helm-data"),
        }
        result = subprocess.run(
            [str(HELM), *args], capture_output=True, text=True, timeout=300, check=False, env=env
        )
        assert result.returncode == 0, f"helm {args}: {result.stderr}"
        return result.stdout

    def get(self, path: str) -> Any:
        status, body = self.plane.request("GET", path)
        return body if status == 200 else None

    def pods(self, component: str) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/component%3D{component}"
        body = self.get(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}")
        return list(body["items"]) if body else []

    def ready_pods(self, component: str) -> list[str]:
        names = []
        for pod in self.pods(component):
            conditions = pod.get("status", {}).get("conditions", [])
            if pod["metadata"].get("deletionTimestamp") is None and any(
                c["type"] == "Ready" and c["status"] == "True" for c in conditions
            ):
                names.append(pod["metadata"]["name"])
        return sorted(names)


@pytest.fixture(scope="module")
def cluster(k8s_binaries: Binaries) -> Iterator[Cluster]:
    for component in COMPONENTS:
        if not archive(component).exists():
            pytest.fail(f"{archive(component).relative_to(ROOT)} is missing: run `make images`")
    folder = Path(tempfile.mkdtemp(prefix="mf-cluster-", dir="/tmp"))
    plane = ControlPlane(
        k8s_binaries, folder / "plane", controllers=CONTROLLERS + WORKLOAD_CONTROLLERS
    )
    plane.start()
    node = Node(api=plane)
    try:
        node.start()
        for component in COMPONENTS:
            node.import_archive(archive(component))
        yield Cluster(plane, node, folder)
    finally:
        started = time.monotonic()
        node.stop()
        stopped = time.monotonic()
        plane.stop()
        shutil.rmtree(folder, ignore_errors=True)
        print(
            f"node stopped in {stopped - started:.1f}s, the rest in {time.monotonic() - stopped:.1f}s"
        )


def node_ready(cluster: Cluster) -> bool:
    body = cluster.get(f"/api/v1/nodes/{NODE_NAME}")
    conditions = (body or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def spool_volumes(cluster: Cluster, replicas: int) -> None:
    """What a provisioner would do: one host folder per relay, bound to its future claim."""
    for ordinal in range(replicas):
        folder = cluster.folder / f"spool-{ordinal}"
        folder.mkdir()
        folder.chmod(0o770)
        os.chown(folder, UID, UID)  # fsGroup does not apply to a hostPath volume
        claim = f"spool-{RELAY}-{ordinal}"
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": claim},
            "spec": {
                "capacity": {"storage": "2Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(folder), "type": "Directory"},
                "claimRef": {"namespace": NAMESPACE, "name": claim},
            },
        }
        status, body = cluster.plane.request("POST", "/api/v1/persistentvolumes", volume)
        assert status == 201, body


@dataclass(frozen=True)
class Ports:
    smtp: int
    http: int
    api: int

    def relay_smtp(self, ordinal: int) -> int:
        return self.smtp + ordinal

    def relay_http(self, ordinal: int) -> int:
        return self.http + ordinal


def chart_values(ports: Ports) -> dict[str, Any]:
    api_env = [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": str(ports.api)},
    ]
    image = {"tag": VERSION, "pullPolicy": "Never"}
    return {
        "operator": {
            "image": image,
            "hostNetwork": {"enabled": True, "listenAddress": "127.0.0.1"},
            "livenessPort": free_port(),
            "metrics": {"port": free_port()},
            "extraEnv": api_env,
            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
        },
        "relay": {
            "image": image,
            "replicas": 2,
            "hostNetwork": {"enabled": True, "listenAddress": "127.0.0.1"},
            "smtpPort": ports.smtp,
            "httpPort": ports.http,
            "acceptFrom": ["127.0.0.0/8"],
            "extraEnv": api_env,
            "terminationGracePeriodSeconds": 30,
            "preStopSleepSeconds": 1,
            # relay-0 is the peer that stays when the StatefulSet scales down.
            "handoff": {
                "target": f"127.0.0.1:{ports.relay_smtp(0)}",
                "reserveSeconds": 10,
                "peerCIDRs": ["127.0.0.1/32"],
            },
            "workers": 4,
            "extraArgs": ["--retry-initial", "1", "--retry-max", "2", "--config-poll", "1"],
            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
            "persistence": {"size": "2Gi"},
        },
        "tests": {"enabled": False},
    }


def examples(destinations: dict[str, tuple[int, str]], ca_pem: str) -> list[dict[str, Any]]:
    """examples/*.yaml with every smart host moved to a loopback sink (name -> port and pin),
    the profile's servers too, and the contoso CA replaced by the test CA."""
    objects = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            if not body:
                continue
            name, spec = body["metadata"]["name"], body.get("spec", {})
            if body["kind"] == "Secret" and name == "contoso-ca":
                body["stringData"]["ca.crt"] = ca_pem
            if body["kind"] == "MultiSmtpProfile":
                spec["servers"] = [{"host": "127.0.0.1", "port": free_port()}]
            smart = spec.get("destination", {}).get("smartHost")
            if smart is not None:
                port, pin = destinations.get(name, (free_port(), ""))
                smart.update({"host": "127.0.0.1", "port": port, "mx": False})
                if pin:
                    spec["tls"]["pinnedFingerprints"] = [pin]
            objects.append(body)
    return objects


def send(port: int, recipient: str, subject: str) -> str:
    message = EmailMessage()
    message["From"] = "alice@contoso.com"
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '-')}@node.test>"
    message.set_content(f"{subject}\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.send_message(message)
    return str(message["Message-ID"])


def arrived(sink: SmtpSink, count: int) -> list[ReceivedMessage] | None:
    return list(sink.messages) if len(sink.messages) >= count else None


def process_environment(cluster: Cluster, pod: dict[str, Any]) -> dict[str, str]:
    """The environment of the pod's running container process, read from /proc."""
    (status,) = pod["status"]["containerStatuses"]
    container = status["containerID"].split("://", 1)[1]
    info = cluster.node.ctr("tasks", "ls")
    (line,) = [row for row in info.splitlines() if row.startswith(container)]
    pid = line.split()[1]
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def queued(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = re.findall(r"^mailflow_queue_messages(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return sum(float(v) for v in values)


def install(cluster: Cluster, ports: Ports) -> None:
    spool_volumes(cluster, 2)
    values = cluster.folder / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(ports)))
    started = time.monotonic()
    cluster.helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
                 "--values", str(values))  # fmt: skip
    node = cluster.node
    wait_for("the operator Ready", lambda: cluster.ready_pods("operator"), 240, node)
    wait_for(
        "relay-0 and relay-1 Ready",
        lambda: cluster.ready_pods("relay") == [f"{RELAY}-0", f"{RELAY}-1"],
        240,
        node,
    )
    print(f"helm install to two relays Ready: {time.monotonic() - started:.1f}s")


def test_the_chart_on_a_real_node_delivers_follows_routing_and_hands_off_on_scale_down(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = cluster.node
    wait_for("the node Ready", lambda: node_ready(cluster), 120, node)
    ports = Ports(smtp=port_pair(), http=port_pair(), api=cluster.plane.api_port)
    pki = Pki(tmp_path)
    ca = pki.ca("Contoso Internal Mail CA (test)")
    sinks = Sinks()
    try:
        install(cluster, ports)
        relay_pods = {p["metadata"]["name"]: p for p in cluster.pods("relay")}
        # The pods dial the API server on 127.0.0.1, never the kubernetes Service's ClusterIP.
        environment = process_environment(cluster, relay_pods[f"{RELAY}-0"])
        assert environment["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
        assert environment["KUBERNETES_SERVICE_PORT"] == str(ports.api)
        assert environment["POD_INDEX"] == "0"
        assert relay_pods[f"{RELAY}-1"]["spec"]["nodeName"] == NODE_NAME  # the scheduler's

        compliance = sinks.start(tls=ca.issue("mail.contoso.com"))
        archive_cert = pki.self_signed("archive.contoso.example")
        archive_sink = sinks.start(tls=archive_cert)
        # Same name, another key: not the pinned certificate.
        impostor = sinks.start(tls=pki.self_signed("archive.contoso.example"))
        objects = examples(
            {
                "all-via-compliance": (compliance.port, ""),
                "tls-self-signed": (impostor.port, archive_cert.cert_pin),
            },
            ca.pem,
        )
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
        wait_for("the examples in the routing Secret", lambda: routed(cluster, objects), 120, node)
        serving(cluster)

        # NameMatch against the CA of the contoso-ca Secret, SelfSigned against the pin: the
        # impostor gets nothing, the message waits, and goes once the connector points at the
        # pinned server.
        send(ports.relay_smtp(0), "bob@example.net", "via compliance")
        send(ports.relay_smtp(1), "records@archive.contoso.example", "to the archive")
        (to_compliance,) = wait_for("compliance mail", lambda: arrived(compliance, 1), 90, node)
        # relay-1 connected to the impostor, refused its certificate and hung up: still queued.
        wait_for(
            "relay-1's attempt at the impostor",
            lambda: impostor.connections >= 1 and impostor.sessions == 0,
            60,
            node,
        )
        wait_for(
            "the message queued on relay-1", lambda: queued(ports.relay_http(1)) == 1, 30, node
        )
        assert impostor.messages == []
        move(cluster, "tls-self-signed", archive_sink.port)
        (to_archive,) = wait_for("archive mail", lambda: arrived(archive_sink, 1), 90, node)
        assert impostor.messages == []
        assert to_compliance.rcpt_tos == ("bob@example.net",)
        assert to_compliance.tls
        assert to_archive.rcpt_tos == ("records@archive.contoso.example",)
        assert to_archive.tls
        assert f"{RELAY}-0." in to_compliance.data.decode()
        assert f"{RELAY}-1." in to_archive.data.decode()

        # A connector change: the compliance server moves; both relays follow.
        moved = sinks.start(tls=ca.issue("mail2.contoso.com"))
        move(cluster, "all-via-compliance", moved.port)
        for ordinal in (0, 1):
            send(ports.relay_smtp(ordinal), f"carol{ordinal}@example.net", f"moved {ordinal}")
        wait_for("mail at the moved destination", lambda: arrived(moved, 2), 90, node)
        assert len(compliance.messages) == 1

        scale_down_with_hand_off(cluster, sinks, ports, archive_cert)

        cluster.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "3m")
        wait_for("every pod gone", lambda: not cluster.pods("relay") and not cluster.pods(
            "operator"), 120, node)  # fmt: skip
        wait_for("no container left", lambda: node.running_tasks() == 0, 120, node)
    except BaseException:
        print(diagnostics(node))  # pytest shows it with the failure
        raise
    finally:
        sinks.close()


def generation(cluster: Cluster) -> int:
    secret = cluster.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-routing")
    annotations = (secret or {}).get("metadata", {}).get("annotations") or {}
    return int(annotations.get("mailflow.dev/generation", 0))


def serving(cluster: Cluster) -> None:
    """Waits until every relay pod says (its annotation) it serves the Secret's generation."""
    wanted = str(generation(cluster))

    def all_serve() -> bool:
        pods = [p for p in cluster.pods("relay") if not p["metadata"].get("deletionTimestamp")]
        return bool(pods) and all(
            (p["metadata"].get("annotations") or {}).get("mailflow.dev/config-generation") == wanted
            for p in pods
        )

    wait_for(f"every relay serving generation {wanted}", all_serve, 60, cluster.node)


def move(cluster: Cluster, connector: str, port: int) -> None:
    """`kubectl patch` a connector's smart host port, until every relay serves the change."""
    before = generation(cluster)
    patch = {"spec": {"destination": {"smartHost": {"port": port}}}}
    cluster.kubectl("patch", "outboundconnector", connector, "-n", NAMESPACE,
                    "--type", "merge", "-p", yaml.safe_dump(patch))  # fmt: skip
    wait_for(
        f"{connector} moved in the routing Secret",
        lambda: generation(cluster) > before and f"{port}" in routing_json(cluster),
        60,
        cluster.node,
    )
    serving(cluster)


def routing_json(cluster: Cluster) -> str:
    secret = cluster.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-routing")
    data = ((secret or {}).get("data") or {}).get("routing.json")
    return base64.b64decode(data).decode() if data else ""


def routed(cluster: Cluster, objects: list[dict[str, Any]]) -> bool:
    document = routing_json(cluster)
    names = [o["metadata"]["name"] for o in objects if o["kind"] == "OutboundConnector"]
    return bool(document) and all(name in document for name in names)


def scale_down_with_hand_off(
    cluster: Cluster, sinks: Sinks, ports: Ports, archive_cert: Issued
) -> None:
    """relay-1 holds mail for a destination that is down; scaled away, it hands the mail to
    relay-0, which delivers it once the destination is back: every message, once."""
    node = cluster.node
    down = free_port()
    move(cluster, "tls-self-signed", down)
    ids = {
        send(ports.relay_smtp(1), f"r{i}@archive.contoso.example", f"held {i}") for i in range(3)
    }
    wait_for("three messages queued on relay-1", lambda: queued(ports.relay_http(1)) >= 3, 60, node)
    cluster.kubectl("scale", "statefulset", RELAY, "-n", NAMESPACE, "--replicas=1")
    wait_for(
        "relay-1 gone",
        lambda: [p["metadata"]["name"] for p in cluster.pods("relay")] == [f"{RELAY}-0"],
        90,
        node,
    )
    assert queued(ports.relay_http(0)) >= 3, "relay-0 did not receive relay-1's queue"
    back = sinks.start(tls=archive_cert, port=down)
    delivered = wait_for("the handed-off mail delivered", lambda: arrived(back, 3), 90, node)
    time.sleep(3)  # a duplicate would arrive now
    assert len(back.messages) == 3
    got = set()
    for message in delivered:
        text = message.data.decode()
        # Accepted by relay-1, handed to relay-0, delivered by relay-0.
        assert f"{RELAY}-1." in text, text
        assert f"{RELAY}-0." in text, text
        (message_id,) = re.findall(r"^Message-ID: (.+)$", text, re.M | re.I)
        got.add(message_id.strip())
    assert got == ids
