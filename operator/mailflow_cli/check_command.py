"""``mailflow validate`` and ``mailflow explain``: the compiler, offline."""

from __future__ import annotations

import argparse
import ipaddress
import json
from typing import TextIO

from mailflow_cli.exits import EXIT_OK, EXIT_PROBLEMS
from mailflow_compiler.checks import CheckResult, check_manifests
from mailflow_compiler.errors import UsageError
from mailflow_compiler.explain import explain_json, explain_text
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.routing.document import DefaultAction, DefaultRoute, RoutingDocument
from mailflow_relay.routing.router import Client, domain_of

__all__ = ["run_explain", "run_validate"]


NOTHING_FOUND = (
    "no OutboundConnector or MultiSmtpProfile found in {paths}: nothing was checked "
    "(give the files or folders that hold them; folders are searched for .yaml, .yml and .json)"
)


def _notes(result: CheckResult) -> list[str]:
    notes = list(result.notes)
    if result.incomplete:
        notes.append(
            f"the CEL rules of {result.incomplete} object(s) did not run because of the errors "
            "above; fix those and run again, more may follow"
        )
    return notes


def _report_problems(result: CheckResult, out: TextIO, err: TextIO, output: str) -> None:
    if output == "json":
        json.dump(
            {
                "problems": [p.to_json() for p in result.problems],
                "notes": _notes(result),
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
    for note in _notes(result):
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
    if result.checked == 0 and not result.problems:
        # An empty folder or a wrong path in a pipeline must not pass as "0 problems".
        err.write(f"mailflow: error: {NOTHING_FOUND.format(paths=', '.join(args.paths))}\n")
        return EXIT_PROBLEMS
    return EXIT_PROBLEMS if result.problems else EXIT_OK


def _client(args: argparse.Namespace) -> Client | None:
    if args.client is None and args.client_user is None:
        return None
    if args.client is not None:
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            raise UsageError(f"--client {args.client!r}: expected an IP address") from None
    return Client(args.client, args.client_user)


def _resolved(
    args: argparse.Namespace, document: RoutingDocument, sender: str, client: Client | None
) -> list[str]:
    # Imported here: only --resolve needs the relay's DNS code.
    from mailflow_cli.endpoints import parse_dns_servers
    from mailflow_cli.resolve import Lookups, resolve_lines

    dns_servers, dns_port = parse_dns_servers(args.dns_server, "--dns-server")
    dnssec, dnssec_port = parse_dns_servers(args.dnssec_resolver, "--dnssec-resolver")
    if not 0 < args.mx_port <= 65535:
        raise UsageError(f"--mx-port {args.mx_port}: expected a port between 1 and 65535")
    return resolve_lines(
        document,
        sender,
        args.recipients,
        client,
        Lookups(dns_servers, dns_port, dnssec, dnssec_port, args.mx_port),
    )


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
    client = _client(args)
    result = check_manifests(
        load_manifests(args.paths),
        default_namespace=args.namespace,
        resolve_secrets=True,
        default_route=DefaultRoute(action=DefaultAction(args.default_route)),
    )
    assert result.compiled is not None
    document = result.compiled.document
    resolved = _resolved(args, document, sender, client) if args.resolve else []
    if args.output == "json":
        body = explain_json(document, sender, args.recipients, client, args.header_from or "")
        body["problems"] = [p.to_json() for p in result.problems]
        if args.resolve:
            body["resolved"] = resolved
        json.dump(body, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(explain_text(document, sender, args.recipients, client, args.header_from or ""))
        if resolved:
            out.write("\n" + "\n".join(resolved) + "\n")
        if result.problems:
            err.write(
                f"warning: {len(result.problems)} problem(s) in the manifests; objects with schema "
                "errors were left out (run `mailflow validate` for the details)\n"
            )
    return EXIT_OK
