"""RBAC, HPA, PDB and NetworkPolicy as rendered: least privilege, and only where asked for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from helm.chart import CHART, Rendered

Rule = dict[str, Any]


def rules(rendered: Rendered, kind: str, name: str, namespace: str = "mail") -> list[Rule]:
    (role,) = [
        r
        for r in rendered.of_kind(kind)
        if r["metadata"]["name"] == name and r["metadata"].get("namespace", namespace) == namespace
    ]
    found: list[Rule] = role["rules"]
    return found


def bound_roles(rendered: Rendered, service_account: str) -> set[tuple[str, str, str]]:
    """(binding kind, namespace, role name) of every binding that names the ServiceAccount."""
    bound = set()
    for binding in rendered.of_kind("RoleBinding") + rendered.of_kind("ClusterRoleBinding"):
        subjects = {(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]}
        if ("ServiceAccount", service_account, "mail") in subjects:
            namespace = binding["metadata"].get("namespace", "*")
            bound.add((binding["roleRef"]["kind"], namespace, binding["roleRef"]["name"]))
    return bound


def test_relay_role_reads_only_its_secrets_and_patches_only_relay_pods(default: Rendered) -> None:
    assert rules(default, "Role", "mailflow-relay") == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["mailflow-routing"],
            "verbs": ["get"],
        },
        {
            "apiGroups": [""],
            "resources": ["pods"],
            "resourceNames": ["mailflow-relay-0", "mailflow-relay-1"],
            "verbs": ["patch"],
        },
    ]
    assert bound_roles(default, "mailflow-relay") == {("Role", "mail", "mailflow-relay")}


def test_relay_role_names_every_pod_the_hpa_may_create(
    production: Rendered,
) -> None:
    secrets, pods = rules(production, "Role", "mailflow-relay")
    assert secrets["resourceNames"] == ["mailflow-routing"]
    assert pods["resourceNames"] == [f"mailflow-relay-{i}" for i in range(12)]


def test_no_role_grants_wildcards_or_escalation(production: Rendered) -> None:
    for kind in ("Role", "ClusterRole"):
        for role in production.of_kind(kind):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role
                assert not {"escalate", "bind", "impersonate", "delete", "deletecollection"} & set(
                    rule["verbs"]
                ), role


OPERATOR_NAMESPACE_RULES = [
    {
        "apiGroups": ["mailflow.dev"],
        "resources": ["outboundconnectors", "multismtpprofiles", "dkimkeys"],
        "verbs": ["list", "watch"],
    },
    {
        "apiGroups": ["mailflow.dev"],
        "resources": ["outboundconnectors/status", "multismtpprofiles/status", "dkimkeys/status"],
        "verbs": ["patch"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["secrets", "pods"], "verbs": ["list", "watch"]},
]


OPERATOR_ROUTING_RULES = [
    # The routing Secret is read and written by name only.
    {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["mailflow-routing"],
        "verbs": ["get", "patch"],
    },
    # Recreating it when deleted: RBAC cannot limit create by name, so a rule of its own.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
]


def test_operator_roles_are_least_privilege(default: Rendered) -> None:
    assert rules(default, "Role", "mailflow-operator") == OPERATOR_NAMESPACE_RULES
    assert rules(default, "Role", "mailflow-operator-routing") == OPERATOR_ROUTING_RULES
    # kopf's resource scanning is off: nothing cluster-wide.
    assert not default.has("ClusterRole")
    assert not default.has("ClusterRoleBinding")
    assert bound_roles(default, "mailflow-operator") == {
        ("Role", "mail", "mailflow-operator"),
        ("Role", "mail", "mailflow-operator-routing"),
    }


def test_operator_gets_a_role_in_each_watched_namespace_and_the_release_one(
    render: Callable[..., Rendered],
) -> None:
    rendered = render("production-values.yaml", "--set", "operator.watchNamespaces={team-a,team-b}")
    for namespace in ("team-a", "team-b", "mail"):
        assert rules(rendered, "Role", "mailflow-operator", namespace) == OPERATOR_NAMESPACE_RULES
    # `create` on Secrets exists once, in the release namespace: never in a watched one.
    creates = [
        (role["metadata"]["namespace"], role["metadata"]["name"], rule)
        for role in rendered.of_kind("Role")
        for rule in role["rules"]
        if "create" in rule["verbs"] and "secrets" in rule["resources"]
    ]
    assert creates == [("mail", "mailflow-operator-routing", OPERATOR_ROUTING_RULES[1])]
    # The relay pods and the routing Secret live in the release namespace, watched as well.
    assert bound_roles(rendered, "mailflow-operator") == {
        ("Role", "team-a", "mailflow-operator"),
        ("Role", "team-b", "mailflow-operator"),
        ("Role", "mail", "mailflow-operator"),
        ("Role", "mail", "mailflow-operator-routing"),
    }


def test_crd_discovery_is_a_read_only_cluster_role_when_asked_for(
    render: Callable[..., Rendered],
) -> None:
    rendered = render("default", "--set", "operator.rbac.crdDiscovery=true")
    assert rules(rendered, "ClusterRole", "mail-mailflow-operator-crds") == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["list", "watch"],
        }
    ]


def test_service_accounts_do_not_mount_tokens_into_other_pods(default: Rendered) -> None:
    for account in default.of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    test_pod = default.get("Pod", "mailflow-test-send")
    assert test_pod["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("kind", "count"),
    [
        ("HorizontalPodAutoscaler", 1),
        ("PodDisruptionBudget", 1),
        ("NetworkPolicy", 1),
        ("ServiceMonitor", 2),  # the relays' and the operator's
    ],
)
def test_production_extras_are_absent_by_default(
    default: Rendered, production: Rendered, kind: str, count: int
) -> None:
    assert not default.has(kind)
    assert len(production.of_kind(kind)) == count


def test_hpa_scales_the_relays_on_cpu_and_queue_depth(production: Rendered) -> None:
    hpa = production.get("HorizontalPodAutoscaler", "mailflow-relay")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "mailflow-relay",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    cpu, queue = hpa["metrics"]
    assert cpu["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 60},
    }
    assert queue["pods"] == {
        "metric": {"name": "mailflow_queue_messages"},
        "target": {"type": "AverageValue", "averageValue": "1000"},
    }
    assert hpa["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 300}
    ]


def test_hpa_without_a_metrics_adapter_scales_on_cpu_only(render: Callable[..., Rendered]) -> None:
    rendered: Rendered = render("default", "--set", "relay.autoscaling.enabled=true")
    hpa = rendered.get("HorizontalPodAutoscaler", "mailflow-relay")["spec"]
    assert [m["type"] for m in hpa["metrics"]] == ["Resource"]


def test_pdb_selects_the_relay_pods(production: Rendered, render: Callable[..., Rendered]) -> None:
    pdb = production.get("PodDisruptionBudget", "mailflow-relay")["spec"]
    assert pdb["maxUnavailable"] == 1
    assert "minAvailable" not in pdb
    relay = production.get("StatefulSet", "mailflow-relay")
    assert (
        pdb["selector"]["matchLabels"].items()
        <= relay["spec"]["template"]["metadata"]["labels"].items()
    )
    rendered: Rendered = render(
        "production-values.yaml", "--set", "relay.podDisruptionBudget.minAvailable=2"
    )
    pdb = rendered.get("PodDisruptionBudget", "mailflow-relay")["spec"]
    assert (pdb["minAvailable"], "maxUnavailable" in pdb) == (2, False)


def test_network_policy_admits_smtp_only_from_configured_sources(production: Rendered) -> None:
    policy = production.get("NetworkPolicy", "mailflow-relay")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    smtp, metrics = policy["ingress"]
    assert smtp["ports"] == [{"port": "smtp", "protocol": "TCP"}]
    assert [p["ipBlock"]["cidr"] for p in smtp["from"] if "ipBlock" in p] == [
        "10.20.0.0/16",
        "10.30.4.0/24",
    ]
    assert [p["namespaceSelector"] for p in smtp["from"] if "namespaceSelector" in p] == [
        {"matchLabels": {"kubernetes.io/metadata.name": "mail-apps"}}
    ]
    # Besides those: peer relays (hand-off on drain) and this release's helm test pod, nobody.
    components = [
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in smtp["from"]
        if "podSelector" in p
    ]
    assert components == ["relay", "helm-test"]
    assert len(smtp["from"]) == 5
    assert metrics["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_network_policy_egress_is_smtp_dns_api_server_and_peers(production: Rendered) -> None:
    egress = production.get("NetworkPolicy", "mailflow-relay")["spec"]["egress"]
    ports = [sorted({(p["port"], p["protocol"]) for p in rule["ports"]}) for rule in egress]
    assert ports == [
        [(25, "TCP"), (465, "TCP"), (587, "TCP"), (2525, "TCP")],
        [(53, "TCP"), (53, "UDP")],
        [(443, "TCP"), (6443, "TCP")],
        [(2525, "TCP")],
    ]
    assert [p["ipBlock"]["cidr"] for p in egress[2]["to"]] == ["10.0.0.1/32", "172.20.0.10/32"]
    assert (
        egress[3]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "relay"
    )


def test_network_policy_defaults_let_connectors_on_2525_and_ipv6_api_servers_through(
    render: Callable[..., Rendered],
) -> None:
    rendered = render("default", "--set", "relay.networkPolicy.enabled=true")
    smtp, _dns, api, _peers = rendered.get("NetworkPolicy", "mailflow-relay")["spec"]["egress"]
    # 2525 is the alternative submission port of examples/04-tls-modes.yaml.
    assert [p["port"] for p in smtp["ports"]] == [25, 465, 587, 2525]
    # "Anywhere" must mean anywhere on IPv6 too, or IPv6 clusters lose their routing Secret.
    assert [p["ipBlock"]["cidr"] for p in api["to"]] == ["0.0.0.0/0", "::/0"]


def test_hand_off_peers_are_admitted_by_relay_labels_never_by_peer_cidrs(
    production: Rendered,
) -> None:
    # production-values.yaml sets handoff.peerCIDRs to the pod network: every pod there may
    # relay without AUTH, so the policy must admit only the relay StatefulSet's own pods.
    relay = production.get("StatefulSet", "mailflow-relay")
    args = relay["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "10.244.0.0/16" in args
    policy = production.get("NetworkPolicy", "mailflow-relay")["spec"]
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    cidrs = {p["ipBlock"]["cidr"] for p in sources if "ipBlock" in p}
    assert "10.244.0.0/16" not in cidrs
    (peers,) = [
        p
        for p in sources
        if p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
        == "relay"
    ]
    # A bare podSelector: this namespace only, exactly the StatefulSet's selector.
    assert peers == {"podSelector": {"matchLabels": relay["spec"]["selector"]["matchLabels"]}}


def comment_above(text: str, key: str) -> str:
    """The comment lines right above the first line that starts with `key:`."""
    lines = text.splitlines()
    (index,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
    above: list[str] = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#"):
            break
        above.append(line.strip().lstrip("#").strip())
    return " ".join(reversed(above))


def test_values_comments_warn_about_ports_api_server_and_peers() -> None:
    text = (CHART / "values.yaml").read_text()
    assert "must be listed" in comment_above(text, "smtpPorts")
    assert "PRODUCTION: NARROW THIS" in comment_above(text, "apiServerCIDRs")
    assert "may then relay without AUTH" in comment_above(text, "peerCIDRs")


def test_dkim_key_generation_grants_secret_create_in_the_watched_namespaces_only_when_asked(
    render: Callable[..., Rendered],
) -> None:
    rendered = render(
        "production-values.yaml",
        *("--set", "operator.watchNamespaces={team-a,team-b}"),
        *("--set", "operator.dkim.generateSecrets=true"),
    )
    creates = sorted(
        (role["metadata"]["namespace"], role["metadata"]["name"])
        for role in rendered.of_kind("Role")
        for rule in role["rules"]
        if rule["verbs"] == ["create"] and rule["resources"] == ["secrets"]
        and "resourceNames" not in rule
    )  # fmt: skip
    # The release namespace has `create` already (the routing Secret); a watched namespace
    # gets it only for generated DkimKey Secrets, and never `update`, `patch` or `delete`.
    assert creates == [
        ("mail", "mailflow-operator-routing"),
        ("team-a", "mailflow-operator"),
        ("team-b", "mailflow-operator"),
    ]
    for namespace in ("team-a", "team-b"):
        granted = rules(rendered, "Role", "mailflow-operator", namespace)
        assert granted == [*OPERATOR_NAMESPACE_RULES, {
            "apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]
        }]  # fmt: skip


def test_the_dns_published_check_asks_the_dns_servers_given(
    render: Callable[..., Rendered],
) -> None:
    rendered = render("default", "--set", "operator.dkim.dnsServers={192.0.2.53,[2001:db8::53]:53}")
    (deployment,) = [
        d for d in rendered.of_kind("Deployment") if d["metadata"]["name"] == "mailflow-operator"
    ]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--dns-server"]
    assert pairs == ["192.0.2.53", "[2001:db8::53]:53"]
    with pytest.raises(AssertionError, match="dnsServers"):
        render("default", "--set", "operator.dkim.dnsServers={ns1.example}")
