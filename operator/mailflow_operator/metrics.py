"""Prometheus metrics of the operator, in a registry of its own (tests can run several)."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["OperatorMetrics"]


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "mailflow_operator_reconciles", "Reconcile passes", registry=self.registry
        )
        self.failures = Counter(
            "mailflow_operator_reconcile_failures",
            "Reconcile passes that failed (retried)",
            registry=self.registry,
        )
        self.generation = Gauge(
            "mailflow_operator_routing_generation",
            "Generation of the published routing document",
            registry=self.registry,
        )
        self.probe_ok = Gauge(
            "mailflow_operator_probe_success",
            "1 when the last destination probe passed (reachable and TLS as declared)",
            ["kind", "namespace", "name"],
            registry=self.registry,
        )
        self.certificate_days = Gauge(
            "mailflow_operator_certificate_days_left",
            "Days until the destination's certificate expires",
            ["kind", "namespace", "name"],
            registry=self.registry,
        )
        self.certificate_expiring = Gauge(
            "mailflow_operator_certificate_expiring",
            "1 when the destination's certificate expires within the warning period",
            ["kind", "namespace", "name"],
            registry=self.registry,
        )

        self.ready = Gauge(
            "mailflow_operator_object_ready",
            "1 when the object's Ready condition is True (accepted, references resolved, "
            "served by every ready relay), 0 otherwise",
            ["kind", "namespace", "name"],
            registry=self.registry,
        )
        self.relays_ready = Gauge(
            "mailflow_operator_relays_ready",
            "Ready relay pods that the operator sees",
            registry=self.registry,
        )
        self.relays_synced = Gauge(
            "mailflow_operator_relays_synced",
            "Ready relay pods that serve the published routing generation",
            registry=self.registry,
        )

    def forget(self, kind: str, namespace: str, name: str) -> None:
        for gauge in (self.probe_ok, self.certificate_days, self.certificate_expiring):
            with contextlib.suppress(KeyError):
                gauge.remove(kind, namespace, name)

    def keep_ready_only(self, present: set[tuple[str, str, str]]) -> None:
        """Drop the Ready series of objects that are gone, so dashboards do not show ghosts."""
        for labels in {tuple(s.labels.values()) for m in self.ready.collect() for s in m.samples}:
            if labels not in present:
                with contextlib.suppress(KeyError):
                    self.ready.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """A minimal HTTP endpoint: any GET answers the exposition text."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(5):
                    while (await reader.readline()).strip():
                        pass
                body = self.render()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        return await asyncio.start_server(handle, host, port)
