"""The relay StatefulSet and the operator Deployment, as rendered: what they run and how safely."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from helm.chart import VALUES_SETS, Manifest, Rendered

SPOOL = "/var/spool/mailflow"


def container(workload: Manifest, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def option(args: list[str], flag: str) -> list[str]:
    """Every value given to a repeatable flag, in order."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]


@pytest.fixture(params=VALUES_SETS)
def any_values(request: pytest.FixtureRequest, render: Callable[..., Rendered]) -> Rendered:
    rendered: Rendered = render(request.param)
    return rendered


def relay_of(rendered: Rendered) -> Manifest:
    return rendered.get("StatefulSet", "mailflow-relay")


def operator_of(rendered: Rendered) -> Manifest:
    return rendered.get("Deployment", "mailflow-operator")


def test_relay_spool_is_a_volume_claim_template_mounted_at_the_spool(any_values: Rendered) -> None:
    relay = relay_of(any_values)
    (claim,) = relay["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    mounts = {m["name"]: m["mountPath"] for m in container(relay, "relay")["volumeMounts"]}
    assert mounts["spool"] == SPOOL
    # A claim template, not a pod volume: each pod has its own spool that outlives it.
    volumes = {v["name"] for v in relay["spec"]["template"]["spec"]["volumes"]}
    assert "spool" not in volumes
    assert relay["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }


def test_relay_runs_in_cluster_mode_with_the_contracted_flags(default: Rendered) -> None:
    relay = container(relay_of(default), "relay")
    args = relay["args"]
    assert args[0] == "relay"
    assert option(args, "--routing-secret") == ["mail/mailflow-routing"]
    assert option(args, "--listen") == ["0.0.0.0:2525"]
    assert option(args, "--spool") == [SPOOL]
    assert option(args, "--http") == ["0.0.0.0:9090"]
    assert option(args, "--default-route") == ["RecipientMx"]
    assert option(args, "--accept-from") == [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
    ]
    assert "--allow-open-relay" not in args
    # The NOTES promise JSON logs with a queue id: the chart asks for them.
    assert option(args, "--log-format") == ["json"]
    assert option(args, "--hostname") == [
        "$(POD_NAME).mailflow-relay-headless.mail.svc.cluster.local"
    ]
    assert "--manifests" not in args
    assert "--tls-cert" not in args
    assert "--auth-dir" not in args
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in relay["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def test_relay_tls_auth_allow_list_and_default_route_come_from_values(production: Rendered) -> None:
    relay = relay_of(production)
    args = container(relay, "relay")["args"]
    # The allow-list, loopback (kubectl port-forward), and the pod network so that peers
    # accept the hand-off on drain.
    assert option(args, "--accept-from") == [
        "10.20.0.0/16",
        "10.30.4.0/24",
        "127.0.0.0/8",
        "::1/128",
        "10.244.0.0/16",
    ]
    assert option(args, "--default-route") == ["Reject"]
    assert option(args, "--hostname") == ["relay.mail.contoso.com"]
    assert option(args, "--tls-cert") == ["/etc/mailflow/tls/tls.crt"]
    assert option(args, "--tls-key") == ["/etc/mailflow/tls/tls.key"]
    # AUTH users come from the mounted Secret, not through the API (no RBAC on that Secret).
    assert option(args, "--auth-dir") == ["/etc/mailflow/auth"]
    mounts = {m["name"]: m for m in container(relay, "relay")["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/mailflow/tls", "readOnly": True}
    assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/mailflow/auth", "readOnly": True}
    volumes = {v["name"]: v for v in relay["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "relay-inbound-tls"
    assert volumes["auth"]["secret"]["secretName"] == "relay-users"


@pytest.mark.parametrize("workload", ["relay", "operator"])
def test_workloads_run_non_root_read_only_without_capabilities(
    any_values: Rendered, workload: str
) -> None:
    if workload == "relay":
        obj, name = relay_of(any_values), "relay"
    else:
        obj, name = operator_of(any_values), "operator"
    pod = obj["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(obj, name)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # The only writable places: /tmp (a small emptyDir) and, for the relay, its spool.
    mounts = {m["mountPath"]: m["name"] for m in container(obj, name)["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    assert container(obj, name)["resources"]["requests"]["memory"]


def test_relay_probes_use_healthz_and_readyz_on_the_http_port(default: Rendered) -> None:
    relay = container(relay_of(default), "relay")
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert relay["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert ports == {"smtp": 2525, "http": 9090}


def test_relay_drains_with_a_pre_stop_pause_inside_a_long_grace_period(
    default: Rendered, production: Rendered
) -> None:
    pod = relay_of(default)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    assert container(relay_of(default), "relay")["lifecycle"]["preStop"] == {
        "exec": {"command": ["sleep", "10"]}
    }
    assert relay_of(production)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 900
    # The drain ends early enough for the hand-off before SIGKILL: 300 - 10 (preStop) - 60.
    args = container(relay_of(default), "relay")["args"]
    assert option(args, "--drain-grace") == ["230"]
    assert option(args, "--handoff") == ["mailflow-relay.mail.svc.cluster.local:25"]
    assert option(container(relay_of(production), "relay")["args"], "--drain-grace") == ["830"]


def test_relay_without_hand_off_leaves_the_rest_in_its_spool(
    render: Callable[..., Rendered],
) -> None:
    args = container(relay_of(render("default", "--set", "relay.handoff.enabled=false")), "relay")[
        "args"
    ]
    assert "--handoff" not in args


def test_relay_replicas_belong_to_the_hpa_when_autoscaling(
    default: Rendered, production: Rendered
) -> None:
    assert relay_of(default)["spec"]["replicas"] == 2
    assert "replicas" not in relay_of(production)["spec"]


def test_operator_is_one_replica_replaced_not_rolled(any_values: Rendered) -> None:
    operator = operator_of(any_values)
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}


def test_operator_runs_with_the_contracted_flags(default: Rendered, production: Rendered) -> None:
    operator = container(operator_of(default), "operator")
    args = operator["args"]
    assert args[0] == "operator"
    assert option(args, "--namespace") == ["mail"]
    assert option(args, "--routing-secret") == ["mail/mailflow-routing"]
    assert option(args, "--relay-selector") == [
        "app.kubernetes.io/name=mailflow,app.kubernetes.io/instance=mailflow,app.kubernetes.io/component=relay"
    ]
    assert option(args, "--liveness") == ["http://0.0.0.0:8080/healthz"]
    assert option(args, "--metrics") == ["0.0.0.0:9091"]
    assert option(args, "--log-format") == ["json"]  # the same value as the relays'
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"liveness": 8080, "metrics": 9091}
    # The operator compiles the default route into the document: the same as the relays'.
    assert option(args, "--default-route") == ["RecipientMx"]
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    production_args = container(operator_of(production), "operator")["args"]
    assert option(production_args, "--namespace") == ["mail", "mail-apps"]
    assert option(production_args, "--default-route") == ["Reject"]


def test_relay_selector_of_the_operator_selects_the_relay_pods(default: Rendered) -> None:
    args = container(operator_of(default), "operator")["args"]
    selector = dict(pair.split("=") for pair in option(args, "--relay-selector")[0].split(","))
    labels = relay_of(default)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert (
        not selector.items()
        <= operator_of(default)["spec"]["template"]["metadata"]["labels"].items()
    )


def test_images_default_to_the_app_version_or_a_pinned_digest(
    default: Rendered, production: Rendered
) -> None:
    assert container(relay_of(default), "relay")["image"] == "ghcr.io/mailflow/mailflow-relay:0.1.0"
    assert container(operator_of(default), "operator")["image"] == (
        "ghcr.io/mailflow/mailflow-operator:0.1.0"
    )
    assert container(relay_of(production), "relay")["image"] == (
        "ghcr.io/mailflow/mailflow-relay@sha256:" + "1" * 64
    )


def test_routing_secret_is_created_empty(default: Rendered) -> None:
    secret = default.get("Secret", "mailflow-routing")
    assert "data" not in secret
    assert "stringData" not in secret


def test_client_service_maps_its_ports_onto_the_smtp_listener(
    default: Rendered, loadbalancer: Rendered
) -> None:
    client = default.get("Service", "mailflow-relay")
    assert client["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"], p["targetPort"]) for p in client["spec"]["ports"]] == [
        ("smtp", 25, "smtp")
    ]
    headless = default.get("Service", "mailflow-relay-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert relay_of(default)["spec"]["serviceName"] == "mailflow-relay-headless"
    exposed = loadbalancer.get("Service", "mailflow-relay")["spec"]
    assert exposed["type"] == "LoadBalancer"
    assert exposed["externalTrafficPolicy"] == "Local"
    assert exposed["loadBalancerSourceRanges"] == ["198.51.100.0/24", "203.0.113.25/32"]
    assert [(p["port"], p["targetPort"]) for p in exposed["ports"]] == [(25, "smtp"), (587, "smtp")]
    # The HTTP port (metrics) never goes on the client Service.
    assert all(p["name"] != "http" for p in exposed["ports"])


def test_helm_test_pod_sends_through_the_relay_service(default: Rendered) -> None:
    pod = default.get("Pod", "mailflow-test-send")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (send,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in send["env"]}
    assert env["RELAY_HOST"] == "mailflow-relay.mail.svc.cluster.local"
    assert env["RELAY_PORT"] == "25"
    assert "send_message" in send["args"][0]
    assert pod["spec"]["restartPolicy"] == "Never"
    compile(send["args"][0], "helm-test", "exec")  # the inline script is valid Python


def test_operator_metrics_can_be_turned_off_or_moved(render: Callable[..., Rendered]) -> None:
    off = render("production-values.yaml", "--set", "operator.metrics.enabled=false")
    operator = container(operator_of(off), "operator")
    assert "--metrics" not in operator["args"]
    assert [p["name"] for p in operator["ports"]] == ["liveness"]
    assert [s["metadata"]["name"] for s in off.of_kind("ServiceMonitor")] == ["mailflow-relay"]
    assert "mailflow-operator-metrics" not in {
        s["metadata"]["name"] for s in off.of_kind("Service")
    }
    moved = render("default", "--set", "operator.metrics.port=9400")
    assert option(container(operator_of(moved), "operator")["args"], "--metrics") == [
        "0.0.0.0:9400"
    ]
    assert moved.get("Service", "mailflow-operator-metrics")["spec"]["ports"][0]["port"] == 9400


def test_the_shortest_allowed_grace_period_still_drains_ten_seconds(
    render: Callable[..., Rendered],
) -> None:
    # 80 = preStop 10 + hand-off reserve 60 + the 10 s minimum drain.
    rendered = render("default", "--set", "relay.terminationGracePeriodSeconds=80")
    assert option(container(relay_of(rendered), "relay")["args"], "--drain-grace") == ["10"]


@pytest.mark.parametrize(
    ("settings", "processes", "cpu"),
    [
        ((), "1", "100m"),
        (("--set", "relay.processes=3"), "3", "300m"),
        (("--set", "relay.processes=2", "--set", "relay.cpuPerProcess=1"), "2", "2000m"),
        (("--set", "relay.processes=4", "--set", "relay.cpuPerProcess=250m"), "4", "1000m"),
        # A CPU request given by the user wins over the computed one.
        (
            ("--set", "relay.processes=4", "--set", "relay.resources.requests.cpu=1500m"),
            "4",
            "1500m",
        ),
    ],
)
def test_relay_cpu_request_follows_the_process_count(
    render: Callable[..., Rendered], settings: tuple[str, ...], processes: str, cpu: str
) -> None:
    relay = container(relay_of(render("default", *settings)), "relay")
    assert option(relay["args"], "--processes") == [processes]
    assert relay["resources"]["requests"] == {"cpu": cpu, "memory": "192Mi"}
    assert relay["resources"]["limits"] == {"memory": "512Mi"}
