"""Dashboards and alerts: the chart ships what promtool and Grafana's own types accept, and
every query names a metric that a real scrape of the relay or the operator exposes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import smtplib
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from helm.chart import CHART, ROOT, Rendered
from kube_emulator import Cluster, OperatorThread, cluster
from peers import SmtpSink, free_port, require
from relayproc import RelayProcess, connector
from support import eventually, until

RULES = CHART / "files" / "prometheus-rules.yaml"
RULE_TESTS = Path(__file__).parent / "monitoring" / "rules_test.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
ENABLED = (
    "--set",
    "monitoring.prometheusRule.enabled=true",
    "--set",
    "monitoring.prometheusRule.labels.release=prometheus",
    "--set",
    "monitoring.grafanaDashboard.enabled=true",
)
METRIC = re.compile(r"\bmailflow_[a-z0-9_]+\b")


def dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mailflow_dashboard", ROOT / "deploy" / "grafana" / "dashboard.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [v["query"] for v in board["templating"]["list"] if v.get("type") == "query"]
    return queries


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_monitoring_is_off_by_default(default: Rendered) -> None:
    assert not default.has("PrometheusRule")
    assert not [
        m for m in default.of_kind("ConfigMap") if m["metadata"]["name"].endswith("-dashboard")
    ]


def test_the_prometheus_rule_carries_the_tested_rule_file(render: Callable[..., Rendered]) -> None:
    rendered = render("default", *ENABLED)
    (rule,) = rendered.of_kind("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests(
    render: Callable[..., Rendered], tmp_path: Path
) -> None:
    promtool = require("promtool")
    (rule,) = render("default", *ENABLED).of_kind("PrometheusRule")
    # What the chart renders is what Prometheus loads: test that, not the source file.
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(RULE_TESTS, tmp_path / "rules_test.yaml")
    checked = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    count = sum(len(g["rules"]) for g in rule["spec"]["groups"])
    assert count >= 9
    assert f"SUCCESS: {count} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", "rules_test.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has at least one unit test that expects it to fire.
    expected = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert expected == {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}


def test_the_dashboard_is_what_grafana_foundation_sdk_builds() -> None:
    # Generated, never edited by hand: `python deploy/grafana/dashboard.py` rewrites it.
    assert dashboard_module().render() == DASHBOARD.read_text()


def test_the_dashboard_configmap_carries_the_sidecar_label_and_the_json(
    render: Callable[..., Rendered],
) -> None:
    rendered = render("default", *ENABLED, "--set", "monitoring.grafanaDashboard.namespace=grafana")
    (board,) = [
        m for m in rendered.of_kind("ConfigMap") if m["metadata"]["name"].endswith("-dashboard")
    ]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["namespace"] == "grafana"
    assert json.loads(board["data"]["mailflow.json"]) == json.loads(DASHBOARD.read_text())


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    require("smtp-sink")
    with SmtpSink() as running:
        yield running


def http_text(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        text: str = response.read().decode()
        return text


def relay_scrape(folder: Path, sink: SmtpSink) -> str:
    http = free_port()
    # One message delivered, one deferred (its destination is down) and waiting: the
    # queue gauges and the deferral counter have samples, not only their declarations.
    manifests = connector("down", '["down.test"]', free_port()) + connector(
        "all", '["*"]', sink.port
    )
    with RelayProcess(
        folder,
        manifests,
        "--accept-from",
        "127.0.0.1/32",
        "--http",
        f"127.0.0.1:{http}",
        "--retry-initial",
        "3600",
    ) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["b@dest.test"], "Subject: m\r\n\r\nx\r\n")
            client.sendmail("a@sender.test", ["c@down.test"], "Subject: m\r\n\r\nx\r\n")
        sink.wait_for(1)
        eventually(lambda: "mailflow_recipients_delivered_total{" in http_text(http))
        eventually(lambda: "mailflow_queue_depth{" in http_text(http))
        return http_text(http)


def operator_scrape() -> str:
    from mailflow_operator.reconcile import ReconcileSettings
    from mailflow_operator.runner import OperatorConfig
    from mailflow_operator.selectors import LabelSelector
    from mailflow_relay.routing.document import ObjectRef

    port = free_port()

    async def scenario(api: Cluster) -> str:
        config = OperatorConfig(
            reconcile=ReconcileSettings(
                namespaces=("mail",),
                routing_secret=ObjectRef("mailflow-system", "mailflow-routing"),
                relay_selector=LabelSelector.parse("app.kubernetes.io/name=mailflow-relay"),
                probe_interval=0,
                debounce=0.05,
            ),
            api_server=api.url,
            metrics=("127.0.0.1", port),
        )
        await api.apply(
            {
                "apiVersion": "mailflow.dev/v1alpha1",
                "kind": "OutboundConnector",
                "metadata": {"name": "all", "namespace": "mail"},
                "spec": {"recipientDomains": ["*"]},
            }
        )
        async with OperatorThread(config) as operator:
            await until(lambda: operator.passes >= 1, what="a reconcile pass")
            return await asyncio.to_thread(http_text, port)

    async def main() -> str:
        async with cluster() as api:
            return await scenario(api)

    return asyncio.run(main())


def exposed_names(scrape: str) -> set[str]:
    """Every series name a query may use: the samples, and the families' declared names."""
    names = {
        line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and line[0] != "#"
    }
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require("smtp-sink")
    with SmtpSink() as running:
        relay = relay_scrape(tmp_path_factory.mktemp("relay"), running)
    return {"relay": relay, "operator": operator_scrape()}


def test_every_dashboard_query_and_alert_names_a_metric_a_real_scrape_exposes(
    scrapes: dict[str, str],
) -> None:
    exposed = exposed_names(scrapes["relay"]) | exposed_names(scrapes["operator"])
    used = {
        name for query in dashboard_queries() + rule_queries() for name in METRIC.findall(query)
    }
    assert used, "no metric found in the queries"
    assert used <= exposed, f"not exposed by the relay or the operator: {sorted(used - exposed)}"
    # Both planes are on the dashboard.
    assert any(n.startswith("mailflow_operator_") for n in used)
    assert any(not n.startswith("mailflow_operator_") for n in used)


@pytest.mark.parametrize("plane", ["relay", "operator"])
def test_the_metrics_pass_promtool_check_metrics(scrapes: dict[str, str], plane: str) -> None:
    promtool = require("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrapes[plane], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scrape_parser_sees_labelled_families_without_samples() -> None:
    # A family with labels and no sample yet shows only its TYPE line: still a real name.
    names = exposed_names("# TYPE mailflow_x_total counter\n# TYPE mailflow_h histogram\n")
    assert {"mailflow_x_total", "mailflow_h_bucket"} <= names


def test_the_operator_exports_readiness_per_object_and_relays_in_sync(
    scrapes: dict[str, str],
) -> None:
    # One connector, no relay pod: not Programmed, so not Ready; nothing ready to be in sync.
    lines = scrapes["operator"].splitlines()
    assert (
        'mailflow_operator_object_ready{kind="OutboundConnector",name="all",namespace="mail"} 0.0'
        in lines
    )
    assert "mailflow_operator_relays_ready 0.0" in lines
    assert "mailflow_operator_relays_synced 0.0" in lines
