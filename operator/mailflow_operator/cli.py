"""The ``mailflow`` command.

Exit codes: 0 clean, 1 problems found in the inputs, 2 usage errors (bad options,
missing files, an address that is not an address).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from mailflow_operator import __version__
from mailflow_operator.checks import CheckResult, check_manifests
from mailflow_operator.errors import CrdError, UsageError
from mailflow_operator.explain import explain_json, explain_text
from mailflow_operator.manifests import load_manifests
from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.router import domain_of
from mailflow_relay.routing import DefaultAction, DefaultRoute

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
    return parser


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
        raise UsageError(f"unknown command {args.command!r}")
    except UsageError as e:
        err.write(f"mailflow: error: {e}\n")
        return EXIT_USAGE
    except CrdError as e:
        err.write(f"mailflow: broken installation: {e}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
