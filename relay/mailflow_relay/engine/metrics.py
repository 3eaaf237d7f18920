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
            "Delivery status notifications queued for senders, by action (failed, delayed,"
            " relayed).",
            ["action"],
            registry=self.registry,
        )
        self.notifications_suppressed = Counter(
            "mailflow_notifications_suppressed",
            "Notifications not sent because the sender's NOTIFY did not ask for them"
            " (RFC 3461), by action (failed, delayed).",
            ["action"],
            registry=self.registry,
        )
        self.extension_decisions = Counter(
            "mailflow_extension_decisions",
            "Transactions changed or refused to fit a next hop's ESMTP extensions: converted"
            " (quoted-printable, a-labels) or failed (5.6.3, 5.6.7, 5.7.30).",
            ["decision"],
            registry=self.registry,
        )
        self.tls_failures = Counter(
            "mailflow_tls_failures",
            "Next hops refused under a required TLS mode, by reason.",
            ["connector", "tls_mode", "reason"],
            registry=self.registry,
        )
        self.dane_results = Counter(
            "mailflow_dane_results",
            "Deliveries by what DANE (tls.dane, RFC 7672) did: verified, mismatch, tls_failed,"
            " lookup_failed, required, unusable, not_applicable.",
            ["connector", "result"],
            registry=self.registry,
        )
        self.tls_policy_results = Counter(
            "mailflow_tls_policy_results",
            "TLS sessions and refusals by policy (tlsa, sts, no-policy-found) and result"
            " (success or an RFC 8460 result type): what the TLS-RPT reports will say.",
            ["connector", "policy_type", "result"],
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "mailflow_next_hop_protocol_errors",
            "Next hops that answered out of protocol (250 to DATA, no valid reply code, a line"
            " over the limit): the recipients were deferred, never counted as delivered.",
            ["connector", "destination"],
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
        route_now = ["connector", "destination"]
        self.queue_depth = Gauge(
            "mailflow_queue_depth",
            "Recipients waiting in the spool (not on hold), by the connector and destination "
            "that take them now.",
            route_now,
            registry=self.registry,
        )
        self.queue_oldest_age = Gauge(
            "mailflow_queue_oldest_age_seconds",
            "Age of the oldest message with a recipient waiting, by the connector and "
            "destination that take it now.",
            route_now,
            registry=self.registry,
        )
        self.queue_held = Gauge(
            "mailflow_queue_held",
            "Recipients on hold (mailflow queue hold): neither tried nor bounced until released.",
            registry=self.registry,
        )
        self.deferrals = Counter(
            "mailflow_deferrals",
            "Recipients deferred, by reason class (from the enhanced status code): connection, "
            "dns, tls, security, protocol, system, internal, connector_not_ready, address, "
            "mailbox, content, network, remote_reply.",
            ["reason_class"],
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
        self.config_refusals = Counter(
            "mailflow_config_refusals",
            "Routing documents refused, by cause (invalid, conflict, unreadable).",
            ["cause"],
            registry=self.registry,
        )
        self.config_left_out = Gauge(
            "mailflow_config_objects_left_out",
            "Problems of objects the document in force was compiled without "
            "(--skip-invalid-objects); 0 without the opt-in.",
            registry=self.registry,
        )
        self.handoff_origins = Counter(
            "mailflow_handoff_origins",
            "X-Mailflow-Origin headers received, by result: trusted (from a --handoff-peer: "
            "the message keeps its age and client) or ignored (removed unread).",
            ["result"],
            registry=self.registry,
        )
        self.open_relay = Gauge(
            "mailflow_open_relay",
            "1 when every address may relay (accept-from 0.0.0.0/0 or ::/0, allowed "
            "explicitly); 0 otherwise.",
            registry=self.registry,
        )
        self.sessions = Gauge(
            "mailflow_smtp_sessions",
            "Open SMTP sessions from clients.",
            registry=self.registry,
        )
        # The listener's defences, by decision (a closed set: ListenerEvent). Never labelled
        # by client address: the attacker would choose the series, and the registry's size.
        self.smtp_defences = Counter(
            "mailflow_smtp_defence_events",
            "Defensive decisions of the SMTP listener, by event: max_connections,"
            " max_connections_per_client, accept_error, auth_failure, auth_delayed,"
            " auth_disconnect, error_delayed, error_disconnect, smuggling.",
            ["event"],
            registry=self.registry,
        )
        self.http_refused = Counter(
            "mailflow_http_requests_refused",
            "Requests to the health and metrics port refused, by HTTP status (414, 431).",
            ["status"],
            registry=self.registry,
        )
        self.handoffs = Counter(
            "mailflow_handoff_messages",
            "Messages handed to a peer relay while draining, by result (accepted, failed).",
            ["result"],
            registry=self.registry,
        )

        self.spool_free_bytes = Gauge(
            "mailflow_spool_free_bytes",
            "Free bytes on the spool's file system, as last measured (at most once a second).",
            registry=self.registry,
        )
        self.spool_full = Gauge(
            "mailflow_spool_full",
            "1 while the spool's free space is below the reserve and new mail gets 452 4.3.1.",
            registry=self.registry,
        )
        self.spool_write_failures = Counter(
            "mailflow_spool_write_failures",
            "Writes of delivery outcomes the spool refused (full disk, I/O error), by what"
            " was written (state, bounce).",
            ["what"],
            registry=self.registry,
        )
        self.spool_write_backoff = Gauge(
            "mailflow_spool_write_backoff_seconds",
            "The current wait before writing outcomes again after refused writes (0: none).",
            registry=self.registry,
        )
        self.spool_unrecorded = Gauge(
            "mailflow_spool_unrecorded_outcomes",
            "Recipient outcomes kept in memory because the spool could not write them yet.",
            registry=self.registry,
        )
        self.spool_corrupt = Counter(
            "mailflow_spool_corrupt_messages",
            "Messages whose body failed its checksum when read for delivery (copied to the"
            " spool's corrupt/ folder and taken out of the queue).",
            registry=self.registry,
        )
        self.dkim = Counter(
            "mailflow_dkim_signing",
            "DKIM signing decisions at acceptance, by key domain, selector and outcome (signed, "
            "skipped_no_key, skipped_opt_out, skipped_no_from, skipped_already_signed, error); "
            "domain and selector are empty when no key applies.",
            ["domain", "selector", "outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
