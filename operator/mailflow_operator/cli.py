"""The ``mailflow`` command.

Exit codes: 0 clean, 1 problems found in the inputs, 2 usage errors (bad options,
missing files, an address that is not an address).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from mailflow_operator import __version__
from mailflow_operator.checks import CheckResult, check_manifests
from mailflow_operator.errors import CrdError, UsageError
from mailflow_operator.explain import explain_json, explain_text
from mailflow_operator.manifests import load_manifests
from mailflow_operator.operator_cli import add_operator_parser, run_operator_command
from mailflow_operator.standalone import (
    ManifestSource,
    ManifestWatcher,
    compile_manifests,
    parse_endpoint,
    parse_networks,
    spool_path,
)
from mailflow_relay import queuectl
from mailflow_relay.cluster import RoutingSecretSource
from mailflow_relay.delivery import DeliverySettings
from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.listener import ListenerSettings
from mailflow_relay.logs import configure_logging
from mailflow_relay.passwords import hash_password
from mailflow_relay.relay import Relay, RelaySettings
from mailflow_relay.router import domain_of
from mailflow_relay.routing import DefaultAction, DefaultRoute
from mailflow_relay.service import DocumentSource, serve
from mailflow_relay.spool import SpoolError

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own exit is 2 as well; this only keeps the message format ours.
        self.print_usage(sys.stderr)
        raise UsageError(message)


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
        "--default-route",
        choices=[a.value for a in DefaultAction],
        default=DefaultAction.RECIPIENT_MX.value,
        help="what happens when no connector matches (default: %(default)s, Opportunistic TLS)",
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
    """``mailflow operator``: its options live with it, in :mod:`.operator_cli`."""
    add_operator_parser(commands)


def _relay_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
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
    relay.add_argument("--http", metavar="HOST:PORT", help="serve /healthz and /readyz here")
    relay.add_argument(
        "--hostname",
        default=socket.getfqdn(),
        help="name in the greeting, EHLO and Received (default: %(default)s)",
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
        "--mx-port", type=int, default=25, help="port of MX hosts (default: %(default)s; for tests)"
    )
    relay.add_argument(
        "--max-message-size",
        type=int,
        default=25 * 1024 * 1024,
        metavar="BYTES",
        help="largest message accepted (default: %(default)s)",
    )
    relay.add_argument(
        "--max-recipients",
        type=int,
        default=100,
        help="recipients per message (default: %(default)s)",
    )
    relay.add_argument(
        "--workers",
        type=int,
        default=16,
        help="deliveries in progress at once (default: %(default)s)",
    )
    relay.add_argument(
        "--retry-initial",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="first retry of a deferred recipient (default: %(default)s)",
    )
    relay.add_argument(
        "--retry-max",
        type=float,
        default=4000.0,
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
        default=20,
        metavar="N",
        help="simultaneous SMTP sessions from one client address; more get 421 "
        "(default: %(default)s)",
    )
    relay.add_argument(
        "--idle-connections",
        type=int,
        default=4,
        metavar="N",
        help="connections kept open per destination server for the next message (connection "
        "reuse; 0 turns it off; default: %(default)s)",
    )
    relay.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line with a queue_id field (default: %(default)s)",
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
        default=5 * 24 * 3600.0,
        metavar="SECONDS",
        help="a recipient still deferred this long bounces (default: %(default)s, 5 days)",
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
        default=25.0,
        metavar="SECONDS",
        help="on SIGTERM: time for sessions to finish and deliveries to go on (default: %(default)s)",
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


def _report_problems(result: CheckResult, out: TextIO, err: TextIO, output: str) -> None:
    if output == "json":
        json.dump(
            {
                "problems": [p.to_json() for p in result.problems],
                "notes": result.notes,
                "checked": result.checked,
            },
            out,
            indent=2,
            ensure_ascii=False,
        )
        out.write("\n")
        return
    for problem in result.problems:
        out.write(problem.format() + "\n")
    for note in result.notes:
        err.write(f"note: {note}\n")
    secrets = (
        ""
        if result.secrets_given
        else " (no Secret manifests given: Secret references not checked)"
    )
    err.write(f"checked {result.checked} object(s): {len(result.problems)} problem(s){secrets}\n")


def run_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = check_manifests(load_manifests(args.paths), default_namespace=args.namespace)
    _report_problems(result, out, err, args.output)
    return EXIT_PROBLEMS if result.problems else EXIT_OK


def run_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    for recipient in args.recipients:
        try:
            domain_of(recipient)
        except InvalidAddressError as e:
            raise UsageError(f"--to {recipient!r}: {e.reason}") from e
    sender = args.sender.strip()
    if sender not in ("", "<>"):
        try:
            domain_of(sender)
        except InvalidAddressError as e:
            raise UsageError(f"--from {sender!r}: {e.reason}") from e
    result = check_manifests(
        load_manifests(args.paths),
        default_namespace=args.namespace,
        resolve_secrets=True,
        default_route=DefaultRoute(action=DefaultAction(args.default_route)),
    )
    assert result.compiled is not None
    document = result.compiled.document
    if args.output == "json":
        body = explain_json(document, sender, args.recipients)
        body["problems"] = [p.to_json() for p in result.problems]
        json.dump(body, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(explain_text(document, sender, args.recipients))
        if result.problems:
            err.write(
                f"warning: {len(result.problems)} problem(s) in the manifests; objects with schema "
                "errors were left out (run `mailflow validate` for the details)\n"
            )
    return EXIT_OK


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
    for parser in (listing, shown, again, removal):
        parser.add_argument(
            "--spool", required=True, metavar="DIR", help="the relay's spool folder"
        )
    for parser in (listing, shown):
        parser.add_argument(
            "--output", "-o", choices=["text", "json"], default="text", help="output format"
        )


def run_queue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    spool_dir = Path(args.spool)
    if not spool_dir.is_dir():
        raise UsageError(f"--spool {args.spool!r}: no such folder")
    try:
        if args.action == "list":
            return queuectl.list_queue(spool_dir, out, as_json=args.output == "json")
        if args.action == "show":
            return queuectl.show(
                spool_dir, args.queue_id, out, body=args.body, as_json=args.output == "json"
            )
        if args.action == "retry":
            return queuectl.retry(spool_dir, args.queue_ids, out)
        return queuectl.delete(spool_dir, args.queue_ids, out)
    except (SpoolError, ValueError) as e:
        raise UsageError(f"queue {args.action}: {e}") from e


def read_auth_dir(folder: str) -> dict[str, str]:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"--auth-dir {folder!r}: no such folder")
    users = {}
    for file in sorted(path.iterdir()):
        # A mounted Secret also holds ..data links and hidden folders: skip them.
        if file.name.startswith(".") or not file.is_file():
            continue
        users[file.name] = file.read_text(encoding="utf-8").strip()
    return users


def run_relay(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    settings, source, http = relay_setup(args, err)
    asyncio.run(serve(settings, source, http))
    return EXIT_OK


def relay_setup(
    args: argparse.Namespace, err: TextIO
) -> tuple[RelaySettings, DocumentSource, tuple[str, int] | None]:
    """Everything `mailflow relay` needs, checked before anything listens or connects."""
    listen_host, listen_port = parse_endpoint(args.listen, "--listen")
    http = parse_endpoint(args.http, "--http") if args.http else None
    networks = parse_networks(args.accept_from)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    dns_servers: list[str] = []
    dns_port = 53
    for value in args.dns_server:
        host, sep, port = value.rpartition(":") if value.count(":") == 1 else ("", "", "")
        dns_servers.append(host if sep else value)
        if sep:
            if not port.isdigit():
                raise UsageError(f"--dns-server {value!r}: expected IP[:PORT]")
            dns_port = int(port)
    if bool(args.manifests) == bool(args.routing_secret):
        raise UsageError("give either --manifests (standalone) or --routing-secret (in a cluster)")
    default_route = DefaultRoute(action=DefaultAction(args.default_route))
    users: dict[str, str] = {}
    secrets: dict[str, dict[str, str]] = {}
    document = None
    if args.manifests:
        document, secrets = compile_manifests(args.manifests, args.namespace, default_route, err)
    if args.auth_secret:
        if args.auth_secret not in secrets:
            raise UsageError(
                f"--auth-secret {args.auth_secret!r}: no Secret of that name among the manifests "
                "(stringData); in a cluster, mount the Secret and use --auth-dir"
            )
        users = secrets[args.auth_secret]
    if args.auth_dir:
        users.update(read_auth_dir(args.auth_dir))
    if not networks and not users:
        err.write(
            "warning: no --accept-from and no --auth-secret: nobody may relay through this relay\n"
        )
    configure_logging(args.log_level, args.log_format, err)
    settings = RelaySettings(
        listener=ListenerSettings(
            host=listen_host,
            port=listen_port,
            hostname=args.hostname,
            accept_from=networks,
            users=users,
            tls_cert_file=Path(args.tls_cert) if args.tls_cert else None,
            tls_key_file=Path(args.tls_key) if args.tls_key else None,
            max_message_size=args.max_message_size,
            max_recipients=args.max_recipients,
            max_connections_per_client=args.max_connections_per_client,
        ),
        spool_dir=spool_path(args.spool),
        delivery=DeliverySettings(
            helo_name=args.hostname,
            mx_port=args.mx_port,
            idle_connections_per_target=args.idle_connections,
        ),
        dns_servers=tuple(dns_servers),
        dns_port=dns_port,
        workers=args.workers,
        retry_initial=args.retry_initial,
        retry_max=args.retry_max,
        queue_lifetime=args.queue_lifetime,
        delay_warning_after=args.delay_warning,
        drain_grace=args.drain_grace,
        # The peer is the relay Service: a name, resolved when the hand-off happens.
        handoff=parse_endpoint(args.handoff, "--handoff", names=True) if args.handoff else None,
    )

    def watcher(relay: Relay) -> ManifestWatcher:
        return ManifestWatcher(
            relay, args.manifests, args.namespace, default_route, args.reload_interval
        )

    source: DocumentSource
    if document is not None:
        source = ManifestSource(document, watcher if args.reload_interval > 0 else None)
    else:
        namespace, _, name = args.routing_secret.partition("/")
        if not namespace or not name:
            raise UsageError(f"--routing-secret {args.routing_secret!r}: expected NAMESPACE/NAME")
        source = RoutingSecretSource(namespace, name, poll_interval=args.config_poll)
    return settings, source, http


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
        if args.command == "validate":
            return run_validate(args, out, err)
        if args.command == "explain":
            return run_explain(args, out, err)
        if args.command == "operator":
            return run_operator_command(args, out, err)
        if args.command == "relay":
            return run_relay(args, out, err)
        if args.command == "queue":
            return run_queue(args, out, err)
        if args.command == "hash-password":
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise UsageError("hash-password: no password on standard input")
            out.write(hash_password(password) + "\n")
            return EXIT_OK
        raise UsageError(f"unknown command {args.command!r}")
    except UsageError as e:
        err.write(f"mailflow: error: {e}\n")
        return EXIT_USAGE
    except CrdError as e:
        err.write(f"mailflow: broken installation: {e}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
