"""The chart as Helm and the API server see it: lint, render, schema, Kubernetes validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from helm.chart import (
    CHART,
    CI_FILES,
    ROOT,
    VALUES_SETS,
    Manifest,
    Rendered,
    helm,
    template_args,
)

# The Kubernetes releases docs/install.md claims; the chart's kubeVersion is the first one.
KUBERNETES_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"]

# Kinds from other projects' CRDs, which kubernetes-validate has no schema for.
FOREIGN_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
}


@pytest.mark.usefixtures("helm_binary")
@pytest.mark.parametrize("values", VALUES_SETS)
def test_helm_lint_strict_is_clean(values: str) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", "mail"]
    if values != "default":
        args += ["--values", str(CHART / "ci" / values)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


def test_ci_values_cover_minimal_production_and_loadbalancer() -> None:
    assert {"minimal-values.yaml", "production-values.yaml", "loadbalancer-values.yaml"} <= set(
        CI_FILES
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", VALUES_SETS)
def test_rendered_manifests_are_valid_kubernetes_objects(
    render: Callable[..., Rendered], values: str, version: str
) -> None:
    problems: list[str] = []
    checked = 0
    for manifest in render(values).objects:
        if (manifest["apiVersion"], manifest["kind"]) in FOREIGN_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            problems.append(
                f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {error.message}"
            )
        checked += 1
    assert problems == []
    assert checked >= 15


def test_kubernetes_validate_catches_an_unknown_field() -> None:
    # The validation above is only worth something if strict mode rejects what is not in the API.
    bad: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 25, "targetPort": "smtp", "smtpPort": 25}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError, match="smtpPort"):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)


def test_the_chart_requires_the_oldest_validated_kubernetes_release() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=" + KUBERNETES_VERSIONS[0].rsplit(".", 1)[0] + ".0-0"


def selected_services(rendered: Rendered, monitor: Manifest) -> list[str]:
    return [
        s["metadata"]["name"]
        for s in rendered.of_kind("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]


def test_servicemonitor_scrapes_metrics_from_the_headless_service(production: Rendered) -> None:
    monitor = production.get("ServiceMonitor", "mailflow-relay")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert selected_services(production, monitor) == ["mailflow-relay-headless"]


def test_operator_servicemonitor_scrapes_the_operator_metrics_service(
    production: Rendered,
) -> None:
    monitor = production.get("ServiceMonitor", "mailflow-operator")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["interval"], endpoint["scrapeTimeout"]) == (
        "metrics",
        "30s",
        "10s",
    )
    assert selected_services(production, monitor) == ["mailflow-operator-metrics"]
    service = production.get("Service", "mailflow-operator-metrics")["spec"]
    assert service["ports"] == [
        {"name": "metrics", "port": 9091, "targetPort": "metrics", "protocol": "TCP"}
    ]
    # The Service reaches the operator pod, and only it.
    pods = [
        w["metadata"]["name"]
        for w in production.of_kind("Deployment") + production.of_kind("StatefulSet")
        if service["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert pods == ["mailflow-operator"]


def test_chart_crds_are_identical_to_the_repository_crds() -> None:
    repository = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == repository, "helm/mailflow/crds/ must hold exactly the files of crds/"
    for name in repository:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"helm/mailflow/crds/{name} differs from crds/{name}: cp crds/*.yaml helm/mailflow/crds/"
        )


def test_crds_are_rendered_with_include_crds(default: Rendered) -> None:
    names = {c["metadata"]["name"] for c in default.of_kind("CustomResourceDefinition")}
    assert names == {
        "outboundconnectors.mailflow.dev",
        "multismtpprofiles.mailflow.dev",
        "dkimkeys.mailflow.dev",
    }


def schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        paths |= schema_paths(sub, path + ".")
    return paths


def value_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.add(path)
        # Free-form Kubernetes structures (resources, securityContext...) are typed by the API.
        if isinstance(value, dict) and value and path not in FREE_FORM:
            paths |= value_paths(value, path + ".")
    return paths


FREE_FORM = {
    "podSecurityContext",
    "containerSecurityContext",
    "relay.autoscaling.behavior",
    "operator.resources.requests",
    "operator.resources.limits",
    "relay.resources.requests",
    "relay.resources.limits",
}


def test_values_schema_describes_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert value_paths(values) - schema_paths(schema) == set()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["relay"]["additionalProperties"] is False


@pytest.mark.usefixtures("helm_binary")
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "relay.defaultRoute=Bounce",
            "at '/relay/defaultRoute': value must be one of 'RecipientMx', 'Reject'",
        ),
        ("relay.replica=3", "at '/relay': additional properties 'replica' not allowed"),
        ("relay.acceptFrom={10.0.0.0}", "at '/relay/acceptFrom/0'"),
        ("relay.service.type=ExternalName", "at '/relay/service/type'"),
        ("relay.smtpPort=25", "at '/relay/smtpPort': minimum"),
        ("relay.autoscaling.maxReplicas=0", "at '/relay/autoscaling/maxReplicas'"),
    ],
)
def test_values_schema_rejects_a_bad_value_with_a_clear_error(setting: str, message: str) -> None:
    for command in (
        template_args("default", "--set", setting),
        ["lint", str(CHART), "--set", setting],
    ):
        result = helm(*command)
        assert result.returncode != 0
        assert message in result.stdout + result.stderr


@pytest.mark.usefixtures("helm_binary")
@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
@pytest.mark.parametrize(
    "trusted",
    [
        ["--set", "relay.acceptFrom={10.0.0.0/8}"],
        # AUTH only, but the hand-off peers' pod network is trusted as well.
        ["--set-json", "relay.acceptFrom=[]", "--set", "relay.handoff.peerCIDRs={10.244.0.0/16}"],
    ],
)
def test_a_service_that_hides_client_addresses_is_refused(
    service_type: str, trusted: list[str]
) -> None:
    # With Cluster, every client arrives from a node address inside acceptFrom: an open relay.
    settings = [
        *("--set", f"relay.service.type={service_type}"),
        *("--set", "relay.service.externalTrafficPolicy=Cluster"),
    ]
    result = helm(*template_args("default", *settings, *trusted))
    assert result.returncode != 0
    assert (
        f"relay.service.externalTrafficPolicy must be Local for a {service_type} Service"
        in result.stderr
    )
    assert "open relay" in result.stderr


def test_cluster_traffic_policy_is_allowed_where_it_opens_nothing(
    render: Callable[..., Rendered],
) -> None:
    # A ClusterIP Service sees the client's own address; AUTH-only relays trust no address.
    rendered = render("default", "--set", "relay.service.externalTrafficPolicy=Cluster")
    assert rendered.get("Service", "mailflow-relay")["spec"]["type"] == "ClusterIP"
    rendered = render(
        "default",
        "--set",
        "relay.service.type=NodePort",
        "--set",
        "relay.service.externalTrafficPolicy=Cluster",
        "--set-json",
        "relay.acceptFrom=[]",
        "--set",
        "relay.auth.existingSecret=relay-users",
        # Hand-off and `helm test` send without AUTH from the pod network: off here.
        "--set",
        "relay.handoff.enabled=false",
        "--set",
        "tests.enabled=false",
    )
    assert rendered.get("Service", "mailflow-relay")["spec"]["externalTrafficPolicy"] == "Cluster"
    node_port = render("default", "--set", "relay.service.type=NodePort")
    assert node_port.get("Service", "mailflow-relay")["spec"]["externalTrafficPolicy"] == "Local"


@pytest.mark.usefixtures("helm_binary")
@pytest.mark.parametrize(
    ("grace", "pre_stop", "reserve"),
    [(30, 10, 60), (79, 10, 60), (60, 30, 30), (30, 0, 21)],
)
def test_a_grace_period_too_short_for_the_drain_is_refused(
    grace: int, pre_stop: int, reserve: int
) -> None:
    result = helm(
        *template_args(
            "default",
            "--set",
            f"relay.terminationGracePeriodSeconds={grace}",
            "--set",
            f"relay.preStopSleepSeconds={pre_stop}",
            "--set",
            f"relay.handoff.reserveSeconds={reserve}",
        )
    )
    assert result.returncode != 0
    # The message names the three values and what they add up to.
    assert f"relay.terminationGracePeriodSeconds ({grace}) is too short" in result.stderr
    assert f"relay.preStopSleepSeconds ({pre_stop})" in result.stderr
    assert f"relay.handoff.reserveSeconds ({reserve})" in result.stderr
    assert f"a drain of at least 10 s need {pre_stop + reserve + 10} s" in result.stderr


@pytest.mark.usefixtures("helm_binary")
def test_operator_metrics_must_not_share_the_liveness_port() -> None:
    result = helm(*template_args("default", "--set", "operator.metrics.port=8080"))
    assert result.returncode != 0
    assert "operator.metrics.port and operator.livenessPort are both 8080" in result.stderr


def test_notes_warn_about_trusted_peers_and_an_open_api_server_egress(
    helm_binary: Path,
) -> None:
    def notes(*settings: str) -> str:
        args = ["install", "mailflow", str(CHART), "--namespace", "mail", "--dry-run=client"]
        result = helm(*args, *(arg for s in settings for arg in ("--set", s)))
        assert result.returncode == 0, result.stderr
        return result.stdout.split("NOTES:", 1)[1]

    assert "WARNING" not in notes()
    peers = notes("relay.handoff.peerCIDRs={10.244.0.0/16}")
    assert "10.244.0.0/16" in peers.split("Relaying without authentication is allowed from:")[1]
    assert "every pod in those ranges may relay mail" in peers
    open_egress = notes("relay.networkPolicy.enabled=true")
    assert 'apiServerCIDRs is "anywhere"' in open_egress
    narrowed = notes(
        "relay.networkPolicy.enabled=true",
        "relay.networkPolicy.egress.apiServerCIDRs={10.0.0.1/32}",
        "relay.handoff.peerCIDRs={10.244.0.0/16}",
    )
    assert "WARNING" not in narrowed


def test_notes_tell_how_to_send_a_first_message(helm_binary: Path) -> None:
    result = helm("install", "mailflow", str(CHART), "--namespace", "mail", "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n mail port-forward service/mailflow-relay 2525:25" in notes
    assert "swaks --server 127.0.0.1:2525" in notes
    assert "helm test mailflow -n mail" in notes


def test_docs_claim_the_kubernetes_releases_that_are_validated() -> None:
    claim = (
        f"{KUBERNETES_VERSIONS[0].rsplit('.', 1)[0]} to {KUBERNETES_VERSIONS[-1].rsplit('.', 1)[0]}"
    )
    assert f"Kubernetes **{claim}**" in (ROOT / "docs" / "install.md").read_text()
    assert f"for Kubernetes {claim}" in (ROOT / "README.md").read_text()


def test_notes_say_what_the_relay_logs_hold(helm_binary: Path) -> None:
    def notes(*settings: str) -> str:
        args = ["install", "mailflow", str(CHART), "--namespace", "mail", "--dry-run=client"]
        result = helm(*args, *(arg for s in settings for arg in ("--set", s)))
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.split("NOTES:", 1)[1].split())

    default = notes()
    assert "JSON only, one object per line: queue_id on every line about a message" in default
    assert "session_id on every line about an SMTP connection" in default
    # The delivery line's fields (tests/relay/engine/test_relay_operations.py reads them).
    assert "with recipient, connector, server, tls_version, verified, status and reply" in default
    assert "text, one line per event" in notes("relay.logFormat=text")
    assert "every step of each message" in notes("relay.logLevel=DEBUG")
