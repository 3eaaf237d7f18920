"""`mailflow relay`, killed by itself between a spool append and its fdatasync.

Run as ``python kill_before_fdatasync.py N REPORT mailflow-arguments...``: the relay runs
as usual until its N-th ``os.fdatasync``; that call writes REPORT (the segment's inode,
the size the previous fdatasync of that file made durable, the size now) and sends the
process SIGKILL instead of syncing. Every record of that batch is then written but not
durable, and none of its callers has been answered: exactly the window a power cut hits.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import HasFileno

from mailflow_cli.main import main


def arm(calls_before_kill: int, report: str) -> None:
    real_fdatasync = os.fdatasync
    durable: dict[int, int] = {}
    calls = 0

    def fdatasync(fd: int | HasFileno) -> None:
        nonlocal calls
        calls += 1
        info = os.fstat(fd if isinstance(fd, int) else fd.fileno())
        if calls >= calls_before_kill:
            with open(report, "w") as out:
                out.write(f"{info.st_ino} {durable.get(info.st_ino, 0)} {info.st_size}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        real_fdatasync(fd)
        durable[info.st_ino] = info.st_size

    os.fdatasync = fdatasync


if __name__ == "__main__":
    arm(int(sys.argv[1]), sys.argv[2])
    sys.argv = ["mailflow", *sys.argv[3:]]
    sys.exit(main())
