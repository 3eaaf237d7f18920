"""The ``mailflow operator`` subcommand: its options and how they become an OperatorConfig."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any, TextIO

import kopf

from mailflow_operator.errors import UsageError
from mailflow_operator.reconcile import ReconcileSettings
from mailflow_operator.runner import OperatorConfig, WebhookConfig, run_operator
from mailflow_operator.selectors import LabelSelector
from mailflow_operator.standalone import parse_endpoint
from mailflow_relay.routing import DefaultAction, DefaultRoute, ObjectRef

__all__ = ["add_operator_parser", "config_from_args", "run_operator_command"]


def add_operator_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf): connectors and profiles → relay fleet",
        description=(
            "Watch OutboundConnectors, MultiSmtpProfiles and the Secrets they reference in the "
            "given namespaces, compile them into one routing document, publish it in the relay "
            "config Secret (only when it changed; its generation only grows) and report status, "
            "conditions, events and destination probes on every object. Logs in like kopf: the "
            "in-cluster service account, else KUBECONFIG."
        ),
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        required=True,
        metavar="NS",
        help="namespace to watch (repeat for several)",
    )
    parser.add_argument(
        "--routing-secret",
        required=True,
        metavar="NAMESPACE/NAME",
        help="the relay config Secret that receives routing.json",
    )
    parser.add_argument(
        "--relay-selector",
        required=True,
        metavar="LABELSELECTOR",
        help="selects the relay pods in the routing Secret's namespace, e.g. app=mailflow-relay",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="seconds between destination probes, jittered; 0 turns probes off "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--cert-expiry-warning-days",
        type=float,
        default=14.0,
        metavar="DAYS",
        help="warn when a destination's certificate expires within this many days "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--default-route",
        choices=[a.value for a in DefaultAction],
        default=DefaultAction.RECIPIENT_MX.value,
        help="recipients no connector matches (default: %(default)s); must match the relays'",
    )
    parser.add_argument(
        "--webhook-port", type=int, metavar="PORT", help="serve the validating webhook (HTTPS)"
    )
    parser.add_argument(
        "--webhook-addr",
        default="0.0.0.0",  # noqa: S104 - the API server calls in from outside the pod
        metavar="ADDR",
        help="(default: %(default)s)",
    )
    parser.add_argument(
        "--webhook-host",
        metavar="HOST",
        help="host name in the webhook URL (the Service's DNS name)",
    )
    parser.add_argument(
        "--webhook-cert", metavar="FILE", help="TLS certificate (e.g. cert-manager's)"
    )
    parser.add_argument("--webhook-key", metavar="FILE", help="key of --webhook-cert")
    parser.add_argument(
        "--webhook-strict",
        action="store_true",
        help="also refuse references that do not resolve (a missing profile or Secret)",
    )
    parser.add_argument(
        "--webhook-managed",
        metavar="NAME",
        help="let the operator create and update this ValidatingWebhookConfiguration",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    parser.add_argument(
        "--log-format",
        choices=["json", "plain", "full"],
        default="json",
        help="(default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    try:
        routing_secret = ObjectRef.parse(args.routing_secret)
    except ValueError as e:
        raise UsageError(f"--routing-secret: {e}") from e
    if args.probe_interval < 0:
        raise UsageError("--probe-interval: must be 0 (off) or more")
    if (args.webhook_cert is None) != (args.webhook_key is None):
        raise UsageError("--webhook-cert and --webhook-key go together")
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
        ),
        webhook=webhook,
        liveness=args.liveness,
        metrics=parse_endpoint(args.metrics, "--metrics") if args.metrics else None,
    )


def run_operator_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    config = config_from_args(args)
    kopf.configure(
        verbose=args.verbose,
        log_format={
            "json": kopf.LogFormat.JSON,
            "plain": kopf.LogFormat.PLAIN,
            "full": kopf.LogFormat.FULL,
        }[args.log_format],
    )
    logging.getLogger("mailflow_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    asyncio.run(run_operator(config))
    return 0
