"""relay.hostNetwork and operator.hostNetwork: the pods on the node's network, each relay on
its own ordinal ports, probing itself. The rendered shell line and probe are run here for real
(a stand-in `mailflow` on PATH prints what it is given; the probe asks a loopback HTTP server);
tests/images/test_cluster_node.py runs them on a kubelet."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helm.chart import Rendered, helm, template_args
from helm.test_chart_workloads import container, operator_of, option, relay_of

HOST = ("--set", "relay.hostNetwork.enabled=true", "--set", "relay.handoff.target=10.0.0.5:2525")


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    """The plain values of a container's env (the downward API ones left out)."""
    return {e["name"]: e["value"] for e in spec["env"] if "value" in e}


def kubelet_expand(word: str) -> str:
    """The kubelet's $(VAR) expansion for a word that references no variable: `$$` is `$`."""
    return word.replace("$$", "$")


def test_the_default_is_the_pod_network(default: Rendered) -> None:
    pod = relay_of(default)["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod
    assert "dnsPolicy" not in pod
    assert "hostNetwork" not in operator_of(default)["spec"]["template"]["spec"]
    assert "command" not in container(relay_of(default), "relay")


def test_host_network_relays_listen_on_their_ordinal_ports(
    render: Callable[..., Rendered], tmp_path: Path
) -> None:
    rendered = render(
        "default",
        *HOST,
        "--set",
        "relay.hostNetwork.listenAddress=127.0.0.1",
        "--set",
        "relay.smtpPort=3525",
        "--set",
        "relay.httpPort=4090",
    )
    pod = relay_of(rendered)["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    relay = container(relay_of(rendered), "relay")
    # Declared ports would be host ports, equal for all pods: a second pod could not fit a node.
    assert "ports" not in relay
    assert "--listen" not in relay["args"]
    assert "--http" not in relay["args"]
    index = next(e for e in relay["env"] if e["name"] == "POD_INDEX")
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    # The line the container runs, with a stand-in `mailflow` that prints its arguments.
    stand_in = tmp_path / "mailflow"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stand_in.chmod(0o755)
    command = [kubelet_expand(word) for word in relay["command"]]
    environment = {**env_of(relay), "POD_INDEX": "1", "PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = subprocess.run(
        [*command, *relay["args"]],
        env=environment,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    argv = result.stdout.splitlines()
    assert argv[: len(relay["args"])] == relay["args"]
    assert option(argv, "--listen") == ["127.0.0.1:3526"]
    assert option(argv, "--http") == ["127.0.0.1:4091"]


class _Health(http.server.BaseHTTPRequestHandler):
    ready = True

    def do_GET(self) -> None:
        ok = self.path == "/healthz" or (self.path == "/readyz" and _Health.ready)
        self.send_response(200 if ok else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        _Health.ready = True


def test_host_network_probes_ask_the_pods_own_port_and_fail_on_503(
    render: Callable[..., Rendered], health_server: int
) -> None:
    base = health_server - 2  # the server stands for the relay of ordinal 2
    relay = container(
        relay_of(render("default", *HOST, "--set", f"relay.httpPort={base}")), "relay"
    )
    environment = {**env_of(relay), "POD_INDEX": "2", "PATH": os.environ["PATH"]}
    assert environment["MAILFLOW_PROBE_ADDRESS"] == "127.0.0.1"  # for listenAddress 0.0.0.0

    def probe(kind: str) -> int:
        command = relay[kind]["exec"]["command"]
        return subprocess.run(command, env=environment, capture_output=True, timeout=10).returncode

    assert probe("startupProbe") == 0
    assert probe("livenessProbe") == 0
    assert probe("readinessProbe") == 0
    _Health.ready = False
    assert probe("readinessProbe") != 0
    assert probe("livenessProbe") == 0
    environment["POD_INDEX"] = "0"  # another pod's port: nothing listens there
    assert probe("livenessProbe") != 0


def test_host_network_hand_off_goes_to_the_named_target(render: Callable[..., Rendered]) -> None:
    rendered = render("default", *HOST, "--set", "relay.handoff.target=127.0.0.1:3525")
    assert option(container(relay_of(rendered), "relay")["args"], "--handoff") == ["127.0.0.1:3525"]


def test_host_network_operator_binds_and_probes_the_listen_address(
    render: Callable[..., Rendered],
) -> None:
    rendered = render(
        "default",
        "--set",
        "operator.hostNetwork.enabled=true",
        "--set",
        "operator.hostNetwork.listenAddress=127.0.0.1",
    )
    operator = operator_of(rendered)
    assert operator["spec"]["template"]["spec"]["hostNetwork"] is True
    assert operator["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    args = container(operator, "operator")["args"]
    assert option(args, "--liveness") == ["http://127.0.0.1:8080/healthz"]
    assert option(args, "--metrics") == ["127.0.0.1:9091"]
    assert container(operator, "operator")["livenessProbe"]["httpGet"]["host"] == "127.0.0.1"


def test_host_network_refuses_a_network_policy_that_would_not_apply() -> None:
    result = helm(*template_args("default", *HOST, "--set", "relay.networkPolicy.enabled=true"))
    assert result.returncode != 0
    assert "never selects host-network pods" in result.stderr


def test_host_network_listen_address_must_be_an_address() -> None:
    result = helm(*template_args("default", *HOST, "--set", "relay.hostNetwork.listenAddress=x"))
    assert result.returncode != 0
    assert "listenAddress" in result.stderr


def test_host_network_refuses_a_hand_off_through_the_service_it_cannot_reach() -> None:
    result = helm(*template_args("default", "--set", "relay.hostNetwork.enabled=true"))
    assert result.returncode != 0
    assert "needs relay.handoff.target" in result.stderr
    off = ("--set", "relay.hostNetwork.enabled=true", "--set", "relay.handoff.enabled=false")
    assert helm(*template_args("default", *off)).returncode == 0


def test_host_network_notes_send_to_the_node_not_the_service() -> None:
    result = helm("install", "--dry-run=client", "mailflow", "helm/mailflow", "-n", "mail", *HOST)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "swaks --server <node address>:2525" in notes
    assert "port-forward" not in notes
    assert "svc.cluster.local" not in notes
