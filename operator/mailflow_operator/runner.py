"""``mailflow operator``: kopf's machinery around the reconciler.

kopf does what it is good at — logging in (in-cluster service account or kubeconfig),
watching OutboundConnectors, MultiSmtpProfiles, Secrets and relay pods, serving the
admission webhook over TLS and the liveness endpoint. Its handlers only feed the
reconciler's store (:mod:`.reconcile`), which compiles, publishes and writes status.

Namespaced mode scans no namespaces (``settings.scanning.disabled``): the operator
watches exactly the namespaces it is given, plus the routing Secret's namespace for
the relay pods, and needs no cluster-wide permission to list namespaces. Peering is
off (standalone): run one replica; a second one would write the same document.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from mailflow_compiler.manifests import API_GROUP
from mailflow_operator.kubeclient import KubeClient
from mailflow_operator.metrics import OperatorMetrics
from mailflow_operator.reconcile import PLURALS, Reconciler, ReconcileSettings
from mailflow_operator.webhook import admission_findings, denial_message
from mailflow_relay.certificates import self_signed

__all__ = ["OperatorConfig", "WebhookConfig", "build_registry", "run_operator"]

logger = logging.getLogger(__name__)

VERSION = "v1alpha1"


@dataclass(frozen=True)
class WebhookConfig:
    port: int
    """HTTPS port of the validating admission webhook."""
    addr: str = "0.0.0.0"  # noqa: S104 - the API server calls in from outside the pod
    """Listening address."""
    host: str | None = None
    """Host name in the webhook URL (the Service's DNS name); default: the address."""
    cert_file: Path | None = None
    """Server certificate (e.g. from a cert-manager Secret); None: generate a self-signed one."""
    key_file: Path | None = None
    strict: bool = False
    """Also refuse references that do not resolve (a missing profile or Secret)."""
    managed: str | None = None
    """Name of a ValidatingWebhookConfiguration that kopf creates and keeps current."""


@dataclass(frozen=True)
class OperatorConfig:
    reconcile: ReconcileSettings
    webhook: WebhookConfig | None = None
    liveness: str | None = None
    """kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``."""
    metrics: tuple[str, int] | None = None
    """Serve Prometheus metrics on this address."""
    api_server: str | None = None
    """Talk to this API server without credentials instead of logging in (tests)."""


async def login(config: OperatorConfig, settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """kopf's standard login: in-cluster service account, else kubeconfig."""
    if config.api_server is not None:
        return kopf.ConnectionInfo(
            server=config.api_server, insecure=True, default_namespace="default"
        )
    info = kopf.login_via_client(logger=logger, settings=settings)
    info = info or kopf.login_with_service_account(settings=settings)
    info = info or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("neither a service account nor a kubeconfig is available")
    return info


def build_registry(
    config: OperatorConfig, reconciler: Reconciler, settings: kopf.OperatorSettings
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    watched = set(config.reconcile.namespaces)
    relay_namespace = config.reconcile.routing_secret.namespace

    @kopf.on.login(registry=registry)
    async def login_handler(**_: Any) -> kopf.ConnectionInfo:
        return await login(config, settings)

    def in_watched(namespace: str | None, **_: Any) -> bool:
        return namespace in watched

    def feeder(kind: str) -> Callable[..., Any]:
        async def handler(event: dict[str, Any], **_: Any) -> None:
            body = event.get("object")
            if isinstance(body, dict):
                reconciler.observe(kind, event.get("type"), body)

        return handler

    for kind, plural in PLURALS.items():
        kopf.on.event(
            API_GROUP, VERSION, plural, registry=registry, when=in_watched, id=f"watch-{plural}"
        )(feeder(kind))
    routing_secret = config.reconcile.routing_secret

    def watched_secret(namespace: str | None, name: str | None, **_: Any) -> bool:
        # Secrets that connectors reference, and the routing Secret itself: deleted,
        # emptied or edited by someone else, it is published again.
        return namespace in watched or (
            namespace == routing_secret.namespace and name == routing_secret.name
        )

    kopf.on.event("", "v1", "secrets", registry=registry, when=watched_secret, id="watch-secrets")(
        feeder("Secret")
    )
    kopf.on.event(
        "",
        "v1",
        "pods",
        registry=registry,
        when=lambda namespace, **_: namespace == relay_namespace,
        id="watch-relay-pods",
    )(feeder("Pod"))

    if config.webhook is not None:
        strict = config.webhook.strict

        def validator(kind: str) -> Callable[..., Any]:
            async def handler(body: kopf.Body, **_: Any) -> None:
                findings = admission_findings(reconciler.store, kind, body, strict=strict)
                if findings:
                    raise kopf.AdmissionError(denial_message(findings), code=422)

            return handler

        for kind, plural in PLURALS.items():
            kopf.on.validate(
                API_GROUP,
                VERSION,
                plural,
                registry=registry,
                id=f"validate-{plural}",
                operations=["CREATE", "UPDATE"],
            )(validator(kind))
    return registry


def _self_signed(folder: Path, names: list[str]) -> tuple[Path, Path]:
    """A certificate for the webhook when none is given (cert-manager is the better way)."""
    certificate, key = self_signed(names, ca=True)
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert_file.write_bytes(certificate)
    key_file.write_bytes(key)
    return cert_file, key_file


def operator_settings(config: OperatorConfig, folder: Path) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # watch the given namespaces; never list them all
    settings.peering.standalone = True
    settings.posting.enabled = False  # events are the reconciler's, not kopf's handler logs
    webhook = config.webhook
    if webhook is not None:
        cert_file, key_file = webhook.cert_file, webhook.key_file
        if cert_file is None or key_file is None:
            names = [n for n in (webhook.host, "localhost", "127.0.0.1") if n]
            cert_file, key_file = _self_signed(folder, names)
        settings.admission.server = kopf.WebhookServer(
            addr=webhook.addr,
            port=webhook.port,
            host=webhook.host,
            certfile=cert_file,
            pkeyfile=key_file,
        )
        settings.admission.managed = webhook.managed
    return settings


async def run_operator(
    config: OperatorConfig,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    reconciler_ready: Callable[[Reconciler], None] | None = None,
) -> None:
    """Run until ``stop_flag`` is set (or SIGTERM/SIGINT in the main thread)."""
    with tempfile.TemporaryDirectory(prefix="mailflow-operator-") as tmp:
        settings = operator_settings(config, Path(tmp))
        metrics = OperatorMetrics()
        client = KubeClient(lambda: login(config, settings))
        reconciler = Reconciler(config.reconcile, client, metrics)
        if reconciler_ready is not None:
            reconciler_ready(reconciler)
        registry = build_registry(config, reconciler, settings)
        namespaces = sorted(
            set(config.reconcile.namespaces) | {config.reconcile.routing_secret.namespace}
        )
        metrics_server = None
        if config.metrics is not None:
            metrics_server = await metrics.serve(*config.metrics)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(reconciler.run(), name="mailflow reconciler")
                try:
                    await kopf.operator(
                        registry=registry,
                        settings=settings,
                        namespaces=namespaces,
                        liveness_endpoint=config.liveness,
                        stop_flag=stop_flag,
                        ready_flag=ready_flag,
                    )
                finally:
                    reconciler.stop()
        finally:
            if metrics_server is not None:
                metrics_server.close()
                await metrics_server.wait_closed()
