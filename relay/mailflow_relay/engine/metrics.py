"""Prometheus metrics of one relay: every decision an administrator may have to debug.

Each :class:`Relay` has its own registry (so tests and several relays in one process do
not mix), served on ``/metrics`` of the relay's HTTP port. Label values are bounded by
the configuration, never by mail traffic: connectors and destinations come from the
routing document, and the recipient's MX is one label value, not one per domain.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["RelayMetrics"]


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        route = ["connector", "destination", "tls_mode"]
        self.accepted = Counter(
            "mailflow_messages_accepted",
            "Messages accepted from clients and spooled (250 after DATA).",
            registry=self.registry,
        )
        self.refused = Counter(
            "mailflow_messages_refused",
            "Messages or recipients refused at the SMTP dialogue, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.delivered = Counter(
            "mailflow_recipients_delivered",
            "Recipients delivered to the next hop (2xx).",
            route,
            registry=self.registry,
        )
        self.deferred = Counter(
            "mailflow_recipients_deferred",
            "Delivery attempts that left a recipient deferred (4xx, unreachable, TLS refused).",
            route,
            registry=self.registry,
        )
        self.failed = Counter(
            "mailflow_recipients_failed",
            "Recipients that failed for good (5xx or queue lifetime exceeded).",
            route,
            registry=self.registry,
        )
        self.bounces = Counter(
            "mailflow_bounces",
            "Delivery status notifications queued for senders, by action (failed, delayed).",
            ["action"],
            registry=self.registry,
        )
        self.tls_failures = Counter(
            "mailflow_tls_failures",
            "Next hops refused under a required TLS mode, by reason.",
            ["connector", "tls_mode", "reason"],
            registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "mailflow_delivery_duration_seconds",
            "Time of one delivery transaction (all targets tried), by connector.",
            ["connector"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.queue_messages = Gauge(
            "mailflow_queue_messages",
            "Messages in the spool that still have recipients to deliver.",
            registry=self.registry,
        )
        self.queue_oldest_seconds = Gauge(
            "mailflow_queue_oldest_message_age_seconds",
            "Age of the oldest message in the spool (0 when empty).",
            registry=self.registry,
        )
        self.config_generation = Gauge(
            "mailflow_config_generation",
            "Generation of the routing document in force.",
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "mailflow_config_reloads",
            "Routing documents loaded or refused, by result (loaded, refused).",
            ["result"],
            registry=self.registry,
        )
        self.sessions = Gauge(
            "mailflow_smtp_sessions",
            "Open SMTP sessions from clients.",
            registry=self.registry,
        )
        self.handoffs = Counter(
            "mailflow_handoff_messages",
            "Messages handed to a peer relay while draining, by result (accepted, failed).",
            ["result"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
