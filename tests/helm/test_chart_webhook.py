"""The operator's validating webhook, as the chart deploys it (operator.webhook, off by default).

Two certificate modes: a cert-manager Certificate whose CA cert-manager injects
(ci/webhook-values.yaml), or an existing kubernetes.io/tls Secret with its CA given as caBundle.
The operator's self-signed certificate is refused: see the "mailflow.webhook.mode" helper.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, cast

import kopf
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from helm.chart import Rendered, helm, template_args
from helm.test_chart_cli_contract import container_args
from helm.test_chart_render import FOREIGN_KINDS, KUBERNETES_VERSIONS
from mailflow_cli.main import build_parser
from mailflow_cli.operator_command import config_from_args
from mailflow_operator.reconcile import Reconciler
from mailflow_operator.runner import OperatorConfig, build_registry

CA_BUNDLE = base64.b64encode(
    b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
).decode()
SECRET_MODE = (
    *("--set", "operator.webhook.enabled=true"),
    *("--set", "operator.webhook.certificateSecret=mailflow-webhook-tls"),
    *("--set", f"operator.webhook.caBundle={CA_BUNDLE}"),
)
CONFIGURATION = "mail-mailflow-operator-webhook"
SERVICE = "mailflow-operator-webhook"
PLURALS = ["outboundconnectors", "multismtpprofiles", "dkimkeys"]


@pytest.fixture(scope="module")
def cert_manager(render: Callable[..., Rendered]) -> Rendered:
    rendered: Rendered = render("webhook-values.yaml")
    return rendered


@pytest.fixture(scope="module")
def secret(render: Callable[..., Rendered]) -> Rendered:
    rendered: Rendered = render("default", *SECRET_MODE)
    return rendered


def operator_pod(rendered: Rendered) -> dict[str, Any]:
    pod: dict[str, Any] = rendered.get("Deployment", "mailflow-operator")["spec"]["template"]
    return pod


def operator_config(rendered: Rendered) -> OperatorConfig:
    """The rendered arguments, through the real command line."""
    parsed = build_parser().parse_args(container_args(rendered, "Deployment", "operator"))
    assert parsed.command == "operator"
    return config_from_args(parsed)


def webhooks(rendered: Rendered) -> list[dict[str, Any]]:
    hooks: list[dict[str, Any]] = rendered.get("ValidatingWebhookConfiguration", CONFIGURATION)[
        "webhooks"
    ]
    return hooks


# -- Off by default ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["default", "production-values.yaml"])
def test_defaults_render_no_webhook(render: Callable[..., Rendered], values: str) -> None:
    rendered = render(values)
    assert not rendered.has("ValidatingWebhookConfiguration")
    assert not rendered.has("Certificate")
    services = {s["metadata"]["name"] for s in rendered.of_kind("Service")}
    assert SERVICE not in services
    # The production values turn the relays' NetworkPolicy on: still none for the operator.
    assert [p["metadata"]["name"] for p in rendered.of_kind("NetworkPolicy")] in (
        [],
        ["mailflow-relay"],
    )
    assert operator_config(rendered).webhook is None
    pod = operator_pod(rendered)
    (container,) = pod["spec"]["containers"]
    assert "webhook" not in {p["name"] for p in container["ports"]}
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["tmp"]


# -- Both modes -------------------------------------------------------------------------------


@pytest.fixture(params=["cert-manager", "secret"])
def enabled(request: pytest.FixtureRequest, cert_manager: Rendered, secret: Rendered) -> Rendered:
    return cert_manager if request.param == "cert-manager" else secret


def test_configuration_validates_create_and_update_of_both_kinds_in_watched_namespaces(
    enabled: Rendered,
) -> None:
    hooks = webhooks(enabled)
    assert [h["rules"] for h in hooks] == [
        [
            {
                "apiGroups": ["mailflow.dev"],
                "apiVersions": ["v1alpha1"],
                "resources": [plural],  # not their status: the operator's writes never wait
                "operations": ["CREATE", "UPDATE"],
                "scope": "Namespaced",
            }
        ]
        for plural in PLURALS
    ]
    watched = operator_config(enabled).reconcile.namespaces
    for hook in hooks:
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["namespaceSelector"] == {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": list(watched)}
            ]
        }


def test_configuration_calls_the_operator_through_its_service_on_the_handlers_paths(
    enabled: Rendered,
) -> None:
    config = operator_config(enabled)
    assert config.webhook is not None
    # The paths are the ids of the handlers the operator registers (kopf serves /<handler id>).
    registry = build_registry(config, cast(Reconciler, None), kopf.OperatorSettings())
    handler_ids = sorted(str(h.id) for h in registry._webhooks.get_all_handlers())
    paths = [h["clientConfig"]["service"]["path"] for h in webhooks(enabled)]
    assert sorted(path.lstrip("/") for path in paths) == handler_ids
    assert paths == [f"/validate-{plural}" for plural in PLURALS]

    service = enabled.get("Service", SERVICE)
    for hook in webhooks(enabled):
        reference = hook["clientConfig"]["service"]
        assert (reference["name"], reference["namespace"]) == (SERVICE, "mail")
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == reference["port"]]
    # The Service selects the operator pod and reaches the port the operator serves HTTPS on.
    pod = operator_pod(enabled)
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    (container_port,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert container_port["containerPort"] == config.webhook.port == 9443
    assert config.webhook.host == f"{SERVICE}.mail.svc"
    assert config.webhook.managed is None  # the chart owns the configuration


def test_operator_serves_the_mounted_certificate_read_only(enabled: Rendered) -> None:
    webhook = operator_config(enabled).webhook
    assert webhook is not None
    assert webhook.cert_file is not None
    assert webhook.key_file is not None
    pod = operator_pod(enabled)["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    assert mount["readOnly"] is True
    folder = PurePosixPath(mount["mountPath"])
    assert PurePosixPath(webhook.cert_file) == folder / "tls.crt"
    assert PurePosixPath(webhook.key_file) == folder / "tls.key"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    assert volume["secret"]["defaultMode"] == 0o440
    if enabled.has("Certificate"):
        certificate = enabled.get("Certificate", SERVICE)
        assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    else:
        assert volume["secret"]["secretName"] == "mailflow-webhook-tls"


@pytest.mark.parametrize("version", [KUBERNETES_VERSIONS[0], KUBERNETES_VERSIONS[-1]])
def test_webhook_objects_are_valid_kubernetes_objects(enabled: Rendered, version: str) -> None:
    # ci/webhook-values.yaml goes through every check of test_chart_render; this adds the
    # secret mode.
    checked = 0
    for manifest in enabled.objects:
        if (manifest["apiVersion"], manifest["kind"]) not in FOREIGN_KINDS:
            kubernetes_validate.validate(manifest, version, strict=True)
            checked += 1
    assert checked >= 15


# -- cert-manager -----------------------------------------------------------------------------


def test_cert_manager_issues_the_certificate_and_injects_its_ca(cert_manager: Rendered) -> None:
    certificate = cert_manager.get("Certificate", SERVICE)["spec"]
    assert certificate["issuerRef"] == {
        "name": "mailflow-selfsigned",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert f"{SERVICE}.mail.svc" in certificate["dnsNames"]  # what the API server asks for
    assert certificate["secretName"] == "mailflow-operator-webhook-tls"
    configuration = cert_manager.get("ValidatingWebhookConfiguration", CONFIGURATION)
    assert configuration["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"mail/{SERVICE}"
    }
    assert all("caBundle" not in h["clientConfig"] for h in webhooks(cert_manager))


def test_cert_manager_values_set_strict_failure_policy_and_network_policy(
    cert_manager: Rendered,
) -> None:
    webhook = operator_config(cert_manager).webhook
    assert webhook is not None
    assert webhook.strict
    assert {h["failurePolicy"] for h in webhooks(cert_manager)} == {"Fail"}
    policy = cert_manager.get("NetworkPolicy", "mailflow-operator")["spec"]
    assert policy["policyTypes"] == ["Ingress"]  # egress stays open (destination probes)
    assert policy["podSelector"]["matchLabels"].items() <= (
        operator_pod(cert_manager)["metadata"]["labels"].items()
    )
    webhook_rule, metrics_rule = policy["ingress"]
    assert webhook_rule == {
        "ports": [{"port": "webhook", "protocol": "TCP"}],
        "from": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
    }
    assert metrics_rule == {
        "ports": [{"port": "metrics", "protocol": "TCP"}],
        "from": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    }


def test_the_certificate_secret_can_be_named(render: Callable[..., Rendered]) -> None:
    rendered = render(
        "webhook-values.yaml", "--set", "operator.webhook.certificateSecret=webhook-cert"
    )
    assert rendered.get("Certificate", SERVICE)["spec"]["secretName"] == "webhook-cert"
    (volume,) = [v for v in operator_pod(rendered)["spec"]["volumes"] if v["name"] == "webhook-tls"]
    assert volume["secret"]["secretName"] == "webhook-cert"


# -- An existing Secret and its CA --------------------------------------------------------------


def test_secret_mode_puts_the_ca_bundle_in_the_configuration(secret: Rendered) -> None:
    assert not secret.has("Certificate")
    configuration = secret.get("ValidatingWebhookConfiguration", CONFIGURATION)
    assert "annotations" not in configuration["metadata"]
    assert [h["clientConfig"]["caBundle"] for h in webhooks(secret)] == [CA_BUNDLE] * len(PLURALS)
    # The default: an unreachable operator does not block GitOps applies (docs/install.md).
    assert {h["failurePolicy"] for h in webhooks(secret)} == {"Ignore"}
    webhook = operator_config(secret).webhook
    assert webhook is not None
    assert not webhook.strict
    # The relays' NetworkPolicy is off: no policy for the operator either.
    assert not secret.has("NetworkPolicy")


def test_network_policy_admits_the_api_server_from_anywhere_by_default(
    render: Callable[..., Rendered],
) -> None:
    rendered = render("default", *SECRET_MODE, "--set", "relay.networkPolicy.enabled=true")
    policy = rendered.get("NetworkPolicy", "mailflow-operator")["spec"]
    # No metricsFromNamespaceSelectors: only the webhook rule.
    assert policy["ingress"] == [
        {
            "ports": [{"port": "webhook", "protocol": "TCP"}],
            "from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}],
        }
    ]


# -- Refused ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("helm_binary")
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        # The operator's own self-signed certificate: nothing could publish its CA.
        (
            ["operator.webhook.enabled=true"],
            "operator.webhook.enabled needs a certificate the API server can trust",
        ),
        (
            ["operator.webhook.enabled=true", "operator.webhook.certificateSecret=tls"],
            "operator.webhook.certificateSecret (tls) needs operator.webhook.caBundle",
        ),
        (
            [
                "operator.webhook.enabled=true",
                "operator.webhook.certManager.issuerRef.kind=ClusterIssuer",
            ],
            "operator.webhook.certManager.issuerRef needs a name",
        ),
        (
            [
                "operator.webhook.enabled=true",
                "operator.webhook.certManager.issuerRef.name=ca",
                f"operator.webhook.caBundle={CA_BUNDLE}",
            ],
            "operator.webhook.caBundle and operator.webhook.certManager.issuerRef exclude",
        ),
        (
            [
                "operator.webhook.enabled=true",
                "operator.webhook.certManager.issuerRef.name=ca",
                "operator.webhook.port=9091",
            ],
            "operator.webhook.port (9091) is already the liveness or metrics port",
        ),
        (["operator.webhook.failurePolicy=Retry"], "at '/operator/webhook/failurePolicy'"),
        (["operator.webhook.timeoutSeconds=60"], "at '/operator/webhook/timeoutSeconds'"),
    ],
)
def test_incomplete_webhook_settings_are_refused(settings: list[str], message: str) -> None:
    result = helm(*template_args("default", *(a for s in settings for a in ("--set", s))))
    assert result.returncode != 0
    assert message in result.stderr


def test_the_configuration_name_is_unique_per_release_namespace(
    render: Callable[..., Rendered],
) -> None:
    rendered = render(
        "webhook-values.yaml", "--set", "fullnameOverride=" + "x" * 63, "--namespace", "other"
    )
    (configuration,) = rendered.of_kind("ValidatingWebhookConfiguration")
    name: str = configuration["metadata"]["name"]
    assert name.startswith("other-")
    assert len(name) <= 63
    assert configuration["webhooks"][0]["clientConfig"]["service"]["namespace"] == "other"
