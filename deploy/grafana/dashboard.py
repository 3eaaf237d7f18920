"""Mailflow's Grafana dashboard, built with Grafana's own dashboards-as-code types.

``python deploy/grafana/dashboard.py`` writes ``helm/mailflow/files/grafana-dashboard.json``,
which the chart ships in a ConfigMap for Grafana's dashboard sidecar
(``monitoring.grafanaDashboard.enabled``). The file is generated, never edited:
``tests/helm/test_monitoring.py`` rebuilds it and compares, and checks that every query
names a metric that a real scrape of the relay or the operator exposes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUTPUT = (
    Path(__file__).resolve().parents[2] / "helm" / "mailflow" / "files" / "grafana-dashboard.json"
)
UID = "mailflow-overview"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECTOR = 'namespace=~"$namespace"'


def m(name: str) -> str:
    """A metric selected by the dashboard's namespace variable."""
    return f"{name}{{{SELECTOR}}}"


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def _series(title: str, unit: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(12)
    for query in queries:
        panel = panel.with_target(query)
    return panel


def _stat(title: str, unit: str, query: prometheus.Dataquery) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(6)
        .with_target(query)
    )


def build() -> dict[str, object]:
    """The dashboard as the JSON object Grafana imports."""
    board = (
        dashboard.Dashboard("Mailflow")
        .uid(UID)
        .description(
            "Outbound mail through the Mailflow relays: throughput, queue, deferrals, TLS, "
            "throttles and backoff, routing generations and destination certificates"
        )
        .tags(["mailflow", "smtp"])
        .refresh("1m")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("namespace")
            .label("Namespace")
            .datasource(DATASOURCE)
            .query("label_values(mailflow_queue_messages, namespace)")
            .multi(True)
            .include_all(True)
        )
        .with_row(dashboard.Row("Overview"))
        .with_panel(
            _stat(
                "Accepted / s",
                "reqps",
                _query(f"sum(rate({m('mailflow_messages_accepted_total')}[5m]))", "accepted"),
            )
        )
        .with_panel(
            _stat(
                "Queued messages",
                "short",
                _query(f"sum({m('mailflow_queue_messages')})", "queued"),
            )
        )
        .with_panel(
            _stat(
                "Oldest queued message",
                "s",
                _query(f"max({m('mailflow_queue_oldest_message_age_seconds')})", "oldest"),
            )
        )
        .with_panel(
            _stat(
                "Objects not Ready",
                "short",
                _query(
                    f"count({m('mailflow_operator_object_ready')} == 0) or vector(0)",
                    "not ready",
                ),
            )
        )
        .with_row(dashboard.Row("Throughput"))
        .with_panel(
            _series(
                "Recipients by outcome",
                "reqps",
                _query(
                    f"sum by (connector) (rate({m('mailflow_recipients_delivered_total')}[5m]))",
                    "delivered {{connector}}",
                    "A",
                ),
                _query(
                    f"sum by (connector) (rate({m('mailflow_recipients_deferred_total')}[5m]))",
                    "deferred {{connector}}",
                    "B",
                ),
                _query(
                    f"sum by (connector) (rate({m('mailflow_recipients_failed_total')}[5m]))",
                    "failed {{connector}}",
                    "C",
                ),
            )
        )
        .with_panel(
            _series(
                "Delivery time p50 / p99",
                "s",
                _query(
                    "histogram_quantile(0.5, sum by (le, connector) "
                    f"(rate({m('mailflow_delivery_duration_seconds_bucket')}[5m])))",
                    "p50 {{connector}}",
                    "A",
                ),
                _query(
                    "histogram_quantile(0.99, sum by (le, connector) "
                    f"(rate({m('mailflow_delivery_duration_seconds_bucket')}[5m])))",
                    "p99 {{connector}}",
                    "B",
                ),
            )
        )
        .with_row(dashboard.Row("Queue"))
        .with_panel(
            _series(
                "Queue depth by relay",
                "short",
                _query(f"sum by (pod) ({m('mailflow_queue_messages')})", "{{pod}}"),
            )
        )
        .with_panel(
            _series(
                "Oldest message by relay",
                "s",
                _query(
                    f"max by (pod) ({m('mailflow_queue_oldest_message_age_seconds')})",
                    "{{pod}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Waiting recipients by connector and destination",
                "short",
                _query(
                    f"sum by (connector, destination) ({m('mailflow_queue_depth')})",
                    "{{connector}} -> {{destination}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Oldest waiting by connector and destination",
                "s",
                _query(
                    f"max by (connector, destination) ({m('mailflow_queue_oldest_age_seconds')})",
                    "{{connector}} -> {{destination}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Deferrals by reason class",
                "reqps",
                _query(
                    f"sum by (reason_class) (rate({m('mailflow_deferrals_total')}[5m]))",
                    "{{reason_class}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Recipients on hold",
                "short",
                _query(f"sum by (pod) ({m('mailflow_queue_held')})", "{{pod}}"),
            )
        )
        .with_row(dashboard.Row("Deferrals, refusals and TLS"))
        .with_panel(
            _series(
                "Required TLS refusals by reason",
                "short",
                _query(
                    "sum by (connector, tls_mode, reason) "
                    f"(increase({m('mailflow_tls_failures_total')}[15m]))",
                    "{{connector}} {{tls_mode}} {{reason}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Deliveries by TLS mode",
                "reqps",
                _query(
                    f"sum by (tls_mode) (rate({m('mailflow_recipients_delivered_total')}[5m]))",
                    "{{tls_mode}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Refused at the SMTP dialogue by reason",
                "reqps",
                _query(
                    f"sum by (reason) (rate({m('mailflow_messages_refused_total')}[5m]))",
                    "{{reason}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Bounces by action",
                "short",
                _query(
                    f"sum by (action) (increase({m('mailflow_bounces_total')}[1h]))",
                    "{{action}}",
                ),
            )
        )
        .with_row(dashboard.Row("Throttles, backoff and pauses"))
        .with_panel(
            _series(
                "Mail held by throttles and pauses",
                "short",
                _query(
                    f"sum by (connector, scope) ({m('mailflow_throttled_waiting')})",
                    "{{connector}} {{scope}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Adaptive backoff (1 = full rate)",
                "percentunit",
                _query(
                    f"min by (connector) ({m('mailflow_backoff_factor')})",
                    "{{connector}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Rate-limit replies (421, 4.7.x)",
                "short",
                _query(
                    f"sum by (connector) (increase({m('mailflow_rate_limit_replies_total')}[15m]))",
                    "{{connector}}",
                ),
            )
        )
        .with_panel(
            _series(
                "Deliveries held back by reason",
                "reqps",
                _query(
                    f"sum by (connector, reason) (rate({m('mailflow_throttle_holds_total')}[5m]))",
                    "{{connector}} {{reason}}",
                ),
            )
        )
        .with_row(dashboard.Row("Routing and relays"))
        .with_panel(
            _series(
                "Routing generation: published and served",
                "short",
                _query(f"max({m('mailflow_operator_routing_generation')})", "published", "A"),
                _query(
                    f"min by (pod) ({m('mailflow_config_generation')})",
                    "served by {{pod}}",
                    "B",
                ),
            )
        )
        .with_panel(
            _series(
                "Relays ready and synced",
                "short",
                _query(f"max({m('mailflow_operator_relays_ready')})", "ready", "A"),
                _query(f"max({m('mailflow_operator_relays_synced')})", "synced", "B"),
            )
        )
        .with_panel(
            _series(
                "Open SMTP sessions",
                "short",
                _query(f"sum by (pod) ({m('mailflow_smtp_sessions')})", "{{pod}}"),
            )
        )
        .with_panel(
            _series(
                "Destination certificates: days left",
                "d",
                _query(
                    f"min by (kind, name) ({m('mailflow_operator_certificate_days_left')})",
                    "{{kind}} {{name}}",
                ),
            )
        )
    )
    encoded = json.dumps(board.build(), cls=JSONEncoder, sort_keys=True)
    result: dict[str, object] = json.loads(encoded)
    return result


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    OUTPUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
