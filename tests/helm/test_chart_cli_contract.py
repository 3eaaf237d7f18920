"""The chart runs the real command line: every rendered argument list must parse.

The chart and the CLI are written apart; this is where a renamed or mistyped flag, or a
value the CLI refuses (a hand-off address, a network), fails before it reaches a pod.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest

from helm.chart import VALUES_SETS, Rendered
from mailflow_cli.main import build_parser
from mailflow_cli.relay_command import relay_setup
from mailflow_relay.hosting.cluster import RoutingSecretSource


def container_args(rendered: Rendered, kind: str, component: str) -> list[str]:
    (workload,) = [
        o
        for o in rendered.of_kind(kind)
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    (container,) = [
        c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == component
    ]
    args = list(container.get("command", [])[1:]) + list(container.get("args", []))
    # The kubelet expands $(POD_NAME) from the environment; any name will do here.
    return [a.replace("$(POD_NAME)", "mailflow-relay-0") for a in args]


@pytest.mark.parametrize("values", VALUES_SETS)
def test_the_relay_arguments_parse_and_make_a_cluster_relay(
    render: Callable[..., Rendered], values: str, tmp_path: Path
) -> None:
    args = container_args(render(values), "StatefulSet", "relay")
    parsed = build_parser().parse_args(args)
    assert parsed.command == "relay"
    if parsed.auth_dir:  # mounted from a Secret in the pod; an empty folder here
        parsed.auth_dir = str(tmp_path)
    settings, source, http = relay_setup(parsed, io.StringIO())
    assert isinstance(source, RoutingSecretSource)
    assert http is not None
    assert str(settings.spool_dir) == "/var/spool/mailflow"
    assert settings.listener.accept_from or settings.listener.users or parsed.auth_dir


@pytest.mark.parametrize("values", VALUES_SETS)
def test_the_operator_arguments_parse(render: Callable[..., Rendered], values: str) -> None:
    args = container_args(render(values), "Deployment", "operator")
    parsed = build_parser().parse_args(args)
    assert parsed.command == "operator"


def test_mailflow_operator_with_a_namespace_only_finds_what_the_chart_installs(
    render: Callable[..., Rendered],
) -> None:
    """`mailflow operator --namespace NS` outside the chart (a laptop, a debug session)
    publishes to the Secret and selects the pods the chart made as release mailflow."""
    from mailflow_cli.operator_command import config_from_args

    chart_args = build_parser().parse_args(
        container_args(render("default"), "Deployment", "operator")
    )
    chart = config_from_args(chart_args).reconcile
    bare = config_from_args(build_parser().parse_args(["operator", "--namespace", "mail"]))
    assert bare.reconcile.routing_secret == chart.routing_secret
    assert bare.reconcile.relay_selector == chart.relay_selector
    assert bare.reconcile.namespaces == chart.namespaces == ("mail",)


@pytest.mark.parametrize("values", VALUES_SETS)
def test_the_operator_is_ready_only_when_its_services_can_use_it(
    render: Callable[..., Rendered], values: str
) -> None:
    rendered = render(values)
    (deployment,) = [
        d
        for d in rendered.of_kind("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    readiness = container["readinessProbe"]
    ports = {p["name"] for p in container["ports"]}
    if "webhook" in ports:
        assert readiness["tcpSocket"] == {"port": "webhook"}
    else:
        assert readiness["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert readiness["periodSeconds"] >= 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_relay_log_format_overrides_the_top_level_one(render: Callable[..., Rendered]) -> None:
    def relay_format(*extra: str) -> str:
        args = container_args(render("default", *extra), "StatefulSet", "relay")
        return str(build_parser().parse_args(args).log_format)

    assert relay_format() == "json"
    assert relay_format("--set", "relay.logFormat=text") == "text"
    assert relay_format("--set", "logFormat=text") == "text"
    operator_args = container_args(
        render("default", "--set", "relay.logFormat=text"), "Deployment", "operator"
    )
    assert build_parser().parse_args(operator_args).log_format == "json"


def test_dnssec_resolvers_and_the_tls_report_contact_reach_the_relay(
    render: Callable[..., Rendered],
) -> None:
    rendered = render(
        "default",
        "--set-json",
        'relay.dnssecResolvers=["127.0.0.1:5353","127.0.0.2:5353"]',
        "--set",
        "relay.tlsReportContact=mailto:postmaster@example.com",
    )
    parsed = build_parser().parse_args(container_args(rendered, "StatefulSet", "relay"))
    settings, _, _ = relay_setup(parsed, io.StringIO())
    assert settings.dnssec_resolvers == ("127.0.0.1", "127.0.0.2")
    assert settings.dnssec_port == 5353
    assert settings.tls_report_contact == "mailto:postmaster@example.com"


def test_without_dnssec_resolvers_the_relay_gets_no_dane_flags(
    render: Callable[..., Rendered],
) -> None:
    args = container_args(render("default"), "StatefulSet", "relay")
    assert "--dnssec-resolver" not in args
    assert "--tls-report-contact" not in args
