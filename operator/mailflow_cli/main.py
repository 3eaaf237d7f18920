"""The ``mailflow`` command: one parser, and each command's module imported only when it runs.

``mailflow relay`` never loads kopf, and ``mailflow validate`` never loads the Kubernetes
client: the option definitions here import settings and enums only, and the code that does
the work lives in one module per command (``*_command.py``).

Exit codes: 0 clean, 1 problems found in the inputs, 2 usage errors (bad options,
missing files, an address that is not an address).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import itertools
import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from mailflow_cli import __version__
from mailflow_cli.exits import EXIT_OK, EXIT_USAGE
from mailflow_compiler.errors import CrdError, UsageError
from mailflow_relay.hosting.loops import EventLoop
from mailflow_relay.routing.document import DefaultAction

__all__ = ["build_parser", "main"]

# The log formats of every long-running command: one set, so a deployment says one word.
LOG_FORMATS = ("text", "json")

# What the chart names, installed as release "mailflow" (`helm install mailflow helm/mailflow`):
# `mailflow operator --namespace NS` then finds the chart's routing Secret and relay pods.
CHART_ROUTING_SECRET = "mailflow-routing"  # noqa: S105 - a Secret's name, not a password
CHART_RELAY_SELECTOR = (
    "app.kubernetes.io/name=mailflow,app.kubernetes.io/instance=mailflow,"
    "app.kubernetes.io/component=relay"
)

# command -> "module:function"; the module is imported when that command runs.
COMMANDS = {
    "validate": "mailflow_cli.check_command:run_validate",
    "explain": "mailflow_cli.check_command:run_explain",
    "relay": "mailflow_cli.relay_command:run_relay",
    "operator": "mailflow_cli.operator_command:run_operator_command",
    "queue": "mailflow_cli.queue_command:run_queue",
    "hash-password": "mailflow_cli.main:run_hash_password",
}


def _default(settings: type[Any], name: str) -> Any:
    """The default of one settings field: the CLI never restates a default of its own."""
    for f in dataclasses.fields(settings):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{settings.__name__}.{name} has no default")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own exit is 2 as well; this only keeps the message format ours.
        if not _wants_json(sys.argv[1:]):  # with JSON logs, the error line alone (as JSON)
            self.print_usage(sys.stderr)
        raise UsageError(message)


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether the command line asks for JSON logs, for errors found before it is parsed."""
    words = list(argv)
    return "--log-format=json" in words or any(
        a == "--log-format" and b == "json" for a, b in itertools.pairwise(words)
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mailflow",
        description="Declarative outbound mail-flow connectors: validate, explain, run.",
    )
    parser.add_argument("--version", action="version", version=f"mailflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check OutboundConnector and MultiSmtpProfile manifests offline",
        description=(
            "Check every OutboundConnector and MultiSmtpProfile in the given YAML files and "
            "folders against the CRD schemas (CEL rules included), then across documents: "
            "profile references, Secret references (when Secret manifests are given) and "
            "conflicting connectors. One line per problem: "
            "FILE:DOC: Kind/namespace/name: field.path: message. "
            "Exit 0 when clean, 1 on problems, 2 on usage errors."
        ),
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or folder")
    _common(validate)

    explain = commands.add_parser(
        "explain",
        help="show which connector takes each recipient, and why",
        description=(
            "Compile the manifests into the routing document and ask the relay's router, "
            "for each recipient, which connector takes it and why, where the mail goes "
            "next and with which TLS mode."
        ),
    )
    explain.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or folder")
    explain.add_argument(
        "--from",
        dest="sender",
        required=True,
        metavar="SENDER",
        help='envelope sender; "<>" for bounces',
    )
    explain.add_argument(
        "--to",
        dest="recipients",
        action="append",
        required=True,
        metavar="RECIPIENT",
        help="envelope recipient (repeat for several)",
    )
    explain.add_argument(
        "--client",
        metavar="IP",
        help="address of the client that submits the message (for connectors with "
        "spec.clients; default: a client no scope matches)",
    )
    explain.add_argument(
        "--client-user",
        metavar="USER",
        help="SMTP AUTH user the client logged in as (for spec.clients.users)",
    )
    explain.add_argument(
        "--header-from",
        dest="header_from",
        default=None,
        metavar="ADDRESS",
        help="the message's From: header, which decides the DKIM keys (default: --from)",
    )
    explain.add_argument(
        "--default-route",
        choices=[a.value for a in DefaultAction],
        default=DefaultAction.RECIPIENT_MX.value,
        help="what happens when no connector matches (default: %(default)s, Opportunistic TLS)",
    )
    explain.add_argument(
        "--resolve",
        action="store_true",
        help="also look up, now, the next hops in DNS and what DANE requires of each",
    )
    explain.add_argument(
        "--dns-server",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="with --resolve: DNS server for MX and addresses (default: the system's)",
    )
    explain.add_argument(
        "--dnssec-resolver",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="with --resolve: the validating resolver the relay trusts (as its flag of that name)",
    )
    explain.add_argument(
        "--mx-port",
        type=int,
        default=25,
        help="with --resolve: port of MX hosts (default: %(default)s; for tests)",
    )
    _common(explain)
    _relay_parser(commands)
    _operator_parser(commands)
    _queue_parser(commands)
    commands.add_parser(
        "hash-password",
        help="hash a password (read from standard input) for --auth-secret",
        description=(
            "Read one password from standard input (not from the command line, where other "
            "users could see it) and print its scrypt hash, for the Secret named by "
            "`mailflow relay --auth-secret`."
        ),
    )
    return parser


def _operator_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
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
        metavar="NAMESPACE/NAME",
        help="the relay config Secret that receives routing.json (default: "
        f"FIRST-NAMESPACE/{CHART_ROUTING_SECRET}, the chart's as release mailflow)",
    )
    parser.add_argument(
        "--relay-selector",
        default=CHART_RELAY_SELECTOR,
        metavar="LABELSELECTOR",
        help="selects the relay pods in the routing Secret's namespace (default: %(default)s, "
        "the chart's relay pods as release mailflow)",
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
        "--dns-server",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="DNS server for the DkimKeys' DnsPublished check (repeat; default: the system's)",
    )
    parser.add_argument(
        "--queue-lifetime",
        type=float,
        default=5 * 24 * 3600.0,
        metavar="SECONDS",
        help="the relays' --queue-lifetime: DkimKeys whose signatures expire sooner get a "
        "warning (default: %(default)s, 5 days)",
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
        choices=LOG_FORMATS,
        default="text",
        help="text: one line per event for a terminal; json: one object per line for a log "
        "pipeline (the chart's choice); the same choices as `mailflow relay` (default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def _relay_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    # The relay's settings are the one source of its defaults (not kopf, nor the kube client).
    from mailflow_relay.engine.relay import RelaySettings
    from mailflow_relay.inbound.listener import ListenerSettings
    from mailflow_relay.outbound.deliverer import DeliverySettings

    relay = commands.add_parser(
        "relay",
        help="run an SMTP relay configured from manifests, without a cluster",
        description=(
            "Run the Mailflow SMTP relay standalone: compile the manifests (connectors, "
            "profiles and the Secrets they reference) into the routing document, accept mail "
            "from the allowed networks or authenticated clients, spool it durably and "
            "deliver it through the connectors with their TLS modes. SIGTERM or SIGINT stops "
            "accepting, lets sessions finish and exits; spooled mail is delivered on the "
            "next start."
        ),
    )
    relay.add_argument(
        "--manifests",
        nargs="+",
        metavar="PATH",
        help="standalone: YAML files or folders with connectors, profiles and their Secrets",
    )
    relay.add_argument(
        "--skip-invalid-objects",
        dest="skip_invalid",
        action="store_true",
        help="with --manifests: start (and reload) without the objects that fail validation or "
        "conflict, naming each in the log and in /readyz, instead of refusing to start; their "
        "mail takes another route",
    )
    relay.add_argument(
        "--routing-secret",
        metavar="NAMESPACE/NAME",
        help="in a cluster: read the routing document from this Secret (key routing.json) and "
        "follow its changes; the pod (POD_NAME, POD_NAMESPACE) is annotated with the generation "
        "it serves",
    )
    relay.add_argument(
        "--config-poll",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --routing-secret: how often to read the Secret (default: %(default)s)",
    )
    relay.add_argument(
        "--listen",
        default="127.0.0.1:2525",
        metavar="HOST:PORT",
        help="SMTP listener (default: %(default)s)",
    )
    relay.add_argument(
        "--spool",
        required=True,
        metavar="DIR",
        help="spool folder (created if missing); keep it across restarts",
    )
    relay.add_argument(
        "--accept-from",
        action="append",
        default=[],
        metavar="CIDR",
        help="networks allowed to relay without authentication (repeat); nobody else may relay",
    )
    relay.add_argument(
        "--allow-open-relay",
        action="store_true",
        help="accept --accept-from 0.0.0.0/0 or ::/0 (anyone may relay); refused without "
        "this, and warned about with it",
    )
    relay.add_argument(
        "--auth-secret",
        metavar="NAME",
        help="a Secret among the manifests whose stringData maps usernames to password hashes "
        "(`mailflow hash-password`); enables AUTH PLAIN/LOGIN after STARTTLS",
    )
    relay.add_argument(
        "--auth-dir",
        metavar="DIR",
        help="a folder with one file per username holding its password hash (a mounted Secret); "
        "enables AUTH PLAIN/LOGIN after STARTTLS",
    )
    relay.add_argument(
        "--http", metavar="HOST:PORT", help="serve /healthz, /readyz and /metrics here"
    )
    relay.add_argument(
        "--hostname",
        # None: not given. The host's FQDN is then used, unless it is a bare localhost,
        # which many next hops refuse in EHLO: that must be asked for explicitly.
        default=None,
        help="name in the greeting, the outbound EHLO and Received (default: this host's FQDN, "
        f"now {_default(ListenerSettings, 'hostname')!r}; a bare localhost only when given here)",
    )
    relay.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="certificate for inbound STARTTLS (default: self-signed, made at start)",
    )
    relay.add_argument("--tls-key", metavar="FILE", help="key of --tls-cert")
    relay.add_argument(
        "--default-route",
        choices=[a.value for a in DefaultAction],
        default=DefaultAction.RECIPIENT_MX.value,
        help="recipients no connector matches: deliver to their MX with Opportunistic TLS, or "
        "refuse them at RCPT (default: %(default)s)",
    )
    relay.add_argument(
        "--dns-server",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="DNS server to ask (repeat; default: the system's)",
    )
    relay.add_argument(
        "--dnssec-resolver",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="a DNSSEC-validating resolver whose AD bit the relay trusts, for DANE (repeat; "
        "loopback or the cluster's; default: none, and DANE never applies)",
    )
    relay.add_argument(
        "--mta-sts-cache",
        metavar="FILE",
        help="JSON file that keeps MTA-STS policies across restarts (default: memory only; "
        "not inside --spool)",
    )
    relay.add_argument(
        "--tls-report-contact",
        metavar="CONTACT",
        help="send daily TLS-RPT reports (RFC 8460) to the domains that ask for them, with this "
        'contact-info (e.g. "mailto:postmaster@example.com"; default: no reports sent)',
    )
    relay.add_argument(
        "--mx-port",
        type=int,
        default=_default(DeliverySettings, "mx_port"),
        help="port of MX hosts (default: %(default)s; for tests)",
    )
    relay.add_argument(
        "--max-message-size",
        type=int,
        default=_default(ListenerSettings, "max_message_size"),
        metavar="BYTES",
        help="largest message accepted (default: %(default)s)",
    )
    relay.add_argument(
        "--max-recipients",
        type=int,
        default=_default(ListenerSettings, "max_recipients"),
        help="recipients per message (default: %(default)s)",
    )
    relay.add_argument(
        "--max-hops",
        type=int,
        default=_default(ListenerSettings, "max_hops"),
        metavar="N",
        help="most Received: headers a message may carry, with the relay's own; more is a "
        "mail loop, refused with 554 5.4.6 (default: %(default)s, as Postfix)",
    )
    relay.add_argument(
        "--workers",
        type=int,
        default=_default(RelaySettings, "workers"),
        help="deliveries in progress at once (default: %(default)s)",
    )
    relay.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="relay processes on the one --listen port (SO_REUSEPORT), each with its own spool "
        "folder SPOOL/worker-<i>, supervised by this process (a dead one is restarted); 0: one "
        "per CPU this process may use (default: %(default)s, one process on SPOOL itself)",
    )
    # A worker of `--processes N`, as its supervisor starts it; not for people.
    relay.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    relay.add_argument("--drain-only", action="store_true", help=argparse.SUPPRESS)
    relay.add_argument("--http-port-file", metavar="FILE", help=argparse.SUPPRESS)
    relay.add_argument(
        "--retry-initial",
        type=float,
        default=_default(RelaySettings, "retry_initial"),
        metavar="SECONDS",
        help="first retry of a deferred recipient (default: %(default)s)",
    )
    relay.add_argument(
        "--retry-max",
        type=float,
        default=_default(RelaySettings, "retry_max"),
        metavar="SECONDS",
        help="longest wait between retries (default: %(default)s)",
    )
    relay.add_argument(
        "--namespace",
        "-n",
        default="default",
        help="namespace of objects that name none (default: %(default)s)",
    )
    relay.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )
    relay.add_argument(
        "--max-connections-per-client",
        type=int,
        default=_default(ListenerSettings, "max_connections_per_client"),
        metavar="N",
        help="simultaneous SMTP sessions from one client address; more get 421 "
        "(default: %(default)s)",
    )
    relay.add_argument(
        "--max-connections",
        type=int,
        default=_default(ListenerSettings, "max_connections"),
        metavar="N",
        help="simultaneous SMTP sessions in all, kept well below the open-file limit; more get "
        "421 (default: half the soft RLIMIT_NOFILE, at most 1000: %(default)s here)",
    )
    relay.add_argument(
        "--command-timeout",
        type=float,
        default=_default(ListenerSettings, "command_timeout"),
        metavar="SECONDS",
        help="wait this long for a client's next command, then 421 and close "
        "(RFC 5321 minimum; default: %(default)s)",
    )
    relay.add_argument(
        "--data-timeout",
        type=float,
        default=_default(ListenerSettings, "data_timeout"),
        metavar="SECONDS",
        help="time for a message's whole content after 354, then 421 and close "
        "(default: %(default)s)",
    )
    relay.add_argument(
        "--soft-error-limit",
        type=int,
        default=_default(ListenerSettings, "soft_error_limit"),
        metavar="N",
        help="error replies in a session after which each next one is delayed longer "
        "(default: %(default)s)",
    )
    relay.add_argument(
        "--hard-error-limit",
        type=int,
        default=_default(ListenerSettings, "hard_error_limit"),
        metavar="N",
        help="error replies in a session at which it gets 421 and is closed (default: %(default)s)",
    )
    relay.add_argument(
        "--error-sleep",
        type=float,
        default=_default(ListenerSettings, "error_sleep"),
        metavar="SECONDS",
        help="delay added per error reply past the soft limit (default: %(default)s)",
    )
    relay.add_argument(
        "--max-auth-failures",
        type=int,
        default=_default(ListenerSettings, "max_auth_failures"),
        metavar="N",
        help="failed AUTH attempts in a session before 421 and close; an address that failed "
        "recently also waits longer before each attempt (default: %(default)s)",
    )
    relay.add_argument(
        "--idle-connections",
        type=int,
        default=_default(DeliverySettings, "idle_connections_per_target"),
        metavar="N",
        help="connections kept open per destination server for the next message (connection "
        "reuse; 0 turns it off; default: %(default)s)",
    )
    relay.add_argument(
        "--event-loop",
        choices=[loop.value for loop in EventLoop],
        default=EventLoop.UVLOOP.value,
        help="uvloop: libuv under asyncio, about a tenth less CPU per message; asyncio: the "
        "standard library's loop, for a debugger or a profiler (default: %(default)s)",
    )
    relay.add_argument(
        "--pipelining",
        choices=("on", "off"),
        default="on" if _default(DeliverySettings, "pipelining") else "off",
        help="on: send MAIL, RCPT and DATA in one write to next hops that offer PIPELINING "
        "(RFC 2920); off: one command per round trip (default: %(default)s)",
    )
    relay.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text: one line per event for a terminal; json: one object per line with a "
        "queue_id field, for a log pipeline (the chart's choice); the same choices as "
        "`mailflow operator` (default: %(default)s)",
    )
    relay.add_argument(
        "--reload-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often to look for changed manifests and reload them without a restart; "
        "0 turns it off (default: %(default)s)",
    )
    relay.add_argument(
        "--queue-lifetime",
        type=float,
        default=_default(RelaySettings, "queue_lifetime"),
        metavar="SECONDS",
        help="a recipient still deferred this long bounces (default: %(default)s, 5 days)",
    )
    relay.add_argument(
        "--spool-min-free",
        type=int,
        default=_default(RelaySettings, "spool_min_free"),
        metavar="BYTES",
        help="free space the spool's file system keeps: below it, new mail is refused with "
        "452 4.3.1 (try later) while the queue is still delivered, like Postfix's "
        "queue_minfree (default: 1.5 times --max-message-size)",
    )
    relay.add_argument(
        "--delay-warning",
        type=float,
        metavar="SECONDS",
        help="tell the sender once when a recipient is still deferred after this long (default: off)",
    )
    relay.add_argument(
        "--drain-grace",
        type=float,
        default=_default(RelaySettings, "drain_grace"),
        metavar="SECONDS",
        help="on SIGTERM: time for sessions to finish and deliveries to go on (default: %(default)s)",
    )
    relay.add_argument(
        "--handoff-peer",
        action="append",
        default=[],
        metavar="CIDR",
        help="network of the peer relays (repeat): a hand-off from them keeps the message's "
        "arrival time (queue lifetime, DSN Arrival-Date) and submitting client; from anyone "
        "else that trace header is removed and ignored",
    )
    relay.add_argument(
        "--handoff",
        metavar="HOST:PORT",
        help="on SIGTERM, after the grace period: hand what is left in the spool to this peer relay",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", "-o", choices=["text", "json"], default="text", help="output format"
    )
    parser.add_argument(
        "--namespace",
        "-n",
        default="default",
        help="namespace of objects that name none (default: %(default)s, as kubectl would)",
    )


def _queue_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    queue = commands.add_parser(
        "queue",
        help="inspect and act on a relay's spool (like postqueue/postsuper)",
        description=(
            "Look at the messages in a relay's spool and act on them. Safe while the relay "
            "runs: every change is an atomic spool operation."
        ),
    )
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every message with its recipients' states")
    shown = actions.add_parser("show", help="one message: envelope, states and headers")
    shown.add_argument("queue_id", metavar="QUEUE_ID")
    shown.add_argument("--body", action="store_true", help="print the body too")
    again = actions.add_parser(
        "retry", help="make deferred recipients due now (all messages, or the given ones)"
    )
    again.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID")
    removal = actions.add_parser("delete", help="remove messages for good: no delivery, no bounce")
    removal.add_argument("queue_ids", nargs="+", metavar="QUEUE_ID")
    marks = [
        actions.add_parser(
            "hold", help="hold recipients: neither delivered nor bounced until released"
        ),
        actions.add_parser("release", help="release held recipients: they are tried at once"),
        actions.add_parser(
            "bounce",
            help="return recipients to the sender: the relay fails them and sends an RFC 3464 "
            "report",
        ),
    ]
    for parser in marks:
        parser.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID")
        parser.add_argument(
            "--all",
            action="store_true",
            help="every message (without queue ids or filters, nothing is changed)",
        )
    for parser in (listing, *marks):
        _queue_filters(parser)
    shown.add_argument(
        "--routing",
        metavar="FILE",
        help="routing document for the routes shown (default: the "
        "one the relay left in the spool folder)",
    )
    for parser in (listing, shown, again, removal, *marks):
        parser.add_argument(
            "--spool", required=True, metavar="DIR", help="the relay's spool folder"
        )
    for parser in (listing, shown):
        parser.add_argument(
            "--output", "-o", choices=["text", "json"], default="text", help="output format"
        )


def _queue_filters(parser: argparse.ArgumentParser) -> None:
    filters = parser.add_argument_group(
        "filters", "select recipients still to deliver; several filters must all match"
    )
    filters.add_argument(
        "--connector",
        metavar="NAME",
        help="the connector that takes the recipient now (NAMESPACE/NAME or NAME; 'default' "
        "for the default route), as the relay's routing document says",
    )
    filters.add_argument("--domain", metavar="DOMAIN", help="the recipient's domain")
    filters.add_argument(
        "--sender",
        metavar="ADDRESS",
        help="the envelope sender; @DOMAIN for a sender domain, <> for bounces",
    )
    filters.add_argument(
        "--older-than",
        metavar="AGE",
        help="messages in the queue longer than AGE (90s, 15m, 2h, 3d)",
    )
    filters.add_argument(
        "--routing",
        metavar="FILE",
        help="routing document for --connector (default: the one "
        "the relay left in the spool folder)",
    )


def run_hash_password(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from mailflow_relay.inbound.passwords import hash_password

    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("hash-password: no password on standard input")
    out.write(hash_password(password) + "\n")
    return EXIT_OK


def _command(name: str) -> Callable[[argparse.Namespace, TextIO, TextIO], int]:
    module, _, function = COMMANDS[name].partition(":")
    run: Callable[[argparse.Namespace, TextIO, TextIO], int] = getattr(
        importlib.import_module(module), function
    )
    return run


def _address_in_use(error: BaseException) -> OSError | None:
    """The "address already in use" among an error and the errors it groups, if any."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _address_in_use(inner)
            if found is not None:
                return found
        return None
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return error
    return None


def _in_use_message(error: OSError, args: argparse.Namespace | None) -> str:
    """Which option asked for the address, and what to do: one line instead of a traceback."""
    # asyncio words it "error while attempting to bind on address ('127.0.0.1', 2525): ...".
    match = re.search(r"\('([^']*)', (\d+)", str(error))
    if match is None:
        return f"cannot listen: {error.strerror or error}"
    host, port = match.groups()
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    option = next(
        (
            f"--{name} {value}"
            for name in ("listen", "http", "metrics")
            if (value := getattr(args, name, None)) and str(value).endswith(f":{port}")
        ),
        f"listening on {address}",
    )
    return (
        f"{option}: address already in use: another process (another relay?) listens on "
        f"{address}; stop it or choose another port"
    )


def _error_line(err: TextIO, text: str, args: argparse.Namespace | None) -> None:
    """The one-line error; a JSON line when the command logs JSON (nothing else is text)."""
    if getattr(args, "log_format", None) != "json":
        err.write(text + "\n")
        return
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": "error",
        "logger": "mailflow_cli",
        "message": text,
    }
    err.write(json.dumps(entry, ensure_ascii=False) + "\n")


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args: argparse.Namespace | None = None
    if _wants_json(sys.argv[1:] if argv is None else argv):
        args = argparse.Namespace(log_format="json")  # until parsed: for an error line
    try:
        args = build_parser().parse_args(argv)
        # `mailflow relay --processes N` runs its workers with the same command line.
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return _command(args.command)(args, out, err)
    except UsageError as e:
        _error_line(err, f"mailflow: error: {e}", args)
        return EXIT_USAGE
    except CrdError as e:
        err.write(f"mailflow: broken installation: {e}\n")
        return EXIT_USAGE
    except (OSError, BaseExceptionGroup) as e:
        in_use = _address_in_use(e)
        if in_use is None:
            raise
        _error_line(err, f"mailflow: error: {_in_use_message(in_use, args)}", args)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
