"""``mailflow queue``: look at and act on a relay's spool (like postqueue/postsuper)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from mailflow_compiler.errors import UsageError
from mailflow_relay.queue import admin as queuectl
from mailflow_relay.queue.spool import SpoolError

__all__ = ["run_queue"]


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
