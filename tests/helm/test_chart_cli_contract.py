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
