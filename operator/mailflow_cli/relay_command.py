"""``mailflow relay``: options become settings, checked before anything listens."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from mailflow_cli.endpoints import parse_dns_servers, parse_endpoint, parse_networks, spool_path
from mailflow_cli.exits import EXIT_OK
from mailflow_cli.main import _default
from mailflow_cli.standalone import ManifestSource, ManifestWatcher, compile_manifests
from mailflow_compiler.errors import UsageError
from mailflow_relay.engine.logs import configure_logging
from mailflow_relay.engine.relay import Relay, RelaySettings
from mailflow_relay.errors import SettingsError
from mailflow_relay.hosting.loops import EventLoop
from mailflow_relay.hosting.loops import run as run_loop
from mailflow_relay.hosting.serve import DocumentSource, serve
from mailflow_relay.hosting.workers import Supervisor, WorkerSpec, plan_workers
from mailflow_relay.inbound.listener import ListenerConfigError, ListenerSettings
from mailflow_relay.inbound.settings import IPNetwork, is_localhost_name
from mailflow_relay.outbound.deliverer import DeliverySettings
from mailflow_relay.queue.lock import SpoolInUseError
from mailflow_relay.routing.document import DefaultAction, DefaultRoute

__all__ = ["read_auth_dir", "relay_setup", "run_relay"]


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
    processes = args.processes or len(os.sched_getaffinity(0))
    if processes < 0:
        raise UsageError(
            f"--processes {args.processes}: give a number of processes, 0 for one per CPU"
        )
    # A worker (started by a supervisor, --reuse-port) serves its one folder itself.
    is_worker = args.reuse_port or args.drain_only
    specs = [] if is_worker else plan_workers(settings.spool_dir, processes)
    try:
        if len(specs) > 1 or (processes > 1 and not is_worker):
            supervisor = Supervisor(
                specs,
                functools.partial(_worker_command, args),
                (settings.listener.host, settings.listener.port),
                http,
                settings.spool_dir,
            )
            run_loop(supervisor.run(), EventLoop(args.event_loop))
        else:
            port_file = Path(args.http_port_file) if args.http_port_file else None
            run_loop(
                serve(settings, source, http, http_port_file=port_file),
                EventLoop(args.event_loop),
            )
    except* SpoolInUseError as group:
        busy = group.exceptions[0]
        assert isinstance(busy, SpoolInUseError)
        raise UsageError(
            f"--spool {args.spool}: {busy}; stop that relay first, or give this one its own "
            "--spool (`mailflow queue` commands work beside a running relay)"
        ) from None
    return EXIT_OK


class _LoggedLines(io.StringIO):
    """``err`` for the notes written before the relay runs (compile warnings, a relay nobody
    may use), when the logs are JSON: each line becomes a log record, so a pipeline reading
    the relay's output never meets a line of text."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                level = logging.ERROR if line.lower().startswith("error") else logging.WARNING
                logging.getLogger("mailflow_cli.relay").log(level, "%s", line)
        return len(text)


def _notes_stream(args: argparse.Namespace, err: TextIO) -> TextIO:
    if args.log_format != "json":
        return err
    configure_logging(args.log_level, args.log_format, err)
    return _LoggedLines()


def _worker_command(
    args: argparse.Namespace, spec: WorkerSpec, port: int, http_port_file: Path
) -> list[str]:
    """The supervised worker: this command line, with its own spool and the shared port
    (later options win in argparse)."""
    host, _ = parse_endpoint(args.listen, "--listen")
    host = f"[{host}]" if ":" in host else host
    command = [sys.executable, "-m", "mailflow_cli", *args.argv]
    command += ["--processes", "1", "--spool", str(spec.spool_dir), "--listen", f"{host}:{port}"]
    command += ["--reuse-port", "--http", "127.0.0.1:0", "--http-port-file", str(http_port_file)]
    return [*command, "--drain-only"] if not spec.accept_mail else command


def relay_setup(
    args: argparse.Namespace, err: TextIO
) -> tuple[RelaySettings, DocumentSource, tuple[str, int] | None]:
    """Everything `mailflow relay` needs, checked before anything listens or connects."""
    log_stream, err = err, _notes_stream(args, err)
    listen_host, listen_port = parse_endpoint(args.listen, "--listen")
    http = parse_endpoint(args.http, "--http") if args.http else None
    networks = parse_networks(args.accept_from)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    dns_servers, dns_port = parse_dns_servers(args.dns_server)
    dnssec_resolvers, dnssec_port = parse_dns_servers(args.dnssec_resolver, "--dnssec-resolver")
    if bool(args.manifests) == bool(args.routing_secret):
        raise UsageError("give either --manifests (standalone) or --routing-secret (in a cluster)")
    default_route = DefaultRoute(action=DefaultAction(args.default_route))
    users: dict[str, str] = {}
    secrets: dict[str, dict[str, str]] = {}
    document = None
    left_out: tuple[str, ...] = ()
    if args.manifests:
        document, secrets, left_out = compile_manifests(
            args.manifests, args.namespace, default_route, err, skip_invalid=args.skip_invalid
        )
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
    configure_logging(args.log_level, args.log_format, log_stream)
    handoff = parse_endpoint(args.handoff, "--handoff", names=True) if args.handoff else None
    try:
        settings = _settings(
            args, listen_host, listen_port, networks, users, dns_servers, dns_port, handoff
        )
        settings = dataclasses.replace(
            settings,
            dnssec_resolvers=dnssec_resolvers,
            dnssec_port=dnssec_port,
            mta_sts_cache=Path(args.mta_sts_cache) if args.mta_sts_cache else None,
            tls_report_contact=args.tls_report_contact,
        )
    except (SettingsError, ListenerConfigError) as e:
        option = _OPTIONS.get(e.setting, e.setting.replace("_", "-"))
        raise UsageError(f"--{option}: {e.reason}") from e
    _check_hostname(args, settings.listener.hostname)

    def watcher(relay: Relay) -> ManifestWatcher:
        return ManifestWatcher(
            relay,
            args.manifests,
            args.namespace,
            default_route,
            args.reload_interval,
            skip_invalid=args.skip_invalid,
        )

    source: DocumentSource
    if document is not None:
        source = ManifestSource(
            document, watcher if args.reload_interval > 0 else None, left_out=left_out
        )
    else:
        namespace, _, name = args.routing_secret.partition("/")
        if not namespace or not name:
            raise UsageError(f"--routing-secret {args.routing_secret!r}: expected NAMESPACE/NAME")
        # Only a relay in a cluster needs the Kubernetes client (a large import).
        from mailflow_relay.hosting.cluster import RoutingSecretSource

        source = RoutingSecretSource(namespace, name, poll_interval=args.config_poll)
    return settings, source, http


def _check_hostname(args: argparse.Namespace, hostname: str) -> None:
    """A bare localhost only when asked for: many next hops refuse it in EHLO."""
    if args.hostname is None and is_localhost_name(hostname):
        raise UsageError(
            f"--hostname: this host's FQDN is {hostname!r}, which many next hops refuse in "
            "EHLO; give the relay's DNS name (the chart gives the pod's), or "
            "--hostname localhost to use it anyway"
        )


# Settings whose option is not their name with dashes.
_OPTIONS = {
    "idle_connections_per_target": "idle-connections",
    "delay_warning_after": "delay-warning",
    "port": "listen",
    "host": "listen",
}


def _settings(
    args: argparse.Namespace,
    listen_host: str,
    listen_port: int,
    networks: tuple[IPNetwork, ...],
    users: dict[str, str],
    dns_servers: tuple[str, ...],
    dns_port: int,
    handoff: tuple[str, int] | None,
) -> RelaySettings:
    # Not given: the settings' own default, the host's FQDN (checked for localhost above).
    hostname = args.hostname or _default(ListenerSettings, "hostname")
    return RelaySettings(
        listener=ListenerSettings(
            host=listen_host,
            port=listen_port,
            hostname=hostname,
            accept_from=networks,
            users=users,
            tls_cert_file=Path(args.tls_cert) if args.tls_cert else None,
            tls_key_file=Path(args.tls_key) if args.tls_key else None,
            max_message_size=args.max_message_size,
            max_recipients=args.max_recipients,
            max_connections_per_client=args.max_connections_per_client,
            allow_open_relay=args.allow_open_relay,
            max_hops=args.max_hops,
            max_connections=args.max_connections,
            command_timeout=args.command_timeout,
            data_timeout=args.data_timeout,
            soft_error_limit=args.soft_error_limit,
            hard_error_limit=args.hard_error_limit,
            error_sleep=args.error_sleep,
            max_auth_failures=args.max_auth_failures,
            reuse_port=args.reuse_port,
        ),
        spool_dir=spool_path(args.spool),
        delivery=DeliverySettings(
            helo_name=hostname,
            mx_port=args.mx_port,
            idle_connections_per_target=args.idle_connections,
            pipelining=args.pipelining == "on",
        ),
        dns_servers=tuple(dns_servers),
        dns_port=dns_port,
        workers=args.workers,
        retry_initial=args.retry_initial,
        retry_max=args.retry_max,
        queue_lifetime=args.queue_lifetime,
        spool_min_free=args.spool_min_free,
        delay_warning_after=args.delay_warning,
        drain_grace=args.drain_grace,
        # The peer is the relay Service: a name, resolved when the hand-off happens.
        handoff=handoff,
        handoff_peers=parse_networks(args.handoff_peer, "--handoff-peer"),
        accept_mail=not args.drain_only,
    )
