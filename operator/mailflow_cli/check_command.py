"""``mailflow validate`` and ``mailflow explain``: the compiler, offline."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from mailflow_cli.exits import EXIT_OK, EXIT_PROBLEMS
from mailflow_compiler.checks import CheckResult, check_manifests
from mailflow_compiler.errors import UsageError
from mailflow_compiler.explain import explain_json, explain_text
from mailflow_compiler.manifests import load_manifests
from mailflow_relay.errors import InvalidAddressError
from mailflow_relay.routing.document import DefaultAction, DefaultRoute
from mailflow_relay.routing.router import domain_of

__all__ = ["run_explain", "run_validate"]


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
