"""The whole system in one test: operator, relay in cluster mode, and mail going out.

A connector applied to the (emulated) Kubernetes API is compiled by the real operator
into the routing Secret; a real relay reads that Secret, annotates its pod with the
generation it serves; the operator then reports the connector Programmed and Ready; and
mail sent to the relay reaches the connector's destination. A change of the connector
goes the same way round without restarting anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import aiosmtplib
import kubernetes

from kube_emulator import Cluster, OperatorThread, cluster
from mailflow_operator.reconcile import ReconcileSettings
from mailflow_operator.runner import OperatorConfig
from mailflow_operator.selectors import LabelSelector
from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.hosting.cluster import RoutingSecretSource
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.document import ObjectRef
from mailflow_relay.testing.sink import SmtpSink
from support import until

RELAYS = "mailflow-system"


def connector(port: int, description: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "mailflow.dev/v1alpha1",
        "kind": "OutboundConnector",
        "metadata": {"name": "all", "namespace": "mail"},
        "spec": {
            "description": description,
            "recipientDomains": ["*"],
            "destination": {"smartHost": {"host": "127.0.0.1", "port": port}},
            "tls": {"mode": "Opportunistic"},
        },
    }


RELAY_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "relay-0",
        "namespace": RELAYS,
        "labels": {"app.kubernetes.io/name": "mailflow-relay"},
    },
    "spec": {"containers": [{"name": "relay", "image": "mailflow"}]},
    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
}


def condition(api: Cluster, type_: str) -> dict[str, Any]:
    body = api.stored("OutboundConnector", "mail", "all") or {}
    for item in (body.get("status") or {}).get("conditions", []):
        if item["type"] == type_:
            return dict(item)
    return {}


async def send(relay: Relay, subject: str) -> None:
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
    ) as smtp:
        await smtp.sendmail(
            "a@sender.test", ["b@dest.test"], f"Subject: {subject}\r\n\r\nx\r\n".encode()
        )


def test_a_connector_applied_to_the_cluster_carries_mail_and_reports_ready(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cluster() as api, SmtpSink() as first, SmtpSink() as second:
            await api.apply(RELAY_POD)
            await api.apply(connector(first.port))
            operator = OperatorThread(
                OperatorConfig(
                    reconcile=ReconcileSettings(
                        namespaces=("mail",),
                        routing_secret=ObjectRef(RELAYS, "mailflow-routing"),
                        relay_selector=LabelSelector.parse("app.kubernetes.io/name=mailflow-relay"),
                        probe_interval=0,
                        debounce=0.05,
                    ),
                    api_server=api.url,
                )
            )
            async with operator:
                client = kubernetes.client.CoreV1Api(
                    kubernetes.client.ApiClient(kubernetes.client.Configuration(host=api.url))
                )
                source = RoutingSecretSource(
                    RELAYS,
                    "mailflow-routing",
                    api=client,
                    pod_namespace=RELAYS,
                    pod_name="relay-0",
                    poll_interval=0.1,
                )
                relay = Relay(
                    RelaySettings(
                        listener=ListenerSettings(
                            host="127.0.0.1",
                            port=0,
                            hostname="relay-0.test",
                            accept_from=(ipaddress.ip_network("127.0.0.1/32"),),
                        ),
                        spool_dir=tmp_path / "spool",
                        delivery=DeliverySettings(
                            helo_name="relay-0.test", connect_timeout=2, command_timeout=5
                        ),
                        scheduler_tick=0.05,
                        drain_grace=1.0,
                    ),
                    await asyncio.wait_for(source.first(), 15),
                )
                runner = asyncio.create_task(relay.run())
                follower = asyncio.create_task(source.follow(relay))
                try:
                    await relay.ready.wait()
                    await until(
                        lambda: condition(api, "Ready").get("status") == "True",
                        what="Ready=True",
                        within=15,
                    )
                    assert condition(api, "Programmed")["status"] == "True"
                    await send(relay, "first")
                    await until(lambda: len(first.messages) == 1, what="mail via generation 1")

                    await api.apply(connector(second.port, description="moved"))
                    await until(
                        lambda: relay.document.generation == 2,
                        what="the relay on generation 2",
                        within=15,
                    )
                    await until(
                        lambda: (
                            condition(api, "Programmed").get("status") == "True"
                            and condition(api, "Programmed").get("observedGeneration") == 2
                        ),
                        what="Programmed for generation 2",
                        within=15,
                    )
                    await send(relay, "second")
                    await until(lambda: len(second.messages) == 1, what="mail via generation 2")
                    assert len(first.messages) == 1
                finally:
                    relay.stop()
                    await runner
                    follower.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 90))
