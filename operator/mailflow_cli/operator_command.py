"""``mailflow operator``: its options become an OperatorConfig, then kopf runs it.

The only command module that imports kopf; :mod:`mailflow_cli.main` imports it only when
the operator command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import TextIO

import kopf

from mailflow_cli.endpoints import parse_dns_servers, parse_endpoint
from mailflow_cli.main import CHART_ROUTING_SECRET
from mailflow_compiler.errors import UsageError
from mailflow_operator.reconcile import ReconcileSettings
from mailflow_operator.runner import OperatorConfig, WebhookConfig, run_operator
from mailflow_operator.selectors import LabelSelector
from mailflow_relay.routing.document import DefaultAction, DefaultRoute, ObjectRef

__all__ = ["config_from_args", "run_operator_command"]


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    # The chart puts the Secret in its release namespace, the operator's first one.
    secret = args.routing_secret or f"{args.namespace[0]}/{CHART_ROUTING_SECRET}"
    try:
        routing_secret = ObjectRef.parse(secret)
    except ValueError as e:
        raise UsageError(f"--routing-secret: {e}") from e
    if args.queue_lifetime <= 0:
        raise UsageError("--queue-lifetime: must be more than 0 seconds")
    if args.probe_interval < 0:
        raise UsageError("--probe-interval: must be 0 (off) or more")
    if (args.webhook_cert is None) != (args.webhook_key is None):
        raise UsageError("--webhook-cert and --webhook-key go together")
    dns_servers, dns_port = parse_dns_servers(args.dns_server)
    webhook = None
    if args.webhook_port is not None:
        webhook = WebhookConfig(
            port=args.webhook_port,
            addr=args.webhook_addr,
            host=args.webhook_host,
            cert_file=Path(args.webhook_cert) if args.webhook_cert else None,
            key_file=Path(args.webhook_key) if args.webhook_key else None,
            strict=args.webhook_strict,
            managed=args.webhook_managed,
        )
    return OperatorConfig(
        reconcile=ReconcileSettings(
            namespaces=tuple(dict.fromkeys(args.namespace)),
            routing_secret=routing_secret,
            relay_selector=LabelSelector.parse(args.relay_selector),
            default_route=DefaultRoute(action=DefaultAction(args.default_route)),
            probe_interval=args.probe_interval,
            certificate_warning_days=args.cert_expiry_warning_days,
            dns_servers=tuple(dns_servers),
            dns_port=dns_port,
            queue_lifetime=args.queue_lifetime,
        ),
        webhook=webhook,
        liveness=args.liveness,
        metrics=parse_endpoint(args.metrics, "--metrics") if args.metrics else None,
    )


def require_credentials() -> None:
    """Refuse to start, in one line, where kopf would find no way to reach a cluster.

    kopf looks for an in-cluster service account, then a kubeconfig; with neither, it fails
    deep inside its login with a traceback several screens long. The same two checks, here,
    with the kubernetes client's own loaders (what kopf itself uses).
    """
    import yaml
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
        return
    except kube_config.ConfigException:
        pass
    try:
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]
    except (kube_config.ConfigException, OSError, yaml.YAMLError, ValueError) as e:
        reason = " ".join(str(e).split())  # a YAML error spans lines: one line here
        raise UsageError(
            f"no Kubernetes credentials: not running in a pod (no service account) and no usable "
            f"kubeconfig ({reason}); set KUBECONFIG to a kubeconfig file, or run the operator in the "
            "cluster (helm/mailflow)"
        ) from e


def run_operator_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    config = config_from_args(args)
    require_credentials()
    kopf.configure(
        verbose=args.verbose,
        # The relay's two formats: "text" is kopf's full line (time, logger, level, message).
        log_format={"json": kopf.LogFormat.JSON, "text": kopf.LogFormat.FULL}[args.log_format],
    )
    logging.getLogger("mailflow_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    asyncio.run(run_operator(config))
    return 0
