"""``mailflow queue``: look at and act on a relay's spool (like postqueue/postsuper)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

from mailflow_cli.exits import EXIT_OK
from mailflow_compiler.errors import UsageError
from mailflow_relay.queue import admin as queuectl
from mailflow_relay.queue.selection import QueueFilter, load_router, parse_age
from mailflow_relay.queue.spool import SpoolError
from mailflow_relay.routing.router import Router

__all__ = ["run_queue"]


def run_queue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    spool_dir = Path(args.spool)
    if not spool_dir.is_dir():
        raise UsageError(f"--spool {args.spool!r}: no such folder")
    try:
        status = _act(args, spool_dir, out)
        out.flush()  # here, where a closed pipe can still be handled, not at interpreter exit
    except BrokenPipeError:
        # `mailflow queue list | head`: the reader has what it wanted. Quiet, as Unix tools
        # are; stdout goes to /dev/null so that Python's own flush at exit stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return status


def _filter(args: argparse.Namespace) -> QueueFilter:
    try:
        older_than = None if args.older_than is None else parse_age(args.older_than)
    except ValueError as e:
        raise UsageError(f"--older-than: {e}") from e
    return QueueFilter(
        connector=args.connector, domain=args.domain, sender=args.sender, older_than=older_than
    )


def _router(args: argparse.Namespace, spool_dir: Path, *, required: bool) -> Router | None:
    path = Path(args.routing) if args.routing else spool_dir / queuectl.PUBLISHED_DOCUMENT
    try:
        return load_router(path)
    except ValueError as e:
        if required:
            raise UsageError(f"{'--routing' if args.routing else '--connector'}: {e}") from e
        return None


def _selection(args: argparse.Namespace, spool_dir: Path) -> queuectl.Selection:
    queue_filter = _filter(args)
    router = _router(args, spool_dir, required=True) if queue_filter.connector else None
    return queuectl.Selection(tuple(getattr(args, "queue_ids", ())), queue_filter, router)


def _act(args: argparse.Namespace, spool_dir: Path, out: TextIO) -> int:
    try:
        if args.action == "list":
            return queuectl.list_queue(
                spool_dir, out, as_json=args.output == "json", selection=_selection(args, spool_dir)
            )
        if args.action == "show":
            return queuectl.show(
                spool_dir,
                args.queue_id,
                out,
                body=args.body,
                as_json=args.output == "json",
                router=_router(args, spool_dir, required=bool(args.routing)),
            )
        if args.action in queuectl.MARKS:
            selection = _selection(args, spool_dir)
            if not selection.queue_ids and selection.filter.empty and not args.all:
                raise UsageError(
                    "no queue id and no filter: name messages, give a "
                    "filter (--connector, --domain, --sender, --older-than) or --all"
                )
            return queuectl.mark(spool_dir, args.action, selection, out)
        if args.action == "retry":
            return queuectl.retry(spool_dir, args.queue_ids, out)
        return queuectl.delete(spool_dir, args.queue_ids, out)
    except (SpoolError, ValueError) as e:
        raise UsageError(f"queue {args.action}: {e}") from e
