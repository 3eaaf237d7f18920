"""The relay in a cluster: routing documents from the config Secret, generation on the pod.

The Kubernetes API is kmock's emulator over real HTTP; the relay talks to it with the
official client, exactly as in a pod (only the server address differs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import kmock
import kubernetes

from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.hosting.cluster import GENERATION_ANNOTATION, RoutingSecretSource
from mailflow_relay.inbound.listener import ListenerSettings
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.routing.contract import POD_BACKOFF_ANNOTATION as BACKOFF_ANNOTATION
from mailflow_relay.routing.contract import POD_TRANSPORT_ANNOTATION as TRANSPORT_ANNOTATION
from mailflow_relay.routing.document import (
    Connector,
    ObjectRef,
    RoutingDocument,
    SmartHost,
    TlsPolicy,
)
from mailflow_relay.routing.domains import DomainPattern
from mailflow_relay.testing.sink import SmtpSink
from support import run, until


class Cluster:
    """kmock's emulator on a loopback port, and the few calls these tests make to it."""

    def __init__(
        self, emulator: kmock.KubernetesEmulator, url: str, session: aiohttp.ClientSession
    ) -> None:
        self.emulator = emulator
        self.url = url.rstrip("/")
        self.session = session

    async def apply(self, body: dict[str, Any]) -> None:
        plural = {"Secret": "secrets", "Pod": "pods"}[body["kind"]]
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        collection = f"{self.url}/api/v1/namespaces/{namespace}/{plural}"
        async with self.session.get(f"{collection}/{name}") as response:
            exists = response.status == 200
        method, url = ("PATCH", f"{collection}/{name}") if exists else ("POST", collection)
        headers = {"Content-Type": "application/merge-patch+json"} if exists else None
        async with self.session.request(method, url, json=body, headers=headers) as response:
            assert response.status < 400, await response.text()

    def pod_annotations(self, namespace: str, name: str) -> dict[str, str]:
        stored = self.emulator.objects[kmock.resource("v1/pods"), namespace, name]
        return dict(stored.raw.get("metadata", {}).get("annotations") or {})


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        with warnings.catch_warnings():
            # kmock 0.8 reads its bundled resource list with a deprecated importlib call.
            warnings.filterwarnings("ignore", "read_binary is deprecated", DeprecationWarning)
            emulator.resources.load_bundled()
        async with aiohttp.ClientSession() as session:
            yield Cluster(emulator, str(server.url), session)


def document(port: int, generation: int) -> RoutingDocument:
    connector = Connector(
        ref=ObjectRef("mail", "all"),
        generation=generation,
        created="",
        enabled=True,
        recipient_patterns=(DomainPattern.parse("*"),),
        sender_patterns=(),
        destination=SmartHost("127.0.0.1", port),
        tls=TlsPolicy(),
    )
    return RoutingDocument(generation=generation, connectors=(connector,))


def secret(text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "mailflow-routing", "namespace": "mail"},
        "data": {"routing.json": base64.b64encode(text.encode()).decode()},
    }


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "relay-0", "namespace": "mail"},
    "spec": {"containers": []},
}


def source_for(k8s: Cluster) -> RoutingSecretSource:
    configuration = kubernetes.client.Configuration(host=k8s.url)
    api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
    return RoutingSecretSource(
        "mail",
        "mailflow-routing",
        api=api,
        pod_name="relay-0",
        pod_namespace="mail",
        poll_interval=0.1,
    )


def settings(tmp_path: Path) -> RelaySettings:
    return RelaySettings(
        listener=ListenerSettings(
            host="127.0.0.1",
            port=0,
            hostname="relay-0.test",
            accept_from=(ipaddress.ip_network("127.0.0.1/32"),),
        ),
        spool_dir=tmp_path / "spool",
        delivery=DeliverySettings(helo_name="relay-0.test", connect_timeout=2, command_timeout=5),
        scheduler_tick=0.05,
        drain_grace=1.0,
    )


async def send(relay: Relay, subject: str) -> None:
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.port, start_tls=False, timeout=10
    ) as smtp:
        await smtp.sendmail(
            "a@sender.test", ["b@dest.test"], f"Subject: {subject}\r\n\r\nx\r\n".encode()
        )


def annotation(k8s: Cluster) -> str | None:
    return k8s.pod_annotations("mail", "relay-0").get(GENERATION_ANNOTATION)


def test_the_relay_follows_the_routing_secret_and_reports_its_generation(tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        async with cluster() as k8s, SmtpSink() as first_sink, SmtpSink() as second_sink:
            await k8s.apply(POD)
            await k8s.apply(secret(document(first_sink.port, 1).to_json()))
            source = source_for(k8s)
            relay = Relay(settings(tmp_path), await source.first())
            runner = asyncio.create_task(relay.run())
            follower = asyncio.create_task(source.follow(relay))
            try:
                await relay.ready.wait()
                await until(lambda: annotation(k8s) == "1", what="generation 1 on the pod")
                await send(relay, "one")
                await until(lambda: len(first_sink.messages) == 1, what="delivery on generation 1")

                await k8s.apply(secret(document(second_sink.port, 2).to_json()))
                await until(lambda: annotation(k8s) == "2", what="generation 2 on the pod")
                await send(relay, "two")
                await until(lambda: len(second_sink.messages) == 1, what="delivery on generation 2")

                # A document that does not load is refused; generation 2 stays in force.
                await k8s.apply(
                    secret(
                        document(first_sink.port, 3)
                        .to_json()
                        .replace('"generation":3', '"generation":4')
                    )
                )
                await until(
                    lambda: (
                        relay.metrics.registry.get_sample_value(
                            "mailflow_config_reloads_total", {"result": "refused"}
                        )
                        == 1.0
                    ),
                    what="the broken document refused",
                )
                await send(relay, "three")
                await until(
                    lambda: len(second_sink.messages) == 2, what="delivery still on generation 2"
                )
                return {
                    "annotation": annotation(k8s),
                    "generation": relay.document.generation,
                    "first": len(first_sink.messages),
                }
            finally:
                relay.stop()
                await runner
                follower.cancel()

    assert run(scenario) == {"annotation": "2", "generation": 2, "first": 1}


def test_the_relay_waits_for_a_routing_secret_that_does_not_exist_yet(tmp_path: Path) -> None:
    async def scenario() -> int:
        async with cluster() as k8s:
            await k8s.apply(POD)
            source = source_for(k8s)
            first = asyncio.create_task(source.first())
            await asyncio.sleep(0.5)
            assert not first.done()
            await k8s.apply(secret(document(25, 7).to_json()))
            return (await asyncio.wait_for(first, 10)).generation

    assert run(scenario) == 7


def test_the_relay_reports_a_backoff_on_its_pod_and_clears_it(tmp_path: Path) -> None:
    async def scenario() -> list[str | None]:
        seen: list[str | None] = []
        async with cluster() as k8s, SmtpSink(data_reply="421 4.7.28 slow down") as sink:
            await k8s.apply(POD)
            await k8s.apply(secret(document(sink.port, 1).to_json()))
            source = source_for(k8s)
            quick = dataclasses.replace(settings(tmp_path), backoff_recovery=1.0)
            relay = Relay(quick, await source.first())
            runner = asyncio.create_task(relay.run())
            follower = asyncio.create_task(source.follow(relay))
            try:
                await relay.ready.wait()
                await send(relay, "limited")

                def backoff() -> str | None:
                    return k8s.pod_annotations("mail", "relay-0").get(BACKOFF_ANNOTATION)

                await until(lambda: backoff() not in (None, "{}"), what="backoff on the pod")
                seen.append(backoff())
                sink.data_reply = None
                await until(lambda: backoff() == "{}", within=30, what="backoff cleared")
                seen.append(backoff())
                return seen
            finally:
                relay.stop()
                await runner
                follower.cancel()

    assert run(scenario, within=60) == ['{"mail/all":0.5}', "{}"]


def test_the_relay_reports_dane_and_mta_sts_outcomes_on_its_pod(tmp_path: Path) -> None:
    async def scenario() -> list[str | None]:
        async with cluster() as k8s, SmtpSink() as sink:
            await k8s.apply(POD)
            await k8s.apply(secret(document(sink.port, 1).to_json()))
            source = source_for(k8s)
            relay = Relay(settings(tmp_path), await source.first())
            runner = asyncio.create_task(relay.run())
            follower = asyncio.create_task(source.follow(relay))
            try:
                await relay.ready.wait()

                def outcomes() -> str | None:
                    return k8s.pod_annotations("mail", "relay-0").get(TRANSPORT_ANNOTATION)

                # Nothing delivered under a policy yet: nothing written.
                await until(lambda: annotation(k8s) == "1", what="generation 1 on the pod")
                seen = [outcomes()]
                # What test_dane.py shows a DANE delivery records, here recorded directly.
                relay.transport_status.record("mail/all", "verified", ())
                await until(lambda: outcomes() is not None, what="outcomes on the pod")
                seen.append(outcomes())
                return seen
            finally:
                relay.stop()
                await runner
                follower.cancel()

    assert run(scenario, within=60) == [None, '{"mail/all":{"dane":"verified"}}']
