"""Micro-benchmark of the spool's acceptance path: messages/s and syscalls per message.

Sessions are asyncio tasks, as in the relay: each stores a message and waits for it to
be durable, then the next. The current spool goes through its committer
(``submit_store``, awaited with :func:`asyncio.wrap_future`, as engine/relay.py does);
``--old-module`` loads another spool module (e.g. ``git show main:...spool.py``) and
calls its blocking ``store_with_header`` through a 64-thread pool, as the relay did.

    python bench/spool_bench.py --sessions 64 --messages 4000 --size 10000
    strace -f -c -o calls.txt python bench/spool_bench.py ...   # syscalls per message

Not a test: the figures depend on the disk and on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import mailflow_relay.queue.spool as current_spool


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_spool", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def run(args: argparse.Namespace, module: ModuleType, directory: Path) -> float:
    spool: Any = module.Spool(directory)
    body = b"Subject: bench\r\n\r\n" + b"x" * args.size
    old = module is not current_spool
    threads = ThreadPoolExecutor(max_workers=64) if old else None
    loop = asyncio.get_running_loop()
    per_session = args.messages // args.sessions

    async def session() -> None:
        for _ in range(per_session):
            if threads is not None:
                await loop.run_in_executor(
                    threads, spool.store_with_header, "a@b.test", ["c@d.test"], lambda _: body
                )
            else:
                await asyncio.wrap_future(
                    spool.submit_store("a@b.test", ["c@d.test"], lambda _: body)
                )

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for _ in range(args.sessions):
            tasks.create_task(session())
    elapsed = time.perf_counter() - started
    if threads is not None:
        threads.shutdown()
    if not old:
        spool.close()
    return float(per_session * args.sessions / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--size", type=int, default=10_000, help="body bytes")
    parser.add_argument("--old-module", help="path of another spool.py to measure instead")
    parser.add_argument("--directory", help="where to spool (default: a temporary folder)")
    args = parser.parse_args()
    module = load_module(args.old_module) if args.old_module else current_spool
    directory = Path(args.directory or tempfile.mkdtemp(prefix="spool-bench-"))
    try:
        rate = asyncio.run(run(args, module, directory / "spool"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    label = args.old_module or "current spool"
    print(f"{label}: {rate:.0f} messages/s ({args.sessions} sessions, {args.size} B bodies)")


if __name__ == "__main__":
    main()
